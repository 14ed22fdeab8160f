"""Generation API on the demo model, against independent loops (mlx-lm's, and plain argmax
over full recomputation without a cache)."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from ds4mlx import encoding
from ds4mlx.generate import (
    ContextLengthError,
    chat_prompt,
    generate,
    stream_generate,
)


def _argmax_continuation(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens by recomputing the whole sequence each step, no decode state reuse."""
    seq, out = list(ids), []
    for _ in range(n):
        t = int(mx.argmax(model(mx.array([seq]))[0, -1]).item())
        out.append(t)
        seq.append(t)
    return out


class _Script:
    """A sampler that emits a fixed token sequence (to drive the reasoning/answer split)."""

    def __init__(self, tokens):
        self.tokens = list(tokens)

    def __call__(self, logprobs):
        # mlx-lm samples one step ahead, so it may ask once more after the last token
        return mx.array([self.tokens.pop(0) if len(self.tokens) > 1 else self.tokens[0]])


# ----------------------------------------------------------------------------- demo model


def test_demo_model_is_complete_and_cached(demo_dir):
    from ds4mlx.demo import DEMO_VOCAB_SIZE, demo_path
    from ds4mlx.tokenizer import load_tokenizer

    config = json.loads((demo_dir / "config.json").read_text())
    tok = load_tokenizer(demo_dir)
    assert len(tok) == config["vocab_size"] == DEMO_VOCAB_SIZE
    for special in (encoding.BOS, encoding.EOS, encoding.USER, encoding.ASSISTANT, encoding.THINK_START, encoding.THINK_END, encoding.DSML):
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    assert tok.bos_token_id == config["bos_token_id"] and tok.eos_token_id == config["eos_token_id"]
    text = "Hello, wörld! 3.14 — 漢字 \n\tdef f(): return 0"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: lossless
    # a second call reuses the cached directory without rewriting it
    stamp = (demo_dir / "tokenizer.json").stat().st_mtime_ns
    assert demo_path() == demo_dir
    assert (demo_dir / "tokenizer.json").stat().st_mtime_ns == stamp
    assert not [p for p in demo_dir.parent.iterdir() if p.name.startswith(".demo-tmp-")]


def test_demo_forward_is_fast(demo):
    import time

    model, _ = demo
    tokens = mx.array([[0, 5, 6, 7, 8, 9, 10, 11]])
    mx.eval(model(tokens))
    tic = time.perf_counter()
    mx.eval(model(tokens))
    assert time.perf_counter() - tic < 1.0


# ----------------------------------------------------------------------------- greedy


def test_greedy_equals_full_recompute_and_mlx_lm(demo):
    from mlx_lm.generate import stream_generate as mlx_stream

    model, tok = demo
    ids = chat_prompt(tok, "What is the capital of France?", thinking=False)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.think_end_id
    ours = [r.token for r in stream_generate(model, tok, ids, max_tokens=10, temp=0.0)]
    assert ours == _argmax_continuation(model, ids, len(ours))
    theirs = [r.token for r in mlx_stream(model, tok, ids, max_tokens=10)]
    assert theirs[: len(ours)] == ours
    assert generate(model, tok, ids, max_tokens=10, temp=0.0) == tok.decode(
        [t for t in ours if t != tok.eos_token_id]
    )


def test_text_prompt_gets_bos_once(demo):
    model, tok = demo
    first = next(iter(stream_generate(model, tok, "Hello", max_tokens=1, temp=0.0)))
    assert first.prompt_tokens == 1 + len(tok.encode("Hello", add_special_tokens=False))
    first = next(iter(stream_generate(model, tok, encoding.BOS + "Hello", max_tokens=1, temp=0.0)))
    assert first.prompt_tokens == 1 + len(tok.encode("Hello", add_special_tokens=False))


def test_top_k_one_is_greedy_and_seed_repeats(demo):
    model, tok = demo
    ids = chat_prompt(tok, "Hi", thinking=False)
    greedy = [r.token for r in stream_generate(model, tok, ids, max_tokens=6, temp=0.0)]
    top1 = [r.token for r in stream_generate(model, tok, ids, max_tokens=6, temp=1.0, top_k=1)]
    assert top1 == greedy
    a = [r.token for r in stream_generate(model, tok, ids, max_tokens=6, temp=1.0, min_p=0.0, seed=7)]
    b = [r.token for r in stream_generate(model, tok, ids, max_tokens=6, temp=1.0, min_p=0.0, seed=7)]
    assert a == b


# ----------------------------------------------------------------------------- state across calls


def test_prompt_cache_prefills_only_new_tokens(demo):
    model, tok = demo
    cache = model.make_cache()
    ids1 = chat_prompt(tok, "Hi", thinking=False)
    turn1 = list(stream_generate(model, tok, ids1, max_tokens=4, temp=0.0, prompt_cache=cache))
    gen1 = [r.token for r in turn1]
    assert cache[0].offset == len(ids1) + len(gen1) == turn1[-1].context_tokens

    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]
    ids2 = chat_prompt(tok, "And then?", thinking=False, context=history)
    assert ids2[0] != tok.bos_token_id  # a continuation: no second BOS
    close = [] if turn1[-1].finish_reason == "stop" else [tok.eos_token_id]
    turn2 = list(stream_generate(model, tok, close + ids2, max_tokens=4, temp=0.0, prompt_cache=cache))
    assert turn2[0].prompt_tokens == len(close) + len(ids2)
    assert turn2[-1].context_tokens == cache[0].offset == len(ids1) + len(gen1) + len(close) + len(ids2) + len(turn2)
    # the reused state continues exactly like one pass over the whole conversation
    whole = ids1 + gen1 + close + ids2
    assert [r.token for r in turn2] == _argmax_continuation(model, whole, len(turn2))


def test_context_limit(demo):
    model, tok = demo
    ids = chat_prompt(tok, "Hello there", thinking=False)
    with pytest.raises(ContextLengthError, match=f"{len(ids)} tokens"):
        next(iter(stream_generate(model, tok, ids, max_context=len(ids) - 1)))
    out = list(stream_generate(model, tok, ids, max_tokens=50, temp=0.0, max_context=len(ids) + 3))
    assert len(out) <= 3 and out[-1].context_tokens <= len(ids) + 3
    if out[-1].finish_reason != "stop":
        assert out[-1].finish_reason == "length" and len(out) == 3


# ----------------------------------------------------------------------------- reasoning split


def test_reasoning_and_answer_are_separated(demo):
    model, tok = demo
    ids = chat_prompt(tok, "Why?", thinking=True)
    assert ids[-1] == tok.think_start_id
    word = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    reasoning_ids, answer_ids = word("because it is"), word(" Yes, indeed.")
    script = reasoning_ids + [tok.think_end_id] + answer_ids + [tok.eos_token_id]

    out = list(stream_generate(model, tok, ids, max_tokens=50, sampler=_Script(script)))
    assert [r.token for r in out] == script
    assert out[-1].finish_reason == "stop"
    reasoning = "".join(r.text for r in out if r.reasoning)
    answer = "".join(r.text for r in out if not r.reasoning)
    assert reasoning == tok.decode(reasoning_ids)
    assert answer == tok.decode(answer_ids)

    text = generate(model, tok, ids, max_tokens=50, sampler=_Script(script))
    assert text == tok.decode(reasoning_ids + [tok.think_end_id] + answer_ids)
    parsed = encoding.parse_completion(text, "thinking")
    assert parsed["reasoning_content"] == tok.decode(reasoning_ids)
    assert parsed["content"] == tok.decode(answer_ids)


def test_bad_arguments(demo):
    model, tok = demo
    with pytest.raises(ValueError, match="max_tokens"):
        next(iter(stream_generate(model, tok, "x", max_tokens=0)))
    with pytest.raises(ValueError, match="top_p"):
        next(iter(stream_generate(model, tok, "x", top_p=1.5)))
    with pytest.raises(ValueError, match="empty"):
        next(iter(stream_generate(model, tok, [])))

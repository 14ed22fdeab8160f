"""Batched decoding against one-sequence runs: every sequence of a batch gets the logits it gets
alone, whatever the other sequences do.

The "seams" checkpoint has a window of 8, one ratio-4 layer (indexer top-4: top-k selection
starts at position 20) and one ratio-128 layer. The prompts' lengths put each sequence at its
own phase: over the decode steps one crosses the window, others the top-k seam, and two cross
position 128 at different steps; every ratio-4 window closes at a different step per sequence.
mlx-lm's own ``BatchGenerator`` drives the batch (right-padded prefill in chunks while others
decode, sequences joining two at a time and leaving at different steps), and its
``batch_generate`` is checked against its one-sequence ``generate_step``.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.generate import batch_generate as mlx_lm_batch_generate

import ds4mlx
from ds4mlx import load
from ds4mlx.state import BatchLayerCache, LayerCache

# (prompt length, decode steps): window at position 8, top-k at 20, ratio 128 at 128
PLAN = [(3, 7), (122, 8), (16, 6), (126, 4), (13, 9), (1, 3)]


def prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(2, 1024, size=n).tolist()


PROMPTS = [prompt(n, i) for i, (n, _) in enumerate(PLAN)]


def alone(model, ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray], list[LayerCache]]:
    """Greedy decode of one sequence with a cache of its own: (tokens, log-probabilities, cache)."""
    cache = model.make_cache()
    logits = model(mx.array([ids]), cache)[0, -1]
    tokens, logprobs = [], []
    for _ in range(steps):
        lp = logits - mx.logsumexp(logits)
        tokens.append(int(mx.argmax(lp)))
        logprobs.append(np.array(lp))
        logits = model(mx.array([[tokens[-1]]]), cache)[0, -1]
    return tokens, logprobs, cache


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("source", ["official", "mlx", "gguf"])  # every load at both top-k values
@pytest.mark.parametrize("k", [6, 4])
def test_every_sequence_of_a_batch_decodes_as_alone(seams_sources, source, k):
    model, _ = load(seams_sources[source], dtype=mx.float32, experts_per_token=k)
    refs = [alone(model, p, n) for p, (_, n) in zip(PROMPTS, PLAN)]

    gen = BatchGenerator(model, max_tokens=1, sampler=lambda lp: mx.argmax(lp, -1),
                         prefill_batch_size=2, prefill_step_size=64)
    uids = gen.insert(PROMPTS[:4], [n for _, n in PLAN[:4]])
    got: dict[int, list] = {u: [] for u in uids}
    caches = {}
    step = 0
    while True:
        if step == 3:  # two more join while the batch decodes
            late = gen.insert(PROMPTS[4:], [n for _, n in PLAN[4:]])
            uids += late
            got.update({u: [] for u in late})
        prompt_responses, responses = gen.next()
        step += 1
        if not responses and not prompt_responses:
            break
        for r in responses:
            got[r.uid].append((r.token, np.array(r.logprobs)))
            if r.finish_reason is not None:
                caches[r.uid] = r.prompt_cache
    gen.close()

    for i, u in enumerate(uids):
        tokens, logprobs, ref_cache = refs[i]
        assert [t for t, _ in got[u]] == tokens, f"sequence {i}: tokens differ"
        for j, ((_, lp), want) in enumerate(zip(got[u], logprobs)):
            err = rel_err(lp, want)
            assert err <= 1e-5, f"sequence {i} step {j}: relative difference {err:.2e}"
        # The state a finished sequence leaves is its own: one more step from it as alone.
        cache = caches[u]
        assert all(isinstance(c, LayerCache) for c in cache)
        assert cache[0].offset == ref_cache[0].offset == len(PROMPTS[i]) + len(tokens)
        nxt = mx.array([[7]])
        err = rel_err(np.array(model(nxt, cache)), np.array(model(nxt, ref_cache)))
        assert err <= 1e-5, f"sequence {i}: the extracted state differs ({err:.2e})"


def test_cache_protocol_merge_extend_filter(seams_ckpt):
    """Direct use of the batch state: merged prefixes of different lengths, a left-padded
    prefill, a sequence that leaves and one that joins give each sequence its own logits."""
    model, _ = load(seams_ckpt, dtype=mx.float32)
    a, b, c = prompt(21, 10), prompt(6, 11), prompt(30, 12)
    solo = {}
    for name, ids in (("a", a), ("b", b), ("c", c)):
        cache = model.make_cache()
        solo[name] = (cache, np.array(model(mx.array([ids]), cache)[0, -1]))

    # a's and b's prefixes from one-sequence runs, merged (the originals must stay as they are)
    ca, cb = model.make_cache(), model.make_cache()
    model(mx.array([a[:-1]]), ca)
    model(mx.array([b[:-1]]), cb)
    before = [np.array(x) for x in ca[1].state if isinstance(x, mx.array)]
    batch = [x.merge([y, z]) for x, y, z in zip(ca, ca, cb)]
    assert all(isinstance(x, BatchLayerCache) for x in batch)
    out = model(mx.array([[a[-1]], [b[-1]]]), batch)
    assert rel_err(np.array(out[0, -1]), solo["a"][1]) <= 1e-5
    assert rel_err(np.array(out[1, -1]), solo["b"][1]) <= 1e-5
    after = [np.array(x) for x in ca[1].state if isinstance(x, mx.array)]
    assert all(np.array_equal(x, y) for x, y in zip(before, after)), "merge changed its input"

    # c joins through a left-padded prefill of its own batch, then a leaves
    pad = 3
    joined = [LayerCache.merge([x]) for x in model.make_cache()]
    for x in joined:
        x.prepare(left_padding=[pad])
    model(mx.array([[0] * pad + c]), joined)
    for x in joined:
        x.finalize()
    for x, y in zip(batch, joined):
        x.extend(y)
    for x in batch:
        x.filter([1, 2])
    nxt = mx.array([[5], [9]])
    out = model(nxt, batch)
    for row, name in ((0, "b"), (1, "c")):
        want = model(nxt[row:row + 1], solo[name][0])
        assert rel_err(np.array(out[row]), np.array(want[0])) <= 1e-5, name
    assert [int(v) for v in batch[0].offset.tolist()] == [len(b) + 1, len(c) + 1]


def greedy(model, ids, n):
    steps = generate_step(mx.array(ids), model, max_tokens=n, sampler=lambda x: mx.argmax(x, -1),
                          prompt_cache=model.make_cache())
    return [t for t, _ in steps]


def test_mlx_lm_batch_generate_equals_greedy(demo):
    model, tokenizer = demo
    prompts = [tokenizer.encode(t) for t in ("Hello", "The quick brown fox jumps over", "1 2 3 4 5 6 7 8 9 10 11 12")]
    n = 24
    r = mlx_lm_batch_generate(model, tokenizer, prompts, max_tokens=n, return_token_ids=True)
    want = []
    eos = set(tokenizer.eos_token_ids)
    for ids in prompts:
        toks = greedy(model, ids, n)
        want.append(toks[: next((i for i, t in enumerate(toks) if t in eos), len(toks))])
    assert r.token_ids == want
    assert r.texts == [tokenizer.decode(t) for t in want]

    # ds4mlx's own: same call and result type, text prompts as generate takes them
    ours = ds4mlx.batch_generate(model, tokenizer, prompts, max_tokens=n, return_token_ids=True)
    assert type(ours) is type(r) and ours.token_ids == want and ours.texts == r.texts


def test_server_engine_decodes_concurrent_requests_together(demo):
    """Eight requests submitted together are decoded in one batch and answer as generate does
    alone; a batch of one (one-at-a-time serving) answers the same."""
    import asyncio

    from ds4mlx.generate import generate
    from ds4mlx.server.engine import Engine, Job

    model, tokenizer = demo
    prompts = [tokenizer.encode(f"Question number {i}: how many days are in a leap year?", add_special_tokens=False)
               for i in range(8)]
    n = 6
    want = [generate(model, tokenizer, p, temp=0.0, max_tokens=n) for p in prompts]

    async def serve(engine):
        async def one(ids):
            events = engine.submit(Job(ids=list(ids), max_tokens=n, temp=0.0))
            streamed = ""
            while True:
                kind, value = await events.get()
                if kind == "text":
                    streamed += value
                elif kind == "done":
                    return value.text, streamed
                elif kind == "error":
                    raise value
        return await asyncio.gather(*[one(p) for p in prompts])

    for max_batch in (8, 1):
        engine = Engine(model, tokenizer, max_batch=max_batch)
        try:
            got = asyncio.run(serve(engine))
        finally:
            engine.close()
        assert [text for text, _ in got] == want and [s for _, s in got] == want, max_batch
        assert (engine.most_together > 1) if max_batch > 1 else engine.most_together == 0

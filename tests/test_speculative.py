"""Speculative decoding against invariants: greedy output with drafts equals greedy output
without (mlx-lm's own ``generate_step`` is the reference), a rollback leaves the state the
model builds without the rejected tokens, drafts equal to the target's choices are all
accepted, and the acceptance rule keeps the target distribution.

The "seams" checkpoint has a window of 8, one ratio-4 layer (indexer top-4, so top-k selection
starts at position 20) and one ratio-128 layer: 300 tokens from a 10-token prompt cross every
seam many times (the ratio-128 one at 128 and 256). The MTP drafts of these random weights are
nearly all rejected, so an MTP-drafted run costs ~3 plain runs: it goes 140 tokens (across the
window, top-k and ratio-4 seams and the ratio-128 one at 128); the forced drafts, which reject at
every depth, cover the whole length.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

from ds4mlx import load
from ds4mlx.speculative import (ForcedDrafter, MTPDrafter, Sampling, SpeculativeStats, accept_drafts,
                                speculative_generate_step)
from ds4mlx.state import mark, restore, snapshot

PROMPT = list(range(5, 15))
LONG = 160  # generated tokens in the seam-crossing runs: positions 10..170 (window 8, ratio 4 past top-k 4, ratio 128)
MTP_LONG = 140  # ... with MTP drafts: positions 10..150


@pytest.fixture(scope="module")
def seams_model(seams_ckpt):
    model, _ = load(seams_ckpt, dtype=mx.float32, mtp=True)
    return model


def greedy(model, prompt, n):
    """mlx-lm's token loop, no drafts: the reference."""
    steps = generate_step(mx.array(prompt, dtype=mx.int32), model, max_tokens=n,
                          sampler=lambda x: mx.argmax(x, -1), prompt_cache=model.make_cache())
    return [t for t, _ in steps]


def speculative(model, prompt, drafter, n_draft, n, cache=None):
    stats = SpeculativeStats()
    steps = speculative_generate_step(mx.array(prompt, dtype=mx.int32), model, drafter,
                                      num_draft_tokens=n_draft, max_tokens=n, stats=stats, prompt_cache=cache)
    return [t for t, _, _ in steps], stats


def noisy(tokens, every):
    """``tokens`` with every ``every``-th one replaced: drafts rejected at varying depths."""
    return [(t + 1) % 1024 if i % every == every - 1 else t for i, t in enumerate(tokens)]


# --------------------------------------------------------------------------- state comparison


def _same(got, want, what):
    if want is None or got is None:
        assert got is None and want is None, f"{what}: {got is None=} {want is None=}"
        return
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    g, w = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    scale = max(float(np.max(np.abs(w))), 1e-30) if w.size else 1.0
    err = float(np.max(np.abs(g - w))) / scale if w.size else 0.0
    assert err <= 1e-6, f"{what}: relative difference {err:.2e}"


def assert_same_state(got, want, where=""):
    """Every tensor of two decode states, layer by layer (``got``/``want``: lists of LayerCache)."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        at = f"{where} layer {i}"
        assert g.offset == w.offset, f"{at}: offset {g.offset} != {w.offset}"
        _same(g.window, w.window, f"{at} window")
        for name in ("compressor", "indexer"):
            gs, ws = getattr(g, name), getattr(w, name)
            if ws is None:
                assert gs is None
                continue
            assert gs.n_rows == ws.n_rows, f"{at} {name}: {gs.n_rows} rows != {ws.n_rows}"
            for field in ("pending_kv", "pending_score", "prev_kv", "prev_score", "rows"):
                _same(getattr(gs, field), getattr(ws, field), f"{at} {name}.{field}")


# --------------------------------------------------------------------------- acceptance rule


def _frequencies(tokens: np.ndarray, v: int) -> np.ndarray:
    return np.bincount(tokens, minlength=v) / tokens.size


def test_acceptance_rule_keeps_the_target_distribution():
    # One draft over 6 tokens: the first output token must follow p whatever q is. With 200k
    # samples the standard error of a frequency is <= 0.0011, so 0.006 (> 5 sigma) never fails by
    # chance and a 2 % shift (> 18 sigma) is always caught.
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6)).astype(np.float32)
    q = rng.dirichlet(np.ones(6)).astype(np.float32)
    b = 200_000
    mx.random.seed(0)
    drafts = mx.random.categorical(mx.broadcast_to(mx.log(mx.array(q)), (b, 6)))[:, None].astype(mx.int32)
    target = mx.broadcast_to(mx.array(np.stack([p, p]))[None], (b, 2, 6))
    count, nxt = accept_drafts(target, drafts, mx.broadcast_to(mx.array(q)[None, None], (b, 1, 6)), greedy=False)
    first = np.where(np.array(count) > 0, np.array(drafts[:, 0]), np.array(nxt))
    assert np.max(np.abs(_frequencies(first, 6) - p)) < 0.006


def test_acceptance_rule_two_drafts_and_given_drafts():
    # Two drafts with their own q per position, target p1, p2, p3: the first token follows p1;
    # among rounds that accepted the first draft the second follows p2 (the target here does not
    # depend on the context, so the two are independent). Given drafts (q one-hot) too.
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(5), size=3).astype(np.float32)
    q = rng.dirichlet(np.ones(5), size=2).astype(np.float32)
    b = 500_000
    mx.random.seed(1)
    for given in (False, True):
        qs = mx.broadcast_to(mx.array(q)[None], (b, 2, 5))
        drafts = mx.random.categorical(mx.log(qs)).astype(mx.int32)  # [b, 2]
        count, nxt = accept_drafts(mx.broadcast_to(mx.array(p)[None], (b, 3, 5)), drafts,
                                   None if given else qs, greedy=False)
        count, nxt, d = np.array(count), np.array(nxt), np.array(drafts)
        first = np.where(count > 0, d[:, 0], nxt)
        ok = count > 0
        second = np.where(count[ok] > 1, d[ok, 1], nxt[ok])
        assert np.max(np.abs(_frequencies(first, 5) - p[0])) < 0.006
        bound = 5 * np.sqrt(0.25 / ok.sum())  # 5 standard errors; below 2 % so a 2 % shift shows
        assert bound < 0.012
        assert np.max(np.abs(_frequencies(second, 5) - p[1])) < bound


def test_greedy_acceptance_is_the_longest_matching_prefix():
    logits = mx.array(np.random.default_rng(2).standard_normal((3, 4, 7)).astype(np.float32))
    best = np.argmax(np.array(logits), -1)
    drafts = best[:, :3].copy()
    drafts[0, 0] += 1  # reject at 0
    drafts[1, 2] += 1  # reject at 2; row 2 all accepted
    count, nxt = accept_drafts(logits, mx.array(drafts % 7, dtype=mx.int32), None, greedy=True)
    assert np.array(count).tolist() == [0, 2, 3]
    assert np.array(nxt).tolist() == [best[0, 0], best[1, 2], best[2, 3]]


# --------------------------------------------------------------------------- rollback


def test_rollback_equals_the_state_without_the_rejected_tokens(seams_model):
    # Rounds of n+1 tokens taken back to a+1 of them, from positions around the ratio-128 seam
    # (and through windows, ratio-4 rows and both halves of the overlap): the state after each
    # restore equals the state the model builds from the kept tokens alone.
    model = seams_model
    n_main = model.config.num_hidden_layers
    rng = np.random.default_rng(4)
    tokens = rng.integers(2, 1024, size=400).tolist()
    cache = model.make_cache()[:n_main]
    model.hidden_streams(mx.array(tokens[:117])[None], cache)
    pos, rounds = 117, 0
    while pos < 139:
        n = int(rng.integers(1, 4))
        a = int(rng.integers(0, n + 1))
        before = snapshot(cache)
        marks = mark(cache)
        model.hidden_streams(mx.array(tokens[pos : pos + n + 1])[None], cache)
        restore(cache, marks, pos + a + 1)
        model.hidden_streams(mx.array(tokens[pos : pos + a + 1])[None], before)
        mx.eval([c.state for c in cache + before])
        assert_same_state(cache, before, f"round at {pos} (n={n}, kept {a + 1})")
        cache = before if rounds % 2 else cache  # go on from either: both are the same state
        pos, rounds = pos + a + 1, rounds + 1
    # restoring to the mark itself and to the very end
    for keep in (0, 4):
        before = snapshot(cache)
        marks = mark(cache)
        model.hidden_streams(mx.array(tokens[pos : pos + 4])[None], cache)
        restore(cache, marks, pos + keep)
        if keep:
            model.hidden_streams(mx.array(tokens[pos : pos + keep])[None], before)
        assert_same_state(cache, before, f"restore to {pos + keep}")
        pos += keep


def test_generation_leaves_the_state_of_the_kept_tokens(seams_model):
    # After a speculative run (MTP drafts, some rejected; it stops mid-round) the whole state,
    # the MTP block's included, equals the one built by feeding the accepted sequence in the same
    # way without drafts: one token at a time for the main layers, the MTP block on the main
    # streams and the next tokens.
    model = seams_model
    n_main = model.config.num_hidden_layers
    out, stats = speculative(model, PROMPT, MTPDrafter(), 3, 40, cache := model.make_cache())
    assert stats.drafted > stats.accepted  # rejections happened
    ref = model.make_cache()
    seq = PROMPT + out
    h = [model.hidden_streams(mx.array(PROMPT)[None], ref)]
    for t in out:
        h.append(model.hidden_streams(mx.array([t])[None], ref))
    h = mx.concatenate(h, axis=1)
    model.mtp_streams(h[:, :-1], mx.array(seq[1:])[None], ref[n_main])
    assert_same_state(cache[:n_main], ref[:n_main], "main")
    # the drafter holds the streams whose pairs it has not run yet (it batches them): run them
    streams, waiting = cache[n_main].draft_pending
    k = sum(t.shape[0] for t in waiting)
    if k:
        model.mtp_streams(streams[:, :k], mx.concatenate(waiting)[None], cache[n_main])
    _same(streams[:, k:], h[:, -1:], "held streams")
    assert_same_state(cache[n_main:], ref[n_main:], "MTP")


def test_saved_state_keeps_what_the_drafter_holds(seams_model, tmp_path):
    """A conversation saved to a prompt-cache file and loaded drafts on as the one kept in
    memory: the streams the MTP drafter holds between calls travel in the file (without them
    it would restart its block's window and draft other tokens)."""
    from ds4mlx.prompt_cache import load_prompt_cache, save_prompt_cache

    model = seams_model
    n_main = model.config.num_hidden_layers
    cache = model.make_cache()
    speculative(model, PROMPT, MTPDrafter(), 2, 30, cache)
    assert cache[n_main].draft_pending[0] is not None
    save_prompt_cache(tmp_path / "turn.safetensors", cache)
    loaded = load_prompt_cache(tmp_path / "turn.safetensors")
    streams, tokens = cache[n_main].draft_pending
    _same(loaded[n_main].draft_pending[0], streams, "held streams")
    assert sum((t.tolist() for t in loaded[n_main].draft_pending[1]), []) == sum((t.tolist() for t in tokens), [])
    turn = [7, 8, 9, 10]
    kept, kept_stats = speculative(model, turn, MTPDrafter(), 2, 24, snapshot(cache))
    again, again_stats = speculative(model, turn, MTPDrafter(), 2, 24, loaded)
    assert again == kept and (again_stats.drafted, again_stats.accepted) == (kept_stats.drafted, kept_stats.accepted)


# --------------------------------------------------------------------------- drafts vs no drafts


def test_forced_target_drafts_are_all_accepted(seams_model):
    # max_tokens = 1 + 12·(N+1): after the prefill's token every verify forward yields N+1.
    model = seams_model
    ref = greedy(model, PROMPT, 49)
    for n in (1, 2, 3):
        m = 1 + 12 * (n + 1)
        out, stats = speculative(model, PROMPT, ForcedDrafter(ref), n, m)
        assert out == ref[:m]
        assert stats.acceptance_rate == 1.0 and stats.drafted == 12 * n
        assert stats.forwards == 12 and stats.tokens_per_forward == n + 1


def test_greedy_with_mtp_drafts_equals_greedy(seams_model):
    # Short but across the ratio-128 seam: a 120-token prompt, 24 new tokens, 2 drafts.
    prompt = np.random.default_rng(5).integers(2, 1024, size=120).tolist()
    ref = greedy(seams_model, prompt, 24)
    out, stats = speculative(seams_model, prompt, MTPDrafter(), 2, 24)
    assert out == ref
    assert stats.tokens == 24 - 1 and stats.drafted > 0


# The long matrix: every load source, top-6 and top-4, 1-3 drafts each at least once, MTP and
# noisy forced drafts (rejections at every depth). The GGUF carries the MTP block in ds4's
# companion file beside it.


_refs: dict = {}


@pytest.mark.slow
@pytest.mark.parametrize("source,k,n", [("official", 6, 3), ("official", 4, 1), ("mlx", 6, 2), ("gguf", 4, 2)])
def test_greedy_with_drafts_equals_greedy_across_seams(seams_sources, source, k, n):
    kwargs = dict(dtype=mx.float32, experts_per_token=k, mtp=True)
    model, _ = load(seams_sources[source], **kwargs)
    if (source, k) not in _refs:
        _refs[source, k] = greedy(model, PROMPT, LONG)
    ref = _refs[source, k]
    assert model.mtp
    for drafter, length in ((ForcedDrafter(noisy(ref, 3 + n)), LONG), (MTPDrafter(), MTP_LONG)):
        out, stats = speculative(model, PROMPT, drafter, n, length)
        assert out == ref[:length], \
            f"{type(drafter).__name__}: first difference at {next(i for i, (a, b) in enumerate(zip(out, ref)) if a != b)}"
        assert stats.forwards < length or isinstance(drafter, MTPDrafter)


# --------------------------------------------------------------------------- sampling through the loop


class _Markov:
    """A stand-in model on 3 tokens whose next-token distribution is a row of ``P`` (the main
    model) or ``Q`` (its MTP block): sampled sequences have an exactly known distribution.
    Its one layer keeps a window of token rows through the journal like attention does."""

    def __init__(self, p: np.ndarray, q: np.ndarray):
        from types import SimpleNamespace

        self.config = SimpleNamespace(num_hidden_layers=1, sliding_window=4, vocab_size=p.shape[0])
        self.p, self.q = mx.log(mx.array(p)), mx.log(mx.array(q))
        self.mtp = [None]

    def make_cache(self):
        from ds4mlx.state import LayerCache

        return [LayerCache(0), LayerCache(0)]

    def _advance(self, tokens, cache):
        from ds4mlx.state import record_window

        rows = tokens.astype(mx.float32)[..., None]  # [1, s, 1]
        keys = rows if cache.window is None else mx.concatenate([cache.window, rows], axis=1)
        cache.window = keys[:, -3:]
        record_window(cache, rows, 3)
        cache.offset += tokens.shape[1]
        return tokens[..., None, None]  # "streams": the token itself

    def hidden_streams(self, tokens, cache):
        return self._advance(tokens, cache[0])

    def main_head(self, h):
        return self.p[h[..., 0, 0]]

    def mtp_streams(self, h, next_tokens, layer_cache, index=0):
        return self._advance(next_tokens.reshape(1, -1), layer_cache)

    def mtp_head(self, z, index=0):
        return self.q[z[..., 0, 0]]


def test_sampled_sequences_with_drafts_follow_the_target():
    # Three tokens after the prompt, two MTP drafts per forward: the joint distribution of the
    # sequence must be P's chain, not Q's (they differ by far more than the 5-sigma bounds).
    rng = np.random.default_rng(6)
    p = rng.dirichlet(np.ones(3) * 0.7, size=3).astype(np.float32)
    q = rng.dirichlet(np.ones(3) * 0.7, size=3).astype(np.float32)
    model = _Markov(p, q)
    n = 3000
    mx.random.seed(6)
    counts = np.zeros((3, 3, 3))
    accepted = 0
    for _ in range(n):
        stats = SpeculativeStats()
        out = [t for t, _, _ in speculative_generate_step(mx.array([1]), model, MTPDrafter(), num_draft_tokens=2,
                                                           max_tokens=3, sampling=Sampling(temp=1.0), stats=stats)]
        counts[tuple(out)] += 1
        accepted += stats.accepted
    exact = p[1][:, None, None] * p[:, :, None] * p[None, :, :]  # P(x1) P(x2|x1) P(x3|x2)
    bound = 5 * np.sqrt(exact * (1 - exact) / n) + 1e-3
    assert np.all(np.abs(counts / n - exact) < bound), np.max(np.abs(counts / n - exact) / bound)
    assert 0 < accepted < 2 * n  # drafts were both accepted and rejected


# --------------------------------------------------------------------------- API and CLI


def test_stream_generate_and_cli_with_drafts(demo_dir, capsys, monkeypatch):
    import csv
    import io

    import ds4mlx
    from ds4mlx.cli import main

    model, tok = load(demo_dir, dtype=mx.float32, mtp=True)
    plain = list(ds4mlx.stream_generate(model, tok, "Hello", max_tokens=20, temp=0))
    drafted = list(ds4mlx.stream_generate(model, tok, "Hello", max_tokens=20, temp=0, draft="mtp", num_draft_tokens=3))
    assert [r.token for r in drafted] == [r.token for r in plain]
    stats = drafted[-1].draft_stats
    assert plain[-1].draft_stats is None and stats.drafted > 0
    assert sum(r.from_draft for r in drafted) == stats.accepted
    assert ds4mlx.generate(model, tok, "Hello", max_tokens=20, temp=0, draft="mtp") == \
        ds4mlx.generate(model, tok, "Hello", max_tokens=20, temp=0)
    # logits processors (mlx-lm's repetition penalty) see the same history with drafts
    kw = dict(max_tokens=16, temp=0, repetition_penalty=1.5)
    assert [r.token for r in ds4mlx.stream_generate(model, tok, "Hello", draft="mtp", **kw)] == \
        [r.token for r in ds4mlx.stream_generate(model, tok, "Hello", **kw)]
    with pytest.raises(ValueError, match="sampler"):
        next(ds4mlx.stream_generate(model, tok, "Hi", sampler=lambda x: mx.argmax(x, -1), draft="mtp"))
    main_only, _ = load(demo_dir, dtype=mx.float32)
    with pytest.raises(ValueError, match="mtp=True"):
        next(ds4mlx.stream_generate(main_only, tok, "Hi", draft="mtp"))

    args = ["generate", "-m", "demo", "-p", "Hello", "--no-think", "--temp", "0", "-n", "16"]
    assert main(args) == 0
    out, _ = capsys.readouterr()
    assert main(args + ["--draft", "mtp", "--num-draft-tokens", "2"]) == 0
    out2, err2 = capsys.readouterr()
    assert out2 == out and "tokens per verify forward" in err2
    assert main(args + ["--draft", "mtp", "--num-draft-tokens", "4"]) != 0  # 1..3
    capsys.readouterr()

    # chat: the drafter goes on from where the last turn left it
    chat = ["chat", "-m", "demo", "--no-think", "--temp", "0", "-n", "6"]
    outs = []
    for extra in ([], ["--draft", "mtp", "--num-draft-tokens", "1"]):
        monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nAnd again\n"))
        assert main(chat + extra) == 0
        out, err = capsys.readouterr()
        outs.append(out)
    assert outs[0] == outs[1] and err.count("tokens per verify forward") == 2

    assert main(["bench", "-m", "demo", "--contexts", "24", "--gen-tokens", "6", "--draft", "mtp"]) == 0
    out, err = capsys.readouterr()
    row = next(csv.DictReader(io.StringIO(out)))
    assert int(row["draft_tokens"]) == 2 and 1 <= int(row["gen_forwards"]) <= 6 and int(row["context"]) == 24
    assert "tokens per forward" in err


def test_server_with_drafts_answers_as_without(demo_dir):
    # Greedy completions through the OpenAI API with MTP drafts equal ds4mlx.generate without;
    # the second request starts from the prefix cache's snapshot of the first one's prompt.
    openai = pytest.importorskip("openai")
    import ds4mlx
    from ds4mlx.server import BackgroundServer, build_app

    model, tok = load(demo_dir, dtype=mx.float32, mtp=True)
    app = build_app(model, tok, model_id="demo", ctx=1024, draft="mtp", num_draft_tokens=2)
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for prompt in ("The quick brown fox", "The quick brown fox jumps"):
            r = client.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0)
            assert r.choices[0].text == ds4mlx.generate(model, tok, prompt, temp=0.0, max_tokens=8)

"""Fused decode attention and Lightning Indexer kernels (metal/attention.metal) against their
ops twins and numpy, under the CPU emulator and, on a Mac, on the GPU."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from ds4mlx import kernels
from ds4mlx.kernels import attention as fused
from ds4mlx.kernels import indexer as fused_indexer

from kernel_paths import path, record_launches  # noqa: F401 (path: the kernel-path fixture the tests take)


def on_ops(fn, *args, **kw):
    chosen = kernels.backend()
    kernels.set_backend("ops")
    try:
        return np.asarray(fn(*args, **kw))
    finally:
        kernels.set_backend(chosen)


def on_ops_pair(fn, *args):
    chosen = kernels.backend()
    kernels.set_backend("ops")
    try:
        a, b = fn(*args)
        mx.eval(a, b)
        return a, b
    finally:
        kernels.set_backend(chosen)


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape and np.isfinite(got).all()
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def attention_case(b, s, h, d, p0, window, ratio, n_rows, topk, dtype, seed):
    """Inputs as the model builds them at positions p0..p0+s-1 (window buffer holds the
    previous min(p0, window-1) rows, then the new ones)."""
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=1.0):
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32))

    n_prev = min(p0, window - 1)
    q = rand(b, s, h, d)
    kw = rand(b, n_prev + s, d, scale=0.2).astype(dtype)
    comp = rand(b, n_rows, d, scale=0.2).astype(dtype) if ratio else None
    idx = None
    if ratio == 4 and n_rows > topk:
        picks = np.stack([rng.permutation(n_rows)[:topk] for _ in range(b * s)]).reshape(b, s, topk)
        picks[..., 0] = -1  # a padded slot is never read
        idx = mx.array(picks.astype(np.int32))
    bounds = fused.query_bounds(p0, s, p0 - n_prev, window, ratio)
    sink = rand(h)
    return q, kw, comp, idx, bounds, sink, d ** -0.5


CASES = [  # b, s, h, d, p0, window, ratio, compressed rows, top-k, dtype
    (1, 1, 2, 64, 0, 16, 0, 0, 4, mx.float32),             # first token, window only
    (1, 1, 4, 128, 40, 16, 0, 0, 4, mx.bfloat16),          # full window, bf16 rows
    (2, 3, 2, 64, 14, 16, 0, 0, 4, mx.float32),            # crosses the window's edge
    (1, 1, 2, 64, 255, 16, 128, 2, 4, mx.float32),         # ratio 128, both rows visible
    (1, 3, 3, 96, 253, 16, 128, 2, 4, mx.bfloat16),        # ratio 128 seam: row 1 appears
    (1, 2, 2, 64, 10, 16, 4, 3, 8, mx.float32),            # ratio 4, every row (no picks)
    (2, 2, 2, 64, 70, 16, 4, 18, 4, mx.bfloat16),          # ratio 4, indexer picks
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}s{c[1]}h{c[2]}d{c[3]}p{c[4]}r{c[6]}")
def test_decode_attention_matches_twin(path, case):
    args = attention_case(*case, seed=case[4])
    got = fused.decode_attention(*args)
    ref = on_ops(fused.decode_attention_ops, *args)
    assert rel_err(got, ref) <= 1e-5


def write_case(case, seed, room=5):
    """``attention_case`` with the call's rows apart: kw a buffer with the carried rows at
    lo.. (stale rows before them), ``room`` rows past them, and knew the call's rows."""
    q, kw, comp, idx, bounds, sink, scale = attention_case(*case, seed=seed)
    b, s, d = kw.shape[0], case[1], kw.shape[2]
    lo = 3 if min(case[4], case[5] - 1) == case[5] - 1 else 0  # rows dropped once it is full
    carried, knew = kw[:, :kw.shape[1] - s], kw[:, kw.shape[1] - s:]
    stale = mx.full((b, lo, d), 7.0).astype(kw.dtype)
    buf = mx.concatenate([stale, carried, mx.full((b, s + room, d), 9.0).astype(kw.dtype)], 1)
    bounds = fused.query_bounds(case[4], s, case[4] - carried.shape[1] - lo, case[5], case[6])
    return (q, buf, comp, idx, bounds, sink, scale), knew, lo + carried.shape[1]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}s{c[1]}h{c[2]}d{c[3]}p{c[4]}r{c[6]}")
def test_decode_attention_writes_the_window(path, case):
    """The call's rows read from knew and written into the buffer by the kernel: the same
    output as with the rows in the buffer, the buffer the twin's (the last query's window
    rows, zero elsewhere), and those rows the ones a plain write would have."""
    args, knew, row = write_case(case, seed=case[4] + 2)
    got, buf = fused.decode_attention(*args, write=(knew, row))
    ref, ref_buf = on_ops_pair(lambda *a: fused.decode_attention_ops(*a, write=(knew, row)), *args)
    ref, ref_buf = np.asarray(ref.astype(mx.float32)), np.asarray(ref_buf.astype(mx.float32))
    assert rel_err(got, ref) <= 1e-5
    plain = mx.slice_update(args[1], knew, mx.array([0, row, 0]), (0, 1, 2))
    alone = on_ops(fused.decode_attention_ops, args[0], plain, *args[2:])
    assert rel_err(got, alone) <= 1e-5
    buf = np.asarray(buf.astype(mx.float32))
    np.testing.assert_array_equal(buf, ref_buf)
    lo, hi = args[4][-1, :2]
    np.testing.assert_array_equal(buf[:, lo:hi], np.asarray(plain.astype(mx.float32))[:, lo:hi])
    assert (buf[:, :lo] == 0).all() and (buf[:, hi:] == 0).all()
    if case[1] == 1 and case[0] == 1:  # with RoPE in the kernel too
        from ds4mlx.model.rope import rope_frequencies

        rope = (np.arange(case[4], case[4] + 1), rope_frequencies(32, 10000.0), 1e-6)
        got, buf = fused.decode_attention(*args, rope=rope, write=(knew, row))
        ref, _ = on_ops_pair(lambda *a: fused.decode_attention_ops(*a, rope=rope, write=(knew, row)),
                        *args)
        assert rel_err(got, np.asarray(ref)) <= 1e-5
        np.testing.assert_array_equal(np.asarray(buf.astype(mx.float32)), ref_buf)


def test_decode_attention_twin_equals_dense_softmax():
    """The twin against a plain numpy softmax over the rows each query may see."""
    q, kw, comp, idx, bounds, sink, scale = attention_case(1, 2, 2, 32, 70, 16, 4, 18, 4,
                                                           mx.float32, seed=3)
    got = on_ops(fused.decode_attention_ops, q, kw, comp, idx, bounds, sink, scale)
    qn, kwn, cn, ix, sk = (np.asarray(a, dtype=np.float64) for a in (q, kw, comp, idx, sink))
    for s in range(2):
        lo, hi, vis = bounds[s]
        rows = [kwn[0, j] for j in range(lo, hi)]
        rows += [cn[0, int(c)] for c in ix[0, s] if 0 <= c < vis]
        keys = np.stack(rows)
        for h in range(2):
            logits = np.append(keys @ qn[0, s, h] * scale, sk[h])
            p = np.exp(logits - logits.max())
            p /= p.sum()
            np.testing.assert_allclose(got[0, s, h], p[:-1] @ keys, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_decode_attention_real_width(path):
    """Flash's widths: 64 heads x 512, window 128, 512 picked rows of 600 (bf16 rows)."""
    args = attention_case(1, 1, 64, 512, 2400, 128, 4, 600, 512, mx.bfloat16, seed=7)
    got = fused.decode_attention(*args)
    ref = on_ops(fused.decode_attention_ops, *args)
    assert rel_err(got, ref) <= 1e-5


# ----------------------------------------------------------------------------- indexer
def indexer_case(b, s, h, hd, nk, n_vis, dtype, seed):
    rng = np.random.default_rng(seed)
    q = mx.array(rng.standard_normal((b, s, h, hd)).astype(np.float32))
    w = mx.array(rng.standard_normal((b, s, h)).astype(np.float32))
    keys = mx.array(rng.standard_normal((b, nk, hd)).astype(np.float32)).astype(dtype)
    return q, w, keys, mx.array(np.array(n_vis, dtype=np.int32))


@pytest.mark.parametrize("b,s,h,hd,nk,n_vis,dtype", [
    (1, 1, 16, 32, 40, [40], mx.float32),
    (2, 3, 16, 64, 70, [67, 68, 70], mx.bfloat16),
    (1, 2, 12, 32, 33, [0, 5], mx.float32),           # heads not a multiple of the groups
])
def test_indexer_scores_match_twin(path, b, s, h, hd, nk, n_vis, dtype):
    args = indexer_case(b, s, h, hd, nk, n_vis, dtype, seed=nk)
    got = np.asarray(fused_indexer.indexer_scores(*args))
    ref = on_ops(fused_indexer.indexer_scores_ops, *args)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    seen = np.isfinite(ref)
    if seen.any():
        assert np.abs(got[seen] - ref[seen]).max() <= 1e-5 * np.abs(ref[seen]).max()


def numpy_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Ascending indices of the k largest finite scores per row (ties: lowest index), -1 pad."""
    out = np.full(scores.shape[:-1] + (k,), -1, dtype=np.int32)
    for r in np.ndindex(scores.shape[:-1]):
        row = scores[r]
        order = np.argsort(-row, kind="stable")
        pick = np.sort([i for i in order[:k] if np.isfinite(row[i])])
        out[r][:len(pick)] = pick
    return out


@pytest.mark.parametrize("rows,n,k", [(3, 50, 8), (2, 600, 512), (4, 9, 9)])
def test_indexer_topk_matches_numpy(path, rows, n, k):
    rng = np.random.default_rng(n)
    scores = rng.standard_normal((rows, n)).astype(np.float32)
    scores[0, n // 2:] = -np.inf       # a row with fewer visible keys
    scores[-1, :3] = np.float32(7.0)   # ties at the top
    scores[1, 1:4] = -0.0               # zeros of both signs
    scores[1, 4:6] = 0.0
    got = np.asarray(fused_indexer.indexer_topk(mx.array(scores), k))
    np.testing.assert_array_equal(got, numpy_topk(scores, k))
    twin = on_ops(fused_indexer.indexer_topk, mx.array(scores), k)
    np.testing.assert_array_equal(twin[1:], got[1:])  # the twin pads the -inf row the same way
    np.testing.assert_array_equal(twin[0], got[0])


def test_indexer_topk_ties_keep_lowest_indices(path):
    scores = np.zeros((1, 40), np.float32)
    scores[0, [5, 30]] = 1.0
    got = np.asarray(fused_indexer.indexer_topk(mx.array(scores), 6))
    np.testing.assert_array_equal(got[0], [0, 1, 2, 3, 5, 30])


def test_bad_shapes_are_named():
    q, kw, comp, idx, bounds, sink, scale = attention_case(1, 1, 2, 64, 3, 16, 0, 0, 4,
                                                           mx.float32, seed=0)
    with pytest.raises(kernels.KernelInputError, match="sink"):
        fused.decode_attention(q, kw, comp, idx, bounds, sink[:1], scale)
    with pytest.raises(kernels.KernelInputError, match="k=0"):
        fused_indexer.indexer_topk(mx.zeros((2, 5)), 0)


# ----------------------------------------------------------------------------- rows
def model_rows(x, pos, freqs, **kw):
    """The model's ops for the same steps (``rope.rows_ops``, what attention.py runs without the
    fused kernel)."""
    from ds4mlx.model.rope import rows_ops

    return rows_ops(x, pos, freqs, **kw)


@pytest.mark.parametrize("shape,d,rd,norm,fp8,inverse,dtype,out_dtype", [
    ((2, 3, 4), 128, 64, fused.NORM_PLAIN, False, False, mx.float32, mx.float32),   # q
    ((1, 2, 2), 128, 64, fused.NORM_PLAIN, False, False, mx.bfloat16, mx.float32),  # bf16 q
    ((2, 3), 128, 64, fused.NORM_WEIGHTED, True, False, mx.float32, mx.float32),    # kv
    ((1, 5), 512, 64, fused.NORM_WEIGHTED, True, False, mx.float32, mx.float32),    # Flash kv
    ((1, 2, 3), 128, 64, fused.NORM_NONE, False, True, mx.float32, mx.float32),     # output
])
def test_rope_rows_match_model_ops(path, shape, d, rd, norm, fp8, inverse, dtype, out_dtype):
    from ds4mlx.model.rope import rope_frequencies

    rng = np.random.default_rng(d + len(shape))
    x = mx.array((rng.standard_normal((*shape, d)) * 3).astype(np.float32)).astype(dtype)
    weight = mx.array(rng.uniform(0.5, 1.5, d).astype(np.float32))
    yarn = {"factor": 16, "original_max_position_embeddings": 65536}
    freqs = rope_frequencies(rd, 160000.0, yarn)
    p0 = 70000
    pos = np.arange(p0, p0 + shape[1])[None, :] if len(shape) == 2 else \
        np.arange(p0, p0 + shape[1])[None, :, None]
    got = np.asarray(fused.rope_rows(x, pos, freqs, norm=norm, weight=weight, eps=1e-6, fp8=fp8,
                                     inverse=inverse, out_dtype=out_dtype))
    ref = np.asarray(model_rows(x, pos if len(shape) == 2 else pos[0], freqs, norm=norm,
                                weight=weight, eps=1e-6, fp8=fp8, inverse=inverse,
                                out_dtype=out_dtype, rope_dims=rd))
    err = np.abs(got - ref)
    if fp8:  # a value on an FP8 rounding edge may land one e4m3 step apart: count those
        step = np.abs(ref) / 8 + 1e-30
        assert (err > 1e-5 * np.abs(ref).max()).mean() < 1e-3 and (err <= step * 1.01).all()
    else:
        assert err.max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.slow
def test_indexer_real_width(path):
    """Flash's indexer: 64 heads x 128 over 3000 bf16 keys (12k tokens), then its top-512."""
    args = indexer_case(1, 1, 64, 128, 3000, [2990], mx.bfloat16, seed=11)
    got = np.asarray(fused_indexer.indexer_scores(*args))
    ref = on_ops(fused_indexer.indexer_scores_ops, *args)
    seen = np.isfinite(ref)
    assert np.array_equal(seen, np.isfinite(got))
    assert np.abs(got[seen] - ref[seen]).max() <= 1e-5 * np.abs(ref[seen]).max()
    picks = np.asarray(fused_indexer.indexer_topk(mx.array(ref), 512))
    np.testing.assert_array_equal(picks, numpy_topk(ref, 512))


# ----------------------------------------------------------------------------- indexer queries
@pytest.mark.parametrize("lead,d,fp4,dtype", [
    ((1, 1, 4), 128, True, mx.bfloat16),   # one decode token, the QAT rounding
    ((2, 3, 3), 128, False, mx.float32),   # a batch of a few tokens, no rounding
    ((1, 2, 5), 64, True, mx.float32),     # two features a lane
])
def test_index_queries_match_model_ops(path, lead, d, fp4, dtype):
    """Kernel index_q (RoPE, Hadamard + FP4, head-weight scale) against the model's own ops."""
    from ds4mlx.model.compressor import index_queries_ops
    from ds4mlx.model.rope import rope_frequencies

    rng = np.random.default_rng(d + len(lead))
    q = mx.array((rng.standard_normal((*lead, d)) * 2).astype(np.float32)).astype(dtype)
    w = mx.array(rng.standard_normal(lead).astype(np.float32)).astype(dtype)
    freqs = rope_frequencies(64, 160000.0, {"factor": 16, "original_max_position_embeddings": 65536})
    pos = np.arange(70000, 70000 + lead[1])[None, :].repeat(lead[0], 0)
    got = fused_indexer.index_queries(q, w, pos, freqs, wscale=0.0625, fp4=fp4)
    ref = index_queries_ops(q, w, pos, freqs, wscale=0.0625, fp4=fp4)
    for g, r in zip(got, ref):
        assert g.dtype == mx.float32 and g.shape == r.shape
        assert rel_err(g, r) <= 1e-6


@pytest.mark.parametrize("b,s,h,d,nk,n_vis,fp4,dtype", [
    (1, 1, 64, 128, 300, [290], True, mx.bfloat16),  # Flash's indexer, one decode token
    (1, 1, 64, 128, 200, [200], False, mx.float32),  # float32 kept: 32 heads at a time
    (2, 2, 5, 64, 40, [40, 3], False, mx.float32),   # heads off the simdgroups, float32 kept
    (1, 3, 3, 64, 129, [129, 0, 100], True, mx.float16),  # a pass past the keys, none visible
])
def test_indexer_scores_make_their_queries(path, b, s, h, d, nk, n_vis, fp4, dtype, monkeypatch):
    """Kernel indexer_scores_q (index_q's steps inside the scores' launch) gives exactly the
    scores of the two launches (index_q, then indexer_scores: the queries it keeps are exact in
    16 bits) and the ops twins' scores, in one launch."""
    from ds4mlx.model.compressor import index_queries_ops
    from ds4mlx.model.rope import rope_frequencies

    rng = np.random.default_rng(d + s)
    q = mx.array((rng.standard_normal((b, s, h, d)) * 2).astype(np.float32)).astype(dtype)
    w = mx.array(rng.standard_normal((b, s, h)).astype(np.float32)).astype(dtype)
    keys = mx.array(rng.standard_normal((b, nk, d)).astype(np.float32)).astype(dtype)
    freqs = rope_frequencies(32 if s == 3 else 64, 160000.0, {"factor": 16, "original_max_position_embeddings": 65536})
    pos = np.arange(70000, 70000 + s)[None, :].repeat(b, 0)
    n_vis = mx.array(np.array(n_vis, np.int32))
    iq = fused_indexer.IndexQueries(q, w, pos, freqs, 0.0625, fp4)
    launches = record_launches(monkeypatch)
    got = np.asarray(fused_indexer.indexer_scores(iq, None, keys, n_vis))
    assert launches == ["indexer_scores_q"]
    two = np.asarray(fused_indexer.indexer_scores(*fused_indexer.index_queries(q, w, pos, freqs, wscale=0.0625,
                                                               fp4=fp4), keys, n_vis))
    np.testing.assert_array_equal(got, two)
    ref = on_ops(fused_indexer.indexer_scores_ops, *index_queries_ops(q, w, pos, freqs, wscale=0.0625,
                                                              fp4=fp4), keys, n_vis)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    seen = np.isfinite(ref)
    assert np.abs(got[seen] - ref[seen]).max() <= 1e-5 * np.abs(ref[seen]).max()


@pytest.mark.parametrize("b,s,h,d,nk,n_vis,k,fp4,dtype", [
    (1, 1, 64, 128, 700, [690], 512, True, mx.bfloat16),  # Flash's indexer, one decode token
    (1, 2, 64, 128, 600, [600, 550], 512, False, mx.float32),  # float32 kept: 32 heads at a time
    (1, 3, 5, 64, 300, [300, 4, 170], 8, False, mx.float32),  # a row seeing fewer than k keys
    (2, 1, 3, 64, 129, [129], 40, True, mx.float16),
])
def test_indexer_pick_in_one_launch(path, b, s, h, d, nk, n_vis, k, fp4, dtype, monkeypatch):
    """Kernel indexer_pick_q (queries, scores and the top-k in one launch: the last of a row's
    threadgroups picks) gives exactly the two-launch path's picks and numpy's top-k of the twin
    scores; its counter is back at zero, so the next call (other inputs) is right too."""
    import ds4mlx.model.compressor  # noqa: F401 (installs the queries' ops twin)
    from ds4mlx.model.rope import rope_frequencies

    freqs = rope_frequencies(64, 160000.0, {"factor": 16, "original_max_position_embeddings": 65536})
    run = kernels.dispatch.run
    for rep in range(2):
        rng = np.random.default_rng(d + s + rep)
        q = mx.array((rng.standard_normal((b, s, h, d)) * 2).astype(np.float32)).astype(dtype)
        w = mx.array(rng.standard_normal((b, s, h)).astype(np.float32)).astype(dtype)
        keys = mx.array(rng.standard_normal((b, nk, d)).astype(np.float32)).astype(dtype)
        pos = np.arange(70000, 70000 + s)[None, :].repeat(b, 0)
        vis = mx.array(np.array(n_vis, np.int32))
        iq = fused_indexer.IndexQueries(q, w, pos, freqs, 0.0625, fp4)
        launches = []

        def counted(*args, **kwargs):
            launches.append(args[1])
            return run(*args, **kwargs)

        monkeypatch.setattr(kernels.dispatch, "run", counted)
        got = np.asarray(fused_indexer.indexer_pick(iq, keys, vis, k, grid=True))
        assert launches == ["indexer_pick_q"]
        two = np.asarray(fused_indexer.indexer_pick(iq, keys, vis, k, grid=False))
        assert launches[1:] == ["indexer_scores_q", "indexer_topk"]
        monkeypatch.setattr(kernels.dispatch, "run", run)
        np.testing.assert_array_equal(got, two)
        scores = on_ops(fused_indexer.indexer_scores_ops_q, iq, keys, vis)
        np.testing.assert_array_equal(got, numpy_topk(scores, k))
        assert not np.asarray(kernels.dispatch.counter("indexer_pick_q", b * s)).any()


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[6]],
                         ids=lambda c: f"b{c[0]}s{c[1]}h{c[2]}d{c[3]}p{c[4]}r{c[6]}")
def test_decode_attention_with_rope_matches_model_ops(path, case):
    """The queries as projected in, RoPE (and its inverse on the output) in the kernel: against
    the model's row ops around the twin."""
    from ds4mlx.model.rope import rope_frequencies  # (importing it installs the row ops twin)

    q, kw, comp, idx, bounds, sink, scale = attention_case(*case, seed=case[4] + 1)
    dtype = case[-1]
    q = (q * 3).astype(dtype)
    rope = (np.arange(case[4], case[4] + case[1]), rope_frequencies(32, 10000.0), 1e-6)
    got = fused.decode_attention(q, kw, comp, idx, bounds, sink, scale, rope=rope, out_dtype=dtype)
    ref = on_ops(lambda *a: fused.decode_attention_ops(*a, rope=rope, out_dtype=dtype)
                 .astype(mx.float32), q, kw, comp, idx, bounds, sink, scale)
    assert got.dtype == dtype
    assert rel_err(np.asarray(got.astype(mx.float32)), ref) <= (1e-5 if dtype == mx.float32 else 8e-3)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_rope_rows_with_q_norm_rows(path, dtype):
    """The kv rows and the q_norm rows of one projection in one launch: the kv rows as alone,
    the q rows as ops.RMSNorm (mx.fast.rms_norm's rounding)."""
    from ds4mlx.model.rope import rope_frequencies
    from ds4mlx.ops import RMSNorm

    rng = np.random.default_rng(4)
    x = mx.array((rng.standard_normal((1, 3, 128)) * 3).astype(np.float32)).astype(dtype)
    qr = mx.array((rng.standard_normal((1, 3, 96)) * 3).astype(np.float32)).astype(dtype)
    weight = mx.array(rng.uniform(0.5, 1.5, 128).astype(np.float32)).astype(dtype)
    norm = RMSNorm(96, eps=1e-6)
    norm.weight = mx.array(rng.uniform(0.5, 1.5, 96).astype(np.float32)).astype(dtype)
    freqs = rope_frequencies(64, 10000.0)
    pos = np.arange(500, 503)[None]
    kw = dict(norm=fused.NORM_WEIGHTED, weight=weight, eps=1e-6)
    kv, qn = fused.rope_rows(x, pos, freqs, q_norm=(qr, norm.weight), **kw)
    alone = fused.rope_rows(x, pos, freqs, **kw)
    np.testing.assert_array_equal(np.asarray(kv.astype(mx.float32)), np.asarray(alone.astype(mx.float32)))
    ref = norm(qr)
    assert qn.dtype == dtype
    assert rel_err(np.asarray(qn.astype(mx.float32)), np.asarray(ref.astype(mx.float32))) <= \
        (1e-6 if dtype == mx.float32 else 8e-3)


# ----------------------------------------------------------------------------- compressor rows
def comp_case(two: bool, k: int, n0: int, n1: int, r: int, seed: int):
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    w = rand(n0 + (n1 if two else 0), k) * k ** -0.5
    bufs = [rand(1, r, n0)] + ([rand(1, r, n1)] if two else [])
    return rand(1, 1, k), w, rand(w.shape[0]), bufs


@pytest.mark.parametrize("two,k,n0,n1,r,n", [
    (True, 70, 40, 24, 4, 0), (True, 300, 64, 16, 4, 3), (False, 129, 48, 0, 128, 77),
])
def test_compress_rows_match_twin(path, two, k, n0, n1, r, n):
    """One token's compressor rows written into the windows' buffers: row n the product (plus
    the bias), the other rows untouched, alone and in rope_rows' launch (against numpy too)."""
    x, w, bias, bufs = comp_case(two, k, n0, n1, r, seed=k)
    got = fused.compress_rows(x, w, bias, bufs, n)
    chosen = kernels.backend()
    kernels.set_backend("ops")
    try:
        ref = fused.compress_rows_ops(x, w, bias, bufs, n)
        mx.eval(ref)
    finally:
        kernels.set_backend(chosen)
    y = np.asarray(x).reshape(-1).astype(np.float64) @ np.asarray(w).T.astype(np.float64) + np.asarray(bias)
    start = 0
    for g, rf, b in zip(got, ref, bufs):
        g, rf, b = np.asarray(g), np.asarray(rf), np.asarray(b)
        width = b.shape[2]
        assert rel_err(g, rf) <= 1e-5
        np.testing.assert_array_equal(np.delete(g, n, axis=1), np.delete(b, n, axis=1))
        np.testing.assert_allclose(g[0, n], y[start:start + width], rtol=1e-4, atol=1e-5)
        start += width
    from ds4mlx.model.rope import rope_frequencies

    kv = mx.array(np.random.default_rng(1).standard_normal((1, 1, 64)).astype(np.float32))
    args = dict(norm=fused.NORM_WEIGHTED, weight=mx.ones((64,)), eps=1e-6)
    alone = fused.rope_rows(kv, np.array([[9]]), rope_frequencies(32, 10000.0), **args)
    both = fused.rope_rows(kv, np.array([[9]]), rope_frequencies(32, 10000.0),
                           comp=(x, w, bias, bufs, n), **args)
    assert len(both) == 1 + len(bufs)
    np.testing.assert_array_equal(np.asarray(both[0]), np.asarray(alone))
    for g, c in zip(both[1:], got):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(c))


def test_compress_rows_bad_shapes_are_named():
    x, w, bias, bufs = comp_case(True, 70, 40, 24, 4, seed=0)
    with pytest.raises(kernels.KernelInputError, match="compress_rows"):
        fused.compress_rows(x, w[:50], bias, bufs, 0)
    with pytest.raises(kernels.KernelInputError, match="compress_rows"):
        fused.compress_rows(x, w, bias, bufs, 4)

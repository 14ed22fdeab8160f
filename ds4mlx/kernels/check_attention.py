"""The check's cases of the fused attention and indexer kernels (kernels/attention.py, kernels/indexer.py): decode attention,
the Lightning Indexer (scores, top-k, queries, and their one-launch forms) and rope_rows with
the compressor rows; the other variants' cases, the specs and the input helpers are in
``check_cases``, and ``check.cases`` picks a variant's builder.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from . import attention, dispatch, indexer
from .check_cases import _HEADS, _KEYS, TOLERANCE, Case, Spec, _acts


def attention_cases(spec: Spec) -> list[Case]:
    d, dt = spec.head_dim or 64, spec.dtype

    def run_for(b: int, s: int, p0: int, ratio: int, n_rows: int, k: int,
                write: bool = False) -> Callable:
        def run():
            rng = np.random.default_rng(p0 + s)
            window = 16
            n_prev = min(p0, window - 1)

            def rand(*shape, scale=1.0):
                return mx.array((rng.standard_normal(shape) * scale).astype(np.float32))

            q, kw = rand(b, s, _HEADS, d), rand(b, n_prev + s, d, scale=0.2).astype(dt)
            comp = rand(b, n_rows, d, scale=0.2).astype(dt) if ratio else None
            idx = None
            if k:
                picks = np.stack([rng.permutation(n_rows)[:k] for _ in range(b * s)])
                picks = picks.reshape(b, s, k)
                picks[..., 0] = -1  # a padded slot is never read
                idx = mx.array(picks.astype(np.int32))
            bounds = attention.query_bounds(p0, s, p0 - n_prev, window, ratio)
            args = (q, kw, comp, idx, bounds, rand(_HEADS), d ** -0.5)
            if not write:
                return [attention.decode_attention(*args)], [attention.decode_attention_ops(*args)]
            # the call's rows apart, written by the kernel into a buffer with room past them
            buf = mx.concatenate([kw[:, :n_prev], mx.ones((b, s + 3, d), dt)], axis=1)
            w = (kw[:, n_prev:], n_prev)
            return (list(attention.decode_attention(q, buf, *args[2:], write=w)),
                    list(attention.decode_attention_ops(q, buf, *args[2:], write=w)))
        return run

    rd = spec.rope_dims
    if rd:  # the projected queries in, RoPE and its inverse in the kernel, output in dtype
        freqs = mx.array((10000.0 ** (-np.arange(rd // 2) * 2.0 / rd)).astype(np.float32))

        def roped(s: int, p0: int, ratio: int, n_rows: int, k: int) -> Callable:
            def run():
                rng = np.random.default_rng(p0 + s)
                window, n_prev = 16, min(p0, 15)
                q = mx.array((rng.standard_normal((1, s, _HEADS, d)) * 3).astype(np.float32))
                kw = mx.array((rng.standard_normal((1, n_prev + s, d)) * 0.2).astype(np.float32))
                comp = mx.array((rng.standard_normal((1, n_rows, d)) * 0.2).astype(np.float32))
                idx = None
                if k:
                    idx = mx.array(np.stack([rng.permutation(n_rows)[:k] for _ in range(s)])
                                   .reshape(1, s, k).astype(np.int32))
                bounds = attention.query_bounds(p0, s, p0 - n_prev, window, ratio)
                args = (q.astype(dt), kw.astype(dt), comp.astype(dt) if ratio else None, idx,
                        bounds, mx.array(rng.standard_normal(_HEADS).astype(np.float32)), d ** -0.5)
                kwargs = dict(rope=(np.arange(p0, p0 + s), freqs, 1e-6), out_dtype=dt)
                return ([attention.decode_attention(*args, **kwargs)],
                        [attention.decode_attention_ops(*args, **kwargs)])
            return run

        return [Case("attn_decode", f"1 query, RoPE of {rd} dims in and out",
                     roped(1, 70001, 0, 0, 0)),
                Case("attn_decode", "2 queries, ratio 4 picks, RoPE", roped(2, 70, 4, 19, 5))]
    # the buffers hold more compressed rows than the queries see, as a grown buffer does
    return [Case("attn_decode", "1 query, window rows", run_for(1, 1, 5, 0, 0, 0)),
            Case("attn_decode", f"3 queries, {_HEADS} heads, ratio 128", run_for(1, 3, 300, 128, 5, 0)),
            Case("attn_decode", "2x2 queries, 5 of 19 picked", run_for(2, 2, 70, 4, 19, 5)),
            Case("attn_decode", "2x2 queries, their rows written into the window",
                 run_for(2, 2, 70, 4, 19, 5, write=True))]


def indexer_cases(spec: Spec) -> list[Case]:
    out = []
    if spec.index_heads and spec.index_head_dim and spec.rope_dims:  # scores making their queries
        if spec.index_topk:  # and picking the top-k in the same launch (the grid form)
            return _pick_q_cases(spec) if dispatch.grid_sync() else []
        return _scores_q_cases(spec)
    if spec.index_heads and spec.index_head_dim:
        h, hd = spec.index_heads, spec.index_head_dim

        def scores(s: int, n_vis: list[int]) -> Callable:
            def run():
                rng = np.random.default_rng(s)
                q = mx.array(rng.standard_normal((1, s, h, hd)).astype(np.float32))
                w = mx.array(rng.standard_normal((1, s, h)).astype(np.float32))
                keys = mx.array(rng.standard_normal((1, _KEYS, hd)).astype(np.float32))
                args = (q, w, keys.astype(spec.dtype), mx.array(np.array(n_vis, np.int32)))
                return [indexer.indexer_scores(*args)], [indexer.indexer_scores_ops(*args)]
            return run

        out += [Case("indexer_scores", f"1 query, {_KEYS} keys", scores(1, [_KEYS])),
                Case("indexer_scores", f"3 queries, {_KEYS} keys", scores(3, [30, 0, _KEYS]))]
    if spec.index_topk:
        k = spec.index_topk

        def topk():
            n = k + _KEYS
            rng = np.random.default_rng(k)
            sc = rng.permutation(3 * n).astype(np.float32).reshape(3, n) / n - 1.5  # no ties
            sc[0, max(1, k - 2):] = -np.inf  # a query that sees fewer than k keys
            sc = mx.array(sc)
            return [indexer.indexer_topk(sc, k)], [indexer.indexer_topk_ops(sc, k)]

        out.append(Case("indexer_topk", f"3 rows of {k + _KEYS}, k={k}", topk))
    if spec.index_head_dim and spec.rope_dims:
        out += _index_q_cases(spec)
    return out


def _pick_q_cases(spec: Spec) -> list[Case]:
    """indexer_pick_q: queries, scores and the top-k in one launch (several threadgroups a row,
    the last one picks), at the model's heads, widths and k; twice in a row on one counter."""
    h, d, rd, dt, k = (spec.index_heads, spec.index_head_dim, spec.rope_dims, spec.dtype,
                       spec.index_topk)
    freqs = mx.array((10000.0 ** (-np.arange(rd // 2) * 2.0 / rd)).astype(np.float32))
    nk = max(k + _KEYS, indexer.INDEX_THREADS // 8 * indexer.INDEX_KEY_PASSES + _KEYS)

    def run_for(s: int, fp4: bool) -> Callable:
        def run():
            got, ref = [], []
            for rep in range(2):
                rng = np.random.default_rng(s + rep)
                q = _acts((1, s, h, d), 140 + s + rep, dt, 2.0)
                w = mx.array(rng.standard_normal((1, s, h)).astype(np.float32)).astype(dt)
                keys = _acts((1, nk, d), 141 + s + rep, dt)
                n_vis = mx.array(np.array([nk, k - 2, nk - 40][:s], np.int32))
                iq = indexer.IndexQueries(q, w, np.arange(70001, 70001 + s)[None], freqs,
                                            0.125, fp4)
                got.append(indexer.indexer_pick(iq, keys, n_vis, k, grid=True))
                mx.eval(got[-1])
                # the twin's top-k on the kernel path's scores: ties and near-ties alike
                scores = indexer.indexer_scores(iq, None, keys, n_vis)
                ref.append(indexer.indexer_topk_ops(scores, k))
            return got, ref
        return run

    return [Case("indexer_pick_q", f"{s} token{'s' * (s > 1)} x {h} heads, top-{k} of {nk} keys"
                 f"{', Hadamard + FP4' * fp4}, twice", run_for(s, fp4))
            for s, fp4 in ((1, True), (3, False))]


def _scores_q_cases(spec: Spec) -> list[Case]:
    """indexer_scores_q: the queries' steps (index_q) inside the scores' launch, at the model's
    heads and widths, keys in the queries' dtype; over two threadgroups of key passes."""
    h, d, rd, dt = spec.index_heads, spec.index_head_dim, spec.rope_dims, spec.dtype
    freqs = mx.array((10000.0 ** (-np.arange(rd // 2) * 2.0 / rd)).astype(np.float32))
    nk = indexer.INDEX_THREADS // 8 * indexer.INDEX_KEY_PASSES + _KEYS

    def run_for(s: int, fp4: bool) -> Callable:
        def run():
            rng = np.random.default_rng(s + 7)
            q = _acts((1, s, h, d), 130 + s, dt, 2.0)
            w = mx.array(rng.standard_normal((1, s, h)).astype(np.float32)).astype(dt)
            keys = _acts((1, nk, d), 131 + s, dt)
            n_vis = mx.array(np.array([nk, 3, nk - 40][:s], np.int32))
            iq = indexer.IndexQueries(q, w, np.arange(70001, 70001 + s)[None], freqs, 0.125, fp4)
            return ([indexer.indexer_scores(iq, None, keys, n_vis)],
                    [indexer.indexer_scores_ops_q(iq, keys, n_vis)])
        return run

    return [Case("indexer_scores_q", f"{s} token{'s' * (s > 1)} x {h} heads, {nk} keys"
                 f"{', Hadamard + FP4' * fp4}", run_for(s, fp4)) for s, fp4 in ((1, True), (3, False))]


def _index_q_cases(spec: Spec) -> list[Case]:
    d, rd, dt = spec.index_head_dim, spec.rope_dims, spec.dtype
    freqs = mx.array((10000.0 ** (-np.arange(rd // 2) * 2.0 / rd)).astype(np.float32))

    def run_for(s: int, fp4: bool) -> Callable:
        def run():
            twin = dispatch.twin("index_q")
            if twin is None:
                raise RuntimeError("index_q: no ops twin installed (import ds4mlx.model)")
            rng = np.random.default_rng(s)
            q = _acts((1, s, _HEADS, d), 90 + s, dt, 2.0)
            w = mx.array(rng.standard_normal((1, s, _HEADS)).astype(np.float32)).astype(dt)
            pos = np.arange(70001, 70001 + s)[None]  # far positions: an angle's rounding shows
            args = (q, w, pos, freqs)
            kw = dict(wscale=0.125, fp4=fp4)
            return list(indexer.index_queries(*args, **kw)), list(twin(*args, **kw))
        return run

    return [Case("index_q", f"{s} tokens x {_HEADS} heads{', Hadamard + FP4' * fp4}",
                 run_for(s, fp4)) for s, fp4 in ((1, True), (3, False))]


def rope_cases(spec: Spec) -> list[Case]:
    d, rd, dt = spec.head_dim or 128, spec.rope_dims or 64, spec.dtype
    fp8 = (d - rd) % attention.FP8_BLOCK == 0 and attention.FP8_BLOCK % (d // 32) == 0
    freqs = mx.array((10000.0 ** (-np.arange(rd // 2) * 2.0 / rd)).astype(np.float32))
    p0 = 70001  # far positions: an angle's rounding shows

    def run_for(shape: tuple[int, ...], norm: int, fp8: bool, inverse: bool, x_dtype: mx.Dtype,
                out_dtype: mx.Dtype) -> Callable:
        def run():
            twin = dispatch.twin(dispatch.ROPE_ROWS)
            if twin is None:
                raise RuntimeError("rope_rows: no ops twin installed (import ds4mlx.model)")
            rng = np.random.default_rng(len(shape) + norm)
            x = mx.array((rng.standard_normal((*shape, d)) * 3).astype(np.float32)).astype(x_dtype)
            weight = mx.array(rng.uniform(0.5, 1.5, d).astype(np.float32)).astype(dt)
            pos = np.arange(p0, p0 + shape[1]).reshape(1, -1, *([1] * (len(shape) - 2)))
            kw = dict(norm=norm, weight=weight, eps=1e-6, fp8=fp8, inverse=inverse,
                      out_dtype=out_dtype)
            got = attention.rope_rows(x, pos, freqs, **kw)
            ref = twin(x, pos, freqs, rope_dims=rd, **kw)
            return [_fp8_edges(got, ref, dt) if fp8 else got], [ref]
        return run

    out = [Case("rope_rows", f"q: 3 tokens x {_HEADS} heads, RMS",
                run_for((1, 3, _HEADS), attention.NORM_PLAIN, False, False, dt, mx.float32)),
           Case("rope_rows", "kv: 3 rows, weighted RMS" + ", FP8" * fp8,
                run_for((1, 3), attention.NORM_WEIGHTED, fp8, False, dt, dt)),
           Case("rope_rows", f"output: 3 x {_HEADS}, inverse",
                run_for((1, 3, _HEADS), attention.NORM_NONE, False, True, mx.float32, dt)),
           Case("rope_rows", f"indexer q: 3 x {_HEADS}",
                run_for((1, 3, _HEADS), attention.NORM_NONE, False, False, dt, dt))]
    if spec.q_rank:
        dq = spec.q_rank

        def with_q_norm():
            from ..ops import RMSNorm  # the q_norm the kernel runs alongside

            twin = dispatch.twin(dispatch.ROPE_ROWS)
            if twin is None:
                raise RuntimeError("rope_rows: no ops twin installed (import ds4mlx.model)")
            rng = np.random.default_rng(dq)
            x = _acts((1, 2, d), 95, dt, 3.0)
            qr = _acts((1, 2, dq), 96, dt, 3.0)
            weight = mx.array(rng.uniform(0.5, 1.5, d).astype(np.float32)).astype(dt)
            norm = RMSNorm(dq, eps=1e-6)
            norm.weight = mx.array(rng.uniform(0.5, 1.5, dq).astype(np.float32)).astype(dt)
            pos = np.arange(p0, p0 + 2)[None]
            kw = dict(norm=attention.NORM_WEIGHTED, weight=weight, eps=1e-6, fp8=False,
                      inverse=False, out_dtype=dt)
            got = attention.rope_rows(x, pos, freqs, q_norm=(qr, norm.weight), **kw)
            return list(got), [twin(x, pos, freqs, rope_dims=rd, **kw), norm(qr)]

        out.append(Case("rope_rows", f"kv: 2 rows, with q_norm rows of {dq}", with_q_norm))

    def comp_args(two: bool) -> tuple:
        # float32 compressor weights and buffers whatever the model's dtype (as the model keeps)
        w = _acts((40 + (24 if two else 0), 70), 97, mx.float32, 70 ** -0.5)
        bufs = [_acts((1, 4, 40), 98, mx.float32)] + ([_acts((1, 4, 24), 99, mx.float32)] if two else [])
        return _acts((1, 1, 70), 100, mx.float32), w, _acts((w.shape[0],), 101, mx.float32), bufs, 2

    def comp_alone(two: bool) -> Callable:
        def run():
            args = comp_args(two)
            return attention.compress_rows(*args), attention.compress_rows_ops(*args)
        return run

    def comp_with_rows():
        twin = dispatch.twin(dispatch.ROPE_ROWS)
        if twin is None:
            raise RuntimeError("rope_rows: no ops twin installed (import ds4mlx.model)")
        x = _acts((1, 1, d), 102, dt, 3.0)
        weight = mx.array(np.random.default_rng(d).uniform(0.5, 1.5, d).astype(np.float32)).astype(dt)
        kw = dict(norm=attention.NORM_WEIGHTED, weight=weight, eps=1e-6, fp8=False, inverse=False,
                  out_dtype=dt)
        args = comp_args(True)
        got = attention.rope_rows(x, np.array([[p0]]), freqs, comp=args, **kw)
        return list(got), [twin(x, np.array([[p0]]), freqs, rope_dims=rd, **kw),
                           *attention.compress_rows_ops(*args)]

    out += [Case("comp_rows", "two compressors' rows of one token", comp_alone(True)),
            Case("comp_rows", "one compressor's rows", comp_alone(False)),
            Case("rope_rows", "kv: 1 row, with both compressors' rows", comp_with_rows)]
    return out


def _fp8_edges(got: mx.array, ref: mx.array, dtype: mx.Dtype) -> mx.array:
    """``got`` with the values that sit one e4m3 step from ``ref`` taken from ``ref``, when they
    are few: a value on an FP8 rounding edge lands on either side when its input differs in the
    last bit (another summation order of the RMS; in bfloat16, one rounding of RMS x weight where
    the ops round twice: about 1.5% of the values of random rows). More of them is an error."""
    g, r = np.asarray(got.astype(mx.float32)), np.asarray(ref.astype(mx.float32))
    if g.shape != r.shape:
        return got
    diff = np.abs(g - r)
    off = diff > TOLERANCE.get(dtype, 2e-2) * max(float(np.abs(r).max()), 1e-30)
    edge = off & (diff <= np.abs(r) / 8 * 1.01)
    if off.sum() != edge.sum() or edge.mean() > (0.01 if dtype == mx.float32 else 0.05):
        return got
    return mx.array(np.where(edge, r, g)).astype(got.dtype)

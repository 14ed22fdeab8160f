"""Kernel variants checked against their ops twins: ``ds4mlx selftest`` and the first-use check.

A *variant* is the kernels of one weight layout (``Q4_K``, ``Q2_K``, ``IQ2_XXS``, ``MXFP4`` GGUF
blocks, ``MXFP4-mlx`` pairs, ...) at one activation dtype, or a named fused kernel (``hc_pre``,
``attention``, ``indexer``, ``rope_rows``, ``router``, ``shared_down``) at one dtype and the model dims that are
its template arguments (:data:`KEY_DIMS`). Checking it runs each of its kernels (:func:`cases`:
for a layout, dequantize, the decode kernels with ids in ``constant`` and in ``device`` memory,
the tiled kernel for gate/up, down and plain products, the dense call site; for a fused kernel,
its call shapes) on small random inputs, forced onto the kernel path, and compares with the ops
twin. Sizes the kernel takes at run time (heads, rows, tokens) are small and off the tile sizes;
the template dims are the model's, so the instance checked is the one that serves.

First use: the first call that would dispatch a variant in a process checks it (unless a pass is
already recorded on disk under ``$DS4MLX_CACHE/kernel-checks`` for the same sources, backend,
device, MLX version and dims). A variant that fails to compile or disagrees is switched off for
the process with one warning line on stderr, and its ops twin serves its calls.
``DS4MLX_KERNEL_CHECK``: ``on`` (default), ``off`` (no check; the test suite runs so, since it
compares kernels with twins itself) or ``fresh`` (ignore recorded passes).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from ..quant import gguf as gguf_formats
from ..quant.codecs import MX_GROUP
from . import attention, dispatch, hyper, moe, router, source

CHECK_VERSION = 4  # bump when the cases change, so recorded passes are redone
MLX_PAIR = "MXFP4-mlx"  # MLX mxfp4 (weight, scales) experts, as opposed to GGUF MXFP4 blocks
# Max relative error allowed (max |kernel - twin| / max |twin|, over the finite values; integer
# outputs such as indices must be equal). float32: the kernels call precise:: exp, log, sqrt,
# rsqrt, sin and cos (Metal's fast ones are a few ulp off), so what differs is the summation
# order, ~1e-6 in practice; a wrong layout or index is off by far more than 1e-4. Half dtypes:
# one rounding of the output (bf16 ulp 2^-8). FP8-rounded rows: see _fp8_edges.
TOLERANCE = {mx.float32: 1e-4, mx.float16: 2e-2, mx.bfloat16: 2e-2}
_K_IN, _ROWS, _DOWN_ROWS, _HC_D = 256, 20, 37, 200  # small dims, off the kernels' tile sizes
_HEADS, _KEYS = 3, 37  # attention / indexer heads and keys of the checks (run-time sizes)
# The dims that are template arguments of each named variant's kernels: they make the verdict
# and the record key (run-time sizes such as the context length do not, so no re-check per
# token). The indexer's two kernels are checked apart: scores by heads and head dim at the key
# dtype, top-k by k on float32 scores (each entry point knows only its own dims).
KEY_DIMS: dict[str, tuple[str, ...]] = {
    dispatch.HC_PRE: ("hc_mult",),
    dispatch.ATTENTION: ("head_dim", "rope_dims"),
    dispatch.INDEXER: ("index_heads", "index_head_dim", "index_topk", "rope_dims"),
    dispatch.ROPE_ROWS: ("head_dim", "rope_dims", "q_rank"),
    dispatch.ROUTER: ("n_experts", "experts_per_token", "renormalize"),
    dispatch.SHARED_DOWN: (),  # every size is a run-time argument
}


@dataclass(frozen=True)
class Spec:
    """One variant and the model dims that decide its kernels' inputs."""

    variant: str  # weight layout name, MLX_PAIR or one of dispatch.NAMED_VARIANTS
    dtype: mx.Dtype = mx.float32  # activation dtype (attention: of the KV rows; indexer: keys)
    experts_per_token: int = 6
    n_experts: int = 8
    hc_mult: int = 4
    renormalize: int = 1  # router: norm_topk_prob
    head_dim: int | None = None  # attention; rope_rows: features per row
    rope_dims: int | None = None  # rope_rows, indexer queries: rotated features
    index_heads: int | None = None  # indexer scores
    index_head_dim: int | None = None  # indexer scores
    index_topk: int | None = None  # indexer top-k
    q_rank: int | None = None  # rope_rows: width of the q_norm rows it normalises alongside

    def key(self) -> tuple[int | None, ...]:
        return tuple(getattr(self, f) for f in KEY_DIMS.get(self.variant, ()))

    def dims_text(self) -> str:
        return ", ".join(f"{f}={getattr(self, f)}" for f in KEY_DIMS.get(self.variant, ())
                         if getattr(self, f) is not None)

    def label(self) -> str:
        dims = self.dims_text()
        return f"{self.variant} ({dtype_name(self.dtype)}{', ' + dims if dims else ''})"


@dataclass
class Result:
    kernel: str
    spec: Spec
    inputs: str  # what the case exercises, e.g. "1 token, ids in constant"
    rel_error: float = float("nan")
    seconds: float = 0.0
    error: str | None = None  # compile or launch failure (first line)
    tolerance: float = field(default=0.0)

    @property
    def ok(self) -> bool:
        return self.error is None and self.rel_error <= self.tolerance

    def why(self) -> str:
        if self.error is not None:
            return f"{self.kernel} failed: {self.error}"
        return f"{self.kernel} ({self.inputs}) is off by {self.rel_error:.3g} > {self.tolerance:g}"


@dataclass(frozen=True)
class Case:
    kernel: str
    inputs: str
    run: Callable[[], tuple[list[mx.array], list[mx.array]]]  # -> (kernel outputs, twin outputs)


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------- inputs
def random_experts(variant: str, e: int, rows: int, k: int, seed: int):
    """Experts ``[e, rows, ·]`` of ``k`` inputs: random weights quantized by the format's own
    quantizer (``quant/gguf``) or ``mx.quantize`` for MLX mxfp4."""
    x = np.random.default_rng(seed).standard_normal((e, rows, k)).astype(np.float32) * 0.02
    if variant == MLX_PAIR:
        w, s = mx.quantize(mx.array(x), group_size=MX_GROUP, bits=4, mode="mxfp4")
        return w, s
    blocks = gguf_formats.get(variant).quantize(x.reshape(e * rows, k))
    return mx.array(blocks.reshape(e, rows, -1))


def _fmt(variant: str) -> str:
    return "MXFP4" if variant == MLX_PAIR else variant


def _acts(shape: tuple[int, ...], seed: int, dtype: mx.Dtype, scale: float = 1.0) -> mx.array:
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale
    return mx.array(a).astype(dtype)


def _routes(n: int, k: int, e: int, seed: int) -> mx.array:
    ids = np.random.default_rng(seed).integers(0, e, (n, k))
    if k > 1:
        ids[0, 1] = ids[0, 0]  # one token picks an expert twice
    return mx.array(ids.astype(np.uint32))


def _placement(n_ids: int) -> str:
    return "constant" if n_ids < 8 else "device"  # MLX's rule for small inputs


def cases(spec: Spec) -> list[Case]:
    """The kernel calls that make up ``spec``'s check."""
    named = {dispatch.HC_PRE: _hc_cases, dispatch.ATTENTION: _attention_cases,
             dispatch.INDEXER: _indexer_cases, dispatch.ROPE_ROWS: _rope_cases,
             dispatch.ROUTER: _router_cases, dispatch.SHARED_DOWN: _shared_cases}
    return named.get(spec.variant, _moe_cases)(spec)


def _moe_cases(spec: Spec) -> list[Case]:
    v, fmt, dt = spec.variant, _fmt(spec.variant), spec.dtype
    # E only bounds the ids; a few experts keep the quantizing quick (IQ2_XXS: ~1 ms a row)
    k, e = spec.experts_per_token, min(max(spec.n_experts, 2), 8)
    w1, w3 = random_experts(v, e, _ROWS, _K_IN, 1), random_experts(v, e, _ROWS, _K_IN, 2)
    w2 = random_experts(v, e, _DOWN_ROWS, _K_IN, 3)
    # x scaled so that W·x is O(1) to O(10): the SwiGLU clamp (limit 10) bites sometimes
    x_scale = 8.0 / (0.02 * _K_IN ** 0.5)
    # Decode: one token with fewer than 8 ids (MLX passes them in `constant`; k is a runtime
    # argument, so the model's own k need not be below 8 for this to test its kernels), then
    # enough tokens for 8 or more ids (`device`); tiled: more pairs than the decode kernels take.
    few, many = max(2, -(-8 // k)), moe.DECODE_MAX_PAIRS // k + 1

    def gate_up(n: int, kn: int) -> Callable:
        def run():
            x, idx = _acts((n, _K_IN), 10 + n, dt, x_scale), _routes(n, kn, e, 20 + n)
            return ([moe.moe_gate_up(x, w1, w3, fmt, idx, 10.0)],
                    [moe.moe_gate_up_ops(x, w1, w3, fmt, idx, 10.0)])
        return run

    def down(n: int, kn: int) -> Callable:
        def run():
            mid, idx = _acts((n, kn, _K_IN), 30 + n, mx.float32, 4.0), _routes(n, kn, e, 40 + n)
            rw = mx.array(np.random.default_rng(n).uniform(0.1, 1.5, (n, kn)).astype(np.float32))
            return ([moe.moe_down(mid, w2, fmt, idx, rw, out_dtype=dt)],
                    [moe.moe_down_ops(mid, w2, fmt, idx, rw, out_dtype=dt)])
        return run

    def plain(n: int) -> Callable:
        def run():
            x, idx = _acts((n, _K_IN), 50 + n, dt, x_scale), _routes(n, k, e, 60 + n)
            return [moe.gather_qmm_native(x, w1, fmt, idx)], [moe.gather_qmm_native_ops(x, w1, fmt, idx)]
        return run

    def dequant():
        return [moe.dequantize(w1, fmt)], [moe.dequantize_ops(w1, fmt)]

    out = [Case("dequant_rows", "-", dequant)]
    for n, kn in ((1, min(k, 7)), (few, k)):
        where = f"{n} token{'s' * (n > 1)}, ids in {_placement(n * kn)}"
        out.append(Case("moe_gate_up_decode", where, gate_up(n, kn)))
        out.append(Case("moe_down_decode", where, down(n, kn)))
    tiled = f"{many} tokens, {many * k} pairs"
    out += [Case("moe_matmul_sorted gate/up", tiled, gate_up(many, k)),
            Case("moe_matmul_sorted down", tiled, down(many, k)),
            Case("moe_matmul_sorted", tiled, plain(many))]
    if v != MLX_PAIR:  # dense GGUF projections (GGUFLinear): one expert of the tiled kernel
        dense = w1[0]
        for n in (1, 9):
            def run(n=n):
                x = _acts((n, _K_IN), 70 + n, dt, x_scale)
                return ([moe.gguf_matmul(x, dense, fmt=fmt, input_dims=_K_IN, output_dims=_ROWS)],
                        [moe.matmul_ops(x, dense, fmt).astype(dt)])
            out.append(Case("gguf_matmul", f"{n} row{'s' * (n > 1)}, ids in {_placement(n)}", run))
    return out


def _hc_cases(spec: Spec) -> list[Case]:
    m, d = spec.hc_mult, _HC_D
    mix = 2 * m + m * m
    rng = np.random.default_rng(7)
    fn = mx.array((rng.standard_normal((mix, m * d)) / np.sqrt(m * d)).astype(np.float32))
    base = mx.array(rng.uniform(-1, 1, mix).astype(np.float32))
    scale = mx.array(rng.uniform(0.5, 3.0, 3).astype(np.float32))
    args = dict(iters=20, eps=1e-6, norm_eps=1e-6)

    from ..ops import RMSNorm  # the sublayer norm the fused variant applies

    norm = RMSNorm(d, eps=1e-6)
    norm.weight = mx.array(rng.uniform(0.5, 1.5, d).astype(np.float32))

    def run_for(n: int, fused: bool) -> Callable:
        def run():
            h = _acts((n, m, d), 80 + n, spec.dtype)
            kw = dict(args)
            if fused:  # the previous sublayer's post and the next one's norm in the same kernel
                norm.weight = norm.weight.astype(spec.dtype)
                prev = (_acts((n, d), 90 + n, spec.dtype),
                        mx.sigmoid(_acts((n, m), 91 + n, mx.float32)) * 2,
                        mx.softmax(_acts((n, m, m), 92 + n, mx.float32), axis=-1))
                kw.update(norm=norm, prev=prev, out_dtype=spec.dtype, also_f32=n == 1)
            return (list(hyper.hc_pre(h, fn, base, scale, **kw)),
                    list(hyper.hc_pre_ops(h, fn, base, scale, **kw)))
        return run

    return [Case("hc_pre", f"{n} token{'s' * (n > 1)}, M={m}"
                 f"{', previous post and norm' * fused}{', float32 x' * (fused and n == 1)}",
                 run_for(n, fused))
            for n, fused in ((1, False), (3, False), (1, True), (2, True))]


def _attention_cases(spec: Spec) -> list[Case]:
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


def _indexer_cases(spec: Spec) -> list[Case]:
    out = []
    if spec.index_heads and spec.index_head_dim:
        h, hd = spec.index_heads, spec.index_head_dim

        def scores(s: int, n_vis: list[int]) -> Callable:
            def run():
                rng = np.random.default_rng(s)
                q = mx.array(rng.standard_normal((1, s, h, hd)).astype(np.float32))
                w = mx.array(rng.standard_normal((1, s, h)).astype(np.float32))
                keys = mx.array(rng.standard_normal((1, _KEYS, hd)).astype(np.float32))
                args = (q, w, keys.astype(spec.dtype), mx.array(np.array(n_vis, np.int32)))
                return [attention.indexer_scores(*args)], [attention.indexer_scores_ops(*args)]
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
            return [attention.indexer_topk(sc, k)], [attention.indexer_topk_ops(sc, k)]

        out.append(Case("indexer_topk", f"3 rows of {k + _KEYS}, k={k}", topk))
    if spec.index_head_dim and spec.rope_dims:
        out += _index_q_cases(spec)
    return out


def _index_q_cases(spec: Spec) -> list[Case]:
    d, rd, dt = spec.index_head_dim, spec.rope_dims, spec.dtype
    freqs = mx.array((10000.0 ** (-np.arange(rd // 2) * 2.0 / rd)).astype(np.float32))

    def run_for(s: int, fp4: bool) -> Callable:
        def run():
            twin = _twins.get("index_q")
            if twin is None:
                raise RuntimeError("index_q: no ops twin installed (import ds4mlx.model)")
            rng = np.random.default_rng(s)
            q = _acts((1, s, _HEADS, d), 90 + s, dt, 2.0)
            w = mx.array(rng.standard_normal((1, s, _HEADS)).astype(np.float32)).astype(dt)
            pos = np.arange(70001, 70001 + s)[None]  # far positions: an angle's rounding shows
            args = (q, w, pos, freqs)
            kw = dict(wscale=0.125, fp4=fp4)
            return list(attention.index_queries(*args, **kw)), list(twin(*args, **kw))
        return run

    return [Case("index_q", f"{s} tokens x {_HEADS} heads{', Hadamard + FP4' * fp4}",
                 run_for(s, fp4)) for s, fp4 in ((1, True), (3, False))]


_twins = dispatch._twins  # the twins that live above the kernels (dispatch.install_twin)


def install_twin(variant: str, twin: Callable) -> None:
    """Give the check the ops twin of a kernel whose twin lives above the kernels: for
    ``rope_rows`` the model's own ops (installed by ds4mlx.model.rope when it is imported)."""
    dispatch.install_twin(variant, twin)


def twin(name: str) -> Callable | None:
    """The ops twin installed for ``name`` (:func:`install_twin`), or None."""
    return dispatch.twin(name)


def _rope_cases(spec: Spec) -> list[Case]:
    d, rd, dt = spec.head_dim or 128, spec.rope_dims or 64, spec.dtype
    fp8 = (d - rd) % attention.FP8_BLOCK == 0 and attention.FP8_BLOCK % (d // 32) == 0
    freqs = mx.array((10000.0 ** (-np.arange(rd // 2) * 2.0 / rd)).astype(np.float32))
    p0 = 70001  # far positions: an angle's rounding shows

    def run_for(shape: tuple[int, ...], norm: int, fp8: bool, inverse: bool, x_dtype: mx.Dtype,
                out_dtype: mx.Dtype) -> Callable:
        def run():
            twin = _twins.get(dispatch.ROPE_ROWS)
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

            twin = _twins.get(dispatch.ROPE_ROWS)
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
        twin = _twins.get(dispatch.ROPE_ROWS)
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


def _router_cases(spec: Spec) -> list[Case]:
    e, k = spec.n_experts, min(spec.experts_per_token, spec.n_experts)

    def run_for(n: int) -> Callable:
        def run():
            rng = np.random.default_rng(n)
            logits = mx.array((rng.standard_normal((n, e)) * 4).astype(np.float32))
            bias = mx.array((rng.standard_normal(e) * 0.1).astype(np.float32))
            args = (logits, bias, k, bool(spec.renormalize), 1.5)
            # the kernel lists experts by score, the twin in argpartition's order: sort by id
            return _by_id(*router.router_topk(*args)), _by_id(*router.router_topk_ops(*args))
        return run

    return [Case("router_topk", f"{n} token{'s' * (n > 1)}, top-{k} of {e}", run_for(n))
            for n in (1, 3)]


def _shared_cases(spec: Spec) -> list[Case]:
    dt, f = spec.dtype, _HC_D  # F off the lanes' stride, R off the rows per threadgroup

    def run_for(n: int, limit: float) -> Callable:
        def run():
            gu = _acts((n, 2 * f), 100 + n, dt, 4.0)  # some beyond the clamp
            w = _acts((_DOWN_ROWS, f), 101, dt, f ** -0.5)
            add = _acts((n, _DOWN_ROWS), 102 + n, dt)
            return ([moe.shared_down(gu, w, limit, add)],
                    [moe.shared_down_ops(gu, w, limit, add)])
        return run

    return [Case("shared_down", f"{n} token{'s' * (n > 1)}, limit {limit:g}", run_for(n, limit))
            for n, limit in ((1, 10.0), (3, 0.0), (moe.SHARED_MAX_TOKENS, 7.0))]


def _by_id(idx: mx.array, w: mx.array) -> list[mx.array]:
    order = mx.argsort(idx, axis=-1)
    return [mx.take_along_axis(idx, order, axis=-1), mx.take_along_axis(w, order, axis=-1)]


# ----------------------------------------------------------------------------- running
_local = threading.local()


def forcing() -> bool:
    """Whether this thread runs a check: kernels then serve even a variant switched off."""
    return getattr(_local, "forcing", False)


@contextmanager
def _forced() -> Iterator[None]:
    was = forcing()
    _local.forcing = True
    try:
        yield
    finally:
        _local.forcing = was


def rel_error(got: list[mx.array], ref: list[mx.array]) -> float:
    """max |got - ref| / max |ref| over the finite values; inf when a shape differs, a value is
    NaN or an infinity is not the twin's, or an integer output (indices) is not the twin's."""
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        exact = mx.issubdtype(r.dtype, mx.integer)
        g, r = np.asarray(g.astype(mx.float32)), np.asarray(r.astype(mx.float32))
        if g.shape != r.shape or np.isnan(g).any() or np.isnan(r).any():
            return float("inf")
        finite = np.isfinite(r)
        if not np.array_equal(np.isfinite(g), finite) or (g[~finite] != r[~finite]).any():
            return float("inf")
        if exact and not np.array_equal(g, r):
            return float("inf")
        if finite.any():
            err = np.abs(g[finite] - r[finite]).max() / max(np.abs(r[finite]).max(), 1e-30)
            worst = max(worst, float(err))
    return worst


def run_case(case: Case, spec: Spec) -> Result:
    res = Result(case.kernel, spec, case.inputs, tolerance=TOLERANCE.get(spec.dtype, 2e-2))
    with _forced():
        start = time.perf_counter()
        try:
            got, ref = case.run()
            mx.eval(got, ref)
            res.seconds = time.perf_counter() - start
            res.rel_error = rel_error(got, ref)
        except Exception as e:  # a compile or launch failure of the kernel: the check's answer
            res.seconds = time.perf_counter() - start
            lines = [s.strip() for s in str(e).splitlines() if s.strip()] or [""]
            first = next((s for s in lines[1:] if "error:" in s), "")  # the compiler's first
            res.error = f"{type(e).__name__}: {lines[0]} {first}".strip()[:400]
    return res


def run_spec(spec: Spec, *, stop_at_failure: bool = False) -> list[Result]:
    """Every case of ``spec`` on the current backend (which must not be ``ops``); with
    ``stop_at_failure``, up to the first that fails (the first-use check needs no more)."""
    if dispatch.backend() == "ops":
        raise ValueError("the kernel backend is 'ops': there are no kernels to check")
    results = []
    for c in cases(spec):
        results.append(run_case(c, spec))
        if stop_at_failure and not results[-1].ok:
            break
    return results


# ----------------------------------------------------------------------------- records
def _device() -> str:
    if dispatch.backend() == "metal":
        info = mx.device_info()
        return f"metal {info.get('device_name', '')} {info.get('architecture', '')}"
    from . import emu

    return f"emulate {emu.compiler()} {' '.join(emu._cxx_flags())} {emu.syntax_compiler()}"


def _sources() -> str:
    parts = []
    for file in sorted(p.name for p in source.METAL_DIR.glob("*.metal")):
        header, bodies = source.metal_source(file)
        parts += [header, *(f"{n}\n{b}" for n, b in sorted(bodies.items()))]
    if dispatch.backend() == "emulate":
        from . import emu

        parts.append(emu._runtime_text())
    return "\0".join(parts)


def record_key(spec: Spec) -> str:
    """Hash of what a pass depends on: every kernel source, backend and device, MLX, the
    variant and dtype, and a named variant's template dims (:data:`KEY_DIMS`). The MoE cases
    cover both placements of the ids whatever k, so a pass holds for every k and E."""
    dims = spec.dims_text()
    what = [str(CHECK_VERSION), dispatch.backend(), _device(), mx.__version__, _sources(), spec.variant,
            dtype_name(spec.dtype), dims, str(moe.DECODE_MAX_PAIRS)]
    return hashlib.sha256("\0".join(what).encode()).hexdigest()[:32]


def records_dir() -> Path:
    root = os.environ.get("DS4MLX_CACHE") or Path.home() / ".cache" / "ds4mlx"
    return Path(root) / "kernel-checks"


def _record_path(spec: Spec) -> Path:
    return records_dir() / f"{spec.variant}-{dtype_name(spec.dtype)}-{record_key(spec)}.json"


def recorded(spec: Spec) -> bool:
    return _record_path(spec).is_file()


def record(spec: Spec, results: list[Result]) -> None:
    """Remember that ``spec`` passed (best effort: an unwritable cache only costs a re-check)."""
    path = _record_path(spec)
    body = {"variant": spec.variant, "dtype": dtype_name(spec.dtype), "mlx": mx.__version__,
            "backend": dispatch.backend(), "results": [
                {"kernel": r.kernel, "inputs": r.inputs, "rel_error": r.rel_error,
                 "seconds": round(r.seconds, 4)} for r in results]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


# ----------------------------------------------------------------------------- first use
_verdicts: dict[tuple, bool] = {}
_failures: dict[str, str] = {}
_lock = threading.Lock()


def mode() -> str:
    value = os.environ.get("DS4MLX_KERNEL_CHECK", "on").strip().lower() or "on"
    if value not in ("on", "off", "fresh"):
        raise ValueError(f"DS4MLX_KERNEL_CHECK={value!r}: expected on, off or fresh")
    return value


def passes(variant: str, dtype: mx.Dtype, **dims: int) -> bool:
    """Whether the kernels of ``variant`` may serve a call in ``dtype``: checked on the first
    call of the process (``dims``: the fields of :class:`Spec` that call knows), remembered
    for the process per template dims (:data:`KEY_DIMS`), and a pass recorded on disk."""
    if forcing():
        return True
    key = (variant, dtype, *(dims.get(f) for f in KEY_DIMS.get(variant, ())))
    verdict = _verdicts.get(key)
    if verdict is not None:
        return verdict
    if mode() == "off":
        return True
    with _lock:
        if key not in _verdicts:
            _verdicts[key] = _first_use(Spec(variant, dtype, **dims))
        return _verdicts[key]


def _first_use(spec: Spec) -> bool:
    if mode() != "fresh" and recorded(spec):
        return True
    results = run_spec(spec, stop_at_failure=True)
    bad = [r for r in results if not r.ok]
    if not bad:
        record(spec, results)
        return True
    _failures[spec.label()] = bad[0].why()
    print(f"ds4mlx: warning: kernel {spec.label()} switched off for this process, the ops path "
          f"serves it instead ({bad[0].why()})", file=sys.stderr, flush=True)
    return False


def failures() -> dict[str, str]:
    """Variant label -> reason, for each variant the first-use check switched off."""
    return dict(_failures)


def reset() -> None:
    """Forget this process's verdicts (the records on disk stay)."""
    with _lock:
        _verdicts.clear()
        _failures.clear()


dispatch.install_check(sys.modules[__name__])

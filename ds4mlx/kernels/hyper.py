"""Fused hyper-connection pre kernel (``metal/hc.metal``) beside its MLX-ops twin (the model's own
:func:`ds4mlx.ops.hc_pre`). Whether the kernel serves a call is
:func:`ds4mlx.kernels.dispatch.serves` of the variant ``HC_PRE``.
"""

from __future__ import annotations

import mlx.core as mx

from .. import ops as _ops
from . import dispatch
from .dispatch import HC_PRE, KernelInputError
from .source import HC_THREADS


def hc_pre_ops(h: mx.array, fn: mx.array, base: mx.array, scale: mx.array, *, iters: int,
               eps: float, norm_eps: float, out_dtype: mx.Dtype = mx.float32,
               ) -> tuple[mx.array, mx.array, mx.array]:
    """Ops twin of :func:`hc_pre`: the model's own HC pre (:func:`ds4mlx.ops.hc_pre`)."""
    x, post, comb = _ops.hc_pre(h, fn, base, scale, iters=iters, eps=eps, norm_eps=norm_eps)
    return x.astype(out_dtype), post, comb


def hc_pre(h: mx.array, fn: mx.array, base: mx.array, scale: mx.array, *, iters: int, eps: float,
           norm_eps: float, out_dtype: mx.Dtype = mx.float32) -> tuple[mx.array, mx.array, mx.array]:
    """Fused HC pre: streams ``h [..., M, D]`` -> (x ``[..., D]`` in ``out_dtype`` (the
    sublayer's activation dtype: no cast launch after it), post ``[..., M]``, comb
    ``[..., M, M]`` float32), in one kernel (RMS, mixing projection ``fn [2M+M², M·D]``,
    sigmoid / softmax, ``iters`` Sinkhorn rounds, weighted collapse)."""
    if h.ndim < 2:
        raise KernelInputError(f"h: expected [..., M, D], got shape {tuple(h.shape)}")
    m, d = h.shape[-2], h.shape[-1]
    mix = 2 * m + m * m
    if tuple(fn.shape) != (mix, m * d) or tuple(base.shape) != (mix,) or tuple(scale.shape) != (3,):
        raise KernelInputError(
            f"hc_pre: with {m} streams of {d}, fn must be {(mix, m * d)}, base ({mix},), scale "
            f"(3,); got {tuple(fn.shape)}, {tuple(base.shape)}, {tuple(scale.shape)}")
    if not (dispatch.serves(HC_PRE) and dispatch.first_use_ok(HC_PRE, h.dtype, hc_mult=m)):
        return hc_pre_ops(h, fn, base, scale, iters=iters, eps=eps, norm_eps=norm_eps,
                          out_dtype=out_dtype)
    lead = h.shape[:-2]
    n = 1
    for s in lead:
        n *= s
    x, post, comb = dispatch.run(
        "hc.metal", "hc_pre",
        {"h": h.reshape(n, m * d), "fn": fn, "base": base.astype(mx.float32),
         "scale": scale.astype(mx.float32), "D": d, "iters": int(iters), "eps": float(eps),
         "norm_eps": float(norm_eps)},
        {"x": ((n, d), out_dtype), "post": ((n, m), mx.float32), "comb": ((n, m * m), mx.float32)},
        grid=(HC_THREADS, n, 1), threadgroup=(HC_THREADS, 1, 1),
        template=[("T", h.dtype), ("FT", fn.dtype), ("XT", out_dtype), ("M", m)])
    return x.reshape(*lead, d), post.reshape(*lead, m), comb.reshape(*lead, m, m)

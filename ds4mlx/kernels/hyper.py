"""Fused hyper-connection pre kernel (``metal/hc.metal``) beside its MLX-ops twin (the model's own
:func:`ds4mlx.ops.hc_pre`). Whether the kernel serves a call is
:func:`ds4mlx.kernels.dispatch.serves` of the variant ``HC_PRE``; at decode (up to
``GRID_TOKENS`` tokens) it takes its grid form where :func:`ds4mlx.kernels.dispatch.grid_sync`
allows: each token's mixer product split over ``ceil(M·D / HC_CHUNK)`` threadgroups of the one
launch (Flash: 32 rather than one core reading the 1.5 MB mixer), the last one finishing.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable

import mlx.core as mx
import numpy as np

from .. import ops as _ops
from ..quant.gguf import native
from . import dispatch
from .dispatch import HC_PRE, KernelInputError
from .source import HC_CHUNK, HC_THREADS

GRID_TOKENS = 8  # beyond this many tokens, one threadgroup per token keeps the GPU busy


def compiled_rounds(lib) -> Callable[[np.ndarray, int, float], np.ndarray]:
    """:func:`ds4mlx.ops.sinkhorn_host`'s signature over the library's ``ds4_sinkhorn_f32``."""
    run = lib.ds4_sinkhorn_f32
    run.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_float]
    run.restype = None

    def rounds(c: np.ndarray, iters: int, eps: float) -> np.ndarray:
        c = np.ascontiguousarray(c, dtype=np.float32)
        m = c.shape[-1]
        run(c.ctypes.data, c.size // (m * m), m, iters, eps)
        return c

    return rounds


def _sinkhorn_matches(lib) -> bool:
    """The compiled rounds against numpy's (:func:`ds4mlx.ops.sinkhorn_host`), bit for bit."""
    rounds, rng = compiled_rounds(lib), np.random.default_rng(0)
    for scale in (0.1, 1.0, 30.0):
        z = rng.standard_normal((3, 4, 4)).astype(np.float32) * np.float32(scale)
        c = np.exp(z - z.max(-1, keepdims=True))
        c = (c / c.sum(-1, keepdims=True)).astype(np.float32)
        ref, got = _ops.sinkhorn_host(c.copy(), 20, 1e-6), rounds(c.copy(), 20, 1e-6)
        if not np.array_equal(ref.view(np.uint32), got.view(np.uint32)):
            return False
    return True


@functools.cache
def host_sinkhorn() -> Callable[[np.ndarray, int, float], np.ndarray] | None:
    """The CPU path's Sinkhorn rounds compiled (``quant/gguf/native/sinkhorn.c``: ~2 us a token
    where numpy takes ~75), where a C compiler is found and the library matches numpy; else
    None (numpy serves)."""
    lib = native.load_checked("sinkhorn", _sinkhorn_matches)
    return None if lib is None else compiled_rounds(lib)


def hc_pre_ops(h: mx.array, fn: mx.array, base: mx.array, scale: mx.array, *, iters: int,
               eps: float, norm_eps: float, out_dtype: mx.Dtype = mx.float32,
               norm: Callable[[mx.array], mx.array] | None = None,
               prev: tuple[mx.array, mx.array, mx.array] | None = None,
               also_f32: bool = False) -> tuple[mx.array, ...]:
    """Ops twin of :func:`hc_pre`: the previous sublayer's HC post, the model's own HC pre
    (:func:`ds4mlx.ops.hc_pre`), the sublayer's norm and the float32 cast."""
    if prev is not None:
        h = _ops.hc_post(prev[0], h, prev[1], prev[2])
    x, post, comb = _ops.hc_pre(h, fn, base, scale, iters=iters, eps=eps, norm_eps=norm_eps,
                                host=host_sinkhorn())
    x = x.astype(out_dtype)
    if norm is not None:
        x = norm(x)
    return (x, post, comb) + ((h,) if prev is not None else ()) + \
        ((x.astype(mx.float32),) if also_f32 else ())


def hc_pre(h: mx.array, fn: mx.array, base: mx.array, scale: mx.array, *, iters: int, eps: float,
           norm_eps: float, out_dtype: mx.Dtype = mx.float32,
           norm: Callable[[mx.array], mx.array] | None = None,
           prev: tuple[mx.array, mx.array, mx.array] | None = None,
           also_f32: bool = False, grid: bool | None = None) -> tuple[mx.array, ...]:
    """Fused HC pre: streams ``h [..., M, D]`` -> (x ``[..., D]`` in ``out_dtype`` (the
    sublayer's activation dtype: no cast launch after it), post ``[..., M]``, comb
    ``[..., M, M]`` float32), in one kernel (RMS, mixing projection ``fn [2M+M², M·D]``,
    sigmoid / softmax, ``iters`` Sinkhorn rounds, weighted collapse).

    ``norm`` (an RMSNorm module: ``weight [D]``, ``eps``): x comes out normalised by it, as
    the sublayer takes it. ``prev`` = (y ``[..., D]``, post, comb) of the previous sublayer:
    ``h`` are the streams before it, whose HC post runs first in the same kernel; the new
    streams ``[..., M, D]`` float32 are then returned too, as a fourth value. ``also_f32``:
    x in float32 as well, last (for the sublayer's float32 consumers). ``grid``: the kernel's
    form (None: the grid form up to ``GRID_TOKENS`` tokens when ``dispatch.grid_sync()`` and
    that form's first-use check (``grid=1``) pass, else the one-threadgroup form; the check
    cases pick each form)."""
    if h.ndim < 2:
        raise KernelInputError(f"h: expected [..., M, D], got shape {tuple(h.shape)}")
    m, d = h.shape[-2], h.shape[-1]
    mix = 2 * m + m * m
    if tuple(fn.shape) != (mix, m * d) or tuple(base.shape) != (mix,) or tuple(scale.shape) != (3,):
        raise KernelInputError(
            f"hc_pre: with {m} streams of {d}, fn must be {(mix, m * d)}, base ({mix},), scale "
            f"(3,); got {tuple(fn.shape)}, {tuple(base.shape)}, {tuple(scale.shape)}")
    lead = h.shape[:-2]
    if prev is not None and (tuple(prev[0].shape) != (*lead, d) or tuple(prev[1].shape) != (*lead, m)
                             or tuple(prev[2].shape) != (*lead, m, m)):
        raise KernelInputError(f"hc_pre: prev must be y {(*lead, d)}, post {(*lead, m)} and "
                               f"comb {(*lead, m, m)}")
    if norm is not None and tuple(norm.weight.shape) != (d,):
        raise KernelInputError(f"hc_pre: the norm weight must be ({d},)")
    n = 1
    for s in lead:
        n *= s
    groups = dispatch.ceil_div(m * d, HC_CHUNK)
    kernel = dispatch.serves(HC_PRE)
    if kernel and grid is None:  # the grid form has its own check: failing, one threadgroup
        grid = (n <= GRID_TOKENS and groups > 1 and dispatch.grid_sync()
                and dispatch.first_use_ok(HC_PRE, h.dtype, hc_mult=m, grid=1))
    form = {"grid": 1} if grid else {}
    if not (kernel and dispatch.first_use_ok(HC_PRE, h.dtype, hc_mult=m, **form)):
        return hc_pre_ops(h, fn, base, scale, iters=iters, eps=eps, norm_eps=norm_eps,
                          out_dtype=out_dtype, norm=norm, prev=prev, also_f32=also_f32)
    groups = groups if grid else 1
    f32 = mx.float32
    if prev is None:
        y, postp, combp = _dummy(f32), _dummy(f32), _dummy(f32)
    else:
        y = prev[0].reshape(n, d)
        # read through a macro that takes any address space: no padding launch for post
        postp, combp = prev[1].reshape(n * m).astype(f32), prev[2].reshape(n * m * m).astype(f32)
    nw = _dummy(f32) if norm is None else dispatch.device_array(norm.weight)
    # grid form: a counter per token, and MIX + 1 partials per threadgroup (float bits)
    counter = dispatch.counter("hc_pre", n) if grid else _dummy(mx.uint32)
    x, post, comb, hn, xf, _ = dispatch.run(
        "hc.metal", "hc_pre",
        {"h": h.reshape(n, m * d), "fn": fn, "base": base.astype(f32),
         "scale": scale.astype(f32), "y": y, "postp": postp, "combp": combp, "nw": nw,
         "counter": counter, "D": d, "iters": int(iters), "eps": float(eps),
         "norm_eps": float(norm_eps), "x_eps": float(norm.eps) if norm is not None else 0.0},
        {"x": ((n, d), out_dtype), "post": ((n, m), f32), "comb": ((n, m * m), f32),
         "hn": ((n, m * d) if prev is not None else (1,), f32),
         "xf": ((n, d) if also_f32 else (1,), f32),
         "gpart": ((n, groups, mix + 1) if grid else (1,), mx.uint32)},
        grid=(HC_THREADS * groups, n, 1), threadgroup=(HC_THREADS, 1, 1),
        template=[("T", h.dtype), ("FT", fn.dtype), ("XT", out_dtype), ("YT", y.dtype),
                  ("WT", nw.dtype), ("M", m), ("POST", prev is not None),
                  ("NORMW", norm is not None), ("XF", bool(also_f32)), ("GRID", bool(grid))])
    out = (x.reshape(*lead, d), post.reshape(*lead, m), comb.reshape(*lead, m, m))
    return out + ((hn.reshape(*lead, m, d),) if prev is not None else ()) + \
        ((xf.reshape(*lead, d),) if also_f32 else ())


@functools.cache
def _dummy(dtype: mx.Dtype) -> mx.array:
    # an input a kernel variant does not read; made once, so no fill runs per call
    a = mx.zeros((8,), dtype=dtype)
    mx.eval(a)
    return a

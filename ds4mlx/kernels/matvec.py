"""Products of one weight (no expert index), kernels of ``metal/moe.metal`` beside their ops
twins: the dense GGUF projection (blocks ``[out, bytes]``, the call site of ``GGUFLinear``) and
the shared expert's tail on a float down weight (:func:`shared_down`).

Up to ``MATVEC_TOKENS`` rows (decode, a speculative verify) take kernel ``gguf_matvec``; more
take the weight as the one expert of the tiled kernel of :mod:`.moe`.
"""

from __future__ import annotations

import mlx.core as mx

from .. import ops as _ops
from ..quant import gguf as _formats
from . import dispatch, moe
from .dispatch import KernelInputError, ceil_div, device_array
from .moe import Packed, matmul_sorted, unpack_weight, variant_name
from .source import DECODE_ROWS_PER_TG, DECODE_THREADS, MATVEC_TOKENS


def matmul_ops(x: mx.array, w: mx.array, fmt: str) -> mx.array:
    """The ops path of a dense GGUF projection ``w [out, bytes]``: float32 ``x @ W.T``,
    dequantized in output-row chunks of at most ``moe.DEQUANT_BUDGET`` bytes (the one bound
    of the ops paths)."""
    fmod = _formats.get(fmt)
    input_dims = _formats.row_weights(fmod, w.shape[-1])
    xf = x.astype(mx.float32)
    step = max(1, moe.DEQUANT_BUDGET // (4 * input_dims))  # output rows per step
    parts = [xf @ fmod.dequantize(w[r:r + step]).T for r in range(0, w.shape[0], step)]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def gguf_matvec(x: mx.array, p: Packed) -> mx.array:
    """Kernel ``gguf_matvec``: ``[N, out]`` float32 = ``x @ W.T`` for x ``[N, K]`` with
    N <= ``MATVEC_TOKENS`` and one weight ``p`` ``[1, out, ·]`` (ops twin: :func:`matmul_ops`)."""
    n, r = x.shape[0], p.q.shape[1]
    (out,) = dispatch.run("moe.metal", "gguf_matvec",
                          {"x": x, "w": p.q[0], "s": device_array(p.s), "N": n, "K": p.k, "R": r},
                          {"out": ((n, r), mx.float32)},
                          grid=(DECODE_THREADS, ceil_div(r, DECODE_ROWS_PER_TG), 1),
                          threadgroup=(DECODE_THREADS, 1, 1),
                          template=[("T", x.dtype), ("FMT", p.layout)])
    return out


def gguf_matmul(x: mx.array, weight: mx.array, *, fmt: str, input_dims: int,
                output_dims: int) -> mx.array:
    """Call site of ``GGUFLinear``: ``x @ W.T`` for GGUF blocks ``[out, bytes]`` in x's dtype
    (up to ``MATVEC_TOKENS`` rows: the matvec kernel; more: one expert of the tiled kernel; or
    the ops path)."""
    p = unpack_weight(weight[None], fmt, "weight") if dispatch.serves(fmt) else None
    if p is None or not dispatch.first_use_ok(variant_name(p), x.dtype):
        return matmul_ops(x, weight, fmt).astype(x.dtype)
    rows = x.reshape(-1, input_dims)
    n = rows.shape[0]
    if n <= MATVEC_TOKENS:
        out = gguf_matvec(rows, p)
    else:
        order = mx.arange(n, dtype=mx.uint32)
        out = matmul_sorted(rows, order, order, mx.zeros((n,), dtype=mx.uint32), p, None,
                            output_dims, None)
    return out.reshape(*x.shape[:-1], output_dims).astype(x.dtype)


SHARED_MAX_TOKENS = 8  # NT of shared_down: tokens per call (decode, a speculative verify)


def shared_down_ops(gu: mx.array, w: mx.array, limit: float, add: mx.array) -> mx.array:
    """Ops twin of :func:`shared_down`: SwiGLU of the merged gate | up product, cast to the
    activation dtype, the dense down projection, plus the routed experts' sum."""
    f = gu.shape[-1] // 2
    mid = _ops.clamped_swiglu(gu[..., :f], gu[..., f:], limit).astype(add.dtype)
    return add + mid @ w.T


def shared_down_serves(w: mx.array, n: int, dtype: mx.Dtype) -> bool:
    """Whether :func:`shared_down` serves ``n`` tokens against a dense down weight ``w``."""
    return (n <= SHARED_MAX_TOKENS and w.ndim == 2 and mx.issubdtype(w.dtype, mx.floating)
            and dispatch.serves(dispatch.SHARED_DOWN)
            and dispatch.first_use_ok(dispatch.SHARED_DOWN, dtype))


def shared_down(gu: mx.array, w: mx.array, limit: float, add: mx.array) -> mx.array:
    """The shared expert's tail in one kernel: ``add + down(SwiGLU(gate, up))`` with ``gu``
    ``[N, 2F]`` its merged gate | up product, ``w [R, F]`` the dense down weight, ``add [N, R]``
    the routed experts' sum (its dtype is the activation dtype), N <= 8 tokens."""
    n, f2 = gu.shape
    r, f = w.shape
    if f2 != 2 * f or tuple(add.shape) != (n, r):
        raise KernelInputError(f"shared_down: gu {tuple(gu.shape)}, w {tuple(w.shape)} and add "
                               f"{tuple(add.shape)} must be [N, 2F], [R, F], [N, R]")
    if not shared_down_serves(w, n, add.dtype):
        return shared_down_ops(gu, w, limit, add)
    (out,) = dispatch.run("moe.metal", "shared_down",
                          {"gu": gu, "w": w, "add": add, "limit": float(limit or 0.0),
                           "N": n, "F": f, "R": r},
                          {"out": ((n, r), add.dtype)},
                          grid=(DECODE_THREADS, ceil_div(r, DECODE_ROWS_PER_TG), 1),
                          threadgroup=(DECODE_THREADS, 1, 1),
                          template=[("GT", gu.dtype), ("WT", w.dtype), ("T", add.dtype)])
    return out

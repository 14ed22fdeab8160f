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
from . import shared as _shared
from .dispatch import KernelInputError, ceil_div, device_array
from .moe import Packed, matmul_sorted, unpack_weight, variant_name
from .source import DECODE_ROWS, DECODE_ROWS_PER_TG, DECODE_THREADS, MATVEC_TOKENS


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


def gguf_matvec(x: mx.array, p: Packed, p2: Packed | None = None, *, rows_per_group: int = 0,
                out_dtype: mx.Dtype | None = None) -> mx.array:
    """Kernel ``gguf_matvec``: ``[N, out]`` (``out_dtype``, float32 by default) = ``x @ W.T``
    for x ``[N, XK]`` with N <= ``MATVEC_TOKENS`` and a weight ``p`` ``[(1,) rows, ·]`` in any
    layout of ``metal/quant.h``; ``p2``: a second weight whose rows follow (one product of
    unlike parts); ``rows_per_group`` > 0: output row r reads x's input group r // that (x is
    ``[N, G * K]``). Ops twins: :func:`matmul_ops`, :func:`dense_matvec_ops`."""
    q = p.q if p.q.ndim == 2 else p.q[0]
    n, r = x.shape[0], q.shape[0]
    two = p2 is not None
    q2 = (p2.q if p2.q.ndim == 2 else p2.q[0]) if two else q
    r2 = q2.shape[0] if two else 0
    if (two and r % DECODE_ROWS) or (rows_per_group and (rows_per_group % DECODE_ROWS or two)):
        raise KernelInputError(f"gguf_matvec: {r} rows of part 1 / {rows_per_group} per group "
                               f"must be multiples of {DECODE_ROWS} (one part: any)")
    p2 = p2 if two else p
    (out,) = dispatch.run("moe.metal", "gguf_matvec",
                          {"x": x, "w": q, "s": device_array(p.s), "b": device_array(p.b),
                           "w2": q2, "s2": device_array(p2.s), "b2": device_array(p2.b),
                           "N": n, "K": p.k, "XK": x.shape[-1], "R": r, "R2": r2,
                           "RG": rows_per_group},
                          {"out": ((n, r + r2), out_dtype or mx.float32)},
                          grid=(DECODE_THREADS, ceil_div(r + r2, DECODE_ROWS_PER_TG), 1),
                          threadgroup=(DECODE_THREADS, 1, 1),
                          template=[("T", x.dtype), ("OutT", out_dtype or mx.float32),
                                    ("FMT", p.layout), ("FMT2", p2.layout)])
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
    if n <= MATVEC_TOKENS:  # written in x's dtype: no cast launch
        return gguf_matvec(rows, p, out_dtype=x.dtype).reshape(*x.shape[:-1], output_dims)
    else:
        order = mx.arange(n, dtype=mx.uint32)
        out = matmul_sorted(rows, order, order, mx.zeros((n,), dtype=mx.uint32), p, None,
                            output_dims, None)
    return out.reshape(*x.shape[:-1], output_dims).astype(x.dtype)


class DenseWeights:
    """The parts of one decode product as :func:`dense_matvec` takes them: one or two
    :class:`.shared.SharedWeight` (float rows, GGUF blocks, MLX ``mxfp8`` or ``affine8``) whose
    output rows follow each other, or one weight used block-diagonally over ``groups`` input
    groups (the attention's grouped ``wo_a``). Packed and checked once; ``arrays`` are the
    arrays it was made of, for its owner to tell a stale one (a reload)."""

    def __init__(self, parts: list[_shared.SharedWeight], groups: int = 0):
        self.parts = [_shared.SharedWeight(*p) for p in parts]
        self.groups = groups
        self.arrays = [a for p in self.parts for a in p if isinstance(a, mx.array)]
        self.rows = [p.weight.shape[0] for p in self.parts]
        try:
            self.packed = [_shared.shared_packed(p, f"part {i}") for i, p in enumerate(self.parts)]
        except KernelInputError:
            self.packed = None

    def holds(self, arrays: list[mx.array]) -> bool:
        return len(arrays) == len(self.arrays) and all(a is b for a, b in zip(arrays, self.arrays))

    def fits(self, x: mx.array) -> bool:
        """Whether the kernel takes these parts with input ``x`` (rows of its last dim)."""
        p = self.packed
        if p is None or not 1 <= len(p) <= 2 or any(q.q.ndim != 2 or q.k % 32 for q in p):
            return False
        if any(q.k != p[0].k for q in p):
            return False
        if self.groups:
            r = self.rows[0]
            return (len(p) == 1 and r % self.groups == 0 and (r // self.groups) % DECODE_ROWS == 0
                    and x.ndim >= 2 and x.shape[-2] == self.groups and x.shape[-1] == p[0].k)
        return x.shape[-1] == p[0].k and (len(p) == 1 or self.rows[0] % DECODE_ROWS == 0)


def dense_matvec_ops(x: mx.array, w: DenseWeights) -> mx.array:
    """Ops twin of :func:`dense_matvec`: x's rows times each part's exact float32 rows
    (:func:`.shared.shared_dense`), in float32, side by side, cast once to x's dtype."""
    xf = x.astype(mx.float32)
    if w.groups:
        g = w.groups
        dense = _shared.shared_dense(w.parts[0])
        r = dense.shape[0] // g
        xg = xf.reshape(-1, g, xf.shape[-1]).swapaxes(0, 1)  # [G, N, K]
        y = (xg @ dense.reshape(g, r, -1).swapaxes(-1, -2)).swapaxes(0, 1)  # [N, G, R / G]
        return y.reshape(*x.shape[:-1], r).astype(x.dtype)
    ys = [xf @ _shared.shared_dense(p).T for p in w.parts]
    return (ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=-1)).astype(x.dtype)


def dense_path() -> bool:
    """Whether :func:`dense_matvec` may serve at all here: its variant on, on a kernel backend
    off the CPU path (the emulator runs it; MLX on the CPU keeps its own products). Cheap:
    callers ask it before building their :class:`DenseWeights`."""
    return (dispatch.serves(dispatch.DENSE_MATVEC)
            and (dispatch.backend() == "emulate" or not _ops.on_cpu()))


def dense_matvec_serves(x: mx.array, w: DenseWeights) -> bool:
    """Whether :func:`dense_matvec` runs the kernel for ``x``: up to ``MATVEC_TOKENS`` rows on
    a kernel backend off the CPU path (the emulator runs it; MLX on the CPU keeps its own
    products), parts the kernel takes, the variant's first-use check passed at x's dtype."""
    n = x.size // x.shape[-1] if x.shape[-1] else 0
    if w.groups:
        n = x.size // (w.groups * w.packed[0].k) if w.packed else 0
    return (1 <= n <= MATVEC_TOKENS and dense_path() and w.fits(x)
            and dispatch.first_use_ok(dispatch.DENSE_MATVEC, x.dtype))


def dense_matvec(x: mx.array, w: DenseWeights) -> mx.array:
    """``x @ W.T`` of a decode product in one launch of ``gguf_matvec``, written in x's dtype:
    x ``[..., K]`` -> ``[..., R1 + R2]`` for parts side by side, or for ``w.groups`` G: x
    ``[..., G, K]`` -> ``[..., G, R / G]`` (group g meets rows g R / G .. (g + 1) R / G).
    The caller asks :func:`dense_matvec_serves` first (else :func:`dense_matvec_ops`)."""
    p = w.packed
    if w.groups:
        g = w.groups
        rows = x.reshape(-1, g * p[0].k)
        y = gguf_matvec(rows, p[0], rows_per_group=w.rows[0] // g, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], w.rows[0] // g)
    rows = x.reshape(-1, x.shape[-1])
    y = gguf_matvec(rows, p[0], p[1] if len(p) == 2 else None, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], sum(w.rows))


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

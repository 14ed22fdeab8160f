"""MoE expert kernels (``metal/moe.metal``) beside their MLX-ops twins (the call sites the
model's expert modules use are in :mod:`.experts`, the dense GGUF projections' in :mod:`.matvec`).

Quantized expert weights ``w`` are either native GGUF blocks, ``uint8 [E, rows, row_bytes]``
with ``fmt`` one of ``Q8_0``, ``Q4_K``, ``Q2_K``, ``IQ2_XXS``, ``MXFP4``, or, for ``fmt="MXFP4"``,
the pair ``(weight uint32 [E, rows, K/8], scales uint8 [E, rows, K/32])`` of MLX's ``mxfp4``
mode (official FP4 experts, and GGUF MXFP4 after its nibble reorder).

The decode kernels can also take the layer's shared expert (same input x) as one more slot of
each token, in its own format (:mod:`.shared`: float rows in the activation dtype, Q8_0
blocks, MLX mxfp8 or affine 8-bit): its gate | up rows in ``moe_gate_up_decode``, its down rows
summed at weight 1 in ``moe_down_decode``, so a decode step runs no separate shared-expert
launches.

Entry points (kernel | ops twin): :func:`dequantize`, :func:`moe_gate_up` (and
:func:`moe_gate_up_routed`, the router's selection made in the kernel), :func:`moe_down`,
:func:`gather_qmm_native`. The call sites the expert modules use are in :mod:`.experts`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol, Union

import mlx.core as mx
import numpy as np

from .. import ops as _ops
from ..quant import gguf as _formats
from ..quant.codecs import MX_GROUP
from . import dispatch
from .dispatch import KERNEL_FORMATS, KernelInputError, ceil_div, device_array
from .router import Route
from .source import (DECODE_ROWS, DECODE_ROWS_PER_TG, DECODE_THREADS, DOWN_SIMDGROUPS,
                     GGUF_MXFP4, LAYOUT, MLX_MXFP4, TILE, TILE_THREADS)

QuantWeight = Union[mx.array, tuple]

# Up to this many (token, expert) pairs the MoE runs the decode kernels (simdgroups stride over
# each weight row); above it, the expert-grouped tiled kernel.
DECODE_MAX_PAIRS = 32
# Bound on the float32 bytes of dequantized weights one ops step holds at once.
DEQUANT_BUDGET = 256 << 20


@dataclass(frozen=True)
class Packed:
    """A quantized weight as the kernels read it."""

    fmt: str  # format name
    layout: int  # DS4_* id of metal/quant.h
    q: mx.array  # packed bytes, uint8 [..., rows, row_bytes]
    s: mx.array  # MLX mxfp4 / mxfp8 scales [..., rows, K/32], affine's as bytes, else a dummy
    k: int  # inputs per row
    b: mx.array | None = None  # an affine layout's biases as bytes (shape of s); else s

    def __post_init__(self):
        if self.b is None:
            object.__setattr__(self, "b", self.s)


def variant_name(p: Packed) -> str:
    """The check's name of a weight layout: the format, ``MXFP4-mlx`` for MLX mxfp4 pairs."""
    return "MXFP4-mlx" if p.layout == MLX_MXFP4 else p.fmt


class Shared(Protocol):
    """What the decode kernels and their twins need of a folded shared expert (the one
    implementation, :class:`ds4mlx.kernels.shared.Shared`, lives above this module)."""

    @property
    def packed(self) -> tuple[Packed, Packed]:
        """(gate | up ``[2F, K]``, down ``[D, F]``) as the kernels read them."""

    def dense(self, part: int) -> mx.array:
        """Float32 rows of part 0 (gate | up) or 1 (down): the twins' exact dequantization."""


def unpack_weight(w: QuantWeight, fmt: str, name: str = "w") -> Packed:
    """Check a quantized weight and describe its layout; ``name`` labels errors."""
    key = fmt.upper()
    if key not in KERNEL_FORMATS:
        raise KernelInputError(f"{name}: format {fmt!r} has no kernel; expected one of "
                               f"{', '.join(KERNEL_FORMATS)}")
    if key == "MXFP4" and isinstance(w, (tuple, list)):
        if len(w) != 2:
            raise KernelInputError(f"{name}: MLX mxfp4 weights are a (weight, scales) pair")
        q, s = w
        if q.dtype != mx.uint32 or s.dtype != mx.uint8 or q.shape[:-1] != s.shape[:-1]:
            raise KernelInputError(
                f"{name}: mxfp4 expects uint32 weight and uint8 scales with equal leading dims, "
                f"got {q.dtype}{tuple(q.shape)} and {s.dtype}{tuple(s.shape)}")
        k = q.shape[-1] * 8
        if s.shape[-1] * MX_GROUP != k:
            raise KernelInputError(f"{name}: {s.shape[-1]} scales per row do not fit {k} inputs")
        return Packed(key, MLX_MXFP4, mx.view(q, mx.uint8), s, k)
    if not isinstance(w, mx.array) or w.dtype != mx.uint8 or w.ndim < 2:
        raise KernelInputError(f"{name}: {key} weights must be uint8 blocks [..., rows, row_bytes]")
    try:
        k = _formats.row_weights(_gguf_format(key), w.shape[-1], name)
    except ValueError as e:
        raise KernelInputError(str(e)) from None
    layout = GGUF_MXFP4 if key == "MXFP4" else LAYOUT[key]
    return Packed(key, layout, w, _no_scales(), k)


@functools.cache
def _placeholder(dtype: mx.Dtype) -> mx.array:
    """An input a kernel variant does not read (made once: no fill per call)."""
    dummy = mx.zeros((8,), dtype=dtype)
    mx.eval(dummy)
    return dummy


@functools.cache
def _no_scales() -> mx.array:
    # the scales input of GGUF layouts (unused); made once, so no fill runs per call
    dummy = mx.zeros((8,), dtype=mx.uint8)
    mx.eval(dummy)
    return dummy


def _gguf_format(name: str):
    return _formats.get(name)


def _check_shared(shared: Shared | None, part: int, rows: int, k_in: int) -> Packed | None:
    """The Packed shared-expert weight of ``part`` (0: gate | up [rows, k_in], 1: down),
    checked against the routed experts' dims (``shared``: a :class:`.shared.Shared`, which
    packs and dequantizes its parts itself: this module does not import it)."""
    if shared is None:
        return None
    p = shared.packed[part]
    if p.q.shape[0] != rows or p.k != k_in:
        raise KernelInputError(f"shared.{('gate_up', 'down')[part]}: expected [{rows}, {k_in}] "
                               f"weights, got {p.q.shape[0]} rows of {p.k}")
    return p


def _check_experts(p: Packed, name: str, x: mx.array, x_name: str,
                   indices: mx.array) -> tuple[int, int]:
    """(rows per expert, k) of one expert product, checked: experts ``[E, rows, ·]`` taking x's
    last dim, ``indices [N, k]`` for x's N tokens; x is ``[N, K]``, or mid ``[N, k, F]``."""
    shape = "[N, k, F]" if x_name == "mid" else "[N, K]"
    if x.ndim != shape.count(",") + 1:
        raise KernelInputError(f"{x_name}: expected {shape}, got shape {tuple(x.shape)}")
    if p.q.ndim != 3:
        raise KernelInputError(f"{name}: expected experts [E, rows, ·], got shape "
                               f"{tuple(p.q.shape)}")
    if x.shape[-1] != p.k:
        raise KernelInputError(f"{x_name}: {x.shape[-1]} features, but the experts take {p.k}")
    n = x.shape[0]
    if indices.ndim != 2 or indices.shape[0] != n or indices.shape[1] < 1 or (
            x.ndim == 3 and indices.shape[1] != x.shape[1]):
        raise KernelInputError(f"indices: expected [{n}, k] with k >= 1 (k of {x_name}), got "
                               f"{tuple(indices.shape)}")
    return p.q.shape[1], indices.shape[1]


def _kernel_serves(fmt: str, p: Packed, dtype: mx.Dtype, indices: mx.array) -> bool:
    """Whether the kernel serves this expert product: the format is on and its variant passed
    the first-use check at these dims; then the expert ids are checked (on emulation)."""
    if not (dispatch.serves(fmt) and dispatch.first_use_ok(
            variant_name(p), dtype, experts_per_token=indices.shape[1], n_experts=p.q.shape[0])):
        return False
    _check_ids(indices, p.q.shape[0])
    return True


def _check_ids(ids: mx.array, n_experts: int, name: str = "indices") -> None:
    # Emulation checks before launch (it syncs anyway). On the GPU the kernels get E and turn a
    # pair with an out-of-range id into NaN outputs instead of reading past the weights (no
    # host sync per layer); the non-finite result is then reported, never sampled from.
    if dispatch.backend() == "emulate" and ids.size:
        lo, hi = int(mx.min(ids)), int(mx.max(ids))
        if lo < 0 or hi >= n_experts:
            raise KernelInputError(f"{name}: expert ids {lo}..{hi} out of range [0, {n_experts})")


# ----------------------------------------------------------------------------- dequantize
def dequantize_ops(w: QuantWeight, fmt: str) -> mx.array:
    """Float32 rows ``[..., rows, K]`` with MLX ops: the format's own dequantizer for GGUF
    blocks, ``mx.dequantize`` for MLX mxfp4."""
    p = unpack_weight(w, fmt)
    if p.layout == MLX_MXFP4:
        return mx.dequantize(w[0], w[1], group_size=MX_GROUP, bits=4, mode="mxfp4",
                             dtype=mx.float32)
    return _gguf_format(p.fmt).dequantize(w)


def dequantize(w: QuantWeight, fmt: str) -> mx.array:
    """Float32 rows ``[..., rows, K]`` of a quantized weight (kernel ``dequant_rows``)."""
    p = unpack_weight(w, fmt)
    if not (dispatch.serves(fmt) and dispatch.first_use_ok(variant_name(p), mx.float32)):
        return dequantize_ops(w, fmt)
    lead = p.q.shape[:-1]
    rows = 1
    for n in lead:
        rows *= n
    s = p.s.reshape(rows, -1) if p.layout == MLX_MXFP4 else p.s
    (out,) = dispatch.run("moe.metal", "dequant_rows",
                          {"w": device_array(p.q.reshape(rows, -1)), "s": device_array(s),
                           "K": p.k},
                          {"out": ((rows, p.k), mx.float32)},
                          grid=(p.k // 8, rows, 1), threadgroup=(min(p.k // 8, 256), 1, 1),
                          template=[("FMT", p.layout)])
    return out.reshape(*lead, p.k)


# ----------------------------------------------------------------------------- MoE, ops twins
def switch_matmul_ops(x: mx.array, w: mx.array, fmt: str, indices: mx.array,
                      sorted_indices: bool = False) -> mx.array:
    """The ops path of packed GGUF experts ``w [E, out, bytes]`` under the switch-linear protocol:
    x ``[..., M, in]``, indices broadcast against x's batch dims -> float32 ``[..., M, out]``.

    Dequantizes only the experts ``indices`` names in this call, a bounded number at a time
    (``DEQUANT_BUDGET``), never all of them.
    """
    fmod = _gguf_format(fmt)
    n_experts, output_dims = w.shape[0], w.shape[1]
    input_dims = _formats.row_weights(fmod, w.shape[-1])
    xf = x.astype(mx.float32)
    idx = np.array(indices).astype(np.int64)  # host copy: which experts this call touches
    if idx.size and (idx.min() < 0 or idx.max() >= n_experts):
        raise IndexError(f"expert index out of range [0, {n_experts}): {idx.min()}..{idx.max()}")
    used = np.unique(idx)
    if used.size == 0:
        batch = np.broadcast_shapes(tuple(xf.shape[:-2]), idx.shape)
        return mx.zeros((*batch, xf.shape[-2], output_dims), dtype=mx.float32)
    group = max(1, DEQUANT_BUDGET // (4 * output_dims * input_dims))
    if len(used) <= group:
        # one step: the used experts only, indices renumbered into that stack
        local = np.zeros(n_experts, dtype=np.uint32)
        local[used] = np.arange(len(used), dtype=np.uint32)
        dense = fmod.dequantize(w[mx.array(used.astype(np.uint32))])
        return mx.gather_mm(xf, dense.swapaxes(-1, -2), rhs_indices=mx.array(local[idx]),
                            sorted_indices=sorted_indices)
    # Many experts: sort the (row, expert) pairs by expert and run `group` experts at a time.
    batch = np.broadcast_shapes(tuple(xf.shape[:-2]), idx.shape)
    m = xf.shape[-2]
    x_rows = mx.broadcast_to(xf, (*batch, m, input_dims)).reshape(-1, m, input_dims)
    flat = np.broadcast_to(idx, batch).reshape(-1)
    order = np.argsort(flat, kind="stable")
    sorted_e = flat[order]
    parts = []
    for g in range(0, len(used), group):
        experts = used[g:g + group]
        lo = np.searchsorted(sorted_e, experts[0], side="left")
        hi = np.searchsorted(sorted_e, experts[-1], side="right")
        local = np.searchsorted(experts, sorted_e[lo:hi]).astype(np.uint32)
        dense = fmod.dequantize(w[mx.array(experts.astype(np.uint32))])
        rows = x_rows[mx.array(order[lo:hi].astype(np.uint32))]
        parts.append(mx.gather_mm(rows, dense.swapaxes(-1, -2), rhs_indices=mx.array(local),
                                  sorted_indices=True))
        mx.eval(parts[-1])  # free this group's dequantized weights before the next
    y = mx.concatenate(parts, axis=0)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return y[mx.array(inverse.astype(np.uint32))].reshape(*batch, m, output_dims)


def _expert_rows_ops(rows: mx.array, w: QuantWeight, fmt: str, eid: mx.array) -> mx.array:
    """``[P, out]`` float32: expert ``eid[p]`` applied to ``rows[p]`` (``[P, K]``)."""
    p = unpack_weight(w, fmt)
    if p.layout == MLX_MXFP4:
        out = mx.gather_qmm(rows.astype(mx.float32)[:, None, :], w[0], w[1],
                            rhs_indices=eid.astype(mx.uint32), transpose=True,
                            group_size=MX_GROUP, bits=4, mode="mxfp4")
        return out[:, 0, :]
    return switch_matmul_ops(rows[:, None, :], w, p.fmt, eid)[:, 0, :]


def gather_qmm_native_ops(x: mx.array, w: QuantWeight, fmt: str, indices: mx.array) -> mx.array:
    """Ops twin of :func:`gather_qmm_native`."""
    n, k = indices.shape
    rows = mx.repeat(x, k, axis=0)  # pair p = token * k + slot reads x[token]
    return _expert_rows_ops(rows, w, fmt, indices.reshape(-1)).reshape(n, k, -1)


def moe_gate_up_ops(x: mx.array, w1: QuantWeight, w3: QuantWeight, fmt: str, indices: mx.array,
                    limit: float | None, shared: Shared | None = None) -> mx.array:
    """Ops twin of :func:`moe_gate_up`."""
    g = gather_qmm_native_ops(x, w1, fmt, indices)
    u = gather_qmm_native_ops(x, w3, fmt, indices)
    mid = _ops.clamped_swiglu(g, u, limit or 0.0)
    if shared is None:
        return mid
    gu = x.astype(mx.float32) @ shared.dense(0).T
    f = gu.shape[-1] // 2
    own = _ops.clamped_swiglu(gu[:, :f], gu[:, f:], limit or 0.0)
    return mx.concatenate([mid, own[:, None, :]], axis=1)


def moe_down_ops(mid: mx.array, w2: QuantWeight, fmt: str, indices: mx.array, weights: mx.array,
                 out_dtype: mx.Dtype = mx.float32, shared: Shared | None = None) -> mx.array:
    """Ops twin of :func:`moe_down`."""
    n, k = indices.shape
    f = mid.shape[-1]
    rows = mid[:, :k].reshape(n * k, f)
    y = _expert_rows_ops(rows, w2, fmt, indices.reshape(-1)).reshape(n, k, -1)
    out = mx.sum(weights.astype(mx.float32)[..., None] * y, axis=1)
    if shared is not None:
        out = out + mid[:, k].astype(mx.float32) @ shared.dense(1).T
    return out.astype(out_dtype)


# ----------------------------------------------------------------------------- MoE, kernels
def _grouped(grouped: bool | None, pairs: int) -> bool:
    """Whether an expert product takes the expert-grouped tiles (else the decode kernels, which
    read a weight row per pair): asked for, or more pairs than the decode kernels take."""
    return pairs > DECODE_MAX_PAIRS if grouped is None else grouped


def _sort_pairs(idx: mx.array) -> tuple[mx.array, mx.array]:
    """(order, expert of each sorted pair): pairs grouped by expert, without a host sync."""
    order = mx.argsort(idx).astype(mx.uint32)
    return order, idx[order]


def matmul_sorted(x: mx.array, xrow: mx.array, order: mx.array, eid: mx.array, w1: Packed,
                  w3: Packed | None, n_out: int, limit: float | None) -> mx.array:
    """Kernel ``moe_matmul_sorted``: ``[P, n_out]`` float32, rows in original pair order (also
    a dense GGUF weight's many-row product, as one expert: :func:`.matvec.gguf_matmul`)."""
    p = eid.shape[0]
    gate_up = w3 is not None
    w3 = w3 or w1
    (out,) = dispatch.run("moe.metal", "moe_matmul_sorted",
                          {"x": x, "xrow": xrow, "order": order, "eid": eid, "w1": w1.q,
                           "s1": device_array(w1.s), "w3": w3.q, "s3": device_array(w3.s),
                           "P": p, "NOUT": n_out, "K": w1.k, "E": w1.q.shape[0],
                           "limit": float(limit or 0.0)},
                          {"out": ((p, n_out), mx.float32)},
                          grid=(ceil_div(n_out, TILE) * TILE_THREADS, ceil_div(p, TILE), 1),
                          threadgroup=(TILE_THREADS, 1, 1),
                          template=[("T", x.dtype), ("FMT", w1.layout), ("GATE_UP", gate_up)])
    return out


def _decode_templates(p: Packed, shared: Packed | None) -> list:
    return [("FMT", p.layout), ("SHARED", shared is not None),
            ("SFMT", p.layout if shared is None else shared.layout)]


def moe_gate_up(x: mx.array, w1: QuantWeight, w3: QuantWeight, fmt: str, indices: mx.array,
                limit: float | None, grouped: bool | None = None,
                shared: Shared | None = None) -> mx.array:
    """``mid [N, k, F]`` float32: for each token's selected experts ``e``,
    ``silu(min(W1[e]·x, limit)) · clip(W3[e]·x, ±limit)`` (no clamp when ``limit`` is 0/None),
    straight from the packed weights.

    x: ``[N, K]``; w1, w3: gate and up experts ``[E, F, ·]`` in ``fmt``; indices: ``[N, k]``.
    Few pairs: kernel ``moe_gate_up_decode``; many, or ``grouped``: ``moe_matmul_sorted``
    (expert-grouped tiles: tokens that chose one expert share its read). ``shared`` (decode
    only): the shared expert's SwiGLU comes along as slot k, ``mid [N, k + 1, F]``.
    """
    p1, p3, f = _gate_up_packed(x, w1, w3, fmt, indices)
    ps = _check_shared(shared, 0, 2 * f, p1.k)
    if not _kernel_serves(fmt, p1, x.dtype, indices):
        return moe_gate_up_ops(x, w1, w3, fmt, indices, limit, shared)
    return _gate_up_kernel(x, p1, p3, f, indices, limit, grouped, ps)


def _gate_up_packed(x: mx.array, w1: QuantWeight, w3: QuantWeight, fmt: str,
                    indices: mx.array) -> tuple[Packed, Packed, int]:
    """Gate and up experts unpacked and checked against x and indices, and F."""
    p1, p3 = unpack_weight(w1, fmt, "w1"), unpack_weight(w3, fmt, "w3")
    f, _ = _check_experts(p1, "w1", x, "x", indices)
    if p3.q.shape != p1.q.shape or p3.layout != p1.layout:
        raise KernelInputError(f"w3: shape {tuple(p3.q.shape)} differs from w1 {tuple(p1.q.shape)}")
    return p1, p3, f


def _gate_up_kernel(x: mx.array, p1: Packed, p3: Packed, f: int, indices: mx.array,
                    limit: float | None, grouped: bool | None, ps: Packed | None) -> mx.array:
    """:func:`moe_gate_up` on checked weights (``ps``: the shared gate | up, or None)."""
    n, k = indices.shape
    idx = indices.astype(mx.uint32).reshape(-1)
    if _grouped(grouped, n * k):
        if ps is not None:
            raise KernelInputError("shared: the shared expert folds into the decode kernels only")
        order, eid = _sort_pairs(idx)
        return matmul_sorted(x, order // k, order, eid, p1, p3, f, limit).reshape(n, k, f)
    return _gate_up_decode(x, p1, p3, ps, idx, None, limit)[0].reshape(n, k + (ps is not None), f)


def _gate_up_decode(x: mx.array, p1: Packed, p3: Packed, ps: Packed | None, idx: mx.array | None,
                    route: Route | None, limit: float | None) -> tuple[mx.array, mx.array, mx.array]:
    """Kernel ``moe_gate_up_decode``: (mid ``[N * kk, F]``, ids ``[N * k]``, route weights
    ``[N * k]``) with the experts of ``idx [N * k]``, or picked in the kernel by ``route``
    (ids and weights are its outputs then, else not written)."""
    n, f, e = x.shape[0], p1.q.shape[1], p1.q.shape[0]
    k = route.k if route is not None else idx.size // n
    kk = k + (ps is not None)
    ws = ps or p1
    (mid, ids, rw) = dispatch.run(
        "moe.metal", "moe_gate_up_decode",
        {"x": x, "w1": p1.q, "s1": device_array(p1.s), "w3": p3.q, "s3": device_array(p3.s),
         "idx": _placeholder(mx.uint32) if idx is None else idx, "ws": ws.q, "ss": device_array(ws.s),
         "sb": device_array(ws.b),
         "logits": _placeholder(mx.float32) if route is None else device_array(route.logits.astype(mx.float32)),
         "bias": _placeholder(mx.float32) if route is None else device_array(route.bias.astype(mx.float32)),
         "F": f, "K": p1.k, "k": k, "E": e, "limit": float(limit or 0.0),
         "rscale": float(route.scale) if route is not None else 1.0},
        {"mid": ((n * kk, f), mx.float32), "ids": ((n * k if route else 1,), mx.uint32),
         "rw": ((n * k if route else 1,), mx.float32)},
        grid=(ceil_div(f, DECODE_ROWS_PER_TG) * DECODE_THREADS, n * kk, 1),
        threadgroup=(DECODE_THREADS, 1, 1),
        template=[("T", x.dtype), *_decode_templates(p1, ps), ("ROUTE", route is not None),
                  ("RE", e if route is not None else 1),
                  ("RENORM", bool(route is not None and route.renormalize))])
    return mid, ids, rw


def moe_gate_up_routed_ops(x: mx.array, w1: QuantWeight, w3: QuantWeight, fmt: str, route: Route,
                           limit: float | None, shared: Shared | None = None):
    """Ops twin of :func:`moe_gate_up_routed`: the router's twin, then :func:`moe_gate_up_ops`
    (experts in argpartition's order, where the kernel lists them by score)."""
    idx, w = route.ops()
    return moe_gate_up_ops(x, w1, w3, fmt, idx, limit, shared), idx, w


def moe_gate_up_routed(x: mx.array, w1: QuantWeight, w3: QuantWeight, fmt: str, route: Route,
                       limit: float | None, shared: Shared | None = None):
    """:func:`moe_gate_up` on the decode kernel with the router's selection made inside it:
    (mid ``[N, k (+1), F]``, ids ``[N, k]`` uint32 by descending biased score, route weights
    ``[N, k]`` float32), the ids and weights exactly :func:`router_topk`'s. The kernel serves
    only when ``route.folds()`` and the format's kernels do (else the twin's steps)."""
    p1, p3 = unpack_weight(w1, fmt, "w1"), unpack_weight(w3, fmt, "w3")
    n, e, k = x.shape[0], p1.q.shape[0], route.k
    if tuple(route.logits.shape) != (n, e) or n * k > DECODE_MAX_PAIRS:
        raise KernelInputError(f"route: logits {tuple(route.logits.shape)} must be [{n}, {e}] "
                               f"(tokens, experts) with at most {DECODE_MAX_PAIRS} pairs")
    f, _ = _check_experts(p1, "w1", x, "x", mx.zeros((n, k), mx.uint32))
    if p3.q.shape != p1.q.shape or p3.layout != p1.layout:
        raise KernelInputError(f"w3: shape {tuple(p3.q.shape)} differs from w1 {tuple(p1.q.shape)}")
    ps = _check_shared(shared, 0, 2 * f, p1.k)
    if not (dispatch.serves(fmt) and route.folds() and dispatch.first_use_ok(
            variant_name(p1), x.dtype, experts_per_token=k, n_experts=e)):
        return moe_gate_up_routed_ops(x, w1, w3, fmt, route, limit, shared)
    mid, ids, rw = _gate_up_decode(x, p1, p3, ps, None, route, limit)
    return mid.reshape(n, k + (ps is not None), f), ids.reshape(n, k), rw.reshape(n, k)


def moe_down(mid: mx.array, w2: QuantWeight, fmt: str, indices: mx.array, weights: mx.array,
             out_dtype: mx.Dtype = mx.float32, grouped: bool | None = None,
             shared: Shared | None = None) -> mx.array:
    """``y [N, D]`` = Σ_j weights[:, j] · W2[indices[:, j]] · mid[:, j], accumulated in float32.

    mid: ``[N, k, F]`` (from :func:`moe_gate_up`); w2: down experts ``[E, D, ·]`` in ``fmt``;
    indices, weights: ``[N, k]`` (route weights, already scaled). Few pairs: kernel
    ``moe_down_decode`` (route weights and the sum over k in the kernel); many, or ``grouped``:
    the tiled kernel, then the weighted sum. ``shared`` (decode only): mid is ``[N, k + 1, F]``
    and the shared expert's down projection of slot k is added at weight 1.
    """
    p2 = unpack_weight(w2, fmt, "w2")
    d = _check_down(mid, p2, indices, weights, shared is not None)
    ps = _check_shared(shared, 1, d, p2.k)
    if not _kernel_serves(fmt, p2, out_dtype, indices):
        return moe_down_ops(mid, w2, fmt, indices, weights, out_dtype, shared)
    return _down_kernel(mid, p2, d, indices, weights, out_dtype, grouped, ps)


def _check_down(mid: mx.array, p2: Packed, indices: mx.array, weights: mx.array,
                shared_slot: bool) -> int:
    """D of the down experts ``p2``, checked against mid (with the shared slot if asked),
    indices and weights."""
    k = indices.shape[1] if indices.ndim == 2 else 0
    routed = mid[:, :k] if shared_slot and mid.ndim == 3 else mid
    d, k = _check_experts(p2, "w2", routed, "mid", indices)
    if weights.shape != indices.shape:
        raise KernelInputError(f"weights: expected the shape of indices {tuple(indices.shape)}, "
                               f"got {tuple(weights.shape)}")
    if shared_slot and mid.shape[1] != k + 1:
        raise KernelInputError(f"mid: expected [N, {k + 1}, F] with the shared slot, got "
                               f"{tuple(mid.shape)}")
    return d


def _down_kernel(mid: mx.array, p2: Packed, d: int, indices: mx.array, weights: mx.array,
                 out_dtype: mx.Dtype, grouped: bool | None, ps: Packed | None) -> mx.array:
    """:func:`moe_down` on checked weights (``ps``: the shared down rows, or None)."""
    n, kk, f = mid.shape
    k = indices.shape[1]
    idx = indices.astype(mx.uint32).reshape(-1)
    rw = weights.astype(mx.float32).reshape(-1)
    rows = mid.astype(mx.float32).reshape(n * kk, f)
    if _grouped(grouped, n * k):
        if ps is not None:
            raise KernelInputError("shared: the shared expert folds into the decode kernels only")
        order, eid = _sort_pairs(idx)
        out = matmul_sorted(rows, order, order, eid, p2, None, d, None)
        return mx.sum(rw.reshape(n, k, 1) * out.reshape(n, k, d), axis=1).astype(out_dtype)
    ws = ps or p2
    (y,) = dispatch.run("moe.metal", "moe_down_decode",
                        {"mid": rows, "w2": p2.q, "s2": device_array(p2.s), "idx": idx, "rw": rw,
                         "ws": ws.q, "ss": device_array(ws.s), "sb": device_array(ws.b),
                         "D": d, "F": f, "k": k,
                         "E": p2.q.shape[0]},
                        {"y": ((n, d), out_dtype)},
                        grid=(ceil_div(d, DECODE_ROWS) * 32 * DOWN_SIMDGROUPS, n, 1),
                        threadgroup=(32 * DOWN_SIMDGROUPS, 1, 1),
                        template=[("OutT", out_dtype), *_decode_templates(p2, ps)])
    return y


def gather_qmm_native(x: mx.array, w: QuantWeight, fmt: str, indices: mx.array) -> mx.array:
    """``[N, k, out]`` float32: ``W[indices[n, j]] · x[n]`` for packed experts ``w [E, out, ·]``
    (kernel ``moe_matmul_sorted``, for prefill and any other many-pair product)."""
    p = unpack_weight(w, fmt)
    n_out, k = _check_experts(p, "w", x, "x", indices)
    if not _kernel_serves(fmt, p, x.dtype, indices):
        return gather_qmm_native_ops(x, w, fmt, indices)
    n = x.shape[0]
    order, eid = _sort_pairs(indices.astype(mx.uint32).reshape(-1))
    return matmul_sorted(x, order // k, order, eid, p, None, n_out, None).reshape(n, k, n_out)


# ----------------------------------------------------------------------------- model call sites

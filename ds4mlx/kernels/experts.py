"""The call sites of the expert modules (mlx-lm's ``QuantizedSwitchLinear`` in mode mxfp4,
``GGUFSwitchLinear``): whether the MoE kernels of :mod:`.moe` serve a layer's experts, and the
calls. :func:`moe_experts` (``None`` = run the expert modules; given a ``Route``, one token's
selection made in the kernel), :func:`moe_experts_shared`
(``None`` = the shared expert cannot be folded), :func:`gguf_switch_matmul` (kernel or ops,
whichever :func:`ds4mlx.kernels.dispatch.serves` says).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from . import dispatch, moe
from .dispatch import KERNEL_FORMATS
# the launchers of moe.py's kernels on weights checked once here (without the entry points'
# checks), besides its entry points; DECODE_MAX_PAIRS read as moe's (tests lower it)
from .moe import (QuantWeight, _check_down, _check_ids, _down_kernel, _gate_up_decode,
                  _gate_up_kernel, _gate_up_packed, _kernel_serves, _sort_pairs, matmul_sorted,
                  moe_down, moe_gate_up, switch_matmul_ops, unpack_weight, variant_name)
from .router import Route
from .shared import Shared, shared_folds


def _module_weight(module: Any) -> tuple[QuantWeight, str] | None:
    """(weight, fmt) of an expert projection the kernels can read, else None."""
    type_name = getattr(module, "type_name", None)  # GGUFSwitchLinear
    if type_name is not None:
        return (module.weight, type_name) if type_name.upper() in KERNEL_FORMATS else None
    if getattr(module, "mode", None) == "mxfp4":  # mlx-lm QuantizedSwitchLinear, mode mxfp4
        return (module.weight, module.scales), "MXFP4"
    return None


def moe_experts(x: mx.array, indices: mx.array | None, weights: mx.array | None, w1: Any,
                w3: Any, w2: Any, limit: float | None,
                route: Route | None = None) -> mx.array | None:
    """Routed experts of one layer through the fused kernels: x ``[N, D]``, indices / weights
    ``[N, k]`` -> ``[N, D]`` in x's dtype. Gate and up must share a format; down may differ
    (ds4 q2 files: IQ2_XXS gate/up, Q2_K down). ``None`` (run the expert modules, which ask
    :func:`gguf_switch_matmul` per projection) unless kernels serve all three projections.

    ``route`` instead of indices / weights (one decoded token): the router's selection, made
    inside ``moe_gate_up_decode`` where :meth:`Route.folds` (as :func:`.moe.moe_gate_up_routed`:
    no router launch), else by :meth:`Route.select`; with ``None`` the caller selects.

    A call of several tokens (a batch decode step, a speculative verify) takes the expert-grouped
    tiles, so each chosen expert is read once for all the tokens that chose it; one token's k
    experts are distinct, and it takes the decode kernels."""
    parts = _parts(w1, w3, w2)
    if parts is None:
        return None
    if route is not None:
        one = _decode_one(x, None, None, parts, limit, None, route)
        if one is not None or x.shape[0] == 1:
            return one
        indices, weights = route.select()
    gate, up, down = parts
    grouped = x.shape[0] > 1 or None
    mid = moe_gate_up(x, gate[0], up[0], gate[1], indices, limit, grouped)
    return moe_down(mid, down[0], down[1], indices, weights, out_dtype=x.dtype, grouped=grouped)


def _parts(w1: Any, w3: Any, w2: Any) -> tuple | None:
    """(gate, up, down) as (weight, fmt) where the kernels serve all three, else None."""
    gate, up, down = (_module_weight(m) for m in (w1, w3, w2))
    if gate is None or up is None or down is None or gate[1].upper() != up[1].upper():
        return None
    if not (dispatch.serves(gate[1]) and dispatch.serves(down[1])):
        return None
    return gate, up, down


def moe_experts_shared(x: mx.array, indices: mx.array | None, weights: mx.array | None, w1: Any,
                       w3: Any, w2: Any, limit: float | None, shared: Shared,
                       route: Route | None = None) -> mx.array | None:
    """Routed experts plus the shared expert of one decoded token in the two decode kernels
    (the shared expert one more slot of each, at weight 1): x ``[1, D]`` -> ``[1, D]`` in x's
    dtype. ``route`` instead of indices / weights: the router's selection, made inside
    ``moe_gate_up_decode`` where :meth:`Route.folds` (no router launch), else by
    :meth:`Route.select`. ``None`` where that does not apply (several tokens, a projection or
    format the kernels do not take, other dims): the caller runs the routed and shared
    experts apart."""
    parts = _parts(w1, w3, w2)
    if parts is None or not shared_folds(shared, x.dtype):
        return None
    return _decode_one(x, indices, weights, parts, limit, shared, route)


def _decode_one(x: mx.array, indices: mx.array | None, weights: mx.array | None, parts: tuple,
                limit: float | None, shared: Shared | None, route: Route | None) -> mx.array | None:
    """One token's routed experts (and ``shared``, if given) in the two decode kernels, the
    selection from ``route`` or indices / weights; None where the kernels do not take them."""
    k = route.k if route is not None else indices.shape[-1]
    if (x.shape[0] != 1 or k + (shared is not None) > moe.DECODE_MAX_PAIRS
            or (route is None and indices.ndim != 2)):
        return None
    gate, up, down = parts
    # unpacked and checked once here (the shared expert's parts once per Shared), then the
    # kernels without the entry points' checks; ids a route will make: checked for shape only
    checked = indices if route is None else mx.zeros((1, k), mx.uint32)
    p1, p3, f = _gate_up_packed(x, gate[0], up[0], gate[1], checked)
    p2 = unpack_weight(down[0], down[1], "w2")
    d = p2.q.shape[1]
    ps13 = ps2 = None
    if shared is not None:
        ps13, ps2 = shared.packed
        if (ps13.q.shape[0], ps13.k, ps2.q.shape[0], ps2.k, p2.k) != (2 * f, p1.k, d, f, f):
            return None  # e.g. a shared expert wider than the routed ones
    routed = route is not None and route.logits.shape[-1] == p1.q.shape[0] and route.folds()
    if route is not None and not routed:
        indices, weights = route.select()
        checked = indices
    if not (_kernel_serves(gate[1], p1, x.dtype, checked)
            and _kernel_serves(down[1], p2, x.dtype, checked)):
        return None  # the routed experts' call sites pick their own paths
    kk = k + (shared is not None)
    if routed:
        mid, ids, rw = _gate_up_decode(x, p1, p3, ps13, None, route, limit)
        indices, weights = ids.reshape(1, k), rw.reshape(1, k)
        mid = mid.reshape(1, kk, f)
    else:
        mid = _gate_up_kernel(x, p1, p3, f, indices, limit, False, ps13)
    _check_down(mid, p2, indices, weights, shared is not None)
    return _down_kernel(mid, p2, d, indices, weights, x.dtype, False, ps2)


def gguf_switch_matmul(x: mx.array, weight: mx.array, indices: mx.array, *, fmt: str,
                       input_dims: int, output_dims: int, sorted_indices: bool = False) -> mx.array:
    """Call site of ``GGUFSwitchLinear`` (switch-linear protocol): x ``[..., M, in]``, indices
    broadcast against x's batch dims -> ``[..., M, out]`` in x's dtype (kernel or ops path)."""
    p = unpack_weight(weight, fmt, "weight") if dispatch.serves(fmt) else None
    if p is None or not dispatch.first_use_ok(variant_name(p), x.dtype, n_experts=p.q.shape[0]):
        return switch_matmul_ops(x, weight, fmt, indices, sorted_indices).astype(x.dtype)
    _check_ids(indices, p.q.shape[0])
    batch = tuple(mx.broadcast_shapes(tuple(x.shape[:-2]), tuple(indices.shape)))
    m = x.shape[-2]
    rows = mx.broadcast_to(x, (*batch, m, input_dims)).reshape(-1, input_dims)
    eid = mx.repeat(mx.broadcast_to(indices, batch).reshape(-1).astype(mx.uint32), m)
    order, eid_sorted = _sort_pairs(eid)
    out = matmul_sorted(rows, order, order, eid_sorted, p, None, output_dims, None)
    return out.reshape(*batch, m, output_dims).astype(x.dtype)

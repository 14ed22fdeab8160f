"""MoE router selection kernel (``metal/router.metal``) beside its MLX-ops twin.

:func:`router_topk` turns router logits into (expert ids, route weights): scores
sqrt(softplus(logit)), top-k of the scores plus the selection bias, weights from the unbiased
scores, renormalised (``norm_topk_prob``) and scaled. Whether the kernel serves a call is
:func:`ds4mlx.kernels.serves` of the variant ``ROUTER``. A :class:`Route` hands the selection
to the kernel that needs the ids (one decoded token: ``moe_gate_up_decode`` picks them itself,
kernels/moe.py), the same selection code (``metal/route.h``).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from . import dispatch
from .dispatch import ROUTER, KernelInputError, device_array
from .source import ROUTE_MAX_K, ROUTER_THREADS


def router_topk_ops(logits: mx.array, bias: mx.array, k: int, renormalize: bool,
                    scale: float) -> tuple[mx.array, mx.array]:
    """Ops twin of :func:`router_topk` (the model's gate before the kernel)."""
    scores = mx.sqrt(mx.logaddexp(logits.astype(mx.float32), 0.0))
    biased = scores + bias.astype(mx.float32)
    idx = mx.argpartition(-biased, kth=k - 1, axis=-1)[:, :k].astype(mx.uint32)
    w = mx.take_along_axis(scores, idx, axis=-1)
    if renormalize:
        w = w / mx.sum(w, axis=-1, keepdims=True)
    return idx, w * scale


def router_topk(logits: mx.array, bias: mx.array, k: int, renormalize: bool,
                scale: float) -> tuple[mx.array, mx.array]:
    """(idx ``[N, k]`` uint32, weights ``[N, k]`` float32) from logits ``[N, E]`` and the
    selection bias ``[E]``. The kernel lists experts by descending biased score (ties: lowest
    id); the twin's order is argpartition's. The set and each expert's weight agree."""
    if logits.ndim != 2 or tuple(bias.shape) != (logits.shape[1],):
        raise KernelInputError(f"router_topk: logits {tuple(logits.shape)} and bias "
                               f"{tuple(bias.shape)} must be [N, E] and [E]")
    n, e = logits.shape
    if not 1 <= k <= e:
        raise KernelInputError(f"router_topk: k={k} must be in 1..{e}")
    if not (dispatch.serves(ROUTER) and dispatch.first_use_ok(
            ROUTER, mx.float32, n_experts=e, experts_per_token=k, renormalize=int(renormalize))):
        return router_topk_ops(logits, bias, k, renormalize, scale)
    idx, w = dispatch.run("router.metal", "router_topk",
                          {"logits": device_array(logits.astype(mx.float32)),
                           "bias": device_array(bias.astype(mx.float32)), "scale": float(scale)},
                          {"idx": ((n, k), mx.uint32), "w": ((n, k), mx.float32)},
                          grid=(ROUTER_THREADS, n, 1), threadgroup=(ROUTER_THREADS, 1, 1),
                          template=[("E", e), ("K", k), ("RENORM", bool(renormalize))])
    return idx, w


@dataclass(frozen=True)
class Route:
    """A token's router selection not yet made: the gate's logits ``[N, E]`` (float32), the
    selection bias ``[E]`` and the top-k rule. The decode MoE kernels make it themselves
    (:meth:`folds`), else :meth:`select` (kernel ``router_topk`` or its twin) does."""

    logits: mx.array
    bias: mx.array
    k: int
    renormalize: bool
    scale: float

    def select(self) -> tuple[mx.array, mx.array]:
        return router_topk(self.logits, self.bias, self.k, self.renormalize, self.scale)

    def ops(self) -> tuple[mx.array, mx.array]:
        return router_topk_ops(self.logits, self.bias, self.k, self.renormalize, self.scale)

    def folds(self) -> bool:
        """Whether a kernel may make this selection: the router variant serves and passed its
        first-use check at these dims (which covers the selection inside the MoE kernel)."""
        e = self.logits.shape[-1]
        return (self.logits.ndim == 2 and tuple(self.bias.shape) == (e,)
                and 1 <= self.k <= min(e, ROUTE_MAX_K) and dispatch.serves(ROUTER)
                and dispatch.first_use_ok(ROUTER, mx.float32, n_experts=e,
                                          experts_per_token=self.k,
                                          renormalize=int(self.renormalize)))

"""MoE router selection kernel (``metal/router.metal``) beside its MLX-ops twin.

:func:`router_topk` turns router logits into (expert ids, route weights): scores
sqrt(softplus(logit)), top-k of the scores plus the selection bias, weights from the unbiased
scores, renormalised (``norm_topk_prob``) and scaled. Whether the kernel serves a call is
:func:`ds4mlx.kernels.serves` of the variant ``ROUTER``.
"""

from __future__ import annotations

import mlx.core as mx

from . import dispatch
from .dispatch import ROUTER, KernelInputError
from .source import ROUTER_THREADS


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
                          {"logits": logits.astype(mx.float32),
                           "bias": bias.astype(mx.float32), "scale": float(scale)},
                          {"idx": ((n, k), mx.uint32), "w": ((n, k), mx.float32)},
                          grid=(ROUTER_THREADS, n, 1), threadgroup=(ROUTER_THREADS, 1, 1),
                          template=[("E", e), ("K", k), ("RENORM", bool(renormalize))])
    return idx, w

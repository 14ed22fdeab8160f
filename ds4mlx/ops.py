"""Element-wise pieces shared by the model and the kernels' ops twins (below both).

Clamped SwiGLU of the experts, and the manifold-constrained hyper-connections (``hc_mult``
residual streams per token): HC pre collapses the streams into one sublayer input and derives the mixing weights;
HC post expands the sublayer output back; HC head collapses before the final norm.
Everything here is float32: 20 Sinkhorn rounds with eps 1e-6 do not survive bf16.
The steps are compiled: uncompiled, one HC pre launches ~140 tiny kernels, 86 times a token.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


@mx.compile
def clamped_swiglu(gate: mx.array, up: mx.array, limit: float) -> mx.array:
    """SiLU(min(g, limit)) · clip(u, ±limit), in float32 (routed and shared experts alike)."""
    gate = gate.astype(mx.float32)
    up = up.astype(mx.float32)
    if limit:
        gate = mx.minimum(gate, limit)
        up = mx.clip(up, -limit, limit)
    return nn.silu(gate) * up


def _mixes(h: mx.array, fn: mx.array, norm_eps: float) -> mx.array:
    """Unweighted RMSNorm of the flattened streams, then the mixing projection."""
    flat = h.reshape(*h.shape[:-2], -1).astype(mx.float32)
    inv = mx.rsqrt(mx.mean(mx.square(flat), axis=-1, keepdims=True) + norm_eps)
    return (flat @ fn.astype(mx.float32).T) * inv


def sinkhorn(logits: mx.array, iters: int, eps: float) -> mx.array:
    """Doubly-stochastic projection of [..., M, M] logits.

    The row softmax is the first row step; every round ends on a column normalisation.
    """
    c = mx.softmax(logits, axis=-1, precise=True) + eps
    c = c / (mx.sum(c, axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (mx.sum(c, axis=-1, keepdims=True) + eps)
        c = c / (mx.sum(c, axis=-2, keepdims=True) + eps)
    return c


@mx.compile
def hc_pre(
    h: mx.array,
    fn: mx.array,
    base: mx.array,
    scale: mx.array,
    *,
    iters: int,
    eps: float,
    norm_eps: float,
) -> tuple[mx.array, mx.array, mx.array]:
    """Collapse streams ``h`` [..., M, D] → (x [..., D] float32, post [..., M], comb [..., M, M])."""
    m = h.shape[-2]
    mixes = _mixes(h, fn, norm_eps)
    base = base.astype(mx.float32)
    scale = scale.astype(mx.float32)
    pre = mx.sigmoid(mixes[..., :m] * scale[0] + base[:m]) + eps
    post = 2.0 * mx.sigmoid(mixes[..., m : 2 * m] * scale[1] + base[m : 2 * m])
    comb_logits = mixes[..., 2 * m :] * scale[2] + base[2 * m :]
    comb = sinkhorn(comb_logits.reshape(*comb_logits.shape[:-1], m, m), iters, eps)
    x = mx.sum(pre[..., None] * h.astype(mx.float32), axis=-2)
    return x, post, comb


@mx.compile
def hc_post(y: mx.array, h: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """h_new[k] = post_k · y + Σ_i comb[i, k] · h[i]  (comb transposed: it is not symmetric).
    The M-term sum is written element-wise (an M x M matmul would be a launch of its own) and
    y is cast after the broadcast view, so the whole step compiles into one kernel."""
    m = h.shape[-2]
    hf = h.astype(mx.float32)
    out = post[..., None] * y[..., None, :].astype(mx.float32)
    mixed = comb[..., 0, :, None] * hf[..., 0:1, :]
    for i in range(1, m):
        mixed = mixed + comb[..., i, :, None] * hf[..., i:i + 1, :]
    return out + mixed


@mx.compile
def hc_head(
    h: mx.array, fn: mx.array, base: mx.array, scale: mx.array, *, eps: float, norm_eps: float
) -> mx.array:
    """Final weighted collapse of the streams (no post, no Sinkhorn) → [..., D] float32."""
    mixes = _mixes(h, fn, norm_eps)
    pre = mx.sigmoid(mixes * scale.astype(mx.float32)[0] + base.astype(mx.float32)) + eps
    return mx.sum(pre[..., None] * h.astype(mx.float32), axis=-2)

"""Element-wise pieces shared by the model and the kernels' ops twins (below both).

The CPU paths of two MLX calls (RMSNorm and the MX-quantized matmul, see their docstrings),
clamped SwiGLU of the experts, and the manifold-constrained hyper-connections (``hc_mult``
residual streams per token): HC pre collapses the streams into one sublayer input and derives the mixing weights;
HC post expands the sublayer output back; HC head collapses before the final norm.
Everything here is float32: 20 Sinkhorn rounds with eps 1e-6 do not survive bf16.
The steps are compiled: uncompiled, one HC pre launches ~140 tiny kernels, 86 times a token.
On the CPU the Sinkhorn rounds run on the host (see :func:`sinkhorn_host`; compiled where
:func:`ds4mlx.kernels.hyper.host_sinkhorn` finds a C compiler).
"""

from __future__ import annotations

import functools
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np


# On the CPU, MLX's mxfp8 matmul decodes every E4M3 code per output row: from this many rows on,
# dequantizing the weight once (exact: code times a power of two) and one float32 matmul is faster
# (256 rows x 256x256: 20 ms against 57 ms; at 1 row the quantized matmul wins, 0.29 against 0.6).
_DEQUANTIZE_ROWS = {"mxfp8": 4}


def on_cpu() -> bool:
    """Whether MLX runs on the CPU, where the paths below differ from the GPU's (the decode
    profile stands in for it to count the GPU's graph on Linux)."""
    return mx.default_device() == mx.cpu


# On the CPU, MLX's mxfp8 matmul decodes every E4M3 code in scalar code: at one row it takes ~2.6x
# a float32 matmul of the same weight. A projection holds a float32 copy of its mxfp8 weight
# instead (exact: a code times a power of two), made on first use, while the copies of the
# process stay within this many bytes (past it: the quantized kernel, as without copies). The
# routed experts never get one (they are the bulk of a model, and mxfp4's kernel is fast).
CPU_COPY_BUDGET = 1 << 30
_copy_bytes = 0


class CpuCopy:
    """The float32 copy of one projection's mxfp8 weight on the CPU (see ``CPU_COPY_BUDGET``),
    remade when the weight is replaced; ``get`` returns None where no copy serves."""

    def __init__(self) -> None:
        self._src: mx.array | None = None
        self._dense: mx.array | None = None
        self._bytes = 0

    def get(self, w: mx.array, scales: mx.array, biases: mx.array | None, *, group_size: int,
            bits: int, mode: str) -> mx.array | None:
        if mode != "mxfp8" or not on_cpu():
            return None
        if self._src is w:
            return self._dense
        global _copy_bytes
        self._release()
        self._src = w  # also when over budget: not asked again for this weight
        nbytes = w.size * (32 // bits) * 4
        if _copy_bytes + nbytes <= CPU_COPY_BUDGET:
            self._dense = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits,
                                        mode=mode, dtype=mx.float32)
            mx.eval(self._dense)
            self._bytes = nbytes
            _copy_bytes += nbytes
        return self._dense

    def _release(self) -> None:
        global _copy_bytes
        _copy_bytes -= self._bytes
        self._src = self._dense = None
        self._bytes = 0

    def __del__(self) -> None:
        self._release()


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array | None = None, *,
                     group_size: int, bits: int, mode: str, dense: mx.array | None = None) -> mx.array:
    """``x @ dequantize(w).T`` (``mx.quantized_matmul`` with ``transpose=True``), choosing on the
    CPU between the quantized kernel and dequantize-then-matmul by the number of rows of ``x``;
    ``dense``: the weight's rows already dequantized (a :class:`CpuCopy`), used instead."""
    if dense is not None:
        return (x.astype(mx.float32) @ dense.T).astype(x.dtype)
    rows = _DEQUANTIZE_ROWS.get(mode)
    if rows is not None and x.size >= rows * x.shape[-1] and on_cpu():
        wd = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode,
                           dtype=mx.float32)
        return (x.astype(mx.float32) @ wd.T).astype(x.dtype)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits,
                               mode=mode)


def _one_row(x: mx.array) -> bool:
    # a decode step's shapes, where a product of one row replaces an element-wise op and a sum
    return x.size == x.shape[-1] and on_cpu()


def mean_square(x: mx.array) -> mx.array:
    """``mean(x², axis=-1, keepdims=True)`` of float32 ``x``. One row of a power-of-two width is
    a dot product on the CPU: one primitive, not a square and a sum, and the same sequential
    sum (MLX's CPU sum and the reference BLAS both add term by term), times the exact 1/d."""
    d = x.shape[-1]
    if _one_row(x) and d & (d - 1) == 0:
        row = x.reshape(1, d)
        return (row @ row.T).reshape(*x.shape[:-1], 1) * (1.0 / d)
    return mx.mean(mx.square(x), axis=-1, keepdims=True)


@mx.compile
def _rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    # the formula of mx.fast.rms_norm's own CPU fallback, in one compiled graph
    xf = x.astype(mx.float32)
    xf = xf * mx.rsqrt(mean_square(xf) + eps)
    return xf.astype(x.dtype) * weight


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameter): on the CPU ``mx.fast.rms_norm`` falls back to 11 separate
    primitives per call; this compiled twin of the same formula launches 3."""

    def __call__(self, x: mx.array) -> mx.array:
        if on_cpu():
            return _rms_norm(x, self.weight, self.eps)
        return mx.fast.rms_norm(x, self.weight, self.eps)


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
    inv = mx.rsqrt(mean_square(flat) + norm_eps)
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


@functools.cache
def _scale_index(m: int) -> mx.array:
    """Which of the three scales (pre, post, comb) multiplies each of the 2M + M² mixes."""
    return mx.array([0] * m + [1] * m + [2] * (m * m), dtype=mx.uint32)


def sinkhorn_host(c: np.ndarray, iters: int, eps: float) -> np.ndarray:
    """:func:`sinkhorn` after its softmax, in numpy float32 on the host: the same operations in
    the same order, bit for bit (sums of M terms in index order, correctly rounded division).
    On the CPU, MLX runs each of the 2·iters reductions and divisions of a few M×M matrices as
    its own primitive (80 per HC pre, 40% of the tiny model's decode-step graph); numpy does a
    round in a few microseconds. ``c``: row-softmaxed logits [..., M, M], overwritten."""
    e, total = np.float32(eps), np.add.reduce  # (ndarray.sum adds a Python frame per call)
    c += e
    c /= total(c, axis=-2, keepdims=True) + e
    for _ in range(iters - 1):
        c /= total(c, axis=-1, keepdims=True) + e
        c /= total(c, axis=-2, keepdims=True) + e
    return c


def _pre_parts(h: mx.array, fn: mx.array, base: mx.array, scale: mx.array, eps: float,
               norm_eps: float) -> tuple[mx.array, mx.array, mx.array]:
    """HC pre up to the comb logits: (x, post, comb logits [..., M, M])."""
    m = h.shape[-2]
    # the three scales and the base in one element-wise step over all mixes (not one per part)
    z = _mixes(h, fn, norm_eps) * scale.astype(mx.float32)[_scale_index(m)] + base.astype(mx.float32)
    pre = mx.sigmoid(z[..., :m]) + eps
    post = 2.0 * mx.sigmoid(z[..., m : 2 * m])
    hf = h.astype(mx.float32)
    if _one_row(pre):  # one token: [1, M] @ [M, D], the same sum over i = 0.. (see hc_post)
        x = (pre.reshape(1, m) @ hf.reshape(m, -1)).reshape(*h.shape[:-2], h.shape[-1])
    else:
        x = mx.sum(pre[..., None] * hf, axis=-2)
    return x, post, z[..., 2 * m :].reshape(*z.shape[:-1], m, m)


@mx.compile
def _hc_pre(h, fn, base, scale, *, iters: int, eps: float, norm_eps: float):
    x, post, logits = _pre_parts(h, fn, base, scale, eps, norm_eps)
    return x, post, sinkhorn(logits, iters, eps)


@mx.compile
def _hc_pre_softmax(h, fn, base, scale, *, eps: float, norm_eps: float):
    # the CPU's part of HC pre: everything but the Sinkhorn rounds after the row softmax
    x, post, logits = _pre_parts(h, fn, base, scale, eps, norm_eps)
    return x, post, mx.softmax(logits, axis=-1, precise=True)


def hc_pre(
    h: mx.array,
    fn: mx.array,
    base: mx.array,
    scale: mx.array,
    *,
    iters: int,
    eps: float,
    norm_eps: float,
    host: Callable[[np.ndarray, int, float], np.ndarray] | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """Collapse streams ``h`` [..., M, D] → (x [..., D] float32, post [..., M], comb [..., M, M]).
    On the CPU the Sinkhorn rounds run on the host (``host``, same arguments and bits as
    :func:`sinkhorn_host`, which serves by default): this evaluates the graph up to the comb
    logits."""
    if not on_cpu():
        return _hc_pre(h, fn, base, scale, iters=iters, eps=eps, norm_eps=norm_eps)
    x, post, c = _hc_pre_softmax(h, fn, base, scale, eps=eps, norm_eps=norm_eps)
    return x, post, mx.array((host or sinkhorn_host)(np.array(c), iters, eps))


@mx.compile
def hc_post(y: mx.array, h: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """h_new[k] = post_k · y + Σ_i comb[i, k] · h[i]  (comb transposed: it is not symmetric).
    The M-term sum is one product over [..., i, k, D] and one reduction over i (in order i = 0..:
    the sums of a term-by-term chain, bitwise), not M slices of comb and h: 8 primitives, not 19.
    One token on the CPU: the sum is the product comb^T @ h (the same sums: one primitive)."""
    hf = h.astype(mx.float32)
    m = h.shape[-2]
    if _one_row(post):
        mixed = (comb.reshape(m, m).T @ hf.reshape(m, -1)).reshape(hf.shape)
    else:
        mixed = mx.sum(comb[..., :, :, None] * hf[..., :, None, :], axis=-3)
    return post[..., None] * y[..., None, :].astype(mx.float32) + mixed


@mx.compile
def hc_head(
    h: mx.array, fn: mx.array, base: mx.array, scale: mx.array, *, eps: float, norm_eps: float
) -> mx.array:
    """Final weighted collapse of the streams (no post, no Sinkhorn) → [..., D] float32."""
    mixes = _mixes(h, fn, norm_eps)
    pre = mx.sigmoid(mixes * scale.astype(mx.float32)[0] + base.astype(mx.float32)) + eps
    return mx.sum(pre[..., None] * h.astype(mx.float32), axis=-2)

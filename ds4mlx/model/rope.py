"""THE RoPE rule of DeepSeek V4.

- Only the last ``rope_dims`` features of a vector rotate (the first ones carry no position).
- Pairs are interleaved: (2k, 2k+1).
- Sliding-window layers (ratio 0, and MTP) use base ``rope_theta`` without YaRN; compressed
  layers (ratio 4/128: q, kv, attention output, compressed rows, indexer) use
  ``compress_rope_theta`` with YaRN frequency interpolation and no magnitude factor.
- The attention output is rotated back with the conjugate (inverse) rotation.
Angles are ``position · frequency`` in float32, as in the official and HF graphs.
The rotation is compiled into one kernel per shape (it runs several times per layer).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..config import ModelConfig
from ..kernels import attention as _fused
from ..kernels import check as _check
from .qat import kv_fp8


def rope_frequencies(
    dims: int, base: float, yarn: dict | None = None
) -> mx.array:
    """Inverse frequencies f_k (k < dims/2), with YaRN interpolation when ``yarn`` is given."""
    k = mx.arange(0, dims, 2, dtype=mx.float32)
    freqs = 1.0 / (base ** (k / dims))
    if not yarn:
        return freqs
    factor = float(yarn["factor"])
    orig = float(yarn["original_max_position_embeddings"])
    beta_fast = float(yarn.get("beta_fast", 32))
    beta_slow = float(yarn.get("beta_slow", 1))

    def correction_dim(rotations: float) -> float:
        return dims * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(correction_dim(beta_fast)), 0)
    hi = min(math.ceil(correction_dim(beta_slow)), dims - 1)
    if lo == hi:
        hi += 0.001
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - lo) / (hi - lo), 0.0, 1.0)
    keep = 1.0 - ramp  # 1: keep the original frequency, 0: fully interpolated
    return freqs / factor * (1.0 - keep) + freqs * keep


def layer_frequencies(config: ModelConfig, ratio: int) -> mx.array:
    if ratio == 0:
        return rope_frequencies(config.qk_rope_head_dim, config.rope_theta)
    return rope_frequencies(config.qk_rope_head_dim, config.compress_rope_theta, config.rope_scaling)


# (id(freqs), dim) -> (freqs, per-feature frequency, per-feature sine sign); freqs is kept so its
# id is not reused while the entry lives (one entry per layer's frequencies and row width)
_TABLES: dict[tuple[int, int], tuple[mx.array, mx.array, mx.array]] = {}


def rope_tables(freqs: mx.array, dim: int) -> tuple[mx.array, mx.array]:
    """Per feature of a [dim] row: its frequency (f_k on both features of rotated pair k, 0 on
    the features that do not rotate: cos 0 = 1, sin 0 = 0) and the sign its pair's sine takes
    (built once per layer's frequencies and row width)."""
    entry = _TABLES.get((id(freqs), dim))
    if entry is None or entry[0] is not freqs:
        rd = 2 * freqs.shape[0]
        still = mx.zeros((dim - rd,), mx.float32)
        per_feature = mx.concatenate([still, mx.repeat(freqs.astype(mx.float32), 2)])
        sign = mx.concatenate([still, mx.tile(mx.array([-1.0, 1.0]), rd // 2)])
        mx.eval(per_feature, sign)
        entry = _TABLES[(id(freqs), dim)] = (freqs, per_feature, sign)
    return entry[1], entry[2]


@mx.compile
def rotate(x: mx.array, positions: mx.array, per_feature: mx.array, sign: mx.array,
           inverse: bool = False) -> mx.array:
    """:func:`apply_rope` with the tables of :func:`rope_tables` (for callers that compile it
    into a larger graph): x·cos + swap(x)·(∓sin), swap exchanging each pair's two features."""
    swapped = x.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
    angles = positions[..., None].astype(mx.float32) * per_feature
    sin = mx.sin(angles) * (-sign if inverse else sign)
    return (x.astype(mx.float32) * mx.cos(angles) + swapped.astype(mx.float32) * sin).astype(x.dtype)


def apply_rope(
    x: mx.array, positions: mx.array, freqs: mx.array, *, inverse: bool = False
) -> mx.array:
    """Rotate the last ``2·len(freqs)`` features of ``x`` [..., D].

    ``positions`` holds absolute positions broadcastable to ``x.shape[:-1]`` (e.g. [S] for
    [B, S, D], [S, 1] for [B, S, H, D]). Math in float32, result in ``x.dtype``.
    Written over the whole row (:func:`rotate`), so a call is one swap and one fused kernel
    rather than slices, a stack and a concatenation (the same products and sums: bitwise equal).
    """
    return rotate(x, positions, *rope_tables(freqs, x.shape[-1]), inverse)


def rows_ops(x: mx.array, pos, freqs: mx.array, *, norm: int, weight: mx.array | None,
             eps: float, fp8: bool, inverse: bool, out_dtype: mx.Dtype,
             rope_dims: int) -> mx.array:
    """The model's ops for the steps of the fused row kernel (``kernels.attention.rope_rows``,
    same arguments): RMS (plain in ``out_dtype``, or ``mx.fast.rms_norm`` with ``weight``),
    RoPE at host positions ``pos``, then the QAT FP8 round trip of the non-RoPE features. The
    kernel's first-use check compares with this (installed below)."""
    positions = mx.array(np.asarray(pos))
    if norm == _fused.NORM_PLAIN:
        x = x.astype(out_dtype)
        x = x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps)
    elif norm == _fused.NORM_WEIGHTED:
        x = mx.fast.rms_norm(x, weight, eps)
    x = apply_rope(x, positions, freqs, inverse=inverse)
    if fp8:
        x = kv_fp8(x, rope_dims)
    return x.astype(out_dtype)


_check.install_twin(_fused.ROPE_ROWS, rows_ops)


def host_positions(pos: np.ndarray) -> mx.array:
    """Host positions [B, S] as an int32 array: one sequence's as ``arange`` [S] (the graph a
    one-sequence call has always had), a batch's as [B, S]."""
    if pos.shape[0] == 1:
        return mx.arange(int(pos[0, 0]), int(pos[0, 0]) + pos.shape[1])
    return mx.array(pos.astype(np.int32))

"""Quantisation-aware rounding that is part of the official V4 graph.

- KV rows (raw and compressed): the non-RoPE dims take an FP8 e4m3 round trip in blocks of
  64 with power-of-two scales.
- Indexer q and keys: a Hadamard rotation, then an FP4 e2m1 round trip in blocks of 32 with
  power-of-two scales.
Both are switched by the model's ``qat_rounding`` flag; references such as transformers omit
them. The functions are compiled: each is dozens of element-wise ops on a few rows.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx
import numpy as np

from ..quant.codecs import E2M1_MAX, E4M3_MAX, FP8_ACT_BLOCK, MX_GROUP, e2m1_round_mx


def pow2_ceil(x: mx.array) -> mx.array:
    """2^ceil(log2(x)) for positive normal float32 x, exactly (from the bits, no log)."""
    bits = x.astype(mx.float32).view(mx.uint32)
    exp = (bits >> 23) & 0xFF
    exp = exp + ((bits & 0x7FFFFF) != 0).astype(mx.uint32)
    return (exp << 23).view(mx.float32)


def _block_scales(x: mx.array, block: int, qmax: float, floor: float) -> tuple[mx.array, mx.array]:
    xb = x.astype(mx.float32).reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = mx.maximum(mx.max(mx.abs(xb), axis=-1, keepdims=True), floor)
    return xb, pow2_ceil(amax / qmax)


@mx.compile
def fp8_roundtrip(x: mx.array, block: int = FP8_ACT_BLOCK) -> mx.array:
    """e4m3 round trip (round to nearest even, saturating at ±448) per block of ``block``."""
    xb, scale = _block_scales(x, block, E4M3_MAX, 1e-4)
    q = mx.clip(xb / scale, -E4M3_MAX, E4M3_MAX)
    q = mx.from_fp8(mx.to_fp8(q), dtype=mx.float32)
    return (q * scale).reshape(x.shape).astype(x.dtype)


@mx.compile
def fp4_roundtrip(x: mx.array, block: int = MX_GROUP) -> mx.array:
    """e2m1 round trip (ties to even) per block of ``block`` with scale 2^ceil(log2(amax/6))."""
    xb, scale = _block_scales(x, block, E2M1_MAX, E2M1_MAX * 2.0**-126)
    q = e2m1_round_mx(mx.clip(xb / scale, -E2M1_MAX, E2M1_MAX))
    return (q * scale).reshape(x.shape).astype(x.dtype)


def hadamard_matrix(n: int) -> mx.array:
    """Orthonormal Sylvester Hadamard matrix of order n (a power of two)."""
    if n & (n - 1):
        raise ValueError(f"Hadamard order {n} is not a power of two")
    h = mx.array([[1.0]])
    while h.shape[0] < n:
        h = mx.concatenate([mx.concatenate([h, h], 1), mx.concatenate([h, -h], 1)], 0)
    return h / math.sqrt(n)


@functools.cache
def _second_of_pair() -> mx.array:
    # [2, 1]: which element of a butterfly pair is the second (numpy-built: a trace constant)
    return mx.array(np.array([[False], [True]]))


@mx.compile
def hadamard(x: mx.array) -> mx.array:
    """``x @ hadamard_matrix(n)`` over the last axis (n a power of two) in float32, as the fast
    Walsh-Hadamard transform: log2(n) butterfly stages (a, b) -> (a + b, a - b) at strides
    1, 2, .., n/2, then the scale 1/sqrt(n), as the official graph's transform and the index_q
    kernel do (bit for bit the kernel's sums; a matmul would cost n multiply-adds per feature)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard order {n} is not a power of two")
    lead = x.shape[:-1]
    x = x.astype(mx.float32)
    st = 1
    while st < n:
        v = x.reshape(*lead, n // (2 * st), 2, st)
        partner = v[..., ::-1, :]
        x = mx.where(_second_of_pair(), partner - v, v + partner).reshape(*lead, n)
        st *= 2
    return x * (np.float32(1.0) / np.sqrt(np.float32(n)))


def hadamard_fp4(x: mx.array) -> mx.array:
    """The indexer's rounding: Hadamard rotation of the whole last axis, then FP4 round trip."""
    return fp4_roundtrip(hadamard(x)).astype(x.dtype)


@mx.compile
def kv_fp8(kv: mx.array, rope_dims: int) -> mx.array:
    """FP8 round trip of the non-RoPE dims of KV rows; the RoPE dims stay untouched."""
    nope = kv.shape[-1] - rope_dims
    if nope % FP8_ACT_BLOCK:
        return mx.concatenate([fp8_roundtrip(kv[..., :nope]), kv[..., nope:]], axis=-1)
    # whole blocks: round every block (each has its own scale) and keep the RoPE ones as they
    # were, which spares slicing the row and joining it again
    xb, scale = _block_scales(kv, FP8_ACT_BLOCK, E4M3_MAX, 1e-4)
    q = mx.from_fp8(mx.to_fp8(mx.clip(xb / scale, -E4M3_MAX, E4M3_MAX)), dtype=mx.float32)
    return mx.where(_rope_blocks(xb.shape[-2], nope // FP8_ACT_BLOCK), xb,
                    q * scale).reshape(kv.shape).astype(kv.dtype)


@functools.cache
def _rope_blocks(blocks: int, nope_blocks: int) -> mx.array:
    """[blocks, 1]: which blocks of a row hold RoPE dims (built from numpy: a constant, also
    when first asked for inside a compiled trace)."""
    return mx.array((np.arange(blocks) >= nope_blocks)[:, None])

"""GGUF MXFP4 (type 39): 32 weights in 17 bytes, OCP microscaling FP4.

Layout of one block::

    byte 0       e    E8M0 scale exponent
    bytes 1..16  qs   32 × 4-bit E2M1 codes: element j (j < 16) is the low nibble of qs[j],
                      element j + 16 the high nibble (halves, not interleaved pairs)

Value ``x = e2m1(code) · 2^(e − 127)``. ggml writes it as doubled code values (:data:`KVALUES`)
times a "half" scale ``2^(e − 128)``, built bit by bit so that ``e ∈ {0, 1}`` give float32
subnormals; we do the same, which is exact for every byte (``e = 255`` is the finite 2^127,
where OCP and MLX read NaN).

MLX ``mode="mxfp4"`` (group 32, uint8 E8M0 scales) holds the same codes and scale byte; only the
nibble order differs (MLX and the official checkpoint pack pairs: low nibble = element 2j).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..codecs import E2M1_TABLE, e2m1_encode
from .common import as_blocks, flat_values, np_blocks, np_importance, np_out

NAME = "MXFP4"
GGML_TYPE = int(GGMLQuantizationType.MXFP4)
BLOCK_SIZE, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.MXFP4]  # weights, bytes per block

# E2M1 code -> twice its value (code 8 is −0, stored as +0 like ggml)
KVALUES = (2 * E2M1_TABLE + 0.0).astype(np.float32)

_KVALUES_MX = mx.array(KVALUES)


def half_scale(e: mx.array) -> mx.array:
    """E8M0 byte -> float32 ``2^(e − 128)`` (bit-built; e = 0, 1 are subnormal)."""
    e = e.astype(mx.uint32)
    sub = mx.left_shift(mx.array(0x00200000, dtype=mx.uint32), e)
    norm = mx.left_shift(e - 1, 23)
    return mx.view(mx.where(e < 2, sub, norm), mx.float32)


def dequantize(blocks: mx.array) -> mx.array:
    b = as_blocks(blocks, BLOCK_BYTES, NAME)
    d = half_scale(b[..., 0:1])  # [..., n, 1]
    qs = b[..., None, 1:17]  # [..., n, 1, 16]
    codes = mx.bitwise_and(mx.right_shift(qs, mx.array([0, 4], dtype=mx.uint8).reshape(2, 1)), 15)
    values = mx.take(_KVALUES_MX, codes.reshape(*b.shape[:-1], 32).astype(mx.uint32), axis=0)
    return flat_values(d * values)


def codes_from_blocks(blocks: mx.array) -> tuple[mx.array, mx.array]:
    """Bytes -> ``(codes uint8 [..., n, 32], e uint8 [..., n])`` in element order."""
    b = as_blocks(blocks, BLOCK_BYTES, NAME)
    qs = b[..., 1:17]
    codes = mx.concatenate([mx.bitwise_and(qs, 15), mx.right_shift(qs, 4)], axis=-1)
    return codes, b[..., 0]


def to_mlx_mxfp4(blocks: mx.array) -> tuple[mx.array, mx.array]:
    """MXFP4 bytes ``[..., n*17]`` -> MLX mxfp4 ``(w uint32 [..., n*4], scales uint8 [..., n])``.

    Exact (same codes, same scale byte), except blocks with ``e = 255``, which MLX reads as NaN.
    """
    codes, e = codes_from_blocks(blocks)
    pairs = codes.reshape(*codes.shape[:-1], 16, 2)
    packed = mx.bitwise_or(pairs[..., 0], mx.left_shift(pairs[..., 1], 4))
    w = mx.view(packed, mx.uint32).reshape(*codes.shape[:-2], -1)
    return w, e


def from_pairs(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Exact repack of pair-packed FP4 (official checkpoint / MLX: low nibble = element 2j)
    ``uint8 [..., n/2]`` with E8M0 ``scales uint8 [..., n/32]`` -> GGUF MXFP4 bytes."""
    packed = np.asarray(packed, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.uint8)
    if packed.shape[-1] % 16 or scales.shape[-1] * 16 != packed.shape[-1]:
        raise ValueError(
            f"MXFP4: {packed.shape[-1]} packed bytes per row do not match {scales.shape[-1]} scales"
        )
    lead = packed.shape[:-1]
    pb = packed.reshape(-1, 16)
    # packed byte i holds elements 2i (low) and 2i+1; GGUF byte j holds elements j and j+16:
    # so GGUF byte 2i = low nibbles of bytes i and 8+i, byte 2i+1 = their high nibbles
    a, b = pb[:, :8], pb[:, 8:]
    out = np.empty((pb.shape[0], BLOCK_BYTES), dtype=np.uint8)
    out[:, 0] = scales.reshape(-1)
    np.bitwise_or(a & 15, b << 4, out=out[:, 1::2])
    np.bitwise_or(a >> 4, b & 0xF0, out=out[:, 2::2])
    return out.reshape(*lead, -1)


def _encode(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest E2M1 code of each value (``codecs.e2m1_encode``) and the coded value."""
    codes = e2m1_encode(v)
    return codes, E2M1_TABLE[codes]


def quantize(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """float32 ``[..., n]`` (n a multiple of 32) -> MXFP4 bytes.

    Each block tries the two exponents around its largest magnitude (``amax/2^(e−127)`` in
    [4, 8), which may saturate at 6, or in [2, 4)) and keeps the one with the lower (weighted)
    squared error. ``weights``: optional importance, broadcast to ``x``.
    """
    xb, lead = np_blocks(x, BLOCK_SIZE, NAME)
    qw = np_importance(weights, np.shape(x), BLOCK_SIZE, NAME)
    amax = np.abs(xb).max(axis=1)
    with np.errstate(divide="ignore"):
        e0 = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2 + 127, 0)
    best_err = np.full(xb.shape[0], np.inf)
    best_codes = np.zeros(xb.shape, dtype=np.uint8)
    best_e = np.zeros(xb.shape[0], dtype=np.uint8)
    for de in (0, 1):
        e = np.clip(e0 + de, 0, 254)
        scale = np.exp2(e - 127.0)
        codes, coded = _encode(xb / scale[:, None])
        err = (coded * scale[:, None] - xb) ** 2
        if qw is not None:  # (without weights no multiply by ones: the same sums)
            err *= qw
        err = err.sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_codes = np.where(better[:, None], codes, best_codes)
        best_e = np.where(better, e, best_e).astype(np.uint8)
    qs = best_codes[:, :16] | (best_codes[:, 16:] << 4)
    return np_out(np.concatenate([best_e[:, None], qs], axis=1), lead)

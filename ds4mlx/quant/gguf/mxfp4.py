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

import ctypes

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..codecs import E2M1_TABLE, e2m1_encode
from . import native
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
    lib = native.load("mxfp4_repack")
    if lib is not None:
        src, sc = np.ascontiguousarray(packed), np.ascontiguousarray(scales)
        out = np.empty((*lead, sc.shape[-1] * BLOCK_BYTES), dtype=np.uint8)
        lib.mxfp4_from_pairs(native.ptr(src), native.ptr(sc), ctypes.c_int64(sc.size), native.ptr(out))
        return out
    # packed byte i holds elements 2i (low nibble) and 2i+1; GGUF byte j holds elements j and
    # j+16. So with a, b the first and second 8 packed bytes of a block, GGUF byte 2i holds the
    # low nibbles of a_i, b_i and byte 2i+1 their high nibbles. Done on 64-bit words (8 bytes
    # at once, long loops) and written through a packed 17-byte record view.
    words = np.ascontiguousarray(packed).reshape(-1, 16).view("<u8")
    a, b = words[:, 0], words[:, 1]
    even = (a & _LOW) | ((b & _LOW) << np.uint64(4))
    odd = ((a >> np.uint64(4)) & _LOW) | (b & _HIGH)
    out = np.empty(words.shape[0], dtype=_BLOCK)
    out["e"] = scales.reshape(-1)
    out["lo"] = _spread(even & _M32) | (_spread(odd & _M32) << np.uint64(8))
    out["hi"] = _spread(even >> np.uint64(32)) | (_spread(odd >> np.uint64(32)) << np.uint64(8))
    return out.view(np.uint8).reshape(*lead, -1)


_LOW, _HIGH, _M32 = np.uint64(0x0F0F0F0F0F0F0F0F), np.uint64(0xF0F0F0F0F0F0F0F0), np.uint64(0xFFFFFFFF)
_BLOCK = np.dtype([("e", "u1"), ("lo", "<u8"), ("hi", "<u8")])  # one GGUF block, unaligned


def _spread(x: np.ndarray) -> np.ndarray:
    """The 4 low bytes of each word to bytes 0, 2, 4, 6 (zeros between)."""
    x = (x | (x << np.uint64(16))) & np.uint64(0x0000FFFF0000FFFF)
    return (x | (x << np.uint64(8))) & np.uint64(0x00FF00FF00FF00FF)


def _encode(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest E2M1 code of each value (``codecs.e2m1_encode``) and the coded value."""
    codes = e2m1_encode(v)
    return codes, E2M1_TABLE[codes]


def compiled() -> bool:
    """True: :func:`quantize` is a few whole-array numpy passes, which release the GIL."""
    return True


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

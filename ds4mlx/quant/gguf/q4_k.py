"""GGUF Q4_K (type 12): 256 weights in 144 bytes, 8 sub-blocks of 32.

Layout of one block::

    bytes 0..1     d       fp16 super-scale
    bytes 2..3     dmin    fp16 super-min
    bytes 4..15    scales  8 × (6-bit scale, 6-bit min), packed (see below)
    bytes 16..143  qs      256 × 4-bit codes

Sub-block j (elements 32j..32j+31) has ``x = (d·sc_j)·q − dmin·m_j`` with q ∈ 0..15.
Scale bytes ``s[0..11]``: for j < 4, ``sc_j = s[j] & 63`` and ``m_j = s[j+4] & 63``; for j ≥ 4,
``sc_j = (s[j+4] & 15) | (s[j−4] >> 6) << 4`` and ``m_j = (s[j+4] >> 4) | (s[j] >> 6) << 4``.
Codes: 64-element chunk c uses ``qs[32c .. 32c+31]``; the low nibble of byte ``32c+l`` is element
``64c+l`` and the high nibble element ``64c+32+l``.

``d·sc`` (≤ 17 bits) and ``(d·sc)·q`` (≤ 21 bits) are exact in float32, so only the final
subtraction rounds, exactly as in the reference.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .common import (KQUANT_NUMPY, as_blocks, bits, field_f16, flat_values, kquant_blocks, kquant_fit,
                     kquant_native, np_f16_bytes, quantize_in_chunks)

NAME = "Q4_K"
GGML_TYPE = int(GGMLQuantizationType.Q4_K)
BLOCK_SIZE, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]  # weights, bytes per block
SCALE_FIELDS = (0, 2)  # byte offsets of the block's fp16 scales (the load-time finite check reads them)

_SUB = 32  # sub-block length
_CHUNK_BLOCKS = 256  # super-blocks per numpy batch: bounds memory; measured fastest (512: 1.3x slower)
_NATIVE_CHUNK_BLOCKS = 4096  # the C recipe keeps no batch-sized temporaries: batches only bound
# the importance rows that are broadcast at once
SEARCH = (-1.0, 0.5, 4)  # (rmin, rdelta, nstep) of the inverse-scale sweep


def unpack_scale_min(s: mx.array) -> tuple[mx.array, mx.array]:
    """The 12 packed scale bytes ``[..., 12]`` -> 6-bit ``(sc, m)``, each uint8 ``[..., 8]``.
    Shared with Q5_K, which packs its scales the same way."""
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = mx.concatenate([mx.bitwise_and(a, 63),
                         mx.bitwise_or(mx.bitwise_and(c, 15), mx.left_shift(mx.right_shift(a, 6), 4))],
                        axis=-1)
    m = mx.concatenate([mx.bitwise_and(b, 63),
                        mx.bitwise_or(mx.right_shift(c, 4), mx.left_shift(mx.right_shift(b, 6), 4))],
                       axis=-1)
    return sc, m


def pack_scale_min(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """6-bit ``sc``, ``m`` uint8 ``[N, 8]`` -> the 12 packed bytes ``[N, 12]``."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    lo_sc, hi_sc, lo_m, hi_m = sc[:, :4], sc[:, 4:], m[:, :4], m[:, 4:]
    return np.concatenate([
        (lo_sc & 63) | ((hi_sc >> 4) << 6),
        (lo_m & 63) | ((hi_m >> 4) << 6),
        (hi_sc & 15) | ((hi_m & 15) << 4),
    ], axis=1).astype(np.uint8)


def dequantize(blocks: mx.array) -> mx.array:
    b = as_blocks(blocks, BLOCK_BYTES, NAME)
    d, dmin = field_f16(b, 0), field_f16(b, 2)
    sc, m = unpack_scale_min(b[..., 4:16])
    dl = (d * sc.astype(mx.float32))[..., None]  # [..., n, 8, 1]
    ml = (dmin * m.astype(mx.float32))[..., None]
    qs = b[..., 16:].reshape(*b.shape[:-1], 4, 1, 32)
    q = bits(qs, mx.array([0, 4], dtype=mx.uint8).reshape(2, 1), 15)  # [..., n, 4, 2, 32]
    q = q.reshape(*b.shape[:-1], 8, _SUB).astype(mx.float32)
    return flat_values(flat_values(dl * q - ml))


def numpy_chunk(xb: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """The numpy recipe and packing of super-blocks ``xb [n, 256]`` (the compiled one's reference)."""
    n = xb.shape[0]
    d, dmin, ls, lm, q = kquant_fit(xb, qw, _SUB, 15, 63, SEARCH)
    qs = q.reshape(n, 4, 2, _SUB)
    qs = qs[:, :, 0, :] | (qs[:, :, 1, :] << 4)
    return np.concatenate([np_f16_bytes(d), np_f16_bytes(dmin), pack_scale_min(ls, lm),
                           qs.reshape(n, 128)], axis=1)



KQUANT_NUMPY[NAME] = (numpy_chunk, SEARCH)


def compiled() -> bool:
    """Whether :func:`quantize` runs the compiled recipe (which releases the GIL)."""
    return kquant_native() is not None


def quantize(x: np.ndarray, weights: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``[..., n]`` (n a multiple of 256) -> Q4_K bytes.

    Per 32-element sub-block, (scale, min) come from a weighted least-squares search over
    candidate inverse scales; the sub-block scales and mins are then coded in 6 bits against
    fp16 super-scales, which are re-fit once the codes are known. ``weights`` (optional,
    broadcast to ``x``, e.g. an imatrix ``[n]``) says how much each element's error counts.
    ``out``: the bytes go there (C-contiguous uint8 ``[..., n // 256 * 144]``) and it is returned.
    """
    lib = kquant_native()
    if lib is None:
        return quantize_in_chunks(x, weights, BLOCK_SIZE, NAME, _CHUNK_BLOCKS, numpy_chunk, out=out)
    return quantize_in_chunks(x, weights, BLOCK_SIZE, NAME, _NATIVE_CHUNK_BLOCKS,
                              lambda xb, qw, rows: kquant_blocks(lib, NAME, xb, qw, SEARCH, out=rows),
                              block_bytes=BLOCK_BYTES, out=out)

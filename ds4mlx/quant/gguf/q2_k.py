"""GGUF Q2_K (type 10): 256 weights in 84 bytes, 16 sub-blocks of 16.

Layout of one block::

    bytes 0..15    scales  u8[16]: low nibble = scale, high nibble = min of sub-block i
    bytes 16..79   qs      256 × 2-bit codes
    bytes 80..81   d       fp16 super-scale
    bytes 82..83   dmin    fp16 super-min

Sub-block i (elements 16i..16i+15) has ``x = (d·(s_i & 15))·q − dmin·(s_i >> 4)``, q ∈ 0..3.
Codes: for half h (128 elements, bytes ``qs[32h .. 32h+31]``) and shift s ∈ {0, 1, 2, 3},
element ``128h + 32s + l`` (l < 32) is ``(qs[32h + l] >> 2s) & 3``.

All products are exact in float32; only the final subtraction rounds, as in the reference.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .common import (KQUANT_NUMPY, as_blocks, bits, field_f16, flat_values, kquant_blocks, kquant_fit,
                     kquant_native, np_f16_bytes, quantize_in_chunks)

NAME = "Q2_K"
GGML_TYPE = int(GGMLQuantizationType.Q2_K)
BLOCK_SIZE, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q2_K]  # weights, bytes per block
SCALE_FIELDS = (80, 82)  # byte offsets of the block's fp16 scales (the load-time finite check reads them)

_SUB = 16
_CHUNK_BLOCKS = 256  # as Q4_K
_NATIVE_CHUNK_BLOCKS = 4096  # as Q4_K
SEARCH = (-0.5, 0.5, 2)  # (rmin, rdelta, nstep) of the inverse-scale sweep


def dequantize(blocks: mx.array) -> mx.array:
    b = as_blocks(blocks, BLOCK_BYTES, NAME)
    d, dmin = field_f16(b, 80), field_f16(b, 82)
    s = b[..., 0:16]
    dl = (d * mx.bitwise_and(s, 15).astype(mx.float32))[..., None]  # [..., n, 16, 1]
    ml = (dmin * mx.right_shift(s, 4).astype(mx.float32))[..., None]
    qs = b[..., 16:80].reshape(*b.shape[:-1], 2, 1, 32)
    q = bits(qs, mx.array([0, 2, 4, 6], dtype=mx.uint8).reshape(4, 1), 3)  # [..., n, 2, 4, 32]
    q = q.reshape(*b.shape[:-1], 16, _SUB).astype(mx.float32)
    return flat_values(flat_values(dl * q - ml))


def numpy_chunk(xb: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """The numpy recipe and packing of super-blocks ``xb [n, 256]`` (the compiled one's reference)."""
    n = xb.shape[0]
    d, dmin, ls, lm, q = kquant_fit(xb, qw, _SUB, 3, 15, SEARCH)
    q = q.reshape(n, 2, 4, 32)
    qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    scales = (ls.astype(np.uint8) | (lm.astype(np.uint8) << 4)).astype(np.uint8)
    return np.concatenate([scales, qs.reshape(n, 64), np_f16_bytes(d), np_f16_bytes(dmin)], axis=1)



KQUANT_NUMPY[NAME] = (numpy_chunk, SEARCH)


def compiled() -> bool:
    """Whether :func:`quantize` runs the compiled recipe (which releases the GIL)."""
    return kquant_native() is not None


def quantize(x: np.ndarray, weights: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``[..., n]`` (n a multiple of 256) -> Q2_K bytes.

    Per 16-element sub-block a weighted least-squares (scale, min) search over candidate
    inverse scales, then 4-bit sub-block scales and mins against fp16 super-scales, which are
    re-fit once the codes are known. ``weights``: optional importance, broadcast to ``x``.
    ``out``: the bytes go there (C-contiguous uint8 ``[..., n // 256 * 84]``) and it is returned.
    """
    lib = kquant_native()
    if lib is None:
        return quantize_in_chunks(x, weights, BLOCK_SIZE, NAME, _CHUNK_BLOCKS, numpy_chunk, out=out)
    return quantize_in_chunks(x, weights, BLOCK_SIZE, NAME, _NATIVE_CHUNK_BLOCKS,
                              lambda xb, qw, rows: kquant_blocks(lib, NAME, xb, qw, SEARCH, out=rows),
                              block_bytes=BLOCK_BYTES, out=out)

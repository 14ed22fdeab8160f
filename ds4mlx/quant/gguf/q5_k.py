"""GGUF Q5_K (type 13): 256 weights in 176 bytes, 8 sub-blocks of 32 (dequantize only).

Layout of one block::

    bytes 0..1     d       fp16 super-scale
    bytes 2..3     dmin    fp16 super-min
    bytes 4..15    scales  8 × (6-bit scale, 6-bit min), packed as in Q4_K
    bytes 16..47   qh      the fifth bit of each code, one bit plane per 32 elements
    bytes 48..175  qs      the low four bits, nibble order as in Q4_K

Sub-block j: ``x = (d·sc_j)·q − dmin·m_j`` with ``q = lo | hi << 4``; for ``e = 64c + 32s + l``,
``lo = (qs[32c + l] >> 4s) & 15``, and for ``e = 32k + l``, ``hi = (qh[l] >> k) & 1``.
"""

from __future__ import annotations

import mlx.core as mx
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .common import as_blocks, bits, field_f16, flat_values
from .q4_k import unpack_scale_min

NAME = "Q5_K"
GGML_TYPE = int(GGMLQuantizationType.Q5_K)
BLOCK_SIZE, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_K]  # weights, bytes per block
SCALE_FIELDS = (0, 2)  # byte offsets of the block's fp16 scales (the load-time finite check reads them)


def dequantize(blocks: mx.array) -> mx.array:
    b = as_blocks(blocks, BLOCK_BYTES, NAME)
    lead = b.shape[:-1]
    d, dmin = field_f16(b, 0), field_f16(b, 2)
    sc, m = unpack_scale_min(b[..., 4:16])
    dl = (d * sc.astype(mx.float32))[..., None]
    ml = (dmin * m.astype(mx.float32))[..., None]
    qs = b[..., 48:176].reshape(*lead, 4, 1, 32)
    lo = bits(qs, mx.array([0, 4], dtype=mx.uint8).reshape(2, 1), 15).reshape(*lead, 8, 32)
    hi = bits(b[..., None, 16:48], mx.arange(8, dtype=mx.uint8).reshape(8, 1), 1)
    q = mx.bitwise_or(lo, mx.left_shift(hi.reshape(*lead, 8, 32), 4)).astype(mx.float32)
    return flat_values(flat_values(dl * q - ml))

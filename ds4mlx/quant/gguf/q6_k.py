"""GGUF Q6_K (type 14): 256 weights in 210 bytes, 16 sub-blocks of 16 (dequantize only).

Layout of one block::

    bytes 0..127    ql      the low four bits of each code
    bytes 128..191  qh      the high two bits of each code
    bytes 192..207  scales  int8[16], one per sub-block
    bytes 208..209  d       fp16 super-scale

Element ``e`` of sub-block ``i = e // 16``: ``x = (d·scales[i])·(q − 32)``, ``q = lo | hi << 4``.
For ``e = 128h + 64s + l`` (l < 64), ``lo = (ql[64h + l] >> 4s) & 15``; for
``e = 128h + 32t + l`` (l < 32), ``hi = (qh[32h + l] >> 2t) & 3``.
All products are exact in float32 (at most 24 significant bits).
"""

from __future__ import annotations

import mlx.core as mx
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .common import as_blocks, bits, field_f16, flat_values

NAME = "Q6_K"
GGML_TYPE = int(GGMLQuantizationType.Q6_K)
BLOCK_SIZE, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K]  # weights, bytes per block
SCALE_FIELDS = (208,)  # byte offsets of the block's fp16 scales (the load-time finite check reads them)


def dequantize(blocks: mx.array) -> mx.array:
    b = as_blocks(blocks, BLOCK_BYTES, NAME)
    lead = b.shape[:-1]
    d = field_f16(b, 208)
    sc = mx.view(b[..., 192:208], mx.int8).astype(mx.float32)
    dl = (d * sc)[..., None]  # [..., n, 16, 1]
    ql = b[..., 0:128].reshape(*lead, 2, 1, 64)
    lo = bits(ql, mx.array([0, 4], dtype=mx.uint8).reshape(2, 1), 15).reshape(*lead, 256)
    qh = b[..., 128:192].reshape(*lead, 2, 1, 32)
    hi = bits(qh, mx.array([0, 2, 4, 6], dtype=mx.uint8).reshape(4, 1), 3).reshape(*lead, 256)
    q = mx.bitwise_or(lo, mx.left_shift(hi, 4)).astype(mx.float32) - 32.0
    return flat_values(flat_values(dl * q.reshape(*lead, 16, 16)))

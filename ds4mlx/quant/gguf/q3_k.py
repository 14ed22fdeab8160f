"""GGUF Q3_K (type 11): 256 weights in 110 bytes, 16 sub-blocks of 16 (dequantize only).

Layout of one block::

    bytes 0..31    hmask   the high (third) bit of each code, one bit plane per 32 elements
    bytes 32..95   qs      the low two bits of each code
    bytes 96..107  scales  16 × 6-bit signed scales, packed (see below)
    bytes 108..109 d       fp16 super-scale

Element ``e`` of sub-block ``i = e // 16``: ``x = (d·(sc_i − 32))·(lo − 4·(1 − hi))`` where, for
``e = 128h + 32s + l`` (l < 32), ``lo = (qs[32h + l] >> 2s) & 3``, and, for ``e = 32k + l``,
``hi = (hmask[l] >> k) & 1``. Scale bytes ``t[0..11]``: the low nibbles of ``t[0..7]`` are
``sc_0..sc_7`` and their high nibbles ``sc_8..sc_15`` (low four bits), and ``t[8 + j]`` holds the
top two bits of ``sc_{j}, sc_{j+4}, sc_{j+8}, sc_{j+12}`` at bit offsets 0, 2, 4, 6.
"""

from __future__ import annotations

import mlx.core as mx
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .common import as_blocks, bits, field_f16, flat_values

NAME = "Q3_K"
GGML_TYPE = int(GGMLQuantizationType.Q3_K)
BLOCK_SIZE, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q3_K]  # weights, bytes per block
SCALE_FIELDS = (108,)  # byte offsets of the block's fp16 scales (the load-time finite check reads them)


def dequantize(blocks: mx.array) -> mx.array:
    b = as_blocks(blocks, BLOCK_BYTES, NAME)
    lead = b.shape[:-1]
    d = field_f16(b, 108)
    t = b[..., 96:108]
    low = bits(t[..., None, 0:8], mx.array([0, 4], dtype=mx.uint8).reshape(2, 1), 15)  # [.., 2, 8]
    high = bits(t[..., None, 8:12], mx.array([0, 2, 4, 6], dtype=mx.uint8).reshape(4, 1), 3)  # [.., 4, 4]
    sc = mx.bitwise_or(low.reshape(*lead, 16), mx.left_shift(high.reshape(*lead, 16), 4))
    dl = (d * (sc.astype(mx.float32) - 32.0))[..., None]  # [..., n, 16, 1]
    qs = b[..., 32:96].reshape(*lead, 2, 1, 32)
    lo = bits(qs, mx.array([0, 2, 4, 6], dtype=mx.uint8).reshape(4, 1), 3).reshape(*lead, 16, 16)
    hm = b[..., None, 0:32]
    hi = bits(hm, mx.arange(8, dtype=mx.uint8).reshape(8, 1), 1).reshape(*lead, 16, 16)
    q = lo.astype(mx.float32) - 4.0 * (1.0 - hi.astype(mx.float32))
    return flat_values(flat_values(dl * q))

"""Plain float tensors in GGUF: F32 (type 0), F16 (type 1), BF16 (type 30).

Block size 1: the bytes are the little-endian values in row-major order. Each format is a small
namespace object with the same attributes as the block-format modules, so the registry treats
all types alike.
"""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..codecs import bf16_decode_mx, bf16_encode
from .common import as_blocks


def _dequantize_f32(blocks: mx.array) -> mx.array:
    b = as_blocks(blocks, 4, "F32")
    return mx.view(b, mx.float32).reshape(*b.shape[:-1])


def _dequantize_f16(blocks: mx.array) -> mx.array:
    b = as_blocks(blocks, 2, "F16")
    return mx.view(b, mx.float16).reshape(*b.shape[:-1]).astype(mx.float32)


def _dequantize_bf16(blocks: mx.array) -> mx.array:
    b = as_blocks(blocks, 2, "BF16")
    return bf16_decode_mx(mx.view(b, mx.uint16).reshape(*b.shape[:-1]))


def _quantize_f32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype="<f4")
    return x.view(np.uint8).reshape(*x.shape[:-1], -1)


def _quantize_f16(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32).astype("<f2"))
    return x.view(np.uint8).reshape(*x.shape[:-1], -1)


def _quantize_bf16(x: np.ndarray) -> np.ndarray:
    half = bf16_encode(x)
    return half.view(np.uint8).reshape(*half.shape[:-1], -1)


def _format(name: str, ggml_type: GGMLQuantizationType, dequantize, quantize) -> SimpleNamespace:
    block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
    return SimpleNamespace(
        NAME=name, GGML_TYPE=int(ggml_type), BLOCK_SIZE=block_size, BLOCK_BYTES=block_bytes,
        dequantize=dequantize, quantize=quantize, compiled=lambda: True,  # one numpy pass, GIL released
    )


F32 = _format("F32", GGMLQuantizationType.F32, _dequantize_f32, _quantize_f32)
F16 = _format("F16", GGMLQuantizationType.F16, _dequantize_f16, _quantize_f16)
BF16 = _format("BF16", GGMLQuantizationType.BF16, _dequantize_bf16, _quantize_bf16)

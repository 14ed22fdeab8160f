"""Plain float tensors in GGUF: F32 (type 0), F16 (type 1), BF16 (type 30).

Block size 1: the bytes are the little-endian values in row-major order. Each format is a small
namespace object with the same attributes as the block-format modules, so the registry treats
all types alike.
"""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType

from .common import as_blocks


def _dequantize_f32(blocks: mx.array) -> mx.array:
    b = as_blocks(blocks, 4, "F32")
    return mx.view(b, mx.float32).reshape(*b.shape[:-1])


def _dequantize_f16(blocks: mx.array) -> mx.array:
    b = as_blocks(blocks, 2, "F16")
    return mx.view(b, mx.float16).reshape(*b.shape[:-1]).astype(mx.float32)


def _dequantize_bf16(blocks: mx.array) -> mx.array:
    # bf16 is the top half of an f32: shifting the bits keeps every value (and NaN payload) exact
    b = as_blocks(blocks, 2, "BF16")
    half = mx.view(b, mx.uint16).reshape(*b.shape[:-1]).astype(mx.uint32)
    return mx.view(mx.left_shift(half, 16), mx.float32)


def _quantize_f32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype="<f4")
    return x.view(np.uint8).reshape(*x.shape[:-1], -1)


def _quantize_f16(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32).astype("<f2"))
    return x.view(np.uint8).reshape(*x.shape[:-1], -1)


def _quantize_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bytes, round to nearest even; NaN stays a quiet NaN."""
    u = np.ascontiguousarray(x, dtype="<f4").view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    half = np.where(nan, (u >> 16) | 0x40, rounded).astype("<u2")
    return half.view(np.uint8).reshape(*half.shape[:-1], -1)


def _format(name: str, ggml_type: int, nbytes: int, dequantize, quantize) -> SimpleNamespace:
    return SimpleNamespace(
        NAME=name, GGML_TYPE=int(ggml_type), BLOCK_SIZE=1, BLOCK_BYTES=nbytes,
        dequantize=dequantize, quantize=quantize,
    )


F32 = _format("F32", GGMLQuantizationType.F32, 4, _dequantize_f32, _quantize_f32)
F16 = _format("F16", GGMLQuantizationType.F16, 2, _dequantize_f16, _quantize_f16)
BF16 = _format("BF16", GGMLQuantizationType.BF16, 2, _dequantize_bf16, _quantize_bf16)

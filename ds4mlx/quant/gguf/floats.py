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
from . import native
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


def _quantize_f16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``[..., n]`` -> F16 bytes ``[..., 2n]`` (into ``out``, C-contiguous uint8 of that
    shape, when given: the converter hands reused buffers, fresh ones cost page zeroing)."""
    x = np.asarray(x, dtype=np.float32)
    shape = (*x.shape[:-1], 2 * x.shape[-1]) if x.ndim else (2,)
    if out is not None and (out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous):
        raise ValueError(f"F16 output {out.shape} {out.dtype} is not C-contiguous uint8 {shape}")
    lib = _f16_native()
    if lib is None:
        half = np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(shape)
        if out is None:
            return half
        out[...] = half
        return out
    import ctypes

    x = np.ascontiguousarray(x)
    out = np.empty(shape, np.uint8) if out is None else out
    lib.f16_encode(native.ptr(x), ctypes.c_int64(x.size), native.ptr(out))
    return out


def f16_from_bf16(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """BF16 bits (uint16 ``[..., n]``) -> F16 bytes ``[..., 2n]``: ``_quantize_f16`` of their
    float32 values, bit for bit, without the float32 array in between (into ``out`` as there)."""
    lib = _f16_native()
    if lib is None:
        from ..codecs import bf16_decode

        return _quantize_f16(bf16_decode(bits), out)
    import ctypes

    bits = np.ascontiguousarray(bits).view(np.uint16)
    shape = (*bits.shape[:-1], 2 * bits.shape[-1]) if bits.ndim else (2,)
    if out is not None and (out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous):
        raise ValueError(f"F16 output {out.shape} {out.dtype} is not C-contiguous uint8 {shape}")
    out = np.empty(shape, np.uint8) if out is None else out
    lib.f16_encode_bf16(native.ptr(bits), ctypes.c_int64(bits.size), native.ptr(out))
    return out


def _f16_native():
    """The compiled F16 encoder (``native/f16_encode.c``: F16C where there is one), or None;
    checked against numpy's astype first."""
    return native.load_checked("f16_encode", _check_f16)


def _check_f16(lib) -> bool:
    import ctypes

    x = f16_check_values()
    out = np.empty(x.size, np.uint16)
    lib.f16_encode(native.ptr(x), ctypes.c_int64(x.size), native.ptr(out))
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow edge is among the values on purpose
        if not np.array_equal(out, x.astype("<f2").view(np.uint16)):
            return False
        bf16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # every BF16 value, NaNs included
        half = np.empty(bf16.size, np.uint16)
        lib.f16_encode_bf16(native.ptr(bf16), ctypes.c_int64(bf16.size - 3), native.ptr(half))  # a scalar tail
        want = (bf16.astype(np.uint32) << 16).view(np.float32).astype("<f2").view(np.uint16)
        return np.array_equal(half[:-3], want[:-3])


def f16_check_values() -> np.ndarray:
    """float32 values where fp16 rounding is delicate: ties and the bits beside them at every
    half exponent (normal and subnormal), the overflow edge, float32 subnormals, signed zeros,
    infinities and NaNs with every payload kind (quiet, signalling, low bits only), among
    random values of many magnitudes; odd length (a scalar tail)."""
    rng = np.random.default_rng(0)
    exps = np.arange(-26, 17, dtype=np.int64)
    half_ulp = np.ldexp(1.0, np.maximum(exps - 10, -24) - 1)  # half an fp16 ulp at 2^e
    base = np.ldexp(1.0, exps)[:, None] * (1 + rng.integers(0, 1024, (exps.size, 8)) / 1024)
    ties = (base + half_ulp[:, None]).astype(np.float32).ravel()
    bits = ties.view(np.uint32)
    near = np.concatenate([bits - 1, bits, bits + 1]).view(np.float32)
    special = np.array([0x0, 0x80000000, 0x1, 0x807fffff, 0x7f800000, 0xff800000, 0x7fc00000,
                        0x7f800001, 0xff800001, 0x7f802000, 0x7fbfffff, 0xffc02001, 0x477fe000,
                        0x477fefff, 0x477ff000, 0x477ff001, 0x47800000, 0x7f7fffff, 0x33000000,
                        0x33000001, 0x387fe000, 0x387ff000, 0x38800000], np.uint32).view(np.float32)
    rand = (rng.standard_normal(4096) * np.exp2(rng.uniform(-30, 20, 4096))).astype(np.float32)
    x = np.concatenate([near, special, rand, -near, rand[:7]]).astype(np.float32)
    return np.ascontiguousarray(x)


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

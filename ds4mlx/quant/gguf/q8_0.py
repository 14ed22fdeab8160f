"""GGUF Q8_0 (type 8): 32 weights in 34 bytes.

Layout of one block::

    bytes 0..1   d   fp16 scale
    bytes 2..33  qs  int8[32]

Value ``x[j] = d · qs[j]``. The scale fits fp16 exactly and the product has at most 19
significant bits, so the float32 result is exact.

MLX view (exact): affine 8-bit, group 32, with unsigned codes ``q + 128`` (= ``q XOR 0x80``),
``scale = d`` and ``bias = −128·d``. Both fit fp16 exactly unless ``|d| > 511.75`` (then
``−128·d`` overflows fp16), in which case the view uses float32 scales and biases.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import native
from .common import (as_blocks, field_f16, flat_values, np_blocks, np_f16_bytes, np_out, np_out_rows,
                     round_half_away)

NAME = "Q8_0"
GGML_TYPE = int(GGMLQuantizationType.Q8_0)
BLOCK_SIZE, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]  # weights, bytes per block
SCALE_FIELDS = (0,)  # byte offsets of the block's fp16 scales (the load-time finite check reads them)

_FP16_MAX = 65504.0


def dequantize(blocks: mx.array) -> mx.array:
    b = as_blocks(blocks, BLOCK_BYTES, NAME)
    d = field_f16(b, 0)
    qs = mx.view(b[..., 2:], mx.int8).astype(mx.float32)
    return flat_values(qs * d)


def quantize(x: np.ndarray, weights: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``[..., n]`` -> Q8_0 bytes. ``d = amax/127`` rounded to fp16, codes rounded
    against the stored ``d`` (so the fp16 rounding of the scale is not compounded).
    ``weights`` is accepted for a uniform signature; 8-bit codes do not need it. ``out``: the
    bytes go there (C-contiguous uint8 ``[..., n_blocks * 34]``; reused buffers, no fresh pages)."""
    xb, lead = np_blocks(x, BLOCK_SIZE, NAME)
    shape = (*lead, np.shape(x)[-1] // BLOCK_SIZE * BLOCK_BYTES)
    if out is not None and (out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous):
        raise ValueError(f"Q8_0 output {out.shape} {out.dtype} is not C-contiguous uint8 {shape}")
    rows = None if out is None else out.reshape(-1, BLOCK_BYTES)
    lib = _native()
    if lib is None:
        packed = _numpy_blocks(xb)
        if out is None:
            return np_out(packed, lead)
        rows[...] = packed
        return out
    packed = _compiled_blocks(lib, xb, rows)
    return np_out(packed, lead) if out is None else out


def _numpy_blocks(xb: np.ndarray) -> np.ndarray:
    d = np.minimum(np.abs(xb).max(axis=1) / 127.0, _FP16_MAX).astype(np.float16).astype(np.float32)
    safe = np.where(d > 0, d, 1.0)
    q = np.where(d[:, None] > 0, np.clip(round_half_away(xb / safe[:, None]), -127, 127), 0)
    return np.concatenate([np_f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)


def _compiled_blocks(lib, xb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    import ctypes

    xc = np.ascontiguousarray(xb, dtype=np.float32)
    out = np_out_rows(out, xc.shape[0], BLOCK_BYTES)
    lib.q8_0_quantize(native.ptr(xc), ctypes.c_int64(xc.shape[0]), native.ptr(out))
    return out


def _native():
    """The compiled Q8_0 quantizer (``native/q8_0.c``), or None; checked against numpy first."""
    return native.load_checked("q8_0", _check_native)


def compiled() -> bool:
    """Whether :func:`quantize` runs the compiled kernel (which releases the GIL)."""
    return _native() is not None


def _check_native(lib) -> bool:
    rng = np.random.default_rng(0)
    xb = (rng.standard_t(3, size=(64, 32)) * 0.02).astype(np.float32)
    xb[0] = 0.0
    xb[1] = rng.integers(-4, 5, 32) * 0.5  # exact halves: rounding ties
    xb[2] *= 1e9  # the scale saturates at 65504
    xb[3] *= 1e-6  # subnormal scales
    return np.array_equal(_numpy_blocks(xb), _compiled_blocks(lib, xb))


def to_mlx_affine8(blocks: mx.array, scale_dtype: mx.Dtype | None = None
                   ) -> tuple[mx.array, mx.array, mx.array]:
    """Q8_0 bytes ``[..., n_blocks*34]`` -> MLX affine (bits 8, group 32) ``(w, scales, biases)``.

    ``w`` is uint32 ``[..., n_blocks*8]`` (four codes per word, element 0 in the low byte);
    ``scales``/``biases`` are ``[..., n_blocks]`` in ``scale_dtype``: by default float16, or
    float32 when some ``|d|`` is too large for ``−128·d`` to fit fp16 (see :func:`fits_fp16`).
    ``mx.dequantize`` of the result equals :func:`dequantize` exactly when evaluated with float32
    scales (fp16 arithmetic itself rounds ``d·(q+128)``).
    """
    b = as_blocks(blocks, BLOCK_BYTES, NAME)
    codes = mx.bitwise_xor(b[..., 2:], mx.array(0x80, dtype=mx.uint8))
    w = mx.view(codes, mx.uint32).reshape(*b.shape[:-2], -1)
    d16 = mx.view(b[..., 0:2], mx.float16).reshape(*b.shape[:-1])
    if scale_dtype is None:
        scale_dtype = mx.float16 if fits_fp16(d16) else mx.float32
    scales = d16.astype(scale_dtype)
    biases = scales * mx.array(-128.0, dtype=scale_dtype)
    return w, scales, biases


def fits_fp16(d: mx.array | np.ndarray) -> bool:
    """Whether the affine view of blocks with fp16 scales ``d`` can keep fp16 scales/biases."""
    return float(np.max(np.abs(np.asarray(d, dtype=np.float32)), initial=0.0)) * 128.0 <= _FP16_MAX

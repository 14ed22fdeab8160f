"""The layer's shared expert as the decode MoE kernels take it (one more slot of each decoded
token in ``moe_gate_up_decode`` / ``moe_down_decode``, :mod:`.moe`): its weights described,
checked and packed once (:class:`Shared`), their exact float32 rows for the ops twins, and
which formats may fold (:func:`shared_folds`).

A part (gate | up ``[2F, K]`` or down ``[D, F]``) is a :class:`SharedWeight`: float rows
(``fmt`` their dtype name, ``"bfloat16"``), GGUF blocks ``uint8 [rows, bytes]`` (``fmt`` the
GGUF name), or one of MLX's quantized modes as ``nn.QuantizedLinear`` holds it: ``"mxfp8"``
(weight uint32 ``[rows, K/4]`` E4M3 codes, scales uint8 ``[rows, K/32]`` E8M0, no biases:
official FP8 files) or ``"affine8"`` (8 bits, group 32: weight uint32 ``[rows, K/4]``, scales
and biases ``[rows, K/32]`` of one dtype, float16, bfloat16 or float32: GGUF Q8_0 as loaded,
or an MLX dir converted with affine 8 bits).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx

from ..quant.codecs import MX_GROUP
from .dispatch import KernelInputError
from .moe import MLX_MXFP4, Packed, _no_scales, dequantize_ops, unpack_weight
from .source import AFFINE8_LAYOUT, DENSE_LAYOUT, MLX_MXFP8, dtype_name

# Formats a folded shared expert may take besides float rows in the activation dtype: the ones
# the first-use check runs the folded kernels with (check_cases._shared_fold_cases; affine8 in
# each dtype of AFFINE8_LAYOUT).
SHARED_FORMATS = ("Q8_0", "mxfp8", "affine8")
MLX_MODES = ("mxfp8", "affine8")


class SharedWeight(NamedTuple):
    """One part of a shared expert (see the module's text)."""

    weight: mx.array
    fmt: str
    scales: mx.array | None = None  # MLX modes
    biases: mx.array | None = None  # affine8


def mlx_mode(group_size: int, bits: int, mode: str) -> str | None:
    """The :class:`SharedWeight` format of an MLX quantized projection, None if it has none."""
    if group_size != MX_GROUP or bits != 8:
        return None
    return {"mxfp8": "mxfp8", "affine": "affine8"}.get(mode)


@dataclass(frozen=True)
class Shared:
    """The shared expert as the decode kernels take it: ``gate_up`` (gate rows, then up rows,
    ``[2F, K]``) and ``down`` (``[D, F]``), each a :class:`SharedWeight` (a plain
    ``(weight, fmt)`` tuple is taken as one)."""

    gate_up: SharedWeight
    down: SharedWeight

    def __post_init__(self):
        for name in ("gate_up", "down"):
            object.__setattr__(self, name, SharedWeight(*getattr(self, name)))

    @functools.cached_property
    def packed(self) -> tuple[Packed, Packed]:
        """(gate | up, down) as the kernels read them, checked once per Shared (the model
        builds one per layer)."""
        return (shared_packed(self.gate_up, "shared.gate_up"),
                shared_packed(self.down, "shared.down"))

    def dense(self, part: int) -> mx.array:
        """Float32 rows of part 0 (gate | up) or 1 (down): the ops twins' dequantization."""
        return shared_dense((self.gate_up, self.down)[part])


def _mlx_packed(part: SharedWeight, name: str) -> Packed:
    """An mxfp8 / affine8 part as the kernels read it: the codes, scales and biases as bytes
    (views of the module's arrays, no copy)."""
    w, fmt, scales, biases = part
    if w.dtype != mx.uint32 or w.ndim != 2 or scales is None or scales.ndim != 2:
        raise KernelInputError(f"{name}: {fmt} expects a uint32 weight [rows, K/4] and scales "
                               f"[rows, K/32], got {w.dtype}{tuple(w.shape)}")
    k = w.shape[1] * 4
    if tuple(scales.shape) != (w.shape[0], k // MX_GROUP) or k % MX_GROUP:
        raise KernelInputError(f"{name}: scales {tuple(scales.shape)} do not fit a weight of "
                               f"{w.shape[0]} rows of {k} (groups of {MX_GROUP})")
    if fmt == "mxfp8":
        if scales.dtype != mx.uint8 or biases is not None:
            raise KernelInputError(f"{name}: mxfp8 expects uint8 E8M0 scales and no biases, got "
                                   f"{scales.dtype} scales")
        return Packed(fmt, MLX_MXFP8, mx.view(w, mx.uint8), scales, k)
    sname = dtype_name(scales.dtype)
    if (sname not in AFFINE8_LAYOUT or biases is None or biases.dtype != scales.dtype
            or biases.shape != scales.shape):
        raise KernelInputError(f"{name}: affine8 expects scales and biases of one shape in "
                               f"{', '.join(AFFINE8_LAYOUT)}, got {scales.dtype} and "
                               f"{None if biases is None else biases.dtype}")
    return Packed(fmt, AFFINE8_LAYOUT[sname], mx.view(w, mx.uint8), mx.view(scales, mx.uint8), k,
                  mx.view(biases, mx.uint8))


def shared_packed(part: SharedWeight, name: str) -> Packed:
    """A shared-expert weight as the kernels read it, checked (``name`` labels errors)."""
    w, fmt = part.weight, part.fmt
    if fmt in MLX_MODES:
        return _mlx_packed(part, name)
    if fmt in DENSE_LAYOUT:
        if w.ndim != 2 or dtype_name(w.dtype) != fmt:
            raise KernelInputError(f"{name}: expected {fmt} rows [rows, K], got {w.dtype}"
                                   f"{tuple(w.shape)}")
        return Packed(fmt, DENSE_LAYOUT[fmt], mx.view(w, mx.uint8), _no_scales(), w.shape[1])
    p = unpack_weight(w, fmt, name)
    if p.layout == MLX_MXFP4 or p.q.ndim != 2:
        raise KernelInputError(f"{name}: expected GGUF blocks [rows, bytes], got {tuple(p.q.shape)}")
    return p


def shared_dense(part: SharedWeight) -> mx.array:
    """Float32 rows of a shared-expert weight, exactly: affine's s * q + b computed in float32
    (``mx.dequantize`` with 16-bit scales would round in their dtype)."""
    w, fmt, scales, biases = SharedWeight(*part)
    if fmt in DENSE_LAYOUT:
        return w.astype(mx.float32)
    if fmt == "mxfp8":
        return mx.dequantize(w, scales, group_size=MX_GROUP, bits=8, mode="mxfp8",
                             dtype=mx.float32)
    if fmt == "affine8":
        rows, k = w.shape[0], w.shape[1] * 4
        q = mx.view(w, mx.uint8).astype(mx.float32).reshape(rows, k // MX_GROUP, MX_GROUP)
        s, b = scales.astype(mx.float32)[..., None], biases.astype(mx.float32)[..., None]
        return (q * s + b).reshape(rows, k)
    return dequantize_ops(w, fmt)


def shared_folds(shared: Shared, dtype: mx.Dtype) -> bool:
    """Whether the decode kernels take ``shared`` with activations in ``dtype``: each part in
    float rows of that dtype or in one of ``SHARED_FORMATS`` (the pairs the first-use check
    covers), well formed, K a multiple of the kernels' 32-wide pieces."""
    for part in (shared.gate_up, shared.down):
        if not (part.fmt == dtype_name(dtype) or part.fmt in SHARED_FORMATS):
            return False
    try:
        packed = shared.packed
    except KernelInputError:
        return False
    return all(p.q.ndim == 2 and p.k % 32 == 0 for p in packed)

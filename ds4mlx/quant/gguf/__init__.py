"""GGUF tensor types: one block layout per module, each with an exact MLX-ops dequantizer.

Every format exposes ``NAME``, ``GGML_TYPE``, ``BLOCK_SIZE`` (weights per block),
``BLOCK_BYTES``, ``dequantize(blocks: mx.array) -> mx.array`` (uint8
``[..., n_blocks*BLOCK_BYTES]`` -> float32 ``[..., n_blocks*BLOCK_SIZE]``, bit-identical to
``gguf.quants.dequantize``) and, where conversion writes the type, a numpy
``quantize(x, weights=None)``.
"""

from __future__ import annotations

from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import iq2_xxs, mxfp4, q2_k, q3_k, q4_k, q5_k, q6_k, q8_0
from .floats import BF16, F16, F32

if TYPE_CHECKING:
    import mlx.core as mx

Format = ModuleType | SimpleNamespace

FORMATS: dict[str, Format] = {
    f.NAME: f for f in (F32, F16, BF16, q8_0, q4_k, q2_k, q3_k, q5_k, q6_k, iq2_xxs, mxfp4)
}
_BY_TYPE: dict[int, Format] = {f.GGML_TYPE: f for f in FORMATS.values()}


class UnsupportedQuantType(ValueError):
    """A tensor's GGML type has no block format here; the message names tensor and type."""

    def __init__(self, ggml_type: int | str, tensor: str | None = None):
        self.ggml_type = ggml_type
        self.tensor = tensor
        if isinstance(ggml_type, str):
            label = ggml_type
        else:
            try:
                label = f"{GGMLQuantizationType(ggml_type).name} ({int(ggml_type)})"
            except ValueError:
                label = f"unknown type id {ggml_type}"
        where = f"tensor {tensor!r}" if tensor else "tensor"
        super().__init__(
            f"{where} has GGML type {label}, which ds4mlx cannot read; "
            f"supported: {', '.join(FORMATS)}"
        )


def by_type(ggml_type: int, tensor: str | None = None) -> Format:
    """The format of GGML type id ``ggml_type``; ``tensor`` only names it in the error."""
    fmt = _BY_TYPE.get(int(ggml_type))
    if fmt is None:
        raise UnsupportedQuantType(int(ggml_type), tensor)
    return fmt


def get(name: str, tensor: str | None = None) -> Format:
    """The format called ``name`` (``"Q4_K"``; case-insensitive)."""
    fmt = FORMATS.get(name.upper())
    if fmt is None:
        raise UnsupportedQuantType(name.upper(), tensor)
    return fmt


def compiled(name: str) -> bool:
    """Whether the quantizer of ``name`` runs outside the GIL (compiled code, or a few
    whole-array numpy passes), so that threads quantize side by side; False for a numpy recipe
    of many small operations (worker processes scale where threads do not)."""
    check = getattr(get(name), "compiled", None)
    return bool(check is not None and check())


def row_bytes(fmt: Format | str | int, n: int, tensor: str | None = None) -> int:
    """Bytes of a row of ``n`` weights in ``fmt`` (a format here, or any GGML type gguf-py knows
    by name or id), from gguf-py's ``GGML_QUANT_SIZES``."""
    if isinstance(fmt, (str, int)):
        qtype = GGMLQuantizationType[fmt.upper()] if isinstance(fmt, str) else GGMLQuantizationType(fmt)
        name, (block, nbytes) = qtype.name, GGML_QUANT_SIZES[qtype]
    else:
        name, block, nbytes = fmt.NAME, fmt.BLOCK_SIZE, fmt.BLOCK_BYTES
    if n % block:
        raise ValueError(
            f"{tensor or 'tensor'}: row length {n} is not a multiple of the {name} block "
            f"size {block}"
        )
    return n // block * nbytes


def row_weights(fmt: Format, nbytes: int, tensor: str | None = None) -> int:
    """Weights in a row of ``nbytes`` bytes of ``fmt``: the inverse of :func:`row_bytes`."""
    if nbytes % fmt.BLOCK_BYTES:
        raise ValueError(f"{tensor or 'tensor'}: a row of {nbytes} bytes is not a whole number "
                         f"of {fmt.NAME} blocks ({fmt.BLOCK_BYTES} bytes)")
    return nbytes // fmt.BLOCK_BYTES * fmt.BLOCK_SIZE


def non_finite_scales(fmt: Format, blocks: "mx.array") -> "mx.array":
    """Whether each block of ``blocks`` (uint8 ``[..., n_blocks*BLOCK_BYTES]``) has a NaN or
    Inf fp16 scale (exponent bits all ones): such a block decodes to NaN/Inf whatever its codes.
    Formats without ``SCALE_FIELDS`` give all False. Result: bool ``[..., n_blocks]``."""
    import mlx.core as mx

    b = blocks.reshape(*blocks.shape[:-1], -1, fmt.BLOCK_BYTES)
    bad = mx.zeros(b.shape[:-1], dtype=mx.bool_)
    for at in getattr(fmt, "SCALE_FIELDS", ()):
        high = b[..., at + 1]  # little-endian: the exponent sits in bits 2..6 of the high byte
        bad = bad | (mx.bitwise_and(high, 0x7C) == 0x7C)
    return bad


def count_non_finite_scales(fmt: Format, packed: np.ndarray) -> int:
    """:func:`non_finite_scales` counted, on numpy bytes (uint8 ``[..., n_blocks*BLOCK_BYTES]``,
    what a quantizer returns): the conversion's check of what it writes, in its worker threads
    (no MLX there)."""
    b = np.ascontiguousarray(packed).reshape(-1, fmt.BLOCK_BYTES)
    bad = np.zeros(len(b), dtype=bool)
    for at in getattr(fmt, "SCALE_FIELDS", ()):
        bad |= (b[:, at + 1] & 0x7C) == 0x7C  # the high byte's exponent bits, as above
    return int(np.count_nonzero(bad))


__all__ = ["FORMATS", "UnsupportedQuantType", "by_type", "compiled", "count_non_finite_scales", "get",
           "non_finite_scales", "row_bytes", "row_weights"]

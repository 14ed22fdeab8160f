"""How one projection's weight is held in memory: the tag a checkpoint reader reports per
module and ``ds4mlx.layers.apply_formats`` turns into a module."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightFormat:
    """How one projection's weight is stored in memory."""

    kind: str  # "float" | "mxfp8" | "mxfp4" | "affine" | "gguf.<TYPE>" | a registered kind
    bits: int | None = None
    group_size: int | None = None

    def __str__(self) -> str:
        if self.kind == "float":
            return "float"
        return f"{self.kind}(bits={self.bits}, group_size={self.group_size})"


FLOAT = WeightFormat("float")
MXFP8 = WeightFormat("mxfp8", 8, 32)
MXFP4 = WeightFormat("mxfp4", 4, 32)
GGUF_PREFIX = "gguf."


def affine(bits: int, group_size: int) -> WeightFormat:
    return WeightFormat("affine", bits, group_size)


def packed_shapes(fmt: WeightFormat, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(weight, scales)`` shapes of a weight of logical ``shape`` ``[..., out, in]`` packed in
    an MLX mode (``mxfp8``, ``mxfp4``, ``affine``): uint32 words ``[..., out, in·bits/32]`` and
    one scale (and bias) per group ``[..., out, in/group]``."""
    *lead, in_dim = shape
    if not fmt.bits or not fmt.group_size or in_dim % fmt.group_size or (in_dim * fmt.bits) % 32:
        raise ValueError(f"format {fmt} does not fit input dimension {in_dim}")
    return (*lead, in_dim * fmt.bits // 32), (*lead, in_dim // fmt.group_size)


def gguf_kind(type_name: str) -> str:
    """The ``WeightFormat.kind`` of GGUF-native blocks of ``type_name`` (``"gguf.Q4_K"``)."""
    return GGUF_PREFIX + type_name.upper()

"""Projections that keep their weights as native GGUF blocks.

* :class:`GGUFLinear` — a dense projection, ``weight`` uint8 ``[out, row_bytes]``.
* :class:`GGUFSwitchLinear` — routed experts, ``weight`` uint8 ``[E, out, row_bytes]`` (each
  expert a contiguous slab, as in the file). It follows mlx-lm's switch-linear protocol
  ``proj(x, indices, sorted_indices=False)``.

Both hand the product to ``ds4mlx.kernels`` (``gguf_matmul`` / ``gguf_switch_matmul``), which
decides between a Metal kernel and its ops path (dequantize a bounded number of rows or experts
at a time, never all of them). Math is float32; the result comes back in ``x``'s dtype.
:func:`ds4mlx.layers.apply_formats` builds these modules for the kinds ``gguf.<TYPE>``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..quant.gguf import FORMATS, by_type, get, row_bytes

# Block types held as GGUF-native modules (plain floats load into float modules).
BLOCK_TYPES = tuple(f.NAME for f in FORMATS.values() if f.BLOCK_SIZE != 1)


class _GGUFBlocks(nn.Module):
    type_name: str

    @property
    def fmt(self):
        """The block-format module of this weight (``ds4mlx.quant.gguf.<type>``)."""
        return get(self.type_name)

    @classmethod
    def from_blocks(cls, blocks: mx.array, ggml_type: int, input_dims: int,
                    name: str | None = None):
        """The module holding ``blocks`` (uint8 ``[out, bytes]``, or ``[E, out, bytes]`` for
        experts) of GGML type ``ggml_type``; ``name`` labels errors."""
        fmt = by_type(ggml_type, name)
        lead = tuple(blocks.shape[:-1])  # (out,) or (E, out)
        if len(lead) != (2 if cls is GGUFSwitchLinear else 1):
            raise ValueError(f"{name or 'tensor'}: blocks of shape {tuple(blocks.shape)} do not "
                             f"fit {cls.__name__}")
        m = cls(input_dims, *lead[::-1], fmt.NAME)  # (input_dims, out[, E], type)
        _check_bytes(blocks, m.weight.shape, name)
        m.weight = blocks
        return m


class GGUFLinear(_GGUFBlocks):
    """``y = x @ W.T`` with ``W`` held as GGUF blocks of type ``type_name``."""

    def __init__(self, input_dims: int, output_dims: int, type_name: str):
        super().__init__()
        self.type_name = get(type_name).NAME
        self.input_dims, self.output_dims = input_dims, output_dims
        self.weight = mx.zeros((output_dims, row_bytes(get(type_name), input_dims)), dtype=mx.uint8)
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        return self._matmul(x, self.weight)

    def grouped(self, x: mx.array, groups: int) -> mx.array:
        """Block-diagonal use (the attention's grouped ``wo_a``): group g of ``x [..., G, in]``
        meets output rows ``g·R .. (g+1)·R``; returns ``[..., G, R]``."""
        rows = self.output_dims // groups
        return mx.stack([self._matmul(x[..., g, :], self.weight[g * rows:(g + 1) * rows])
                         for g in range(groups)], axis=-2)

    def _matmul(self, x: mx.array, blocks: mx.array) -> mx.array:
        return kernels.gguf_matmul(x, blocks, fmt=self.type_name, input_dims=self.input_dims,
                                   output_dims=blocks.shape[0])


class GGUFSwitchLinear(_GGUFBlocks):
    """Per-expert projections ``y = x @ W[e].T``, ``W`` held as GGUF blocks ``[E, out, bytes]``."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, type_name: str):
        super().__init__()
        self.type_name = get(type_name).NAME
        self.input_dims, self.output_dims, self.num_experts = input_dims, output_dims, num_experts
        nbytes = row_bytes(get(type_name), input_dims)
        self.weight = mx.zeros((num_experts, output_dims, nbytes), dtype=mx.uint8)
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return kernels.gguf_switch_matmul(x, self.weight, indices, fmt=self.type_name,
                                          input_dims=self.input_dims, output_dims=self.output_dims,
                                          sorted_indices=sorted_indices)


def _check_bytes(blocks: mx.array, shape: tuple[int, ...], name: str | None) -> None:
    if blocks.dtype != mx.uint8 or tuple(blocks.shape) != tuple(shape):
        raise ValueError(
            f"{name or 'tensor'}: expected uint8 blocks of shape {tuple(shape)}, "
            f"got {blocks.dtype} {tuple(blocks.shape)}"
        )

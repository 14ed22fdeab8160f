"""Projections that keep their weights as native GGUF blocks.

* :class:`GGUFLinear` — a dense projection, ``weight`` uint8 ``[out, row_bytes]``. The ops path
  dequantizes (in output-row chunks, to bound memory) and multiplies.
* :class:`GGUFSwitchLinear` — routed experts, ``weight`` uint8 ``[E, out, row_bytes]`` (each
  expert a contiguous slab, as in the file). It follows mlx-lm's switch-linear protocol
  ``proj(x, indices, sorted_indices=False)``. The ops fallback dequantizes only the experts that
  ``indices`` names in this call, a bounded number at a time, never all of them.

Both first offer the call to ``ds4mlx.kernels`` (``gguf_matmul`` / ``gguf_switch_matmul``), which
returns ``None`` when it has no kernel for the format or device; that is the single place where
Metal kernels plug in. Math is float32; the result comes back in ``x``'s dtype.

Importing this module registers the kinds ``gguf.<TYPE>`` with
:func:`ds4mlx.quant.layers.register_format`, so ``apply_formats`` can build these modules.
"""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import by_type, get, row_bytes

# bytes of dequantized float32 weight one ops-path step may materialize
DEQUANT_BUDGET = 256 * 2**20

_KERNELS_MISSING = object()
_kernels_module = None


def _kernels():
    """``ds4mlx.kernels`` if it exists (it is optional), else ``None``."""
    global _kernels_module
    if _kernels_module is None:
        try:
            _kernels_module = importlib.import_module("ds4mlx.kernels")
        except ModuleNotFoundError as e:
            if e.name != "ds4mlx.kernels":
                raise
            _kernels_module = _KERNELS_MISSING
    return None if _kernels_module is _KERNELS_MISSING else _kernels_module


def _try_kernel(name: str, *args, **kwargs) -> mx.array | None:
    k = _kernels()
    fn = getattr(k, name, None) if k is not None else None
    return None if fn is None else fn(*args, **kwargs)


class _GGUFBlocks(nn.Module):
    type_name: str

    @property
    def fmt(self):
        """The block-format module of this weight (``ds4mlx.quant.gguf.<type>``)."""
        return get(self.type_name)


class GGUFLinear(_GGUFBlocks):
    """``y = x @ W.T`` with ``W`` held as GGUF blocks of type ``type_name``."""

    def __init__(self, input_dims: int, output_dims: int, type_name: str):
        super().__init__()
        self.type_name = get(type_name).NAME
        self.input_dims, self.output_dims = input_dims, output_dims
        self.weight = mx.zeros((output_dims, row_bytes(get(type_name), input_dims)), dtype=mx.uint8)
        self.freeze()

    @classmethod
    def from_blocks(cls, blocks: mx.array, ggml_type: int, input_dims: int,
                    name: str | None = None) -> "GGUFLinear":
        fmt = by_type(ggml_type, name)
        m = cls(input_dims, blocks.shape[0], fmt.NAME)
        _check_bytes(blocks, m.weight.shape, name)
        m.weight = blocks
        return m

    def __call__(self, x: mx.array) -> mx.array:
        return self._matmul(x, self.weight)

    def grouped(self, x: mx.array, groups: int) -> mx.array:
        """Block-diagonal use (the attention's grouped ``wo_a``): group g of ``x [..., G, in]``
        meets output rows ``g·R .. (g+1)·R``; returns ``[..., G, R]``."""
        rows = self.output_dims // groups
        return mx.stack([self._matmul(x[..., g, :], self.weight[g * rows:(g + 1) * rows])
                         for g in range(groups)], axis=-2)

    def _matmul(self, x: mx.array, blocks: mx.array) -> mx.array:
        out_dims = blocks.shape[0]
        y = _try_kernel("gguf_matmul", x, blocks, fmt=self.type_name,
                        input_dims=self.input_dims, output_dims=out_dims)
        if y is not None:
            return y
        xf = x.astype(mx.float32)
        step = max(1, DEQUANT_BUDGET // (4 * self.input_dims))  # output rows per step
        parts = [xf @ self.fmt.dequantize(blocks[r:r + step]).T for r in range(0, out_dims, step)]
        y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
        return y.astype(x.dtype)


class GGUFSwitchLinear(_GGUFBlocks):
    """Per-expert projections ``y = x @ W[e].T``, ``W`` held as GGUF blocks ``[E, out, bytes]``."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, type_name: str):
        super().__init__()
        self.type_name = get(type_name).NAME
        self.input_dims, self.output_dims, self.num_experts = input_dims, output_dims, num_experts
        nbytes = row_bytes(get(type_name), input_dims)
        self.weight = mx.zeros((num_experts, output_dims, nbytes), dtype=mx.uint8)
        self.freeze()

    @classmethod
    def from_blocks(cls, blocks: mx.array, ggml_type: int, input_dims: int,
                    name: str | None = None) -> "GGUFSwitchLinear":
        fmt = by_type(ggml_type, name)
        m = cls(input_dims, blocks.shape[1], blocks.shape[0], fmt.NAME)
        _check_bytes(blocks, m.weight.shape, name)
        m.weight = blocks
        return m

    def dequantize_experts(self, experts: mx.array) -> mx.array:
        """float32 ``[len(experts), out, in]`` for the expert ids ``experts``."""
        return self.fmt.dequantize(self.weight[experts])

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = _try_kernel("gguf_switch_matmul", x, self.weight, indices, fmt=self.type_name,
                        input_dims=self.input_dims, output_dims=self.output_dims,
                        sorted_indices=sorted_indices)
        if y is not None:
            return y
        return self._ops(x, indices, sorted_indices).astype(x.dtype)

    def _ops(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        xf = x.astype(mx.float32)
        idx = np.array(indices).astype(np.int64)  # host copy: which experts this call touches
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_experts):
            raise IndexError(
                f"expert index out of range [0, {self.num_experts}): {idx.min()}..{idx.max()}"
            )
        used = np.unique(idx)
        if used.size == 0:
            batch = np.broadcast_shapes(tuple(xf.shape[:-2]), idx.shape)
            return mx.zeros((*batch, xf.shape[-2], self.output_dims), dtype=mx.float32)
        per_expert = 4 * self.output_dims * self.input_dims
        group = max(1, DEQUANT_BUDGET // per_expert)
        if len(used) <= group:
            # one step: the used experts only, indices renumbered into that stack
            local = np.zeros(self.num_experts, dtype=np.uint32)
            local[used] = np.arange(len(used), dtype=np.uint32)
            w = self.dequantize_experts(mx.array(used.astype(np.uint32)))
            return mx.gather_mm(xf, w.swapaxes(-1, -2), rhs_indices=mx.array(local[idx]),
                                sorted_indices=sorted_indices)
        return self._ops_grouped(xf, idx, used, group)

    def _ops_grouped(self, xf: mx.array, idx: np.ndarray, used: np.ndarray, group: int) -> mx.array:
        # Many experts: sort the (row, expert) pairs by expert and run `group` experts at a time.
        batch = np.broadcast_shapes(tuple(xf.shape[:-2]), idx.shape)
        m = xf.shape[-2]
        x_rows = mx.broadcast_to(xf, (*batch, m, self.input_dims)).reshape(-1, m, self.input_dims)
        flat = np.broadcast_to(idx, batch).reshape(-1)
        order = np.argsort(flat, kind="stable")
        sorted_e = flat[order]
        parts = []
        for g in range(0, len(used), group):
            experts = used[g:g + group]
            lo = np.searchsorted(sorted_e, experts[0], side="left")
            hi = np.searchsorted(sorted_e, experts[-1], side="right")
            local = np.searchsorted(experts, sorted_e[lo:hi]).astype(np.uint32)
            w = self.dequantize_experts(mx.array(experts.astype(np.uint32)))
            rows = x_rows[mx.array(order[lo:hi].astype(np.uint32))]
            parts.append(mx.gather_mm(rows, w.swapaxes(-1, -2), rhs_indices=mx.array(local),
                                      sorted_indices=True))
            mx.eval(parts[-1])  # free this group's dequantized weights before the next
        y = mx.concatenate(parts, axis=0)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return y[mx.array(inverse.astype(np.uint32))].reshape(*batch, m, self.output_dims)


def _check_bytes(blocks: mx.array, shape: tuple[int, ...], name: str | None) -> None:
    if blocks.dtype != mx.uint8 or tuple(blocks.shape) != tuple(shape):
        raise ValueError(
            f"{name or 'tensor'}: expected uint8 blocks of shape {tuple(shape)}, "
            f"got {blocks.dtype} {tuple(blocks.shape)}"
        )


# --- registration with apply_formats -------------------------------------------------------------


def gguf_kind(type_name: str) -> str:
    """The ``WeightFormat.kind`` of GGUF-native blocks of ``type_name`` (``"gguf.Q4_K"``)."""
    return f"gguf.{get(type_name).NAME}"


def _register() -> None:
    from ..layers import register_format
    from . import FORMATS

    for fmt in FORMATS.values():
        if fmt.BLOCK_SIZE == 1:
            continue  # plain floats load into float modules
        name = fmt.NAME
        register_format(
            f"gguf.{name}",
            linear=lambda i, o, f, name=name: GGUFLinear(i, o, name),
            switch=lambda i, o, e, f, name=name: GGUFSwitchLinear(i, o, e, name),
        )


_register()

"""Swap the model's float projections for the modules of their stored format, before loading.

The model is built with ``nn.Linear(bias=False)`` for every projection and mlx-lm's
``SwitchLinear`` (weight ``[E, out, in]``) for routed experts. A checkpoint reader reports a
``WeightFormat`` per module path; ``apply_formats`` replaces each module by one whose parameters
have exactly the shapes of the packed arrays, so ``model.load_weights(..., strict=True)`` then
takes the file's bytes unchanged:

* ``mxfp8`` / ``mxfp4`` / ``affine`` → :class:`QuantizedLinear` (``nn.QuantizedLinear`` whose
  product is ``ops.quantized_matmul``, which picks the faster CPU path) / ``QuantizedSwitchLinear``
  with that ``mode`` (weights uint32, scales uint8 for the mx modes, float for affine + biases);
* ``float`` → the module is left as built.

GGUF-native blocks (``gguf.<TYPE>``) build the modules of :mod:`ds4mlx.layers.gguf`.
Extension point: other layouts call ``register_format(kind, linear=..., switch=...)`` with builders
``linear(input_dims, output_dims, fmt) -> nn.Module`` and
``switch(input_dims, output_dims, num_experts, fmt) -> nn.Module``; the switch module must follow
the switch-linear call protocol ``proj(x, indices, sorted_indices=False)``.
"""

from __future__ import annotations

from typing import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn

from .. import kernels, ops
from ..kernels.source import MATVEC_TOKENS, dtype_name
from ..quant.formats import WeightFormat, gguf_kind, packed_shapes
from . import gguf as _gguf


class FormatError(ValueError):
    """A format cannot be applied to a module; the message names the module path."""


LinearBuilder = Callable[[int, int, WeightFormat], nn.Module]
SwitchBuilder = Callable[[int, int, int, WeightFormat], nn.Module]


def _init_packed(module: nn.Module, input_dims: int, output_dims: int, fmt: WeightFormat, lead=()) -> None:
    """Zero placeholders of the packed shapes (no random init to quantize: loading replaces them)."""
    try:
        w_shape, s_shape = packed_shapes(fmt, (*lead, output_dims, input_dims))
    except ValueError as e:
        raise FormatError(str(e)) from None
    module.group_size, module.bits, module.mode = fmt.group_size, fmt.bits, fmt.kind
    module.weight = mx.zeros(w_shape, dtype=mx.uint32)
    if fmt.kind == "affine":
        module.scales = mx.zeros(s_shape, dtype=mx.float32)
        module.biases = mx.zeros(s_shape, dtype=mx.float32)
    else:
        module.scales = mx.zeros(s_shape, dtype=mx.uint8)
        module.biases = None
    module.freeze()


def decode_kernel_takes(mode: str, bits: int, group_size: int, scales_dtype: mx.Dtype,
                        x_dtype: mx.Dtype) -> bool:
    """Whether a decoded token's product of one quantized projection goes to the decode kernel
    (``kernels.dense_matvec``, where it serves) rather than ``mx.quantized_matmul``: affine
    8-bit group 32 whose scales are not in x's dtype (MLX's product would cast x, scales and
    biases to float32 on every call and write float32: GGUF Q8_0 under bfloat16)."""
    return mode == "affine" and bits == 8 and group_size == 32 and scales_dtype != x_dtype


class QuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` (same parameters) whose product is :func:`ds4mlx.ops.quantized_matmul`
    (on the CPU, on the weight's :class:`ds4mlx.ops.CpuCopy` where it has one)."""

    def cpu_copy(self) -> mx.array | None:
        """The weight dequantized (float32), on the CPU within ``ops.CPU_COPY_BUDGET``; else None."""
        copy = getattr(self, "_cpu_copy", None)
        if copy is None:
            copy = self._cpu_copy = ops.CpuCopy()
        return copy.get(self["weight"], self["scales"], self.get("biases"), group_size=self.group_size,
                        bits=self.bits, mode=self.mode)

    def dense_weights(self, x: mx.array, groups: int = 0) -> kernels.DenseWeights | None:
        """This projection as the decode kernel ``dense_matvec`` takes it, where it serves x
        (kernels.dense_matvec_serves): affine 8-bit group 32 whose scales are not in x's dtype
        (MLX's product would cast x, scales and biases to float32 on every call and write
        float32); None elsewhere (MLX's product serves, one launch already)."""
        rows = x.size // (x.shape[-1] * max(groups, 1))
        if not (rows <= MATVEC_TOKENS and kernels.dense_path() and decode_kernel_takes(
                self.mode, self.bits, self.group_size, self["scales"].dtype, x.dtype)):
            return None
        cache = self.__dict__.setdefault("_dense_weights", {})
        part = kernel_part(self)
        w = cache.get(groups)
        if w is None or not w.holds([a for a in part if isinstance(a, mx.array)]):
            w = cache[groups] = kernels.DenseWeights([part], groups)
        return w if kernels.dense_matvec_serves(x, w) else None

    def _matmul(self, x: mx.array, rows: slice | None = None) -> mx.array:
        if rows is None:
            kw = self.dense_weights(x)
            if kw is not None:  # one launch, written in x's dtype
                return kernels.dense_matvec(x, kw)
        w, scales, biases = self["weight"], self["scales"], self.get("biases")
        dense = self.cpu_copy()
        if rows is not None:
            w, scales = w[rows], scales[rows]
            biases = None if biases is None else biases[rows]
            dense = None if dense is None else dense[rows]
        return ops.quantized_matmul(x, w, scales, biases, group_size=self.group_size, bits=self.bits,
                                    mode=self.mode, dense=dense)

    def __call__(self, x: mx.array) -> mx.array:
        return self._matmul(x)

    def grouped(self, x: mx.array, groups: int) -> mx.array:
        """Block-diagonal use (the attention's grouped ``wo_a``): group g of ``x [..., G, in]``
        meets output rows ``g·R .. (g+1)·R``; returns ``[..., G, R]``."""
        r = self["weight"].shape[0] // groups
        kw = self.dense_weights(x, groups)
        if kw is not None:  # one launch: output row r reads x's group r // R
            return kernels.dense_matvec(x, kw)
        dense = self.cpu_copy()
        if dense is not None:  # one batched product over the copy's [G, R, in] view
            xg = x.reshape(-1, groups, x.shape[-1]).swapaxes(0, 1).astype(mx.float32)  # [G, N, in]
            y = xg @ dense.reshape(groups, r, -1).swapaxes(-1, -2)  # [G, N, R]
            return y.swapaxes(0, 1).reshape(*x.shape[:-1], r).astype(x.dtype)
        one_row = x.size == groups * x.shape[-1]
        if one_row or not ops.on_cpu():
            # the groups as the batch of one product over [G, R, in] views, not one product per
            # group and a join: a decode step's row; on the GPU also several rows (a batch of
            # sequences, a speculative verification, a prefill), transposed to [G, N, in] (MLX
            # makes them contiguous for the product: 3 launches at most, not 9)
            w, scales, biases = _grouped_views(self["weight"], self["scales"], self.get("biases"), groups)
            xg = x.reshape(groups, 1, -1) if one_row else x.reshape(-1, groups, x.shape[-1]).swapaxes(0, 1)
            y = mx.quantized_matmul(xg, w, scales, biases, transpose=True,
                                    group_size=self.group_size, bits=self.bits, mode=self.mode)
            return (y if one_row else y.swapaxes(0, 1)).reshape(*x.shape[:-1], r)
        return mx.stack([self._matmul(x[..., g, :], slice(g * r, (g + 1) * r)) for g in range(groups)],
                        axis=-2)


def kernel_part(m: nn.Module, leaves: dict | None = None) -> kernels.SharedWeight | None:
    """A projection's weight as the decode kernels take a part (``leaves``: its arrays, e.g.
    the merged ones of a ``MergedLinear`` run): float rows, GGUF blocks, MLX mxfp8 or affine
    8-bit group 32; None for the others (a bias, other bits or groups, not a projection)."""
    if "bias" in m:
        return None
    leaves = leaves or {k: m.get(k) for k in ("weight", "scales", "biases")}
    w = leaves["weight"]
    if type(m) is nn.Linear:
        return kernels.SharedWeight(w, dtype_name(w.dtype))
    if type(m) is _gguf.GGUFLinear:
        return kernels.SharedWeight(w, m.type_name)
    if isinstance(m, nn.QuantizedLinear):  # ours and mlx's
        fmt = kernels.shared.mlx_mode(m.group_size, m.bits, m.mode)
        if fmt is not None:
            return kernels.SharedWeight(w, fmt, leaves["scales"], leaves.get("biases"))
    return None


# id(weight) -> (weight, its [G, R, in] view, the scales' and biases' views): kept so the id is
# not reused
_GROUPED: dict[int, tuple] = {}


def _grouped_views(weight: mx.array, scales: mx.array, biases: mx.array | None,
                   groups: int) -> tuple[mx.array, mx.array, mx.array | None]:
    entry = _GROUPED.get(id(weight))
    if (entry is None or entry[0] is not weight or entry[1].shape[0] != groups
            or (entry[3] is None) != (biases is None)):
        views = [a.reshape(groups, -1, a.shape[-1]) for a in (weight, scales, biases) if a is not None]
        mx.eval(views)
        entry = _GROUPED[id(weight)] = (weight, *views, *([None] if biases is None else []))
    return entry[1], entry[2], entry[3]


def quantized_linear(input_dims: int, output_dims: int, fmt: WeightFormat) -> QuantizedLinear:
    m = QuantizedLinear.__new__(QuantizedLinear)
    nn.Module.__init__(m)
    _init_packed(m, input_dims, output_dims, fmt)
    return m


def quantized_switch_linear(input_dims: int, output_dims: int, num_experts: int, fmt: WeightFormat) -> nn.Module:
    # mlx_lm is imported here, not at module level: importing it pulls in transformers, which
    # readers and conversion workers that only need formats should not pay for.
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    m = QuantizedSwitchLinear.__new__(QuantizedSwitchLinear)
    nn.Module.__init__(m)
    m.global_scale = None
    _init_packed(m, input_dims, output_dims, fmt, (num_experts,))
    return m


_LINEAR: dict[str, LinearBuilder] = {k: quantized_linear for k in ("mxfp8", "mxfp4", "affine")}
_SWITCH: dict[str, SwitchBuilder] = {k: quantized_switch_linear for k in ("mxfp8", "mxfp4", "affine")}
for _name in _gguf.BLOCK_TYPES:
    _LINEAR[gguf_kind(_name)] = lambda i, o, f, name=_name: _gguf.GGUFLinear(i, o, name)
    _SWITCH[gguf_kind(_name)] = lambda i, o, e, f, name=_name: _gguf.GGUFSwitchLinear(i, o, e, name)


def register_format(kind: str, *, linear: LinearBuilder | None = None, switch: SwitchBuilder | None = None) -> None:
    """Make a new storage kind available to ``apply_formats`` (e.g. GGUF-native blocks)."""
    if kind == "float":
        raise ValueError("'float' is built in")
    if linear is not None:
        _LINEAR[kind] = linear
    if switch is not None:
        _SWITCH[kind] = switch


def _float_dims(module: nn.Module, path: str) -> tuple[int, int, int | None]:
    """(input_dims, output_dims, num_experts or None) of a float projection."""
    from mlx_lm.models.switch_layers import SwitchLinear

    if isinstance(module, SwitchLinear):
        e, out_dim, in_dim = module.weight.shape
        return in_dim, out_dim, e
    if isinstance(module, nn.Linear):
        if "bias" in module:
            raise FormatError(f"{path}: projections with a bias are not supported")
        out_dim, in_dim = module.weight.shape
        return in_dim, out_dim, None
    raise FormatError(f"{path}: {type(module).__name__} is not a float nn.Linear / SwitchLinear projection")


def _locate(model: nn.Module, path: str):
    """(parent container, key, module) for a dotted module path; lists are indexed by int."""
    parent, node = None, model
    key: str | int = ""
    for part in path.split("."):
        parent = node
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise FormatError(f"{path}: no module at {part!r}")
            key = int(part)
            node = node[key]
        elif isinstance(node, dict) and part in node:
            key = part
            node = node[part]
        else:
            raise FormatError(f"{path}: the model has no module {part!r} there")
    return parent, key, node


def make_module(module: nn.Module, fmt: WeightFormat, path: str = "") -> nn.Module:
    """The module of format ``fmt`` with the dimensions of the float ``module``."""
    in_dim, out_dim, experts = _float_dims(module, path)
    if fmt.kind == "float":
        return module
    builders = _LINEAR if experts is None else _SWITCH
    if fmt.kind not in builders:
        raise FormatError(f"{path}: unknown weight format {fmt.kind!r} (known: {sorted(builders)})")
    try:
        if experts is None:
            return builders[fmt.kind](in_dim, out_dim, fmt)
        return builders[fmt.kind](in_dim, out_dim, experts, fmt)
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None


def apply_formats(model: nn.Module, formats: Mapping[str, WeightFormat]) -> nn.Module:
    """Replace the module at each path (``layers.0.attn.wq_a``) by the module of its format."""
    for path, fmt in formats.items():
        parent, key, module = _locate(model, path)
        new = make_module(module, fmt, path)
        if new is not module:
            parent[key] = new
    return model

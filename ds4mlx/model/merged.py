"""Projections that read the same input, merged into one matmul.

A decode step is bounded by launches as much as by bytes: the attention's ``wq_a``, ``wkv`` and
indexer head weights all read the layer input, the two compressors' ``wkv``/``wgate`` read it
in float32, the shared expert's gate and up read the FFN input. :class:`MergedLinear`
concatenates the rows of such projections once (the modules keep views of the merged weight, so
nothing is held twice) and returns each part's output as a view of one product. A prefix of the
parts can be asked for alone (rows not needed are not read). Where not all of them can share a
matmul (other dtypes, quantization parameters or formats: a file's FP8 / Q8_0 ``wq_a`` and
``wkv`` beside the indexer's BF16 / F16 head weights), each run of consecutive parts that can is
merged on its own (``runs``) and the others run one by one.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import kernels, ops
from ..kernels.source import MATVEC_TOKENS
from ..layers import decode_kernel_takes, kernel_part
from ..layers.gguf import GGUFLinear


def _kind(m: nn.Module) -> tuple | None:
    """What must agree for two projections to share a matmul (None: never merged)."""
    if "bias" in m:
        return None
    if type(m) is nn.Linear:
        return ("dense", m.weight.dtype, m.weight.shape[1])
    if isinstance(m, nn.QuantizedLinear):  # ours (layers.QuantizedLinear) and mlx's
        return ("quantized", m.group_size, m.bits, m.mode, m.weight.shape[1], m.get("biases") is None)
    if type(m) is GGUFLinear:
        return ("gguf", m.type_name, m.input_dims)
    return None


_LEAVES = ("weight", "scales", "biases")


class MergedLinear:
    """``modules`` (projections of one input, in the order a prefix is asked for) as one matmul.

    ``bias_rows`` (optional, float ``[n, sum of out rows]``): a row of it is added to the
    product in the same launch (``mx.addmm``, dense weights only)."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = list(modules)
        kinds = {_kind(m) for m in self.modules}
        self.merged = len(self.modules) > 1 and None not in kinds and len(kinds) == 1
        # rows of each part: from the weights when merged, else from the outputs of a call (a
        # module that is not a plain projection, e.g. the imatrix recorder, need not say them)
        self.sizes = [self._rows(m) for m in self.modules] if self.merged else []
        self._views: list[tuple] = []
        # (first, end, merge) of each run of >= 2 consecutive parts sharing a matmul, when not all do
        self.runs: list[tuple[int, int, MergedLinear]] = []
        self._dense: dict[int, kernels.DenseWeights] = {}  # the decode kernel's parts, by prefix
        if self.merged:
            self._merge()
        elif len(self.modules) > 2:
            self._merge_runs()

    @staticmethod
    def _rows(m: nn.Module) -> int:
        return m.output_dims if isinstance(m, GGUFLinear) else m.weight.shape[0]

    def _merge(self) -> None:
        first = self.modules[0]
        leaves = [k for k in _LEAVES if first.get(k) is not None]
        whole = {k: mx.concatenate([m[k] for m in self.modules], axis=0) for k in leaves}
        mx.eval(list(whole.values()))
        self.whole = whole
        # the modules read views of the merged arrays: the separate copies are released
        start = 0
        for m, n in zip(self.modules, self.sizes):
            for k in leaves:
                m[k] = whole[k][start:start + n]
            start += n
        self._views = [tuple(m[k] for k in leaves) for m in self.modules]
        self.kind = _kind(first)
        self._cpu_copy = ops.CpuCopy()  # of the merged weight (quantized kind, on the CPU)

    def _merge_runs(self) -> None:
        kinds = [_kind(m) for m in self.modules]
        start = 0
        for i in range(1, len(kinds) + 1):
            if i < len(kinds) and kinds[i] is not None and kinds[i] == kinds[start]:
                continue
            if i - start > 1:
                self.runs.append((start, i, MergedLinear(self.modules[start:i])))
            start = i

    def _one_by_one(self, x: mx.array, parts: int) -> list[mx.array]:
        """The first ``parts`` outputs, a merged run in one product."""
        runs = {first: (end, merge) for first, end, merge in self.runs}
        outs: list[mx.array] = []
        i = 0
        while i < parts:
            end, merge = runs.get(i, (i + 1, None))
            end = min(end, parts)
            outs += [self.modules[i](x)] if merge is None else merge(x, parts=end - i)
            i = end
        return outs

    def holds(self, modules: list[nn.Module]) -> bool:
        """Whether this merge is of exactly ``modules`` (none replaced) and still current."""
        return (len(modules) == len(self.modules) and all(a is b for a, b in zip(modules, self.modules))
                and self.current())

    def current(self) -> bool:
        """False once a module's weights were replaced (a reload): the merge is stale."""
        if not self.merged:
            return all(merge.current() for _, _, merge in self.runs)
        leaves = [k for k in _LEAVES if k in self.whole]
        return all(all(m.get(k) is v for k, v in zip(leaves, views))
                   for m, views in zip(self.modules, self._views))

    def __call__(self, x: mx.array, parts: int | None = None,
                 bias: mx.array | None = None) -> list[mx.array]:
        """The outputs of the first ``parts`` modules (all by default) for input ``x``;
        ``bias`` (broadcast to the product's leading shape, the width of all parts) is added."""
        parts = len(self.modules) if parts is None else parts
        if not self.merged and parts > 1:
            y = self._kernel_product(x, parts)
            if y is not None:
                return self._split(y if bias is None else y + bias[..., :y.shape[-1]], parts)
        if not self.merged or parts == 1:
            outs = self._one_by_one(x, parts) if self.runs else [m(x) for m in self.modules[:parts]]
            if len(outs) > len(self.sizes):
                self.sizes = [o.shape[-1] for o in outs]
            if bias is not None:
                outs = [o + b for o, b in zip(outs, self._split(bias, parts))]
            return outs
        return self._split(self.product(x, parts, bias), parts)

    def product(self, x: mx.array, parts: int | None = None,
                bias: mx.array | None = None) -> mx.array:
        """The outputs of the first ``parts`` modules side by side ``[..., rows]`` (one matmul
        when merged)."""
        parts = len(self.modules) if parts is None else parts
        if not self.merged:
            y = self._kernel_product(x, parts) if parts > 1 else None
            if y is not None:
                return y if bias is None else y + bias[..., :y.shape[-1]]
            return mx.concatenate(self(x, parts, bias), axis=-1)
        rows = sum(self.sizes[:parts])
        w = self.whole
        kind = self.kind[0]
        if kind == "dense":
            wt = w["weight"][:rows].T
            y = x @ wt if bias is None else mx.addmm(bias[..., :rows], x, wt)
            bias = None
        elif kind == "quantized" and (y := self._kernel_product(x, parts)) is not None:
            pass
        elif kind == "quantized":
            q = self.modules[0]
            biases = w.get("biases")
            dense = self._cpu_copy.get(w["weight"], w["scales"], biases, group_size=q.group_size,
                                       bits=q.bits, mode=q.mode)
            y = ops.quantized_matmul(x, w["weight"][:rows], w["scales"][:rows],
                                     None if biases is None else biases[:rows],
                                     group_size=q.group_size, bits=q.bits, mode=q.mode,
                                     dense=None if dense is None else dense[:rows])
        else:
            y = self.modules[0]._matmul(x, w["weight"][:rows])
        if bias is not None:
            y = y + bias[..., :rows]
        return y

    def _segments(self, parts: int) -> list[kernels.SharedWeight] | None:
        """The first ``parts`` outputs as the decode kernel's parts: the merged weight, or each
        merged run's and each lone module's; None where one has no kernel layout or the prefix
        ends inside a merge."""
        if self.merged:
            if parts != len(self.modules):
                return None
            part = kernel_part(self.modules[0], self.whole)
            return None if part is None else [part]
        runs = {first: (end, merge) for first, end, merge in self.runs}
        segs: list[kernels.SharedWeight] = []
        i = 0
        while i < parts:
            end, merge = runs.get(i, (i + 1, None))
            if end > parts:
                return None
            part = kernel_part(self.modules[i]) if merge is None else (
                kernel_part(merge.modules[0], merge.whole) if merge.merged else None)
            if part is None:
                return None
            segs.append(part)
            i = end
        return segs

    def _kernel_product(self, x: mx.array, parts: int) -> mx.array | None:
        """The first ``parts`` outputs side by side in one decode launch (kernels.dense_matvec,
        written in x's dtype), where it serves: unlike parts (MLX would run one product each),
        or a merged affine weight whose scales are not in x's dtype (MLX's product would cast
        them to float32 on every call); None elsewhere."""
        if x.size > MATVEC_TOKENS * x.shape[-1] or not kernels.dense_path():
            return None  # more rows than a decode product, or the CPU path: MLX's products
        segs = self._segments(parts)
        if segs is None:
            return None
        q = self.modules[0]
        if len(segs) == 1 and not (segs[0].scales is not None and decode_kernel_takes(
                q.mode, q.bits, q.group_size, segs[0].scales.dtype, x.dtype)):
            return None
        arrays = [a for p in segs for a in p if isinstance(a, mx.array)]
        w = self._dense.get(parts)
        if w is None or not w.holds(arrays):
            w = self._dense[parts] = kernels.DenseWeights(segs)
        if not kernels.dense_matvec_serves(x, w):
            return None
        if len(self.sizes) < parts:
            self.sizes = [self._rows(m) for m in self.modules]
        return kernels.dense_matvec(x, w)

    def offsets(self) -> list[int]:
        """Where each part starts in :meth:`product`'s last axis (and the end); unmerged, known
        once a product of all parts was taken."""
        out = [0]
        for n in self.sizes:
            out.append(out[-1] + n)
        return out

    def _split(self, y: mx.array, parts: int) -> list[mx.array]:
        outs, start = [], 0
        for n in self.sizes[:parts]:
            outs.append(y[..., start:start + n])
            start += n
        return outs

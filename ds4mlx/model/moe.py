"""Mixture of experts: sqrtsoftplus router (or hash routing), routed experts, shared expert."""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .. import kernels
from ..kernels.router import Route
from ..config import ModelConfig
from ..layers import kernel_part
from ..ops import clamped_swiglu
from .merged import MergedLinear

# Above this many (token, expert) pairs, sort them by expert so gathers read each expert once.
# Any call of more than one token sorts too (a batch decode step, a speculative verify): tokens
# that chose one expert then share its read; a one-token step picks k distinct experts anyway.
_SORT_THRESHOLD = 64


class Gate(nn.Module):
    """Router: scores = sqrt(softplus(W·x)) in float32; the bias only chooses experts."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.weight = mx.zeros((config.n_routed_experts, config.hidden_size))
        self.is_hash = config.is_hash_layer(layer)
        if self.is_hash:
            self.tid2eid = mx.zeros((config.vocab_size, config.num_experts_per_tok), dtype=mx.int32)
        else:
            self.bias = mx.zeros((config.n_routed_experts,))
        self.top_k = config.num_experts_per_tok  # the model sets the run-time top-k
        self.scale = config.routed_scaling_factor
        self.renormalize = config.norm_topk_prob

    def __call__(self, x: mx.array, token_ids: mx.array | None) -> tuple[mx.array, mx.array]:
        """x [N, D], token_ids [N] → (expert indices [N, k] uint32, weights [N, k] float32)."""
        k = self.top_k
        if self.is_hash:
            if token_ids is None:
                raise ValueError("hash-routed layer needs the token ids")
            return _hash_route(x, self.weight, self.tid2eid[token_ids][:, :k], self.renormalize, self.scale)
        route = self.route(x)
        if route is not None:
            return route.select()
        return _biased_route(x, self.weight, self.bias, k, self.renormalize, self.scale)

    def route(self, x: mx.array) -> Route | None:
        """The selection of a score-routed layer as the router kernel takes it (the logits, the
        bias, the top-k rule): made by the kernel, or inside the decode MoE kernels. None for a
        hash-routed layer and where the router kernel does not serve."""
        if self.is_hash or not kernels.serves(kernels.ROUTER):
            return None
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        return Route(logits, self.bias, self.top_k, self.renormalize, self.scale)


def _weights(scores: mx.array, idx: mx.array, renormalize: bool, scale: float) -> mx.array:
    w = mx.take_along_axis(scores, idx, axis=-1)
    if renormalize:
        w = w / mx.sum(w, axis=-1, keepdims=True)
    return w * scale


def _scores(x: mx.array, weight: mx.array) -> mx.array:
    """sqrt(softplus(W·x)) in float32."""
    logits = x.astype(mx.float32) @ weight.astype(mx.float32).T
    return mx.sqrt(mx.logaddexp(logits, 0.0))


# The router's steps compiled as one graph each (a decode step runs them once per layer).
@mx.compile
def _biased_route(x, weight, bias, k: int, renormalize: bool, scale: float):
    scores = _scores(x, weight)
    biased = scores + bias.astype(mx.float32)
    idx = mx.argpartition(-biased, kth=k - 1, axis=-1)[:, :k].astype(mx.uint32)
    return idx, _weights(scores, idx, renormalize, scale)


@mx.compile
def _hash_route(x, weight, idx, renormalize: bool, scale: float):
    idx = idx.astype(mx.uint32)
    return idx, _weights(_scores(x, weight), idx, renormalize, scale)


@functools.cache
def _weighted_swiglu(dtype: mx.Dtype):
    """Clamped SwiGLU times the route weight, cast to the down projection's input: one kernel."""
    return mx.compile(lambda gate, up, w, limit: (clamped_swiglu(gate, up, limit) * w).astype(dtype))


class RoutedExperts(nn.Module):
    """The routed experts of one layer; w1 = gate, w3 = up, w2 = down, stacked [E, out, in]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, d, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.w1 = SwitchLinear(d, f, e, bias=False)
        self.w3 = SwitchLinear(d, f, e, bias=False)
        self.w2 = SwitchLinear(f, d, e, bias=False)
        self.limit = config.swiglu_limit

    def __call__(self, x: mx.array, idx: mx.array | None, weights: mx.array | None,
                 route: Route | None = None) -> mx.array:
        """x [N, D], idx/weights [N, k] → Σ_j weights_j · down_j(mid_j), [N, D]. ``route``
        instead of idx / weights (one token): the selection left to the decode kernel."""
        if kernels.dispatch.backend() != "ops":  # under "ops" no kernel serves: skip the weight checks
            fused = kernels.moe_experts(x, idx, weights, self.w1, self.w3, self.w2, self.limit,
                                        route)
            if fused is not None:  # Metal (or emulated) kernels on the packed blocks
                return fused
        if route is not None:
            idx, weights = route.select()
        n, k = idx.shape
        if n == 1 and all(type(m) is QuantizedSwitchLinear and "bias" not in m and m.get("biases") is None
                          for m in (self.w1, self.w3, self.w2)):
            return self._one_token(x, idx, weights)
        xe = mx.expand_dims(x, (-2, -3))  # [N, 1, 1, D]
        do_sort = n > 1 or idx.size >= _SORT_THRESHOLD
        inv_order = None
        if do_sort:
            flat = idx.flatten()
            order = mx.argsort(flat)
            inv_order = mx.argsort(order)
            xe = xe.reshape(n, -1)[order // k][:, None, :]  # [N·k, 1, D]
            sel = flat[order]
        else:
            sel = idx
        g = self.w1(xe, sel, sorted_indices=do_sort)
        u = self.w3(xe, sel, sorted_indices=do_sort)
        # The official graph applies the route weight before the down projection.
        w = weights.flatten()[order][:, None, None] if do_sort else weights[..., None, None]
        mid = _weighted_swiglu(x.dtype)(g, u, w, self.limit)
        y = self.w2(mid, sel, sorted_indices=do_sort)
        if do_sort:
            y = y[inv_order].reshape(n, k, -1)
        else:
            y = y.squeeze(-2)
        return mx.sum(y.astype(mx.float32), axis=-2).astype(x.dtype)


    def _one_token(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        """One token's k experts as three gathered quantized matmuls with the row indices given
        (a switch module's call builds them per projection: arange, reshape, broadcast)."""
        k = idx.shape[1]
        first, each = _lhs_indices(k)

        def gathered(m, v, lhs):
            return mx.gather_qmm(v, m["weight"], m["scales"], None, lhs_indices=lhs, rhs_indices=idx,
                                 transpose=True, group_size=m.group_size, bits=m.bits, mode=m.mode)

        xe = x[:, None, :]  # [1, 1, D]
        g, u = gathered(self.w1, xe, first), gathered(self.w3, xe, first)  # [1, k, 1, F]
        mid = _weighted_swiglu(x.dtype)(g, u, weights[..., None, None], self.limit)
        y = gathered(self.w2, mid, each)  # [1, k, 1, D]
        return mx.sum(y.squeeze(-2).astype(mx.float32), axis=-2).astype(x.dtype)


@functools.cache
def _lhs_indices(k: int) -> tuple[mx.array, mx.array]:
    """Row indices of one token's k expert products: all k read row 0 of the token; the down
    projection reads row j of the k mid rows."""
    first, each = mx.zeros((1, k), mx.uint32), mx.arange(k, dtype=mx.uint32)[None]
    mx.eval(first, each)
    return first, each


@functools.cache
def _swiglu_as(dtype: mx.Dtype):
    """Clamped SwiGLU, then the cast to the down projection's input dtype, in one kernel."""
    return mx.compile(lambda gate, up, limit: clamped_swiglu(gate, up, limit).astype(dtype))


class SharedExpert(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, f = config.hidden_size, config.moe_intermediate_size * config.n_shared_experts
        self.w1 = nn.Linear(d, f, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)
        self.limit = config.swiglu_limit

        self._w13: MergedLinear | None = None
        # fold_weights' answer with the modules it was built from (a decode step asks per
        # layer); set past nn.Module, which would take a tuple for a child
        object.__setattr__(self, "_fold", ((), None))

    def merge_projections(self) -> MergedLinear:
        """Gate and up as one matmul (built on first use, again after the weights changed)."""
        if self._w13 is None or not self._w13.holds([self.w1, self.w3]):
            self._w13 = MergedLinear([self.w1, self.w3])
        return self._w13

    def fold_weights(self) -> kernels.Shared | None:
        """Its weights as the decode MoE kernels take them (gate | up merged, down), so that
        one decoded token runs it inside the routed experts' launches; None when its
        projections are not plain float, GGUF, or MLX mxfp8 / affine 8-bit group 32 ones
        (other quantizations, biased, wrapped).

        Built once: the weights are fixed after load. Only replacing a projection module
        (the imatrix recorder wraps them) builds it again."""
        modules = (self.w1, self.w3, self.w2)
        built, fold = self._fold
        if len(built) != 3 or any(a is not b for a, b in zip(modules, built)):
            fold = self._build_fold()
            object.__setattr__(self, "_fold", (modules, fold))
        return fold

    def _build_fold(self) -> kernels.Shared | None:
        # gate | up: the merged rows (MergedLinear concatenated them once at load, weights,
        # scales and biases alike, and the modules keep views: nothing held twice)
        w13 = self.merge_projections()
        gu = kernel_part(w13.modules[0], w13.whole) if w13.merged else None
        dw = kernel_part(self.w2)
        return None if gu is None or dw is None else kernels.Shared(gu, dw)

    def __call__(self, x: mx.array, add: mx.array | None = None) -> mx.array:
        """The shared expert of ``x [N, D]``, plus ``add`` (the routed experts' sum) if given."""
        w13 = self.merge_projections()
        if (add is not None and w13.merged and type(self.w2) is nn.Linear and "bias" not in self.w2
                and kernels.shared_down_serves(self.w2.weight, x.shape[0], x.dtype)):
            # SwiGLU, the down projection and the sum with the routed experts: one kernel
            return kernels.shared_down(w13.product(x), self.w2.weight, self.limit, add)
        gate, up = w13(x)
        y = self.w2(_swiglu_as(x.dtype)(gate, up, self.limit))
        return y if add is None else add + y


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.gate = Gate(config, layer)
        self.experts = RoutedExperts(config)
        self.shared_experts = SharedExpert(config)

    def __call__(self, x: mx.array, token_ids: mx.array, x32: mx.array | None = None) -> mx.array:
        """``x32``: x in float32 where the caller has it (the router's input: no cast)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        xr = flat if x32 is None else x32.reshape(-1, shape[-1])
        # one decoded token of a score-routed layer: the decode MoE kernels select the experts
        route = self.gate.route(xr) if flat.shape[0] == 1 else None
        if route is not None:
            folded = self._folded(flat, None, None, route)
            if folded is not None:
                return folded.reshape(shape)
            # the shared expert apart; the routed experts' kernel still selects (no router launch)
            return self.shared_experts(flat, add=self.experts(flat, None, None, route)).reshape(shape)
        idx, w = self.gate(xr, token_ids.reshape(-1))
        folded = self._folded(flat, idx, w)
        if folded is not None:
            return folded.reshape(shape)
        return self.shared_experts(flat, add=self.experts(flat, idx, w)).reshape(shape)

    def _folded(self, x: mx.array, idx: mx.array | None, w: mx.array | None,
                route: Route | None = None) -> mx.array | None:
        """One decoded token: the shared expert as one more slot of the routed experts' decode
        kernels (two launches for both; with ``route`` instead of idx / w, the router's
        selection made inside them too); None where the kernels do not take it."""
        routed, shared = self.experts, self.shared_experts
        if x.shape[0] != 1 or kernels.dispatch.backend() == "ops" or routed.limit != shared.limit:
            return None
        weights = shared.fold_weights()
        if weights is None:
            return None
        return kernels.moe_experts_shared(x, idx, w, routed.w1, routed.w3, routed.w2, routed.limit,
                                          weights, route)

"""What the kernel check runs: the variants' specs, and per variant its cases on small random
inputs, each pairing a kernel call (forced onto the kernel path by ``check``) with its ops twin.

Split from ``check`` (which runs the cases, records passes and does the first-use check) so that
each stays a readable size; ``check`` re-exports the names its users know it by. The fused
attention kernels' cases are in ``check_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from ..quant import gguf as gguf_formats
from ..quant.gguf import q8_0
from ..quant.codecs import MX_GROUP
from . import dispatch, grid, hyper, matvec, moe, router, shared
from .source import ROUTE_MAX_K, dtype_name

CHECK_VERSION = 10  # bump when the cases change, so recorded passes are redone
MLX_PAIR = "MXFP4-mlx"  # MLX mxfp4 (weight, scales) experts, as opposed to GGUF MXFP4 blocks
# Max relative error allowed (max |kernel - twin| / max |twin|, over the finite values; integer
# outputs such as indices must be equal). float32: the kernels call precise:: exp, log, sqrt,
# rsqrt, sin and cos (Metal's fast ones are a few ulp off), so what differs is the summation
# order, ~1e-6 in practice; a wrong layout or index is off by far more than 1e-4. Half dtypes:
# one rounding of the output (bf16 ulp 2^-8). FP8-rounded rows: see _fp8_edges.
TOLERANCE = {mx.float32: 1e-4, mx.float16: 2e-2, mx.bfloat16: 2e-2}
_K_IN, _ROWS, _DOWN_ROWS, _HC_D = 256, 20, 37, 200  # small dims, off the kernels' tile sizes
_HC_GRID_D = 1100  # hc_pre's grid form: 4 x 1100 = 8 chunks of HC_CHUNK and a partial ninth
_HEADS, _KEYS = 3, 37  # attention / indexer heads and keys of the checks (run-time sizes)
# The dims that are template arguments of each named variant's kernels: they make the verdict
# and the record key (run-time sizes such as the context length do not, so no re-check per
# token). The indexer's two kernels are checked apart: scores by heads and head dim at the key
# dtype, top-k by k on float32 scores (each entry point knows only its own dims).
KEY_DIMS: dict[str, tuple[str, ...]] = {
    dispatch.HC_PRE: ("hc_mult", "grid"),
    dispatch.ATTENTION: ("head_dim", "rope_dims"),
    dispatch.INDEXER: ("index_heads", "index_head_dim", "index_topk", "rope_dims"),
    dispatch.ROPE_ROWS: ("head_dim", "rope_dims", "q_rank"),
    dispatch.ROUTER: ("n_experts", "experts_per_token", "renormalize"),
    dispatch.SHARED_DOWN: (),  # every size is a run-time argument
    dispatch.DENSE_MATVEC: (),  # every size is a run-time argument (layouts: template, all cased)
    dispatch.GRID_SYNC: (),  # the probe: whether the multi-threadgroup form works at all
}
# Variants whose check covers their grid-synchronised form as well when dispatch.grid_sync()
# allows it (their record key says which forms were checked). A variant with the key dim
# ``grid`` checks that form apart (grid=1, its own verdict): failing, it is switched off
# alone and the one-threadgroup form (grid=None) serves.
SYNC_USERS: tuple[str, ...] = (dispatch.HC_PRE, dispatch.INDEXER)  # hc_pre's grid form, indexer_pick_q


@dataclass(frozen=True)
class Spec:
    """One variant and the model dims that decide its kernels' inputs."""

    variant: str  # weight layout name, MLX_PAIR or one of dispatch.NAMED_VARIANTS
    dtype: mx.Dtype = mx.float32  # activation dtype (attention: of the KV rows; indexer: keys)
    experts_per_token: int = 6
    n_experts: int = 8
    hc_mult: int = 4
    renormalize: int = 1  # router: norm_topk_prob
    head_dim: int | None = None  # attention; rope_rows: features per row
    rope_dims: int | None = None  # rope_rows, indexer queries: rotated features
    index_heads: int | None = None  # indexer scores
    index_head_dim: int | None = None  # indexer scores
    index_topk: int | None = None  # indexer top-k
    q_rank: int | None = None  # rope_rows: width of the q_norm rows it normalises alongside
    grid: int | None = None  # hc_pre: 1 = its grid-synchronised form (checked apart)

    def key(self) -> tuple[int | None, ...]:
        return tuple(getattr(self, f) for f in KEY_DIMS.get(self.variant, ()))

    def dims_text(self) -> str:
        return ", ".join(f"{f}={getattr(self, f)}" for f in KEY_DIMS.get(self.variant, ())
                         if getattr(self, f) is not None)

    def label(self) -> str:
        dims = self.dims_text()
        return f"{self.variant} ({dtype_name(self.dtype)}{', ' + dims if dims else ''})"

    def fallback(self) -> str:
        """What serves this variant's calls once it is switched off."""
        if self.variant == dispatch.GRID_SYNC:
            return "the kernels keep their one-threadgroup forms"
        if self.grid:
            return "its one-threadgroup form serves it instead"
        return "the ops path serves it instead"


@dataclass(frozen=True)
class Case:
    kernel: str
    inputs: str
    run: Callable[[], tuple[list[mx.array], list[mx.array]]]  # -> (kernel outputs, twin outputs)




# ----------------------------------------------------------------------------- inputs
def random_experts(variant: str, e: int, rows: int, k: int, seed: int):
    """Experts ``[e, rows, ·]`` of ``k`` inputs: random weights quantized by the format's own
    quantizer (``quant/gguf``) or ``mx.quantize`` for MLX mxfp4."""
    x = np.random.default_rng(seed).standard_normal((e, rows, k)).astype(np.float32) * 0.02
    if variant == MLX_PAIR:
        w, s = mx.quantize(mx.array(x), group_size=MX_GROUP, bits=4, mode="mxfp4")
        return w, s
    blocks = gguf_formats.get(variant).quantize(x.reshape(e * rows, k))
    return mx.array(blocks.reshape(e, rows, -1))


def _fmt(variant: str) -> str:
    return "MXFP4" if variant == MLX_PAIR else variant


def _acts(shape: tuple[int, ...], seed: int, dtype: mx.Dtype, scale: float = 1.0) -> mx.array:
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale
    return mx.array(a).astype(dtype)


def _routes(n: int, k: int, e: int, seed: int) -> mx.array:
    ids = np.random.default_rng(seed).integers(0, e, (n, k))
    if k > 1:
        ids[0, 1] = ids[0, 0]  # one token picks an expert twice
    return mx.array(ids.astype(np.uint32))


def _placement(n_ids: int) -> str:
    return "constant" if n_ids < 8 else "device"  # MLX's rule for small inputs


def builders() -> dict[str, Callable[[Spec], list[Case]]]:
    """The case builders of the named variants whose cases live here (the attention's are in
    kernels/check_attention.py; ``check.cases`` joins them); a weight layout takes
    :func:`moe_cases`."""
    return {dispatch.HC_PRE: _hc_cases, dispatch.ROUTER: _router_cases,
            dispatch.SHARED_DOWN: _shared_cases, dispatch.GRID_SYNC: _grid_cases,
            dispatch.DENSE_MATVEC: _dense_matvec_cases}


def moe_cases(spec: Spec) -> list[Case]:
    return _moe_cases(spec)


def _moe_cases(spec: Spec) -> list[Case]:
    v, fmt, dt = spec.variant, _fmt(spec.variant), spec.dtype
    # E only bounds the ids; a few experts keep the quantizing quick (IQ2_XXS: ~1 ms a row)
    k, e = spec.experts_per_token, min(max(spec.n_experts, 2), 8)
    w1, w3 = random_experts(v, e, _ROWS, _K_IN, 1), random_experts(v, e, _ROWS, _K_IN, 2)
    w2 = random_experts(v, e, _DOWN_ROWS, _K_IN, 3)
    # x scaled so that W·x is O(1) to O(10): the SwiGLU clamp (limit 10) bites sometimes
    x_scale = 8.0 / (0.02 * _K_IN ** 0.5)
    # Decode: one token with fewer than 8 ids (MLX passes them in `constant`; k is a runtime
    # argument, so the model's own k need not be below 8 for this to test its kernels), then
    # enough tokens for 8 or more ids (`device`); tiled: more pairs than the decode kernels take.
    few, many = max(2, -(-8 // k)), moe.DECODE_MAX_PAIRS // k + 1

    def gate_up(n: int, kn: int) -> Callable:
        def run():
            x, idx = _acts((n, _K_IN), 10 + n, dt, x_scale), _routes(n, kn, e, 20 + n)
            return ([moe.moe_gate_up(x, w1, w3, fmt, idx, 10.0)],
                    [moe.moe_gate_up_ops(x, w1, w3, fmt, idx, 10.0)])
        return run

    def down(n: int, kn: int) -> Callable:
        def run():
            mid, idx = _acts((n, kn, _K_IN), 30 + n, mx.float32, 4.0), _routes(n, kn, e, 40 + n)
            rw = mx.array(np.random.default_rng(n).uniform(0.1, 1.5, (n, kn)).astype(np.float32))
            return ([moe.moe_down(mid, w2, fmt, idx, rw, out_dtype=dt)],
                    [moe.moe_down_ops(mid, w2, fmt, idx, rw, out_dtype=dt)])
        return run

    def plain(n: int) -> Callable:
        def run():
            x, idx = _acts((n, _K_IN), 50 + n, dt, x_scale), _routes(n, k, e, 60 + n)
            return [moe.gather_qmm_native(x, w1, fmt, idx)], [moe.gather_qmm_native_ops(x, w1, fmt, idx)]
        return run

    def dequant():
        return [moe.dequantize(w1, fmt)], [moe.dequantize_ops(w1, fmt)]

    out = [Case("dequant_rows", "-", dequant)]
    for n, kn in ((1, min(k, 7)), (few, k)):
        where = f"{n} token{'s' * (n > 1)}, ids in {_placement(n * kn)}"
        out.append(Case("moe_gate_up_decode", where, gate_up(n, kn)))
        out.append(Case("moe_down_decode", where, down(n, kn)))
    tiled = f"{many} tokens, {many * k} pairs"
    out += [Case("moe_matmul_sorted gate/up", tiled, gate_up(many, k)),
            Case("moe_matmul_sorted down", tiled, down(many, k)),
            Case("moe_matmul_sorted", tiled, plain(many))]
    out += _shared_fold_cases(v, fmt, dt, k, e, w1, w3, w2, x_scale)
    if v != MLX_PAIR:  # dense GGUF projections (GGUFLinear): the matvec, or one expert tiled
        dense = w1[0]
        for n in (1, 3, matvec.MATVEC_TOKENS + 1):
            def run(n=n):
                x = _acts((n, _K_IN), 70 + n, dt, x_scale)
                return ([matvec.gguf_matmul(x, dense, fmt=fmt, input_dims=_K_IN, output_dims=_ROWS)],
                        [matvec.matmul_ops(x, dense, fmt).astype(dt)])
            kernel = "gguf_matvec" if n <= matvec.MATVEC_TOKENS else "gguf_matmul (tiled)"
            out.append(Case(kernel, f"{n} row{'s' * (n > 1)}", run))
    return out


# The shared-expert layouts the check folds into each routed variant's decode kernels (one
# per layout of kernels/shared.py): the name of its cases and of shared_weight's recipe.
SHARED_CASES = ("Q8_0", "mxfp8", "affine8 float16 (Q8_0 as loaded)",
                "affine8 float32 (any biases)", "affine8 bfloat16 (any biases)")


def shared_weight(recipe: str, rows: int, k_in: int, seed: int, dt: mx.Dtype) -> shared.SharedWeight:
    """A shared-expert part ``[rows, k_in]`` of random weights in ``recipe`` (one of
    ``SHARED_CASES``, or a float dtype name: rows in ``dt``), quantized by the format's own
    quantizer: Q8_0 blocks (and their affine view, quant/gguf/q8_0.to_mlx_affine8, as GGUF
    files load), ``mx.quantize`` for affine (its biases: not -128 scales); mxfp8: random codes
    and scales (each E4M3 code, subnormals included)."""
    x = np.random.default_rng(seed).standard_normal((rows, k_in)).astype(np.float32) * 0.02
    if recipe == "Q8_0" or recipe.startswith("affine8 float16"):
        blocks = random_experts("Q8_0", 1, rows, k_in, seed)[0]
        if recipe == "Q8_0":
            return shared.SharedWeight(blocks, "Q8_0")
        return shared.SharedWeight(*_q8_affine(blocks, mx.float16))
    if recipe == "mxfp8":
        w, s = _mxfp8_codes(np.random.default_rng(seed), rows, k_in)
        return shared.SharedWeight(w, "mxfp8", s)
    if recipe.startswith("affine8"):
        src = mx.array(x).astype(mx.bfloat16 if "bfloat16" in recipe else mx.float32)
        w, s, b = mx.quantize(src, group_size=MX_GROUP, bits=8, mode="affine")
        return shared.SharedWeight(w, "affine8", s, b)
    return shared.SharedWeight(mx.array(x).astype(dt), recipe)


def _mxfp8_codes(rng: np.random.Generator, rows: int, k_in: int) -> tuple[mx.array, mx.array]:
    """MLX mxfp8 (weight, scales) of every finite E4M3 code: odd groups of 32 hold only
    subnormals and the smallest normals (exponent field 0 or 1) under scales 2^7 larger, so
    that they weigh in the products as much as the others; weights around 0.02."""
    groups = k_in // MX_GROUP
    low = (np.arange(groups) % 2 == 1)[None, :, None]
    codes = rng.integers(0, 256, (rows, groups, MX_GROUP))
    codes = np.where(low, codes & 0x8F, codes)  # exponent field 0..1 (bit 3: 0 or 1)
    codes = np.where((codes & 0x7F) == 0x7F, codes ^ 1, codes)  # no NaN code
    s = np.where(low[..., 0], rng.integers(124, 128, (rows, groups)),
                 rng.integers(115, 119, (rows, groups)))
    w = codes.astype(np.uint8).reshape(rows, k_in).view(np.uint32)
    return mx.array(w), mx.array(s.astype(np.uint8))


def _q8_affine(blocks: mx.array, scale_dtype: mx.Dtype) -> tuple:
    w, s, b = q8_0.to_mlx_affine8(blocks, scale_dtype)
    return w, "affine8", s, b


def _shared_fold_cases(v: str, fmt: str, dt: mx.Dtype, k: int, e: int, w1, w3, w2,
                       x_scale: float) -> list[Case]:
    """The decode kernels with the shared expert as one more slot, in each format it may take
    (``SHARED_CASES``: shared.SHARED_FORMATS in each of their layouts, and float rows in the
    activation dtype): one token, k ids."""
    out = []
    kn = min(k, 7)
    for sf in (dtype_name(dt), *SHARED_CASES):
        fold = shared.Shared(shared_weight(sf, 2 * _ROWS, _K_IN, 110, dt),
                             shared_weight(sf, _DOWN_ROWS, _K_IN, 111, dt))

        def gate_up(fold=fold):
            x, idx = _acts((1, _K_IN), 112, dt, x_scale), _routes(1, kn, e, 113)
            return ([moe.moe_gate_up(x, w1, w3, fmt, idx, 10.0, False, fold)],
                    [moe.moe_gate_up_ops(x, w1, w3, fmt, idx, 10.0, fold)])

        def down(fold=fold):
            mid, idx = _acts((1, kn + 1, _K_IN), 114, mx.float32, 4.0), _routes(1, kn, e, 115)
            rw = mx.array(np.random.default_rng(116).uniform(0.1, 1.5, (1, kn)).astype(np.float32))
            return ([moe.moe_down(mid, w2, fmt, idx, rw, dt, False, fold)],
                    [moe.moe_down_ops(mid, w2, fmt, idx, rw, dt, fold)])

        out += [Case("moe_gate_up_decode + shared", f"shared {sf}, 1 token", gate_up),
                Case("moe_down_decode + shared", f"shared {sf}, 1 token", down)]
    return out + [_routed_case(fmt, dt, min(k, e), e, w1, w3, x_scale)]


def _dense_part(recipe: str, rows: int, seed: int, dt: mx.Dtype) -> shared.SharedWeight:
    """A part of a dense decode product: float rows of the dtype ``recipe`` names, else
    :func:`shared_weight`'s quantized recipes."""
    if recipe in ("float32", "float16", "bfloat16"):
        w = np.random.default_rng(seed).standard_normal((rows, _K_IN)).astype(np.float32) * 0.02
        return shared.SharedWeight(mx.array(w).astype(getattr(mx, recipe)), recipe)
    return shared_weight(recipe, rows, _K_IN, seed, dt)


def _dense_matvec_cases(spec: Spec) -> list[Case]:
    """gguf_matvec as dense_matvec runs it (output in the activation dtype): one part in each
    layout a decode projection loads into (MLX mxfp8, affine 8-bit in each scale dtype, float
    rows of the activation dtype and others), 1 and MATVEC_TOKENS rows; two unlike parts as
    real files merge them (Q8_0-as-affine | F16 or activation-dtype rows, mxfp8 | rows); the
    grouped form (affine, mxfp8), against dense_matvec_ops."""
    dt = spec.dtype
    x_scale = 8.0 / (0.02 * _K_IN ** 0.5)
    q8 = SHARED_CASES[2]
    floats = list(dict.fromkeys((dtype_name(dt), "float32", "float16")))
    singles = [*floats, "mxfp8", *SHARED_CASES[2:]]
    pairs = [(q8, "float16"), (q8, dtype_name(dt)), ("mxfp8", dtype_name(dt))]

    def case(recipes: tuple[str, ...], n: int, groups: int = 0) -> Callable:
        def run():
            rows = [_ROWS * max(groups, 1), _DOWN_ROWS][:len(recipes)]
            w = matvec.DenseWeights([_dense_part(r, m, 130 + i, dt)
                                     for i, (r, m) in enumerate(zip(recipes, rows))], groups)
            shape = (n, groups, _K_IN) if groups else (n, _K_IN)
            x = _acts(shape, 140 + n, dt, x_scale)
            return [matvec.dense_matvec(x, w)], [matvec.dense_matvec_ops(x, w)]
        return run

    out = [Case("gguf_matvec", f"{r}, {n} row{'s' * (n > 1)}", case((r,), n))
           for r in singles for n in (1, matvec.MATVEC_TOKENS)]
    out += [Case("gguf_matvec two parts", f"{a} | {b}, 3 rows", case((a, b), 3)) for a, b in pairs]
    out += [Case("gguf_matvec grouped", f"{r}, 2 groups, {n} rows", case((r,), n, 2))
            for r in (q8, "mxfp8") for n in (1, 3)]
    return out


def _routed_case(fmt: str, dt: mx.Dtype, k: int, e: int, w1, w3, x_scale: float,
                 renormalize: bool = True) -> Case:
    """moe_gate_up_decode selecting the token's experts itself (ROUTE), with the shared expert
    in the activation dtype as the model runs it: mid, ids and route weights against the
    router's twin and the gate/up twin (both sides sorted by expert id)."""
    fold = shared.Shared((_acts((2 * _ROWS, _K_IN), 120, dt, 0.02), dtype_name(dt)),
                         (_acts((_DOWN_ROWS, _ROWS), 121, dt, 0.02), dtype_name(dt)))

    def run():
        rng = np.random.default_rng(e + k)
        x = _acts((1, _K_IN), 122, dt, x_scale)
        route = router.Route(mx.array((rng.standard_normal((1, e)) * 4).astype(np.float32)),
                             mx.array((rng.standard_normal(e) * 0.1).astype(np.float32)),
                             k, renormalize, 1.5)
        return (_routed_by_id(*moe.moe_gate_up_routed(x, w1, w3, fmt, route, 10.0, fold)),
                _routed_by_id(*moe.moe_gate_up_routed_ops(x, w1, w3, fmt, route, 10.0, fold)))

    return Case("moe_gate_up_decode + route", f"top-{k} of {e} picked in the kernel, shared "
                f"{dtype_name(dt)}", run)


def _routed_by_id(mid: mx.array, idx: mx.array, w: mx.array) -> list[mx.array]:
    """(mid, ids, weights) with the routed slots in expert-id order (the shared slot last)."""
    k = idx.shape[1]
    order = mx.argsort(idx, axis=-1)
    slots = mx.take_along_axis(mid[:, :k], order[..., None], axis=1)
    return [mx.concatenate([slots, mid[:, k:]], axis=1), *_by_id(idx, w)]


def _hc_cases(spec: Spec) -> list[Case]:
    m = spec.hc_mult
    mix = 2 * m + m * m
    rng = np.random.default_rng(7)
    args = dict(iters=20, eps=1e-6, norm_eps=1e-6)
    base = mx.array(rng.uniform(-1, 1, mix).astype(np.float32))
    scale = mx.array(rng.uniform(0.5, 3.0, 3).astype(np.float32))

    from ..ops import RMSNorm  # the sublayer norm the fused variant applies

    def weights(d: int) -> tuple[mx.array, RMSNorm]:
        fn = mx.array((rng.standard_normal((mix, m * d)) / np.sqrt(m * d)).astype(np.float32))
        norm = RMSNorm(d, eps=1e-6)
        norm.weight = mx.array(rng.uniform(0.5, 1.5, d).astype(np.float32)).astype(spec.dtype)
        return fn, norm

    one, split = weights(_HC_D), weights(_HC_GRID_D)

    def run_for(n: int, fused: bool, grid: bool) -> Callable:
        def run():
            fn, norm = split if grid else one
            d = norm.weight.shape[0]
            h = _acts((n, m, d), 80 + n, spec.dtype)
            kw = dict(args)
            if fused:  # the previous sublayer's post and the next one's norm in the same kernel
                prev = (_acts((n, d), 90 + n, spec.dtype),
                        mx.sigmoid(_acts((n, m), 91 + n, mx.float32)) * 2,
                        mx.softmax(_acts((n, m, m), 92 + n, mx.float32), axis=-1))
                kw.update(norm=norm, prev=prev, out_dtype=spec.dtype, also_f32=n == 1)
            return (list(hyper.hc_pre(h, fn, base, scale, grid=grid, **kw)),
                    list(hyper.hc_pre_ops(h, fn, base, scale, **kw)))
        return run

    # spec.grid: the grid form (several threadgroups per token, metal/grid.h), where it can
    # serve; else the one-threadgroup form
    if spec.grid:
        calls = ((1, False), (1, True), (2, True)) if dispatch.grid_sync() else ()
    else:
        calls = ((1, False), (3, False), (1, True), (2, True))
    forms = [(n, fused, bool(spec.grid)) for n, fused in calls]
    return [Case("hc_pre", f"{n} token{'s' * (n > 1)}, M={m}"
                 f"{', previous post and norm' * fused}{', float32 x' * (fused and n == 1)}"
                 f"{', split over threadgroups (grid form)' * grid}", run_for(n, fused, grid))
            for n, fused, grid in forms]


def _grid_cases(spec: Spec) -> list[Case]:
    # several launches on one counter: a counter not put back breaks the next one there
    def run_for(shapes: tuple[tuple[int, int], ...]) -> Callable:
        def run():
            xs = [_acts(s, 60 + i, mx.float32) for i, s in enumerate(shapes)]
            got = []
            for x in xs:
                got.append(grid.grid_sum(x))
                mx.eval(got[-1])
            return got, [grid.grid_sum_ops(x) for x in xs]
        return run

    # the call site's counter slots, each once, then the first again
    again = ((1, 1024),) * (dispatch.COUNTER_SLOTS + 1)
    return [Case("grid_sum", "1 row of 16 threadgroups, every counter slot and one more",
                 run_for(again)),
            Case("grid_sum", "3 rows of 4 threadgroups (the last partial), then 1 of 1",
                 run_for(((3, 200), (1, 40))))]


_twins = dispatch._twins  # the twins that live above the kernels (dispatch.install_twin)


def install_twin(variant: str, twin: Callable) -> None:
    """Give the check the ops twin of a kernel whose twin lives above the kernels: for
    ``rope_rows`` the model's own ops (installed by ds4mlx.model.rope when it is imported)."""
    dispatch.install_twin(variant, twin)


def twin(name: str) -> Callable | None:
    """The ops twin installed for ``name`` (:func:`install_twin`), or None."""
    return dispatch.twin(name)


def _router_cases(spec: Spec) -> list[Case]:
    e, k = spec.n_experts, min(spec.experts_per_token, spec.n_experts)

    def run_for(n: int) -> Callable:
        def run():
            rng = np.random.default_rng(n)
            logits = mx.array((rng.standard_normal((n, e)) * 4).astype(np.float32))
            bias = mx.array((rng.standard_normal(e) * 0.1).astype(np.float32))
            args = (logits, bias, k, bool(spec.renormalize), 1.5)
            # the kernel lists experts by score, the twin in argpartition's order: sort by id
            return _by_id(*router.router_topk(*args)), _by_id(*router.router_topk_ops(*args))
        return run

    out = [Case("router_topk", f"{n} token{'s' * (n > 1)}, top-{k} of {e}", run_for(n))
           for n in (1, 3)]
    if k <= ROUTE_MAX_K:  # the same selection inside the decode MoE kernel, at these dims
        w1, w3 = (random_experts("Q8_0", e, _ROWS, _K_IN, seed) for seed in (4, 5))
        out.append(_routed_case("Q8_0", mx.float32, k, e, w1, w3, 8.0 / (0.02 * _K_IN ** 0.5),
                                bool(spec.renormalize)))
    return out


def _shared_cases(spec: Spec) -> list[Case]:
    dt, f = spec.dtype, _HC_D  # F off the lanes' stride, R off the rows per threadgroup

    def run_for(n: int, limit: float) -> Callable:
        def run():
            gu = _acts((n, 2 * f), 100 + n, dt, 4.0)  # some beyond the clamp
            w = _acts((_DOWN_ROWS, f), 101, dt, f ** -0.5)
            add = _acts((n, _DOWN_ROWS), 102 + n, dt)
            return ([matvec.shared_down(gu, w, limit, add)],
                    [matvec.shared_down_ops(gu, w, limit, add)])
        return run

    return [Case("shared_down", f"{n} token{'s' * (n > 1)}, limit {limit:g}", run_for(n, limit))
            for n, limit in ((1, 10.0), (3, 0.0), (matvec.SHARED_MAX_TOKENS, 7.0))]


def _by_id(idx: mx.array, w: mx.array) -> list[mx.array]:
    order = mx.argsort(idx, axis=-1)
    return [mx.take_along_axis(idx, order, axis=-1), mx.take_along_axis(w, order, axis=-1)]

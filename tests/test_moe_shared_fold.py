"""The shared expert folded into the decode MoE kernels as real files load it: MLX mxfp8 (the
official FP8 files) and affine 8-bit group 32 (GGUF Q8_0 as loaded, fp16 or fp32 scales; MLX
dirs with any biases), against the ops twins and numpy; whole models (a tiny official
checkpoint, a tiny ds4 GGUF) decoding with no router launch and no shared-expert module call;
a shared expert that does not fold still leaves the router's selection to the decode kernel."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from ds4mlx import kernels
from ds4mlx.kernels import emu as kernel_emu
from ds4mlx.quant import codecs
from ds4mlx.quant.gguf import q8_0
from kernel_paths import path, record_launches  # noqa: F401 (path: the kernel-path fixture)
from test_kernels_moe import assert_close, fmt_name, inputs_for, random_experts, routes

# recipe -> (fmt, scale dtype, biases): Q8_0 blocks as io/gguf.py loads them (biases = -128
# scales), or mx.quantize's affine (biases of their own)
RECIPES = ["mxfp8", "affine8-f16-q8", "affine8-f32-q8", "affine8-f32-any", "affine8-bf16-any",
           "affine8-f16-any"]
_DT = {"f16": mx.float16, "f32": mx.float32, "bf16": mx.bfloat16}


def mlx_part(recipe: str, rows: int, k_in: int, seed: int) -> kernels.SharedWeight:
    rng = np.random.default_rng(seed)
    if recipe == "mxfp8":  # every finite E4M3 code, subnormals included
        codes = rng.choice(codecs.E4M3_FINITE_CODES, (rows, k_in))
        small = rng.random((rows, k_in // 32)) < 0.5  # groups of subnormals / smallest normals
        codes = np.where(np.repeat(small, 32, axis=1), codes & 0x8F, codes).astype(np.uint8)
        s = np.where(small, rng.integers(124, 128, small.shape), rng.integers(114, 118, small.shape))
        return kernels.SharedWeight(mx.array(codes.view(np.uint32)), "mxfp8",
                                    mx.array(s.astype(np.uint8)))
    _, dt, kind = recipe.split("-")
    if kind == "q8":
        blocks = random_experts("Q8_0", 1, rows, k_in, seed)[0]
        w, s, b = q8_0.to_mlx_affine8(blocks, _DT[dt])
    else:
        x = mx.array(rng.standard_normal((rows, k_in)).astype(np.float32) * 0.02).astype(_DT[dt])
        w, s, b = mx.quantize(x, group_size=32, bits=8, mode="affine")
        assert not mx.array_equal(b, s * -128).item()  # biases of their own
    assert s.dtype == _DT[dt] and b.dtype == _DT[dt]
    return kernels.SharedWeight(w, "affine8", s, b)


def numpy_rows(part: kernels.SharedWeight) -> np.ndarray:
    """Float32 rows from the raw arrays, in numpy (not the twin's code)."""
    codes = np.asarray(part.weight).view(np.uint8)
    rows, k = codes.shape
    if part.fmt == "mxfp8":
        scale = codecs.e8m0_decode(np.asarray(part.scales))
        return codecs.e4m3_decode(codes) * np.repeat(scale, 32, axis=1)
    s = np.repeat(np.asarray(part.scales.astype(mx.float32)), 32, axis=1)
    b = np.repeat(np.asarray(part.biases.astype(mx.float32)), 32, axis=1)
    return (s * codes.astype(np.float32) + b).astype(np.float32)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("fmt", ["Q8_0", "MXFP4-mlx"])
def test_shared_slot_in_mlx_layouts(path, fmt, recipe, dtype):
    """moe_gate_up / moe_down with the shared slot in an MLX layout: kernel == ops twin, the
    twin's rows == numpy's exactly, the shared slot == numpy's product."""
    e, f, k_in, d, k = 5, 96, 160, 37, 6
    w1, w3 = random_experts(fmt, e, f, k_in, seed=80), random_experts(fmt, e, f, k_in, seed=81)
    w2 = random_experts(fmt, e, d, f, seed=82)
    shared = kernels.Shared(mlx_part(recipe, 2 * f, k_in, 83), mlx_part(recipe, d, f, 84))
    for part in (shared.gate_up, shared.down):
        np.testing.assert_array_equal(np.asarray(kernels.shared.shared_dense(part)), numpy_rows(part))
    assert kernels.shared.shared_folds(shared, dtype)
    x = inputs_for(w1, fmt, 1, k_in, seed=85).astype(dtype)
    idx = routes(1, k, e, seed=86)
    rw = mx.array(np.random.default_rng(87).uniform(0.1, 1.5, (1, k)).astype(np.float32))
    rel = 1e-5 if dtype == mx.float32 else 2e-2
    mid = kernels.moe_gate_up(x, w1, w3, fmt_name(fmt), idx, 10.0, False, shared)
    ref = kernels.moe_gate_up_ops(x, w1, w3, fmt_name(fmt), idx, 10.0, shared)
    assert mid.shape == (1, k + 1, f)
    assert_close(mid, ref, 1e-5)  # float32 products of the same (dtype) x
    g, u = np.split(np.asarray(x.astype(mx.float32)) @ numpy_rows(shared.gate_up).T, 2, axis=-1)
    g, u = np.minimum(g, 10.0), np.clip(u, -10.0, 10.0)
    own = g / (1 + np.exp(-g)) * u
    assert np.abs(np.asarray(mid[:, k]) - own).max() <= 1e-5 * np.abs(own).max()
    y = kernels.moe_down(ref, w2, fmt_name(fmt), idx, rw, dtype, False, shared)
    assert_close(y, kernels.moe_down_ops(ref, w2, fmt_name(fmt), idx, rw, dtype, shared), rel)
    routed = np.asarray(kernels.moe_down_ops(ref[:, :k], w2, fmt_name(fmt), idx, rw))
    numpy = routed + np.asarray(ref[:, k]) @ numpy_rows(shared.down).T
    assert np.abs(np.asarray(y.astype(mx.float32)) - numpy).max() <= rel * np.abs(numpy).max()


def test_shared_folds_refuses_what_the_kernels_do_not_take():
    part = mlx_part("affine8-f32-any", 64, 64, 1)
    ok = kernels.Shared(part, mlx_part("affine8-f32-any", 32, 32, 2))
    assert kernels.shared.shared_folds(ok, mx.float32)
    no_biases = kernels.Shared(part._replace(biases=None), ok.down)
    other = kernels.Shared(part._replace(biases=part.biases.astype(mx.float16)), ok.down)
    ints = kernels.Shared(part._replace(scales=part.scales.astype(mx.int32),
                                        biases=part.biases.astype(mx.int32)), ok.down)
    mx8 = mlx_part("mxfp8", 64, 64, 3)
    mx8_biased = kernels.Shared(mx8._replace(biases=mx8.scales), ok.down)
    for bad in (no_biases, other, ints, mx8_biased):
        assert not kernels.shared.shared_folds(bad, mx.float32)


def _quantized(m: nn.Linear, mode: str, bits: int = 8, group: int = 32, dtype=mx.float32):
    q = nn.QuantizedLinear.from_linear(m, group_size=group, bits=bits, mode=mode)
    if q.get("biases") is not None:
        q.scales, q.biases = q.scales.astype(dtype), q.biases.astype(dtype)
    return q


@pytest.mark.parametrize("mode,bits,group,folds", [("mxfp8", 8, 32, "mxfp8"),
                                                   ("affine", 8, 32, "affine8"),
                                                   ("affine", 4, 32, None), ("affine", 8, 64, None),
                                                   ("mxfp4", 4, 32, None)])
def test_fold_of_quantized_projections(mode, bits, group, folds):
    """SharedExpert's fold of QuantizedLinear projections: the merged gate | up arrays
    (MergedLinear's, which the modules view: no second copy), the down module's own; None
    where the kernels take no such layout."""
    from ds4mlx.config import ModelConfig
    from ds4mlx.model.moe import SharedExpert
    from ds4mlx.synthetic import tiny_config

    se = SharedExpert(ModelConfig.from_hf(tiny_config(moe_intermediate_size=128, hidden_size=256)))
    for name in ("w1", "w3", "w2"):
        setattr(se, name, _quantized(getattr(se, name), mode, bits, group, mx.float16))
    fold = se.fold_weights()
    if folds is None:
        assert fold is None
        return
    whole = se.merge_projections().whole
    assert fold.gate_up.fmt == fold.down.fmt == folds
    assert fold.gate_up.weight is whole["weight"] and fold.gate_up.scales is whole["scales"]
    assert fold.down.weight is se.w2.weight and fold.down.scales is se.w2.scales
    assert fold.gate_up.weight.shape == (256, 256 // 4)
    if folds == "affine8":
        assert fold.gate_up.biases is whole["biases"] and fold.gate_up.scales.dtype == mx.float16
    assert kernels.shared.shared_folds(fold, mx.float32)
    np.testing.assert_array_equal(  # gate rows, then up rows
        np.asarray(kernels.shared.shared_dense(fold.gate_up)[:128]),
        np.asarray(kernels.shared.shared_dense(kernels.SharedWeight(
            se.w1.weight, folds, se.w1.scales, se.w1.get("biases")))))


# ----------------------------------------------------------------------------- whole models
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A 2-layer tiny checkpoint (one hash layer, one score layer) as a ds4-q4 GGUF: Q4_K
    experts, Q8_0 shared expert (MLX affine 8-bit once loaded)."""
    from ds4mlx.convert import convert
    from ds4mlx.synthetic import write_tiny_checkpoint

    d = tmp_path_factory.mktemp("shared-fold")
    ckpt = write_tiny_checkpoint(d / "ckpt", seed=4, num_layers=2, num_hash_layers=1, mtp=False)
    return convert(ckpt, d / "tiny.gguf", to="gguf", preset="ds4-q4", progress=False, jobs=1)


def _decode_run(model, tokens: mx.array, backend: str):
    """Logits of a prefill of 5 tokens and 1-token steps; with the launches and the shared
    expert modules' calls of the 1-token steps."""
    from ds4mlx.model.moe import SharedExpert

    kernels.set_backend(backend)
    calls: list[int] = []
    call = SharedExpert.__call__
    try:
        cache = model.make_cache()
        outs = [model(tokens[:, :5], cache=cache)]
        mx.eval(outs)
        with pytest.MonkeyPatch.context() as mp:
            launches = record_launches(mp)
            mp.setattr(SharedExpert, "__call__",
                       lambda self, *a, **kw: calls.append(1) or call(self, *a, **kw))
            for i in range(5, tokens.shape[1]):
                outs.append(model(tokens[:, i:i + 1], cache=cache))
                mx.eval(outs[-1])
    finally:
        kernels.set_backend()
    return np.concatenate([np.asarray(o) for o in outs], axis=1), launches, calls


def _check_folded_decode(model, fmt: str, scales_dtype) -> None:
    folds = [blk.ffn.shared_experts.fold_weights() for blk in model.layers]
    assert all(f is not None and f.gate_up.fmt == f.down.fmt == fmt for f in folds)
    assert {f.gate_up.scales.dtype for f in folds} == {scales_dtype}
    tokens = mx.array(np.random.default_rng(6).integers(2, 1000, (1, 9)))
    ref, _, _ = _decode_run(model, tokens, "ops")
    got, launches, calls = _decode_run(model, tokens, "emulate")
    steps = tokens.shape[1] - 5
    assert launches.count("moe_gate_up_decode") == launches.count("moe_down_decode") \
        == steps * len(model.layers)
    assert "router_topk" not in launches and "shared_down" not in launches and not calls
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.skipif(kernel_emu.compiler() is None, reason="no C++ compiler for the emulator")
def test_official_checkpoint_decodes_with_the_mxfp8_shared_expert_folded(tiny_ckpt):
    import ds4mlx

    model, _ = ds4mlx.load(tiny_ckpt, qat_rounding=False, dtype=mx.float32)
    _check_folded_decode(model, "mxfp8", mx.uint8)


@pytest.mark.skipif(kernel_emu.compiler() is None, reason="no C++ compiler for the emulator")
def test_ds4_gguf_decodes_with_the_q8_0_shared_expert_folded(tiny_gguf):
    from ds4mlx.loader import load_gguf

    model, _ = load_gguf(tiny_gguf, dtype=mx.float32, qat_rounding=False)
    _check_folded_decode(model, "affine8", mx.float16)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_unfolded_shared_expert_still_routes_in_the_kernel(path, dtype, monkeypatch):
    """A shared expert wider than the routed ones does not fold: the routed experts still take
    the router's selection inside moe_gate_up_decode (no router_topk), the shared expert runs
    apart, and the result is the ops path's."""
    from ds4mlx.config import ModelConfig
    from ds4mlx.layers.gguf import GGUFSwitchLinear
    from ds4mlx.model.moe import MoE
    from ds4mlx.quant.gguf import get
    from ds4mlx.synthetic import tiny_config

    cfg = tiny_config(moe_intermediate_size=256, hidden_size=256, n_routed_experts=12,
                      experts_per_token=4, num_hash_layers=1)
    cfg["n_shared_experts"] = 2
    moe = MoE(ModelConfig.from_hf(cfg), layer=3)
    rng = np.random.default_rng(90)
    for name, t, seed in (("w1", "Q4_K", 91), ("w3", "Q4_K", 92), ("w2", "Q8_0", 93)):
        setattr(moe.experts, name, GGUFSwitchLinear.from_blocks(
            random_experts(t, 12, 256, 256, seed), get(t).GGML_TYPE, 256))
    for name in ("w1", "w3", "w2"):  # 8-bit affine, fp16 scales: as a Q8_0 file loads them
        m = getattr(moe.shared_experts, name)
        m.weight = mx.array((rng.standard_normal(m.weight.shape) * 0.05).astype(np.float32))
        setattr(moe.shared_experts, name, _quantized(m, "affine", dtype=mx.float16))
    moe.gate.weight = mx.array(rng.standard_normal((12, 256)).astype(np.float32) * 0.1)
    moe.gate.bias = mx.array(rng.standard_normal(12).astype(np.float32) * 0.1)
    assert moe.shared_experts.fold_weights() is not None  # it folds, but not at these dims
    x = mx.array(rng.standard_normal((1, 1, 256)).astype(np.float32)).astype(dtype)
    run = kernels.dispatch.run
    launches = record_launches(monkeypatch)
    got = moe(x, mx.array([[7]]))
    mx.eval(got)
    monkeypatch.setattr(kernels.dispatch, "run", run)
    # the shared expert apart: its merged gate | up (affine, float16 scales) in gguf_matvec
    # (kernels.dense_matvec), its down in MLX's product (an mlx nn.QuantizedLinear here)
    assert launches == ["moe_gate_up_decode", "moe_down_decode", "gguf_matvec"], launches
    kernels.set_backend("ops")
    ref = moe(x, mx.array([[7]]))
    kernels.set_backend(path)
    assert_close(got, ref, 1e-5 if dtype == mx.float32 else 2e-2)

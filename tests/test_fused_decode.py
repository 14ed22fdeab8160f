"""The model's decode path through the fused attention and indexer kernels (emulated) against
the ops path: the same logits, token by token and a few tokens per call, across the window,
the indexer's top-k and the ratio-128 seams."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import ds4mlx
from ds4mlx import kernels
from ds4mlx.kernels import emu as kernel_emu
from kernel_paths import record_launches

pytestmark = pytest.mark.skipif(kernel_emu.compiler() is None,
                                reason="no C++ compiler for the emulator")


def run_split(model, toks: np.ndarray, sizes) -> np.ndarray:
    cache = model.make_cache()
    outs, i = [], 0
    for n in sizes:
        outs.append(np.array(model(mx.array(toks[:, i:i + n]), cache=cache)))
        i += n
    assert i == toks.shape[1]
    return np.concatenate(outs, axis=1)


def on(backend: str, fn, *args):
    kernels.set_backend(backend)
    try:
        return fn(*args)
    finally:
        kernels.set_backend()


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    # QAT rounding off: an FP8 step turns a 1e-7 difference upstream into a visible one
    m, _ = ds4mlx.load(tiny_ckpt, qat_rounding=False, dtype=mx.float32)
    return m


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# window 16, indexer top-k 4 (ratio-4 rows beyond 4 from position 19), ratio 128
SPLITS = {
    "early": [9, 1, 1, 1, 1, 1, 1, 1, 3, 1, 2],          # window fills, top-k kicks in at 19
    "ratio128": [124] + [1] * 3 + [3, 1, 2],             # positions 124..133 cross 127/128
}


@pytest.mark.parametrize("name", ["early", pytest.param("ratio128", marks=pytest.mark.slow)])
def test_fused_decode_equals_ops(model, name):
    sizes = SPLITS[name]
    toks = np.random.default_rng(5).integers(2, 1024, size=(1, sum(sizes)))
    ref = on("ops", run_split, model, toks, sizes)
    calls = []
    attend = model.layers[0].attn._attend_fused.__func__

    def spy(self, *a):
        calls.append(1)
        return attend(self, *a)

    for blk in model.layers:
        blk.attn._attend_fused = spy.__get__(blk.attn)
    try:
        got = on("emulate", run_split, model, toks, sizes)
    finally:
        for blk in model.layers:
            del blk.attn._attend_fused
    assert len(calls) == len(model.layers) * sum(1 for n in sizes if n <= 8)
    assert rel_err(got, ref) <= 1e-5
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


def _profile_module():
    """scripts/decode_profile.py, which builds Flash-shaped layers with random weights."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "decode_profile.py"
    spec = importlib.util.spec_from_file_location("decode_profile", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
# Flash-width layers hold up to ~12 GB each: one worker runs them all, never two side by side
@pytest.mark.xdist_group("flash_width")
@pytest.mark.parametrize("ratio,recipe,qat,dense", [
    (4, "q4", False, "bf16"), (4, "q4", True, "bf16"), (4, "q4", False, "file"),
    (128, "q4", False, "file"), (0, "q4", False, "file")] + [
    (ratio, recipe, False, "file") for recipe in ("q2", "mxfp4") for ratio in (0, 4, 128)])
def test_real_shape_layer_emulated_equals_ops(ratio, recipe, qat, dense, monkeypatch):
    """One Flash-width layer (64 heads x 512, window 128, indexer top-512 of 600 rows; experts
    in each format: Q4_K, IQ2_XXS / Q2_K, MLX mxfp4; dense projections as the format's real
    files load them, GGUF Q8_0 as affine 8-bit, official FP8 as mxfp8, or all float) decoding
    one token: the emulated Metal path against the ops path, the output and the state it leaves
    (the window rows and the compressors' unfinished windows, which the fused kernels write).
    The indexer's queries, scores and top-k take one launch (with the QAT rounding its FP4
    queries are kept in bfloat16, without it in float32, 32 heads at a time); with float dense
    weights the router's selection is made in the MoE kernel (no router_topk): quantized shared
    experts are not folded into the MoE kernels yet."""
    prof = _profile_module()
    config = prof.flash_config(n_experts=8, top_k=6)
    layer = {0: 0, 4: 1, 128: 2}[ratio]
    blk = prof.build_layer(config, layer, recipe, mx.float32, seed=layer, dense=dense)
    blk.attn.qat_rounding = qat
    cache = prof.synth_state(config, ratio, 2400, mx.float32, seed=1)
    h = mx.array(np.random.default_rng(3).standard_normal((1, 1, 4, 4096)).astype(np.float32))
    toks = mx.array([[7]])
    outs, states = {}, {}
    launches = record_launches(monkeypatch)
    for backend in ("ops", "emulate"):
        c = cache.snapshot()
        outs[backend] = on(backend, lambda: np.array(blk(h, toks, c, mx.float32)))
        states[backend] = [np.array(a) for a in c.state if isinstance(a, mx.array)]
    assert launches.count("moe_gate_up_decode") == 1, launches
    if dense == "bf16":
        assert "router_topk" not in launches, launches
    if ratio == 4:  # (float32 queries without FP4 are made 32 heads at a time)
        assert "indexer_pick_q" in launches and "index_q" not in launches, launches
    # the decode kernel's dense products (kernels.dense_matvec): GGUF Q8_0 as affine with
    # float16 scales: [wq_a | wkv (| indexer weights)], [wq_b (| indexer wq_b)], wo_a, wo_b;
    # official: only the ratio-4 layer's FP8 [wq_a | wkv] beside the indexer's BF16 weights
    want = 0 if dense == "bf16" else 4 if recipe != "mxfp4" else int(ratio == 4)
    assert launches.count("gguf_matvec") == want, launches
    assert rel_err(outs["emulate"], outs["ops"]) <= 1e-4
    for got, ref in zip(states["emulate"], states["ops"], strict=True):
        assert got.shape == ref.shape and rel_err(got, ref) <= 1e-4

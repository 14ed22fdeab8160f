"""MoE kernels on packed weights against their MLX-ops twins (ds4mlx/kernels.py).

Every kernel runs under the CPU emulator (and, on a Mac, on the GPU); the twins dequantize
with the block formats' own MLX dequantizers (ds4mlx/quant/gguf) or use ``mx.gather_qmm``.
Weights are random bytes (every bit pattern of codes and sub-scales) with sane fp16 / E8M0
scales; shapes are not multiples of the kernels' tiles (8 rows per decode threadgroup, 32 x 32
prefill tiles, 256 lanes x 8 per decode step).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from ds4mlx import kernels
from ds4mlx.kernels import emu as kernel_emu
from ds4mlx.quant.gguf import get
from kernel_paths import path, record_launches  # noqa: F401 (path: the kernel-path fixture the tests take)

# "MXFP4" = GGUF MXFP4 blocks; "MXFP4-mlx" = MLX mxfp4 (weight, scales)
FORMATS = ["Q8_0", "Q4_K", "Q2_K", "IQ2_XXS", "MXFP4", "MXFP4-mlx"]
REL = 1e-5


def fmt_name(fmt: str) -> str:
    return fmt.split("-")[0]


def block_size(fmt: str) -> int:
    return 32 if fmt.startswith("MXFP4") else get(fmt).BLOCK_SIZE


def random_experts(fmt: str, e: int, rows: int, k: int, seed: int):
    """Random experts ``[e, rows, ·]`` of ``k`` inputs in ``fmt``."""
    rng = np.random.default_rng(seed)
    if fmt == "MXFP4-mlx":
        q = rng.integers(0, 2**32, (e, rows, k // 8), dtype=np.uint32)
        s = rng.integers(115, 125, (e, rows, k // 32), dtype=np.uint8)
        return mx.array(q), mx.array(s)
    mod = get(fmt)
    b = rng.integers(0, 256, (e, rows, k // mod.BLOCK_SIZE, mod.BLOCK_BYTES), dtype=np.uint8)

    def f16(at: int, lo: float, hi: float):
        v = rng.uniform(lo, hi, b.shape[:-1]).astype(np.float16)
        b[..., at:at + 2] = v[..., None].view(np.uint8)

    if fmt == "MXFP4":
        b[..., 0] = rng.integers(115, 125, b.shape[:-1])
    elif fmt == "Q2_K":
        f16(80, -0.01, 0.01), f16(82, 0, 0.01)
    elif fmt == "Q4_K":
        f16(0, -0.01, 0.01), f16(2, 0, 0.01)
    else:  # Q8_0, IQ2_XXS
        f16(0, -0.01, 0.01)
    return mx.array(b.reshape(e, rows, -1))


def inputs_for(w, fmt: str, n: int, k_in: int, seed: int, scale: float = 4.0) -> mx.array:
    """Activations scaled so that products with ``w`` are O(scale): the clamp bites sometimes."""
    std = float(mx.sqrt(mx.mean(mx.square(kernels.dequantize_ops(w, fmt_name(fmt))))))
    rng = np.random.default_rng(seed)
    return mx.array(rng.standard_normal((n, k_in)).astype(np.float32) * scale / (std * k_in**0.5))


def routes(n: int, k: int, e: int, seed: int) -> mx.array:
    """[n, k] expert ids over only the even experts (the odd ones are never used), with the first
    token choosing one expert twice."""
    rng = np.random.default_rng(seed)
    idx = 2 * rng.integers(0, (e + 1) // 2, (n, k))
    if k > 1:
        idx[0, 1] = idx[0, 0]
    return mx.array(idx.astype(np.uint32))


def assert_close(got: mx.array, ref: mx.array, rel: float = REL):
    got, ref = np.asarray(got.astype(mx.float32)), np.asarray(ref.astype(mx.float32))
    assert got.shape == ref.shape
    assert np.isfinite(got).all()
    err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert err <= rel, f"relative error {err:.3g} > {rel}"


@pytest.fixture(params=["decode", "prefill"])
def mode(request, monkeypatch):
    """Which kernel a call of a few pairs takes: the decode kernels or the tiled ones."""
    if request.param == "prefill":
        monkeypatch.setattr(kernels.moe, "DECODE_MAX_PAIRS", 0)
    return request.param


def weight_k(fmt: str, kquant: int, small: int) -> int:
    return kquant if block_size(fmt) == 256 else small


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_is_bit_exact(path, fmt):
    w = random_experts(fmt, 2, 5, weight_k(fmt, 512, 96), seed=1)
    got = kernels.dequantize(w, fmt_name(fmt))
    ref = kernels.dequantize_ops(w, fmt_name(fmt))
    assert mx.array_equal(got, ref).item()


@pytest.mark.parametrize("k", [1, 4, 6, 8, 16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gate_up(path, mode, fmt, k):
    e, f, k_in = 7, 20, weight_k(fmt, 512, 160)
    w1, w3 = random_experts(fmt, e, f, k_in, seed=2), random_experts(fmt, e, f, k_in, seed=3)
    x = inputs_for(w1, fmt, 2, k_in, seed=4)
    idx = routes(2, k, e, seed=5)
    got = kernels.moe_gate_up(x, w1, w3, fmt_name(fmt), idx, 10.0)
    ref = kernels.moe_gate_up_ops(x, w1, w3, fmt_name(fmt), idx, 10.0)
    assert got.shape == (2, k, f)
    assert_close(got, ref)


@pytest.mark.parametrize("k", [1, 4, 6, 8, 16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_down(path, mode, fmt, k):
    e, d, f = 7, 37, weight_k(fmt, 256, 96)
    w2 = random_experts(fmt, e, d, f, seed=6)
    mid = mx.array(np.random.default_rng(7).standard_normal((2, k, f)).astype(np.float32))
    idx = routes(2, k, e, seed=8)
    rw = mx.array(np.random.default_rng(9).uniform(0.1, 1.5, (2, k)).astype(np.float32))
    got = kernels.moe_down(mid, w2, fmt_name(fmt), idx, rw)
    ref = kernels.moe_down_ops(mid, w2, fmt_name(fmt), idx, rw)
    assert got.shape == (2, d)
    assert_close(got, ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_prefill_many_tokens(path, fmt):
    """13 tokens x 6 experts = 78 pairs: several tiles, runs of experts crossing tile edges."""
    n, k, e, f, d = 13, 6, 9, weight_k(fmt, 256, 96), 45
    k_in = weight_k(fmt, 512, 160)
    w1, w3 = random_experts(fmt, e, f, k_in, seed=10), random_experts(fmt, e, f, k_in, seed=11)
    w2 = random_experts(fmt, e, d, f, seed=12)
    x = inputs_for(w1, fmt, n, k_in, seed=13)
    idx = routes(n, k, e, seed=14)
    rw = mx.array(np.random.default_rng(15).uniform(0.1, 1.5, (n, k)).astype(np.float32))
    name = fmt_name(fmt)
    assert n * k > kernels.moe.DECODE_MAX_PAIRS
    mid = kernels.moe_gate_up(x, w1, w3, name, idx, 10.0)
    assert_close(mid, kernels.moe_gate_up_ops(x, w1, w3, name, idx, 10.0))
    y = kernels.moe_down(mid, w2, name, idx, rw, out_dtype=mx.float32)
    assert_close(y, kernels.moe_down_ops(mid, w2, name, idx, rw))
    g = kernels.gather_qmm_native(x, w1, name, idx)
    assert_close(g, kernels.gather_qmm_native_ops(x, w1, name, idx))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_activations_and_outputs(path, mode, dtype):
    fmt, e, f, k = "Q4_K", 5, 256, 4
    w1, w3 = random_experts(fmt, e, f, 256, seed=16), random_experts(fmt, e, f, 256, seed=17)
    w2 = random_experts(fmt, e, 33, f, seed=18)
    x = inputs_for(w1, fmt, 3, 256, seed=19).astype(dtype)
    idx = routes(3, k, e, seed=20)
    rw = mx.array(np.random.default_rng(21).uniform(0.1, 1.5, (3, k)).astype(np.float32))
    mid = kernels.moe_gate_up(x, w1, w3, fmt, idx, 10.0)
    # the twin reads the same half values, widened to float32
    assert_close(mid, kernels.moe_gate_up_ops(x.astype(mx.float32), w1, w3, fmt, idx, 10.0))
    y = kernels.moe_down(mid, w2, fmt, idx, rw, out_dtype=dtype)
    assert y.dtype == dtype
    ref = kernels.moe_down_ops(mid, w2, fmt, idx, rw, out_dtype=dtype)
    assert_close(y, ref, rel=1e-2)  # one rounding to the half type on each side


def test_no_clamp_without_limit(path, mode):
    fmt, e, f = "Q8_0", 4, 12
    w1, w3 = random_experts(fmt, e, f, 64, seed=22), random_experts(fmt, e, f, 64, seed=23)
    x = inputs_for(w1, fmt, 2, 64, seed=24, scale=30.0)  # far beyond the Flash limit of 10
    idx = routes(2, 3, e, seed=25)
    got = kernels.moe_gate_up(x, w1, w3, fmt, idx, None)
    assert float(mx.abs(got).max()) > 100.0
    assert_close(got, kernels.moe_gate_up_ops(x, w1, w3, fmt, idx, None))


def test_switch_linear_call_site_matches_gguf_layer_ops(path):
    from ds4mlx.layers.gguf import GGUFLinear, GGUFSwitchLinear

    fmt, e, f, k_in = "Q2_K", 6, 19, 256
    w = random_experts(fmt, e, f, k_in, seed=26)
    layer = GGUFSwitchLinear.from_blocks(w, get(fmt).GGML_TYPE, k_in)
    x = inputs_for(w, fmt, 5, k_in, seed=27)[:, None, None, :]  # mlx-lm SwitchGLU shapes
    idx = routes(5, 4, e, seed=28)
    got = layer(x, idx)  # goes through kernels.gguf_switch_matmul on this path
    assert got.shape == (5, 4, 1, f)
    assert_close(got, kernels.switch_matmul_ops(x, w, fmt, idx))
    dense = GGUFLinear.from_blocks(w[1], get(fmt).GGML_TYPE, k_in)
    xs = x[:, 0, 0, :]
    assert_close(dense(xs), xs @ kernels.dequantize_ops(w[1], fmt).T)


def test_moe_experts_call_site(path):
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    from ds4mlx.layers.gguf import GGUFSwitchLinear

    e, f, d, n, k = 6, 256, 256, 3, 4
    idx = routes(n, k, e, seed=29)
    rw = mx.array(np.random.default_rng(30).uniform(0.1, 1.5, (n, k)).astype(np.float32))
    # GGUF-native experts, q2-style: IQ2_XXS gate/up, Q2_K down
    w1 = random_experts("IQ2_XXS", e, f, d, seed=31)
    w3 = random_experts("IQ2_XXS", e, f, d, seed=32)
    w2 = random_experts("Q2_K", e, d, f, seed=33)
    mods = [GGUFSwitchLinear.from_blocks(w, get(t).GGML_TYPE, 256)
            for w, t in ((w1, "IQ2_XXS"), (w3, "IQ2_XXS"), (w2, "Q2_K"))]
    x = inputs_for(w1, "IQ2_XXS", n, d, seed=34)
    got = kernels.moe_experts(x, idx, rw, *mods, 10.0)
    mid = kernels.moe_gate_up_ops(x, w1, w3, "IQ2_XXS", idx, 10.0)
    assert_close(got, kernels.moe_down_ops(mid, w2, "Q2_K", idx, rw))
    # MLX mxfp4 experts (QuantizedSwitchLinear)
    qs = []
    for i, (i_dim, o_dim) in enumerate([(d, f), (d, f), (f, d)]):
        m = QuantizedSwitchLinear(i_dim, o_dim, e, bias=False, group_size=32, bits=4, mode="mxfp4")
        m.weight, m.scales = random_experts("MXFP4-mlx", e, o_dim, i_dim, seed=35 + i)
        qs.append(m)
    got = kernels.moe_experts(x, idx, rw, *qs, 10.0)
    mid = kernels.moe_gate_up_ops(x, (qs[0].weight, qs[0].scales), (qs[1].weight, qs[1].scales),
                                  "MXFP4", idx, 10.0)
    assert_close(got, kernels.moe_down_ops(mid, (qs[2].weight, qs[2].scales), "MXFP4", idx, rw))
    # float experts: not for the kernels
    floats = [SwitchLinear(d, f, e, bias=False), SwitchLinear(d, f, e, bias=False),
              SwitchLinear(f, d, e, bias=False)]
    assert kernels.moe_experts(x, idx, rw, *floats, 10.0) is None


def test_call_site_groups_several_tokens_by_expert(path, monkeypatch):
    """A batch step or a speculative verify (several tokens, few pairs) reads each chosen expert
    once: the expert-grouped tiles, not the decode kernels (a weight row per pair); one token
    takes the decode kernels. Both equal the ops twin."""
    from ds4mlx.layers.gguf import GGUFSwitchLinear

    e, f, d, k = 6, 256, 256, 4
    shapes = [(f, d), (f, d), (d, f)]
    w = [random_experts("Q4_K", e, o, i, seed=50 + j) for j, (o, i) in enumerate(shapes)]
    mods = [GGUFSwitchLinear.from_blocks(m, get("Q4_K").GGML_TYPE, 256) for m in w]
    launched = record_launches(monkeypatch)
    for n, want in ((3, {"moe_matmul_sorted"}), (1, {"moe_gate_up_decode", "moe_down_decode"})):
        assert n * k <= kernels.moe.DECODE_MAX_PAIRS  # few pairs: the size alone would not group
        idx = mx.array(np.tile(np.arange(k, dtype=np.uint32), (n, 1)))  # all tokens: experts 0..k-1
        rw = mx.array(np.random.default_rng(n).uniform(0.1, 1.5, (n, k)).astype(np.float32))
        x = inputs_for(w[0], "Q4_K", n, d, seed=60 + n)
        launched.clear()
        got = kernels.moe_experts(x, idx, rw, *mods, 10.0)
        mid = kernels.moe_gate_up_ops(x, w[0], w[1], "Q4_K", idx, 10.0)
        assert_close(got, kernels.moe_down_ops(mid, w[2], "Q4_K", idx, rw))
        assert set(launched) == want, (n, launched)


def test_ops_path_never_touches_the_kernels(monkeypatch):
    monkeypatch.setenv("DS4MLX_KERNELS", "ops")
    kernels.set_backend()

    def boom(*args, **kwargs):
        raise AssertionError("kernel launched on the ops path")

    monkeypatch.setattr(kernels.dispatch, "run", boom)
    w = random_experts("Q4_K", 3, 8, 256, seed=40)
    x = inputs_for(w, "Q4_K", 2, 256, seed=41)
    idx = routes(2, 2, 3, seed=42)
    mid = kernels.moe_gate_up(x, w, w, "Q4_K", idx, 10.0)
    assert mid.shape == (2, 2, 8)
    assert kernels.moe_experts(x, idx, mx.ones((2, 2)), None, None, None, 10.0) is None


def test_emulation_rejects_out_of_range_experts(monkeypatch):
    if kernel_emu.compiler() is None:
        pytest.skip("no C++ compiler for the emulator")
    monkeypatch.setenv("DS4MLX_KERNELS", "emulate")
    kernels.set_backend()
    w = random_experts("Q8_0", 3, 8, 64, seed=46)
    x = inputs_for(w, "Q8_0", 2, 64, seed=47)
    bad = mx.array([[0, 3], [1, 2]], dtype=mx.uint32)
    with pytest.raises(kernels.KernelInputError, match=r"indices: expert ids 0..3 out of range \[0, 3\)"):
        kernels.moe_gate_up(x, w, w, "Q8_0", bad, 10.0)


def test_backend_choice(monkeypatch):
    monkeypatch.setenv("DS4MLX_KERNELS", "cuda")
    with pytest.raises(ValueError, match="DS4MLX_KERNELS='cuda'"):
        kernels.set_backend()
    monkeypatch.delenv("DS4MLX_KERNELS")
    gpu = mx.metal.is_available() and mx.default_device().type == mx.DeviceType.gpu
    assert kernels.set_backend() == ("metal" if gpu else "ops")
    monkeypatch.setenv("DS4MLX_KERNELS", "emulate")
    assert kernels.backend() == ("metal" if gpu else "ops")  # chosen once, until set_backend
    if not mx.metal.is_available():
        monkeypatch.setenv("DS4MLX_KERNELS", "metal")
        with pytest.raises(ValueError, match="Metal is not available"):
            kernels.set_backend()


def test_disabled_variant_takes_the_ops_twin(monkeypatch):
    monkeypatch.setattr(kernels.dispatch, "_backend", "emulate")
    monkeypatch.setattr(kernels.dispatch, "_disabled", {})
    assert kernels.serves("Q4_K") and not kernels.serves("Q6_K")
    kernels.disable("q4_k", "self-test mismatch")
    assert not kernels.serves("Q4_K") and kernels.disabled() == {"Q4_K": "self-test mismatch"}

    def boom(*args, **kwargs):
        raise AssertionError("a disabled kernel was launched")

    monkeypatch.setattr(kernels.dispatch, "run", boom)
    w = random_experts("Q4_K", 3, 8, 256, seed=40)
    x = inputs_for(w, "Q4_K", 2, 256, seed=41)
    idx = routes(2, 2, 3, seed=42)
    assert_close(kernels.moe_gate_up(x, w, w, "Q4_K", idx, 10.0),
                 kernels.moe_gate_up_ops(x, w, w, "Q4_K", idx, 10.0))
    kernels.enable("Q4_K")
    assert kernels.serves("Q4_K")


@pytest.mark.parametrize("bad,match", [
    (lambda w, x, i: kernels.moe_gate_up(x, w.astype(mx.int8), w, "Q4_K", i, 10.0), "w1: Q4_K"),
    (lambda w, x, i: kernels.moe_gate_up(x, w[..., :-1], w[..., :-1], "Q4_K", i, 10.0),
     "w1: a row of 287 bytes"),
    (lambda w, x, i: kernels.moe_gate_up(x[:, :128], w, w, "Q4_K", i, 10.0), "x: 128 features"),
    (lambda w, x, i: kernels.moe_gate_up(x, w, w, "Q4_K", i[:1], 10.0), "indices: expected"),
    (lambda w, x, i: kernels.moe_gate_up(x, w, w, "Q6_K", i, 10.0), "format 'Q6_K' has no kernel"),
    (lambda w, x, i: kernels.moe_down(x[:, None, :256], w, "Q4_K", i[:, :1], i[:, :1]),
     "mid: 256 features"),
])
def test_bad_inputs_name_the_argument(monkeypatch, bad, match):
    monkeypatch.setenv("DS4MLX_KERNELS", "ops")
    kernels.set_backend()
    w = random_experts("Q4_K", 3, 8, 512, seed=43)
    x = inputs_for(w, "Q4_K", 2, 512, seed=44)
    with pytest.raises(kernels.KernelInputError, match=match):
        bad(w, x, routes(2, 2, 3, seed=45))


# ----------------------------------------------------------------------------- whole model
@pytest.fixture(scope="module")
def expert_files(tmp_path_factory):
    """A 2-layer tiny checkpoint (one hash layer, one score layer) as GGUF files with q2-style
    (IQ2_XXS gate/up + Q2_K down), q4-style (Q4_K) and MXFP4 experts."""
    from ds4mlx.convert import convert
    from ds4mlx.synthetic import write_tiny_checkpoint

    d = tmp_path_factory.mktemp("kernel-model")
    ckpt = write_tiny_checkpoint(d / "ckpt", seed=3, num_layers=2, num_hash_layers=1, mtp=False)
    return {p: convert(ckpt, d / f"{p}.gguf", to="gguf", preset=p, progress=False)
            for p in ("ds4-q2", "ds4-q4", "mxfp4")}


@pytest.mark.slow
@pytest.mark.parametrize("k", [6, 4])
@pytest.mark.parametrize("preset", ["ds4-q2", "ds4-q4", "mxfp4"])
def test_tiny_model_metal_path_equals_ops(path, expert_files, preset, k, monkeypatch):
    """Prefill (9 tokens), then decode steps of 1 token (the decode kernels) and 2 tokens (the
    expert-grouped kernels, as a batch step): the Metal path (emulated on Linux) gives the ops
    path's logits."""
    from ds4mlx.loader import load_gguf

    model, _ = load_gguf(expert_files[preset], dtype=mx.float32, qat_rounding=False,
                         experts_per_token=k)
    tokens = mx.array(np.random.default_rng(k).integers(2, 1000, (1, 12)))
    launches = []
    run = kernels.dispatch.run

    def counted(*args, **kwargs):
        launches.append(args[1])
        return run(*args, **kwargs)

    def logits(backend: str) -> mx.array:
        monkeypatch.setenv("DS4MLX_KERNELS", backend)
        kernels.set_backend()
        cache = model.make_cache()
        steps = [model(tokens[:, a:b], cache=cache) for a, b in ((0, 9), (9, 10), (10, 12))]
        out = mx.concatenate(steps, axis=1)
        mx.eval(out)
        return out

    ref = logits("ops")
    monkeypatch.setattr(kernels.dispatch, "run", counted)
    got = logits(path)
    assert launches, "the model never reached a kernel"
    assert_close(got, ref)
    assert mx.array_equal(got.argmax(-1), ref.argmax(-1)).item()


@pytest.mark.parametrize("n,dtype,limit", [(1, mx.float32, 10.0), (5, mx.bfloat16, 0.0)])
def test_shared_down_matches_the_shared_expert(path, n, dtype, limit):
    """Kernel shared_down (SwiGLU, down projection, + the routed sum) against the model's
    SharedExpert in ops, and the SwiGLU in numpy."""
    from ds4mlx.model.moe import SharedExpert
    from ds4mlx.synthetic import tiny_config
    from ds4mlx.config import ModelConfig

    config = ModelConfig.from_hf(tiny_config(moe_intermediate_size=96, hidden_size=80))
    shared = SharedExpert(config)
    shared.limit = limit
    rng = np.random.default_rng(n)
    for m in (shared.w1, shared.w3, shared.w2):
        m.weight = mx.array((rng.standard_normal(m.weight.shape) * 0.3).astype(np.float32)).astype(dtype)
    x = mx.array((rng.standard_normal((n, 80)) * 2).astype(np.float32)).astype(dtype)
    add = mx.array(rng.standard_normal((n, 80)).astype(np.float32)).astype(dtype)
    w13 = shared.merge_projections()
    got = kernels.shared_down(w13.product(x), shared.w2.weight, limit, add)
    chosen = kernels.backend()
    kernels.set_backend("ops")
    try:
        ref = add + shared(x)
    finally:
        kernels.set_backend(chosen)
    g, u = (np.asarray((x @ m.weight.T).astype(mx.float32)) for m in (shared.w1, shared.w3))
    if limit:
        g, u = np.minimum(g, limit), np.clip(u, -limit, limit)
    mid = g / (1 + np.exp(-g)) * u
    numpy = np.asarray(add.astype(mx.float32)) + mid @ np.asarray(shared.w2.weight.astype(mx.float32)).T
    got, ref = np.asarray(got.astype(mx.float32)), np.asarray(ref.astype(mx.float32))
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    assert np.abs(got - numpy).max() <= (1e-4 if dtype == mx.float32 else 3e-2) * np.abs(numpy).max()


def shared_weight(fmt: str, rows: int, k_in: int, seed: int, dtype=mx.float32) -> mx.array:
    """A shared-expert weight [rows, k_in]: Q8_0 blocks, or float rows of ``fmt``."""
    if fmt == "Q8_0":
        return random_experts("Q8_0", 1, rows, k_in, seed)[0]
    rng = np.random.default_rng(seed)
    return mx.array((rng.standard_normal((rows, k_in)) * 0.05).astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("shared_fmt", ["float32", "Q8_0"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_expert_folded_into_the_decode_kernels(path, fmt, shared_fmt):
    """The shared expert as slot k of moe_gate_up_decode / moe_down_decode, against the twins,
    and its slot against numpy from the dequantized weights."""
    e, f, k_in, d, k = 5, weight_k(fmt, 256, 96), weight_k(fmt, 256, 160), 37, 6
    w1, w3 = random_experts(fmt, e, f, k_in, seed=40), random_experts(fmt, e, f, k_in, seed=41)
    w2 = random_experts(fmt, e, d, f, seed=42)
    shared = kernels.Shared((shared_weight(shared_fmt, 2 * f, k_in, 43), shared_fmt),
                            (shared_weight(shared_fmt, d, f, 44), shared_fmt))
    x = inputs_for(w1, fmt, 1, k_in, seed=45)
    idx = routes(1, k, e, seed=46)
    rw = mx.array(np.random.default_rng(47).uniform(0.1, 1.5, (1, k)).astype(np.float32))
    mid = kernels.moe_gate_up(x, w1, w3, fmt_name(fmt), idx, 10.0, False, shared)
    ref = kernels.moe_gate_up_ops(x, w1, w3, fmt_name(fmt), idx, 10.0, shared)
    assert mid.shape == (1, k + 1, f)
    assert_close(mid, ref)
    assert_close(mid[:, :k], kernels.moe_gate_up_ops(x, w1, w3, fmt_name(fmt), idx, 10.0))
    gu = np.asarray(kernels.shared.shared_dense(shared.gate_up))
    g, u = np.split(np.asarray(x) @ gu.T, 2, axis=-1)
    g, u = np.minimum(g, 10.0), np.clip(u, -10.0, 10.0)
    own = g / (1 + np.exp(-g)) * u
    assert np.abs(np.asarray(mid[:, k]) - own).max() <= 1e-5 * np.abs(own).max()
    y = kernels.moe_down(ref, w2, fmt_name(fmt), idx, rw, mx.float32, False, shared)
    assert_close(y, kernels.moe_down_ops(ref, w2, fmt_name(fmt), idx, rw, mx.float32, shared))
    routed = np.asarray(kernels.moe_down_ops(ref[:, :k], w2, fmt_name(fmt), idx, rw))
    numpy = routed + np.asarray(ref[:, k]) @ np.asarray(kernels.shared.shared_dense(shared.down)).T
    assert np.abs(np.asarray(y) - numpy).max() <= 1e-5 * np.abs(numpy).max()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_folded_shared_expert_equals_the_modules(path, dtype, monkeypatch):
    """MoE._folded (one decoded token: routed + shared experts in the two decode kernels, no
    shared-expert launch) against the routed experts' call site plus the SharedExpert module."""
    import mlx.nn as nn

    from ds4mlx.config import ModelConfig
    from ds4mlx.layers.gguf import GGUFSwitchLinear
    from ds4mlx.model.moe import MoE, SharedExpert
    from ds4mlx.synthetic import tiny_config

    config = ModelConfig.from_hf(tiny_config(moe_intermediate_size=256, hidden_size=256,
                                             n_routed_experts=6, experts_per_token=4))
    moe = MoE(config, layer=5)
    e = config.n_routed_experts
    for name, t, rows, k_in, seed in (("w1", "IQ2_XXS", 256, 256, 50), ("w3", "IQ2_XXS", 256, 256, 51),
                                      ("w2", "Q2_K", 256, 256, 52)):
        setattr(moe.experts, name, GGUFSwitchLinear.from_blocks(
            random_experts(t, e, rows, k_in, seed), get(t).GGML_TYPE, k_in))
    rng = np.random.default_rng(53)
    for m in (moe.shared_experts.w1, moe.shared_experts.w3, moe.shared_experts.w2):
        m.weight = mx.array((rng.standard_normal(m.weight.shape) * 0.05).astype(np.float32)).astype(dtype)
    launches, built, packed = [], [], []

    def counting(fn, calls, name=None):
        def counted(*args, **kwargs):
            calls.append(name or args[1])
            return fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(kernels.dispatch, "run", counting(kernels.dispatch.run, launches))
    monkeypatch.setattr(SharedExpert, "_build_fold", counting(SharedExpert._build_fold, built, "fold"))
    monkeypatch.setattr(kernels.shared, "shared_packed", counting(kernels.shared.shared_packed, packed, "pack"))
    # several decode steps: each runs the two decode kernels alone, and the shared expert's
    # fold is built (and its weights packed and checked) on the first one only
    for step, (idx, w) in enumerate([([0, 3, 5, 2], [0.4, 0.9, 1.2, 0.3]),
                                     ([5, 1, 4, 0], [1.1, 0.2, 0.7, 0.5]),
                                     ([2, 3, 0, 1], [0.3, 0.3, 0.8, 1.4])]):
        x = mx.array(rng.standard_normal((1, 256)).astype(np.float32)).astype(dtype)
        idx, w = mx.array([idx], dtype=mx.uint32), mx.array([w], dtype=mx.float32)
        launches.clear()
        got = moe._folded(x, idx, w)
        assert got is not None and launches == ["moe_gate_up_decode", "moe_down_decode"], step
        ref = moe.shared_experts(x, add=moe.experts(x, idx, w))
        assert_close(got, ref, 1e-5 if dtype == mx.float32 else 2e-2)
    assert built == ["fold"] and packed == ["pack", "pack"]
    assert moe._folded(mx.concatenate([x, x]), mx.concatenate([idx, idx]),
                       mx.concatenate([w, w])) is None  # two tokens: the grouped tiles
    # a replaced projection (the imatrix recorder wraps them) is not served from the old fold
    moe.shared_experts.w2 = nn.Linear(256, 256, bias=False)
    moe.shared_experts.w2.weight = moe.shared_experts.w2.weight.astype(dtype)
    assert moe.shared_experts.fold_weights().down[0] is moe.shared_experts.w2.weight
    assert built == ["fold", "fold"]


@pytest.mark.parametrize("fmt,e,k,renorm", [("Q8_0", 256, 6, True), ("IQ2_XXS", 300, 4, False),
                                            ("MXFP4-mlx", 40, 6, True)])
def test_router_selection_inside_the_gate_up_kernel(path, fmt, e, k, renorm):
    """moe_gate_up_decode with ROUTE picks exactly router_topk's experts, in its order, with its
    route weights (the same selection code), ties and the bias included; mid equals the kernel
    on those ids, and the twins agree."""
    from ds4mlx.kernels.router import Route, router_topk

    f, k_in = 40, weight_k(fmt, 256, 64)
    w1, w3 = random_experts(fmt, e, f, k_in, seed=60), random_experts(fmt, e, f, k_in, seed=61)
    shared = kernels.Shared((shared_weight("float32", 2 * f, k_in, 62), "float32"),
                            (shared_weight("float32", 37, f, 63), "float32"))
    x = inputs_for(w1, fmt, 1, k_in, seed=64)
    rng = np.random.default_rng(e)
    logits = (rng.standard_normal((1, e)) * 4).astype(np.float32)
    logits[0, 5:9] = logits[0, 3]  # equal scores: the lowest ids win ties
    bias = (rng.standard_normal(e) * 0.1).astype(np.float32)
    bias[5:9] = bias[3] + 5.0  # and they are picked
    route = Route(mx.array(logits), mx.array(bias), k, renorm, 1.5)
    mid, ids, rw = kernels.moe_gate_up_routed(x, w1, w3, fmt_name(fmt), route, 10.0, shared)
    ref_ids, ref_w = router_topk(route.logits, route.bias, k, renorm, 1.5)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))
    assert np.asarray(ids)[0, :4].tolist() == [5, 6, 7, 8]
    np.testing.assert_array_equal(np.asarray(rw), np.asarray(ref_w))
    plain = kernels.moe_gate_up(x, w1, w3, fmt_name(fmt), ref_ids, 10.0, False, shared)
    np.testing.assert_array_equal(np.asarray(mid), np.asarray(plain))
    t_mid, t_ids, t_w = kernels.moe_gate_up_routed_ops(x, w1, w3, fmt_name(fmt), route, 10.0, shared)
    order = np.argsort(np.asarray(t_ids)[0])
    mine = np.argsort(np.asarray(ids)[0])
    np.testing.assert_array_equal(np.asarray(t_ids)[0, order], np.asarray(ids)[0, mine])
    np.testing.assert_allclose(np.asarray(t_w)[0, order], np.asarray(rw)[0, mine], rtol=1e-6)
    assert_close(mid[:, mx.array(mine)], t_mid[:, mx.array(order)])
    assert_close(mid[:, k], t_mid[:, k])


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_moe_step_routes_inside_the_decode_kernels(path, dtype, monkeypatch):
    """MoE.__call__ on one token of a score-routed layer: two launches (the router's selection
    inside moe_gate_up_decode, no router_topk) and the result of the ops path (the model's
    compiled router, the expert modules, the SharedExpert module); a hash-routed layer keeps
    its table's ids (router_topk is not its selection either)."""
    from ds4mlx.config import ModelConfig
    from ds4mlx.layers.gguf import GGUFSwitchLinear
    from ds4mlx.model.moe import MoE
    from ds4mlx.synthetic import tiny_config

    config = ModelConfig.from_hf(tiny_config(moe_intermediate_size=256, hidden_size=256,
                                             n_routed_experts=12, experts_per_token=4,
                                             num_hash_layers=1))
    rng = np.random.default_rng(70)
    for layer in (0, 5):  # hash-routed, score-routed
        moe = MoE(config, layer=layer)
        assert moe.gate.is_hash == (layer == 0)
        e = config.n_routed_experts
        for name, t, seed in (("w1", "IQ2_XXS", 71), ("w3", "IQ2_XXS", 72), ("w2", "Q2_K", 73)):
            setattr(moe.experts, name, GGUFSwitchLinear.from_blocks(
                random_experts(t, e, 256, 256, seed), get(t).GGML_TYPE, 256))
        for m in (moe.shared_experts.w1, moe.shared_experts.w3, moe.shared_experts.w2):
            m.weight = mx.array((rng.standard_normal(m.weight.shape) * 0.05).astype(np.float32)).astype(dtype)
        moe.gate.weight = mx.array(rng.standard_normal((e, 256)).astype(np.float32) * 0.1)
        if moe.gate.is_hash:
            moe.gate.tid2eid = mx.array(rng.integers(0, e, (config.vocab_size, 4)).astype(np.int32))
        else:
            moe.gate.bias = mx.array(rng.standard_normal(e).astype(np.float32) * 0.1)
        x = mx.array(rng.standard_normal((1, 1, 256)).astype(np.float32)).astype(dtype)
        tokens = mx.array([[7]])
        run = kernels.dispatch.run
        launches = record_launches(monkeypatch)
        got = moe(x, tokens)
        mx.eval(got)
        monkeypatch.setattr(kernels.dispatch, "run", run)
        assert launches == ["moe_gate_up_decode", "moe_down_decode"], launches
        kernels.set_backend("ops")
        ref = moe(x, tokens)
        kernels.set_backend(path)
        assert_close(got, ref, 1e-5 if dtype == mx.float32 else 2e-2)

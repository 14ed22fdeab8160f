"""The CPU paths of ops.py: RMSNorm and the MX-quantized matmul against independent references
(mx.fast.rms_norm; numpy float64 on the format's own dequantizer), the host Sinkhorn rounds of
HC pre against the same rounds as MLX ops, and the grouped projection of layers.QuantizedLinear
against separate per-group modules."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from ds4mlx import ops
from ds4mlx.layers import QuantizedLinear, quantized_linear
from ds4mlx.quant.codecs import e4m3_encode
from ds4mlx.quant.formats import WeightFormat
from ds4mlx.quant.mx import dequant_fp8_np, fp8_to_mxfp8


@pytest.fixture(autouse=True)
def _cpu():
    prev = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(prev)


@pytest.mark.parametrize("shape", [(1, 1, 256), (2, 7, 128), (1, 300, 64)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_rms_norm_equals_mlx_fast_rms_norm(shape, dtype):
    x = (mx.random.normal(shape, key=mx.random.key(1)) * 3).astype(dtype)
    ours = ops.RMSNorm(shape[-1], eps=1e-6)
    ours.weight = mx.random.normal((shape[-1],), key=mx.random.key(2)).astype(dtype)
    ref = mx.fast.rms_norm(x, ours.weight, 1e-6)
    assert ours(x).dtype == ref.dtype
    assert mx.array_equal(ours(x), ref).item()  # the same formula: bit for bit


def _fp8_weight(out_dim: int, in_dim: int, seed: int = 0):
    """An official-format FP8 weight (codes + 128x128 E8M0 blocks) and its float64 values."""
    rng = np.random.default_rng(seed)
    codes = e4m3_encode(rng.normal(size=(out_dim, in_dim)).astype(np.float32) * 100)
    blocks = rng.integers(120, 124, ((out_dim + 127) // 128, (in_dim + 127) // 128)).astype(np.uint8)
    return codes, blocks, dequant_fp8_np(codes, blocks).astype(np.float64)


@pytest.mark.parametrize("rows", [1, 3, 4, 64])
def test_mxfp8_matmul_matches_float64_reference(rows):
    codes, blocks, w64 = _fp8_weight(256, 192)
    w, scales = fp8_to_mxfp8(codes, blocks)
    x = mx.random.normal((rows, 192), key=mx.random.key(3))
    y = ops.quantized_matmul(x, w, scales, group_size=32, bits=8, mode="mxfp8")
    ref = np.asarray(x, dtype=np.float64) @ w64.T
    assert y.shape == (rows, 256) and y.dtype == mx.float32
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("host", ["numpy", "compiled"])
@pytest.mark.parametrize("lead", [(1, 1), (1, 37), (3, 2)])
@pytest.mark.parametrize("iters,eps", [(20, 1e-6), (3, 1e-3), (1, 1e-6)])
def test_hc_pre_host_sinkhorn_equals_mlx_rounds(host, lead, iters, eps):
    """On the CPU, HC pre runs the Sinkhorn rounds on the host, in numpy or compiled
    (quant/gguf/native/sinkhorn.c, what the model's CPU path takes): bit for bit the compiled
    MLX rounds (the graph the GPU path runs)."""
    from ds4mlx.kernels import hyper
    from ds4mlx.quant.gguf import native

    rounds = None
    if host == "compiled":  # the library as built, before the load-time check that guards it
        lib = native.load("sinkhorn")
        if lib is None:
            pytest.skip("no C compiler: numpy serves")
        rounds = hyper.compiled_rounds(lib)
    m, d = 4, 64
    h = mx.random.normal((*lead, m, d), key=mx.random.key(5)) * 2
    fn = mx.random.normal(((2 + m) * m, m * d), key=mx.random.key(6)) * 0.3
    base = mx.random.normal(((2 + m) * m,), key=mx.random.key(7))
    scale = mx.array([0.5, 1.5, 2.0])
    got = ops.hc_pre(h, fn, base, scale, iters=iters, eps=eps, norm_eps=1e-6, host=rounds)
    ref = ops._hc_pre(h, fn, base, scale, iters=iters, eps=eps, norm_eps=1e-6)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype == mx.float32
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    comb = np.asarray(got[2])
    assert not np.allclose(comb, comb[..., :1, :1])  # not a degenerate (uniform) matrix


@pytest.mark.parametrize("seed", [0, 1])
def test_one_token_products_equal_the_batch_sums(seed):
    """On the CPU one token's RMS, HC pre collapse and HC post sums are products of one row (a
    decode step's primitives): bit for bit the same token's element-wise sums inside a batch."""
    m, d, n = 4, 256, 3
    key = lambda i: mx.random.key(10 * seed + i)  # noqa: E731
    h = mx.random.normal((1, n, m, d), key=key(0)) * 2
    fn = mx.random.normal(((2 + m) * m, m * d), key=key(1)) * 0.1
    base, scale = mx.random.normal(((2 + m) * m,), key=key(2)), mx.array([0.5, 1.5, 2.0])
    y = mx.random.normal((1, n, d), key=key(3))
    post, comb = mx.random.normal((1, n, m), key=key(4)), mx.random.normal((1, n, m, m), key=key(5))
    norm = ops.RMSNorm(d, eps=1e-6)
    norm.weight = mx.random.normal((d,), key=key(6))
    batch = (*ops.hc_pre(h, fn, base, scale, iters=20, eps=1e-6, norm_eps=1e-6),
             ops.hc_post(y, h, post, comb), norm(y))
    for t in range(n):
        tok = slice(t, t + 1)
        one = (*ops.hc_pre(h[:, tok], fn, base, scale, iters=20, eps=1e-6, norm_eps=1e-6),
               ops.hc_post(y[:, tok], h[:, tok], post[:, tok], comb[:, tok]), norm(y[:, tok]))
        for a, b in zip(batch, one):
            np.testing.assert_array_equal(np.asarray(a[:, tok]), np.asarray(b))
    x = y[:, :1]
    ref = np.mean(np.square(np.asarray(x, dtype=np.float64)), axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(ops.mean_square(x)), ref, rtol=1e-6)


def test_mxfp8_projection_cpu_copy(monkeypatch):
    """On the CPU an mxfp8 projection computes on a float32 copy of its weight: the copy is the
    file's values exactly, made once, remade when the weight is replaced, not made past the
    budget (the quantized kernel then), and its bytes are counted while it lives."""
    fmt = WeightFormat("mxfp8", bits=8, group_size=32)
    codes, blocks, w64 = _fp8_weight(256, 192)
    m = quantized_linear(192, 256, fmt)
    m.weight, m.scales = fp8_to_mxfp8(codes, blocks)
    before = ops._copy_bytes
    dense = m.cpu_copy()
    assert dense is not None and dense.dtype == mx.float32 and m.cpu_copy() is dense
    np.testing.assert_array_equal(np.asarray(dense), w64.astype(np.float32))
    assert ops._copy_bytes == before + 256 * 192 * 4
    for rows in (1, 9):
        x = mx.random.normal((rows, 192), key=mx.random.key(8))
        ref = np.asarray(x, dtype=np.float64) @ w64.T
        np.testing.assert_allclose(np.asarray(m(x)), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    codes2, blocks2, w64b = _fp8_weight(256, 192, seed=2)
    m.weight, m.scales = fp8_to_mxfp8(codes2, blocks2)  # a reload
    x = mx.random.normal((1, 192), key=mx.random.key(9))
    ref = np.asarray(x, dtype=np.float64) @ w64b.T
    np.testing.assert_allclose(np.asarray(m(x)), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert m.cpu_copy() is not dense and ops._copy_bytes == before + 256 * 192 * 4
    del m, dense
    assert ops._copy_bytes == before
    monkeypatch.setattr(ops, "CPU_COPY_BUDGET", 0)
    m = quantized_linear(192, 256, fmt)
    m.weight, m.scales = fp8_to_mxfp8(codes, blocks)
    assert m.cpu_copy() is None and ops._copy_bytes == before
    ref = np.asarray(x, dtype=np.float64) @ w64.T
    np.testing.assert_allclose(np.asarray(m(x)), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_grouped_projection_equals_per_group_modules():
    groups, in_dim, rows = 2, 128, 96
    codes, blocks, _ = _fp8_weight(groups * rows, in_dim, seed=1)
    w, scales = fp8_to_mxfp8(codes, blocks)
    m = quantized_linear(in_dim, groups * rows, WeightFormat("mxfp8", bits=8, group_size=32))
    assert isinstance(m, QuantizedLinear)
    m.weight, m.scales = w, scales
    for n_tokens in (1, 9):  # the quantized kernel and the dequantized path
        x = mx.random.normal((1, n_tokens, groups, in_dim), key=mx.random.key(4))
        y = m.grouped(x, groups)
        assert y.shape == (1, n_tokens, groups, rows)
        for g in range(groups):
            part = nn.QuantizedLinear.__new__(nn.QuantizedLinear)
            nn.Module.__init__(part)
            part.weight, part.scales = w[g * rows:(g + 1) * rows], scales[g * rows:(g + 1) * rows]
            part.group_size, part.bits, part.mode = 32, 8, "mxfp8"
            np.testing.assert_allclose(np.asarray(y[..., g, :]), np.asarray(part(x[..., g, :])),
                                       rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("lead", [(1, 1), (3, 1), (1, 2)])
@pytest.mark.parametrize("kind", ["mxfp8", "affine"])
def test_grouped_projection_is_one_launch_on_the_gpu_graph(kind, lead, monkeypatch):
    """The grouped wo_a of a decode step (one row; a batch of 3 sequences; 2 tokens of a
    speculative verification) as the GPU runs it (no CPU copy): one quantized matmul over the
    groups as a batch, not one per group and a join (several rows are transposed to
    [G, N, in] views, which MLX copies in the product's launch); an official mxfp8 weight and a GGUF Q8_0
    one in its affine 8-bit view (biases), against float64 per group on the dequantized weight
    (the format's own decoder)."""
    from kernel_paths import graph_primitives

    from ds4mlx.quant.gguf import q8_0

    groups, in_dim, rows = 4, 128, 64
    rng = np.random.default_rng(5)
    if kind == "mxfp8":
        codes, blocks, w64 = _fp8_weight(groups * rows, in_dim, seed=5)
        leaves = dict(zip(("weight", "scales"), fp8_to_mxfp8(codes, blocks)))
        fmt = WeightFormat("mxfp8", bits=8, group_size=32)
    else:
        q8 = q8_0.quantize(rng.normal(size=(groups * rows, in_dim)).astype(np.float32))
        w64 = np.asarray(q8_0.dequantize(mx.array(q8)), dtype=np.float64).reshape(groups * rows, in_dim)
        # float32 scales: the product's dtype is x's (float16 ones promote: see _notes/prof.md)
        leaves = dict(zip(("weight", "scales", "biases"), q8_0.to_mlx_affine8(mx.array(q8), mx.float32)))
        fmt = WeightFormat("affine", bits=8, group_size=32)
    m = quantized_linear(in_dim, groups * rows, fmt)
    for k, v in leaves.items():
        m[k] = v
    x = mx.random.normal((*lead, groups, in_dim), key=mx.random.key(6))
    mx.eval(m.parameters(), x)
    monkeypatch.setattr(ops, "on_cpu", lambda: False)
    y = m.grouped(x, groups)
    assert graph_primitives(y) == ["QuantizedMatmul"]
    assert y.shape == (*lead, groups, rows) and y.dtype == mx.float32
    xs = np.asarray(x, dtype=np.float64)
    ref = np.stack([xs[..., g, :] @ w64[g * rows:(g + 1) * rows].T for g in range(groups)], axis=-2)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_compiled_steps_do_not_retrace_as_the_context_grows(tiny_ckpt, monkeypatch):
    """The compiled HC pre, router, one-query attention and rotation run their Python bodies
    only when MLX traces them: count the calls of helpers their bodies call (looked up as module
    globals at trace time). The window fills, ratio-4 rows are added: no retrace."""
    from ds4mlx.loader import load
    from ds4mlx.model import attention, attention_one, moe

    model, _ = load(str(tiny_ckpt), dtype=mx.float32)
    traces = {"hc_pre": 0, "router": 0, "attention": 0, "rotation": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            traces[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ops, "_pre_parts", counted("hc_pre", ops._pre_parts))
    monkeypatch.setattr(moe, "_scores", counted("router", moe._scores))
    monkeypatch.setattr(attention_one, "_one_out", counted("attention", attention_one._one_out))
    monkeypatch.setattr(attention, "rotate", counted("rotation", attention.rotate))
    cache = model.make_cache()
    token = mx.argmax(model(mx.array([[5, 6, 7, 8, 9]]), cache=cache)[:, -1], axis=-1)
    for step in range(40):  # past several ratio-4 rows and the sliding window
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(token)
        if step == 1:
            warm = dict(traces)
    assert traces == warm, f"retraced while decoding: {warm} -> {traces}"
    # the counters do see a trace: shapes no other call used
    ops.hc_pre(mx.ones((1, 3, 4, 8)), mx.ones((24, 32)), mx.zeros((24,)), mx.ones((3,)),
               iters=3, eps=1e-6, norm_eps=1e-6)
    moe._biased_route(mx.ones((3, 24)), mx.ones((5, 24)), mx.zeros((5,)), 2, True, 1.0)
    attention_one.one_window(mx.ones((1, 1, 3, 8)), mx.ones((1, 5, 8)), mx.array(5), mx.zeros((3,)), 0.5)
    attention._rotate_ops(mx.ones((1, 3, 2, 8)), mx.ones((1, 3, 8)), mx.arange(3), mx.ones((8,)),
                          mx.ones((8,)), 1e-6, 0)
    assert traces == {**warm, "hc_pre": warm["hc_pre"] + 1, "router": warm["router"] + 1,
                      "attention": warm["attention"] + 1, "rotation": warm["rotation"] + 2}

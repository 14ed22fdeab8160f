"""The CPU paths of ops.py: RMSNorm and the MX-quantized matmul against independent references
(mx.fast.rms_norm; numpy float64 on the format's own dequantizer), and the grouped projection
of layers.QuantizedLinear against separate per-group modules."""

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


def test_compiled_steps_do_not_retrace_as_the_context_grows(tiny_ckpt, monkeypatch):
    """The compiled HC pre, router, one-query attention and rotation run their Python bodies
    only when MLX traces them: count the calls of helpers their bodies call (looked up as module
    globals at trace time). The window fills, ratio-4 rows are added: no retrace."""
    from ds4mlx.loader import load
    from ds4mlx.model import attention, attention_one, moe

    model, _ = load(str(tiny_ckpt), dtype=mx.float32)
    traces = {"sinkhorn": 0, "router": 0, "attention": 0, "rotation": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            traces[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ops, "sinkhorn", counted("sinkhorn", ops.sinkhorn))
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
    assert traces == {**warm, "sinkhorn": warm["sinkhorn"] + 1, "router": warm["router"] + 1,
                      "attention": warm["attention"] + 1, "rotation": warm["rotation"] + 2}

"""GGUF-native projections: results against float matmuls on gguf-py-dequantized weights, and
the ops fallback touches only the experts a call selects."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq
from mlx_lm.models.switch_layers import SwitchLinear

from ds4mlx import kernels
from ds4mlx.quant import gguf as fmts
from ds4mlx.layers import gguf as gl
from ds4mlx.layers import apply_formats
from ds4mlx.quant.formats import WeightFormat, gguf_kind

E, OUT, IN = 8, 16, 256


def _blocks(name, shape_rows, n_in, seed):
    """Valid blocks of ``name`` for rows ``shape_rows`` (quantized Gaussian weights)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((*shape_rows, n_in)).astype(np.float32) * 0.1
    return fmts.get(name).quantize(w)


def _ref_weights(name, blocks):
    return gq.dequantize(blocks, GGMLQuantizationType[name])


TYPES = ["Q4_K", "Q2_K", "IQ2_XXS", "Q8_0", "MXFP4"]


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("k", [1, 4, 6])
def test_switch_linear_matches_float_gather_mm(name, k):
    blocks = _blocks(name, (E, OUT), IN, seed=k)
    layer = gl.GGUFSwitchLinear.from_blocks(mx.array(blocks), fmts.get(name).GGML_TYPE, IN, "w")
    w_ref = _ref_weights(name, blocks)  # [E, OUT, IN] via gguf-py
    rng = np.random.default_rng(100 + k)
    n = 5
    x = rng.standard_normal((n, IN)).astype(np.float32)
    idx = rng.integers(0, E, size=(n, k)).astype(np.uint32)
    idx[0] = idx[0, 0]  # a token whose k slots repeat one expert
    # the model's unsorted call: x [N, 1, 1, D], indices [N, k] -> [N, k, 1, OUT]
    y = np.array(layer(mx.array(x)[:, None, None, :], mx.array(idx)))
    ref = np.einsum("nd,nkod->nko", x, w_ref[idx])[:, :, None, :]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # and the float SwitchLinear on the same weights agrees (same protocol)
    sw = SwitchLinear(IN, OUT, E, bias=False)
    sw.weight = mx.array(w_ref)
    np.testing.assert_allclose(y, np.array(sw(mx.array(x)[:, None, None, :], mx.array(idx))),
                               rtol=1e-5, atol=1e-5)
    # the sorted call: x [N*k, 1, D] in expert order, indices sorted
    flat = idx.reshape(-1)
    order = np.argsort(flat, kind="stable")
    xs = np.repeat(x, k, axis=0)[order][:, None, :]
    ys = np.array(layer(mx.array(xs), mx.array(flat[order]), sorted_indices=True))
    np.testing.assert_allclose(ys[:, 0], ref[:, :, 0].reshape(-1, OUT)[order], rtol=1e-5, atol=1e-5)


def _spy(monkeypatch, name):
    """Record how many experts each dequantize call of format ``name`` covers."""
    mod = fmts.get(name)
    calls = []
    real = mod.dequantize

    def spy(blocks):
        calls.append(blocks.shape[0] if blocks.ndim == 3 else 1)
        return real(blocks)

    monkeypatch.setattr(mod, "dequantize", spy)
    return calls


def test_switch_ops_dequantizes_only_selected_experts(monkeypatch):
    calls = _spy(monkeypatch, "Q4_K")
    layer = gl.GGUFSwitchLinear.from_blocks(mx.array(_blocks("Q4_K", (E, OUT), IN, 1)),
                                            GGMLQuantizationType.Q4_K, IN)
    x = mx.ones((3, 1, 1, IN))
    idx = mx.array([[5, 2], [2, 5], [5, 5]], dtype=mx.uint32)
    mx.eval(layer(x, idx))
    assert calls == [2]  # experts 2 and 5, once each


def test_switch_ops_grouped_path_bounded_and_exact(monkeypatch):
    blocks = _blocks("Q2_K", (E, OUT), IN, 3)
    w_ref = _ref_weights("Q2_K", blocks)
    layer = gl.GGUFSwitchLinear.from_blocks(mx.array(blocks), GGMLQuantizationType.Q2_K, IN)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((7, IN)).astype(np.float32)
    idx = rng.integers(0, E, size=(7, 6)).astype(np.uint32)
    ref = np.einsum("nd,nkod->nko", x, w_ref[idx])
    calls = _spy(monkeypatch, "Q2_K")
    monkeypatch.setattr(kernels.moe, "DEQUANT_BUDGET", 2 * 4 * OUT * IN)  # two experts per step
    y = np.array(layer(mx.array(x)[:, None, None, :], mx.array(idx)))[:, :, 0]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert max(calls) <= 2 and sum(calls) == len(np.unique(idx))


def test_switch_rejects_out_of_range_experts():
    layer = gl.GGUFSwitchLinear(IN, OUT, E, "Q8_0")
    with pytest.raises(IndexError, match=r"\[0, 8\)"):
        layer(mx.ones((1, 1, 1, IN)), mx.array([[8]], dtype=mx.uint32))


@pytest.mark.parametrize("name", ["Q8_0", "Q6_K", "IQ2_XXS"])
def test_linear_matches_float_matmul(name, monkeypatch):
    rng = np.random.default_rng(5)
    if name == "Q6_K":  # no quantizer: random valid blocks
        blocks = rng.integers(0, 256, size=(OUT, IN // 256 * 210), dtype=np.uint8)
        blocks.reshape(OUT, -1, 210)[..., 208:210] = np.float16(0.01).reshape(1).view(np.uint8)
    else:
        blocks = _blocks(name, (OUT,), IN, 6)
    layer = gl.GGUFLinear.from_blocks(mx.array(blocks), fmts.get(name).GGML_TYPE, IN, "w")
    x = rng.standard_normal((2, 3, IN)).astype(np.float32)
    ref = x @ _ref_weights(name, blocks).T
    np.testing.assert_allclose(np.array(layer(mx.array(x))), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(kernels.moe, "DEQUANT_BUDGET", 4 * IN * 5)  # 5 output rows per step
    np.testing.assert_allclose(np.array(layer(mx.array(x))), ref, rtol=1e-5, atol=1e-5)


def test_from_blocks_checks_shape():
    with pytest.raises(ValueError, match="blk.0.ffn_up_exps.weight"):
        gl.GGUFSwitchLinear.from_blocks(mx.zeros((2, 4, 100), dtype=mx.uint8),
                                        GGMLQuantizationType.Q4_K, IN, "blk.0.ffn_up_exps.weight")
    with pytest.raises(fmts.UnsupportedQuantType, match="attn_q_a.*IQ1_S"):
        gl.GGUFLinear.from_blocks(mx.zeros((2, 50), dtype=mx.uint8),
                                  GGMLQuantizationType.IQ1_S, IN, "attn_q_a")


def test_layers_hand_the_product_to_kernels(monkeypatch):
    # kernels is the one place that picks kernel or ops; the modules only pass their blocks on
    seen = {}

    def gguf_switch_matmul(x, w, indices, *, fmt, input_dims, output_dims, sorted_indices):
        seen.update(fmt=fmt, dims=(input_dims, output_dims), sorted=sorted_indices)
        return mx.full((1, 1, 1, output_dims), 7.0)

    def gguf_matmul(x, w, *, fmt, input_dims, output_dims):
        seen.update(dense=(fmt, input_dims, output_dims))
        return mx.full((1, output_dims), 3.0)

    monkeypatch.setattr(kernels, "gguf_switch_matmul", gguf_switch_matmul)
    monkeypatch.setattr(kernels, "gguf_matmul", gguf_matmul)
    layer = gl.GGUFSwitchLinear(IN, OUT, E, "IQ2_XXS")
    y = layer(mx.ones((1, 1, 1, IN)), mx.array([[1]], dtype=mx.uint32))
    lin = gl.GGUFLinear(IN, OUT, "Q8_0")
    assert np.all(np.array(lin(mx.ones((1, IN)))) == 3.0)
    assert seen == {"fmt": "IQ2_XXS", "dims": (IN, OUT), "sorted": False, "dense": ("Q8_0", IN, OUT)}
    assert np.all(np.array(y) == 7.0)


def test_apply_formats_builds_gguf_modules():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(IN, OUT, bias=False)
            self.experts = SwitchLinear(IN, OUT, E, bias=False)

    model = apply_formats(Tiny(), {"proj": WeightFormat(gguf_kind("q8_0")),
                                   "experts": WeightFormat(gguf_kind("IQ2_XXS"))})
    assert isinstance(model.proj, gl.GGUFLinear) and model.proj.type_name == "Q8_0"
    assert isinstance(model.experts, gl.GGUFSwitchLinear)
    blocks = _blocks("IQ2_XXS", (E, OUT), IN, 8)
    model.load_weights([("experts.weight", mx.array(blocks)),
                        ("proj.weight", mx.array(_blocks("Q8_0", (OUT,), IN, 9)))], strict=True)
    x = np.ones((1, IN), np.float32)
    y = np.array(model.experts(mx.array(x)[:, None, None, :], mx.array([[3]], dtype=mx.uint32)))
    np.testing.assert_allclose(y[0, 0, 0], _ref_weights("IQ2_XXS", blocks)[3] @ x[0], rtol=1e-5,
                               atol=1e-5)


def test_linear_grouped_matches_block_diagonal_reference():
    from ds4mlx.model.attention import grouped_linear

    groups = 2
    blocks = _blocks("Q4_K", (OUT,), IN, 10)
    layer = gl.GGUFLinear.from_blocks(mx.array(blocks), GGMLQuantizationType.Q4_K, IN)
    w = _ref_weights("Q4_K", blocks).reshape(groups, OUT // groups, IN)
    x = np.random.default_rng(11).standard_normal((3, groups, IN)).astype(np.float32)
    ref = np.einsum("bgi,gri->bgr", x, w)
    np.testing.assert_allclose(np.array(grouped_linear(layer, mx.array(x), groups)), ref,
                               rtol=1e-5, atol=1e-5)

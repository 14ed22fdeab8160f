"""The faster GGUF quantizers give the same bytes as the previous numpy implementation
(``tests/gguf_quant_reference.py``) on random inputs, with and without importance weights (the
reference set to llama.cpp's importance weighting, which the package now follows), and the
IQ2_XXS search gives the same bytes with its C kernel and with the numpy fallback."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq

import gguf_quant_reference as reference
from ds4mlx.quant import codecs
from ds4mlx.quant import gguf as fmts
from ds4mlx.quant.gguf import native


def _inputs(seed: int, rows: int, cols: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
    x[0, :256] = 0.0  # an all-zero block
    x[1, 256:512] = 0.75  # a constant block
    heavy = (rng.standard_t(3, size=(rows, cols)) * 0.01).astype(np.float32)  # heavy tails
    imp = rng.gamma(0.5, size=cols).astype(np.float32)  # skewed importance
    imp[::13] = 0.0  # columns never seen by the calibration text
    return [(x, None), (heavy, None), (x, imp), (heavy, imp * imp)]


LLAMA_CPP_SIGMA_FACTOR = {"Q4_K": 2.0, "Q2_K": 1.0, "IQ2_XXS": 1.0}  # σ² = factor · mean(x²)


@pytest.fixture
def llama_cpp_weighting(monkeypatch):
    monkeypatch.setattr(reference, "SIGMA_FACTOR", LLAMA_CPP_SIGMA_FACTOR)


@pytest.mark.parametrize("name", list(reference.QUANTIZE))
def test_same_bytes_as_reference(name, llama_cpp_weighting):
    for seed in (0, 1):
        for x, imp in _inputs(seed, 24, 2048):
            new = fmts.get(name).quantize(x, weights=imp)
            old = reference.QUANTIZE[name](x, weights=imp)
            assert new.dtype == old.dtype and new.shape == old.shape
            if name == "IQ2_XXS" and imp is not None:
                _check_near_ties(x, imp, new, old)
            else:
                assert np.array_equal(new, old), (name, seed, imp is not None, int((new != old).sum()))


@pytest.mark.parametrize("name", ["Q4_K", "Q2_K"])
def test_same_bytes_across_batches(name):
    # 1100 super-blocks: several of the quantizers' batches (and a partial one), where the
    # reference batches differently
    x = np.random.default_rng(6).standard_normal((275, 1024), dtype=np.float32) * 0.02
    assert np.array_equal(fmts.get(name).quantize(x), reference.QUANTIZE[name](x))


def _check_near_ties(x, imp, new, old):
    """IQ2_XXS with importance: codebook entries that differ only in elements of (near-)zero
    importance cost the same to within float rounding, and the old matrix-product search broke
    those ties by rounding noise. So: the same importance-weighted error, and values that differ
    only in such elements."""
    qtype = GGMLQuantizationType.IQ2_XXS
    y_new, y_old = gq.dequantize(new, qtype), gq.dequantize(old, qtype)
    err_new = float((imp * (y_new - x) ** 2).sum(dtype=np.float64))
    err_old = float((imp * (y_old - x) ** 2).sum(dtype=np.float64))
    assert err_new <= err_old * (1 + 1e-6), (err_new, err_old)
    cols = np.nonzero(y_new != y_old)[1]
    assert np.all(imp[cols] < 1e-3 * imp.mean()), imp[cols].max()


def test_iq2_xxs_native_and_numpy_search_agree(monkeypatch, llama_cpp_weighting):
    assert native.load("iq2_search") is not None or pytest.skip("no C compiler here")
    x, imp = _inputs(2, 16, 2048)[2]
    imp = imp + 0.05  # no near-zero importance, so no near-ties (see _check_near_ties)
    with_c = fmts.get("IQ2_XXS").quantize(x, weights=imp)
    monkeypatch.setitem(native._LIBS, "iq2_search", None)
    without = fmts.get("IQ2_XXS").quantize(x, weights=imp)
    assert np.array_equal(with_c, without)
    assert np.array_equal(with_c, reference.quantize_iq2_xxs(x, weights=imp))


def test_native_build_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("DS4MLX_QUANT_NATIVE", "0")
    monkeypatch.delitem(native._LIBS, "iq2_search", raising=False)
    assert native.load("iq2_search") is None
    monkeypatch.delitem(native._LIBS, "iq2_search")


def test_e2m1_encode_same_as_reference():
    rng = np.random.default_rng(3)
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    special = np.concatenate([mids, -mids, np.nextafter(mids, 0), np.nextafter(mids, 9),
                              [0.0, -0.0, 6.0, -6.0, 7.0, -1e30, np.inf, -np.inf, np.nan, -np.nan,
                               1e-45, -1e-45]]).astype(np.float32)
    x = np.concatenate([special, (rng.standard_normal(100_000) * 3).astype(np.float32)])
    assert np.array_equal(codecs.e2m1_encode(x), reference.e2m1_encode(x))
    assert np.array_equal(codecs.e2m1_encode(x[:700].reshape(-1, 7)), reference.e2m1_encode(x[:700].reshape(-1, 7)))


@pytest.mark.parametrize("name", list(LLAMA_CPP_SIGMA_FACTOR))
def test_importance_weighting_is_llama_cpp_s(name, monkeypatch):
    # the element error weights handed to the search are qw·sqrt(σ² + x²), σ² = factor·mean(x²)
    # over the super-block (ggml-quants.c, quantize_row_{q4_K,q2_K,iq2_xxs}_impl)
    from ds4mlx.quant.gguf import common

    seen = []
    real = common.importance_weights
    monkeypatch.setattr(common, "importance_weights", lambda *a: seen.append(a[3]) or real(*a))
    module = fmts.get(name)
    if name == "IQ2_XXS":
        monkeypatch.setattr(module, "importance_weights", common.importance_weights)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 512), dtype=np.float32)
    qw = rng.random(512, dtype=np.float32)
    module.quantize(x, weights=qw)
    assert seen and set(seen) == {LLAMA_CPP_SIGMA_FACTOR[name]}
    xb = x.reshape(-1, 256)
    w = real(xb, xb, np.broadcast_to(qw, x.shape).reshape(-1, 256), LLAMA_CPP_SIGMA_FACTOR[name])
    sigma2 = LLAMA_CPP_SIGMA_FACTOR[name] * (xb.astype(np.float64) ** 2).sum(axis=1, keepdims=True) / 256
    want = np.broadcast_to(qw, x.shape).reshape(-1, 256) * np.sqrt(sigma2 + xb.astype(np.float64) ** 2)
    np.testing.assert_allclose(w, want, rtol=1e-6)

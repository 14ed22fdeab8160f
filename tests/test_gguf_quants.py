"""GGUF block formats: our MLX dequantizers are bit-identical to gguf-py's reference, our numpy
quantizers round-trip through gguf-py's dequantizer within stated error bounds, and the MLX
repacks (Q8_0 -> affine8, MXFP4 -> mxfp4) are exact."""

import zlib

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from ds4mlx.quant import gguf as fmts
from ds4mlx.quant.gguf import iq2_xxs, mxfp4, q8_0
from ds4mlx.quant.gguf.common import BlockShapeError

# fp16 scale fields: tiny/huge normals, subnormals, ±0, negatives, ordinary values
EXTREME_F16 = np.array(
    [0.0, -0.0, 6.0e-8, -6.0e-8, 3.0e-6, 6.1035156e-05, 65504.0, -65504.0, 30000.0, 1e-3,
     -0.5, 1.0, 0.0137, 2.0**-20, 512.0, -3.25],
    dtype=np.float16,
)
# byte offsets of the fp16 fields in each block
F16_FIELDS = {
    "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q2_K": [80, 82], "Q3_K": [108], "Q6_K": [208],
    "IQ2_XXS": [0],
}
BLOCK_TYPES = ["Q8_0", "Q4_K", "Q2_K", "Q3_K", "Q5_K", "Q6_K", "IQ2_XXS", "MXFP4"]


def _bits_equal(a, b) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


def _random_blocks(name: str, lead: tuple[int, ...], n_blocks: int, rng) -> np.ndarray:
    """Random bytes with every fp16 field replaced by a finite value (a third of them extreme)."""
    fmt = fmts.get(name)
    raw = rng.integers(0, 256, size=(*lead, n_blocks * fmt.BLOCK_BYTES), dtype=np.uint8)
    blocks = raw.reshape(-1, fmt.BLOCK_BYTES)
    for off in F16_FIELDS.get(name, []):
        vals = (rng.standard_normal(len(blocks)) * 0.05).astype(np.float16)
        pick = rng.random(len(blocks)) < 0.35
        vals[pick] = rng.choice(EXTREME_F16, size=int(pick.sum()))
        blocks[:, off:off + 2] = vals.view(np.uint8).reshape(-1, 2)
    return raw


def _ours(name: str, raw: np.ndarray) -> np.ndarray:
    return np.array(fmts.get(name).dequantize(mx.array(raw)))


def _ref(name: str, raw: np.ndarray) -> np.ndarray:
    return gq.dequantize(raw, GGMLQuantizationType[name])


# --- registry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", *BLOCK_TYPES])
def test_format_constants_match_gguf(name):
    fmt = fmts.get(name)
    qtype = GGMLQuantizationType[name]
    assert fmt.GGML_TYPE == int(qtype)
    assert (fmt.BLOCK_SIZE, fmt.BLOCK_BYTES) == GGML_QUANT_SIZES[qtype]
    assert fmts.by_type(int(qtype)) is fmt


def test_unsupported_type_names_tensor_and_type():
    with pytest.raises(fmts.UnsupportedQuantType, match=r"blk\.3\.ffn_up_exps\.weight.*IQ1_S"):
        fmts.by_type(int(GGMLQuantizationType.IQ1_S), tensor="blk.3.ffn_up_exps.weight")
    with pytest.raises(ValueError, match="unknown type id 999"):
        fmts.by_type(999, tensor="x")
    with pytest.raises(fmts.UnsupportedQuantType, match="Q4_0"):
        fmts.get("q4_0")


def test_bad_byte_rows_are_rejected():
    with pytest.raises(BlockShapeError, match="Q4_K"):
        fmts.get("Q4_K").dequantize(mx.zeros((2, 145), dtype=mx.uint8))
    with pytest.raises(BlockShapeError, match="uint8"):
        q8_0.dequantize(mx.zeros((34,), dtype=mx.float32))
    with pytest.raises(BlockShapeError, match="multiple of 256"):
        iq2_xxs.quantize(np.zeros((2, 100), np.float32))


# --- dequantization: bit-exact against gguf-py -------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_dequantize_random_blocks_bit_exact(name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    raw = _random_blocks(name, (3, 2), 24, rng)
    ref = _ref(name, raw)
    ours = _ours(name, raw)
    assert not np.isnan(ref).any()
    assert _bits_equal(ours, ref)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_dequantize_extreme_scales_bit_exact(name):
    # every extreme fp16 value in every scale field, all other bytes random
    rng = np.random.default_rng(7)
    fmt = fmts.get(name)
    raw = rng.integers(0, 256, size=(len(EXTREME_F16), fmt.BLOCK_BYTES), dtype=np.uint8)
    for i, off in enumerate(F16_FIELDS.get(name, [])):
        # the second field (dmin) runs through the values shifted by 5: every pairing differs
        raw[:, off:off + 2] = np.roll(EXTREME_F16, 5 * i).view(np.uint8).reshape(-1, 2)
    if name == "MXFP4":
        raw = rng.integers(0, 256, size=(256, fmt.BLOCK_BYTES), dtype=np.uint8)
        raw[:, 0] = np.arange(256)  # every E8M0 exponent, subnormal and 2^127 included
    ref = _ref(name, raw)
    assert not np.isnan(ref).any()
    assert _bits_equal(_ours(name, raw), ref)


def test_iq2_xxs_every_grid_entry_sign_pattern_and_scale():
    # 8 blocks × 8 groups × 4 runs = 256 runs: grid entry i, sign pattern i % 128, scale i % 16
    n = 8
    d = np.array([1.0, -0.5, 6.0e-8, 65504.0, 3.0e-3, -0.0, 2.0**-14, 7.0], dtype=np.float16)
    run = np.arange(256, dtype=np.uint32).reshape(n, 8, 4)
    a = (run << (8 * np.arange(4, dtype=np.uint32))).sum(axis=-1)
    signs = ((run % 128) << (7 * np.arange(4, dtype=np.uint32))).sum(axis=-1)
    b = signs | ((run[..., 0] // 4 % 16) << 28)
    words = np.stack([a, b], axis=-1).astype("<u4").reshape(n, 16)
    raw = np.concatenate([d.view(np.uint8).reshape(n, 2), words.view(np.uint8)], axis=1)
    ref = _ref("IQ2_XXS", raw)
    assert _bits_equal(_ours("IQ2_XXS", raw), ref)
    # and the tables decode to what the format defines
    assert bytes(iq2_xxs.KSIGNS) == gq.IQ2_XXS.ksigns
    assert set(np.unique(iq2_xxs.GRID)) == {8.0, 25.0, 43.0}
    # d = 1, ls = 0 (factor 1/8), no signs: run i decodes to grid entry i / 8
    plain = np.stack([a, np.zeros_like(a)], axis=-1).astype("<u4").reshape(n, 16)
    one = np.full((n, 1), 1.0, np.float16).view(np.uint8)
    vals = _ours("IQ2_XXS", np.concatenate([one, plain.view(np.uint8)], axis=1))
    np.testing.assert_array_equal(vals.reshape(256, 8) * 8, iq2_xxs.GRID)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_float_types_bit_exact(name):
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(200) * 100, [0.0, -0.0, 1e-40, -3e-39, 6e-8, 65504.0]])
    x = x.astype(np.float32).reshape(2, -1)
    fmt = fmts.get(name)
    raw = fmt.quantize(x)
    assert raw.dtype == np.uint8 and raw.shape == (2, 103 * fmt.BLOCK_BYTES)
    if name == "F32":
        ref = x
    elif name == "F16":
        ref = x.astype(np.float16).astype(np.float32)
        assert np.array_equal(raw.view(np.float16), x.astype(np.float16))
    else:
        qtype = GGMLQuantizationType.BF16
        assert np.array_equal(raw, gq.quantize(x, qtype).view(np.uint8))  # same rounding
        ref = gq.dequantize(raw, qtype)
    assert _bits_equal(_ours(name, raw), ref)


# --- quantizers --------------------------------------------------------------------------------

# RMS relative error on N(0, 1) data, 16 × 4096 values, seed 0 (measured: Q8_0 0.00537,
# Q4_K 0.0719, Q2_K 0.2754, IQ2_XXS 0.3364, MXFP4 0.1121); the bounds sit a little above.
ERROR_BOUNDS = {"Q8_0": 0.0056, "Q4_K": 0.075, "Q2_K": 0.285, "IQ2_XXS": 0.345, "MXFP4": 0.115}


def _gauss():
    return np.random.default_rng(0).standard_normal((16, 4096)).astype(np.float32)


def _rel_rms(y, x):
    return float(np.sqrt(((y - x) ** 2).mean() / (x**2).mean()))


@pytest.mark.parametrize("name", list(ERROR_BOUNDS))
def test_quantizer_roundtrip_error_bound(name):
    x = _gauss()
    packed = fmts.get(name).quantize(x)
    fmt = fmts.get(name)
    assert packed.dtype == np.uint8
    assert packed.shape == (16, 4096 // fmt.BLOCK_SIZE * fmt.BLOCK_BYTES)
    y = _ref(name, packed)
    err = _rel_rms(y, x)
    assert err < ERROR_BOUNDS[name], err
    # and our MLX dequantizer reads our bytes the same way
    assert _bits_equal(_ours(name, packed), y)


@pytest.mark.parametrize("name", ["Q8_0", "MXFP4"])
def test_quantizer_not_worse_than_gguf_py(name):
    x = _gauss()
    qtype = GGMLQuantizationType[name]
    ours = _rel_rms(_ref(name, fmts.get(name).quantize(x)), x)
    theirs = _rel_rms(gq.dequantize(gq.quantize(x, qtype), qtype), x)
    assert ours <= theirs * 1.01, (ours, theirs)


@pytest.mark.parametrize("name,bits", [("Q4_K", 4), ("Q2_K", 2), ("IQ2_XXS", 2)])
def test_quantizer_beats_mlx_affine_at_more_bits(name, bits):
    # gguf-py has no quantizer for these; MLX affine with group 32 and fp16 scale+bias spends
    # 1 bit/weight more on scales than Q4_K and Q2_K use, so it is a fair upper bound
    x = _gauss()
    w, s, b = mx.quantize(mx.array(x), group_size=32, bits=bits)
    mlx_err = _rel_rms(np.array(mx.dequantize(w, s, b, group_size=32, bits=bits)), x)
    ours = _rel_rms(_ref(name, fmts.get(name).quantize(x)), x)
    assert ours < mlx_err, (ours, mlx_err)


@pytest.mark.parametrize("name", list(ERROR_BOUNDS))
def test_quantizer_edge_rows(name):
    fmt = fmts.get(name)
    n = fmt.BLOCK_SIZE * 2
    x = np.zeros((5, n), np.float32)
    x[1] = 0.75  # constant
    x[2] = -3.0  # constant negative
    x[3, 5] = 40.0  # one outlier in zeros
    x[4] = np.linspace(-1e-3, 2e-3, n)  # small values
    y = _ref(name, fmt.quantize(x))
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[0], 0.0)
    scale = np.abs(x).max(axis=1, keepdims=True)
    tol = {"Q8_0": 0.01, "Q4_K": 0.1, "Q2_K": 0.35, "IQ2_XXS": 0.6, "MXFP4": 0.25}[name]
    assert np.all(np.abs(y - x) <= tol * scale + 1e-12), np.abs(y - x).max(axis=1)


@pytest.mark.parametrize("name", ["Q4_K", "Q2_K", "IQ2_XXS", "MXFP4"])
def test_importance_weights_lower_weighted_error(name):
    x = _gauss()[:8]
    imp = np.ones(4096, np.float32)
    imp[::4] = 50.0  # a quarter of the columns matter a lot
    fmt = fmts.get(name)
    plain = _ref(name, fmt.quantize(x))
    weighted = _ref(name, fmt.quantize(x, weights=imp))

    def werr(y):
        return float((imp * (y - x) ** 2).sum())

    assert werr(weighted) < werr(plain)
    with pytest.raises(ValueError, match="non-negative"):
        fmt.quantize(x, weights=-imp)


# --- exact MLX repacks ---------------------------------------------------------------------------


def test_q8_0_to_mlx_affine8_exact():
    rng = np.random.default_rng(11)
    raw = _random_blocks("Q8_0", (6,), 8, rng)
    d = raw.reshape(6, 8, 34)[:, :, :2].copy().view(np.float16)
    keep = np.abs(d.astype(np.float32)) <= 511.75
    raw.reshape(6, 8, 34)[:, :, :2] = np.where(keep, d, np.float16(3.0)).view(np.uint8)
    w, s, b = q8_0.to_mlx_affine8(mx.array(raw))
    assert w.dtype == mx.uint32 and w.shape == (6, 64) and s.dtype == mx.float16
    ref = _ref("Q8_0", raw)
    deq = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=32, bits=8)
    np.testing.assert_array_equal(np.array(deq), ref)  # storage exact (±0 aside)
    # a scale whose −128·d overflows fp16 switches the view to float32
    raw.reshape(6, 8, 34)[0, 0, :2] = np.array([60000.0], np.float16).view(np.uint8)
    w, s, b = q8_0.to_mlx_affine8(mx.array(raw))
    assert s.dtype == mx.float32
    deq = mx.dequantize(w, s, b, group_size=32, bits=8)
    np.testing.assert_array_equal(np.array(deq), _ref("Q8_0", raw))
    x = mx.array(rng.standard_normal((3, 256)).astype(np.float32))
    y = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=32, bits=8)
    yr = np.array(x) @ _ref("Q8_0", raw).T
    np.testing.assert_allclose(np.array(y), yr, rtol=1e-5, atol=1e-5 * np.abs(yr).max())


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_mxfp4_to_mlx_mxfp4_exact():
    rng = np.random.default_rng(12)
    raw = rng.integers(0, 256, size=(5, 9 * 17), dtype=np.uint8)
    raw.reshape(-1, 17)[:, 0] = rng.integers(0, 255, size=45)  # 255 is NaN in MLX
    raw.reshape(-1, 17)[:3, 0] = [0, 1, 254]
    w, s = mxfp4.to_mlx_mxfp4(mx.array(raw))
    assert w.dtype == mx.uint32 and w.shape == (5, 36) and s.dtype == mx.uint8
    deq = mx.dequantize(w, s, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)
    np.testing.assert_array_equal(np.array(deq), _ref("MXFP4", raw))  # MLX writes −0 for code 8


def test_mxfp4_from_pairs_exact():
    from ds4mlx.quant.codecs import e2m1_decode, e8m0_decode

    rng = np.random.default_rng(13)
    codes = rng.integers(0, 16, size=(3, 128), dtype=np.uint8)
    scales = rng.integers(1, 255, size=(3, 4), dtype=np.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    ref = e2m1_decode(codes) * np.repeat(e8m0_decode(scales), 32, axis=1)
    np.testing.assert_array_equal(_ref("MXFP4", mxfp4.from_pairs(packed, scales)), ref)

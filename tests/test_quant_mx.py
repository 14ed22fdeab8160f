"""Official FP8/FP4 formats: decoders against independent definitions, MLX views bit-exact."""

import mlx.core as mx
import numpy as np
import pytest

from ds4mlx.quant.codecs import E2M1_TABLE, E4M3_FINITE_CODES, E4M3_TABLE, e2m1_encode, e4m3_encode, e8m0_decode
from ds4mlx.quant.mx import (
    QuantFormatError,
    dequant_fp4_np,
    dequant_fp8_np,
    fp4_to_mxfp4,
    fp8_to_mxfp8,
    pack_fp4,
    stack_fp4_to_mxfp4,
    unpack_fp4,
)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    return a.shape == b.shape and bool(np.all(a.view(np.uint32) == b.view(np.uint32)))


def _dequant_mx(w, s, mode):
    return np.array(mx.dequantize(w, s, mode=mode, group_size=32, dtype=mx.float32))


# --- scalar decoders --------------------------------------------------------------------------


def test_e4m3_table_matches_mlx_from_fp8_for_all_codes():
    codes = mx.array(np.arange(256, dtype=np.uint8))
    ref = np.array(mx.from_fp8(codes, dtype=mx.float32))
    assert np.array_equal(E4M3_TABLE, ref, equal_nan=True)
    assert len(E4M3_FINITE_CODES) == 254
    assert np.isnan(E4M3_TABLE[[0x7F, 0xFF]]).all()
    # hand-checked points of the definition: max, smallest subnormal, one, negative zero
    assert E4M3_TABLE[0x7E] == 448.0 and E4M3_TABLE[0x01] == 2.0**-9 and E4M3_TABLE[0x38] == 1.0
    assert E4M3_TABLE[0x80] == 0.0 and np.signbit(E4M3_TABLE[0x80])


def test_e8m0_is_exact_power_of_two():
    b = np.arange(255, dtype=np.uint8)
    ref = np.ldexp(np.float32(1.0), b.astype(np.int32) - 127).astype(np.float32)
    assert _bits_equal(e8m0_decode(b), ref)
    assert e8m0_decode(np.array([0], np.uint8)).view(np.uint32)[0] == 0x00400000  # 2^-127 subnormal
    assert np.isnan(e8m0_decode(np.array([255], np.uint8))[0])


def test_encoders_invert_the_tables():
    assert np.array_equal(e4m3_encode(E4M3_TABLE[E4M3_FINITE_CODES]), E4M3_FINITE_CODES)
    codes = np.arange(16, dtype=np.uint8)
    back = e2m1_encode(E2M1_TABLE)
    assert np.array_equal(back[codes != 8], codes[codes != 8])  # -0 encodes as +0 or -0: both zero
    assert np.array_equal(unpack_fp4(pack_fp4(np.tile(codes, (3, 2)))), np.tile(codes, (3, 2)))


def test_fp4_packing_low_nibble_is_even_column():
    packed = pack_fp4(np.array([[1, 7]], np.uint8))
    assert packed.view(np.uint8)[0, 0] == 0x71
    ref = np.array([[0.5 * 2.0, 6.0 * 2.0] + [0.0] * 30], np.float32)  # scale byte 128 = 2
    w = np.zeros((1, 16), np.int8)
    w[0, 0] = packed[0, 0]
    assert _bits_equal(dequant_fp4_np(w, np.array([[128]], np.uint8)), ref)


# --- MLX mxfp8 view ---------------------------------------------------------------------------


def _fp8_operands(rng, out_dim, in_dim, scale_bytes=None):
    codes = rng.choice(E4M3_FINITE_CODES, size=(out_dim, in_dim)).astype(np.uint8)
    grid = (-(-out_dim // 128), -(-in_dim // 128))
    if scale_bytes is None:
        scale = rng.integers(110, 135, size=grid).astype(np.uint8)
    else:
        scale = np.resize(np.asarray(scale_bytes, np.uint8), grid)
    return codes, scale


def test_mxfp8_view_is_bit_exact_on_a_2x2_block_grid_with_every_code():
    rng = np.random.default_rng(0)
    codes = np.resize(E4M3_FINITE_CODES, (256, 256))  # all 254 finite codes, in every block
    rng.shuffle(codes, axis=1)
    scale = np.array([[120, 125], [131, 117]], np.uint8)  # distinct: catches row/col block swaps
    w, s = fp8_to_mxfp8(codes, scale)
    assert w.dtype == mx.uint32 and w.shape == (256, 64) and s.dtype == mx.uint8 and s.shape == (256, 8)
    ref = dequant_fp8_np(codes, scale)
    assert _bits_equal(_dequant_mx(w, s, "mxfp8"), ref)
    # the reference itself: element (200, 3) lies in block (1, 0)
    assert ref[200, 3] == E4M3_TABLE[codes[200, 3]] * 2.0 ** (131 - 127)


@pytest.mark.parametrize("scale_byte", [0, 1, 2, 64, 127, 200, 253, 254])
def test_mxfp8_view_extreme_scale_bytes(scale_byte):
    codes = np.resize(E4M3_FINITE_CODES, (128, 256))
    scale = np.full((1, 2), scale_byte, np.uint8)
    w, s = fp8_to_mxfp8(codes, scale)
    with np.errstate(over="ignore"):
        ref = dequant_fp8_np(codes, scale)  # 448·2^127 overflows to inf in both
    assert _bits_equal(_dequant_mx(w, s, "mxfp8"), ref)


def test_nan_encodings_never_dequantize_to_finite_values():
    codes = np.resize(np.array([0x7F, 0xFF, 0x38], np.uint8), (128, 32))
    w, s = fp8_to_mxfp8(codes, np.full((1, 1), 127, np.uint8))
    got = _dequant_mx(w, s, "mxfp8")
    assert np.isnan(got[codes != 0x38]).all() and (got[codes == 0x38] == 1.0).all()
    # E8M0 byte 255 is NaN; MLX turns it into a non-finite scale as well (inf), never a number
    w, s = fp8_to_mxfp8(np.full((4, 32), 0x38, np.uint8), np.full((1, 1), 255, np.uint8))
    assert not np.isfinite(_dequant_mx(w, s, "mxfp8")).any()


def test_mxfp8_ragged_dims_follow_the_ceil_grid():
    rng = np.random.default_rng(1)
    codes, scale = _fp8_operands(rng, 200, 160)  # grid [2, 2], last blocks partial
    w, s = fp8_to_mxfp8(codes, scale)
    assert _bits_equal(_dequant_mx(w, s, "mxfp8"), dequant_fp8_np(codes, scale))


def test_mxfp8_rejects_unrepresentable_shapes_with_the_name():
    with pytest.raises(QuantFormatError, match="layers.0.attn.wq_a.weight.*multiple of 32"):
        fp8_to_mxfp8(np.zeros((128, 100), np.uint8), np.zeros((1, 1), np.uint8), "layers.0.attn.wq_a.weight")
    with pytest.raises(QuantFormatError, match="scale shape"):
        fp8_to_mxfp8(np.zeros((256, 128), np.uint8), np.zeros((1, 2), np.uint8))


# --- MLX mxfp4 view ---------------------------------------------------------------------------


def _fp4_operands(rng, lead, out_dim, in_dim):
    codes = rng.integers(0, 16, size=lead + (out_dim, in_dim)).astype(np.uint8)
    scale = rng.integers(115, 135, size=lead + (out_dim, in_dim // 32)).astype(np.uint8)
    return pack_fp4(codes), scale


def test_mxfp4_view_is_bit_exact():
    rng = np.random.default_rng(2)
    packed, scale = _fp4_operands(rng, (3,), 64, 96)
    scale[0, 0, :] = [0, 254, 1]  # extreme bytes
    w, s = fp4_to_mxfp4(packed, scale)
    assert w.dtype == mx.uint32 and w.shape == (3, 64, 12) and s.shape == (3, 64, 3)
    with np.errstate(over="ignore"):
        ref = dequant_fp4_np(packed, scale)  # 6·2^127 overflows to inf in both
    got = np.stack([_dequant_mx(w[e], s[e], "mxfp4") for e in range(3)])
    # MLX decodes code 8 (−0) as +0; the value is equal, only the sign of zero may differ
    assert np.array_equal(got, ref) and _bits_equal(np.abs(got), np.abs(ref))
    # the reference itself, from the definition: element (1, 5, 33)
    code = unpack_fp4(packed)[1, 5, 33]
    assert ref[1, 5, 33] == E2M1_TABLE[code] * 2.0 ** (int(scale[1, 5, 1]) - 127)


def test_stacked_experts_equal_per_expert_views():
    rng = np.random.default_rng(3)
    packed, scale = _fp4_operands(rng, (4,), 32, 64)
    w, s = stack_fp4_to_mxfp4(list(packed), list(scale))
    w1, s1 = fp4_to_mxfp4(packed, scale)
    assert np.array_equal(np.array(w), np.array(w1)) and np.array_equal(np.array(s), np.array(s1))
    with pytest.raises(QuantFormatError, match="do not match"):
        fp4_to_mxfp4(packed[0], scale[0][:, :1])


# --- matmuls on the views ---------------------------------------------------------------------


def test_quantized_matmul_on_views_matches_float_matmul():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    codes, scale = _fp8_operands(rng, 256, 256)
    w, s = fp8_to_mxfp8(codes, scale)
    got = mx.quantized_matmul(mx.array(x), w, s, transpose=True, group_size=32, bits=8, mode="mxfp8")
    ref = x.astype(np.float64) @ dequant_fp8_np(codes, scale).astype(np.float64).T
    np.testing.assert_allclose(np.array(got), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())

    packed, scale4 = _fp4_operands(rng, (), 128, 256)
    w, s = fp4_to_mxfp4(packed, scale4)
    got = mx.quantized_matmul(mx.array(x), w, s, transpose=True, group_size=32, bits=4, mode="mxfp4")
    ref = x.astype(np.float64) @ dequant_fp4_np(packed, scale4).astype(np.float64).T
    np.testing.assert_allclose(np.array(got), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_gather_qmm_on_stacked_views_matches_per_expert_matmul():
    rng = np.random.default_rng(5)
    n_experts, out_dim, in_dim, tokens, k = 4, 64, 128, 6, 2
    packed, scale = _fp4_operands(rng, (n_experts,), out_dim, in_dim)
    w, s = fp4_to_mxfp4(packed, scale)
    dense = dequant_fp4_np(packed, scale).astype(np.float64)
    x = rng.standard_normal((tokens, 1, 1, in_dim)).astype(np.float32)
    idx = np.stack([rng.permutation(n_experts)[:k] for _ in range(tokens)]).astype(np.uint32)
    got = mx.gather_qmm(
        mx.array(x), w, s, rhs_indices=mx.array(idx), transpose=True, group_size=32, bits=4, mode="mxfp4"
    )
    got = np.array(got)[:, :, 0, :]  # [tokens, k, out]
    ref = np.einsum("ti,tkoi->tko", x[:, 0, 0].astype(np.float64), dense[idx])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())

    # mxfp8 experts (the official "--expert-dtype fp8" variant) through the same call
    views = [fp8_to_mxfp8(*_fp8_operands(rng, 128, 128)) for _ in range(n_experts)]
    w8, s8 = mx.stack([v[0] for v in views]), mx.stack([v[1] for v in views])
    dense8 = np.stack([_dequant_mx(v[0], v[1], "mxfp8") for v in views]).astype(np.float64)
    x8 = rng.standard_normal((tokens, 1, 1, 128)).astype(np.float32)
    got = mx.gather_qmm(
        mx.array(x8), w8, s8, rhs_indices=mx.array(idx), transpose=True, group_size=32, bits=8, mode="mxfp8"
    )
    ref = np.einsum("ti,tkoi->tko", x8[:, 0, 0].astype(np.float64), dense8[idx])
    np.testing.assert_allclose(np.array(got)[:, :, 0, :], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_fp4_compiled_decoder_matches_numpy():
    """The compiled FP4 decoder gives numpy's bits: every code byte, every scale byte (the
    largest overflow to inf, 255 is NaN), int8 views, leading expert dimensions."""
    from ds4mlx.quant import mx as qmx

    lib = qmx._fp4_native()
    assert lib is not None or pytest.skip("no C compiler here")
    rng = np.random.default_rng(5)
    packed = rng.integers(0, 256, size=(3, 64, 256), dtype=np.uint8)
    packed[0, 0, :] = np.arange(256)
    scale = rng.integers(0, 256, size=(3, 64, 16), dtype=np.uint8)
    scale[1].reshape(-1)[:256] = np.arange(256)
    with np.errstate(over="ignore", invalid="ignore"):
        want = qmx._fp4_numpy(packed.view(np.int8), scale)
    got = dequant_fp4_np(packed.view(np.int8), scale)
    assert got.shape == want.shape == (3, 64, 512) and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("portable", [False, True])
def test_fp8_and_fp4_compiled_decoders_match_numpy(monkeypatch, portable):
    """The compiled FP8 decoder gives numpy's bits (table value × block scale): every code under
    every scale byte (254 overflows, 255 is NaN), whole and ragged 128-blocks, into a given
    output; the FP4 one too, with its AVX2 permutes and in the scalar build
    (DS4MLX_QUANT_PORTABLE=1)."""
    from ds4mlx.quant import mx as qmx
    from ds4mlx.quant.gguf import native

    if portable:
        monkeypatch.setenv("DS4MLX_QUANT_PORTABLE", "1")
        monkeypatch.setattr(native, "_LIBS", {})  # this build for this test only
    lib = native.load("fp4_decode")
    assert lib is not None or pytest.skip("no C compiler here")
    rng = np.random.default_rng(8)
    with np.errstate(over="ignore", invalid="ignore"):
        for rows, cols in ((256, 384), (130, 300), (1, 129)):
            codes = rng.integers(0, 256, size=(rows, cols), dtype=np.uint8)
            scale = rng.integers(0, 256, size=(-(-rows // 128), -(-cols // 128)), dtype=np.uint8)
            want = qmx._fp8_numpy(codes, scale)
            out = np.full((rows, cols), 7.0, np.float32)
            got = qmx._fp8_compiled(lib, codes, scale, out=out)
            assert got is out and got.tobytes() == want.tobytes()
        # every code with every scale byte: 17 × 17 blocks of 16 (the kernel takes the block size)
        codes = ((np.arange(259)[:, None] * 16 + np.arange(261)[None, :]) % 256).astype(np.uint8)
        scale = (np.arange(17 * 17) % 256).astype(np.uint8).reshape(17, 17)
        want = E4M3_TABLE[codes] * e8m0_decode(scale)[np.arange(259)[:, None] // 16, np.arange(261)[None, :] // 16]
        assert qmx._fp8_compiled(lib, codes, scale, 16).tobytes() == want.tobytes()
        packed = rng.integers(0, 256, size=(4, 32, 48), dtype=np.uint8)
        packed[0, 0, :] = np.arange(48)
        fscale = rng.integers(0, 256, size=(4, 32, 3), dtype=np.uint8)
        fscale[1].reshape(-1)[:96] = np.arange(96) + 160  # the overflowing ones and NaN
        assert qmx._fp4_compiled(lib, packed, fscale).tobytes() == qmx._fp4_numpy(packed, fscale).tobytes()
    with pytest.raises(ValueError, match="decoder output"):
        qmx._fp8_compiled(lib, codes[:4, :4], scale[:1, :1], out=np.empty((4, 5), np.float32))

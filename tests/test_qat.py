"""The official graph's rounding functions against their definitions (brute force in numpy)."""

import numpy as np
import mlx.core as mx
import pytest

from ds4mlx.model import qat


def e4m3_values() -> tuple[np.ndarray, np.ndarray]:
    """All finite e4m3fn codes (sign, 4-bit exponent bias 7, 3-bit mantissa) and their values."""
    codes, vals = [], []
    for c in range(256):
        s, e, m = c >> 7, (c >> 3) & 0xF, c & 7
        if e == 15 and m == 7:
            continue  # NaN
        v = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        codes.append(c)
        vals.append(-v if s else v)
    return np.array(codes), np.array(vals)


def nearest_even(x: np.ndarray, codes: np.ndarray, vals: np.ndarray, mant_bits: int) -> np.ndarray:
    """Round to the nearest representable value; on a tie take the code with an even mantissa."""
    out = np.empty_like(x, dtype=np.float64)
    for i, v in enumerate(x.ravel()):
        d = np.abs(vals - v)
        best = np.flatnonzero(d == d.min())
        if len(best) > 1:
            even = [b for b in best if (codes[b] & ((1 << mant_bits) - 1)) % 2 == 0]
            best = even or best
        out.ravel()[i] = vals[best[0]]
    return out


def ref_block_roundtrip(x: np.ndarray, block: int, qmax: float, floor: float, rounder) -> np.ndarray:
    xb = x.astype(np.float32).reshape(-1, block)
    amax = np.maximum(np.abs(xb).max(-1, keepdims=True), np.float32(floor)).astype(np.float32)
    ratio = (amax / np.float32(qmax)).astype(np.float32)
    mant, exp = np.frexp(ratio.astype(np.float64))  # ratio = mant·2^exp, mant in [0.5, 1)
    exp = np.where(mant == 0.5, exp - 1, exp)  # exact powers of two keep their exponent
    scale = np.ldexp(1.0, exp)
    q = np.clip(xb / scale, -qmax, qmax)
    return (rounder(q) * scale).reshape(x.shape).astype(np.float32)


def test_pow2_ceil_exact():
    x = np.array([1.0, 1.5, 0.25, 0.3, 448.0, 2.0**-100, 3.0 * 2**60, 1.0000001], np.float32)
    got = np.array(qat.pow2_ceil(mx.array(x)))
    want = np.array([2.0 ** np.ceil(np.log2(np.float64(v))) for v in x], np.float32)
    np.testing.assert_array_equal(got, want)


def test_fp8_roundtrip_matches_definition():
    codes, vals = e4m3_values()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 128)).astype(np.float32) * np.array([1e-3, 1, 50, 1e4], np.float32)[:, None]
    x[0, :64] = 0.0            # all-zero block: amax floors at 1e-4
    x[1, 5] = 1e-12            # tiny value inside a normal block
    x[2, 64:] = x[2, 64]       # constant block: every value hits ±448 exactly
    ref = ref_block_roundtrip(x, 64, 448.0, 1e-4, lambda q: nearest_even(q, codes, vals, 3))
    got = np.array(qat.fp8_roundtrip(mx.array(x)))
    np.testing.assert_array_equal(got, ref)


def test_fp8_ties_go_to_even():
    # One block scaled so that x/scale lands exactly halfway between e4m3 neighbours.
    x = np.zeros(64, np.float32)
    x[0] = 448.0  # scale = 1
    x[1:5] = [1.0625, 1.1875, 17.0, 19.0]  # halfway: 1+1/16, 1+3/16, between 16/18, 18/20
    got = np.array(qat.fp8_roundtrip(mx.array(x)))
    np.testing.assert_array_equal(got[1:5], [1.0, 1.25, 16.0, 20.0])


def test_fp4_roundtrip_matches_definition():
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)  # the e2m1 magnitudes
    codes = np.concatenate([np.arange(8), np.arange(8) + 8])
    vals = np.concatenate([grid, -grid])
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    x[0, :32] = 0.0
    x[1, 32:64] = np.array([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5] * 4, np.float32)  # ties, scale 1
    x[2, 64:96] *= 1e-30
    ref = ref_block_roundtrip(x, 32, 6.0, 6 * 2.0**-126, lambda q: nearest_even(q, codes, vals, 1))
    got = np.array(qat.fp4_roundtrip(mx.array(x)))
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got[1, 32:40], [6, 0, 1, 1, 2, 2, 4, 4])


def test_fp8_against_torch_cast():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 448)).astype(np.float32) * 3
    got = np.array(qat.fp8_roundtrip(mx.array(x)))
    xb = torch.tensor(x).reshape(-1, 64)
    amax = xb.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    scale = torch.pow(2.0, torch.ceil(torch.log2(amax / 448.0)))
    q = (xb / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    np.testing.assert_array_equal(got, q.reshape(x.shape).numpy())


def test_hadamard_orthonormal_sylvester():
    h = np.array(qat.hadamard_matrix(128))
    np.testing.assert_allclose(h @ h.T, np.eye(128), atol=1e-6)
    ref = np.array([[1.0]])
    while ref.shape[0] < 128:
        ref = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), ref)
    np.testing.assert_allclose(h, ref / np.sqrt(128), rtol=0, atol=1e-7)
    with pytest.raises(ValueError):
        qat.hadamard_matrix(96)


@pytest.mark.parametrize("shape", [(1, 1, 16, 128), (2, 37, 64), (3, 2)])
def test_hadamard_butterfly_equals_the_matrix(shape):
    """The fast transform against the product with the orthonormal Sylvester matrix (float64)."""
    x = mx.random.normal(shape, key=mx.random.key(3)) * 3
    ref = np.asarray(x, dtype=np.float64) @ np.array(qat.hadamard_matrix(shape[-1]), dtype=np.float64)
    got = qat.hadamard(x)
    assert got.dtype == mx.float32 and got.shape == x.shape
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    with pytest.raises(ValueError):
        qat.hadamard(mx.ones((2, 96)))


def test_kv_fp8_leaves_rope_dims():
    x = mx.random.normal((2, 3, 512))
    y = qat.kv_fp8(x, 64)
    np.testing.assert_array_equal(np.array(y[..., 448:]), np.array(x[..., 448:]))
    assert not np.array_equal(np.array(y[..., :448]), np.array(x[..., :448]))

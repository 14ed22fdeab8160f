"""The bit codecs of ``ds4mlx.quant.codecs`` against independent references.

BF16, E4M3 and E8M0 against torch's own casts (``torch.bfloat16``, ``torch.float8_e4m3fn``,
``torch.float8_e8m0fnu``); E2M1, which torch cannot cast to, against a brute-force nearest-value
search written here from the definition (distance to every code, ties to the even code).
Inputs: every code, every midpoint between neighbours and the floats either side of it,
denormals, infinities, NaNs and random values.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch

from ds4mlx.quant import codecs

RNG = np.random.default_rng(20260)


def _f32(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def _neighbours(x: np.ndarray) -> np.ndarray:
    """x and the float32 values just below and above each entry."""
    x = np.asarray(x, np.float32)
    return np.concatenate([x, np.nextafter(x, np.float32(-np.inf)),
                           np.nextafter(x, np.float32(np.inf))])


# ----------------------------------------------------------------------------- BF16
def _bf16_inputs() -> np.ndarray:
    high = np.arange(1 << 16, dtype=np.uint32) << 16  # every bf16 pattern, as an f32
    lows = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    ties_and_edges = (high[:, None] | lows[None, :]).reshape(-1)  # 0x8000: exact ties
    random = RNG.integers(0, 1 << 32, size=200_000, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([ties_and_edges, random])


def _torch_bf16_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_bf16_encode_matches_torch_on_every_non_nan_input():
    bits = _bf16_inputs()
    x = _f32(bits)
    finite_or_inf = ~np.isnan(x)
    ours = codecs.bf16_encode(x)
    ref = _torch_bf16_bits(x)
    assert np.array_equal(ours[finite_or_inf], ref[finite_or_inf])
    # the cases that round: ties to even (down from even, up from odd), carry into the exponent
    # and the largest finite floats overflowing to infinity, as IEEE round-to-nearest-even does
    cases = {0x3F808000: 0x3F80, 0x3F818000: 0x3F82, 0x3FFF8000: 0x4000, 0x7F7F8000: 0x7F80,
             0x00008000: 0x0000, 0x00018000: 0x0002, 0x80018000: 0x8002, 0x7F7FFFFF: 0x7F80}
    got = codecs.bf16_encode(_f32(list(cases)))
    assert [hex(v) for v in got] == [hex(v) for v in cases.values()]


def test_bf16_encode_keeps_every_nan_a_nan():
    # all NaN classes: signalling (plain rounding would give Inf), all-ones payload (plain
    # rounding would carry to -0 or the other sign's zero), both signs
    payloads = np.array([0x000001, 0x000FFF, 0x007FFF, 0x008000, 0x3FFFFF, 0x400000, 0x7FFFFF],
                        dtype=np.uint32)
    bits = np.concatenate([0x7F800000 | payloads, 0xFF800000 | payloads,
                           0x7F800000 | RNG.integers(1, 1 << 23, 10_000).astype(np.uint32)])
    x = _f32(bits)
    ours = codecs.bf16_encode(x)
    back = codecs.bf16_decode(ours)
    assert np.isnan(back).all()
    assert np.isnan(torch.from_numpy(x).to(torch.bfloat16).float().numpy()).all()  # torch too
    assert np.array_equal(np.signbit(back), np.signbit(x))  # sign kept
    assert np.array_equal(ours, ((bits >> 16) | 0x40).astype(np.uint16))  # top payload, quiet


def test_bf16_decode_matches_torch_for_every_pattern():
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ref = torch.from_numpy(patterns.view(np.int16)).view(torch.bfloat16).float().numpy()
    ours = codecs.bf16_decode(patterns)
    finite = ~np.isnan(ref)
    assert np.array_equal(ours[finite].view(np.uint32), ref[finite].view(np.uint32))
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    # bf16 is the top half of an f32: NaN payloads survive too
    assert np.array_equal(ours.view(np.uint32), patterns.astype(np.uint32) << 16)
    ours_mx = np.array(codecs.bf16_decode_mx(mx.array(patterns)))
    assert np.array_equal(ours_mx.view(np.uint32), ours.view(np.uint32))


# ----------------------------------------------------------------------------- E4M3
def _torch_e4m3(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.asarray(x, np.float32)).to(torch.float8_e4m3fn).view(
        torch.uint8).numpy()


def test_e4m3_decode_matches_torch_for_all_256_codes():
    codes = np.arange(256, dtype=np.uint8)
    ref = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    ours = codecs.e4m3_decode(codes)
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    finite = ~np.isnan(ref)
    assert np.array_equal(ours[finite].view(np.uint32), ref[finite].view(np.uint32))  # ±0 too


def test_e4m3_encode_matches_torch_on_codes_midpoints_and_random_values():
    values = codecs.E4M3_TABLE[codecs.E4M3_FINITE_CODES].astype(np.float64)
    positive = np.unique(values[values >= 0])
    midpoints = (positive[1:] + positive[:-1]) / 2  # exact in float32: at most 5 significant bits
    x = np.concatenate([
        _neighbours(values), _neighbours(midpoints), _neighbours(-midpoints),
        RNG.normal(0, 1, 50_000) * np.exp2(RNG.integers(-14, 10, 50_000)),  # denormals .. > 448
        [0.0, -0.0, 448.0, 464.0, 465.0, 1e6, -1e6, 2.0**-10, -(2.0**-10), 2.0**-10 * 1.01],
    ]).astype(np.float32)
    ours = codecs.e4m3_encode(x)
    ref = _torch_e4m3(x)
    assert np.array_equal(ours, ref), np.flatnonzero(ours != ref)[:10]
    # midpoints are genuine ties and go to the even code
    tie_codes = codecs.e4m3_encode(midpoints.astype(np.float32))
    assert (tie_codes % 2 == 0).all()


def test_e4m3_encode_specials():
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 1e30, -0.0], np.float32)
    ours = codecs.e4m3_encode(x)
    assert np.isnan(codecs.e4m3_decode(ours[:2])).all()
    # saturating at ±448 (0x7E / 0xFE), as torch's cast to float8_e4m3fn does
    assert list(ours[2:]) == [0x7E, 0xFE, 0x7E, 0x80]
    assert list(_torch_e4m3(x[2:5])) == [0x7E, 0xFE, 0x7E]


# ----------------------------------------------------------------------------- E8M0
def test_e8m0_decode_matches_torch_for_all_256_codes():
    codes = np.arange(256, dtype=np.uint8)
    ref = torch.from_numpy(codes).view(torch.float8_e8m0fnu).float().numpy()
    ours = codecs.e8m0_decode(codes)
    assert np.isnan(ours[255]) and np.isnan(ref[255])
    assert np.array_equal(ours[:255].view(np.uint32), ref[:255].view(np.uint32))
    assert np.array_equal(ours[:255], np.exp2(np.arange(255.0) - 127).astype(np.float32))


# ----------------------------------------------------------------------------- E2M1
def _e2m1_brute_force(x: np.ndarray) -> np.ndarray:
    """Nearest E2M1 value by trying every code: the smallest distance, and on a tie the code
    whose mantissa bit (bit 0) is clear; values beyond ±6 take ±6; zero is +0 (code 0)."""
    values = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
    out = np.empty(x.shape, np.uint8)
    for i, v in enumerate(np.asarray(x, np.float64).reshape(-1)):
        v = min(max(v, -6.0), 6.0)
        best = None
        for code in range(16):
            key = (abs(v - values[code]), code & 1, code >= 8 and values[code] == 0)
            if best is None or key < best[0]:
                best = (key, code)
        out.reshape(-1)[i] = best[1]
    return out


def _e2m1_inputs() -> np.ndarray:
    grid = codecs.E2M1_MAGNITUDES.astype(np.float64)
    midpoints = (grid[1:] + grid[:-1]) / 2
    base = np.concatenate([grid, midpoints, [6.5, 7.0, 100.0, 1e-30, 0.1]])
    base = np.concatenate([base, -base])
    return np.concatenate([_neighbours(base), RNG.uniform(-8, 8, 20_000)]).astype(np.float32)


def test_e2m1_encode_matches_the_brute_force_definition():
    x = _e2m1_inputs()
    assert np.array_equal(codecs.e2m1_encode(x), _e2m1_brute_force(x))


def test_e2m1_ties_go_to_the_even_code():
    grid = codecs.E2M1_MAGNITUDES
    midpoints = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)
    codes = codecs.e2m1_encode(midpoints)
    assert (codes % 2 == 0).all()
    # 0.25->0, 0.75->1.0, 1.25->1.0, 1.75->2.0, 2.5->2.0, 3.5->4.0, 5.0->4.0
    assert list(codecs.e2m1_decode(codes)) == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert list(codecs.e2m1_decode(codecs.e2m1_encode(-midpoints))) == [0.0, -1.0, -1.0, -2.0,
                                                                         -2.0, -4.0, -4.0]


def test_e2m1_round_mx_agrees_with_the_encoder():
    x = _e2m1_inputs()
    x = x[np.abs(x) <= 6.0]  # the MLX rounding takes values already scaled into ±6
    got = np.array(codecs.e2m1_round_mx(mx.array(x)))
    ref = codecs.e2m1_decode(_e2m1_brute_force(x))
    assert np.array_equal(got, ref)  # -0 == +0 here: the MLX form gives -0 for negatives
    assert np.array_equal(np.signbit(got[got == 0]), x[got == 0] < 0)


def test_e2m1_decode_table():
    codes = np.arange(16, dtype=np.uint8)
    sign = np.where(codes & 8, -1.0, 1.0)
    exp, man = (codes >> 1) & 3, codes & 1
    # E2M1: exponent bias 1, exponent 0 subnormal (0 or 0.5)
    ref = sign * np.where(exp == 0, man * 0.5, (1 + man / 2) * np.exp2(exp - 1.0))
    assert np.array_equal(codecs.e2m1_decode(codes), ref.astype(np.float32))
    assert np.array_equal(codecs.e2m1_decode(codes | 0xF0), codecs.e2m1_decode(codes))


def test_block_constants_are_single_homed():
    # the block sizes and maxima live in codecs only: other modules import them, none redefines
    import ast
    from pathlib import Path

    names = {"FP8_WEIGHT_BLOCK", "FP8_ACT_BLOCK", "FP8_BLOCK", "MX_GROUP", "E4M3_MAX", "E2M1_MAX"}
    package = Path(codecs.__file__).resolve().parents[1]
    owners = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                owners |= {(t.id, str(path.relative_to(package))) for t in node.targets
                           if isinstance(t, ast.Name) and t.id in names}
    assert owners == {(n, "quant/codecs.py") for n in names - {"FP8_BLOCK"}}

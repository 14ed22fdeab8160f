"""The bit rules of the small number formats, in one place: BF16, E4M3 (FP8), E8M0, E2M1 (FP4).

Every reader, writer, quantizer and the QAT rounding take these from here, so a tie rule or a
NaN rule cannot differ between two copies. numpy has no dtype for any of them, so codes travel
as unsigned integers (BF16 as ``uint16``, the rest as ``uint8``).

Rounding is to nearest with ties to the even code everywhere: the rule of IEEE casts, of
``mx.to_fp8``, and of the FP4 activation rounding in DeepSeek's V4 reference kernels (which
antirez/ds4 also follows). Encoders saturate at the largest finite value.

Block sizes of the scales that go with the codes:

* ``FP8_WEIGHT_BLOCK`` — official dense FP8 weights: one E8M0 scale per 128 × 128 weights;
* ``FP8_ACT_BLOCK`` — the QAT FP8 round trip of KV rows: one scale per 64 values;
* ``MX_GROUP`` — one E8M0 scale per 32 values: official FP4 experts, MLX ``mxfp4``/``mxfp8``,
  GGUF MXFP4, and the QAT FP4 round trip of the indexer.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

FP8_WEIGHT_BLOCK = 128
FP8_ACT_BLOCK = 64
MX_GROUP = 32

E4M3_MAX = 448.0
E2M1_MAX = 6.0


# --------------------------------------------------------------------------- BF16
def bf16_encode(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (``uint16``), round to nearest even. A NaN stays a NaN
    (its top payload bits kept and the quiet bit set: plain rounding could carry it to Inf)."""
    u = np.ascontiguousarray(x, dtype="<f4").view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return np.where(nan, (u >> 16) | 0x40, rounded).astype("<u2")


def bf16_decode(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32; exact (bf16 is the top half of an f32)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def bf16_decode_mx(bits: mx.array) -> mx.array:
    """``bf16_decode`` in MLX: ``uint16`` bit patterns -> float32, NaN payloads included."""
    return mx.view(mx.left_shift(bits.astype(mx.uint32), 16), mx.float32)


# --------------------------------------------------------------------------- E4M3
def _e4m3_table() -> np.ndarray:
    # bit 7 sign, bits 6..3 exponent (bias 7), bits 2..0 mantissa; no infinities; 0x7F/0xFF NaN
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    value = np.where(exp == 0, man * 2.0**-9, (1.0 + man / 8.0) * np.exp2(exp - 7.0))
    value = sign * value
    value[(codes & 0x7F) == 0x7F] = np.nan
    return value.astype(np.float32)


E4M3_TABLE: np.ndarray = _e4m3_table()
E4M3_FINITE_CODES: np.ndarray = np.array([c for c in range(256) if (c & 0x7F) != 0x7F], dtype=np.uint8)
E4M3_NAN = 0x7F


def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    return E4M3_TABLE[np.asarray(codes, dtype=np.uint8)]


def _nearest_even(grid: np.ndarray, mag: np.ndarray) -> np.ndarray:
    """Index of the nearest value of the increasing ``grid`` (consecutive codes 0, 1, ...) to
    each ``mag`` in ``[0, grid[-1]]``; an exact midpoint goes to the even index. Compares with
    the midpoints themselves, which are exact in float32 for these few-bit grids."""
    mid = (grid[1:] + grid[:-1]) / 2
    k = np.searchsorted(mid, mag, side="left")  # a tie lands on the lower index here...
    tie = mag == mid[np.minimum(k, len(mid) - 1)]
    return np.where(tie & (k % 2 == 1), k + 1, k)  # ...and goes to the even one


_E4M3_POSITIVE = E4M3_TABLE[:0x7F]  # codes 0x00..0x7E: 0 … 448, increasing


def e4m3_encode(x: np.ndarray) -> np.ndarray:
    """Nearest E4M3 code of each float32 value: ties to even, saturating at ±448, NaN -> NaN code.
    The sign is kept (−0 and values that round to zero from below give 0x80)."""
    x = np.asarray(x, dtype=np.float32)
    mag = np.minimum(np.abs(x), E4M3_MAX)
    code = _nearest_even(_E4M3_POSITIVE, np.where(np.isnan(mag), 0, mag)).astype(np.uint8)
    code = np.where(np.isnan(x), np.uint8(E4M3_NAN), code)
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


# --------------------------------------------------------------------------- E8M0
def e8m0_decode(scale: np.ndarray) -> np.ndarray:
    """UE8M0 byte b -> 2^(b − 127) as float32, built bit by bit (b = 0 is the subnormal
    2^-127, b = 255 is NaN as in OCP MX; GGUF MXFP4 reads 255 as 2^127, see gguf/mxfp4.py)."""
    b = np.asarray(scale, dtype=np.uint8).astype(np.uint32)
    bits = np.where(b == 0, np.uint32(0x00400000), b << np.uint32(23))
    bits = np.where(b == 255, np.uint32(0x7FC00000), bits)
    return bits.astype(np.uint32).view(np.float32)


# --------------------------------------------------------------------------- E2M1
E2M1_MAGNITUDES: np.ndarray = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
# E2M1 code -> value: bit 3 sign, bits 2..0 the magnitude index; code 8 is −0
E2M1_TABLE: np.ndarray = np.concatenate([E2M1_MAGNITUDES, -E2M1_MAGNITUDES])


def e2m1_decode(codes: np.ndarray) -> np.ndarray:
    return E2M1_TABLE[np.asarray(codes, dtype=np.uint8) & 0xF]


def e2m1_encode(x: np.ndarray) -> np.ndarray:
    """Nearest E2M1 code (0..15) of each float32 value: ties to even, saturating at ±6. Values
    that round to zero take code 0 (+0) whatever their sign, as ggml and DeepSeek's packers do;
    NaN has no code and saturates."""
    x = np.asarray(x, dtype=np.float32)
    mag = np.minimum(np.abs(x), np.float32(E2M1_MAX))
    # k = 7 − (number of midpoints the magnitude stays below): one comparison per midpoint, ``<``
    # where a tie rounds up, ``<=`` where it rounds down (NaN compares false everywhere: 7)
    below = np.empty(mag.shape, dtype=bool)
    k = np.full(mag.shape, 7, dtype=np.uint8)
    for mid, tie_up in _E2M1_MIDPOINTS:
        (np.less if tie_up else np.less_equal)(mag, np.float32(mid), out=below)
        np.subtract(k, below, out=k, casting="unsafe")
    neg = np.less(x, 0, out=below)
    neg &= k > 0
    k |= neg.view(np.uint8) << 3
    return k


# The midpoints between E2M1 magnitudes, each with whether a tie there rounds up (to the even
# code): up at 0.75, 1.75 and 3.5, down at 0.25, 1.25, 2.5 and 5.
_E2M1_MIDPOINTS = tuple(
    (float(m), (i + 1) % 2 == 0)
    for i, m in enumerate((E2M1_MAGNITUDES[1:] + E2M1_MAGNITUDES[:-1]) / 2)
)
_E2M1_VALUES_MX = tuple(float(v) for v in E2M1_MAGNITUDES)


@mx.compile
def e2m1_round_mx(x: mx.array) -> mx.array:
    """``e2m1_decode(e2m1_encode(x))`` in MLX for float32 values already scaled into ±6, except
    that a negative value rounding to zero gives −0."""
    mag = mx.abs(x)
    code = mx.zeros(x.shape, dtype=mx.int32)
    for mid, up_on_tie in _E2M1_MIDPOINTS:
        code = code + ((mag >= mid) if up_on_tie else (mag > mid)).astype(mx.int32)
    values = mx.array(_E2M1_VALUES_MX, dtype=mx.float32)[code]
    return mx.where(x < 0, -values, values)

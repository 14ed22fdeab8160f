/* numpy's elementary operations in C, bit for bit: fp16 conversions (round to nearest even,
 * subnormals, overflow to infinity, NaN payloads as npy_floatbits_to_halfbits), rint and floor
 * without libm, and the pairwise sum of its float reductions. */
#ifndef DS4MLX_NPYOPS_H
#define DS4MLX_NPYOPS_H
#include <stdint.h>
#include <string.h>

/* rint (ties to even) of a float: adding 2^23 to a magnitude below it rounds the fraction */
static inline float rint_f(float v) {
    uint32_t bits;
    memcpy(&bits, &v, 4);
    const uint32_t sign = bits & 0x80000000u;
    bits &= 0x7fffffffu;
    float a;
    memcpy(&a, &bits, 4);
    if (!(a < 0x1p23f)) return v; /* already an integer, or NaN */
    a = (a + 0x1p23f) - 0x1p23f;
    memcpy(&bits, &a, 4);
    bits |= sign;
    memcpy(&a, &bits, 4);
    return a;
}

static inline float floor_f(float v) {
    const float t = rint_f(v);
    return t > v ? t - 1.0f : t;
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {
        if (ax == 0x7f800000u) return sign | 0x7c00u;
        uint16_t r = (uint16_t)(0x7c00u + ((ax & 0x7fffffu) >> 13));
        return sign | (r == 0x7c00u ? 0x7c01u : r);
    }
    if (ax >= 0x477ff000u) return sign | 0x7c00u; /* 65520 and up round to infinity */
    if (ax < 0x38800000u) { /* below 2^-14: a subnormal half, a·2^24 rounded to an integer */
        float a;
        memcpy(&a, &ax, 4);
        a *= 0x1p24f; /* exact */
        return sign | (uint16_t)(int)((a + 0x1p23f) - 0x1p23f);
    }
    const uint32_t b = ax - 0x38000000u; /* exponent bias 127 -> 15 */
    return sign | (uint16_t)((b + 0xfffu + ((b >> 13) & 1u)) >> 13);
}

static inline uint16_t f64_to_f16(double v) { /* directly, not through float (as numpy) */
    uint64_t x;
    memcpy(&x, &v, 8);
    const uint16_t sign = (uint16_t)((x >> 48) & 0x8000u);
    const uint64_t ax = x & 0x7fffffffffffffffull;
    if (ax >= 0x7ff0000000000000ull) {
        if (ax == 0x7ff0000000000000ull) return sign | 0x7c00u;
        uint16_t r = (uint16_t)(0x7c00u + ((ax & 0xfffffffffffffull) >> 42));
        return sign | (r == 0x7c00u ? 0x7c01u : r);
    }
    if (ax >= 0x40effe0000000000ull) return sign | 0x7c00u; /* 65520 */
    if (ax < 0x3f10000000000000ull) { /* below 2^-14 */
        double a;
        memcpy(&a, &ax, 8);
        a *= 0x1p24;
        return sign | (uint16_t)(int)((a + 0x1p52) - 0x1p52);
    }
    const uint64_t b = ax - 0x3f00000000000000ull; /* exponent bias 1023 -> 15 */
    return sign | (uint16_t)((b + 0x1ffffffffffull + ((b >> 42) & 1u)) >> 42);
}

static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 0x3ffu;
    uint32_t bits;
    if (e == 0) {
        float a = (float)m * 0x1p-24f;
        memcpy(&bits, &a, 4);
    } else if (e == 31) {
        bits = 0x7f800000u | (m << 13);
    } else {
        bits = ((e + 112u) << 23) | (m << 13);
    }
    bits |= sign;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
/* numpy's pairwise float32 sum of n <= 128 values (8 accumulators, then a tree; under 8 one
 * after the other), which a reduction adds to its start value +0 (so a sum of -0s is +0) */
static inline float pairwise_f32(const float *a, int n) {
    if (n < 8) {
        float res = 0.0f;
        for (int i = 0; i < n; i++) res += a[i];
        return 0.0f + res;
    }
    float r[8];
    for (int j = 0; j < 8; j++) r[j] = a[j];
    int i = 8;
    for (; i < n - n % 8; i += 8)
        for (int j = 0; j < 8; j++) r[j] += a[i + j];
    float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; i++) res += a[i];
    return 0.0f + res;
}
#endif

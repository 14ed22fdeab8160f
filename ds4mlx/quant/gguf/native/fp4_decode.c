/* quant.mx.dequant_fp4_np: official FP4 experts (byte i of a group = elements 2i, 2i+1 in its
 * low, high nibble; one E8M0 scale per 32) -> float32 values, each the same float32 product
 * table value × scale as numpy's (the tables come from numpy: pairs[b] = the two values of
 * byte b, scale[e] = the E8M0 value of byte e). With AVX2 a group's 32 values take 4 table
 * permutes and 4 products (the scalar loop's 32 look-ups per group were 5 % of a ds4-q4
 * conversion's CPU); the same products, so the same bits (NaN payloads included: the scale is
 * the second operand, as in numpy).
 * quant.mx.dequant_fp8_np: official FP8 weights (E4M3 codes, one E8M0 scale per 128×128
 * block) -> float32 table value × scale, in one pass (numpy's table look-up, then a product
 * in place, were two over fresh memory). */
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && !defined(DS4MLX_PORTABLE)
#include <immintrin.h>
#define FP4_VECTOR 1
#endif

static void fp4_groups(const uint8_t *codes, const uint8_t *scales, int64_t g0, int64_t g1, const float *pairs,
                       const float *scale, float *out) {
    for (int64_t g = g0; g < g1; g++) {
        const float s = scale[scales[g]];
        const uint8_t *c = codes + 16 * g;
        float *o = out + 32 * g;
        for (int i = 0; i < 16; i++) {
            o[2 * i] = pairs[2 * c[i]] * s;
            o[2 * i + 1] = pairs[2 * c[i] + 1] * s;
        }
    }
}

#ifdef FP4_VECTOR
/* 8 nibble indices (bytes) -> their 8 table values × s: entries 0-7 from lo, 8-15 from hi */
static inline __m256 fp4_eight(__m128i idx8, __m256 lo, __m256 hi, __m256 s) {
    const __m256i idx = _mm256_cvtepu8_epi32(idx8);
    const __m256 neg = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)); /* bit 3 -> the sign bit */
    const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), neg);
    return _mm256_mul_ps(v, s);
}
#endif

void fp4_decode(const uint8_t *codes, const uint8_t *scales, int64_t n_groups, const float *pairs,
                const float *scale, float *out) {
    int64_t g = 0;
#ifdef FP4_VECTOR
    float table[16]; /* code -> value: the low value of bytes 0..15 */
    for (int k = 0; k < 16; k++) table[k] = pairs[2 * k];
    const __m256 lo = _mm256_loadu_ps(table), hi = _mm256_loadu_ps(table + 8);
    const __m128i nib = _mm_set1_epi8(0x0f);
    for (; g < n_groups; g++) {
        const __m256 s = _mm256_set1_ps(scale[scales[g]]);
        const __m128i c = _mm_loadu_si128((const __m128i *)(codes + 16 * g));
        const __m128i l = _mm_and_si128(c, nib), h = _mm_and_si128(_mm_srli_epi16(c, 4), nib);
        const __m128i a = _mm_unpacklo_epi8(l, h), b = _mm_unpackhi_epi8(l, h); /* element order */
        float *o = out + 32 * g;
        _mm256_storeu_ps(o, fp4_eight(a, lo, hi, s));
        _mm256_storeu_ps(o + 8, fp4_eight(_mm_unpackhi_epi64(a, a), lo, hi, s));
        _mm256_storeu_ps(o + 16, fp4_eight(b, lo, hi, s));
        _mm256_storeu_ps(o + 24, fp4_eight(_mm_unpackhi_epi64(b, b), lo, hi, s));
    }
#endif
    fp4_groups(codes, scales, g, n_groups, pairs, scale, out);
}

/* codes [rows, cols] E4M3, scales [ceil(rows/block), ceil(cols/block)] E8M0 bytes; table[c] the
 * E4M3 value of code c, scale[e] the E8M0 value of byte e (both numpy's). */
void fp8_decode(const uint8_t *codes, const uint8_t *scales, int64_t rows, int64_t cols, int64_t block,
                const float *table, const float *scale, float *out) {
    const int64_t scale_cols = (cols + block - 1) / block;
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *c = codes + r * cols, *sr = scales + (r / block) * scale_cols;
        float *o = out + r * cols;
        for (int64_t b = 0; b < scale_cols; b++) {
            const float s = scale[sr[b]];
            const int64_t end = (b + 1) * block < cols ? (b + 1) * block : cols;
            for (int64_t j = b * block; j < end; j++) o[j] = table[c[j]] * s;
        }
    }
}

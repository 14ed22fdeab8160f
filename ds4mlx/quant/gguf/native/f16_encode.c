/* GGUF F16 tensors: float32 -> IEEE half bits, numpy's astype(float16) bit for bit (round to
 * nearest even, subnormals, overflow to infinity). With F16C, 8 (AVX-512: 16) values per
 * instruction in that rounding; a vector holding a NaN is redone by npyops' scalar
 * conversion, which keeps numpy's NaN payloads (the instruction quiets signalling NaNs).
 * Elsewhere (or DS4MLX_PORTABLE) the scalar conversion for every value. */
#include <stdint.h>
#include <string.h>

#include "npyops.h"

#if defined(__F16C__) && defined(__AVX2__) && !defined(DS4MLX_PORTABLE)
#include <immintrin.h>
#define F16_VECTOR 1
#endif

static void f16_scalar(const float *x, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = f32_to_f16(x[i]);
}

void f16_encode(const float *x, int64_t n, uint16_t *out) {
    int64_t i = 0;
#ifdef F16_VECTOR
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256i a = _mm256_and_si256(_mm256_castps_si256(v), abs_mask);
        if (_mm256_movemask_epi8(_mm256_cmpgt_epi32(a, inf))) { /* a NaN: numpy's payload */
            f16_scalar(x + i, 8, out + i);
            continue;
        }
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#endif
    f16_scalar(x + i, n - i, out + i);
}

/* BF16 bits -> the same half bits as f16_encode of their float32 values (BF16 is the top half
 * of a float32, so the float is exact): no float32 array between the two (the converter's
 * BF16 -> F16 tensors spent more time zeroing that array's fresh pages than converting). */
static void bf16_scalar(const uint16_t *x, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) {
        const uint32_t u = (uint32_t)x[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        out[i] = f32_to_f16(f);
    }
}

void f16_encode_bf16(const uint16_t *x, int64_t n, uint16_t *out) {
    int64_t i = 0;
#ifdef F16_VECTOR
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    for (; i + 8 <= n; i += 8) {
        const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x + i))), 16);
        if (_mm256_movemask_epi8(_mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf))) { /* a NaN */
            bf16_scalar(x + i, 8, out + i);
            continue;
        }
        _mm_storeu_si128((__m128i *)(out + i),
                         _mm256_cvtps_ph(_mm256_castsi256_ps(u), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#endif
    bf16_scalar(x + i, n - i, out + i);
}

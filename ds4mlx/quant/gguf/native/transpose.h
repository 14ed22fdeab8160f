/* Rows to lanes for the kernels that run one row per lane of 16-float vectors. */
#ifndef DS4MLX_TRANSPOSE_H
#define DS4MLX_TRANSPOSE_H
#include <string.h>
#if defined(__AVX512F__) && !defined(DS4MLX_PORTABLE)
#include <immintrin.h>
#endif

/* rows r = 0..15 of n floats (n a multiple of 16) at src + n·r -> out[16·k + r] = src[n·r + k]
 * (AVX-512: 16 x 16 transposes by unpacking pairs of rows, then pairs of pairs, then 128-bit
 * quarters) */
static void rows_to_lanes16(const float *src, int n, float *out) {
#if defined(__AVX512F__) && !defined(DS4MLX_PORTABLE)
    for (int k0 = 0; k0 < n; k0 += 16) {
        __m512 r[16], t[16];
        for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + n * i + k0);
        for (int i = 0; i < 16; i += 2) { /* per quarter L: rows i, i+1 at elements 4L, 4L+1 / 4L+2, 4L+3 */
            t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
        }
        for (int i = 0; i < 16; i += 4) { /* r[i + e]: per quarter L, rows i..i+3 at element 4L + e */
            r[i] = (__m512)_mm512_unpacklo_pd((__m512d)t[i], (__m512d)t[i + 2]);
            r[i + 1] = (__m512)_mm512_unpackhi_pd((__m512d)t[i], (__m512d)t[i + 2]);
            r[i + 2] = (__m512)_mm512_unpacklo_pd((__m512d)t[i + 1], (__m512d)t[i + 3]);
            r[i + 3] = (__m512)_mm512_unpackhi_pd((__m512d)t[i + 1], (__m512d)t[i + 3]);
        }
        for (int e = 0; e < 4; e++) { /* quarters (rows 4g.., element 4L + e) to (element, rows) */
            const __m512 u0 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0x44), u1 = _mm512_shuffle_f32x4(r[e], r[4 + e], 0xEE);
            const __m512 u2 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0x44), u3 = _mm512_shuffle_f32x4(r[8 + e], r[12 + e], 0xEE);
            _mm512_storeu_ps(out + 16 * (k0 + e), _mm512_shuffle_f32x4(u0, u2, 0x88));
            _mm512_storeu_ps(out + 16 * (k0 + 4 + e), _mm512_shuffle_f32x4(u0, u2, 0xDD));
            _mm512_storeu_ps(out + 16 * (k0 + 8 + e), _mm512_shuffle_f32x4(u1, u3, 0x88));
            _mm512_storeu_ps(out + 16 * (k0 + 12 + e), _mm512_shuffle_f32x4(u1, u3, 0xDD));
        }
    }
#else
    for (int r = 0; r < 16; r++)
        for (int k = 0; k < n; k++) out[16 * k + r] = src[n * r + k];
#endif
}
#endif

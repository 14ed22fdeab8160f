/* Rows to lanes for the kernels that run one row per lane of 16-float vectors, and the
 * in-register transposes it is made of (16 x 16 floats; 8 x 8 pairs, as float64 or two floats). */
#ifndef DS4MLX_TRANSPOSE_H
#define DS4MLX_TRANSPOSE_H
#include <string.h>
#if defined(__AVX512F__) && !defined(DS4MLX_PORTABLE)
#include <immintrin.h>

/* the last two steps of both transposes: t[2p + e] (e = 0, 1) holds in its 128-bit quarter L the
 * piece of row block p (p = 0..3) for column 2L + e; out[2L + e] gets column 2L + e, row blocks
 * in order */
static inline void transpose_quarters(const __m512 t[8], __m512 out[8]) {
    for (int e = 0; e < 2; e++) {
        const __m512 u0 = _mm512_shuffle_f32x4(t[e], t[2 + e], 0x44);
        const __m512 u1 = _mm512_shuffle_f32x4(t[e], t[2 + e], 0xEE);
        const __m512 u2 = _mm512_shuffle_f32x4(t[4 + e], t[6 + e], 0x44);
        const __m512 u3 = _mm512_shuffle_f32x4(t[4 + e], t[6 + e], 0xEE);
        out[e] = _mm512_shuffle_f32x4(u0, u2, 0x88);
        out[2 + e] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
        out[4 + e] = _mm512_shuffle_f32x4(u1, u3, 0x88);
        out[6 + e] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
    }
}

/* m[i][k] -> m[k][i] for 16 vectors of 16 floats (unpacking pairs of rows, then pairs of pairs,
 * then 128-bit quarters) */
static inline void transpose16(__m512 m[16]) {
    __m512 t[16], r[16];
    for (int i = 0; i < 16; i += 2) { /* per quarter L: rows i, i+1 at elements 4L, 4L+1 / 4L+2, 4L+3 */
        t[i] = _mm512_unpacklo_ps(m[i], m[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(m[i], m[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* r[i + e]: per quarter L, rows i..i+3 at element 4L + e */
        r[i] = (__m512)_mm512_unpacklo_pd((__m512d)t[i], (__m512d)t[i + 2]);
        r[i + 1] = (__m512)_mm512_unpackhi_pd((__m512d)t[i], (__m512d)t[i + 2]);
        r[i + 2] = (__m512)_mm512_unpacklo_pd((__m512d)t[i + 1], (__m512d)t[i + 3]);
        r[i + 3] = (__m512)_mm512_unpackhi_pd((__m512d)t[i + 1], (__m512d)t[i + 3]);
    }
    /* (r[e], r[4 + e], r[8 + e], r[12 + e]: rows 4g.. at element 4L + e) */
    const __m512 a[8] = {r[0], r[1], r[4], r[5], r[8], r[9], r[12], r[13]};
    const __m512 b[8] = {r[2], r[3], r[6], r[7], r[10], r[11], r[14], r[15]};
    __m512 oa[8], ob[8];
    transpose_quarters(a, oa); /* oa[2L + e]: element 4L + e */
    transpose_quarters(b, ob); /* ob[2L + e]: element 4L + 2 + e */
    for (int L = 0; L < 4; L++) {
        m[4 * L] = oa[2 * L], m[4 * L + 1] = oa[2 * L + 1];
        m[4 * L + 2] = ob[2 * L], m[4 * L + 3] = ob[2 * L + 1];
    }
}

/* m[i][k] -> m[k][i] for 8 vectors of 8 pairs of floats (pair k of vector i to pair i of
 * vector k) */
static inline void transpose8_pairs(__m512 m[8]) {
    __m512 t[8];
    for (int i = 0; i < 8; i += 2) { /* per quarter L: rows i, i+1 at pair 2L / 2L+1 */
        t[i] = (__m512)_mm512_unpacklo_pd((__m512d)m[i], (__m512d)m[i + 1]);
        t[i + 1] = (__m512)_mm512_unpackhi_pd((__m512d)m[i], (__m512d)m[i + 1]);
    }
    __m512 o[8];
    transpose_quarters(t, o);
    for (int k = 0; k < 8; k++) m[k] = o[k];
}
#endif

/* rows r = 0..15 of n floats (n a multiple of 16) at src + n·r -> out[16·k + r] = src[n·r + k] */
static void rows_to_lanes16(const float *src, int n, float *out) {
#if defined(__AVX512F__) && !defined(DS4MLX_PORTABLE)
    for (int k0 = 0; k0 < n; k0 += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + n * i + k0);
        transpose16(r);
        for (int k = 0; k < 16; k++) _mm512_storeu_ps(out + 16 * (k0 + k), r[k]);
    }
#else
    for (int r = 0; r < 16; r++)
        for (int k = 0; k < n; k++) out[16 * k + r] = src[n * r + k];
#endif
}
#endif

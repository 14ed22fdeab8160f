/* IQ2_XXS: a block's error weights, parity-corrected signs, targets y and group scales, 8
 * elements a vector, numpy's operations in its order (iq2_xxs.numpy_chunk); both kernels
 * (iq2_search.c, iq2_search8.h) share it. */
#ifndef DS4MLX_IQ2_PREPARE_H
#define DS4MLX_IQ2_PREPARE_H
#include <stdint.h>
#include <string.h>

#include "search_common.h"
#if defined(__AVX__) && !defined(DS4MLX_PORTABLE)
#include <immintrin.h>
#endif

typedef float p8 __attribute__((vector_size(32)));
typedef int32_t p8i __attribute__((vector_size(32)));

/* pairwise_f32 of the m·8 values v[0..m) (m = 4 or 16), 8 at a time (its 8 accumulators) */
static inline float sum_sq8(const p8 *v, int m) {
    p8 r = v[0];
    for (int i = 1; i < m; i++) r += v[i];
    return 0.0f + (((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])));
}

/* each grid entry's 8 levels as 2-bit codes (0, 1, 2: which of levels[0..2] it is), element j
 * at bits 2j */
static void iq2_entry_codes(const float *grid, const float *levels, int32_t codes[256]) {
    for (int e = 0; e < 256; e++) {
        codes[e] = 0;
        for (int j = 0; j < 8; j++)
            codes[e] |= ((grid[8 * e + j] == levels[1]) + 2 * (grid[8 * e + j] == levels[2])) << (2 * j);
    }
}

/* error weights, signs (parity-corrected), targets y and the group scales s0 of one block */
static void iq2_prepare(const float *x, const float *qw, float *w, float *y, uint32_t *mask, float *s0) {
    const p8i bit = {1, 2, 4, 8, 16, 32, 64, 128}, sign = (p8i){0} + INT32_MIN;
    p8 xv8[32], sq8[32];
    memcpy(xv8, x, sizeof xv8);
    for (int k = 0; k < 32; k++) sq8[k] = xv8[k] * xv8[k];
    if (qw != NULL) { /* common.importance_weights, σ² factor 2 */
        const float sigma2 = 2.0f * ((0.0f + (sum_sq8(sq8, 16) + sum_sq8(sq8 + 16, 16))) / 256.0f);
        for (int k = 0; k < 32; k++) {
            p8 q, v = sigma2 + sq8[k];
#if defined(__AVX__) && !defined(DS4MLX_PORTABLE)
            v = (p8)_mm256_sqrt_ps((__m256)v);
#else
            for (int i = 0; i < 8; i++) v[i] = __builtin_sqrtf(v[i]);
#endif
            memcpy(&q, qw + 8 * k, sizeof q);
            const p8 wv = q * v;
            memcpy(w + 8 * k, &wv, sizeof wv);
        }
    } else {
        for (int g = 0; g < 8; g++) {
            const float root = __builtin_sqrtf(sum_sq8(sq8 + 4 * g, 4) / 32.0f);
            for (int k = 0; k < 4; k++) {
                const p8 wv = root + (p8)((p8i)xv8[4 * g + k] & ~sign);
                memcpy(w + 32 * g + 8 * k, &wv, sizeof wv);
            }
        }
    }
    for (int r = 0; r < 32; r++) { /* one run's 8 elements a vector */
        const float *xr = x + 8 * r, *wr = w + 8 * r;
        p8 xv, wv;
        memcpy(&xv, xr, sizeof xv);
        memcpy(&wv, wr, sizeof wv);
        const p8i negv = xv < 0.0f;
        const p8 cv8 = (wv * xv) * xv;
        float c[8];
        memcpy(c, &cv8, sizeof c);
        p8i nb = negv & bit;
        const uint32_t neg = (uint32_t)(((nb[0] | nb[1]) | (nb[2] | nb[3])) | ((nb[4] | nb[5]) | (nb[6] | nb[7])));
        const int odd = __builtin_popcount(neg) & 1;
        const int cheapest = argmin8(c); /* (for every run, branch-free: whether a run is odd is data) */
        const uint32_t flip = (uint32_t)-odd & (1u << cheapest);
        mask[r] = neg ^ flip;
        /* |x|, negated at the flipped element */
        const p8 yv = (p8)(((p8i)xv & ~sign) | (((bit & ((p8i){0} + (int32_t)flip)) != 0) & sign));
        memcpy(y + 8 * r, &yv, sizeof yv);
    }
    for (int g = 0; g < 8; g++) s0[g] = max_nan(y + 32 * g, 32) / 43.0f;
}
#endif

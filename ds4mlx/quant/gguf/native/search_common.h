/* Helpers that the 16-lane kernels (iq2_search.c, kquant_search.c) and the 8-row kernels
 * they fall back to without AVX-512 (iq2_search8.h, kquant_search8.h) share: numpy's argmin,
 * max, float64 pairwise sum, clip and rounding, step by step in its order; the q4_k / q2_k block
 * packing; the inner part of the IQ2_XXS grid search. Each build compiles one kernel of each
 * pair (the other is behind #if !defined(__AVX512F__)), so these are defined once. */
#ifndef DS4MLX_SEARCH_COMMON_H
#define DS4MLX_SEARCH_COMMON_H
#include <stdint.h>
#include <string.h>

#include "npyops.h"
#if defined(__AVX__) && !defined(DS4MLX_PORTABLE)
#include <immintrin.h>
#endif

static inline int argmin_first(const float *c, int n, int stride) { /* np.argmin (NaN first) */
    int best = 0;
    float bc = c[0];
    for (int f = 1; f < n; f++) { /* branch-free: which one wins is data */
        const float v = c[f * stride];
        const int take = (bc == bc) & ((v < bc) | (v != v));
        best = take ? f : best;
        bc = take ? v : bc;
    }
    return best;
}

/* argmin_first of 8 values (IQ2_XXS: a run's element to flip) */
static inline int argmin8(const float c[8]) {
#if defined(__AVX__) && !defined(DS4MLX_PORTABLE)
    /* without NaN the first least value is the first lane equal to the minimum */
    const __m256 cv = _mm256_loadu_ps(c);
    if (_mm256_movemask_ps(_mm256_cmp_ps(cv, cv, _CMP_UNORD_Q)) == 0) {
        __m128 m = _mm_min_ps(_mm256_castps256_ps128(cv), _mm256_extractf128_ps(cv, 1));
        m = _mm_min_ps(m, _mm_movehl_ps(m, m));
        m = _mm_min_ss(m, _mm_movehdup_ps(m));
        const __m256 mv = _mm256_broadcastss_ps(m);
        return __builtin_ctz(_mm256_movemask_ps(_mm256_cmp_ps(cv, mv, _CMP_EQ_OQ)));
    }
#endif
    return argmin_first(c, 8, 1);
}

static inline float max_nan(const float *a, int n) { /* np.max: NaN propagates */
    if (n == 8 || n == 16 || n == 32) { /* a maximum taken 8 lanes at a time is the same value
                                           unless the order can matter: a NaN (the first one's
                                           payload) or a maximum of ±0 (the first zero's sign);
                                           those take the loop below */
        typedef float m8 __attribute__((vector_size(32)));
        typedef int32_t m8i __attribute__((vector_size(32)));
        m8 v[4];
        memcpy(v, a, sizeof(m8) * (n / 8));
        m8i nan = v[0] != v[0];
        m8 mm = v[0];
        for (int i = 1; i < n / 8; i++) {
            const m8i gt = mm > v[i];
            nan |= v[i] != v[i];
            mm = (m8)(((m8i)mm & gt) | ((m8i)v[i] & ~gt));
        }
        float m = mm[0];
        int any_nan = nan[0];
        for (int i = 1; i < 8; i++) m = m >= mm[i] ? m : mm[i], any_nan |= nan[i];
        if (!any_nan && m != 0.0f) return m;
    }
    float m = a[0];
    for (int i = 1; i < n; i++) m = (m != m || m >= a[i]) ? m : a[i];
    return m;
}

/* numpy's pairwise float64 sum of 8 <= n <= 128 values (see pairwise_f32) */
static inline double pairwise_d(const double *a, int n) {
    double r[8];
    for (int j = 0; j < 8; j++) r[j] = a[j];
    int i = 8;
    for (; i < n - n % 8; i += 8)
        for (int j = 0; j < 8; j++) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; i++) res += a[i];
    return 0.0 + res;
}

/* np.clip(v, 0, top): -0 and NaN pass through */
static inline float clip_f(float v, float top) { return v < 0 ? 0.0f : (v > top ? top : v); }
static inline double clip_d(double v, double top) { return v < 0 ? 0.0 : (v > top ? top : v); }

/* round_half_away: sign(v)·floor(|v| + 0.5) */
static inline float round_half_away(float v) {
    const float sign = v > 0 ? 1.0f : (v < 0 ? -1.0f : (v == 0 ? 0.0f : v));
    return sign * floor_f(__builtin_fabsf(v) + 0.5f);
}

/* common.refit_super_scales for one block, from the per sub-block sums Σ w q, Σ w q², Σ w q x,
 * Σ w, Σ w x of its codes and Σ w x²: the new (d, dmin) where they lower the error */
static inline void refit_super_scales(const float *ls, const float *lm, int subs, const double *s_q,
                                      const double *s_qq, const double *s_qx, const double *s_w,
                                      const double *s_x, double s_xx, float *d, float *dmin) {
    double t[5][16];
    for (int j = 0; j < subs; j++) {
        const double a = ls[j], c = lm[j];
        t[0][j] = a * a * s_qq[j];
        t[1][j] = c * c * s_w[j];
        t[2][j] = a * c * s_q[j];
        t[3][j] = a * s_qx[j];
        t[4][j] = c * s_x[j];
    }
    const double saa = pairwise_d(t[0], subs), scc = pairwise_d(t[1], subs), sac = pairwise_d(t[2], subs);
    const double sax = pairwise_d(t[3], subs), scx = pairwise_d(t[4], subs);
    const double det = saa * scc - sac * sac;
    const double p = saa * scc, floor_ = (p != p || p >= 1e-30) ? p : 1e-30; /* np.maximum */
    const int ok = det > 1e-30 * floor_;
    const double safe = ok ? det : 1.0;
    double nd = (sax * scc - scx * sac) / safe, ne = (sax * sac - scx * saa) / safe;
    const int only_d = !ok && saa > 0;
    if (only_d) {
        nd = sax / saa;
        ne = *dmin;
    }
    const float ndf = f16_to_f32(f64_to_f16(clip_d(nd, 65504.0)));
    const float nef = f16_to_f32(f64_to_f16(clip_d(ne, 65504.0)));
#define ERR(dd, ee) ((dd) * (dd) * saa + (ee) * (ee) * scc + s_xx - 2 * (dd) * (ee) * sac - 2 * (dd) * sax + 2 * (ee) * scx)
    const double dn = ndf, en = nef, d0 = *d, e0 = *dmin;
    const int better = (ok | only_d) & (ERR(dn, en) < ERR(d0, e0)); /* (branch-free: data) */
    *d = better ? ndf : *d;
    *dmin = better ? nef : *dmin;
#undef ERR
}

/* the fields of one q4_k (kind 4: 144 bytes) or q2_k (84 bytes) super-block but its codes, from
 * its sub-block scales ls and mins lm (integers as floats) and its fp16 super-scales hd, hm */
static inline void kquant_pack_scales(int kind, const float *ls, const float *lm, uint16_t hd, uint16_t hm,
                                      uint8_t *o) {
    if (kind == 4) {
        uint8_t sc[8], mn[8];
        for (int j = 0; j < 8; j++) sc[j] = (uint8_t)(int)ls[j], mn[j] = (uint8_t)(int)lm[j];
        o[0] = hd & 255, o[1] = hd >> 8, o[2] = hm & 255, o[3] = hm >> 8;
        for (int j = 0; j < 4; j++) {
            o[4 + j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
            o[8 + j] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6);
            o[12 + j] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4);
        }
    } else {
        for (int j = 0; j < 16; j++) o[j] = (uint8_t)(int)ls[j] | ((uint8_t)(int)lm[j] << 4);
        o[80] = hd & 255, o[81] = hd >> 8, o[82] = hm & 255, o[83] = hm >> 8;
    }
}

/* and its codes q[256] (bytes 16..: the kernels' pack_codes8, pack_codes16): q4_k
 * o[16 + 32c + l] = q[64c + l] | q[64c + 32 + l] << 4 (c < 4, l < 32); q2_k
 * o[16 + 32h + l] = q[128h + l] | q[128h + 32 + l] << 2 | q[128h + 64 + l] << 4 | q[128h + 96 + l] << 6
 * (h < 2) */

#if defined(__x86_64__) && defined(__GNUC__)
/* the vector width (in floats) of the IQ2_XXS search this CPU runs for n_rows runs: with AVX-512
 * 64 runs a pass once there are enough to fill them (a lane's result does not depend on the width) */
static inline int iq2_search_width(int64_t n_rows) {
    static int avx2 = -1, avx512 = -1;
    if (avx2 < 0) avx2 = __builtin_cpu_supports("avx2"), avx512 = __builtin_cpu_supports("avx512f");
    return avx512 && n_rows > 32 ? 16 : avx2 ? 8 : 4;
}
#endif

/* IQ2_XXS: the part of the grid search that both kernels' DEFINE_SEARCH share, for U vectors
 * of W lanes (vf##SUFFIX, vi##SUFFIX) */
#define DEFINE_GRID_ENTRY(SUFFIX, W, U, ATTR)                                                  \
    typedef float vf##SUFFIX __attribute__((vector_size(4 * W)));                              \
    typedef int32_t vi##SUFFIX __attribute__((vector_size(4 * W)));                            \
    /* h[p] = ((t0[l0] + t1[l1]) + t2[l2]) + t3[l3] for the 81 level patterns                  \
     * p = l0 + 3 l1 + 9 l2 + 27 l3 of elements j0..j0+3, the partial sums of the first two and\
     * three elements shared (the same additions in the same order: 117 instead of 243) */     \
    ATTR static void half_sums##SUFFIX(const vf##SUFFIX t[8][3][U], int j0, vf##SUFFIX h[81][U]) {\
        vf##SUFFIX h2[9][U], h3[27][U];                                                        \
        for (int p = 0; p < 9; p++)                                                            \
            for (int u = 0; u < U; u++) h2[p][u] = t[j0][p % 3][u] + t[j0 + 1][p / 3][u];      \
        for (int p = 0; p < 27; p++)                                                           \
            for (int u = 0; u < U; u++) h3[p][u] = h2[p % 9][u] + t[j0 + 2][p / 9][u];         \
        for (int p = 0; p < 81; p++)                                                           \
            for (int u = 0; u < U; u++) h[p][u] = h3[p % 27][u] + t[j0 + 3][p / 27][u];        \
    }                                                                                          \
    /* the least-cost entry of each lane (the first of equal costs), from its terms            \
     * t[j][l] = a[j]·levels[l] + b[j]·levels[l]² */                                           \
    ATTR static inline void best_entry##SUFFIX(const vf##SUFFIX t[8][3][U], const int32_t *lo, \
                                               const int32_t *hi, vi##SUFFIX idx[U]) {         \
        typedef vf##SUFFIX vf;                                                                 \
        typedef vi##SUFFIX vi;                                                                 \
        vf h_lo[81][U], h_hi[81][U], best[U];                                                  \
        half_sums##SUFFIX(t, 0, h_lo);                                                         \
        half_sums##SUFFIX(t, 4, h_hi);                                                         \
        for (int u = 0; u < U; u++) {                                                          \
            best[u] = h_lo[lo[0]][u] + h_hi[hi[0]][u];                                         \
            idx[u] = (vi){0};                                                                  \
        }                                                                                      \
        for (int32_t e = 1; e < 256; e++) {                                                    \
            const vi ev = (vi){0} + e;                                                         \
            for (int u = 0; u < U; u++) {                                                      \
                const vf c = h_lo[lo[e]][u] + h_hi[hi[e]][u];                                  \
                const vi take = c < best[u];                                                   \
                best[u] = (vf)(((vi)c & take) | ((vi)best[u] & ~take));                        \
                idx[u] = (ev & take) | (idx[u] & ~take);                                       \
            }                                                                                  \
        }                                                                                      \
    }
#endif

/* search8 of iq2_search8.h in AVX2 intrinsics (x86 without AVX-512, chosen at run time): every
 * cost the same additions in the same order as DEFINE_SEARCH(8, 8, 4), the entries in the same
 * order, so the same result; what differs is the work around them (~1.5x that kernel's speed under
 * Clang on an AVX2 EPYC, measured): a batch's y, w rows become element columns by 8x8 transposes
 * (not float by float); the running minimum is one vminps and the index one vblendvps (the
 * generic select is three and/andn/or each; vminps(c, best) is c < best ? c : best exactly: a NaN
 * c never taken, a -0 never replacing a +0); and the entries go in runs of one hi pattern (the
 * grid's order makes 72), whose h_hi is made once a run in registers instead of a stored table. */
#include <immintrin.h>

#define IQ2_AVX2 __attribute__((target("avx2")))

IQ2_AVX2 static inline void iq2_transpose8(__m256 r[8]) { /* rows r[i][j] -> r[j][i] */
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
        r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
    }
}

IQ2_AVX2 static void search8(const float *y, const float *w, const float *s, float step, const int64_t *rows,
                             int64_t n_rows, const float *levels, const int32_t *lo, const int32_t *hi,
                             int64_t *out, int64_t stride) {
    enum { U = 4 };
    const __m256 lv[3] = {_mm256_set1_ps(levels[0]), _mm256_set1_ps(levels[1]), _mm256_set1_ps(levels[2])};
    const __m256 lv2[3] = {_mm256_set1_ps(levels[0] * levels[0]), _mm256_set1_ps(levels[1] * levels[1]),
                           _mm256_set1_ps(levels[2] * levels[2])};
    const __m256 m2 = _mm256_set1_ps(-2.0f);
    int32_t run_start[257], n_runs = 0; /* entries 1..255 in runs of equal hi[e] */
    for (int32_t e = 1; e < 256; e++)
        if (e == 1 || hi[e] != hi[e - 1]) run_start[n_runs++] = e;
    run_start[n_runs] = 256;
    float entry_id[256]; /* e's bits, as the index lanes hold it (a float array: no aliasing) */
    for (int32_t e = 0; e < 256; e++) memcpy(entry_id + e, &e, sizeof e);
    for (int64_t k0 = 0; k0 < n_rows; k0 += 8 * U) {
        const int m = n_rows - k0 < 8 * U ? (int)(n_rows - k0) : 8 * U;
        __m256 t[8][3][U];
        for (int u = 0; u < U; u++) {
            __m256 yr[8], wr[8];
            float sr[8];
            for (int i = 0; i < 8; i++) {
                const int64_t r = rows[k0 + (8 * u + i < m ? 8 * u + i : 0)];
                yr[i] = _mm256_loadu_ps(y + 8 * r);
                wr[i] = _mm256_loadu_ps(w + 8 * r);
                sr[i] = s[r] * step;
            }
            iq2_transpose8(yr);
            iq2_transpose8(wr);
            const __m256 srv = _mm256_loadu_ps(sr);
            for (int j = 0; j < 8; j++) {
                const __m256 aj = _mm256_mul_ps(_mm256_mul_ps(m2, wr[j]), yr[j]), bj = _mm256_mul_ps(wr[j], srv);
                for (int l = 0; l < 3; l++)
                    t[j][l][u] = _mm256_add_ps(_mm256_mul_ps(aj, lv[l]), _mm256_mul_ps(bj, lv2[l]));
            }
        }
        /* half_sums' sums, vector by vector (the 9 sums of two elements in registers): of
         * elements 0..3 all 81 patterns p = l0 + 3·l1 + 9·l2 + 27·l3, of elements 4..7 the 27
         * sums of three (the fourth is added once per run of entries below) */
        __m256 h_lo[81][U], h3_hi[27][U];
        for (int u = 0; u < U; u++) {
            __m256 h2[9];
            for (int l1 = 0; l1 < 3; l1++)
                for (int l0 = 0; l0 < 3; l0++) h2[3 * l1 + l0] = _mm256_add_ps(t[0][l0][u], t[1][l1][u]);
            for (int l2 = 0; l2 < 3; l2++)
                for (int p = 0; p < 9; p++) {
                    const __m256 v = _mm256_add_ps(h2[p], t[2][l2][u]);
                    for (int l3 = 0; l3 < 3; l3++) h_lo[27 * l3 + 9 * l2 + p][u] = _mm256_add_ps(v, t[3][l3][u]);
                }
            for (int l1 = 0; l1 < 3; l1++)
                for (int l0 = 0; l0 < 3; l0++) h2[3 * l1 + l0] = _mm256_add_ps(t[4][l0][u], t[5][l1][u]);
            for (int l2 = 0; l2 < 3; l2++)
                for (int p = 0; p < 9; p++) h3_hi[9 * l2 + p][u] = _mm256_add_ps(h2[p], t[6][l2][u]);
        }
        __m256 best[U], idx[U];
        for (int u = 0; u < U; u++) {
            const __m256 hh0 = _mm256_add_ps(h3_hi[hi[0] % 27][u], t[7][hi[0] / 27][u]);
            best[u] = _mm256_add_ps(h_lo[lo[0]][u], hh0);
            idx[u] = _mm256_setzero_ps();
        }
        /* entries in index order, in runs of one hi pattern (the grid's order makes 72 runs):
         * a run's h_hi is made once, in registers */
        for (int k = 0; k < n_runs; k++) {
            const int q = hi[run_start[k]];
            __m256 hh[U];
            for (int u = 0; u < U; u++) hh[u] = _mm256_add_ps(h3_hi[q % 27][u], t[7][q / 27][u]);
            for (int32_t e = run_start[k]; e < run_start[k + 1]; e++) {
                const __m256 ev = _mm256_broadcast_ss(entry_id + e); /* (a load: no register held) */
                const __m256 *hl = h_lo[lo[e]];
                for (int u = 0; u < U; u++) {
                    const __m256 c = _mm256_add_ps(hl[u], hh[u]);
                    const __m256 take = _mm256_cmp_ps(c, best[u], _CMP_LT_OQ);
                    best[u] = _mm256_min_ps(c, best[u]);
                    idx[u] = _mm256_blendv_ps(idx[u], ev, take);
                }
            }
        }
        int32_t got[8 * U];
        for (int u = 0; u < U; u++) _mm256_storeu_ps((float *)(got + 8 * u), idx[u]);
        for (int i = 0; i < m; i++) out[rows[k0 + i] * stride] = got[i];
    }
}

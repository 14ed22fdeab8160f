/* search16 of iq2_search.c in AVX-512 intrinsics: the same entry for every run as DEFINE_SEARCH's
 * loop over the 256 costs h_lo[lo[e]] + h_hi[hi[e]] (the first least one), found with less work.
 * The entries go in groups of up to 4 consecutive ones with one hi pattern (the grid's order
 * has runs of equal hi[e]: 72 of them, 103 groups). Rounding is monotone, so a group's least cost
 * is its h_hi + the least of its h_lo: one vminps an entry instead of an add, a compare and two
 * selects. The first group whose least cost is the overall least holds the first entry of that
 * cost (groups are ranges of indices); each lane then tries its group's entries in one 4-lane
 * gather (no branch on data). That holds where no sum overflows or is NaN: when every term t is
 * below 2^124 in magnitude (sums of 8 below 2^127); otherwise the vectors take DEFINE_SEARCH's
 * loop (best_entry16g). h_hi of a group is made from the sums over elements 4..6 once a group,
 * so the partial sums held are 108 vectors a lane set, not 162 (they fit L1).
 * Measured on an AVX-512 EPYC (Zen 5), same bytes: IQ2_XXS as a whole 1.4x under Clang 16 (the
 * default; its DEFINE_SEARCH selects are three and/andn/or each), 1.1x under GCC 12. Groups of
 * up to 8 with 8-lane gathers, or whole runs with 16-lane ones, were slower. */
#include <immintrin.h>

#define IQ2_512 __attribute__((target("avx512f")))

IQ2_512 static void search16(const float *const col[16], const int32_t *rows, int n_rows, const float *levels,
                             const int32_t *lo, const int32_t *hi, int64_t *out, int64_t stride) {
    enum { U = 4, G = 4 };
    int32_t start[257], n_groups = 0; /* groups: entries of equal hi[e], G at most */
    for (int32_t e = 0; e < 256; e++)
        if (e == 0 || hi[e] != hi[e - 1] || e - start[n_groups - 1] == G) start[n_groups++] = e;
    start[n_groups] = 256;
    int32_t off[256]; /* where h_lo[lo[e]] starts, in floats (from h_lo[0][0]) */
    for (int32_t e = 0; e < 256; e++) off[e] = U * 16 * lo[e];
    __m512 lv[3], lv2[3];
    for (int l = 0; l < 3; l++) lv[l] = _mm512_set1_ps(levels[l]), lv2[l] = _mm512_set1_ps(levels[l] * levels[l]);
    const __m512 big = _mm512_set1_ps(0x1p124f);
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
    for (int k0 = 0; k0 < n_rows; k0 += 16 * U) {
        const int m = n_rows - k0 < 16 * U ? n_rows - k0 : 16 * U;
        /* (float arrays: the lanes are read one by one below) */
        float t[8][3][U][16] __attribute__((aligned(64)));
        __mmask16 bad = 0;
        for (int j = 0; j < 8; j++)
            for (int u = 0; u < U; u++) {
                const __m512 aj = _mm512_loadu_ps(col[j] + k0 + 16 * u), bj = _mm512_loadu_ps(col[8 + j] + k0 + 16 * u);
                for (int l = 0; l < 3; l++) {
                    const __m512 v = _mm512_add_ps(_mm512_mul_ps(aj, lv[l]), _mm512_mul_ps(bj, lv2[l]));
                    _mm512_store_ps(t[j][l][u], v);
                    /* not below 2^124, or NaN */
                    bad |= _mm512_cmp_ps_mask((__m512)_mm512_and_si512((__m512i)v, absmask), big, _CMP_NLT_UQ);
                }
            }
        int32_t got[U * 16];
        if (bad) {
            vf16g tv[8][3][U];
            vi16g idx[U];
            memcpy(tv, t, sizeof tv);
            best_entry16g(tv, lo, hi, idx);
            memcpy(got, idx, sizeof got);
        } else {
#define T(j, l, u) _mm512_load_ps(t[j][l][u])
            float h_lo[81][U][16] __attribute__((aligned(64))), h3_hi[27][U][16] __attribute__((aligned(64)));
            for (int u = 0; u < U; u++) { /* half_sums' additions, in its order */
                __m512 h2[9], h3[27];
                /* (pattern p = l0 + 3·l1 + 9·l2 + 27·l3; loops without divisions, which Clang
                 * would otherwise keep as loops) */
                for (int l1 = 0; l1 < 3; l1++)
                    for (int l0 = 0; l0 < 3; l0++) h2[3 * l1 + l0] = _mm512_add_ps(T(0, l0, u), T(1, l1, u));
                for (int l2 = 0; l2 < 3; l2++)
                    for (int p = 0; p < 9; p++) h3[9 * l2 + p] = _mm512_add_ps(h2[p], T(2, l2, u));
                for (int l3 = 0; l3 < 3; l3++)
                    for (int p = 0; p < 27; p++) _mm512_store_ps(h_lo[27 * l3 + p][u], _mm512_add_ps(h3[p], T(3, l3, u)));
                for (int l1 = 0; l1 < 3; l1++)
                    for (int l0 = 0; l0 < 3; l0++) h2[3 * l1 + l0] = _mm512_add_ps(T(4, l0, u), T(5, l1, u));
                for (int l2 = 0; l2 < 3; l2++)
                    for (int p = 0; p < 9; p++) _mm512_store_ps(h3_hi[9 * l2 + p][u], _mm512_add_ps(h2[p], T(6, l2, u)));
            }
            __m512 best[U], hh_best[U];
            __m512i grp[U];
            for (int u = 0; u < U; u++) /* (group 0 takes over: every cost is finite) */
                best[u] = _mm512_set1_ps(__builtin_inff()), hh_best[u] = _mm512_setzero_ps(), grp[u] = _mm512_setzero_si512();
            for (int k = 0; k < n_groups; k++) {
                const int q = hi[start[k]];
                __m512 mn[U];
                for (int u = 0; u < U; u++) mn[u] = _mm512_load_ps(h_lo[lo[start[k]]][u]);
                for (int32_t e = start[k] + 1; e < start[k + 1]; e++)
                    for (int u = 0; u < U; u++) mn[u] = _mm512_min_ps(mn[u], _mm512_load_ps(h_lo[lo[e]][u])); /* (no NaN: either order) */
                for (int u = 0; u < U; u++) {
                    const __m512 hh = _mm512_add_ps(_mm512_load_ps(h3_hi[q % 27][u]), T(7, q / 27, u));
                    const __m512 c = _mm512_add_ps(mn[u], hh);
                    const __mmask16 take = _mm512_cmp_ps_mask(c, best[u], _CMP_LT_OQ); /* the first group of least cost */
                    grp[u] = _mm512_mask_mov_epi32(grp[u], take, _mm512_set1_epi32(k));
                    hh_best[u] = _mm512_mask_mov_ps(hh_best[u], take, hh);
                    best[u] = _mm512_min_ps(c, best[u]);
                }
            }
#undef T
            /* per lane, the first entry of its group whose cost is the least */
            float best_s[U][16], hh_s[U][16];
            int32_t grp_s[U][16];
            for (int u = 0; u < U; u++) {
                _mm512_storeu_ps(best_s[u], best[u]), _mm512_storeu_ps(hh_s[u], hh_best[u]);
                _mm512_storeu_si512(grp_s[u], grp[u]);
            }
            for (int i = 0; i < m; i++) {
                const int k = grp_s[i / 16][i % 16], e = start[k], n = start[k + 1] - e;
                const __m128i in = _mm_cmpgt_epi32(_mm_set1_epi32(n), _mm_set_epi32(3, 2, 1, 0));
                /* h_lo[p][u][l] is float 16·U·p + 16·u + l, and i = 16·u + l */
                const __m128i p = _mm_add_epi32(_mm_maskload_epi32(off + e, in), _mm_set1_epi32(i));
                const __m128 c = _mm_add_ps(_mm_mask_i32gather_ps(_mm_setzero_ps(), &h_lo[0][0][0], p, _mm_castsi128_ps(in), 4),
                                            _mm_set1_ps(hh_s[i / 16][i % 16]));
                const unsigned hit = (unsigned)_mm_movemask_ps(_mm_cmpeq_ps(c, _mm_set1_ps(best_s[i / 16][i % 16])));
                /* (or the last entry: not reached, one of them has the cost) */
                got[i] = e + __builtin_ctz((hit & ((1u << n) - 1)) | (1u << (n - 1)));
            }
        }
        for (int i = 0; i < m; i++) out[rows[k0 + i] * stride] = got[i];
    }
}

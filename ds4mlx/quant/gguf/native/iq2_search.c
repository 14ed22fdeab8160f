/* The IQ2_XXS codebook search (ds4mlx/quant/gguf/iq2_xxs.py): for each run of 8 weights, the
 * codebook entry e of least cost
 *
 *     cost[e] = sum_j a[j] * g[e][j] + b[j] * g[e][j]^2,   g[e][j] in levels[0..2],
 *
 * with a = lhs[0..7], b = lhs[8..15] (the linear and quadratic parts of the weighted squared
 * error). numpy does this as a [runs, 16] x [16, 256] matrix product and an argmin over the
 * [runs, 256] table in memory. Here the cost is split by element: the sums over elements 0..3
 * and over 4..7 for each of their 81 level patterns are built once, and each entry's cost is one
 * sum of two of them (lo[e], hi[e] name its patterns). Runs go 16 at a time through GCC/Clang
 * vector types. The sums round differently from the matrix product, so only costs equal to
 * within float rounding can choose differently. Ties go to the lowest index, as with argmin.
 * Built where the compiler targets AVX-512 (-DDS4MLX_PORTABLE: its lanes in plain C); elsewhere
 * iq2_search8.h, the previous kernel. On x86 the 16-lane search is iq2_search512.h. */
#if !defined(__AVX512F__)
#include "iq2_search8.h"
#else
#include <stdint.h>
#include <string.h>

#include "lanes.h"
#include "search_common.h"
#if (defined(__AVX__) || defined(__AVX512F__)) && !defined(DS4MLX_PORTABLE)
#include <immintrin.h>
#endif

/* The search over U·W runs side by side (each lane one run, so the lane count does not change a
 * result): U vectors of W lanes, 128-bit (SSE2, NEON) or on x86 256-bit with AVX2 where the CPU
 * has it (chosen at run time). The U vectors are independent chains of compare-and-select, which
 * would otherwise wait on each other's latency. The runs' lhs come as 16 columns (a[j], b[j] of
 * run k at col[j][k], j < 16; padded to a multiple of W·U). */
#define DEFINE_SEARCH(SUFFIX, W, U, ATTR)                                                       \
    DEFINE_GRID_ENTRY(SUFFIX, W, U, ATTR)                                                      \
    /* best entries of the n_rows runs of the columns, into out[rows[k] * stride] */           \
    ATTR static void search##SUFFIX(const float *const col[16], const int32_t *rows, int n_rows,\
                                    const float *levels, const int32_t *lo, const int32_t *hi, \
                                    int64_t *out, int64_t stride) {                            \
        typedef vf##SUFFIX vf;                                                                 \
        typedef vi##SUFFIX vi;                                                                 \
        for (int k0 = 0; k0 < n_rows; k0 += W * U) {                                           \
            const int m = n_rows - k0 < W * U ? n_rows - k0 : W * U;                           \
            vf t[8][3][U];                                                                     \
            vi idx[U];                                                                         \
            for (int j = 0; j < 8; j++)                                                        \
                for (int u = 0; u < U; u++) {                                                  \
                    vf aj, bj;                                                                 \
                    memcpy(&aj, col[j] + k0 + W * u, sizeof aj);                               \
                    memcpy(&bj, col[8 + j] + k0 + W * u, sizeof bj);                           \
                    for (int l = 0; l < 3; l++) t[j][l][u] = aj * levels[l] + bj * (levels[l] * levels[l]); \
                }                                                                              \
            best_entry##SUFFIX(t, lo, hi, idx);                                                \
            for (int i = 0; i < m; i++) out[rows[k0 + i] * stride] = idx[i / W][i % W];        \
        }                                                                                      \
    }

DEFINE_SEARCH(4, 4, 4, )

#if defined(__x86_64__) && defined(__GNUC__) && !defined(DS4MLX_PORTABLE)
DEFINE_SEARCH(8, 8, 4, __attribute__((target("avx2"))))
/* the loop over every entry, for the vectors that search16 cannot take (iq2_search512.h) */
DEFINE_GRID_ENTRY(16g, 16, 4, __attribute__((target("avx512f"))))
#include "iq2_search512.h"

static void search(const float *const col[16], const int32_t *rows, int n_rows, const float *levels,
                   const int32_t *lo, const int32_t *hi, int64_t *out, int64_t stride) {
    const int width = iq2_search_width(n_rows);
    (width == 16 ? search16 : width == 8 ? search8 : search4)(col, rows, n_rows, levels, lo, hi, out, stride);
}
#else
#define search search4
#endif

#define CAND_CHUNK 512 /* runs whose candidates are made together */
#define CAND_PAD 64    /* the columns' padding: the widest search's W·U */

/* The candidates of _candidate_entries: for runs y, w [n_runs][8] (|x| and error weights) with
 * group scale s[r], the best entry at each scale s[r] * steps[f], out [n_runs][n_steps]. Where
 * each element's nearest level (all weights positive, scale positive) forms a grid entry
 * (entry_of_pattern[pattern] >= 0), that entry is the minimum and no search is needed. Runs go
 * 16 at a time, one per lane (element j of the runs in one vector); the runs that need the
 * search are packed into the search's columns (lhs, rows: the previous kernel's scratch, unused
 * here). */
void iq2_candidates(const float *y, const float *w, const float *s, int64_t n_runs,
                    const float *steps, int64_t n_steps, const float *levels, const int32_t *lo,
                    const int32_t *hi, const int16_t *entry_of_pattern, float *lhs, int64_t *rows_unused,
                    int64_t *out) {
    typedef float r16 __attribute__((vector_size(64)));
    typedef int32_t r16i __attribute__((vector_size(64)));
    (void)lhs, (void)rows_unused;
    const float mid0 = (levels[0] + levels[1]) / 2, mid1 = (levels[1] + levels[2]) / 2;
    static const int32_t pow3[8] = {1, 3, 9, 27, 81, 243, 729, 2187};
    const r16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int64_t c0 = 0; c0 < n_runs; c0 += CAND_CHUNK) {
        const int n = n_runs - c0 < CAND_CHUNK ? (int)(n_runs - c0) : CAND_CHUNK, nv = (n + 15) / 16;
        r16 yv[CAND_CHUNK / 16][8], wv[CAND_CHUNK / 16][8], sv[CAND_CHUNK / 16];
        r16i okw[CAND_CHUNK / 16]; /* all 8 weights positive */
        for (int v = 0; v < nv; v++) { /* runs to lanes (past the last run: zeros) */
#if defined(__AVX512F__) && !defined(DS4MLX_PORTABLE)
            const int left = n - 16 * v;
            const __mmask16 in = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
            const __m512i run8 = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                    _mm512_set1_epi32(8));
            const float *yr = y + 8 * (c0 + 16 * v), *wr = w + 8 * (c0 + 16 * v);
            for (int j = 0; j < 8; j++) {
                const __m512i at = _mm512_add_epi32(run8, _mm512_set1_epi32(j));
                yv[v][j] = (r16)_mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, at, yr, 4);
                wv[v][j] = (r16)_mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, at, wr, 4);
            }
            sv[v] = (r16)_mm512_maskz_loadu_ps(in, s + c0 + 16 * v);
#else
            for (int i = 0; i < 16; i++) {
                const int r = 16 * v + i;
                for (int j = 0; j < 8; j++) {
                    yv[v][j][i] = r < n ? y[8 * (c0 + r) + j] : 0.0f;
                    wv[v][j][i] = r < n ? w[8 * (c0 + r) + j] : 0.0f;
                }
                sv[v][i] = r < n ? s[c0 + r] : 0.0f;
            }
#endif
            const r16 zero = {0};
            r16i ok = f_gt(wv[v][0], zero);
            for (int j = 1; j < 8; j++) ok &= f_gt(wv[v][j], zero);
            okw[v] = ok;
        }
        float colbuf[16][CAND_CHUNK + CAND_PAD];
        const float *col[16];
        for (int j = 0; j < 16; j++) col[j] = colbuf[j];
        int32_t rows[CAND_CHUNK + 16];
        for (int64_t f = 0; f < n_steps; f++) {
            int ns = 0;
            for (int v = 0; v < nv; v++) {
                const r16 sr = sv[v] * steps[f], t0 = sr * mid0, t1 = sr * mid1;
                r16i pattern = {0};
                for (int j = 0; j < 8; j++) pattern += -(f_gt(yv[v][j], t0) + f_gt(yv[v][j], t1)) * pow3[j];
                const r16i positive = f_gt(sr, (r16){0}) & okw[v];
                int32_t pat[16], ent[16];
                memcpy(pat, &pattern, sizeof pat);
                for (int i = 0; i < 16; i++) ent[i] = entry_of_pattern[pat[i]]; /* (int16: the table stays in L1) */
                const int m = n - 16 * v < 16 ? n - 16 * v : 16;
                for (int i = 0; i < m; i++) out[(c0 + 16 * v + i) * n_steps + f] = ent[i];
                r16i entv;
                memcpy(&entv, ent, sizeof entv);
                const r16i needv = ~(positive & i_ge(entv, (r16i){0})) & i_lt(lane, (r16i){0} + m);
#if defined(__AVX512F__) && !defined(DS4MLX_PORTABLE)
                const uint32_t need = _mm512_test_epi32_mask((__m512i)needv, (__m512i)needv);
#else
                uint32_t need = 0;
                for (int i = 0; i < 16; i++) need |= (uint32_t)(needv[i] != 0) << i;
#endif
                if (!need) continue;
                /* the search's lhs: a = (−2·w)·y, b = w·s, packed */
                r16 ab[16];
                for (int j = 0; j < 8; j++) ab[j] = (-2.0f * wv[v][j]) * yv[v][j], ab[8 + j] = wv[v][j] * sr;
#if defined(__AVX512F__) && !defined(DS4MLX_PORTABLE)
                const __mmask16 mk = (__mmask16)need;
                for (int j = 0; j < 16; j++)
                    _mm512_storeu_ps(colbuf[j] + ns, _mm512_maskz_compress_ps(mk, (__m512)ab[j]));
                const __m512i rv = _mm512_add_epi32(_mm512_set1_epi32(16 * v),
                                                    _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
                _mm512_storeu_si512((void *)(rows + ns), _mm512_maskz_compress_epi32(mk, rv));
                ns += __builtin_popcount(need);
#else
                for (uint32_t left = need; left; left &= left - 1) {
                    const int i = __builtin_ctz(left);
                    for (int j = 0; j < 16; j++) colbuf[j][ns] = ab[j][i];
                    rows[ns++] = 16 * v + i;
                }
#endif
            }
            for (int j = 0; j < 16; j++) memset(colbuf[j] + ns, 0, sizeof(float) * CAND_PAD);
            search(col, rows, ns, levels, lo, hi, out + c0 * n_steps + f, n_steps);
        }
    }
}

/* ------------------------------------------------------------------------------------------
 * The whole of iq2_xxs._quantize_chunk, block by block after a batched candidate search, every
 * step the numpy path's operation in its order (checked at first use against it). */

#include "npyops.h"
#include "transpose.h"

#define IQ2_BATCH 16 /* blocks whose candidate searches share the vector lanes */

#include "iq2_prepare.h"

/* ------------------------------------------------------------------------------------------
 * The per-group search of _quantize_chunk after the candidates, two blocks at a time in 16 lanes:
 * lane 8·b + g is group g of block b, and vector u of a quantity holds run 4g + u of every lane
 * (so a group's sums over its four runs are lane-wise). */
typedef float lf __attribute__((vector_size(64)));
typedef int32_t li __attribute__((vector_size(64)));

static inline lf l_splat(float v) {
    lf r;
    for (int i = 0; i < 16; i++) r[i] = v;
    return r;
}
static inline lf l_sel(li m, lf a, lf b) { return sel_f(m, a, b); }
static inline li l_seli(li m, li a, li b) { return (m & a) | (~m & b); }
static inline lf l_muladd(lf a, lf b, lf c) { return a * b + c; } /* (not fused: x86's numpy) */
static inline lf l_floor(lf v) { /* floor_f */
#if defined(__AVX512F__) && !defined(DS4MLX_PORTABLE)
    return (lf)_mm512_roundscale_ps((__m512)v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#else
    for (int i = 0; i < 16; i++) v[i] = floor_f(v[i]);
    return v;
#endif
}

/* numpy's float32 einsum over a run's 8 elements, lane-wise: products of elements j and j + 4 in
 * accumulator j, sums (l0 + l1) + (l2 + l3) */
static inline lf l_dot8(const lf a[8], const lf b[8]) {
    lf t[4];
    for (int i = 0; i < 4; i++) t[i] = l_muladd(a[i + 4], b[i + 4], l_muladd(a[i], b[i], l_splat(0.0f)));
    return 0.0f + ((t[0] + t[1]) + (t[2] + t[3]));
}

/* per run, the candidate f of least cost s·(s·cb − 2·ca) at its group's scale s (np.argmin: the
 * first minimum, or the first NaN); ca, cb [n_cand][4] */
static inline void l_best(lf s, const lf ca[][4], const lf cb[][4], int n_cand, li k[4], lf cost[4]) {
    for (int u = 0; u < 4; u++) {
        lf c = s * (s * cb[0][u] - 2.0f * ca[0][u]);
        li kk = {0};
        for (int f = 1; f < n_cand; f++) {
            const lf v = s * (s * cb[f][u] - 2.0f * ca[f][u]);
            const li take = f_eq(c, c) & (f_lt(v, c) | f_ne(v, v));
            c = l_sel(take, v, c);
            kk = l_seli(take, (li){0} + f, kk);
        }
        k[u] = kk, cost[u] = c;
    }
}

static inline lf l_sum4(const lf c[4]) { /* a reduction over 4: one after the other */
    return 0.0f + (((0.0f + c[0]) + c[1]) + c[2]) + c[3];
}

/* a[k[u]][u] lane by lane */
static inline lf l_pick(const lf a[][4], li k, int u, int n_cand) {
    lf r = a[0][u];
    for (int f = 1; f < n_cand; f++) r = l_sel(i_eq(k, (li){0} + f), a[f][u], r);
    return r;
}

/* the blocks b0 .. b0 + nb - 1 (nb <= 2) of the batch after the candidate search: group scales,
 * super-scale, 4-bit scales, entries, packed into out */
static void iq2_pair(const float *w, const float *y, const float *s0, const uint32_t *mask, const int64_t *cand,
                     int nb, const float *steps, int32_t n_steps, const float *super_steps, int32_t n_super,
                     int32_t refine, const float *grid, const int32_t *codes, const float *levels4, uint8_t *out) {
    lf wy[4][8], wv[4][8], ca[8][4], cb[8][4], s0v, yv[4][8];
    /* runs to lanes: lane l's group is the 32 floats at 32·l (a missing second block: zeros, entry 0) */
    float pad[2][512];
    const float *wp = w, *yp = y;
    if (nb < 2) {
        memset(pad, 0, sizeof pad);
        memcpy(pad[0], w, sizeof(float) * 256), memcpy(pad[1], y, sizeof(float) * 256);
        wp = pad[0], yp = pad[1];
    }
    rows_to_lanes16(wp, 32, (float *)wv);
    rows_to_lanes16(yp, 32, (float *)yv);
    for (int u = 0; u < 4; u++)
        for (int j = 0; j < 8; j++) wy[u][j] = wv[u][j] * yv[u][j];
    for (int l = 0; l < 16; l++) s0v[l] = l / 8 < nb ? s0[l] : 0.0f;
    /* A = Σ w·y·g and B = Σ w·g² of each candidate g (g² exact in float32) */
    for (int u = 0; u < 4; u++)
        for (int f = 0; f < n_steps; f++) {
            li e;
            for (int l = 0; l < 16; l++) e[l] = l / 8 < nb ? (int32_t)cand[(32 * (l / 8) + 4 * (l % 8) + u) * n_steps + f] : 0;
            lf gv[8], g2[8];
#if defined(__AVX512F__) && !defined(DS4MLX_PORTABLE)
            /* element j of entry e: levels[(code[e] >> 2j) & 3] */
            const __m512i code = _mm512_i32gather_epi32((__m512i)e, codes, 4);
            const __m512 lv = _mm512_castps128_ps512(_mm_loadu_ps(levels4));
            for (int j = 0; j < 8; j++) {
                const __m512i l = _mm512_and_si512(_mm512_srli_epi32(code, 2 * j), _mm512_set1_epi32(3));
                gv[j] = (lf)_mm512_permutexvar_ps(l, lv);
                g2[j] = gv[j] * gv[j];
            }
#else
            (void)grid;
            li code;
            for (int l = 0; l < 16; l++) code[l] = codes[e[l]];
            for (int j = 0; j < 8; j++) {
                const li l = (code >> (2 * j)) & 3;
                gv[j] = l_sel(i_eq(l, (li){0}), l_splat(levels4[0]), l_sel(i_eq(l, (li){0} + 1), l_splat(levels4[1]), l_splat(levels4[2])));
                g2[j] = gv[j] * gv[j];
            }
#endif
            ca[f][u] = l_dot8(wy[u], gv);
            cb[f][u] = l_dot8(wv[u], g2);
        }
    /* group scale: the best of the sweep, then least-squares refinements */
    li k[4];
    lf cost[4], best_c = l_splat(0.0f), step = l_splat(steps[0]);
    for (int f = 0; f < n_steps; f++) { /* argmin over f of the sums (the first minimum or NaN) */
        l_best(s0v * steps[f], ca, cb, n_steps, k, cost);
        const lf c = l_sum4(cost);
        if (f == 0) {
            best_c = c;
            continue;
        }
        const li take = f_eq(best_c, best_c) & (f_lt(c, best_c) | f_ne(c, c));
        best_c = l_sel(take, c, best_c);
        step = l_sel(take, l_splat(steps[f]), step);
    }
    lf s = s0v * step;
    for (int it = 0; it < refine; it++) {
        l_best(s, ca, cb, n_steps, k, cost);
        lf ta[4], tb[4];
        for (int u = 0; u < 4; u++) ta[u] = l_pick(ca, k[u], u, n_steps), tb[u] = l_pick(cb, k[u], u, n_steps);
        const lf sa = l_sum4(ta), sbb = l_sum4(tb);
        const lf zero = l_splat(0.0f);
        const lf pos = l_sel(f_gt(sa, zero), sa, l_sel(f_ne(sa, sa), sa, zero)); /* np.maximum(sa, 0) */
        s = l_sel(f_gt(sbb, zero), pos / l_sel(f_gt(sbb, zero), sbb, l_splat(1.0f)), zero);
    }
    /* super-scale D (fp16) and 4-bit group scales: s ≈ D·(2ls+1)/8; the best D candidate */
    float dmax[2], best_total[2] = {0, 0};
    for (int b = 0; b < nb; b++) {
        float sg[8];
        for (int g = 0; g < 8; g++) sg[g] = s[8 * b + g];
        dmax[b] = max_nan(sg, 8) * 8.0f / 31.0f;
    }
    lf best_dd = l_splat(0.0f), best_ls = l_splat(0.0f);
    li best_k[4] = {{0}};
    for (int v = 0; v < n_super; v++) {
        lf dd = l_splat(0.0f);
        for (int b = 0; b < nb; b++) {
            const float d = f16_to_f32(f32_to_f16(dmax[b] * super_steps[v]));
            for (int g = 0; g < 8; g++) dd[8 * b + g] = d;
        }
        const lf safe = l_sel(f_gt(dd, l_splat(0.0f)), dd, l_splat(1.0f));
        const lf lv = l_floor((8.0f * s / safe - 1.0f) / 2.0f + 0.5f);
        const lf ls = l_sel(f_lt(lv, l_splat(0.0f)), l_splat(0.0f), l_sel(f_gt(lv, l_splat(15.0f)), l_splat(15.0f), lv));
        l_best(dd * (2.0f * ls + 1.0f) / 8.0f, ca, cb, n_steps, k, cost);
        li take = {0};
        for (int b = 0; b < nb; b++) {
            float c[32];
            for (int r = 0; r < 32; r++) c[r] = cost[r % 4][8 * b + r / 4];
            const float total = pairwise_f32(c, 32);
            const int32_t better = -(int32_t)(v == 0 || total < best_total[b]); /* (branch-free: data) */
            best_total[b] = better ? total : best_total[b];
            for (int g = 0; g < 8; g++) take[8 * b + g] = better;
        }
        best_dd = l_sel(take, dd, best_dd);
        best_ls = l_sel(take, ls, best_ls);
        for (int u = 0; u < 4; u++) best_k[u] = l_seli(take, k[u], best_k[u]);
    }
    for (int b = 0; b < nb; b++) {
        uint8_t *o = out + 66 * b;
        const uint16_t hd = f32_to_f16(best_dd[8 * b]);
        o[0] = hd & 255, o[1] = hd >> 8;
        for (int g = 0; g < 8; g++) {
            const int l = 8 * b + g;
            uint32_t a = 0, bw = (uint32_t)(int)best_ls[l] << 28;
            for (int u = 0; u < 4; u++) {
                const int r = 4 * g + u;
                a |= (uint32_t)cand[(32 * b + r) * n_steps + best_k[u][l]] << (8 * u);
                bw |= (mask[32 * b + r] & 127u) << (7 * u);
            }
            for (int t = 0; t < 4; t++) o[2 + 8 * g + t] = (a >> (8 * t)) & 255, o[6 + 8 * g + t] = (bw >> (8 * t)) & 255;
        }
    }
}

/* xb [n_blocks][256], optional importance qw (same shape) -> IQ2_XXS blocks (66 bytes) in out */
void iq2_quantize(const float *xb, const float *qw, int64_t n_blocks, const float *steps, int32_t n_steps,
                  const float *super_steps, int32_t n_super, int32_t refine, const float *levels,
                  const int32_t *lo, const int32_t *hi, const int16_t *entry_of_pattern, const float *grid,
                  uint8_t *out) {
    float w[IQ2_BATCH * 256], y[IQ2_BATCH * 256], s0[IQ2_BATCH * 8], s_run[IQ2_BATCH * 32];
    uint32_t mask[IQ2_BATCH * 32];
    int64_t cand[IQ2_BATCH * 32 * 8];
    /* each entry's levels, 2 bits an element (the grid's codes), and the levels padded to 4 */
    int32_t codes[256];
    const float levels4[4] = {levels[0], levels[1], levels[2], levels[2]};
    iq2_entry_codes(grid, levels, codes);
    for (int64_t b0 = 0; b0 < n_blocks; b0 += IQ2_BATCH) {
        const int nb = n_blocks - b0 < IQ2_BATCH ? (int)(n_blocks - b0) : IQ2_BATCH;
        for (int i = 0; i < nb; i++) {
            iq2_prepare(xb + 256 * (b0 + i), qw == NULL ? NULL : qw + 256 * (b0 + i), w + 256 * i,
                        y + 256 * i, mask + 32 * i, s0 + 8 * i);
            for (int r = 0; r < 32; r++) s_run[32 * i + r] = s0[8 * i + r / 4];
        }
        iq2_candidates(y, w, s_run, 32 * nb, steps, n_steps, levels, lo, hi, entry_of_pattern, NULL, NULL, cand);
        for (int i = 0; i < nb; i += 2)
            iq2_pair(w + 256 * i, y + 256 * i, s0 + 8 * i, mask + 32 * i, cand + 32 * n_steps * i, nb - i < 2 ? 1 : 2,
                     steps, n_steps, super_steps, n_super, refine, grid, codes, levels4, out + 66 * (b0 + i));
    }
}
#endif

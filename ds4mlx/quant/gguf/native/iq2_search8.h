/* Without AVX-512: the previous kernel, 8 rows a vector (the 16-lane kernel of iq2_search.c, compiled for
 * AVX2 by GCC, turns its wide generic vectors into scalar code: 0.5-0.6x measured). */
/* The IQ2_XXS codebook search (ds4mlx/quant/gguf/iq2_xxs.py): for each run of 8 weights, the
 * codebook entry e of least cost
 *
 *     cost[e] = sum_j a[j] * g[e][j] + b[j] * g[e][j]^2,   g[e][j] in levels[0..2],
 *
 * with a = lhs[0..7], b = lhs[8..15] (the linear and quadratic parts of the weighted squared
 * error). numpy does this as a [runs, 16] x [16, 256] matrix product and an argmin over the
 * [runs, 256] table in memory. Here the cost is split by element: the sums over elements 0..3
 * and over 4..7 for each of their 81 level patterns are built once, and each entry's cost is one
 * sum of two of them (lo[e], hi[e] name its patterns). Runs go 8 at a time through GCC/Clang
 * vector types. The sums round differently from the matrix product, so only costs equal to
 * within float rounding can choose differently. Ties go to the lowest index, as with argmin. */
#include <stdint.h>
#include <string.h>

#include "search_common.h"
#if defined(__AVX__)
#include <immintrin.h>
#endif

/* The search over U·W runs side by side (each lane one run, so the lane count does not change a
 * result): U vectors of W lanes, 128-bit (SSE2, NEON) or on x86 256-bit with AVX2 where the CPU
 * has it (chosen at run time). The U vectors are independent chains of compare-and-select, which
 * would otherwise wait on each other's latency. Each run's lhs, a = (−2·w)·y and b = w·(s·step),
 * is made here from its y, w rows (the same products as _candidate_entries'). */
#define DEFINE_SEARCH(SUFFIX, W, U, ATTR)                                                       \
    DEFINE_GRID_ENTRY(SUFFIX, W, U, ATTR)                                                      \
    /* best entries of the runs rows[0..n_rows) at scales s[r]·step, into out[rows[k] * stride] */ \
    ATTR static void search##SUFFIX(const float *y, const float *w, const float *s, float step,\
                                    const int64_t *rows, int64_t n_rows, const float *levels,  \
                                    const int32_t *lo, const int32_t *hi, int64_t *out, int64_t stride) { \
        typedef vf##SUFFIX vf;                                                                 \
        typedef vi##SUFFIX vi;                                                                 \
        for (int64_t k0 = 0; k0 < n_rows; k0 += W * U) {                                       \
            const int m = n_rows - k0 < W * U ? (int)(n_rows - k0) : W * U;                    \
            float a[16][U][W];                                                                 \
            for (int i = 0; i < W * U; i++) {                                                  \
                const int64_t r = rows[k0 + (i < m ? i : 0)];                                  \
                const float sr = s[r] * step;                                                  \
                for (int j = 0; j < 8; j++) {                                                  \
                    a[j][i / W][i % W] = (-2.0f * w[8 * r + j]) * y[8 * r + j];                \
                    a[8 + j][i / W][i % W] = w[8 * r + j] * sr;                                \
                }                                                                              \
            }                                                                                  \
            vf t[8][3][U];                                                                     \
            vi idx[U];                                                                         \
            for (int j = 0; j < 8; j++)                                                        \
                for (int u = 0; u < U; u++) {                                                  \
                    vf aj, bj;                                                                 \
                    memcpy(&aj, a[j][u], sizeof aj);                                           \
                    memcpy(&bj, a[8 + j][u], sizeof bj);                                       \
                    for (int l = 0; l < 3; l++) t[j][l][u] = aj * levels[l] + bj * (levels[l] * levels[l]); \
                }                                                                              \
            best_entry##SUFFIX(t, lo, hi, idx);                                                \
            for (int i = 0; i < m; i++) out[rows[k0 + i] * stride] = idx[i / W][i % W];        \
        }                                                                                      \
    }

DEFINE_SEARCH(4, 4, 4, )

#if defined(__x86_64__) && defined(__GNUC__)
#if defined(DS4MLX_PORTABLE)
DEFINE_SEARCH(8, 8, 4, __attribute__((target("avx2"))))
#else
#include "iq2_search_avx2.h"
#endif
DEFINE_SEARCH(16, 16, 4, __attribute__((target("avx512f"))))

static void search(const float *y, const float *w, const float *s, float step, const int64_t *rows,
                   int64_t n_rows, const float *levels, const int32_t *lo, const int32_t *hi, int64_t *out,
                   int64_t stride) {
    const int width = iq2_search_width(n_rows);
    (width == 16 ? search16 : width == 8 ? search8 : search4)(y, w, s, step, rows, n_rows, levels, lo, hi, out, stride);
}
#else
#define search search4
#endif

/* The candidates of _candidate_entries: for runs y, w [n_runs][8] (|x| and error weights) with
 * group scale s[r], the best entry at each scale s[r] * steps[f], out [n_runs][n_steps]. Where
 * each element's nearest level (all weights positive, scale positive) forms a grid entry
 * (entry_of_pattern[pattern] >= 0), that entry is the minimum and no search is needed (lhs:
 * unused here). */
void iq2_candidates(const float *y, const float *w, const float *s, int64_t n_runs,
                    const float *steps, int64_t n_steps, const float *levels, const int32_t *lo,
                    const int32_t *hi, const int16_t *entry_of_pattern, float *lhs, int64_t *rows,
                    int64_t *out) {
    typedef float r8 __attribute__((vector_size(32)));
    typedef int32_t r8i __attribute__((vector_size(32)));
    (void)lhs;
    const float mid0 = (levels[0] + levels[1]) / 2, mid1 = (levels[1] + levels[2]) / 2;
    const r8i pow3 = {1, 3, 9, 27, 81, 243, 729, 2187};
    /* branch-free: whether a run needs the search is data, and mispredicted it costs more than
     * the pattern itself; a run's 8 elements are one vector */
    for (int64_t f = 0; f < n_steps; f++) {
        int64_t n_search = 0;
        for (int64_t r = 0; r < n_runs; r++) {
            const float sr = s[r] * steps[f], t0 = sr * mid0, t1 = sr * mid1;
            r8 yv, wv;
            memcpy(&yv, y + 8 * r, sizeof yv);
            memcpy(&wv, w + 8 * r, sizeof wv);
            const r8i pw = ((yv > t0) & pow3) + ((yv > t1) & pow3), pos = wv > 0.0f; /* level·3^j, no multiply */
            const int32_t pattern = ((pw[0] + pw[1]) + (pw[2] + pw[3])) + ((pw[4] + pw[5]) + (pw[6] + pw[7]));
#if defined(__AVX__)
            const int positive = (sr > 0) & (_mm256_movemask_ps((__m256)pos) == 0xFF);
#else
            const int positive = (sr > 0) & ((pos[0] & pos[1] & pos[2] & pos[3] & pos[4] & pos[5] & pos[6] & pos[7]) != 0);
#endif
            const int64_t entry = entry_of_pattern[pattern];  /* (int16: the table stays in L1) */
            out[r * n_steps + f] = entry;
            rows[n_search] = r;
            n_search += !(positive & (entry >= 0));
        }
        search(y, w, s, steps[f], rows, n_search, levels, lo, hi, out + f, n_steps);
    }
}

/* The candidate sums of iq2_xxs._quantize_chunk, bit for bit its numpy: numpy's float32 einsum
 * over 8 elements is 4 lanes, elements j and j+4 in lane j (multiply and add, fused on arm64 as numpy's NEON code does), lane sums
 * (l0 + l1) + (l2 + l3). */
#if defined(__aarch64__)
#define MULADD(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define MULADD(a, b, c) ((a) * (b) + (c))
#endif

#include "iq2_prepare.h" /* (and its 8-float vectors p8, p8i) */

static inline p8 muladd8(p8 a, p8 b, p8 c) {
#if defined(__aarch64__)
    for (int i = 0; i < 8; i++) c[i] = MULADD(a[i], b[i], c[i]);
    return c;
#else
    return a * b + c;
#endif
}

/* 8 runs' rows (8 floats each, at src) to their element columns */
static inline void transpose8(const float *src, p8 col[8]) {
#if defined(__AVX2__) && !defined(DS4MLX_PORTABLE)
    __m256 r[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + 8 * i);
    iq2_transpose8(r);
    memcpy(col, r, sizeof r);
#else
    for (int j = 0; j < 8; j++)
        for (int i = 0; i < 8; i++) col[j][i] = src[8 * i + j];
#endif
}

/* element j's level of 8 entries from their codes (2 bits an element), levels4 = levels, padded */
static inline p8 level_of(p8i code, int j, const float *levels4) {
#if defined(__AVX2__) && !defined(DS4MLX_PORTABLE)
    return (p8)_mm256_permutevar_ps(_mm256_broadcast_ps((const __m128 *)levels4), (__m256i)(code >> (2 * j)));
#else
    const p8i l = (code >> (2 * j)) & 3;
    p8 r;
    for (int i = 0; i < 8; i++) r[i] = levels4[l[i]];
    return r;
#endif
}

/* ca[f][r] = Σ_j wy[r][j]·g[j], cb[f][r] = Σ_j w[r][j]·g[j]² for g = grid[cand[r][f]] of a
 * block's 32 runs, 8 runs a vector (g² exact in float32) */
static void iq2_candidate_sums(const float *wy, const float *w, const int64_t *cand, int n_cand,
                               const int32_t *codes, const float *levels4, float *ca, float *cb) {
    for (int v = 0; v < 4; v++) {
        p8 wyc[8], wc[8];
        transpose8(wy + 64 * v, wyc);
        transpose8(w + 64 * v, wc);
        for (int f = 0; f < n_cand; f++) {
            p8i code;
            for (int i = 0; i < 8; i++) code[i] = codes[cand[(8 * v + i) * n_cand + f]];
            p8 ta[4], tb[4];
            for (int i = 0; i < 4; i++) {
                const p8 g = level_of(code, i, levels4), g4 = level_of(code, i + 4, levels4);
                ta[i] = muladd8(wyc[i + 4], g4, muladd8(wyc[i], g, (p8){0}));
                tb[i] = muladd8(wc[i + 4], g4 * g4, muladd8(wc[i], g * g, (p8){0}));
            }
            const p8 sa = 0.0f + ((ta[0] + ta[1]) + (ta[2] + ta[3])), sb = 0.0f + ((tb[0] + tb[1]) + (tb[2] + tb[3]));
            memcpy(ca + 32 * f + 8 * v, &sa, sizeof sa);
            memcpy(cb + 32 * f + 8 * v, &sb, sizeof sb);
        }
    }
}

/* ------------------------------------------------------------------------------------------
 * The whole of iq2_xxs._quantize_chunk, block by block after a batched candidate search, every
 * step the numpy path's operation in its order (checked at first use against it). */

#include "npyops.h"

#define IQ2_BATCH 16 /* blocks whose candidate searches share the vector lanes */

static inline float sum4(const float *a, int stride) { /* a reduction over 4: one after the other */
    return 0.0f + (((0.0f + a[0]) + a[stride]) + a[2 * stride]) + a[3 * stride];
}

/* per run of a block, the candidate f of least cost s·(s·cb − 2·ca) at its group's scale s[g]
 * (np.argmin: the first minimum, or the first NaN); ca, cb [n_cand][32], runs side by side */
static void best_at(const float *s, const float *ca, const float *cb, int n_cand, int32_t *k, float *cost) {
    float sr[32];
    for (int r = 0; r < 32; r++) sr[r] = s[r / 4];
    for (int r = 0; r < 32; r++) {
        cost[r] = sr[r] * (sr[r] * cb[r] - 2.0f * ca[r]);
        k[r] = 0;
    }
    for (int f = 1; f < n_cand; f++)
        for (int r = 0; r < 32; r++) {
            const float v = sr[r] * (sr[r] * cb[32 * f + r] - 2.0f * ca[32 * f + r]);
            const int take = (cost[r] == cost[r]) & ((v < cost[r]) | (v != v));
            cost[r] = take ? v : cost[r];
            k[r] = take ? f : k[r];
        }
}

/* xb [n_blocks][256], optional importance qw (same shape) -> IQ2_XXS blocks (66 bytes) in out */
void iq2_quantize(const float *xb, const float *qw, int64_t n_blocks, const float *steps, int32_t n_steps,
                  const float *super_steps, int32_t n_super, int32_t refine, const float *levels,
                  const int32_t *lo, const int32_t *hi, const int16_t *entry_of_pattern, const float *grid,
                  uint8_t *out) {
    float w[IQ2_BATCH * 256], y[IQ2_BATCH * 256], s0[IQ2_BATCH * 8], s_run[IQ2_BATCH * 32];
    float lhs[IQ2_BATCH * 32 * 16];
    uint32_t mask[IQ2_BATCH * 32];
    int64_t rows[IQ2_BATCH * 32], cand[IQ2_BATCH * 32 * 8];
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
        iq2_candidates(y, w, s_run, 32 * nb, steps, n_steps, levels, lo, hi, entry_of_pattern, lhs, rows, cand);
        for (int i = 0; i < nb; i++) {
            const float *wb = w + 256 * i, *yb = y + 256 * i, *sb0 = s0 + 8 * i;
            const int64_t *cb_idx = cand + 32 * n_steps * i;
            float wy[256], ca[8 * 32], cb[8 * 32], cost[32], costs[8][8], s[8], sc[8];
            int32_t k[32];
            for (int j = 0; j < 256; j++) wy[j] = wb[j] * yb[j];
            iq2_candidate_sums(wy, wb, cb_idx, n_steps, codes, levels4, ca, cb);
            /* group scale: the best of the sweep, then least-squares refinements */
            for (int f = 0; f < n_steps; f++) {
                for (int g = 0; g < 8; g++) sc[g] = sb0[g] * steps[f];
                best_at(sc, ca, cb, n_steps, k, cost);
                for (int g = 0; g < 8; g++) costs[f][g] = sum4(cost + 4 * g, 1);
            }
            for (int g = 0; g < 8; g++) s[g] = sb0[g] * steps[argmin_first(&costs[0][g], n_steps, 8)];
            for (int it = 0; it < refine; it++) {
                best_at(s, ca, cb, n_steps, k, cost);
                for (int g = 0; g < 8; g++) {
                    float ta[4], tb[4];
                    for (int u = 0; u < 4; u++) {
                        const int r = 4 * g + u;
                        ta[u] = ca[32 * k[r] + r], tb[u] = cb[32 * k[r] + r];
                    }
                    const float sa = sum4(ta, 1), sbb = sum4(tb, 1);
                    const float pos = sa > 0 ? sa : (sa != sa ? sa : 0.0f); /* np.maximum(sa, 0) */
                    s[g] = sbb > 0 ? pos / sbb : 0.0f;
                }
            }
            /* super-scale D (fp16) and 4-bit group scales: s ≈ D·(2ls+1)/8; the best D candidate */
            const float dmax = max_nan(s, 8) * 8.0f / 31.0f;
            float best_total = 0, best_dd = 0, best_ls[8], ls[8];
            int32_t best_k[32];
            for (int u = 0; u < n_super; u++) {
                const float dd = f16_to_f32(f32_to_f16(dmax * super_steps[u]));
                const float safe = dd > 0 ? dd : 1.0f;
                for (int g = 0; g < 8; g++) {
                    const float l = floor_f((8.0f * s[g] / safe - 1.0f) / 2.0f + 0.5f);
                    ls[g] = l < 0 ? 0.0f : (l > 15 ? 15.0f : l);
                    sc[g] = dd * (2.0f * ls[g] + 1.0f) / 8.0f;
                }
                best_at(sc, ca, cb, n_steps, k, cost);
                const float total = pairwise_f32(cost, 32);
                if (u == 0 || total < best_total) {
                    best_total = total, best_dd = dd;
                    memcpy(best_ls, ls, sizeof ls);
                    memcpy(best_k, k, sizeof k);
                }
            }
            uint8_t *o = out + 66 * (b0 + i);
            const uint16_t hd = f32_to_f16(best_dd);
            o[0] = hd & 255, o[1] = hd >> 8;
            for (int g = 0; g < 8; g++) {
                uint32_t a = 0, bw = (uint32_t)(int)best_ls[g] << 28;
                for (int u = 0; u < 4; u++) {
                    const int r = 4 * g + u;
                    a |= (uint32_t)cb_idx[r * n_steps + best_k[r]] << (8 * u);
                    bw |= (mask[32 * i + r] & 127u) << (7 * u);
                }
                for (int t = 0; t < 4; t++) o[2 + 8 * g + t] = (a >> (8 * t)) & 255, o[6 + 8 * g + t] = (bw >> (8 * t)) & 255;
            }
        }
    }
}

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

/* The search over W runs side by side (each lane one run, so the lane count does not change a
 * result): 4 lanes in one 128-bit vector (SSE2, NEON), and on x86 8 lanes with AVX2 where the
 * CPU has it (chosen at run time). */
#define DEFINE_SEARCH(SUFFIX, W, ATTR)                                                          \
    typedef float vf##SUFFIX __attribute__((vector_size(4 * W)));                              \
    typedef int32_t vi##SUFFIX __attribute__((vector_size(4 * W)));                            \
    /* h[p] for the 81 level patterns p = l0 + 3 l1 + 9 l2 + 27 l3 of elements j0..j0+3 */     \
    ATTR static void half_sums##SUFFIX(const vf##SUFFIX t[8][3], int j0, vf##SUFFIX h[81]) {   \
        for (int p = 0; p < 81; p++)                                                           \
            h[p] = ((t[j0][p % 3] + t[j0 + 1][p / 3 % 3]) + t[j0 + 2][p / 9 % 3]) +            \
                   t[j0 + 3][p / 27];                                                          \
    }                                                                                          \
    /* best entries of the runs rows[0..n_rows) (their lhs rows), into out[rows[k] * stride] */ \
    ATTR static void search##SUFFIX(const float *lhs, const int64_t *rows, int64_t n_rows,     \
                                    const float *levels, const int32_t *lo, const int32_t *hi, \
                                    int64_t *out, int64_t stride) {                            \
        typedef vf##SUFFIX vf;                                                                 \
        typedef vi##SUFFIX vi;                                                                 \
        for (int64_t k0 = 0; k0 < n_rows; k0 += W) {                                           \
            const int m = n_rows - k0 < W ? (int)(n_rows - k0) : W;                            \
            float a[16][W];                                                                    \
            for (int i = 0; i < W; i++)                                                        \
                for (int j = 0; j < 16; j++) a[j][i] = lhs[rows[k0 + (i < m ? i : 0)] * 16 + j]; \
            vf t[8][3], h_lo[81], h_hi[81];                                                    \
            for (int j = 0; j < 8; j++) {                                                      \
                vf aj, bj;                                                                     \
                memcpy(&aj, a[j], sizeof aj);                                                  \
                memcpy(&bj, a[8 + j], sizeof bj);                                              \
                for (int l = 0; l < 3; l++) t[j][l] = aj * levels[l] + bj * (levels[l] * levels[l]); \
            }                                                                                  \
            half_sums##SUFFIX(t, 0, h_lo);                                                     \
            half_sums##SUFFIX(t, 4, h_hi);                                                     \
            vf best = h_lo[lo[0]] + h_hi[hi[0]];                                               \
            vi idx = {0};                                                                      \
            for (int32_t e = 1; e < 256; e++) {                                                \
                const vf c = h_lo[lo[e]] + h_hi[hi[e]];                                        \
                const vi take = c < best;                                                      \
                best = (vf)(((vi)c & take) | ((vi)best & ~take));                              \
                idx = (((vi){0} + e) & take) | (idx & ~take);                                  \
            }                                                                                  \
            for (int i = 0; i < m; i++) out[rows[k0 + i] * stride] = idx[i];                   \
        }                                                                                      \
    }

DEFINE_SEARCH(4, 4, )

#if defined(__x86_64__) && defined(__GNUC__)
DEFINE_SEARCH(8, 8, __attribute__((target("avx2"))))

static void search(const float *lhs, const int64_t *rows, int64_t n_rows, const float *levels,
                   const int32_t *lo, const int32_t *hi, int64_t *out, int64_t stride) {
    static int avx2 = -1;
    if (avx2 < 0) avx2 = __builtin_cpu_supports("avx2");
    (avx2 ? search8 : search4)(lhs, rows, n_rows, levels, lo, hi, out, stride);
}
#else
#define search search4
#endif

/* lhs [n_runs][16] given: the best entry of every run */
void iq2_best_entries(const float *lhs, int64_t n_runs, const float *levels, const int32_t *lo,
                      const int32_t *hi, int64_t *out) {
    int64_t rows[256];
    for (int64_t r0 = 0; r0 < n_runs; r0 += 256) {
        const int64_t n = n_runs - r0 < 256 ? n_runs - r0 : 256;
        for (int64_t k = 0; k < n; k++) rows[k] = r0 + k;
        search(lhs, rows, n, levels, lo, hi, out, 1);
    }
}

/* The candidates of _candidate_entries: for runs y, w [n_runs][8] (|x| and error weights) with
 * group scale s[r], the best entry at each scale s[r] * steps[f], out [n_runs][n_steps]. Where
 * each element's nearest level (all weights positive, scale positive) forms a grid entry
 * (entry_of_pattern[pattern] >= 0), that entry is the minimum and no search is needed. */
void iq2_candidates(const float *y, const float *w, const float *s, int64_t n_runs,
                    const float *steps, int64_t n_steps, const float *levels, const int32_t *lo,
                    const int32_t *hi, const int64_t *entry_of_pattern, float *lhs, int64_t *rows,
                    int64_t *out) {
    const float mid0 = (levels[0] + levels[1]) / 2, mid1 = (levels[1] + levels[2]) / 2;
    for (int64_t f = 0; f < n_steps; f++) {
        int64_t n_search = 0;
        for (int64_t r = 0; r < n_runs; r++) {
            const float *yr = y + 8 * r, *wr = w + 8 * r;
            const float sr = s[r] * steps[f];
            int positive = sr > 0;
            int64_t pattern = 0, pow3 = 1;
            for (int j = 0; j < 8; j++, pow3 *= 3) {
                positive &= wr[j] > 0;
                pattern += pow3 * ((yr[j] > sr * mid0) + (yr[j] > sr * mid1));
            }
            const int64_t entry = entry_of_pattern[pattern];
            if (positive && entry >= 0) {
                out[r * n_steps + f] = entry;
                continue;
            }
            float *a = lhs + 16 * r;
            for (int j = 0; j < 8; j++) {
                a[j] = -2.0f * wr[j] * yr[j];
                a[8 + j] = wr[j] * sr;
            }
            rows[n_search++] = r;
        }
        search(lhs, rows, n_search, levels, lo, hi, out + f, n_steps);
    }
}

/* The rest of iq2_xxs._quantize_chunk's hot loops, bit for bit its numpy (checked at first use,
 * see iq2_xxs._check_native). numpy's float32 einsum over 8 elements: 4 lanes, elements
 * j and j+4 in lane j (multiply and add, fused on arm64 as numpy's NEON code does), lane sums
 * (l0 + l1) + (l2 + l3). */
#if defined(__aarch64__)
#define MULADD(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define MULADD(a, b, c) ((a) * (b) + (c))
#endif

static inline float dot8(const float *a, const float *b) {
    float t[4];
    for (int i = 0; i < 4; i++) t[i] = MULADD(a[i + 4], b[i + 4], MULADD(a[i], b[i], 0.0f));
    return 0.0f + ((t[0] + t[1]) + (t[2] + t[3]));
}

/* ca[r][f] = Σ_j wy[r][j]·g[j], cb[r][f] = Σ_j w[r][j]·g[j]² for g = grid[cand[r][f]] */
void iq2_candidate_sums(const float *wy, const float *w, const int64_t *cand, const float *grid,
                        int64_t n_runs, int64_t n_cand, float *ca, float *cb) {
    for (int64_t r = 0; r < n_runs; r++) {
        for (int64_t f = 0; f < n_cand; f++) {
            const float *g = grid + 8 * cand[r * n_cand + f];
            float g2[8];
            for (int j = 0; j < 8; j++) g2[j] = g[j] * g[j];
            ca[r * n_cand + f] = dot8(wy + 8 * r, g);
            cb[r * n_cand + f] = dot8(w + 8 * r, g2);
        }
    }
}

/* For each group (scale s[g], runs_per_group runs) and run, the candidate of least cost
 * s·(s·cb − 2·ca) (argmin: the first minimum, or the first NaN) and that cost. */
void iq2_best(const float *s, const float *ca, const float *cb, int64_t n_groups, int64_t runs_per_group,
              int64_t n_cand, int64_t *k_out, float *cost_out) {
    for (int64_t gi = 0; gi < n_groups; gi++) {
        const float sg = s[gi];
        for (int64_t r = gi * runs_per_group; r < (gi + 1) * runs_per_group; r++) {
            int64_t best = 0;
            float best_c = 0;
            for (int64_t f = 0; f < n_cand; f++) {
                const float c = sg * (sg * cb[r * n_cand + f] - 2.0f * ca[r * n_cand + f]);
                if (f == 0 || (best_c == best_c && (c < best_c || c != c))) {
                    best = f;
                    best_c = c;
                }
            }
            k_out[r] = best;
            cost_out[r] = best_c;
        }
    }
}

/* Without AVX-512: the K-quant kernel 8 sub-blocks a vector, on every other CPU (AVX2, NEON,
 * plain C). The 16-lane kernel of kquant_search.c built for these (-DDS4MLX_PORTABLE) is slower
 * for both kinds: measured on an AVX2 EPYC with clang 16, Q4_K 134 vs 233 and Q2_K 120 vs 221
 * M weights/s, so one kernel serves both here.
 *
 * The recipe of common.kquant_fit and the packing of q4_k / q2_k, one super-block at a time:
 * per sub-block a (scale, min) search over candidate inverse scales (round the codes, fit
 * (scale, b) by weighted least squares, keep the lowest error, polish the winner by re-rounding),
 * the sub-block levels against fp16 super-scales, and the super-scale refit.
 *
 * It must give the numpy path's bits, so every operation is the one numpy performs:
 *  - the float32 sums Σ q·w, Σ q·wx, Σ q²·w are numpy's einsum inner loop (4 float lanes, 16
 *    elements per step, lane sums (l0 + l1) + (l2 + l3)); it multiplies and adds separately on
 *    x86 (SSE baseline) and fuses them on arm64 (NEON), hence MULADD;
 *  - the per-row algebra is float64, term by term in numpy's order (built with
 *    -ffp-contract=off, so nothing else is fused);
 *  - np.clip keeps -0 and NaN, np.maximum(s, 0) turns -0 into +0, argmin takes the first
 *    minimum (or the first NaN).
 * native.load_checked compares it with the numpy path on random rows before first use.
 *
 * Layout: a block's 256 values as 32 vectors of 8 lanes, lane r of vector k element k of
 * sub-block r (Q4_K: the block's 8 sub-blocks of 32; Q2_K: two groups of 8 sub-blocks of 16,
 * vectors 16g + k). Each lane performs numpy's operations for its sub-block in numpy's order,
 * so each gets numpy's bits, while the sub-blocks' dependency chains (sums, divisions, the
 * candidate choice) run side by side (one row at a time was latency-bound: 1.75x Q4_K, 2.1x
 * Q2_K, measured). Everything per sub-block (weights, search, codes, refit sums) runs in that
 * layout; only the final codes and the packing take the rows as they are. */
#include <stdint.h>
#include <string.h>

#include "npyops.h"
#include "search_common.h"

#if defined(__aarch64__)
#define MULADD(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define MULADD(a, b, c) ((a) * (b) + (c))
#endif

#if defined(__AVX__) && !defined(DS4MLX_PORTABLE)
#include <immintrin.h>
#define KQ8_AVX 1
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
/* float64 lanes 4 at a time (two vectors for 8 lanes): GCC turns 64-byte generic vectors without
 * AVX-512 into scalar code */
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));

static inline v8 vmuladd8(v8 a, v8 b, v8 c) {
#if defined(__aarch64__)
    v8 r;
    for (int i = 0; i < 8; i++) r[i] = MULADD(a[i], b[i], c[i]);
    return r;
#else
    return a * b + c;
#endif
}

static inline v8 sel8(v8i m, v8 a, v8 b) { return (v8)((m & (v8i)a) | (~m & (v8i)b)); }
static inline v4d seld(v4l m, v4d a, v4d b) { return (v4d)((m & (v4l)a) | (~m & (v4l)b)); }
static inline v4d splatd(double v) { return (v4d){v, v, v, v}; }
static inline v8 splat8(float v) { return (v8){v, v, v, v, v, v, v, v}; }
/* 8 floats to float64 (two halves of 4) and back */
static inline void to_d(v8 v, v4d out[2]) {
    v4 h[2];
    memcpy(h, &v, sizeof v);
    out[0] = __builtin_convertvector(h[0], v4d), out[1] = __builtin_convertvector(h[1], v4d);
}
static inline v8 to_f(const v4d v[2]) {
    const v4 h[2] = {__builtin_convertvector(v[0], v4), __builtin_convertvector(v[1], v4)};
    v8 r;
    memcpy(&r, h, sizeof r);
    return r;
}
static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline int any_l(v4l m) { /* whether a lane is set */
    int64_t any = 0;
    for (int i = 0; i < 4; i++) any |= m[i];
    return any != 0;
}

#if defined(KQ8_AVX)
/* one instruction each where AVX has them: rint (to nearest even, -0 kept, NaN quiet), floor,
 * sqrt, and np.clip(q, 0, nmax) as max(0, q) then min(nmax, q) (x86 max/min return the second
 * operand when either is NaN and on equal operands, so NaN and -0 pass through as in numpy) */
static inline v8 v8_rint(v8 v) { return (v8)_mm256_round_ps((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline v8 v8_floor(v8 v) { return (v8)_mm256_round_ps((__m256)v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
static inline v8 v8_sqrt(v8 v) { return (v8)_mm256_sqrt_ps((__m256)v); }
static inline v8 v8_clip(v8 q, float nmax) {
    return (v8)_mm256_min_ps((__m256)splat8(nmax), _mm256_max_ps(_mm256_setzero_ps(), (__m256)q));
}
static inline v8 v8_clip_top(v8 q, float nmax) { return (v8)_mm256_min_ps((__m256)splat8(nmax), (__m256)q); }
/* a < b ? a : b and a > b ? a : b, as minps / maxps are defined */
static inline v8 v8_min(v8 a, v8 b) { return (v8)_mm256_min_ps((__m256)a, (__m256)b); }
static inline v8 v8_max(v8 a, v8 b) { return (v8)_mm256_max_ps((__m256)a, (__m256)b); }
#else
static inline v8 v8_rint(v8 v) { /* rint_f, 8 lanes */
    const v8i bits = (v8i)v, sign = bits & (v8i)splat8(-0.0f);
    const v8 a = (v8)(bits ^ sign);
    const v8i small = a < 0x1p23f;
    const v8 r = (a + 0x1p23f) - 0x1p23f;
    return (v8)((((v8i)r & small) | ((v8i)a & ~small)) | sign);
}
static inline v8 v8_floor(v8 v) { /* floor_f, 8 lanes */
    const v8 t = v8_rint(v);
    return t - (v8)((v8i)splat8(1.0f) & (t > v));
}
static inline v8 v8_sqrt(v8 v) {
    for (int i = 0; i < 8; i++) v[i] = __builtin_sqrtf(v[i]);
    return v;
}
static inline v8 v8_clip(v8 q, float nmax) { /* np.clip(q, 0, nmax): -0 and NaN pass through */
    q = (v8)((v8i)q & ~(q < 0.0f));
    return sel8(q > nmax, splat8(nmax), q);
}
static inline v8 v8_clip_top(v8 q, float nmax) { return sel8(q > nmax, splat8(nmax), q); }
static inline v8 v8_min(v8 a, v8 b) { return sel8(a < b, a, b); }
static inline v8 v8_max(v8 a, v8 b) { return sel8(a > b, a, b); }
#endif

/* v8_clip where no lane is below 0 (a no-op there, also on -0 and NaN) */

/* 8 x 8 transpose: m[i][j] -> m[j][i] (unpack pairs of rows, then pairs of pairs, then halves) */
static inline void transpose8(v8 m[8]) {
#if defined(__clang__) || __GNUC__ >= 12
    v8 t[8], s[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shufflevector(m[i], m[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = __builtin_shufflevector(m[i], m[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4)
        for (int h = 0; h < 2; h++) {
            s[i + 2 * h] = __builtin_shufflevector(t[i + h], t[i + 2 + h], 0, 1, 8, 9, 4, 5, 12, 13);
            s[i + 2 * h + 1] = __builtin_shufflevector(t[i + h], t[i + 2 + h], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int j = 0; j < 4; j++) {
        m[j] = __builtin_shufflevector(s[j], s[4 + j], 0, 1, 2, 3, 8, 9, 10, 11);
        m[4 + j] = __builtin_shufflevector(s[j], s[4 + j], 4, 5, 6, 7, 12, 13, 14, 15);
    }
#else
    for (int i = 0; i < 8; i++)
        for (int j = i + 1; j < 8; j++) {
            const float t = m[i][j];
            m[i][j] = m[j][i], m[j][i] = t;
        }
#endif
}

/* rows r = 0..7 of n floats (n a multiple of 8) at src + n·r -> lanes: out[k][r] = src[n·r + k] */
static inline void rows_to_lanes8(const float *src, int n, v8 *out) {
    for (int k0 = 0; k0 < n; k0 += 8) {
        v8 m[8];
        for (int r = 0; r < 8; r++) m[r] = load8(src + n * r + k0);
        transpose8(m);
        memcpy(out + k0, m, sizeof m);
    }
}

/* numpy's float32 einsum Σ a[k]·b[k] of 8 rows side by side, a, b [n][8] (n a multiple of 16):
 * its 4 float lanes (lane i holds elements k + i, k + 4 + i, ...; each step adds elements
 * k + 12 + i, k + 8 + i, k + 4 + i, k + i in that order) as 4 accumulator vectors, then
 * (l0 + l1) + (l2 + l3) */
static inline v8 dot8(const v8 *a, const v8 *b, int n) {
    v8 acc[4] = {0};
    for (int k = 0; k < n; k += 16)
        for (int e = 12; e >= 0; e -= 4)
            for (int i = 0; i < 4; i++) acc[i] = vmuladd8(a[k + e + i], b[k + e + i], acc[i]);
    return 0.0f + ((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

/* the three einsum sums Σ q·w, Σ q·wx, Σ q²·w (in dot8's order) of the codes of the search
 * (polish = 0: q = clip(rint(a·v))) or of a polishing round (polish = 1: q = clip(rint((v − a) / b))),
 * computed on the way rather than stored: the sums are the only use of a candidate's codes;
 * nonneg: no lane's rint is below 0 (the clip at 0 is a no-op) */
static inline __attribute__((always_inline)) void code_sums8(int polish, int nonneg, const v8 *v, v8 a, v8 b,
                                                             const v8 *w, const v8 *wx, int n, float nmax, v4d sl[2],
                                                             v4d sxl[2], v4d sl2[2]) {
    v8 a_l[4], a_xl[4], a_l2[4];
    /* two of the 4 einsum lanes at a time: 6 accumulators stay in registers (12 did not) */
    for (int i0 = 0; i0 < 4; i0 += 2) {
        v8 l[2] = {0}, xl[2] = {0}, l2[2] = {0};
        for (int k = 0; k < n; k += 16)
            for (int e = 12; e >= 0; e -= 4)
                for (int i = 0; i < 2; i++) {
                    const int j = k + e + i0 + i;
                    const v8 r = v8_rint(polish ? (v[j] - a) / b : a * v[j]);
                    const v8 q = nonneg ? v8_clip_top(r, nmax) : v8_clip(r, nmax);
                    l[i] = vmuladd8(q, w[j], l[i]);
                    xl[i] = vmuladd8(q, wx[j], xl[i]);
                    l2[i] = vmuladd8(q * q, w[j], l2[i]);
                }
        for (int i = 0; i < 2; i++) a_l[i0 + i] = l[i], a_xl[i0 + i] = xl[i], a_l2[i0 + i] = l2[i];
    }
    to_d(0.0f + ((a_l[0] + a_l[1]) + (a_l[2] + a_l[3])), sl);
    to_d(0.0f + ((a_xl[0] + a_xl[1]) + (a_xl[2] + a_xl[3])), sxl);
    to_d(0.0f + ((a_l2[0] + a_l2[1]) + (a_l2[2] + a_l2[3])), sl2);
}

static inline v4d lsq_err(v4d scale, v4d b, v4d sl, v4d sxl, v4d sl2, v4d sw, v4d sx) {
    return scale * scale * sl2 + b * b * sw + 2 * scale * b * sl - 2 * scale * sxl - 2 * b * sx;
}

/* the weighted least-squares (scale, b) of the codes and its error Σ w (scale·q + b − x)² − Σ w x²,
 * lane by lane, term by term numpy's float64 algebra (b > 0 refits the scale alone with b = 0:
 * rare, a sub-block with a positive minimum, so that division only when a lane needs it;
 * np.maximum(scale, 0) turns -0 into +0 and keeps NaN) */
static inline void lsq(v4d sl, v4d sxl, v4d sl2, v4d sw, v4d sx, v4d *scale_out, v4d *b_out, v4d *err_out) {
    const v4d zero = splatd(0.0), one = splatd(1.0);
    const v4d det = sw * sl2 - sl * sl;
    const v4l ok = det > 0;
    const v4d safe = seld(ok, det, one);
    v4d scale = seld(ok, (sw * sxl - sx * sl) / safe, zero);
    v4d b = seld(ok, (sl2 * sx - sl * sxl) / safe, zero);
    const v4l pos = b > 0;
    if (any_l(pos)) {
        const v4l l2 = sl2 > 0;
        scale = seld(pos, seld(l2, sxl / seld(l2, sl2, one), zero), scale);
        b = seld(pos, zero, b);
    }
    scale = seld(scale <= 0, zero, scale); /* !(scale > 0) && !isnan(scale) */
    *scale_out = scale;
    *b_out = b;
    *err_out = lsq_err(scale, b, sl, sxl, sl2, sw, sx);
}

/* numpy's pairwise sum (npyops.h) of 8 rows (n a multiple of 8, 8..128): in float32, and in
 * float64 of float32 values */
static inline v8 pairwise8f(const v8 *a, int n) {
    v8 r[8];
    for (int j = 0; j < 8; j++) r[j] = a[j];
    for (int i = 8; i < n; i += 8)
        for (int j = 0; j < 8; j++) r[j] += a[i + j];
    return 0.0f + (((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])));
}
static inline void pairwise8(const v8 *a, int n, v4d out[2]) {
    v4d r[8][2];
    for (int j = 0; j < 8; j++) to_d(a[j], r[j]);
    for (int i = 8; i < n; i += 8)
        for (int j = 0; j < 8; j++) {
            v4d t[2];
            to_d(a[i + j], t);
            r[j][0] += t[0], r[j][1] += t[1];
        }
    for (int h = 0; h < 2; h++)
        out[h] = 0.0 + (((r[0][h] + r[1][h]) + (r[2][h] + r[3][h])) + ((r[4][h] + r[5][h]) + (r[6][h] + r[7][h])));
}

/* common.fit_scale_min of KQ_FIT groups of 8 sub-blocks in lanes, group u: x, w, wx = w·x [n] at
 * x + n·u, w + n·u, wx + n·u (n a multiple of 16, at most 32), and the row sums swr[u] = Σ w,
 * sxr[u] = Σ w·x (pairwise, float64); steps [n_steps] the inverse-scale numerators, the plain
 * min/max candidate's (nmax) first. Groups side by side: the dependent chains of one group's
 * least-squares fits and polishing rounds overlap the others' (2 groups: clang +5 %, 4: +1-2 %
 * more, GCC +4 %, measured on an AVX2 EPYC). */
#define KQ_FIT 4
static void fit_lanes8(const v8 *x, const v8 *w, const v8 *wx, const v4d swr[KQ_FIT][2], const v4d sxr[KQ_FIT][2],
                       int32_t n, float nmax, const double *steps, int32_t n_steps, int32_t refine,
                       v8 scale_out[KQ_FIT], v8 m_out[KQ_FIT]) {
    v8 dx[KQ_FIT][32], l[KQ_FIT], sp[KQ_FIT];
    v8i flat[KQ_FIT];
    v4d spd[KQ_FIT][2];
    int any_nan[KQ_FIT];
    for (int u = 0; u < KQ_FIT; u++) {
        const v8 *xu = x + n * u;
        v8 mn = xu[0], mx = xu[0];
        for (int k = 0; k < n; k++) mn = v8_min(xu[k], mn), mx = v8_max(xu[k], mx);
        l[u] = v8_min(mn, splat8(0.0f));
        const v8 span = mx - l[u];
        flat[u] = span <= 0;
        sp[u] = sel8(flat[u], splat8(1.0f), span);
        to_d(sp[u], spd[u]);
        for (int k = 0; k < n; k++) dx[u][k] = xu[k] - l[u];
        /* x − l ≥ 0 (or NaN) unless a lane's minimum is NaN (its first value: NaN is never less) */
        const v8i mn_nan = mn != mn;
        any_nan[u] = 0;
        for (int r = 0; r < 8; r++) any_nan[u] |= mn_nan[r];
    }
    v4d sl[KQ_FIT][2], sxl[KQ_FIT][2], sl2[KQ_FIT][2], sl0[KQ_FIT][2], sxl0[KQ_FIT][2], sl20[KQ_FIT][2];
    v4d best_scale[KQ_FIT][2], best_b[KQ_FIT][2], best_err[KQ_FIT][2];
    memset(best_scale, 0, sizeof best_scale), memset(best_b, 0, sizeof best_b); /* (set by candidate 0) */
    memset(best_err, 0, sizeof best_err);
    for (int32_t c = 0; c < n_steps; c++)
        for (int u = 0; u < KQ_FIT; u++) {
            if (c > 0 && steps[c] == steps[0]) { /* the same codes as candidate 0 */
                for (int h = 0; h < 2; h++) sl[u][h] = sl0[u][h], sxl[u][h] = sxl0[u][h], sl2[u][h] = sl20[u][h];
            } else {
                const v4d isd[2] = {splatd(steps[c]) / spd[u][0], splatd(steps[c]) / spd[u][1]};
                const v8 is = to_f(isd);
                if (!any_nan[u] && steps[c] > 0) /* is > 0 or NaN: is·(x − l) ≥ 0 or NaN */
                    code_sums8(0, 1, dx[u], is, is, w + n * u, wx + n * u, n, nmax, sl[u], sxl[u], sl2[u]);
                else
                    code_sums8(0, 0, dx[u], is, is, w + n * u, wx + n * u, n, nmax, sl[u], sxl[u], sl2[u]);
            }
            if (c == 0) {
                to_d(sp[u] / nmax, best_scale[u]);
                to_d(l[u], best_b[u]);
                for (int h = 0; h < 2; h++) {
                    sl0[u][h] = sl[u][h], sxl0[u][h] = sxl[u][h], sl20[u][h] = sl2[u][h];
                    best_err[u][h] = lsq_err(best_scale[u][h], best_b[u][h], sl[u][h], sxl[u][h], sl2[u][h], swr[u][h],
                                             sxr[u][h]);
                }
                continue;
            }
            for (int h = 0; h < 2; h++) {
                v4d scale, b, err;
                lsq(sl[u][h], sxl[u][h], sl2[u][h], swr[u][h], sxr[u][h], &scale, &b, &err);
                /* less(err, best_err): the first NaN wins */
                const v4l take = (best_err[u][h] == best_err[u][h]) & ((err < best_err[u][h]) | (err != err));
                best_scale[u][h] = seld(take, scale, best_scale[u][h]);
                best_b[u][h] = seld(take, b, best_b[u][h]);
                best_err[u][h] = seld(take, err, best_err[u][h]);
            }
        }
    /* Polish: a round that does not improve leaves a lane's winner as it was, so every later
     * round would repeat it: the lane stops there (the same result as running them all), as
     * it does at a zero scale; a group stops once all its lanes have. */
    v4l active[KQ_FIT][2];
    for (int u = 0; u < KQ_FIT; u++)
        for (int h = 0; h < 2; h++) active[u][h] = best_scale[u][h] > 0;
    for (int32_t i = 0; i < refine; i++) {
        int any[KQ_FIT], any_group = 0;
        for (int u = 0; u < KQ_FIT; u++) {
            for (int h = 0; h < 2; h++) active[u][h] &= best_scale[u][h] > 0;
            any[u] = any_l(active[u][0] | active[u][1]);
            any_group |= any[u];
        }
        if (!any_group) break;
        for (int u = 0; u < KQ_FIT; u++) {
            if (!any[u]) continue;
            const v8 safe = to_f(best_scale[u]), bf = to_f(best_b[u]);
            code_sums8(1, 0, x + n * u, bf, safe, w + n * u, wx + n * u, n, nmax, sl[u], sxl[u], sl2[u]);
            for (int h = 0; h < 2; h++) {
                v4d scale, b, err;
                lsq(sl[u][h], sxl[u][h], sl2[u][h], swr[u][h], sxr[u][h], &scale, &b, &err);
                const v4l take = active[u][h] & (err < best_err[u][h]);
                best_scale[u][h] = seld(take, scale, best_scale[u][h]);
                best_b[u][h] = seld(take, b, best_b[u][h]);
                best_err[u][h] = seld(take, err, best_err[u][h]);
                active[u][h] = take;
            }
        }
    }
    for (int u = 0; u < KQ_FIT; u++) {
        const v4d nb[2] = {-best_b[u][0], -best_b[u][1]};
        scale_out[u] = sel8(flat[u], splat8(0.0f), to_f(best_scale[u]));
        m_out[u] = sel8(flat[u], -l[u], to_f(nb));
    }
}

/* round_half_away (search_common.h), 8 lanes */
static inline v8 v8_round_half_away(v8 v) {
    const v8 sign = sel8(v > 0, splat8(1.0f), sel8(v < 0, splat8(-1.0f), sel8(v == 0, splat8(0.0f), v)));
    return sign * v8_floor((v8)((v8i)v & ~(v8i)splat8(-0.0f)) + 0.5f);
}

/* requantize_codes' m and inv for (d, dmin) and 8 sub-blocks' levels ls, lm */
static inline void code_steps8(float d, float dmin, v8 ls, v8 lm, v8 *mm, v8 *inv) {
    const v8 sc = d * ls;
    *mm = dmin * lm;
    *inv = sel8(sc > 0, 1.0f / sc, splat8(0.0f));
}

/* common.requantize_codes: clip(floor((x + m)·inv + 0.5), 0, nmax) of 8 values of a sub-block
 * (NaN: 0, as numpy's uint8 conversion here) */
static inline v8i code8(const float *x, float m, float inv, float nmax) {
    const v8 t = v8_clip(v8_floor((load8(x) + m) * inv + 0.5f), nmax);
    return __builtin_convertvector((v8)((v8i)t & (t == t)), v8i);
}

/* the codes of one block (rows x[256]; m, inv per sub-block) packed as q4_k (kind 4) or q2_k
 * (their bytes 16..143 / 16..79: see search_common.h) */
typedef uint8_t v8u8 __attribute__((vector_size(8)));
static inline void pack_codes8(int kind, const float *x, const float *m, const float *inv, uint8_t *o) {
    for (int c = 0; c < (kind == 4 ? 4 : 2); c++)
        for (int l = 0; l < 32; l += 8) {
            v8i b;
            if (kind == 4) {
                const int e = 64 * c + l, j = e / 32;
                b = code8(x + e, m[j], inv[j], 15.0f) | (code8(x + e + 32, m[j + 1], inv[j + 1], 15.0f) << 4);
            } else {
                b = (v8i){0};
                for (int s = 0; s < 4; s++) {
                    const int e = 128 * c + 32 * s + l, j = e / 16;
                    b |= code8(x + e, m[j], inv[j], 3.0f) << (2 * s);
                }
            }
            const v8u8 bytes = __builtin_convertvector(b, v8u8);
            memcpy(o + 16 + 32 * c + l, &bytes, sizeof bytes);
        }
}

/* pairwise_f32 of x[0..127]², 8 at a time (the same 8 accumulators) */
static inline float sum_sq128_8(const float *x) {
    v8 r = load8(x);
    r = r * r;
    for (int i = 8; i < 128; i += 8) {
        const v8 v = load8(x + i);
        r += v * v;
    }
    return 0.0f + (((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])));
}

#define KQ_BATCH 16 /* blocks whose Σ w x² chains run side by side (one lane each, two vectors: the
                      * latency of 256 dependent additions, once per 16 blocks rather than 8) */

/* xb [n_blocks][256] and optional importance qw (same shape) -> Q4_K (kind 4: sub-blocks of 32,
 * codes 0..15, 6-bit levels) or Q2_K (kind 2: 16, 0..3, 4-bit) blocks in out. */
void kquant_quantize(const float *xb, const float *qw, int64_t n_blocks, int32_t kind,
                     const double *steps, int32_t n_steps, int32_t refine, float sigma_factor,
                     uint8_t *out) {
    const int32_t sub = kind == 4 ? 32 : 16, subs = 256 / sub, nmax_i = kind == 4 ? 15 : 3;
    const int groups = subs / 8, pair = KQ_FIT / groups; /* groups of 8 sub-blocks (one per lane) a block */
    const float nmax = (float)nmax_i, lmax = kind == 4 ? 63.0f : 15.0f;
    const int64_t block_bytes = kind == 4 ? 144 : 84;
    /* per block of the batch: the levels, super-scales, per sub-block sums of
     * common._refit_sums, and w·x² in lanes (for Σ w x²) */
    float d_b[KQ_BATCH], dmin_b[KQ_BATCH], ls_b[KQ_BATCH][16], lm_b[KQ_BATCH][16];
    double s_q[KQ_BATCH][16], s_qq[KQ_BATCH][16], s_qx[KQ_BATCH][16], s_w[KQ_BATCH][16], s_x[KQ_BATCH][16];
    v8 wxx[KQ_BATCH][32];
    for (int64_t b0 = 0; b0 < n_blocks; b0 += KQ_BATCH) {
        const int nb = n_blocks - b0 < KQ_BATCH ? (int)(n_blocks - b0) : KQ_BATCH;
        /* KQ_FIT groups at a time (see fit_lanes8): Q4_K blocks have one, Q2_K blocks two */
        for (int i0 = 0; i0 < nb; i0 += pair) {
            v8 xs[32 * KQ_FIT], ws[32 * KQ_FIT], wxs[32 * KQ_FIT];
            for (int p = 0; p < pair; p++) {
                const int i = i0 + p;
                v8 *x = xs + 32 * p, *w = ws + 32 * p, *wx = wxs + 32 * p;
                if (i >= nb) { /* past the last block: zeros */
                    memset(x, 0, sizeof(v8) * 32), memset(w, 0, sizeof(v8) * 32), memset(wx, 0, sizeof(v8) * 32);
                    continue;
                }
                const float *xr = xb + 256 * (b0 + i);
                if (b0 + i + 2 < n_blocks) /* the block after next (1 KB, and its importance): from memory */
                    for (int c = 0; c < 1024; c += 64) {
                        __builtin_prefetch((const char *)(xr + 512) + c);
                        if (qw != NULL) __builtin_prefetch((const char *)(qw + 256 * (b0 + i) + 512) + c);
                    }
                for (int g = 0; g < groups; g++) rows_to_lanes8(xr + 8 * sub * g, sub, x + sub * g);
                if (qw != NULL) { /* common.importance_weights: qw·sqrt(f·mean(x²) + x²), mean per block */
                    v8 qv[32];
                    for (int g = 0; g < groups; g++)
                        rows_to_lanes8(qw + 256 * (b0 + i) + 8 * sub * g, sub, qv + sub * g);
                    const float mean = (0.0f + (sum_sq128_8(xr) + sum_sq128_8(xr + 128))) / 256.0f;
                    const v8 s2 = splat8(sigma_factor == 1.0f ? mean : sigma_factor * mean);
                    for (int k = 0; k < 32; k++) w[k] = qv[k] * v8_sqrt(s2 + x[k] * x[k]);
                } else { /* common.kquant_weights without importance: sqrt(mean(x²)) + |x| per sub-block */
                    for (int g = 0; g < groups; g++) {
                        v8 sq[32];
                        for (int k = 0; k < sub; k++) sq[k] = x[sub * g + k] * x[sub * g + k];
                        v4d ms[2];
                        to_d(pairwise8f(sq, sub), ms);
                        const v4d mean[2] = {ms[0] / (double)sub, ms[1] / (double)sub};
                        const v8 root = v8_sqrt(to_f(mean));
                        for (int k = 0; k < sub; k++)
                            w[sub * g + k] = root + (v8)((v8i)x[sub * g + k] & ~(v8i)splat8(-0.0f));
                    }
                }
                for (int k = 0; k < 32; k++) wx[k] = w[k] * x[k];
            }
            v4d swr_u[KQ_FIT][2], sxr_u[KQ_FIT][2];
            v8 scale_u[KQ_FIT], m_u[KQ_FIT];
            for (int u = 0; u < KQ_FIT; u++)
                pairwise8(ws + sub * u, sub, swr_u[u]), pairwise8(wxs + sub * u, sub, sxr_u[u]);
            fit_lanes8(xs, ws, wxs, (const v4d(*)[2])swr_u, (const v4d(*)[2])sxr_u, sub, nmax, steps, n_steps, refine,
                       scale_u, m_u);
            /* sub-block levels against the fp16 super-scales (the blocks' short dependent chains
             * side by side), then the first codes */
            v8 mm_u[KQ_FIT], inv_u[KQ_FIT];
            for (int p = 0; p < pair && i0 + p < nb; p++) {
                const int i = i0 + p;
                const v8 *scale_v = scale_u + groups * p, *m_v = m_u + groups * p;
                const float d = f16_to_f32(f32_to_f16(max_nan((const float *)scale_v, subs) / lmax));
                const float dmin = f16_to_f32(f32_to_f16(max_nan((const float *)m_v, subs) / lmax));
                const float dsafe = d > 0 ? d : 1.0f, msafe = dmin > 0 ? dmin : 1.0f;
                v8 ls[2], lm[2];
                for (int g = 0; g < groups; g++) {
                    ls[g] = v8_clip(v8_round_half_away(scale_v[g] / dsafe), lmax);
                    lm[g] = v8_clip(v8_round_half_away(m_v[g] / msafe), lmax);
                    code_steps8(d, dmin, ls[g], lm[g], &mm_u[groups * p + g], &inv_u[groups * p + g]);
                }
                memcpy(ls_b[i], ls, sizeof(float) * subs);
                memcpy(lm_b[i], lm, sizeof(float) * subs);
                d_b[i] = d, dmin_b[i] = dmin;
            }
            for (int p = 0; p < pair && i0 + p < nb; p++) {
                const int i = i0 + p;
                const v8 *x = xs + 32 * p, *w = ws + 32 * p, *wx = wxs + 32 * p;
                const v4d(*swr)[2] = swr_u + groups * p;
                /* the first codes as common.requantize_codes makes them and the uint8 -> float32 of
                 * _refit_sums (NaN: 0, -0: +0), then its per sub-block sums */
                for (int g = 0; g < groups; g++) {
                    const v8 mv = mm_u[groups * p + g], iv = inv_u[groups * p + g];
                    const v8 *xg = x + sub * g, *wg = w + sub * g;
                    v8 q[32], wq[32];
                    for (int k = 0; k < sub; k++) {
                        const v8 t = v8_clip(v8_floor((xg[k] + mv) * iv + 0.5f), nmax);
                        q[k] = (v8)((v8i)t & (t == t)) + 0.0f;
                        wq[k] = wg[k] * q[k];
                        wxx[i][sub * g + k] = wx[sub * g + k] * xg[k];
                    }
                    v4d v_q[2], v_qq[2], v_qx[2], v_x[2];
                    pairwise8(wq, sub, v_q);
                    to_d(dot8(wq, q, sub), v_qq), to_d(dot8(wq, xg, sub), v_qx), to_d(dot8(wg, xg, sub), v_x);
                    memcpy(s_q[i] + 8 * g, v_q, sizeof v_q), memcpy(s_qq[i] + 8 * g, v_qq, sizeof v_qq);
                    memcpy(s_qx[i] + 8 * g, v_qx, sizeof v_qx), memcpy(s_w[i] + 8 * g, swr[g], sizeof swr[g]);
                    memcpy(s_x[i] + 8 * g, v_x, sizeof v_x);
                }
            }
        }
        /* Σ w x² per block: numpy's three-operand einsum, one float32 accumulator element after
         * element, a chain of 256 dependent additions; the blocks' chains run side by side, one
         * lane each (8 x 8 transposes of the lanes of 8 blocks: element k of sub-block 8g + r
         * of every block, in element order) */
        for (int i = nb; i < KQ_BATCH; i++) memset(wxx[i], 0, sizeof wxx[i]);
        v8 elems[KQ_BATCH / 8][256];
        for (int h = 0; h < KQ_BATCH / 8; h++)
            for (int g = 0; g < groups; g++)
                for (int k = 0; k < sub; k++) {
                    v8 t[8];
                    for (int i = 0; i < 8; i++) t[i] = wxx[8 * h + i][sub * g + k];
                    transpose8(t);
                    for (int r = 0; r < 8; r++) elems[h][(8 * g + r) * sub + k] = t[r];
                }
        v8 acc[KQ_BATCH / 8] = {0};
        for (int e = 0; e < 256; e++)
            for (int h = 0; h < KQ_BATCH / 8; h++) acc[h] += elems[h][e];
        for (int i = 0; i < nb; i++) { /* super-scale refit, final codes, packing */
            const float *ls = ls_b[i], *lm = lm_b[i];
            uint8_t *o = out + block_bytes * (b0 + i);
            float d = d_b[i], dmin = dmin_b[i];
            refit_super_scales(ls, lm, subs, s_q[i], s_qq[i], s_qx[i], s_w[i], s_x[i], 0.0f + acc[i / 8][i % 8], &d,
                               &dmin);
            v8 mm[2], inv[2];
            for (int g = 0; g < groups; g++)
                code_steps8(d, dmin, load8(ls + 8 * g), load8(lm + 8 * g), &mm[g], &inv[g]);
            pack_codes8(kind, xb + 256 * (b0 + i), (const float *)mm, (const float *)inv, o);
            kquant_pack_scales(kind, ls, lm, f32_to_f16(d), f32_to_f16(dmin), o);
        }
    }
}

/* The K-quant recipe of common.kquant_fit (Q4_K, Q2_K) and its packing, in C: per sub-block a
 * (scale, min) search over candidate inverse scales (round the codes, fit (scale, b) by weighted
 * least squares, keep the lowest error, polish the winner by re-rounding), the sub-block levels
 * against fp16 super-scales, and the super-scale refit.
 *
 * It must give the numpy path's bits, so every operation is the one numpy performs:
 *  - the float32 sums Σ q·w, Σ q·wx, Σ q²·w are numpy's einsum inner loop (4 float lanes, 16
 *    elements per step, lane sums (l0 + l1) + (l2 + l3)); it multiplies and adds separately on
 *    x86 (SSE baseline; arm64 fuses them: kquant_search8.h);
 *  - the per-row algebra is float64, term by term in numpy's order (built with
 *    -ffp-contract=off, so nothing else is fused);
 *  - np.clip keeps -0 and NaN, np.maximum(s, 0) turns -0 into +0, argmin takes the first
 *    minimum (or the first NaN).
 * native.load_checked compares it with the numpy path on random rows before first use.
 *
 * Sub-blocks run KQ_W at a time, one per lane of KQ_W-float vectors (GCC/Clang vector
 * extensions with AVX-512 intrinsics; -DDS4MLX_PORTABLE: the same lanes in plain C). Built only
 * where the compiler targets AVX-512; elsewhere kquant_search8.h (8 sub-blocks a vector). Each
 * lane performs numpy's operations for its sub-block in numpy's order, so each gets numpy's
 * bits, while the sub-blocks' dependency chains (sums, divisions, the candidate choice) run side
 * by side. A group of KQ_W sub-blocks is two Q4_K blocks or one Q2_K block; everything per
 * sub-block (weights, search, codes, refit sums) runs in that layout, v[k] holding element k of
 * every sub-block, two groups side by side in the search (fit_groups). The per-block steps run
 * KQ_BATCH blocks at a time, one block per lane (Σ w x², the super-scale refit:
 * kquant_blocks16.h); the final codes are packed from the rows, 16 at a time. Measured against
 * one group at a time with the codes stored and Σ w x² lane by lane in scalar code: 1.5x
 * (Q4_K) and 1.4x (Q2_K) the speed on an AVX-512 EPYC with clang 16. */
#if !defined(__AVX512F__)
#include "kquant_search8.h"
#else
#include <stdint.h>
#include <string.h>

#include "npyops.h"
#include "search_common.h"
#include "transpose.h"
#include "lanes.h"

#if !defined(DS4MLX_PORTABLE)
#include <immintrin.h>
#define KQ_AVX 1 /* (AVX-512 here) */
#endif

#define KQ_W 16
typedef float vf __attribute__((vector_size(4 * KQ_W)));
typedef int32_t vi __attribute__((vector_size(4 * KQ_W)));
/* float64 lanes 8 at a time (one AVX-512 register): wider generic vectors compile to poor code */
typedef double vd __attribute__((vector_size(64)));
typedef int64_t vl __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));


static inline vf splat(float v) {
    vf r;
    for (int i = 0; i < KQ_W; i++) r[i] = v;
    return r;
}
static inline vd splatd(double v) {
    vd r;
    for (int i = 0; i < 8; i++) r[i] = v;
    return r;
}
#if defined(KQ_AVX) && defined(__AVX512DQ__) && defined(__clang__)
/* a blend by the lanes' sign bits, which clang takes from the comparison's mask register (+5 %,
 * measured; GCC 12 builds the vector and converts it: 9 % slower than sel_f's and / or) */
static inline vf sel(vi m, vf a, vf b) {
    return (vf)_mm512_mask_blend_ps(_mm512_movepi32_mask((__m512i)m), (__m512)b, (__m512)a);
}
static inline vd seld(vl m, vd a, vd b) {
    return (vd)_mm512_mask_blend_pd(_mm512_movepi64_mask((__m512i)m), (__m512d)b, (__m512d)a);
}
#else
static inline vf sel(vi m, vf a, vf b) { return sel_f(m, a, b); }
static inline vd seld(vl m, vd a, vd b) { return sel_d(m, a, b); }
#endif
/* lanes 8h .. 8h + 7 of a float vector in float64, and back */
#if defined(KQ_AVX) /* one conversion each (GCC splits the generic ones) */
static inline vd to_d(vf v, int h) {
    return (vd)_mm512_cvtps_pd(h ? _mm256_castpd_ps(_mm512_extractf64x4_pd((__m512d)v, 1)) : _mm512_castps512_ps256((__m512)v));
}
static inline vf to_f(const vd v[2]) {
    return (vf)_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm512_cvtpd_ps((__m512d)v[0]))),
                                  _mm256_castps_pd(_mm512_cvtpd_ps((__m512d)v[1])), 1);
}
#else
static inline vd to_d(vf v, int h) {
    const v8 half = h ? __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)
                      : __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    return __builtin_convertvector(half, vd);
}
static inline vf to_f(const vd v[2]) {
    const v8 a = __builtin_convertvector(v[0], v8), b = __builtin_convertvector(v[1], v8);
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
#endif
static inline int any_l(vl m0, vl m1) { /* whether a lane is set */
    const vl m = m0 | m1;
#if defined(KQ_AVX)
    return _mm512_test_epi64_mask((__m512i)m, (__m512i)m) != 0;
#else
    int64_t any = 0;
    for (int i = 0; i < 8; i++) any |= m[i];
    return any != 0;
#endif
}

static inline int any_i(vi m) { /* whether a lane is set */
#if defined(KQ_AVX)
    return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#else
    int32_t any = 0;
    for (int i = 0; i < KQ_W; i++) any |= m[i];
    return any != 0;
#endif
}

static inline vf vmuladd(vf a, vf b, vf c) { return a * b + c; } /* (not fused: x86's numpy) */

/* rint (to nearest even, -0 kept, NaN quiet), floor, sqrt, and np.clip(q, 0, nmax): one
 * instruction each where AVX has them (np.clip as max(0, q) then min(nmax, q): x86 max/min return
 * the second operand when either is NaN and on equal operands, so NaN and -0 pass through as in
 * numpy), else lane by lane as npyops.h */
#if defined(KQ_AVX)
static inline vf v_rint(vf v) { return (vf)_mm512_roundscale_ps((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf v_floor(vf v) { return (vf)_mm512_roundscale_ps((__m512)v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
static inline vf v_sqrt(vf v) { return (vf)_mm512_sqrt_ps((__m512)v); }
static inline vf v_clip(vf q, float nmax) {
    return (vf)_mm512_min_ps((__m512)splat(nmax), _mm512_max_ps(_mm512_setzero_ps(), (__m512)q));
}
static inline vf v_clip_top(vf q, float nmax) { return (vf)_mm512_min_ps((__m512)splat(nmax), (__m512)q); }
/* a < b ? a : b and a > b ? a : b, as minps / maxps are defined */
static inline vf v_min(vf a, vf b) { return (vf)_mm512_min_ps((__m512)a, (__m512)b); }
static inline vf v_max(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
#else
static inline vf v_rint(vf v) { /* rint_f, lane by lane */
    const vi bits = (vi)v, sign = bits & (vi)splat(-0.0f);
    const vf a = (vf)(bits ^ sign);
    const vi small = f_lt(a, splat(0x1p23f));
    const vf r = (a + 0x1p23f) - 0x1p23f;
    return (vf)((((vi)r & small) | ((vi)a & ~small)) | sign);
}
static inline vf v_floor(vf v) { /* floor_f */
    const vf t = v_rint(v);
    return t - (vf)((vi)splat(1.0f) & f_gt(t, v));
}
static inline vf v_sqrt(vf v) {
    for (int i = 0; i < KQ_W; i++) v[i] = __builtin_sqrtf(v[i]);
    return v;
}
static inline vf v_clip(vf q, float nmax) { /* np.clip(q, 0, nmax): -0 and NaN pass through */
    q = (vf)((vi)q & ~f_lt(q, splat(0.0f)));
    return sel(f_gt(q, splat(nmax)), splat(nmax), q);
}
static inline vf v_clip_top(vf q, float nmax) { return sel(f_gt(q, splat(nmax)), splat(nmax), q); }
static inline vf v_min(vf a, vf b) { return sel(f_lt(a, b), a, b); }
static inline vf v_max(vf a, vf b) { return sel(f_gt(a, b), a, b); }
#endif
/* (v_clip_top: v_clip where no lane is below 0, a no-op there, also on -0 and NaN) */

/* numpy's float32 einsum of row pairs, lane by lane: Σ a[k]·b[k] (4 accumulators, element k + i
 * in accumulator i, 16 elements a step, sums (l0 + l1) + (l2 + l3)) */
static inline vf dot_l(const vf *a, const vf *b, int n) {
    vf acc[4];
    for (int i = 0; i < 4; i++) acc[i] = splat(0.0f);
    for (int k = 0; k < n; k += 16)
        for (int i = 0; i < 4; i++) {
            const int j = k + i;
            acc[i] = vmuladd(a[j], b[j], vmuladd(a[j + 4], b[j + 4],
                     vmuladd(a[j + 8], b[j + 8], vmuladd(a[j + 12], b[j + 12], acc[i]))));
        }
    return 0.0f + ((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

/* the three einsum sums Σ q·w, Σ q·wx, Σ q²·w (the order of dot_l, the three side by side) of
 * the codes of the search (polish = 0: q = clip(rint(a·v))) or of a polishing round (polish = 1:
 * q = clip(rint((v − a) / b))), computed on the way rather than stored: the sums are the only
 * use of a candidate's codes; nonneg: no lane's rint is below 0 (the clip at 0 is a no-op).
 * The 12 accumulators stay in registers. */
static inline __attribute__((always_inline)) void code_sums_of(int polish, int nonneg, const vf *v, vf a, vf b,
                                                               const vf *w, const vf *wx, int n, float nmax,
                                                               vd sl[2], vd sxl[2], vd sl2[2]) {
    vf a_l[4], a_xl[4], a_l2[4];
    for (int i = 0; i < 4; i++) a_l[i] = a_xl[i] = a_l2[i] = splat(0.0f);
    for (int k = 0; k < n; k += 16)
        for (int e = 12; e >= 0; e -= 4) /* numpy's einsum adds elements k + 12 + i first */
            for (int i = 0; i < 4; i++) {
                const int j = k + e + i;
                const vf r = v_rint(polish ? (v[j] - a) / b : a * v[j]);
                const vf q = nonneg ? v_clip_top(r, nmax) : v_clip(r, nmax);
                a_l[i] = vmuladd(q, w[j], a_l[i]);
                a_xl[i] = vmuladd(q, wx[j], a_xl[i]);
                a_l2[i] = vmuladd(q * q, w[j], a_l2[i]);
            }
    const vf l = 0.0f + ((a_l[0] + a_l[1]) + (a_l[2] + a_l[3]));
    const vf xl = 0.0f + ((a_xl[0] + a_xl[1]) + (a_xl[2] + a_xl[3]));
    const vf l2 = 0.0f + ((a_l2[0] + a_l2[1]) + (a_l2[2] + a_l2[3]));
    for (int h = 0; h < 2; h++) sl[h] = to_d(l, h), sxl[h] = to_d(xl, h), sl2[h] = to_d(l2, h);
}

/* numpy's pairwise sum (npyops.h) of n (a multiple of 8, 8..128) floats, lane by lane: in
 * float32, and in float64 of float32 values */
static inline vf pairwise_l(const vf *a, int n) {
    vf r[8];
    for (int j = 0; j < 8; j++) r[j] = a[j];
    for (int i = 8; i < n; i += 8)
        for (int j = 0; j < 8; j++) r[j] += a[i + j];
    return 0.0f + (((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])));
}
static inline vd half_d(const vf *a, int h) { /* to_d(*a, h), converted from memory (no shuffle) */
    v8 v;
    memcpy(&v, (const float *)a + 8 * h, sizeof v);
#if defined(KQ_AVX)
    return (vd)_mm512_cvtps_pd((__m256)v);
#else
    return __builtin_convertvector(v, vd);
#endif
}
static inline void pairwise_ld(const vf *a, int n, vd out[2]) {
    for (int h = 0; h < 2; h++) {
        vd r[8];
        for (int j = 0; j < 8; j++) r[j] = half_d(a + j, h);
        for (int i = 8; i < n; i += 8)
            for (int j = 0; j < 8; j++) r[j] += half_d(a + i + j, h);
        out[h] = 0.0 + (((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])));
    }
}

static inline vd lsq_err(vd scale, vd b, vd sl, vd sxl, vd sl2, vd sw, vd sx) {
    return scale * scale * sl2 + b * b * sw + 2 * scale * b * sl - 2 * scale * sxl - 2 * b * sx;
}

/* the weighted least-squares (scale, b) of the codes, lane by lane, term by term numpy's float64
 * algebra; returns the lanes where b > 0 (lsq_end refits those, and gives the error) */
static inline vl lsq(vd sl, vd sxl, vd sl2, vd sw, vd sx, vd *scale_out, vd *b_out) {
    const vd zero = splatd(0.0), one = splatd(1.0);
    const vd det = sw * sl2 - sl * sl;
    const vl ok = d_gt(det, zero);
    const vd safe = seld(ok, det, one);
    vd scale = seld(ok, (sw * sxl - sx * sl) / safe, zero);
    vd b = seld(ok, (sl2 * sx - sl * sxl) / safe, zero);
    *scale_out = scale;
    *b_out = b;
    return d_gt(b, zero);
}

/* lsq's end: the lanes pos where b > 0 refit the scale alone with b = 0 (rare: a sub-block with
 * a positive minimum, so its division only then, any_pos: whether one of the group has one),
 * np.maximum(scale, 0) turns -0 into +0 and keeps NaN; and the error
 * Σ w (scale·q + b − x)² − Σ w x² */
static inline void lsq_end(vl pos, int any_pos, vd sl, vd sxl, vd sl2, vd sw, vd sx, vd *scale_out, vd *b_out,
                           vd *err_out) {
    const vd zero = splatd(0.0), one = splatd(1.0);
    vd scale = *scale_out, b = *b_out;
    if (any_pos) {
        const vl l2 = d_gt(sl2, zero);
        scale = seld(pos, seld(l2, sxl / seld(l2, sl2, one), zero), scale);
        b = seld(pos, zero, b);
    }
    scale = seld(d_le(scale, zero), zero, scale); /* !(scale > 0) && !isnan(scale) */
    *scale_out = scale;
    *b_out = b;
    *err_out = lsq_err(scale, b, sl, sxl, sl2, sw, sx);
}

/* lsq then lsq_end on both halves of the lanes (any_pos: of all of them) */
static inline void lsq_fit(const vd sl[2], const vd sxl[2], const vd sl2[2], const vd sw[2], const vd sx[2],
                           vd scale[2], vd b[2], vd err[2]) {
    vl pos[2];
    for (int h = 0; h < 2; h++) pos[h] = lsq(sl[h], sxl[h], sl2[h], sw[h], sx[h], &scale[h], &b[h]);
    const int any_pos = any_l(pos[0], pos[1]);
    for (int h = 0; h < 2; h++) lsq_end(pos[h], any_pos, sl[h], sxl[h], sl2[h], sw[h], sx[h], &scale[h], &b[h], &err[h]);
}

/* common.fit_scale_min of KQ_FIT groups of sub-blocks side by side (the dependent chains of one
 * group's least-squares fits and polishing rounds overlap the others'), group u: x[u], w[u]
 * [n] (n a multiple of 16, at most 32), with wx = w·x and the row sums sw = Σ w, sx = Σ w·x
 * (pairwise, float64); steps [n_steps] the inverse-scale numerators, the plain min/max
 * candidate's (nmax) first. */
#define KQ_FIT 2
static void fit_groups(const vf x[KQ_FIT][32], const vf w[KQ_FIT][32], const vf wx[KQ_FIT][32],
                       const vd swr[KQ_FIT][2], const vd sxr[KQ_FIT][2], int n, float nmax, const double *steps,
                       int32_t n_steps, int32_t refine, vf scale_out[KQ_FIT], vf m_out[KQ_FIT]) {
    vf dx[KQ_FIT][32], l[KQ_FIT], sp[KQ_FIT];
    vi flat[KQ_FIT];
    vd spd[KQ_FIT][2];
    int any_nan[KQ_FIT];
    for (int u = 0; u < KQ_FIT; u++) {
        vf mn = x[u][0], mx = x[u][0];
        for (int k = 0; k < n; k++) {
            mn = v_min(x[u][k], mn);
            mx = v_max(x[u][k], mx);
        }
        l[u] = sel(f_lt(mn, splat(0.0f)), mn, splat(0.0f));
        const vf span = mx - l[u];
        flat[u] = f_le(span, splat(0.0f));
        sp[u] = sel(flat[u], splat(1.0f), span);
        spd[u][0] = to_d(sp[u], 0), spd[u][1] = to_d(sp[u], 1);
        for (int k = 0; k < n; k++) dx[u][k] = x[u][k] - l[u];
        /* x − l ≥ 0 (or NaN) unless a lane's minimum is NaN (its first value: NaN is never less) */
        any_nan[u] = any_i(f_ne(mn, mn));
    }
    vd sl[KQ_FIT][2], sxl[KQ_FIT][2], sl2[KQ_FIT][2], sl0[KQ_FIT][2], sxl0[KQ_FIT][2], sl20[KQ_FIT][2];
    vd best_scale[KQ_FIT][2], best_b[KQ_FIT][2], best_err[KQ_FIT][2]; /* (set by candidate 0) */
    for (int32_t c = 0; c < n_steps; c++)
        for (int u = 0; u < KQ_FIT; u++) {
            if (c > 0 && steps[c] == steps[0]) { /* the same codes as candidate 0 */
                for (int h = 0; h < 2; h++) sl[u][h] = sl0[u][h], sxl[u][h] = sxl0[u][h], sl2[u][h] = sl20[u][h];
            } else {
                const vd isd[2] = {splatd(steps[c]) / spd[u][0], splatd(steps[c]) / spd[u][1]};
                const vf is = to_f(isd);
                if (!any_nan[u] && steps[c] > 0) /* is > 0 or NaN: is·(x − l) ≥ 0 or NaN */
                    code_sums_of(0, 1, dx[u], is, is, w[u], wx[u], n, nmax, sl[u], sxl[u], sl2[u]);
                else
                    code_sums_of(0, 0, dx[u], is, is, w[u], wx[u], n, nmax, sl[u], sxl[u], sl2[u]);
            }
            if (c == 0) {
                const vf s0 = sp[u] / nmax;
                for (int h = 0; h < 2; h++) {
                    best_scale[u][h] = to_d(s0, h);
                    best_b[u][h] = to_d(l[u], h);
                    best_err[u][h] = lsq_err(best_scale[u][h], best_b[u][h], sl[u][h], sxl[u][h], sl2[u][h],
                                             swr[u][h], sxr[u][h]);
                    sl0[u][h] = sl[u][h], sxl0[u][h] = sxl[u][h], sl20[u][h] = sl2[u][h];
                }
                continue;
            }
            vd scale[2], b[2], err[2];
            lsq_fit(sl[u], sxl[u], sl2[u], swr[u], sxr[u], scale, b, err);
            for (int h = 0; h < 2; h++) {
                /* less(err, best_err): the first NaN wins */
                const vl take = d_eq(best_err[u][h], best_err[u][h]) &
                                (d_lt(err[h], best_err[u][h]) | d_ne(err[h], err[h]));
                best_scale[u][h] = seld(take, scale[h], best_scale[u][h]);
                best_b[u][h] = seld(take, b[h], best_b[u][h]);
                best_err[u][h] = seld(take, err[h], best_err[u][h]);
            }
        }
    /* Polish: a round that does not improve leaves a lane's winner as it was, so every later
     * round would repeat it: the lane stops there (the same result as running them all), as
     * it does at a zero scale; a group stops once all its lanes have. */
    const vd zero = splatd(0.0);
    vl active[KQ_FIT][2];
    for (int u = 0; u < KQ_FIT; u++)
        for (int h = 0; h < 2; h++) active[u][h] = d_gt(best_scale[u][h], zero);
    for (int32_t i = 0; i < refine; i++) {
        int any[KQ_FIT], any_group = 0;
        for (int u = 0; u < KQ_FIT; u++) {
            for (int h = 0; h < 2; h++) active[u][h] &= d_gt(best_scale[u][h], zero);
            any[u] = any_l(active[u][0], active[u][1]);
            any_group |= any[u];
        }
        if (!any_group) break;
        for (int u = 0; u < KQ_FIT; u++) {
            if (!any[u]) continue;
            const vf safe = to_f(best_scale[u]), bf = to_f(best_b[u]);
            code_sums_of(1, 0, x[u], bf, safe, w[u], wx[u], n, nmax, sl[u], sxl[u], sl2[u]);
            vd scale[2], b[2], err[2];
            lsq_fit(sl[u], sxl[u], sl2[u], swr[u], sxr[u], scale, b, err);
            for (int h = 0; h < 2; h++) {
                const vl take = active[u][h] & d_lt(err[h], best_err[u][h]);
                best_scale[u][h] = seld(take, scale[h], best_scale[u][h]);
                best_b[u][h] = seld(take, b[h], best_b[u][h]);
                best_err[u][h] = seld(take, err[h], best_err[u][h]);
                active[u][h] = take;
            }
        }
    }
    for (int u = 0; u < KQ_FIT; u++) {
        const vd nb[2] = {-best_b[u][0], -best_b[u][1]};
        scale_out[u] = sel(flat[u], splat(0.0f), to_f(best_scale[u]));
        m_out[u] = sel(flat[u], -l[u], to_f(nb));
    }
}

/* ------------------------------------------------------------------------------------------
 * The whole per-block recipe of common.kquant_fit and the packing of q4_k / q2_k, every step the
 * numpy path's operation in its order. */

/* pairwise_f32 of x[0..127]², 8 at a time (the same 8 accumulators) */
static inline float sum_sq128(const float *x) {
    v8 r;
    memcpy(&r, x, sizeof r);
    r = r * r;
    for (int i = 8; i < 128; i += 8) {
        v8 v;
        memcpy(&v, x + i, sizeof v);
        r += v * v;
    }
    return 0.0f + (((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])));
}

/* rows r = 0..KQ_W-1 of n floats at src + n·r -> lanes: out[k][r] */
static inline void to_lanes(const float *src, int n, vf *out) { rows_to_lanes16(src, n, (float *)out); }

/* common.requantize_codes: clip(floor((x + m)·inv + 0.5), 0, nmax) of 16 values of a sub-block
 * (NaN: 0, as numpy's uint8 conversion here) */
static inline vi code16(const float *x, float m, float inv, float nmax) {
    vf v;
    memcpy(&v, x, sizeof v);
    const vf t = v_clip(v_floor((v + m) * inv + 0.5f), nmax);
    return __builtin_convertvector((vf)((vi)t & f_eq(t, t)), vi);
}

/* the codes of one block (rows x[256]; m[stride·j], inv[stride·j] of sub-block j) packed as
 * q4_k (kind 4) or q2_k (their bytes 16..143 / 16..79: see search_common.h), 16 at a time */
typedef uint8_t v16u8 __attribute__((vector_size(16)));
static inline void pack_codes16(int kind, const float *x, const float *m, const float *inv, int stride, uint8_t *o) {
    for (int c = 0; c < (kind == 4 ? 4 : 2); c++)
        for (int l = 0; l < 32; l += 16) {
            vi b;
            if (kind == 4) {
                const int e = 64 * c + l, j = e / 32;
                b = code16(x + e, m[stride * j], inv[stride * j], 15.0f) |
                    (code16(x + e + 32, m[stride * (j + 1)], inv[stride * (j + 1)], 15.0f) << 4);
            } else {
                b = (vi){0};
                for (int s = 0; s < 4; s++) {
                    const int e = 128 * c + 32 * s + l, j = e / 16;
                    b |= code16(x + e, m[stride * j], inv[stride * j], 3.0f) << (2 * s);
                }
            }
            const v16u8 bytes = __builtin_convertvector(b, v16u8);
            memcpy(o + 16 + 32 * c + l, &bytes, sizeof bytes);
        }
}

#define KQ_BATCH 16 /* blocks whose Σ w x² chains (and refits) run side by side */
#include "kquant_blocks16.h"

/* Σ w x² of each block of a batch from w·x² in lanes (wxx[g][k]: element k of the sub-blocks of
 * group g, the first n_groups set): numpy's three-operand einsum, one float32 accumulator element
 * after element, a chain of 256 dependent additions per block; the blocks' chains run side by
 * side, one lane each (AVX-512: the lanes transposed to element e of every block, in element
 * order) */
static void sum_wxx(vf wxx[KQ_BATCH][32], int sub, int n_groups, float acc_out[KQ_BATCH]) {
    const int subs = 256 / sub, bpg = KQ_W / subs;
#if defined(KQ_AVX)
    for (int g = n_groups; g < KQ_BATCH / bpg; g++) memset(wxx[g], 0, sizeof wxx[g]);
    vf el[256]; /* el[e]: element e = sub·j + k (sub-block j) of the batch's blocks, block i in lane i */
    for (int k = 0; k < sub; k++) {
        __m512 m[16];
        if (bpg == 1) { /* Q2_K: group g is block g, lane j its sub-block j */
            for (int g = 0; g < 16; g++) m[g] = (__m512)wxx[g][k];
            transpose16(m);
        } else { /* Q4_K: group g is blocks 2g, 2g + 1, lane 8i + j sub-block j of block 2g + i */
            const __m512i pairs = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
            for (int g = 0; g < 8; g++) m[g] = _mm512_permutexvar_ps(pairs, (__m512)wxx[g][k]); /* pair j */
            transpose8_pairs(m);
        }
        for (int j = 0; j < subs; j++) el[sub * j + k] = (vf)m[j];
    }
    vf acc = splat(0.0f);
    for (int e = 0; e < 256; e++) acc += el[e];
    memcpy(acc_out, &acc, sizeof acc);
#else
    const float *at[KQ_BATCH];
    for (int i = 0; i < KQ_BATCH; i++) {
        acc_out[i] = 0.0f;
        at[i] = (const float *)wxx[i / bpg < n_groups ? i / bpg : 0] + subs * (i % bpg);
    }
    for (int j = 0; j < subs; j++)
        for (int k = 0; k < sub; k++)
            for (int i = 0; i < KQ_BATCH; i++) acc_out[i] += at[i][KQ_W * k + j];
#endif
}

/* xb [n_blocks][256] and optional importance qw (same shape) -> Q4_K (kind 4: sub-blocks of 32,
 * codes 0..15, 6-bit levels) or Q2_K (kind 2: 16, 0..3, 4-bit) blocks in out. */
void kquant_quantize(const float *xb, const float *qw, int64_t n_blocks, int32_t kind,
                     const double *steps, int32_t n_steps, int32_t refine, float sigma_factor,
                     uint8_t *out) {
    const int32_t sub = kind == 4 ? 32 : 16, subs = 256 / sub, nmax_i = kind == 4 ? 15 : 3;
    const int bpg = KQ_W / subs; /* blocks per group */
    const float nmax = (float)nmax_i, lmax = kind == 4 ? 63.0f : 15.0f;
    const int64_t block_bytes = kind == 4 ? 144 : 84;
    kq_batch bt;
    memset(&bt, 0, sizeof bt); /* (lanes past the last block of a batch: any values) */
    vf wxx[KQ_BATCH][32]; /* w·x² per group (at most KQ_BATCH) */
    float pad_x[KQ_W * 32], pad_q[KQ_W * 32];
    for (int64_t b0 = 0; b0 < n_blocks; b0 += KQ_BATCH) {
        const int nb = n_blocks - b0 < KQ_BATCH ? (int)(n_blocks - b0) : KQ_BATCH;
        for (int g0 = 0; g0 * bpg < nb; g0 += KQ_FIT) { /* groups g0.. (see fit_groups) */
            vf xs[KQ_FIT][32], ws[KQ_FIT][32], wxs[KQ_FIT][32];
            vd swr_u[KQ_FIT][2], sxr_u[KQ_FIT][2];
            for (int u = 0; u < KQ_FIT; u++) { /* group g: blocks b0 + bpg·g .. */
                const int g = g0 + u, i0 = g * bpg, in_group = nb - i0 < bpg ? nb - i0 : bpg;
                vf *x = xs[u], *w = ws[u], *wx = wxs[u];
                if (in_group <= 0) { /* past the last block: zeros */
                    memset(x, 0, sizeof xs[u]), memset(w, 0, sizeof ws[u]), memset(wx, 0, sizeof wxs[u]);
                    memset(swr_u[u], 0, sizeof swr_u[u]), memset(sxr_u[u], 0, sizeof sxr_u[u]);
                    continue;
                }
                const float *xg = xb + 256 * (b0 + i0);
                if (b0 + i0 + 2 * bpg <= n_blocks) /* the group after next (and its importance): from memory */
                    for (int c = 0; c < 1024 * bpg; c += 64) {
                        __builtin_prefetch((const char *)(xg + 512 * bpg) + c);
                        if (qw != NULL) __builtin_prefetch((const char *)(qw + 256 * (b0 + i0 + 2 * bpg)) + c);
                    }
                if (in_group < bpg) { /* lanes past the last block: zeros */
                    memset(pad_x, 0, sizeof pad_x);
                    memcpy(pad_x, xg, sizeof(float) * 256 * in_group);
                    xg = pad_x;
                }
                to_lanes(xg, sub, x);
                if (qw != NULL) { /* common.importance_weights: qw·sqrt(f·mean(x²) + x²), mean per block */
                    const float *qg = qw + 256 * (b0 + i0);
                    if (in_group < bpg) {
                        memset(pad_q, 0, sizeof pad_q);
                        memcpy(pad_q, qg, sizeof(float) * 256 * in_group);
                        qg = pad_q;
                    }
                    vf qv[32], s2v;
                    to_lanes(qg, sub, qv);
                    for (int i = 0; i < bpg; i++) {
                        const float *xi = xg + 256 * i;
                        const float mean = (0.0f + (sum_sq128(xi) + sum_sq128(xi + 128))) / 256.0f;
                        const float sigma2 = sigma_factor == 1.0f ? mean : sigma_factor * mean;
                        for (int j = 0; j < subs; j++) s2v[subs * i + j] = sigma2;
                    }
                    for (int k = 0; k < sub; k++) w[k] = qv[k] * v_sqrt(s2v + x[k] * x[k]);
                } else { /* common.kquant_weights without importance: sqrt(mean(x²)) + |x| */
                    vf sq[32];
                    for (int k = 0; k < sub; k++) sq[k] = x[k] * x[k];
                    const vf ms = pairwise_l(sq, sub);
                    const vd mean[2] = {to_d(ms, 0) / (double)sub, to_d(ms, 1) / (double)sub};
                    const vf root = v_sqrt(to_f(mean));
                    for (int k = 0; k < sub; k++) w[k] = root + (vf)((vi)x[k] & ~(vi)splat(-0.0f));
                }
                for (int k = 0; k < sub; k++) wx[k] = w[k] * x[k];
                pairwise_ld(w, sub, swr_u[u]);
                pairwise_ld(wx, sub, sxr_u[u]);
            }
            vf scale_u[KQ_FIT], m_u[KQ_FIT];
            fit_groups((const vf(*)[32])xs, (const vf(*)[32])ws, (const vf(*)[32])wxs, (const vd(*)[2])swr_u,
                       (const vd(*)[2])sxr_u, sub, nmax, steps, n_steps, refine, scale_u, m_u);
            for (int u = 0; u < KQ_FIT; u++) {
                const int g = g0 + u, i0 = g * bpg, in_group = nb - i0 < bpg ? nb - i0 : bpg;
                if (in_group <= 0) break;
                const vf *x = xs[u], *w = ws[u], *wx = wxs[u];
                const vd *swr = swr_u[u];
                vf q[32], wq[32];
                /* sub-block levels against the fp16 super-scales, first codes */
                vf mv, iv;
                group_levels(scale_u[u], m_u[u], subs, i0, lmax, &bt, &mv, &iv);
                /* the codes as common.requantize_codes makes them and the uint8 -> float32 of
                 * _refit_sums (NaN: 0, -0: +0), then its per sub-block sums */
                for (int k = 0; k < sub; k++) {
                    const vf t = v_clip(v_floor((x[k] + mv) * iv + 0.5f), nmax);
                    q[k] = (vf)((vi)t & f_eq(t, t)) + 0.0f;
                    wq[k] = w[k] * q[k];
                    wxx[g][k] = wx[k] * x[k];
                }
                vd s_wq[2], s_qq[2], s_qx[2], s_x[2];
                pairwise_ld(wq, sub, s_wq);
                const vf v_qq = dot_l(wq, q, sub), v_qx = dot_l(wq, x, sub), v_x = dot_l(w, x, sub);
                for (int h = 0; h < 2; h++) s_qq[h] = to_d(v_qq, h), s_qx[h] = to_d(v_qx, h), s_x[h] = to_d(v_x, h);
                for (int i = 0; i < in_group; i++) { /* (lanes subs·i .. of the group) */
                    const size_t at = sizeof(double) * subs * i, size = sizeof(double) * subs;
                    memcpy(bt.s_q[i0 + i], (const char *)s_wq + at, size);
                    memcpy(bt.s_qq[i0 + i], (const char *)s_qq + at, size);
                    memcpy(bt.s_qx[i0 + i], (const char *)s_qx + at, size);
                    memcpy(bt.s_w[i0 + i], (const char *)swr + at, size);
                    memcpy(bt.s_x[i0 + i], (const char *)s_x + at, size);
                }
            }
        }
        float acc[KQ_BATCH];
        sum_wxx(wxx, sub, (nb + bpg - 1) / bpg, acc);
        for (int i = 0; i < KQ_BATCH; i++) bt.s_xx[i] = 0.0f + acc[i];
        refit_batch(&bt, subs);
        for (int i = 0; i < nb; i++) /* final codes, packing */
            pack_codes16(kind, xb + 256 * (b0 + i), bt.mm_t[0] + i, bt.inv_t[0] + i, KQ_BATCH,
                         out + block_bytes * (b0 + i));
        for (int i = 0; i < nb; i++)
            kquant_pack_scales(kind, bt.ls[i], bt.lm[i], f32_to_f16(bt.d[i]), f32_to_f16(bt.dmin[i]),
                               out + block_bytes * (b0 + i));
    }
}
#endif

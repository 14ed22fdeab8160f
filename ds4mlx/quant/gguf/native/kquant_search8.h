/* Without AVX-512: the previous kernel, 8 rows a vector (the 16-lane kernel of kquant_search.c, compiled for
 * AVX2 by GCC, turns its wide generic vectors into scalar code: 0.5-0.6x measured). */
/* The K-quant (scale, min) search of common.fit_scale_min, row by row: for each row x, w [n]
 * (n a multiple of 16) and each candidate inverse scale, round the codes, fit (scale, b) by
 * weighted least squares, keep the lowest error; then polish the winner by re-rounding.
 *
 * It must give the numpy path's bits, so every operation is the one numpy performs:
 *  - the float32 sums Σ q·w, Σ q·wx, Σ q²·w are numpy's einsum inner loop (4 float lanes, 16
 *    elements per step, lane sums (l0 + l1) + (l2 + l3)); it multiplies and adds separately on
 *    x86 (SSE baseline) and fuses them on arm64 (NEON), hence MULADD;
 *  - the per-row algebra is float64, term by term in numpy's order (built with
 *    -ffp-contract=off, so nothing else is fused);
 *  - np.clip keeps -0 and NaN, np.maximum(s, 0) turns -0 into +0, argmin takes the first
 *    minimum (or the first NaN).
 * native.load_checked compares it with the numpy path on random rows before first use. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "npyops.h"
#include "search_common.h"

typedef float v4 __attribute__((vector_size(16)));

#if defined(__aarch64__)
#define MULADD(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define MULADD(a, b, c) ((a) * (b) + (c))
#endif

static inline v4 vmuladd(v4 a, v4 b, v4 c) {
#if defined(__aarch64__)
    v4 r;
    for (int i = 0; i < 4; i++) r[i] = MULADD(a[i], b[i], c[i]);
    return r;
#else
    return a * b + c;
#endif
}

static inline v4 vload(const float *p) {
    v4 v;
    memcpy(&v, p, sizeof v);
    return v;
}

typedef int32_t vi __attribute__((vector_size(16)));

/* rint (to nearest even) on 4 lanes without libm: adding 2^23 to a magnitude below it leaves
 * the integer part, rounded to even; the sign goes back on after (so -0 stays -0) */
static inline v4 v_rint(v4 v) {
    const vi bits = (vi)v, sign = bits & (vi){INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN};
    const v4 a = (v4)(bits ^ sign);
    const vi small = a < 0x1p23f;
    const v4 r = (a + 0x1p23f) - 0x1p23f;
    return (v4)((((vi)r & small) | ((vi)a & ~small)) | sign);
}

/* np.clip(q, 0, nmax): -0 and NaN pass through */
static inline v4 v_clip(v4 q, float nmax) {
    const v4 top = {nmax, nmax, nmax, nmax};
    q = (v4)((vi)q & ~(q < 0.0f));
    const vi over = q > top;
    return (v4)(((vi)q & ~over) | ((vi)top & over));
}

static inline void vstore(float *p, v4 v) { memcpy(p, &v, sizeof v); }

/* numpy's float32 einsum of a row pair: Σ a[k]·b[k] */
static inline float dot(const float *a, const float *b, int n) {
    v4 acc = {0, 0, 0, 0};
    for (int k = 0; k < n; k += 16) {
        v4 ab3 = vmuladd(vload(a + k + 12), vload(b + k + 12), acc);
        v4 ab2 = vmuladd(vload(a + k + 8), vload(b + k + 8), ab3);
        v4 ab1 = vmuladd(vload(a + k + 4), vload(b + k + 4), ab2);
        acc = vmuladd(vload(a + k), vload(b + k), ab1);
    }
    return 0.0f + ((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

/* numpy's pairwise sum (npyops.h) in float64, of float32 values */
static inline double pairwise_f64(const float *a, int n) {
    double r[8];
    for (int j = 0; j < 8; j++) r[j] = a[j];
    int i = 8;
    for (; i < n - n % 8; i += 8)
        for (int j = 0; j < 8; j++) r[j] += (double)a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; i++) res += (double)a[i];
    return 0.0 + res;
}

/* ------------------------------------------------------------------------------------------
 * common.fit_scale_min for 8 rows at once, one row per lane of 8-float vectors (AVX2 where built
 * with it, two SSE halves otherwise): every lane performs numpy's operations for its row in
 * numpy's order, so each row gets numpy's bits, while the 8 rows' dependency chains (sums,
 * divisions, the candidate choice) run side by side (one row at a time was latency-bound:
 * 1.75x Q4_K, 2.1x Q2_K, measured). The einsum's 4 float lanes (lane i holds elements k + i,
 * k + 4 + i, ...) become 4 accumulator vectors over the rows. */
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));
typedef int64_t v8l __attribute__((vector_size(64)));

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
static inline v8d seld(v8l m, v8d a, v8d b) { return (v8d)((m & (v8l)a) | (~m & (v8l)b)); }
static inline v8l widen(v8i m) { return __builtin_convertvector(m, v8l); }
static inline v8d splatd(double v) { return (v8d){v, v, v, v, v, v, v, v}; }
static inline v8 splat8(float v) { return (v8){v, v, v, v, v, v, v, v}; }

#if defined(__AVX__)
#include <immintrin.h>
/* one instruction each where AVX has them: rint (to nearest even, -0 kept, NaN quiet), floor,
 * and np.clip(q, 0, nmax) as max(0, q) then min(nmax, q) (x86 max/min return the second
 * operand when either is NaN and on equal operands, so NaN and -0 pass through as in numpy) */
static inline v8 v8_rint(v8 v) { return (v8)_mm256_round_ps((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline v8 v8_floor(v8 v) { return (v8)_mm256_round_ps((__m256)v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
static inline v8 v8_clip(v8 q, float nmax) {
    return (v8)_mm256_min_ps((__m256)splat8(nmax), _mm256_max_ps(_mm256_setzero_ps(), (__m256)q));
}
#else
static inline v8 v8_rint(v8 v) { /* v_rint, 8 lanes */
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

static inline v8 v8_clip(v8 q, float nmax) { /* np.clip(q, 0, nmax): -0 and NaN pass through */
    q = (v8)((v8i)q & ~(q < 0.0f));
    return sel8(q > nmax, splat8(nmax), q);
}
#endif

static inline v8d to_d(v8 v) { return __builtin_convertvector(v, v8d); }

/* the three einsum sums Σ q·w, Σ q·wx, Σ q²·w of 8 rows: q, w, wx [n][8] (numpy's order: see dot) */
DEFINE_CODE_SUMS(code_sums8_f, v8, vmuladd8, splat8(0.0f))
static inline void code_sums8(const v8 *q, const v8 *w, const v8 *wx, int n, v8d *sl, v8d *sxl,
                              v8d *sl2) {
    v8 l, xl, l2;
    code_sums8_f(q, w, wx, n, &l, &xl, &l2);
    *sl = to_d(l);
    *sxl = to_d(xl);
    *sl2 = to_d(l2);
}

static inline v8d lsq_err8(v8d scale, v8d b, v8d sl, v8d sxl, v8d sl2, v8d sw, v8d sx) {
    return scale * scale * sl2 + b * b * sw + 2 * scale * b * sl - 2 * scale * sxl - 2 * b * sx;
}

/* the weighted least-squares (scale, b) of the codes and its error Σ w (scale·q + b − x)² − Σ w x²,
 * lane by lane, term by term numpy's float64 algebra (b > 0 refits the scale alone with b = 0;
 * np.maximum(scale, 0) turns -0 into +0 and keeps NaN) */
static inline void lsq8(v8d sl, v8d sxl, v8d sl2, v8d sw, v8d sx, v8d *scale_out, v8d *b_out, v8d *err_out) {
    const v8d zero = splatd(0.0), one = splatd(1.0);
    const v8d det = sw * sl2 - sl * sl;
    const v8l ok = det > 0;
    const v8d safe = seld(ok, det, one);
    v8d scale = seld(ok, (sw * sxl - sx * sl) / safe, zero);
    v8d b = seld(ok, (sl2 * sx - sl * sxl) / safe, zero);
    const v8l pos = b > 0;
    const v8l l2 = sl2 > 0;
    scale = seld(pos, seld(l2, sxl / seld(l2, sl2, one), zero), scale);
    b = seld(pos, zero, b);
    scale = seld(scale <= 0, zero, scale); /* !(scale > 0) && !isnan(scale) */
    *scale_out = scale;
    *b_out = b;
    *err_out = lsq_err8(scale, b, sl, sxl, sl2, sw, sx);
}

/* pairwise_f64 of 8 rows (n a multiple of 8, 8..128) */
static inline v8d pairwise8(const v8 *a, int n) {
    v8d r[8];
    for (int j = 0; j < 8; j++) r[j] = to_d(a[j]);
    for (int i = 8; i < n; i += 8)
        for (int j = 0; j < 8; j++) r[j] += to_d(a[i + j]);
    return 0.0 + (((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])));
}

/* Rows xr + n·r, wr + n·r (r = 0..7; n a multiple of 16, at most 32) of common.fit_scale_min;
 * steps [n_steps] the inverse-scale numerators, the plain min/max candidate's (nmax) first. */
static void fit_rows8(const float *xr, const float *wr, int32_t n, float nmax, const double *steps,
                      int32_t n_steps, int32_t refine, float *scale_out, float *m_out) {
    v8 x[32], w[32], wx[32], dx[32], q[32], q0[32];
    for (int k = 0; k < n; k++)
        for (int r = 0; r < 8; r++) x[k][r] = xr[n * r + k], w[k][r] = wr[n * r + k];
    v8 mn = x[0], mx = x[0];
    for (int k = 0; k < n; k++) {
        wx[k] = w[k] * x[k];
        mn = sel8(x[k] < mn, x[k], mn);
        mx = sel8(x[k] > mx, x[k], mx);
    }
    const v8 l = sel8(mn < 0, mn, splat8(0.0f)), span = mx - l;
    const v8i flat = span <= 0;
    const v8 sp = sel8(flat, splat8(1.0f), span);
    const v8d swr = pairwise8(w, n), sxr = pairwise8(wx, n), spd = to_d(sp);
    for (int k = 0; k < n; k++) dx[k] = x[k] - l;
    v8d sl, sxl, sl2, sl0 = splatd(0), sxl0 = sl0, sl20 = sl0;
    v8d best_scale = sl0, best_b = sl0, best_err = sl0;
    for (int32_t c = 0; c < n_steps; c++) {
        if (c > 0 && steps[c] == steps[0]) {
            memcpy(q, q0, sizeof(v8) * n);
            sl = sl0, sxl = sxl0, sl2 = sl20;
        } else {
            const v8 is = __builtin_convertvector(splatd(steps[c]) / spd, v8);
            for (int k = 0; k < n; k++) q[k] = v8_clip(v8_rint(is * dx[k]), nmax);
            code_sums8(q, w, wx, n, &sl, &sxl, &sl2);
        }
        v8d scale, b, err;
        if (c == 0) {
            scale = to_d(sp / nmax);
            b = to_d(l);
            err = lsq_err8(scale, b, sl, sxl, sl2, swr, sxr);
            memcpy(q0, q, sizeof(v8) * n);
            sl0 = sl, sxl0 = sxl, sl20 = sl2;
            best_scale = scale, best_b = b, best_err = err;
            continue;
        }
        lsq8(sl, sxl, sl2, swr, sxr, &scale, &b, &err);
        /* less(err, best_err): the first NaN wins */
        const v8l take = (best_err == best_err) & ((err < best_err) | (err != err));
        best_scale = seld(take, scale, best_scale);
        best_b = seld(take, b, best_b);
        best_err = seld(take, err, best_err);
    }
    /* Polish: a round that does not improve leaves a lane's winner as it was, so every later
     * round would repeat it: the lane stops there (the same result as running them all), as
     * it does at a zero scale. */
    v8l active = best_scale > 0;
    for (int32_t i = 0; i < refine; i++) {
        active &= best_scale > 0;
        int any = 0;
        for (int r = 0; r < 8; r++) any |= active[r] != 0;
        if (!any) break;
        const v8 safe = __builtin_convertvector(best_scale, v8), bf = __builtin_convertvector(best_b, v8);
        for (int k = 0; k < n; k++) q[k] = v8_clip(v8_rint((x[k] - bf) / safe), nmax);
        code_sums8(q, w, wx, n, &sl, &sxl, &sl2);
        v8d scale, b, err;
        lsq8(sl, sxl, sl2, swr, sxr, &scale, &b, &err);
        const v8l take = active & (err < best_err);
        best_scale = seld(take, scale, best_scale);
        best_b = seld(take, b, best_b);
        best_err = seld(take, err, best_err);
        active = take;
    }
    const v8 so = __builtin_convertvector(best_scale, v8), mo = __builtin_convertvector(-best_b, v8);
    const v8 s_out = sel8(flat, splat8(0.0f), so), m_o = sel8(flat, -l, mo);
    for (int r = 0; r < 8; r++) scale_out[r] = s_out[r], m_out[r] = m_o[r];
}

/* common.kquant_weights without importance: w = sqrt(mean(x²)) + |x| per sub-block of n (8..128) */
static void kquant_plain_weights(const float *x, int64_t n_rows, int32_t n, float *w) {
    float sq[128];
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * n;
        for (int k = 0; k < n; k++) sq[k] = xr[k] * xr[k];
        const float root = __builtin_sqrtf((float)((double)pairwise_f32(sq, n) / (double)n));
        for (int k = 0; k < n; k++) w[r * n + k] = root + __builtin_fabsf(xr[k]);
    }
}

/* common.requantize_codes: q = clip(floor((x + m)·inv + 0.5), 0, nmax) per sub-block of n
 * (a multiple of 8), 8 lanes at a time */
typedef uint8_t v8u8 __attribute__((vector_size(8)));
static void kquant_requantize(const float *x, const float *m, const float *inv, int64_t n_rows, int32_t n,
                              int32_t nmax_i, uint8_t *q) {
    const float nmax = (float)nmax_i;
    for (int64_t r = 0; r < n_rows; r++) {
        const v8 mr = splat8(m[r]), ir = splat8(inv[r]);
        for (int k = 0; k < n; k += 8) {
            v8 v;
            memcpy(&v, x + r * n + k, sizeof v);
            const v8 t = v8_clip(v8_floor((v + mr) * ir + 0.5f), nmax);
            const v8i c = __builtin_convertvector((v8)((v8i)t & (t == t)), v8i); /* NaN: 0 */
            const v8u8 b = __builtin_convertvector(c, v8u8);
            memcpy(q + r * n + k, &b, sizeof b);
        }
    }
}

/* The per sub-block sums of common.refit_super_scales for one block of subs sub-blocks of n:
 * Σ w q, Σ w q², Σ w q x, Σ w, Σ w x (the per-block Σ w x² is block_xx). */
static void kquant_refit_sums(const float *x, const float *w, const uint8_t *q, int32_t subs, int32_t n,
                              double *s_q, double *s_qq, double *s_qx, double *s_w, double *s_x) {
    float qf[128], wq[128];
    for (int32_t j = 0; j < subs; j++) {
        const int64_t at = (int64_t)j * n;
        const float *xr = x + at, *wr = w + at;
        for (int k = 0; k < n; k++) {
            qf[k] = (float)q[at + k];
            wq[k] = wr[k] * qf[k];
        }
        s_q[j] = pairwise_f64(wq, n);
        s_qq[j] = dot(wq, qf, n);
        s_qx[j] = dot(wq, xr, n);
        s_w[j] = pairwise_f64(wr, n);
        s_x[j] = dot(wr, xr, n);
    }
}

#define KQ_BATCH 8 /* blocks whose Σ w x² chains run side by side */

/* Σ w x² of each of KQ_BATCH blocks x[i], w[i] (256 values): numpy's three-operand einsum,
 * one float32 accumulator element after element, a chain of 256 dependent additions; the
 * blocks' chains are independent, so they run side by side (one lane each). */
static void block_xx(const float *const x[KQ_BATCH], const float (*w)[256], double *s_xx) {
    v8 acc = splat8(0.0f);
    for (int k = 0; k < 256; k++) {
        v8 xv, wv;
        for (int i = 0; i < KQ_BATCH; i++) xv[i] = x[i][k], wv[i] = w[i][k];
        acc += (wv * xv) * xv;
    }
    for (int i = 0; i < KQ_BATCH; i++) s_xx[i] = 0.0f + acc[i];
}

/* ------------------------------------------------------------------------------------------
 * The whole per-block recipe of common.kquant_fit and the packing of q4_k / q2_k, one
 * super-block of 256 at a time, every step the numpy path's operation in its order. */


/* common.importance_weights for one super-block: qw·sqrt(f·mean(x²) + x²) */
static void importance_block(const float *x, const float *qw, float sigma_factor, float *w) {
    float sq[256];
    for (int k = 0; k < 256; k++) sq[k] = x[k] * x[k];
    const float mean = (0.0f + (pairwise_f32(sq, 128) + pairwise_f32(sq + 128, 128))) / 256.0f;
    const float sigma2 = sigma_factor == 1.0f ? mean : sigma_factor * mean;
    for (int k = 0; k < 256; k++) w[k] = qw[k] * __builtin_sqrtf(sigma2 + x[k] * x[k]);
}

/* common.refit_super_scales for one block (Σ w x² given): the new (d, dmin) where they lower
 * the error */
static void refit_super(const float *x, const float *w, const uint8_t *q, const float *ls,
                        const float *lm, int32_t subs, int32_t sub, double s_xx, float *d, float *dmin) {
    double s_q[16], s_qq[16], s_qx[16], s_w[16], s_x[16];
    kquant_refit_sums(x, w, q, subs, sub, s_q, s_qq, s_qx, s_w, s_x);
    refit_super_scales(ls, lm, subs, s_q, s_qq, s_qx, s_w, s_x, s_xx, d, dmin);
}

/* the codes of one block for (d, dmin) and the sub-block levels ls, lm */
static void block_codes(const float *x, float d, float dmin, const float *ls, const float *lm,
                        int32_t subs, int32_t sub, int32_t nmax, uint8_t *q) {
    float mm[16], inv[16];
    for (int j = 0; j < subs; j++) {
        const float sc = d * ls[j];
        mm[j] = dmin * lm[j];
        inv[j] = sc > 0 ? 1.0f / sc : 0.0f;
    }
    kquant_requantize(x, mm, inv, subs, sub, nmax, q);
}

/* xb [n_blocks][256] and optional importance qw (same shape) -> Q4_K (kind 4: sub-blocks of 32,
 * codes 0..15, 6-bit levels) or Q2_K (kind 2: 16, 0..3, 4-bit) blocks in out. */
void kquant_quantize(const float *xb, const float *qw, int64_t n_blocks, int32_t kind,
                     const double *steps, int32_t n_steps, int32_t refine, float sigma_factor,
                     uint8_t *out) {
    const int32_t sub = kind == 4 ? 32 : 16, subs = 256 / sub, nmax = kind == 4 ? 15 : 3;
    const float lmax = kind == 4 ? 63.0f : 15.0f;
    const int64_t block_bytes = kind == 4 ? 144 : 84;
    static const float zeros[256];
    float w_batch[KQ_BATCH][256], d_batch[KQ_BATCH], dmin_batch[KQ_BATCH], ls_batch[KQ_BATCH][16],
        lm_batch[KQ_BATCH][16];
    uint8_t q_batch[KQ_BATCH][256];
    for (int64_t b0 = 0; b0 < n_blocks; b0 += KQ_BATCH) {
    const int nb = n_blocks - b0 < KQ_BATCH ? (int)(n_blocks - b0) : KQ_BATCH;
    const float *x_at[KQ_BATCH];
    double s_xx[KQ_BATCH];
    for (int i = 0; i < KQ_BATCH; i++) { /* weights, sub-block (scale, min) fits, first codes */
        if (i >= nb) { /* lanes past the last block: zeros */
            x_at[i] = zeros;
            memset(w_batch[i], 0, sizeof w_batch[i]);
            continue;
        }
        const int64_t b = b0 + i;
        const float *x = x_at[i] = xb + 256 * b;
        float *w = w_batch[i], *ls = ls_batch[i], *lm = lm_batch[i], scale[16], m[16];
        if (qw != NULL)
            importance_block(x, qw + 256 * b, sigma_factor, w);
        else
            kquant_plain_weights(x, subs, sub, w);
        for (int j = 0; j < subs; j += 8)
            fit_rows8(x + sub * j, w + sub * j, sub, (float)nmax, steps, n_steps, refine, scale + j, m + j);
        const float d = f16_to_f32(f32_to_f16(max_nan(scale, subs) / lmax));
        const float dmin = f16_to_f32(f32_to_f16(max_nan(m, subs) / lmax));
        const float dsafe = d > 0 ? d : 1.0f, msafe = dmin > 0 ? dmin : 1.0f;
        for (int j = 0; j < subs; j++) {
            ls[j] = clip_f(round_half_away(scale[j] / dsafe), lmax);
            lm[j] = clip_f(round_half_away(m[j] / msafe), lmax);
        }
        block_codes(x, d, dmin, ls, lm, subs, sub, nmax, q_batch[i]);
        d_batch[i] = d, dmin_batch[i] = dmin;
    }
    block_xx(x_at, (const float (*)[256])w_batch, s_xx);
    for (int i = 0; i < nb; i++) { /* super-scale refit, final codes, packing */
        const float *x = x_at[i], *ls = ls_batch[i], *lm = lm_batch[i];
        uint8_t *q = q_batch[i], *o = out + block_bytes * (b0 + i);
        float d = d_batch[i], dmin = dmin_batch[i];
        refit_super(x, w_batch[i], q, ls, lm, subs, sub, s_xx[i], &d, &dmin);
        block_codes(x, d, dmin, ls, lm, subs, sub, nmax, q);
        const uint16_t hd = f32_to_f16(d), hm = f32_to_f16(dmin);
        kquant_pack(kind, ls, lm, q, hd, hm, o);
    }
    }
}

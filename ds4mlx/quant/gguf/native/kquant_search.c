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

/* the three einsum sums Σ q·w, Σ q·wx, Σ q²·w (numpy's order: see dot) */
static inline void code_sums(const float *q, const float *w, const float *wx, int n, double *sl,
                             double *sxl, double *sl2) {
    v4 a_l = {0, 0, 0, 0}, a_xl = a_l, a_l2 = a_l;
    for (int k = 0; k < n; k += 16) {
        const v4 q0 = vload(q + k), q1 = vload(q + k + 4), q2 = vload(q + k + 8), q3 = vload(q + k + 12);
        a_l = vmuladd(q0, vload(w + k), vmuladd(q1, vload(w + k + 4),
              vmuladd(q2, vload(w + k + 8), vmuladd(q3, vload(w + k + 12), a_l))));
        a_xl = vmuladd(q0, vload(wx + k), vmuladd(q1, vload(wx + k + 4),
               vmuladd(q2, vload(wx + k + 8), vmuladd(q3, vload(wx + k + 12), a_xl))));
        a_l2 = vmuladd(q0 * q0, vload(w + k), vmuladd(q1 * q1, vload(w + k + 4),
               vmuladd(q2 * q2, vload(w + k + 8), vmuladd(q3 * q3, vload(w + k + 12), a_l2))));
    }
    *sl = 0.0f + ((a_l[0] + a_l[1]) + (a_l[2] + a_l[3]));
    *sxl = 0.0f + ((a_xl[0] + a_xl[1]) + (a_xl[2] + a_xl[3]));
    *sl2 = 0.0f + ((a_l2[0] + a_l2[1]) + (a_l2[2] + a_l2[3]));
}

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

static inline double lsq_err(double scale, double b, double sl, double sxl, double sl2, double sw,
                             double sx) {
    return scale * scale * sl2 + b * b * sw + 2 * scale * b * sl - 2 * scale * sxl - 2 * b * sx;
}

static inline void lsq(double sl, double sxl, double sl2, double sw, double sx, double *scale_out,
                       double *b_out, double *err_out) {
    const double det = sw * sl2 - sl * sl;
    const int ok = det > 0;
    const double safe = ok ? det : 1.0;
    double scale = ok ? (sw * sxl - sx * sl) / safe : 0.0;
    double b = ok ? (sl2 * sx - sl * sxl) / safe : 0.0;
    if (b > 0) {
        scale = sl2 > 0 ? sxl / sl2 : 0.0;
        b = 0.0;
    }
    if (!(scale > 0) && !isnan(scale)) scale = 0.0;
    *scale_out = scale;
    *b_out = b;
    *err_out = lsq_err(scale, b, sl, sxl, sl2, sw, sx);
}

static inline int less(double a, double best) { /* argmin order: the first NaN wins */
    return !isnan(best) && (a < best || isnan(a));
}

/* numpy's pairwise sum of n <= 128 values (8 accumulators, then a tree), in float32 or float64 */
static inline float pairwise_f32(const float *a, int n) {
    float r[8];
    for (int j = 0; j < 8; j++) r[j] = a[j];
    int i = 8;
    for (; i < n - n % 8; i += 8)
        for (int j = 0; j < 8; j++) r[j] += a[i + j];
    float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; i++) res += a[i];
    return res;
}

static inline double pairwise_f64(const float *a, int n) {
    double r[8];
    for (int j = 0; j < 8; j++) r[j] = a[j];
    int i = 8;
    for (; i < n - n % 8; i += 8)
        for (int j = 0; j < 8; j++) r[j] += (double)a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; i++) res += (double)a[i];
    return res;
}

/* x, w [n_rows][n] (n a multiple of 16, at most 128); steps [n_steps] the inverse-scale
 * numerators, the plain min/max candidate's (nmax) first. Writes each row's scale and m. */
void kquant_fit_scale_min(const float *x, const float *w, int64_t n_rows, int32_t n, int32_t nmax_i,
                          const double *steps, int32_t n_steps, int32_t refine, float *scale_out,
                          float *m_out) {
    const float nmax = (float)nmax_i;
    float wxr[128];
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * n, *wr = w + r * n;
        float mn = xr[0], mx = xr[0];
        for (int k = 0; k < n; k++) {
            wxr[k] = wr[k] * xr[k];
            mn = xr[k] < mn ? xr[k] : mn;
            mx = xr[k] > mx ? xr[k] : mx;
        }
        /* np.minimum(min, 0.0) is +0 for a zero minimum of either sign; a zero span of either
         * sign is a flat row */
        const float l = mn < 0 ? mn : 0.0f, span = mx - l;
        const int flat = span <= 0;
        const float sp = flat ? 1.0f : span;
        const double swr = pairwise_f64(wr, n), sxr = pairwise_f64(wxr, n);
        double sl, sxl, sl2, sl0 = 0, sxl0 = 0, sl20 = 0, best_scale = 0, best_b = 0, best_err = 0;
        /* the winner's codes, and whether its (scale, b) is the least-squares fit of them */
        float dx[128], q[128], q0[128], best_q[128];
        int best_lsq = 0;
        for (int k = 0; k < n; k++) dx[k] = xr[k] - l;
        for (int32_t c = 0; c < n_steps; c++) {
            if (c > 0 && steps[c] == steps[0]) { /* the min/max candidate's codes again */
                memcpy(q, q0, sizeof(float) * n);
                sl = sl0, sxl = sxl0, sl2 = sl20;
            } else {
                const float is = (float)(steps[c] / (double)sp);
                const v4 vis = {is, is, is, is};
                for (int k = 0; k < n; k += 4) vstore(q + k, v_clip(v_rint(vis * vload(dx + k)), nmax));
                code_sums(q, wr, wxr, n, &sl, &sxl, &sl2);
            }
            double scale, b, err;
            if (c == 0) { /* the plain min/max fit */
                scale = (double)(sp / nmax);
                b = (double)l;
                err = lsq_err(scale, b, sl, sxl, sl2, swr, sxr);
                memcpy(q0, q, sizeof(float) * n);
                sl0 = sl, sxl0 = sxl, sl20 = sl2;
            } else {
                lsq(sl, sxl, sl2, swr, sxr, &scale, &b, &err);
            }
            if (c == 0 || less(err, best_err)) {
                best_scale = scale;
                best_b = b;
                best_err = err;
                best_lsq = c > 0;
                memcpy(best_q, q, sizeof(float) * n);
            }
        }
        /* Polish: a round that does not improve leaves the winner as it was, so every later
         * round would repeat it: stop there (the same result as running them all). Likewise
         * when the winner's codes come out again and it is their least-squares fit already. */
        for (int32_t i = 0; i < refine && best_scale > 0; i++) {
            const float safe = (float)best_scale;
            const float bf = (float)best_b;
            const v4 vsafe = {safe, safe, safe, safe}, vb = {bf, bf, bf, bf};
            for (int k = 0; k < n; k += 4) vstore(q + k, v_clip(v_rint((vload(xr + k) - vb) / vsafe), nmax));
            if (best_lsq && memcmp(q, best_q, sizeof(float) * n) == 0) break;
            code_sums(q, wr, wxr, n, &sl, &sxl, &sl2);
            double scale, b, err;
            lsq(sl, sxl, sl2, swr, sxr, &scale, &b, &err);
            if (!(err < best_err)) break;
            best_scale = scale;
            best_b = b;
            best_err = err;
            best_lsq = 1;
            memcpy(best_q, q, sizeof(float) * n);
        }
        scale_out[r] = flat ? 0.0f : (float)best_scale;
        m_out[r] = flat ? -l : (float)(-best_b);
    }
}

/* common.kquant_weights without importance: w = sqrt(mean(x²)) + |x| per sub-block of n (8..128) */
void kquant_plain_weights(const float *x, int64_t n_rows, int32_t n, float *w) {
    float sq[128];
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * n;
        for (int k = 0; k < n; k++) sq[k] = xr[k] * xr[k];
        const float root = __builtin_sqrtf((float)((double)pairwise_f32(sq, n) / (double)n));
        for (int k = 0; k < n; k++) w[r * n + k] = root + __builtin_fabsf(xr[k]);
    }
}

/* common.requantize_codes: q = clip(floor((x + m)·inv + 0.5), 0, nmax) per sub-block of n */
void kquant_requantize(const float *x, const float *m, const float *inv, int64_t n_rows, int32_t n,
                       int32_t nmax_i, uint8_t *q) {
    const float nmax = (float)nmax_i;
    const v4 half = {0.5f, 0.5f, 0.5f, 0.5f}, one = {1, 1, 1, 1};
    for (int64_t r = 0; r < n_rows; r++) {
        const v4 mr = {m[r], m[r], m[r], m[r]}, ir = {inv[r], inv[r], inv[r], inv[r]};
        for (int k = 0; k < n; k += 4) {
            const v4 v = (vload(x + r * n + k) + mr) * ir + half;
            v4 t = v_rint(v);
            t = v_clip(t - (v4)((vi)one & (t > v)), nmax); /* floor */
            const vi c = __builtin_convertvector((v4)((vi)t & (t == t)), vi); /* NaN: 0 */
            for (int i = 0; i < 4; i++) q[r * n + k + i] = (uint8_t)c[i];
        }
    }
}

/* The sums of common.refit_super_scales for blocks of subs sub-blocks of n: per sub-block
 * Σ w q, Σ w q², Σ w q x, Σ w, Σ w x, and per block Σ w x² (numpy's three-operand einsum:
 * one float32 accumulator, element by element). */
void kquant_refit_sums(const float *x, const float *w, const uint8_t *q, int64_t n_blocks,
                       int32_t subs, int32_t n, double *s_q, double *s_qq, double *s_qx,
                       double *s_w, double *s_x, double *s_xx) {
    float qf[128], wq[128];
    for (int64_t b = 0; b < n_blocks; b++) {
        float acc = 0.0f;
        for (int32_t j = 0; j < subs; j++) {
            const int64_t at = (b * subs + j) * n;
            const float *xr = x + at, *wr = w + at;
            for (int k = 0; k < n; k++) {
                qf[k] = (float)q[at + k];
                wq[k] = wr[k] * qf[k];
                acc += (wr[k] * xr[k]) * xr[k];
            }
            s_q[b * subs + j] = pairwise_f64(wq, n);
            s_qq[b * subs + j] = dot(wq, qf, n);
            s_qx[b * subs + j] = dot(wq, xr, n);
            s_w[b * subs + j] = pairwise_f64(wr, n);
            s_x[b * subs + j] = dot(wr, xr, n);
        }
        s_xx[b] = 0.0f + acc;
    }
}

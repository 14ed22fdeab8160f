/* The per-block steps of kquant_search.c's 16-lane kernel after the (scale, min) search, for a
 * batch of KQ_BATCH blocks: the sub-block levels against fp16 super-scales (a group's lanes at
 * a time), the super-scale refit (common.refit_super_scales, one block per lane) and the final
 * codes' steps, every operation numpy's in its order. Included by kquant_search.c, whose vector
 * types and helpers it uses. */

/* what the batch's blocks keep between the search and the packing: levels and super-scales,
 * the per sub-block sums of common._refit_sums and Σ w x² (sub-block j of block i at [i][j]) */
typedef struct {
    float d[KQ_BATCH], dmin[KQ_BATCH], s_xx[KQ_BATCH];
    float ls[KQ_BATCH][16], lm[KQ_BATCH][16];
    double s_q[KQ_BATCH][16], s_qq[KQ_BATCH][16], s_qx[KQ_BATCH][16], s_w[KQ_BATCH][16], s_x[KQ_BATCH][16];
    float mm_t[16][KQ_BATCH], inv_t[16][KQ_BATCH]; /* requantize_codes' m, inv after the refit */
} kq_batch;

/* round_half_away (search_common.h), lane by lane */
static inline vf v_round_half_away(vf v) {
    const vf zero = splat(0.0f);
    const vf sign = sel(f_gt(v, zero), splat(1.0f), sel(f_lt(v, zero), splat(-1.0f), sel(f_eq(v, zero), zero, v)));
    return sign * v_floor((vf)((vi)v & ~(vi)splat(-0.0f)) + 0.5f);
}

/* requantize_codes' m and inv for (d, dmin) and the levels ls, lm (code_steps, lane by lane) */
static inline void code_steps_v(vf d, vf dmin, vf ls, vf lm, vf *mm, vf *inv) {
    const vf sc = d * ls;
    *mm = dmin * lm;
    *inv = sel(f_gt(sc, splat(0.0f)), splat(1.0f) / sc, splat(0.0f));
}

/* the levels of group g's blocks (i0 = bpg·g ..) from their sub-blocks' scale and m, against
 * their fp16 super-scales (into bt), and requantize_codes' m, inv for them */
static inline void group_levels(vf scale, vf m, int subs, int i0, float lmax, kq_batch *bt, vf *mm, vf *inv) {
    float sc[KQ_W], mi[KQ_W], dl[KQ_W], ml[KQ_W];
    memcpy(sc, &scale, sizeof sc);
    memcpy(mi, &m, sizeof mi);
    for (int i = 0; i < KQ_W / subs; i++) {
        const float d = f16_to_f32(f32_to_f16(max_nan(sc + subs * i, subs) / lmax));
        const float dmin = f16_to_f32(f32_to_f16(max_nan(mi + subs * i, subs) / lmax));
        for (int j = 0; j < subs; j++) dl[subs * i + j] = d, ml[subs * i + j] = dmin;
        bt->d[i0 + i] = d, bt->dmin[i0 + i] = dmin;
    }
    vf dv, dminv;
    memcpy(&dv, dl, sizeof dv);
    memcpy(&dminv, ml, sizeof dminv);
    const vf one = splat(1.0f), zero = splat(0.0f);
    const vf dsafe = sel(f_gt(dv, zero), dv, one), msafe = sel(f_gt(dminv, zero), dminv, one);
    const vf ls = v_clip(v_round_half_away(scale / dsafe), lmax), lm = v_clip(v_round_half_away(m / msafe), lmax);
    code_steps_v(dv, dminv, ls, lm, mm, inv);
    float lsf[KQ_W], lmf[KQ_W];
    memcpy(lsf, &ls, sizeof lsf);
    memcpy(lmf, &lm, sizeof lmf);
    for (int i = 0; i < KQ_W / subs; i++) {
        memcpy(bt->ls[i0 + i], lsf + subs * i, sizeof(float) * subs);
        memcpy(bt->lm[i0 + i], lmf + subs * i, sizeof(float) * subs);
    }
}

static inline vd load_vd(const double *p) {
    vd v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline vd load_f_vd(const float *p) { /* 8 floats in float64 */
    v8 v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, vd);
}

/* out[j] = column j0 + j of rows o..o+7 of a [KQ_BATCH][16] table (float64 of floats where
 * f), one row per lane */
static inline void columns8(const double (*src)[16], const float (*f)[16], int o, int j0, vd out[8]) {
#if defined(KQ_AVX)
    __m512 m[8];
    for (int r = 0; r < 8; r++) m[r] = (__m512)(f ? load_f_vd(f[o + r] + j0) : load_vd(src[o + r] + j0));
    transpose8_pairs(m);
    for (int j = 0; j < 8; j++) out[j] = (vd)m[j];
#else
    for (int j = 0; j < 8; j++)
        for (int r = 0; r < 8; r++) out[j][r] = f ? (double)f[o + r][j0 + j] : src[o + r][j0 + j];
#endif
}

/* pairwise_d (search_common.h) of t[0..n-1] (n 8 or 16), lane by lane */
static inline vd pairwise_vd(const vd *t, int n) {
    vd r[8];
    for (int j = 0; j < 8; j++) r[j] = t[j];
    for (int i = 8; i < n; i += 8)
        for (int j = 0; j < 8; j++) r[j] += t[i + j];
    return 0.0 + (((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])));
}

/* common.refit_super_scales (search_common.h's refit_super_scales) of the batch's blocks, 8 a
 * vector: the new (d, dmin) where they lower the error; then requantize_codes' m, inv */
static void refit_batch(kq_batch *bt, int subs) {
    const vd zero = splatd(0.0);
    for (int o = 0; o < KQ_BATCH; o += 8) {
        vd t[5][16];
        for (int j0 = 0; j0 < subs; j0 += 8) {
            vd a[8], c[8], qq[8], w[8], q[8], qx[8], x[8];
            columns8(NULL, bt->ls, o, j0, a), columns8(NULL, bt->lm, o, j0, c);
            columns8(bt->s_qq, NULL, o, j0, qq), columns8(bt->s_w, NULL, o, j0, w);
            columns8(bt->s_q, NULL, o, j0, q), columns8(bt->s_qx, NULL, o, j0, qx), columns8(bt->s_x, NULL, o, j0, x);
            for (int j = 0; j < 8; j++) {
                t[0][j0 + j] = a[j] * a[j] * qq[j];
                t[1][j0 + j] = c[j] * c[j] * w[j];
                t[2][j0 + j] = a[j] * c[j] * q[j];
                t[3][j0 + j] = a[j] * qx[j];
                t[4][j0 + j] = c[j] * x[j];
            }
        }
        const vd saa = pairwise_vd(t[0], subs), scc = pairwise_vd(t[1], subs), sac = pairwise_vd(t[2], subs);
        const vd sax = pairwise_vd(t[3], subs), scx = pairwise_vd(t[4], subs);
        const vd det = saa * scc - sac * sac;
        const vd p = saa * scc, floor_ = seld(d_lt(p, splatd(1e-30)), splatd(1e-30), p); /* np.maximum */
        const vl ok = d_gt(det, 1e-30 * floor_);
        const vd safe = seld(ok, det, splatd(1.0));
        const vd d0 = load_f_vd(bt->d + o), e0 = load_f_vd(bt->dmin + o);
        const vl only_d = ~ok & d_gt(saa, zero);
        const vd nd = seld(only_d, sax / saa, (sax * scc - scx * sac) / safe);
        const vd ne = seld(only_d, e0, (sax * sac - scx * saa) / safe);
        float ndf[8], nef[8];
        for (int l = 0; l < 8; l++) {
            ndf[l] = f16_to_f32(f64_to_f16(clip_d(nd[l], 65504.0)));
            nef[l] = f16_to_f32(f64_to_f16(clip_d(ne[l], 65504.0)));
        }
        const vd dn = load_f_vd(ndf), en = load_f_vd(nef), s_xx = load_f_vd(bt->s_xx + o);
#define ERR(dd, ee) \
    ((dd) * (dd) * saa + (ee) * (ee) * scc + s_xx - 2.0 * (dd) * (ee) * sac - 2.0 * (dd) * sax + 2.0 * (ee) * scx)
        const vl better = (ok | only_d) & d_lt(ERR(dn, en), ERR(d0, e0));
#undef ERR
        for (int l = 0; l < 8; l++)
            if (better[l]) bt->d[o + l] = ndf[l], bt->dmin[o + l] = nef[l];
    }
    vf dv, dminv;
    memcpy(&dv, bt->d, sizeof dv);
    memcpy(&dminv, bt->dmin, sizeof dminv);
    for (int j = 0; j < subs; j++) {
        vf ls, lm, mm, inv;
        for (int i = 0; i < KQ_BATCH; i++) ls[i] = bt->ls[i][j], lm[i] = bt->lm[i][j];
        code_steps_v(dv, dminv, ls, lm, &mm, &inv);
        memcpy(bt->mm_t[j], &mm, sizeof mm);
        memcpy(bt->inv_t[j], &inv, sizeof inv);
    }
}

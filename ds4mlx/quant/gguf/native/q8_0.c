/* q8_0.quantize in C, bit for bit its numpy (checked at first use, see q8_0._check_native):
 * d = fp16(min(amax / 127, 65504)), codes round-half-away(x / d) clipped to ±127.
 * A block is four 8-float vectors; a block holding a NaN takes the scalar loop (its amax is
 * the first NaN's payload, which reaches the fp16 scale). */
#include <stdint.h>
#include <string.h>

#include "npyops.h"

typedef float q8v __attribute__((vector_size(32)));
typedef int32_t q8vi __attribute__((vector_size(32)));
typedef int8_t q8vb __attribute__((vector_size(8)));

static void block_scalar(const float *xb, uint8_t *o) {
    float amax = __builtin_fabsf(xb[0]);
    for (int j = 1; j < 32; j++) { /* np.max: NaN propagates */
        const float a = __builtin_fabsf(xb[j]);
        amax = (amax != amax || amax >= a) ? amax : a;
    }
    float v = amax / 127.0f;
    v = (v != v || v <= 65504.0f) ? v : 65504.0f; /* np.minimum */
    const uint16_t h = f32_to_f16(v);
    const float d = f16_to_f32(h);
    o[0] = h & 255, o[1] = h >> 8;
    for (int j = 0; j < 32; j++) {
        float q = 0.0f;
        if (d > 0) {
            const float t = xb[j] / d;
            const float sign = t > 0 ? 1.0f : (t < 0 ? -1.0f : (t == 0 ? 0.0f : t));
            q = sign * floor_f(__builtin_fabsf(t) + 0.5f);
            q = q < -127.0f ? -127.0f : (q > 127.0f ? 127.0f : q);
        }
        o[2 + j] = (uint8_t)(int8_t)(int)q;
    }
}

static inline q8v sel(q8vi m, q8v a, q8v b) { return (q8v)((m & (q8vi)a) | (~m & (q8vi)b)); }

void q8_0_quantize(const float *x, int64_t n_blocks, uint8_t *out) {
    const q8vi abs_mask = (q8vi){0} + 0x7fffffff, sign_mask = (q8vi){0} + (int32_t)0x80000000;
    for (int64_t b = 0; b < n_blocks; b++) {
        const float *xb = x + 32 * b;
        uint8_t *o = out + 34 * b;
        q8v v[4], a[4];
        memcpy(v, xb, sizeof v);
        q8vi nan = (q8vi){0};
        for (int i = 0; i < 4; i++) a[i] = (q8v)((q8vi)v[i] & abs_mask), nan |= v[i] != v[i];
        /* the largest |x| (no NaN, no signed zero after fabs: the order does not matter) */
        q8v m = sel(a[0] > a[1], a[0], a[1]), m2 = sel(a[2] > a[3], a[2], a[3]);
        m = sel(m > m2, m, m2);
        float amax = m[0];
        int any_nan = nan[0];
        for (int i = 1; i < 8; i++) amax = amax >= m[i] ? amax : m[i], any_nan |= nan[i];
        if (any_nan) {
            block_scalar(xb, o);
            continue;
        }
        float vd = amax / 127.0f;
        vd = vd <= 65504.0f ? vd : 65504.0f;
        const uint16_t h = f32_to_f16(vd);
        const float d = f16_to_f32(h);
        o[0] = h & 255, o[1] = h >> 8;
        if (!(d > 0)) {
            memset(o + 2, 0, 32);
            continue;
        }
        for (int i = 0; i < 4; i++) {
            const q8v t = v[i] / d;
            const q8v r = (q8v)((q8vi)(((q8v)((q8vi)t & abs_mask)) + 0.5f)); /* |t| + 0.5 */
            q8vi ri = __builtin_convertvector(r, q8vi); /* truncation = floor of a non-negative */
            q8v fl = __builtin_convertvector(ri, q8v);
            fl = sel(r >= 0x1p31f, r, fl); /* beyond int32 (inf): the value itself, clipped below */
            q8v q = (q8v)((q8vi)fl | ((q8vi)t & sign_mask)); /* sign(t)·floor(|t| + 0.5) */
            q = sel(q < -127.0f, (q8v){0} - 127.0f, q);
            q = sel(q > 127.0f, (q8v){0} + 127.0f, q);
            const q8vb c = __builtin_convertvector(__builtin_convertvector(q, q8vi), q8vb);
            memcpy(o + 2 + 8 * i, &c, sizeof c);
        }
    }
}

/* q8_0.quantize in C, bit for bit its numpy (checked at first use, see q8_0._check_native):
 * d = fp16(min(amax / 127, 65504)), codes round-half-away(x / d) clipped to ±127. */
#include <stdint.h>

#include "npyops.h"

void q8_0_quantize(const float *x, int64_t n_blocks, uint8_t *out) {
    for (int64_t b = 0; b < n_blocks; b++) {
        const float *xb = x + 32 * b;
        uint8_t *o = out + 34 * b;
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
}

/* quant.mx.dequant_fp4_np: official FP4 experts (byte i of a group = elements 2i, 2i+1 in its
 * low, high nibble; one E8M0 scale per 32) -> float32 values, each the same float32 product
 * table value × scale as numpy's (the tables come from numpy: pairs[b] = the two values of
 * byte b, scale[e] = the E8M0 value of byte e). */
#include <stdint.h>
#include <string.h>

void fp4_decode(const uint8_t *codes, const uint8_t *scales, int64_t n_groups, const float *pairs,
                const float *scale, float *out) {
    for (int64_t g = 0; g < n_groups; g++) {
        const float s = scale[scales[g]];
        const uint8_t *c = codes + 16 * g;
        float *o = out + 32 * g;
        for (int i = 0; i < 16; i++) {
            o[2 * i] = pairs[2 * c[i]] * s;
            o[2 * i + 1] = pairs[2 * c[i] + 1] * s;
        }
    }
}

// MXFP4 in MLX's mxfp4 layout (official FP4 experts, and GGUF MXFP4 after a nibble reorder):
// a row of K weights is K/8 little-endian uint32 words, element i at bits 4(i%8) of word i/8,
// an E2M1 code; one E8M0 scale byte per 32 weights in a separate array.
// x = e2m1(code) * 2^(s - 127), with s = 0 read as 2^-127 and s = 255 as inf, like MLX.
#pragma once

constant float ds4_e2m1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

template <> struct QFmt<DS4_MXFP4> {
  static ulong row_bytes(uint k) { return ulong(k / 2); }
  static ulong scale_bytes(uint k) { return ulong(k / 32); }
  static void load8(const device uint8_t* w, const device uint8_t* s, uint e, thread float* v) {
    uint word = ((const device uint*)w)[e / 8];
    uint sb = s[e / 32];
    float scale = as_type<float>(sb == 0 ? 0x00400000u : sb << 23);
    for (int i = 0; i < 8; ++i) v[i] = ds4_e2m1[(word >> (4 * i)) & 15] * scale;
  }
};

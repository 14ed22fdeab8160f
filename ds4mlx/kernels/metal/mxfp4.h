// MXFP4 in MLX's mxfp4 layout (official FP4 experts, and GGUF MXFP4 after a nibble reorder):
// a row of K weights is K/8 little-endian uint32 words, element i at bits 4(i%8) of word i/8,
// an E2M1 code; one E8M0 scale byte per 32 weights in a separate array.
// x = e2m1(code) * 2^(s - 127), with s = 0 read as 2^-127 and s = 255 as inf, like MLX.
// Decode dot (instructions per weight, counted from the code): before, a shift, a mask, a
// `constant` table read indexed by the lane's code (lanes diverge: the reads serialize), a
// multiply by the scale and an FMA, plus the word and scale per 8: ~5.6. Now the table sits in
// threadgroup memory (16 floats, one per bank), so a shift, a mask, a threadgroup read and an
// FMA, the scale once per 32: ~4.1.
#pragma once

constant float ds4_e2m1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

METAL_FUNC float ds4_e8m0(uint sb) { return as_type<float>(sb == 0 ? 0x00400000u : sb << 23); }

template <> struct QFmt<DS4_MXFP4> {
  static ulong row_bytes(uint k) { return ulong(k / 2); }
  static ulong scale_bytes(uint k) { return ulong(k / 32); }
  static void load8(const device uint8_t* w, const device uint8_t* s, uint e, thread float* v) {
    uint word = ((const device uint*)w)[e / 8];
    float scale = ds4_e8m0(s[e / 32]);
    for (int i = 0; i < 8; ++i) v[i] = ds4_e2m1[(word >> (4 * i)) & 15] * scale;
  }
  enum { TAB = 16 };
  static void fill_tab(threadgroup uint* tab, uint t, uint n) {
    for (uint i = t; i < 16; i += n) tab[i] = as_type<uint>(float(ds4_e2m1[i]));
  }
  static void prep(uint, thread float*) {}
  static float dot32(const device uint8_t* w, const device uint8_t* s, uint e,
                     thread const float* xs, threadgroup const uint* tab) {
    const device uint* q = (const device uint*)w + e / 8;
    float acc = 0.0f;
    for (int i = 0; i < 4; ++i) {
      uint v = q[i];
      for (int j = 0; j < 8; ++j) acc += as_type<float>(uint(tab[(v >> (4 * j)) & 15])) * xs[8 * i + j];
    }
    return ds4_e8m0(s[e / 32]) * acc;
  }
};

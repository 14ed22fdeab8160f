// MLX mxfp8 (the official FP8 E4M3 weights with their E8M0 scales regrouped per 32 by
// ds4mlx/quant/mx.py, exactly): a row of K weights is K/4 little-endian uint32 words, element i
// in byte i%4 of word i/4, an E4M3 code; one E8M0 scale byte per 32 weights in a separate array.
// x = e4m3(code) * 2^(s - 127) (ds4_e8m0 of mxfp4.h). A layout of the decode kernels only (the
// shared slot, gguf_matvec: dot32, no load8).
// Decode dot (per weight, counted from the code): one 32-bit load per 4 codes, a shift, a mask,
// a threadgroup read of the 256 E4M3 values (the table) and an FMA; the scale once per 32.
#pragma once

// E4M3 (bias 7, no infinities, S.1111.111 NaN) to float32, exact: normals built from their
// bits, subnormals m * 2^-9 (no float subnormal on the way, which a GPU may flush).
METAL_FUNC float ds4_e4m3(uint c) {
  uint e = (c >> 3) & 15u;
  uint m = c & 7u;
  float v = e == 0u ? float(m) * 0x1p-9f : as_type<float>(((e + 120u) << 23) | (m << 20));
  if (e == 15u && m == 7u) v = as_type<float>(0x7fc00000u);
  return (c & 0x80u) != 0u ? -v : v;
}

template <> struct QFmt<DS4_MXFP8> {
  static ulong row_bytes(uint k) { return ulong(k); }
  static ulong scale_bytes(uint k) { return ulong(k / 32); }
  enum { TAB = 256 };
  static void fill_tab(threadgroup uint* tab, uint t, uint n) {
    for (uint i = t; i < 256u; i += n) tab[i] = as_type<uint>(ds4_e4m3(i));
  }
  static void prep(uint, thread float*) {}
  static float dot32(const device uint8_t* w, const device uint8_t* s, uint e,
                     thread const float* xs, threadgroup const uint* tab) {
    const device uint* q = (const device uint*)w + e / 4;
    float acc = 0.0f;
    for (int i = 0; i < 8; ++i) {
      uint v = q[i];
      acc += as_type<float>(uint(tab[v & 0xFFu])) * xs[4 * i];
      acc += as_type<float>(uint(tab[(v >> 8) & 0xFFu])) * xs[4 * i + 1];
      acc += as_type<float>(uint(tab[(v >> 16) & 0xFFu])) * xs[4 * i + 2];
      acc += as_type<float>(uint(tab[v >> 24])) * xs[4 * i + 3];
    }
    return ds4_e8m0(s[e / 32]) * acc;
  }
};

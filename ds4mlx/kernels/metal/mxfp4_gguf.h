// GGUF MXFP4 (type 39): 32 weights in 17 bytes: E8M0 byte e, then 16 bytes of E2M1 codes,
// element j < 16 in the low nibble of qs[j] and element j + 16 in its high nibble.
// x = (2 * e2m1(code)) * 2^(e - 128), the half scale built bit by bit as ggml does (e = 0, 1
// subnormal, e = 255 finite), code 8 read as +0.
// Decode dot (instructions per weight, counted from the code): before, a byte load, a shift, a
// mask, a divergent `constant` table read, a multiply by the scale, an FMA, plus the block
// address and scale per 8: ~7. Now (17-byte blocks are byte aligned: byte loads, one per two
// codes) a mask or shift, a threadgroup table read and an FMA, the scale once per block: ~3.8.
#pragma once

constant float ds4_e2m1_doubled[16] = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 6.0f, 8.0f, 12.0f,
                                       0.0f, -1.0f, -2.0f, -3.0f, -4.0f, -6.0f, -8.0f, -12.0f};

METAL_FUNC float ds4_e8m0_half(uint sb) {
  return as_type<float>(sb < 2 ? (0x00200000u << sb) : ((sb - 1) << 23));
}

template <> struct QFmt<DS4_MXFP4_GGUF> {
  static ulong row_bytes(uint k) { return ulong(k / DS4_MXFP4_BLOCK) * DS4_MXFP4_BYTES; }
  static ulong scale_bytes(uint) { return 0; }
  static void load8(const device uint8_t* w, const device uint8_t*, uint e, thread float* v) {
    const device uint8_t* b = w + (e / DS4_MXFP4_BLOCK) * DS4_MXFP4_BYTES;
    float d = ds4_e8m0_half(b[0]);
    uint j = e % DS4_MXFP4_BLOCK;
    const device uint8_t* q = b + 1 + j % 16;
    uint shift = j < 16 ? 0 : 4;
    for (int i = 0; i < 8; ++i) v[i] = d * ds4_e2m1_doubled[(q[i] >> shift) & 15];
  }
  enum { TAB = 16 };
  static void fill_tab(threadgroup uint* tab, uint t, uint n) {
    for (uint i = t; i < 16; i += n) tab[i] = as_type<uint>(float(ds4_e2m1_doubled[i]));
  }
  static void prep(uint, thread float*) {}
  static float dot32(const device uint8_t* w, const device uint8_t*, uint e,
                     thread const float* xs, threadgroup const uint* tab) {
    const device uint8_t* b = w + (e / DS4_MXFP4_BLOCK) * DS4_MXFP4_BYTES;
    float acc = 0.0f;
    for (int i = 0; i < 16; ++i) {
      uint q = b[1 + i];
      acc += as_type<float>(uint(tab[q & 15])) * xs[i] + as_type<float>(uint(tab[q >> 4])) * xs[16 + i];
    }
    return ds4_e8m0_half(b[0]) * acc;
  }
};

// GGUF Q2_K: 256 weights in 84 bytes: 16 scale bytes (low nibble scale, high nibble min of
// sub-block i = elements 16i..16i+15), 64 bytes of 2-bit codes, fp16 d, fp16 dmin.
// x = (d * (s_i & 15)) * q - dmin * (s_i >> 4). Element 128h + 32t + l is
// (qs[32h + l] >> 2t) & 3.
#pragma once

template <> struct QFmt<DS4_Q2_K> {
  static ulong row_bytes(uint k) { return ulong(k / DS4_Q2_K_BLOCK) * DS4_Q2_K_BYTES; }
  static ulong scale_bytes(uint) { return 0; }
  static void load8(const device uint8_t* w, const device uint8_t*, uint e, thread float* v) {
    const device uint8_t* b = w + (e / DS4_Q2_K_BLOCK) * DS4_Q2_K_BYTES;
    uint r = e % DS4_Q2_K_BLOCK;
    uint s = b[r / 16];
    float dl = ds4_half_at(b + 80) * float(s & 15);
    float ml = ds4_half_at(b + 82) * float(s >> 4);
    const device uint8_t* q = b + 16 + 32 * (r / 128) + r % 32;
    uint shift = 2 * ((r % 128) / 32);
    for (int i = 0; i < 8; ++i) v[i] = dl * float((q[i] >> shift) & 3) - ml;
  }
};

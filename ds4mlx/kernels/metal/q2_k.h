// GGUF Q2_K: 256 weights in 84 bytes: 16 scale bytes (low nibble scale, high nibble min of
// sub-block i = elements 16i..16i+15), 64 bytes of 2-bit codes, fp16 d, fp16 dmin.
// x = (d * (s_i & 15)) * q - dmin * (s_i >> 4). Element 128h + 32t + l is
// (qs[32h + l] >> 2t) & 3.
// Decode dot (instructions per weight, counted from the code): before, per weight a byte load,
// shift, mask, convert and two FMAs, plus ~25 per 8 (address, scale byte, two byte-wise fp16
// loads): ~9.1. Now, per 32 (two sub-blocks of 16, one code shift t): eight 32-bit loads, four
// codes masked in place per word (x pre-scaled by 2^-(2t + 8k)), so a mask, a convert and an
// FMA per weight; scales, mins (dmin * m_i * sum(x), per sub-block) and d, dmin (one 32-bit
// load) ~20 per 32; x pre-scaling and sums ~0.3: ~3.25 + 0.6 + 0.3 = ~4.2.
#pragma once

template <> struct QFmt<DS4_Q2_K> : ds4_no_table {
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
  // sums of the two sub-blocks, then xs[i] *= 2^-(2t + 8 (i % 4))
  static void prep(uint e, thread float* xs) {
    ds4_sum_into(xs, 0, 16, 32);
    ds4_sum_into(xs, 16, 16, 33);
    float f = float(1u << (2 * ((e % 128) / 32)));
    ds4_scale_byte_lanes(xs, 1.0f / f);  // exact: a power of two
  }
  static float dot32(const device uint8_t* w, const device uint8_t*, uint e,
                     thread const float* xs, threadgroup const uint*) {
    const device uint8_t* b = w + (e / DS4_Q2_K_BLOCK) * DS4_Q2_K_BYTES;
    uint r = e % DS4_Q2_K_BLOCK;
    const device uint* q = (const device uint*)(b + 16 + 32 * (r / 128));
    uint mask = 3u << (2 * ((r % 128) / 32));
    float acc[2] = {0.0f, 0.0f};
    for (int h = 0; h < 2; ++h)
      for (int i = 4 * h; i < 4 * h + 4; ++i) {
        uint v = q[i];
        acc[h] += float(v & mask) * xs[4 * i] + float(v & (mask << 8)) * xs[4 * i + 1] +
                  float(v & (mask << 16)) * xs[4 * i + 2] + float(v & (mask << 24)) * xs[4 * i + 3];
      }
    uint s = *(const device ushort*)(b + r / 16);  // the two sub-blocks' scale bytes
    uint dm = *(const device uint*)(b + 80);
    float d = ds4_half_lo(dm), dmin = ds4_half_hi(dm);
    return d * (float(s & 15) * acc[0] + float((s >> 8) & 15) * acc[1]) -
           dmin * (float((s >> 4) & 15) * xs[32] + float(s >> 12) * xs[33]);
  }
};

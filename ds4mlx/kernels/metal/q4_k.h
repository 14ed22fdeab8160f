// GGUF Q4_K: 256 weights in 144 bytes: fp16 d, fp16 dmin, 12 bytes of packed 6-bit
// (scale, min) for 8 sub-blocks of 32, 128 bytes of 4-bit codes.
// Sub-block j: x = (d * sc_j) * q - dmin * m_j. Byte 32c + l of the codes holds element
// 64c + l (low nibble) and 64c + 32 + l (high nibble).
// Decode dot (instructions per weight, counted from the code): before, per weight a byte load,
// shift, mask, convert, the FMA of d*sc*q - dmin*m and the FMA with x, plus ~30 per 8 (block
// address, scale unpacking, two byte-wise fp16 loads): ~9.8. Now, per sub-block of 32: eight
// 32-bit loads, four codes masked in place per word (x pre-scaled by 2^-8k, 2^-4 more for the
// high nibbles), so per weight a mask, a convert and an FMA; the scale and the min term
// (dmin * m_j * sum(x)) once per sub-block, ~20 / 32; the pre-scaling and sums of x, ~2 per
// 32-wide x chunk, shared by the rows of a simdgroup (4 to 8): ~3.25 + 0.6 + 0.3 = ~4.2.
#pragma once

template <> struct QFmt<DS4_Q4_K> : ds4_no_table {
  static ulong row_bytes(uint k) { return ulong(k / DS4_Q4_K_BLOCK) * DS4_Q4_K_BYTES; }
  static ulong scale_bytes(uint) { return 0; }
  static void scale_min(const device uint8_t* b, uint j, thread uint& sc, thread uint& m) {
    const device uint8_t* s = b + 4;
    if (j < 4) {
      sc = s[j] & 63;
      m = s[j + 4] & 63;
    } else {
      sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
      m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
  }
  static void load8(const device uint8_t* w, const device uint8_t*, uint e, thread float* v) {
    const device uint8_t* b = w + (e / DS4_Q4_K_BLOCK) * DS4_Q4_K_BYTES;
    uint r = e % DS4_Q4_K_BLOCK;
    uint j = r / 32;
    uint sc, m;
    scale_min(b, j, sc, m);
    float dl = ds4_half_at(b) * float(sc);
    float ml = ds4_half_at(b + 2) * float(m);
    const device uint8_t* q = b + 16 + 32 * (r / 64) + r % 32;
    uint shift = 4 * (j & 1);
    for (int i = 0; i < 8; ++i) v[i] = dl * float((q[i] >> shift) & 15) - ml;
  }
  // xs[i] *= 2^-(8 (i % 4) + 4 (j & 1)): the power of two the in-place mask leaves on code i
  static void prep(uint e, thread float* xs) {
    ds4_sum_into(xs, 0, 32, 32);
    float hi = ((e % DS4_Q4_K_BLOCK) / 32) & 1 ? 0.0625f : 1.0f;
    ds4_scale_byte_lanes(xs, hi);
  }
  static float dot32(const device uint8_t* w, const device uint8_t*, uint e,
                     thread const float* xs, threadgroup const uint*) {
    const device uint8_t* b = w + (e / DS4_Q4_K_BLOCK) * DS4_Q4_K_BYTES;
    uint r = e % DS4_Q4_K_BLOCK;
    uint j = r / 32;
    uint sc, m;
    scale_min(b, j, sc, m);
    uint dm = *(const device uint*)b;
    const device uint* q = (const device uint*)(b + 16 + 32 * (r / 64));
    uint mask = (j & 1) ? 0xF0u : 0x0Fu;
    float acc = 0.0f;
    for (int i = 0; i < 8; ++i) {
      uint v = q[i];
      acc += float(v & mask) * xs[4 * i] + float(v & (mask << 8)) * xs[4 * i + 1] +
             float(v & (mask << 16)) * xs[4 * i + 2] + float(v & (mask << 24)) * xs[4 * i + 3];
    }
    return ds4_half_lo(dm) * float(sc) * acc - ds4_half_hi(dm) * float(m) * xs[32];
  }
};

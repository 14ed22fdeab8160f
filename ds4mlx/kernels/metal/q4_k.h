// GGUF Q4_K: 256 weights in 144 bytes: fp16 d, fp16 dmin, 12 bytes of packed 6-bit
// (scale, min) for 8 sub-blocks of 32, 128 bytes of 4-bit codes.
// Sub-block j: x = (d * sc_j) * q - dmin * m_j. Byte 32c + l of the codes holds element
// 64c + l (low nibble) and 64c + 32 + l (high nibble).
#pragma once

template <> struct QFmt<DS4_Q4_K> {
  static ulong row_bytes(uint k) { return ulong(k / DS4_Q4_K_BLOCK) * DS4_Q4_K_BYTES; }
  static ulong scale_bytes(uint) { return 0; }
  static void load8(const device uint8_t* w, const device uint8_t*, uint e, thread float* v) {
    const device uint8_t* b = w + (e / DS4_Q4_K_BLOCK) * DS4_Q4_K_BYTES;
    uint r = e % DS4_Q4_K_BLOCK;
    uint j = r / 32;
    const device uint8_t* s = b + 4;
    uint sc, m;
    if (j < 4) {
      sc = s[j] & 63;
      m = s[j + 4] & 63;
    } else {
      sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
      m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    float dl = ds4_half_at(b) * float(sc);
    float ml = ds4_half_at(b + 2) * float(m);
    const device uint8_t* q = b + 16 + 32 * (r / 64) + r % 32;
    uint shift = 4 * (j & 1);
    for (int i = 0; i < 8; ++i) v[i] = dl * float((q[i] >> shift) & 15) - ml;
  }
};

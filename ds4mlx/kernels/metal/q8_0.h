// GGUF Q8_0: 32 weights in 34 bytes: fp16 d, int8 qs[32]; x = d * qs.
#pragma once

template <> struct QFmt<DS4_Q8_0> {
  static ulong row_bytes(uint k) { return ulong(k / DS4_Q8_0_BLOCK) * DS4_Q8_0_BYTES; }
  static ulong scale_bytes(uint) { return 0; }
  static void load8(const device uint8_t* w, const device uint8_t*, uint e, thread float* v) {
    const device uint8_t* b = w + (e / DS4_Q8_0_BLOCK) * DS4_Q8_0_BYTES;
    float d = ds4_half_at(b);
    const device int8_t* q = (const device int8_t*)(b + 2 + e % DS4_Q8_0_BLOCK);
    for (int i = 0; i < 8; ++i) v[i] = float(q[i]) * d;
  }
};

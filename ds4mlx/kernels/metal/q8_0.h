// GGUF Q8_0: 32 weights in 34 bytes: fp16 d, int8 qs[32]; x = d * qs.
// Decode dot (instructions per weight, counted from the code; loads of x shared by the rows not
// counted): before (load8 + dot8) a byte load, a convert, a multiply by d, an FMA, plus the
// block's address and a byte-wise fp16 load per 8: ~5.3. Now one 16-bit load per 2 codes,
// a sign extension, a convert, an FMA, d once per block: ~3.7.
#pragma once

template <> struct QFmt<DS4_Q8_0> : ds4_no_table {
  static ulong row_bytes(uint k) { return ulong(k / DS4_Q8_0_BLOCK) * DS4_Q8_0_BYTES; }
  static ulong scale_bytes(uint) { return 0; }
  static void load8(const device uint8_t* w, const device uint8_t*, uint e, thread float* v) {
    const device uint8_t* b = w + (e / DS4_Q8_0_BLOCK) * DS4_Q8_0_BYTES;
    float d = ds4_half_at(b);
    const device int8_t* q = (const device int8_t*)(b + 2 + e % DS4_Q8_0_BLOCK);
    for (int i = 0; i < 8; ++i) v[i] = float(q[i]) * d;
  }
  static void prep(uint, thread float*) {}
  static float dot32(const device uint8_t* w, const device uint8_t*, uint e,
                     thread const float* xs, threadgroup const uint*) {
    // one block; 34-byte blocks are 2-byte aligned
    const device ushort* b = (const device ushort*)(w + (e / DS4_Q8_0_BLOCK) * DS4_Q8_0_BYTES);
    float acc = 0.0f;
    for (int i = 0; i < 16; ++i) {
      ushort q = b[1 + i];
      acc += float(int8_t(q & 0xFF)) * xs[2 * i] + float(int8_t(q >> 8)) * xs[2 * i + 1];
    }
    return float(as_type<half>(ushort(b[0]))) * acc;
  }
};

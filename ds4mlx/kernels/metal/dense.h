// Float weight rows (a dense projection the decode kernels read beside packed experts, e.g. the
// shared expert folded into the routed launches): K values of float32, float16 or bfloat16.
// Per weight: a load (16-bit ones: one 32-bit load per two, a shift or mask) and an FMA.
#pragma once

template <> struct QFmt<DS4_F32> : ds4_no_table {
  static ulong row_bytes(uint k) { return ulong(k) * 4; }
  static ulong scale_bytes(uint) { return 0; }
  static void load8(const device uint8_t* w, const device uint8_t*, uint e, thread float* v) {
    for (int i = 0; i < 8; ++i) v[i] = ((const device float*)w)[e + i];
  }
  static void prep(uint, thread float*) {}
  static float dot32(const device uint8_t* w, const device uint8_t*, uint e,
                     thread const float* xs, threadgroup const uint*) {
    const device float* p = (const device float*)w + e;
    float acc = 0.0f;
    for (int i = 0; i < 32; ++i) acc += p[i] * xs[i];
    return acc;
  }
};

template <> struct QFmt<DS4_F16> : ds4_no_table {
  static ulong row_bytes(uint k) { return ulong(k) * 2; }
  static ulong scale_bytes(uint) { return 0; }
  static void load8(const device uint8_t* w, const device uint8_t*, uint e, thread float* v) {
    for (int i = 0; i < 8; ++i) v[i] = float(((const device half*)w)[e + i]);
  }
  static void prep(uint, thread float*) {}
  static float dot32(const device uint8_t* w, const device uint8_t*, uint e,
                     thread const float* xs, threadgroup const uint*) {
    const device uint* p = (const device uint*)w + e / 2;  // rows of 2K bytes: 4-byte aligned
    float acc = 0.0f;
    for (int i = 0; i < 16; ++i) {
      uint v = p[i];
      acc += ds4_half_lo(v) * xs[2 * i] + ds4_half_hi(v) * xs[2 * i + 1];
    }
    return acc;
  }
};

template <> struct QFmt<DS4_BF16> : ds4_no_table {
  static ulong row_bytes(uint k) { return ulong(k) * 2; }
  static ulong scale_bytes(uint) { return 0; }
  static void load8(const device uint8_t* w, const device uint8_t*, uint e, thread float* v) {
    for (int i = 0; i < 8; ++i) v[i] = as_type<float>(uint(((const device ushort*)w)[e + i]) << 16);
  }
  static void prep(uint, thread float*) {}
  static float dot32(const device uint8_t* w, const device uint8_t*, uint e,
                     thread const float* xs, threadgroup const uint*) {
    const device uint* p = (const device uint*)w + e / 2;
    float acc = 0.0f;
    for (int i = 0; i < 16; ++i) {
      uint v = p[i];
      acc += as_type<float>(v << 16) * xs[2 * i] + as_type<float>(v & 0xFFFF0000u) * xs[2 * i + 1];
    }
    return acc;
  }
};

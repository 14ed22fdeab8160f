// MLX affine 8-bit, group 32 (GGUF Q8_0 as io/gguf.py loads it, quant/gguf/q8_0.py
// to_mlx_affine8; or an MLX dir converted with affine 8 bits): a row of K weights is K/4
// little-endian uint32 words, element i in byte i%4 of word i/4, an unsigned code q; per 32
// weights a scale s and a bias b in separate arrays of one dtype (float32, float16 or
// bfloat16: DS4_AFF8_F32 / _F16 / _BF16), x = s * q + b. A layout of the decode kernels only
// (the shared slot, gguf_matvec: dot32 with the biases through ds4_qdot, no load8).
// Decode dot: sum_i x_i (s q_i + b) = s sum_i (q_i - 128) x_i + (b + 128 s) sum_i x_i, so that
// Q8_0's b = -128 s leaves the second term exactly 0 (no cancellation of two large sums) and
// any other bias still holds. Per weight (counted from the code): one 32-bit load per 4 codes
// (flipped to signed bytes by one xor), a shift, a mask (the code stays in the top byte: the
// activations are pre-scaled by 2^-24, exact), a convert and an FMA; scale, bias once per 32.
#pragma once

struct ds4_scale_f32 {
  enum { BYTES = 4 };
  static float at(const device uint8_t* p, uint g) { return ((const device float*)p)[g]; }
};
struct ds4_scale_f16 {
  enum { BYTES = 2 };
  static float at(const device uint8_t* p, uint g) { return float(((const device half*)p)[g]); }
};
struct ds4_scale_bf16 {
  enum { BYTES = 2 };
  static float at(const device uint8_t* p, uint g) {
    return as_type<float>(uint(((const device ushort*)p)[g]) << 16);
  }
};

template <typename S> struct ds4_affine8 : ds4_no_table {
  static ulong row_bytes(uint k) { return ulong(k); }
  static ulong scale_bytes(uint k) { return ulong(k / 32) * uint(S::BYTES); }
  // xs[32] = the sum of the 32 activations, then each scaled by 2^-24 (the code's byte lane)
  static void prep(uint, thread float* xs) {
    ds4_sum_into(xs, 0, 32, 32);
    for (int i = 0; i < 32; ++i) xs[i] *= 0x1p-24f;
  }
  static float dot32b(const device uint8_t* w, const device uint8_t* s, const device uint8_t* b,
                      uint e, thread const float* xs, threadgroup const uint*) {
    const device uint* q = (const device uint*)w + e / 4;
    float acc = 0.0f;
    for (int i = 0; i < 8; ++i) {
      uint v = q[i] ^ 0x80808080u;  // q - 128 in each byte, two's complement
      acc += float(as_type<int>(v << 24)) * xs[4 * i];
      acc += float(as_type<int>((v << 16) & 0xFF000000u)) * xs[4 * i + 1];
      acc += float(as_type<int>((v << 8) & 0xFF000000u)) * xs[4 * i + 2];
      acc += float(as_type<int>(v & 0xFF000000u)) * xs[4 * i + 3];
    }
    float sc = S::at(s, e / 32);
    return sc * acc + (S::at(b, e / 32) + 128.0f * sc) * xs[32];
  }
};

template <> struct QFmt<DS4_AFF8_F32> : ds4_affine8<ds4_scale_f32> {};
template <> struct QFmt<DS4_AFF8_F16> : ds4_affine8<ds4_scale_f16> {};
template <> struct QFmt<DS4_AFF8_BF16> : ds4_affine8<ds4_scale_bf16> {};

template <int F> struct ds4_qdot_affine {
  static float dot(const device uint8_t* w, const device uint8_t* s, const device uint8_t* b,
                   uint e, thread const float* xs, threadgroup const uint* tab) {
    return QFmt<F>::dot32b(w, s, b, e, xs, tab);
  }
};
template <> struct ds4_qdot<DS4_AFF8_F32> : ds4_qdot_affine<DS4_AFF8_F32> {};
template <> struct ds4_qdot<DS4_AFF8_F16> : ds4_qdot_affine<DS4_AFF8_F16> {};
template <> struct ds4_qdot<DS4_AFF8_BF16> : ds4_qdot_affine<DS4_AFF8_BF16> {};

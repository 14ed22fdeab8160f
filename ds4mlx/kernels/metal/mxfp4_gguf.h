// GGUF MXFP4 (type 39): 32 weights in 17 bytes: E8M0 byte e, then 16 bytes of E2M1 codes,
// element j < 16 in the low nibble of qs[j] and element j + 16 in its high nibble.
// x = (2 * e2m1(code)) * 2^(e - 128), the half scale built bit by bit as ggml does (e = 0, 1
// subnormal, e = 255 finite), code 8 read as +0.
#pragma once

constant float ds4_e2m1_doubled[16] = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 6.0f, 8.0f, 12.0f,
                                       0.0f, -1.0f, -2.0f, -3.0f, -4.0f, -6.0f, -8.0f, -12.0f};

template <> struct QFmt<DS4_MXFP4_GGUF> {
  static ulong row_bytes(uint k) { return ulong(k / DS4_MXFP4_BLOCK) * DS4_MXFP4_BYTES; }
  static ulong scale_bytes(uint) { return 0; }
  static void load8(const device uint8_t* w, const device uint8_t*, uint e, thread float* v) {
    const device uint8_t* b = w + (e / DS4_MXFP4_BLOCK) * DS4_MXFP4_BYTES;
    uint sb = b[0];
    float d = as_type<float>(sb < 2 ? (0x00200000u << sb) : ((sb - 1) << 23));
    uint j = e % DS4_MXFP4_BLOCK;
    const device uint8_t* q = b + 1 + j % 16;
    uint shift = j < 16 ? 0 : 4;
    for (int i = 0; i < 8; ++i) v[i] = d * ds4_e2m1_doubled[(q[i] >> shift) & 15];
  }
};

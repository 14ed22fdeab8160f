// Quantized weight rows for the MoE kernels: one specialization of QFmt per block format, each
// in its own header (the byte layouts are documented, and dequantized in MLX ops, by
// ds4mlx/quant/gguf/<format>.py; MXFP4 follows MLX's mxfp4 mode; dense.h: float rows).
//
// A weight row of K inputs is `QFmt<F>::row_bytes(K)` packed bytes (plus, for MXFP4,
// `scale_bytes(K)` E8M0 scales in a separate array). `load8(w, s, e, v)` dequantizes elements
// e..e+7 (e a multiple of 8) of the row starting at w (scales at s) into v, in float32, with
// the same arithmetic as the MLX-ops dequantizer, so the values are bit-identical (dequant_rows
// and the tiled kernel use it).
//
// The decode kernels use a dot product instead, 32 weights (one block, sub-block or group of
// every format) at a time, written as the fastest mul_mv kernels are: the codes read with 16-
// or 32-bit loads and masked in place (no shift per weight: the activations are pre-scaled by
// the power of two the mask leaves, which is exact), the scale applied once per 32, the K-quant
// min term folded into one dmin * m_j * sum(x over the sub-block), and lookup tables read from
// threadgroup memory (no divergent `constant` reads):
//   QFmt<F>::TAB                 32-bit words of the format's table (1 when it has none);
//   QFmt<F>::fill_tab(tab, t, n) thread t of n copies its part of the table (then a barrier);
//   QFmt<F>::prep(e, xs)         xs[0..31] = activations e..e+31 (e a multiple of 32), rewritten
//                                in place as the format wants them, xs[32..33] their sums; done
//                                once per 32 activations for all the rows that meet them;
//   QFmt<F>::dot32(w, s, e, xs, tab) = sum_i W[e + i] x[e + i] for the row at w.
// The kernels call it through ds4_qdot<F>::dot(w, s, b, e, xs, tab): b is the row's biases
// (MLX affine, affine8.h: its QFmt has dot32b instead), which the other layouts ignore.
// The summation order differs from the ops twin's (which dequantizes, then multiplies): scale
// and min come out of the sum. In float32 that moves a result by a few ulp of the sum of |w x|
// (the tests allow 1e-5 of the largest output).
//
// Defined from Python (ds4mlx/kernels/source.py, the one home of each value): the layout ids
// DS4_Q8_0, DS4_Q4_K, DS4_Q2_K, DS4_IQ2_XXS, DS4_MXFP4 (MLX mxfp4: uint32 codes + separate
// E8M0 scales), DS4_MXFP4_GGUF (GGUF MXFP4 blocks), DS4_F32 / DS4_F16 / DS4_BF16 (float rows),
// and, for the decode kernels' dot only (a folded shared expert, gguf_matvec's dense
// projections), DS4_MXFP8 (MLX mxfp8) and DS4_AFF8_F32 / _F16 / _BF16 (MLX affine 8-bit,
// group 32, by the dtype of its scales and biases),
// and per GGUF format DS4_<F>_BLOCK weights in DS4_<F>_BYTES bytes (gguf.GGML_QUANT_SIZES).
// Row offsets are 64-bit: a stack of experts passes 2^32 bytes.
//
// Alignment of the wide loads (MLX buffers start 16-byte aligned, rows are whole blocks): Q8_0
// (34-byte blocks) and IQ2_XXS (66) are 2-byte aligned: 16-bit loads; Q4_K (144) 16, Q2_K (84)
// 4, MLX mxfp4 / mxfp8 / affine words 4: 32-bit loads; GGUF MXFP4 (17) is byte aligned: byte
// loads.
#pragma once

template <int F> struct QFmt;

// The dot of one row's 32 weights; specialized for the layouts with biases (affine8.h).
template <int F> struct ds4_qdot {
  static float dot(const device uint8_t* w, const device uint8_t* s, const device uint8_t*,
                   uint e, thread const float* xs, threadgroup const uint* tab) {
    return QFmt<F>::dot32(w, s, e, xs, tab);
  }
};

METAL_FUNC float ds4_half_at(const device uint8_t* p) {
  return float(as_type<half>(ushort(uint(p[0]) | (uint(p[1]) << 8))));
}

METAL_FUNC float ds4_half_lo(uint v) { return float(as_type<half>(ushort(v & 0xFFFFu))); }
METAL_FUNC float ds4_half_hi(uint v) { return float(as_type<half>(ushort(v >> 16))); }

// For formats without a table.
struct ds4_no_table {
  enum { TAB = 1 };
  static void fill_tab(threadgroup uint*, uint, uint) {}
};

// sum of xs[0..n) into xs[at] (the min term's sum over a sub-block).
METAL_FUNC void ds4_sum_into(thread float* xs, int from, int n, int at) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) s += xs[from + i];
  xs[at] = s;
}

// xs[i] *= f * 2^-(8 (i % 4)) for the 32 activations: a code masked in place inside a 32-bit
// word keeps the power of two of its byte lane (and f that of its bits in the byte)
METAL_FUNC void ds4_scale_byte_lanes(thread float* xs, float f) {
  for (int i = 0; i < 32; i += 4) {
    xs[i] *= f;
    xs[i + 1] *= f * 0x1p-8f;
    xs[i + 2] *= f * 0x1p-16f;
    xs[i + 3] *= f * 0x1p-24f;
  }
}

#include "q8_0.h"
#include "q4_k.h"
#include "q2_k.h"
#include "iq2_xxs.h"
#include "mxfp4.h"
#include "mxfp4_gguf.h"
#include "dense.h"
#include "mxfp8.h"
#include "affine8.h"

// Quantized weight rows for the MoE kernels: one specialization of QFmt per block format, each
// in its own header (the byte layouts are documented, and dequantized in MLX ops, by
// ds4mlx/quant/gguf/<format>.py; MXFP4 follows MLX's mxfp4 mode).
//
// A weight row of K inputs is `QFmt<F>::row_bytes(K)` packed bytes (plus, for MXFP4,
// `scale_bytes(K)` E8M0 scales in a separate array). `load8(w, s, e, v)` dequantizes elements
// e..e+7 (e a multiple of 8) of the row starting at w (scales at s) into v, in float32, with
// the same arithmetic as the MLX-ops dequantizer, so the values are bit-identical.
//
// Defined from Python (ds4mlx/kernels/__init__.py, the one home of each value): the layout ids
// DS4_Q8_0, DS4_Q4_K, DS4_Q2_K, DS4_IQ2_XXS, DS4_MXFP4 (MLX mxfp4: uint32 codes + separate
// E8M0 scales), DS4_MXFP4_GGUF (GGUF MXFP4 blocks), and per GGUF format DS4_<F>_BLOCK weights
// in DS4_<F>_BYTES bytes (gguf.GGML_QUANT_SIZES). Row offsets are 64-bit: a stack of experts
// passes 2^32 bytes.
#pragma once

template <int F> struct QFmt;

METAL_FUNC float ds4_half_at(const device uint8_t* p) {
  return float(as_type<half>(ushort(uint(p[0]) | (uint(p[1]) << 8))));
}

#include "q8_0.h"
#include "q4_k.h"
#include "q2_k.h"
#include "iq2_xxs.h"
#include "mxfp4.h"
#include "mxfp4_gguf.h"

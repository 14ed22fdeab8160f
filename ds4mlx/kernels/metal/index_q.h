// The Lightning Indexer's query steps (kernel index_q in rows.metal, and indexer_scores_q in
// attention.metal, which runs them in its own launch): RoPE of the last RD features, then with
// FP4 the orthonormal Hadamard rotation and the e2m1 round trip in blocks of DS4_MX_GROUP with
// power-of-two scales (ds4mlx/model/qat.py hadamard_fp4), each step rounded to the queries'
// dtype. DS4_MX_GROUP and DS4_E2M1_MAX are defined from quant/codecs.py by kernels/source.py.
#pragma once

// 2^ceil(log2(x)) of a positive normal float, from the bits.
METAL_FUNC float ds4_pow2_ceil(float x) {
  uint u = as_type<uint>(x);
  uint e = ((u >> 23) & 0xffu) + ((u & 0x7fffffu) != 0u ? 1u : 0u);
  return as_type<float>(e << 23);
}

// 2^ceil(log2(a / 6)) for a positive normal float, exactly: the power of two p with
// 6 * p >= a > 3 * p (fast-math division may be an ulp off; the products are exact).
METAL_FUNC float ds4_fp4_scale(float a) {
  float p = ds4_pow2_ceil(a / DS4_E2M1_MAX);
  if (DS4_E2M1_MAX * 0.5f * p >= a) p *= 0.5f;
  if (DS4_E2M1_MAX * p < a) p *= 2.0f;
  return p;
}

// e2m1 rounding of |q| <= 6 (ties to the even code, as quant/codecs.py e2m1_round_mx).
METAL_FUNC float ds4_e2m1(float q) {
  float m = fabs(q);
  int code = (m > 0.25f ? 1 : 0) + (m >= 0.75f ? 1 : 0) + (m > 1.25f ? 1 : 0) +
             (m >= 1.75f ? 1 : 0) + (m > 2.5f ? 1 : 0) + (m >= 3.5f ? 1 : 0) + (m > 5.0f ? 1 : 0);
  float r = code <= 4 ? 0.5f * float(code) : (code == 5 ? 3.0f : (code == 6 ? 4.0f : 6.0f));
  return q < 0.0f ? -r : r;
}

// cos / sin of position p times each of the n frequencies into cs / sn (threadgroup): thread
// t of nt takes k = t, t + nt, ...; the caller syncs the threadgroup before reading them.
METAL_FUNC void ds4_rope_table(float p, const device float* freqs, uint n, uint t, uint nt,
                               threadgroup float* cs, threadgroup float* sn) {
  for (uint k = t; k < n; k += nt) {
    float angle = p * freqs[k];
    cs[k] = precise::cos(angle);
    sn[k] = precise::sin(angle);
  }
}

// One query row x [D] (T) by one simdgroup: lane l's D / 32 features from l * D / 32 into v,
// rotated with the table of ds4_rope_table (rounded to T), with FP4 Hadamard + FP4 rounded (to
// T). D a power of two, 64..1024 (a lane holds whole RoPE pairs); every lane calls (shuffles).
template <typename T, int D, int RD, bool FP4>
METAL_FUNC void ds4_index_q_row(const device T* x, uint lane, threadgroup const float* cs,
                                threadgroup const float* sn, thread float* v) {
  const int DPL = D / 32;
  for (int j = 0; j < DPL; ++j) v[j] = float(x[lane * uint(DPL) + j]);
  int first = int(lane) * DPL;
  if (first + DPL > D - RD) {  // RoPE lane
    for (int j = 0; j < DPL; j += 2) {
      if (first + j < D - RD) continue;
      int k = (first + j - (D - RD)) / 2;
      float c = cs[k], s = sn[k];
      float x0 = v[j], x1 = v[j + 1];
      v[j] = float(T(x0 * c - x1 * s));
      v[j + 1] = float(T(x0 * s + x1 * c));
    }
  }
  if (FP4) {
    // fast Walsh-Hadamard transform: strides below DPL within a lane, the others across lanes
    for (int st = 1; st < DPL; st *= 2)
      for (int j = 0; j < DPL; ++j)
        if ((j & st) == 0) {
          float a = v[j], b = v[j + st];
          v[j] = a + b;
          v[j + st] = a - b;
        }
    for (int m = 1; m < 32; m *= 2)
      for (int j = 0; j < DPL; ++j) {
        float other = simd_shuffle_xor(v[j], ushort(m));
        v[j] = (lane & uint(m)) ? other - v[j] : v[j] + other;
      }
    const float hscale = 1.0f / precise::sqrt(float(D));
    float amax = 0.0f;
    for (int j = 0; j < DPL; ++j) {
      v[j] *= hscale;
      amax = max(amax, fabs(v[j]));
    }
    for (int m = 1; m < DS4_MX_GROUP / DPL; m *= 2)
      amax = max(amax, simd_shuffle_xor(amax, ushort(m)));
    float scale = ds4_fp4_scale(max(amax, DS4_E2M1_MAX * 1.1754943508222875e-38f));
    for (int j = 0; j < DPL; ++j) {
      float q = clamp(v[j] / scale, -DS4_E2M1_MAX, DS4_E2M1_MAX);
      v[j] = float(T(ds4_e2m1(q) * scale));
    }
  }
}

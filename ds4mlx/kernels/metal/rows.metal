// Per-row steps of the attention fused in one kernel (ds4mlx/model/rope.py rotate_rows is the
// call site and runs the ops twin): RMS normalisation (plain, or with a weight), the RoPE
// rotation of the last RD features (interleaved pairs, angle = position * frequency, or its
// inverse) and the FP8 e4m3 round trip of the other features in blocks of 64 with
// power-of-two scales (ds4mlx/model/qat.py). As ops these are some 30 launches per call.
//
// Each `// @kernel NAME` section is the body of one mx.fast.metal_kernel (see moe.metal).
// Between the steps the value is rounded to OutT, as the ops twin stores each step's result
// in the output dtype. cos / sin / rsqrt are precise::, so the values match the twin.

// DS4_FP8_BLOCK (64) and DS4_E4M3_MAX (448) are defined from quant/codecs.py by kernels/source.py.

// e4m3 round trip of |v| <= 448: nearest even on 3 mantissa bits (subnormals step 2^-9).
METAL_FUNC float ds4_e4m3(float v) {
  float a = min(fabs(v), DS4_E4M3_MAX);
  float r;
  if (a >= 0.015625f) {  // 2^-6, the smallest normal
    uint u = as_type<uint>(a);
    u = (u + 0x7ffffu + ((u >> 20) & 1u)) & 0xfff00000u;
    r = min(as_type<float>(u), DS4_E4M3_MAX);
  } else {
    r = rint(a * 512.0f) / 512.0f;
  }
  return v < 0.0f ? -r : r;
}

#include "index_q.h"

// Compressor rows (kernels comp_rows and rope_rows with COMP): feature f of x [K] . w[f] + bias[f]
// (float32) by one simdgroup, written to row `row` of o0 [R, N0] (f < N0) or o1 [R, N1].
METAL_FUNC void ds4_comp_feature(const device float* x, const device float* w,
                                 const device float* bias, uint f, uint k_in, uint n0, uint n1,
                                 uint row, device float* o0, device float* o1, uint lane) {
  if (f >= n0 + n1) return;  // uniform over the simdgroup
  ulong wrow = ulong(f) * k_in;
  float acc = 0.0f;
  for (uint k = lane; k < k_in; k += 32) acc += x[k] * w[wrow + k];
  acc = simd_sum(acc) + bias[f];
  if (lane == 0) {
    if (f < n0) o0[ulong(row) * n0 + f] = acc;
    else o1[ulong(row) * n1 + (f - n0)] = acc;
  }
}

// The other rows of the buffers p0 [R, N0] and p1 [R, N1] (n1 = 0: none) copied: this thread's
// share, elements first, first + stride, ...
METAL_FUNC void ds4_comp_copy(const device float* p0, const device float* p1, device float* o0,
                              device float* o1, uint n0, uint n1, uint r, uint row, ulong first,
                              ulong stride) {
  for (ulong e = first; e < ulong(r) * n0; e += stride)
    if (e / n0 != row) o0[e] = p0[e];
  for (ulong e = first; n1 > 0u && e < ulong(r) * n1; e += stride)
    if (e / n1 != row) o1[e] = p1[e];
}

// @kernel rope_rows
// x [R, D] (T), w [D] (WT, read when NORM == 2), pos [R] int32, freqs [RD / 2] float32
// -> out [R, D] (OutT). NORM: 0 none, 1 plain RMS, 2 RMS times w; FP8: round the first D - RD
// features; INV: inverse rotation. Grid (32, R), threadgroup (32, 1, 1): a simdgroup per row,
// lane l owns the D / 32 features from l * D / 32 (whole RoPE pairs, whole FP8 blocks' parts).
// DQ > 0: the grid has R more rows, the rows qr [R, DQ] (T) of another RMSNorm (times wq [DQ],
// WT; eps), written to qn [R, DQ] (T) rounded twice as mx.fast.rms_norm does (the attention's
// q_norm, in the launch of its kv rows).
// COMP: the grid has CN0 + CN1 more rows, one compressor feature each (kernel comp_rows, whose
// inputs and outputs carry a c prefix here): the layer's compressor step in this launch too.
const int DPL = D / 32;
const int LPB = DS4_FP8_BLOCK / DPL;  // lanes per FP8 block
threadgroup float lane_max[32];
uint row = threadgroup_position_in_grid.y;
uint lane = thread_index_in_simdgroup;
uint own = uint(R) * (DQ > 0 ? 2u : 1u);  // rows of the kv and q_norm roles
if (!COMP && row == 0 && lane == 0) {
  co0[0] = 0.0f;
  co1[0] = 0.0f;
}
if (COMP && row >= own) {  // a compressor feature (a whole threadgroup)
  uint cf = row - own, nf = uint(CN0 + CN1);
  ds4_comp_feature(cx, cw, cbias, cf, uint(CK), uint(CN0), uint(CN1), uint(CROW), co0, co1, lane);
  ds4_comp_copy(cp0, cp1, co0, co1, uint(CN0), uint(CN1), uint(CR), uint(CROW),
                ulong(cf) * 32 + lane, ulong(nf) * 32);
  if (CN1 == 0 && cf == 0 && lane == 0) co1[0] = 0.0f;
  return;
}
if (DQ > 0 && row >= uint(R)) {  // a whole threadgroup (one simdgroup) takes this branch
  const int QPL = DQ > 0 ? DQ / 32 : 1;
  ulong qb = ulong(row - uint(R)) * uint(DQ) + lane * uint(QPL);
  float u[QPL];
  float ss = 0.0f;
  for (int j = 0; j < QPL; ++j) {
    u[j] = float(qr[qb + j]);
    ss += u[j] * u[j];
  }
  float inv = precise::rsqrt(simd_sum(ss) / float(DQ) + eps);
  for (int j = 0; j < QPL; ++j)
    qn[qb + j] = T(float(T(u[j] * inv)) * float(wq[lane * uint(QPL) + j]));
  return;
}
ulong base = ulong(row) * uint(D) + lane * uint(DPL);
float v[DPL];
for (int j = 0; j < DPL; ++j) v[j] = float(x[base + j]);
if (NORM > 0) {
  float ss = 0.0f;
  for (int j = 0; j < DPL; ++j) ss += v[j] * v[j];
  float inv = precise::rsqrt(simd_sum(ss) / float(D) + eps);
  for (int j = 0; j < DPL; ++j) {
    float y = v[j] * inv;
    if (NORM == 2) y *= float(w[lane * uint(DPL) + j]);
    v[j] = float(OutT(y));
  }
}
int first = int(lane) * DPL;
if (first >= D - RD) {  // RoPE lane
  float p = float(pos[row]);
  for (int j = 0; j < DPL; j += 2) {
    int k = (first + j - (D - RD)) / 2;
    float angle = p * freqs[k];
    float c = precise::cos(angle), sn = precise::sin(angle);
    if (INV) sn = -sn;
    float x0 = v[j], x1 = v[j + 1];
    v[j] = float(OutT(x0 * c - x1 * sn));
    v[j + 1] = float(OutT(x0 * sn + x1 * c));
  }
}
if (FP8) {
  float amax = 0.0f;
  for (int j = 0; j < DPL; ++j) amax = max(amax, fabs(v[j]));
  lane_max[lane] = amax;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (first < D - RD) {
    uint lead = lane / uint(LPB) * uint(LPB);
    float bmax = 0.0f;
    for (int g = 0; g < LPB; ++g) bmax = max(bmax, lane_max[lead + g]);
    float scale = ds4_pow2_ceil(max(bmax, 1e-4f) / DS4_E4M3_MAX);
    for (int j = 0; j < DPL; ++j) {
      float q = clamp(v[j] / scale, -DS4_E4M3_MAX, DS4_E4M3_MAX);
      v[j] = float(OutT(ds4_e4m3(q) * scale));
    }
  }
}
for (int j = 0; j < DPL; ++j) out[base + j] = OutT(v[j]);

// @kernel index_q
// The Lightning Indexer's queries and head weights of N tokens (ds4mlx/model/compressor.py
// Indexer.rotate_queries / project_queries are the ops twin): x [R, D] (T) projected
// queries (R = tokens x heads), wr [R] (WT) head weights, pos [R] int32, freqs [RD / 2]
// float32 -> q [R, D] float32: RoPE of the last RD features (rounded to T), then with FP4 the
// orthonormal Hadamard rotation of the row (in float32) and the e2m1 round trip in blocks of
// DS4_MX_GROUP with power-of-two scales, rounded to T; w [R] float32 = wr * wscale.
// Grid (32, R), threadgroup (32, 1, 1): a simdgroup per row (ds4_index_q_row, metal/index_q.h).
const int DPL = D / 32;
threadgroup float cs[RD / 2];
threadgroup float sn[RD / 2];
uint row = threadgroup_position_in_grid.y;
uint lane = thread_index_in_simdgroup;
ds4_rope_table(float(pos[row]), freqs, uint(RD / 2), lane, 32, cs, sn);
threadgroup_barrier(mem_flags::mem_threadgroup);
float v[DPL];
ds4_index_q_row<T, D, RD, FP4>(x + ulong(row) * uint(D), lane, cs, sn, v);
ulong base = ulong(row) * uint(D) + lane * uint(DPL);
for (int j = 0; j < DPL; ++j) q[base + j] = v[j];
if (lane == 0) w[row] = float(wr[row]) * wscale;

// @kernel comp_rows
// One token's step of a layer's compressors (ratio 4: the attention's and the indexer's, which
// read the same input; ratio 128: the attention's): the float32 product of x [K] with the merged
// kv | score weights w [N0 + N1, K] plus the slot's bias row [N0 + N1] (the APE on the score
// rows), written as row n of the unfinished window's buffers: o0 = p0 [B=1, R, N0] with row n
// the first N0 features, o1 = p1 [1, R, N1] with row n the other N1 (N1 = 0: o1 is one element,
// zero). Grid (TG * ceil((N0 + N1) / SG), 1, 1), threadgroup (TG, 1, 1), TG = 32 * SG: simdgroup
// g of threadgroup i takes feature i * SG + g (lanes stride K); every thread copies its share of
// the buffers' other rows.
const uint SG = 8;
uint tg = threadgroup_position_in_grid.x;
uint t = thread_index_in_threadgroup;
ds4_comp_feature(x, w, bias, tg * SG + simdgroup_index_in_threadgroup, uint(K), uint(N0),
                 uint(N1), uint(n), o0, o1, thread_index_in_simdgroup);
ds4_comp_copy(p0, p1, o0, o1, uint(N0), uint(N1), uint(R), uint(n), ulong(tg) * 32 * SG + t,
              ulong(threadgroups_per_grid.x) * 32 * SG);
if (N1 == 0 && tg == 0 && t == 0) o1[0] = 0.0f;

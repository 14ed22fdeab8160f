// Hyper-connection pre step fused in one kernel (ds4mlx/model/hyper.py hc_pre is its ops twin):
// RMS of the flattened streams, the mixing projection, sigmoid / softmax, the Sinkhorn rounds in
// float32 and the weighted collapse of the streams. 86 calls per token are launch-bound as ops.
//
// Each `// @kernel NAME` section is the body of one mx.fast.metal_kernel (see moe.metal).
// DS4_HC_TG (threads per threadgroup) and DS4_HC_CHUNK (inputs per threadgroup of the grid
// form) are defined from Python, which sizes the grid with them. The transcendental functions
// are precise::, so the mixing weights match the ops twin.

#include "grid.h"

#define DS4_HC_SIMDGROUPS (DS4_HC_TG / 32)

METAL_FUNC float ds4_sigmoid(float x) { return 1.0f / (1.0f + precise::exp(-x)); }

// Stream k of the previous sublayer's HC post at feature d: post_k * y + sum_i comb[i, k] * h_i,
// summed in the order of the ops twin (ds4mlx/ops.py hc_post). A macro, so that any address
// space of the arguments works (MLX passes inputs under 8 elements in `constant`).
#define DS4_HC_POST(out, k, d)                                                             \
  {                                                                                        \
    float mixed_ = combp[ulong(tok) * M * M + uint(k)] * float(h[base_h + uint(d)]);       \
    for (int i_ = 1; i_ < M; ++i_)                                                         \
      mixed_ += combp[ulong(tok) * M * M + uint(i_ * M + (k))] *                           \
                float(h[base_h + ulong(i_) * uint(D) + uint(d)]);                         \
    out = postp[ulong(tok) * M + uint(k)] * float(y[ulong(tok) * uint(D) + uint(d)]) + mixed_; \
  }

// @kernel hc_pre
// h [N, M * D] (T: M streams of D per token), fn [MIX, M * D] (FT), base [MIX], scale [3]
// (float32), MIX = 2M + M^2 -> x [N, D] (XT: rounded once, as a cast after the sum), post [N, M],
// comb [N, M * M] (float32).
// POST: h holds the streams before the previous sublayer, whose HC post this kernel runs
// first, from its output y [N, D] (YT) and postp [N, M], combp [N, M * M] (float32); the new
// streams are written to hn [N, M * D] float32 (the residual of the next post).
// NORMW: x is then RMS-normalised times nw [D] (WT) with x_eps, as the sublayer's RMSNorm
// (each step rounded to XT, as mx.fast.rms_norm on the rounded x does).
// XF: x is also written in float32 to xf [N, D] (for the sublayer's float32 consumers: the
// router, the compressors), the cast that would be a launch of its own.
// Grid (TG, N), threadgroup (TG, 1, 1): one threadgroup per token, which reads all of fn.
// GRID: grid (G * TG, N), G = ceil(M * D / DS4_HC_CHUNK) threadgroups per token (one launch, the
// last-threadgroup pattern of metal/grid.h): threadgroup g takes inputs [g * CHUNK, (g + 1) *
// CHUNK) of the token's M * D (their HC post, written to hn, their sum of squares and their
// MIX dot products with fn's rows), writes those MIX + 1 partials to gpart [N, G, MIX + 1]
// (float bits, uint32) and counts itself in on counter[tok] (a zeroed input, >= N long); the
// last to arrive sums the partials in chunk order and alone goes on with the weights, the
// collapse and the norm (recomputing the post from the inputs, as the one-threadgroup form
// does), then puts counter[tok] back to 0.
const int MIX = 2 * M + M * M;
static_assert(2 * M + M * M < DS4_HC_TG, "one thread per partial");
threadgroup float part[DS4_HC_SIMDGROUPS * (2 * M + M * M + 1)];
threadgroup float pre_w[M];
threadgroup float gtot[2 * M + M * M + 1];
threadgroup uint last_flag[1];
uint tok = threadgroup_position_in_grid.y;
uint t = thread_index_in_threadgroup;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
uint md = uint(M) * uint(D);
ulong base_h = ulong(tok) * md;
uint chunk = GRID ? threadgroup_position_in_grid.x : 0u;
uint lo = chunk * uint(DS4_HC_CHUNK);
uint hi = GRID ? min(lo + uint(DS4_HC_CHUNK), md) : md;

// sum of squares and the MIX dot products, strided over the threadgroup
float acc[2 * M + M * M + 1];
for (int j = 0; j <= MIX; ++j) acc[j] = 0.0f;
for (uint i = lo + t; i < hi; i += DS4_HC_TG) {
  float v;
  if (POST) {
    DS4_HC_POST(v, i / uint(D), i % uint(D));
    hn[base_h + i] = v;
  } else {
    v = float(h[base_h + i]);
  }
  acc[MIX] += v * v;
  for (int j = 0; j < MIX; ++j) acc[j] += v * float(fn[ulong(j) * md + i]);
}
for (int j = 0; j <= MIX; ++j) {
  float s = simd_sum(acc[j]);
  if (lane == 0) part[sg * (MIX + 1) + j] = s;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

if (GRID) {
  // this chunk's partials (its simdgroups in order), then the last threadgroup sums the
  // chunks' in chunk order
  uint groups = threadgroups_per_grid.x;
  device atomic_uint* cnt = (device atomic_uint*)counter + tok;
  device atomic_uint* gp = (device atomic_uint*)gpart + ulong(tok) * groups * uint(MIX + 1);
  if (t <= uint(MIX)) {
    float s = 0.0f;
    for (int g = 0; g < DS4_HC_SIMDGROUPS; ++g) s += part[g * (MIX + 1) + t];
    ds4_grid_put(gp + ulong(chunk) * uint(MIX + 1) + t, s);
  }
  if (!ds4_grid_last(cnt, groups, t, last_flag)) return;
  if (t <= uint(MIX)) {
    float s = 0.0f;
    for (uint c = 0; c < groups; ++c) s += ds4_grid_get(gp + ulong(c) * uint(MIX + 1) + t);
    gtot[t] = s;
  }
  ds4_grid_reset(cnt, t);
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

if (t == 0) {
  float tot[2 * M + M * M + 1];
  for (int j = 0; j <= MIX; ++j) {
    tot[j] = 0.0f;
    if (GRID) {
      tot[j] = gtot[j];
    } else {
      for (int s = 0; s < DS4_HC_SIMDGROUPS; ++s) tot[j] += part[s * (MIX + 1) + j];
    }
  }
  float inv = precise::rsqrt(tot[MIX] / float(md) + norm_eps);
  for (int i = 0; i < M; ++i) {
    pre_w[i] = ds4_sigmoid(tot[i] * inv * scale[0] + base[i]) + eps;
    post[ulong(tok) * M + i] = 2.0f * ds4_sigmoid(tot[M + i] * inv * scale[1] + base[M + i]);
  }
  // comb: row softmax (+ eps) and a column normalisation, then iters - 1 rounds of row and
  // column normalisation
  float c[M * M];
  for (int i = 0; i < M; ++i) {
    float mx = 0.0f;
    for (int j = 0; j < M; ++j) {
      c[i * M + j] = tot[2 * M + i * M + j] * inv * scale[2] + base[2 * M + i * M + j];
      mx = j == 0 ? c[i * M] : max(mx, c[i * M + j]);
    }
    float sum = 0.0f;
    for (int j = 0; j < M; ++j) {
      c[i * M + j] = precise::exp(c[i * M + j] - mx);
      sum += c[i * M + j];
    }
    for (int j = 0; j < M; ++j) c[i * M + j] = c[i * M + j] / sum + eps;
  }
  for (int it = 0; it < max(iters, 1); ++it) {
    if (it > 0) {
      for (int i = 0; i < M; ++i) {
        float sum = 0.0f;
        for (int j = 0; j < M; ++j) sum += c[i * M + j];
        for (int j = 0; j < M; ++j) c[i * M + j] = c[i * M + j] / (sum + eps);
      }
    }
    for (int j = 0; j < M; ++j) {
      float sum = 0.0f;
      for (int i = 0; i < M; ++i) sum += c[i * M + j];
      for (int i = 0; i < M; ++i) c[i * M + j] = c[i * M + j] / (sum + eps);
    }
  }
  for (int i = 0; i < M * M; ++i) comb[ulong(tok) * M * M + i] = c[i];
}
threadgroup_barrier(mem_flags::mem_threadgroup);

float ss = 0.0f;
for (uint d = t; d < uint(D); d += DS4_HC_TG) {
  float s = 0.0f;
  for (int i = 0; i < M; ++i) {
    float v;
    if (POST) {
      DS4_HC_POST(v, i, d);
    } else {
      v = float(h[base_h + ulong(i) * uint(D) + d]);
    }
    s += pre_w[i] * v;
  }
  XT r = XT(s);
  x[ulong(tok) * uint(D) + d] = r;
  if (XF && !NORMW) xf[ulong(tok) * uint(D) + d] = float(r);
  ss += float(r) * float(r);
}
if (NORMW) {
  // the row's sum of squares (partials of the simdgroups, summed in order), then x once more:
  // each thread rereads only what it wrote
  float sg_ss = simd_sum(ss);
  if (lane == 0) part[sg] = sg_ss;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float tot = 0.0f;
  for (int g = 0; g < DS4_HC_SIMDGROUPS; ++g) tot += part[g];
  float inv = precise::rsqrt(tot / float(D) + x_eps);
  for (uint d = t; d < uint(D); d += DS4_HC_TG) {
    ulong at = ulong(tok) * uint(D) + d;
    XT r = XT(float(XT(float(x[at]) * inv)) * float(nw[d]));
    x[at] = r;
    if (XF) xf[at] = float(r);
  }
}

// Hyper-connection pre step fused in one kernel (ds4mlx/model/hyper.py hc_pre is its ops twin):
// RMS of the flattened streams, the mixing projection, sigmoid / softmax, the Sinkhorn rounds in
// float32 and the weighted collapse of the streams. 86 calls per token are launch-bound as ops.
//
// Each `// @kernel NAME` section is the body of one mx.fast.metal_kernel (see moe.metal).
// DS4_HC_TG (threads per token) is defined from Python, which sizes the grid with it. The
// transcendental functions are precise::, so the mixing weights match the ops twin.

#define DS4_HC_SIMDGROUPS (DS4_HC_TG / 32)

METAL_FUNC float ds4_sigmoid(float x) { return 1.0f / (1.0f + precise::exp(-x)); }

// @kernel hc_pre
// h [N, M * D] (T: M streams of D per token), fn [MIX, M * D] (FT), base [MIX], scale [3]
// (float32), MIX = 2M + M^2 -> x [N, D] (XT: rounded once, as a cast after the sum), post [N, M],
// comb [N, M * M] (float32).
// Grid (TG, N), threadgroup (TG, 1, 1): one threadgroup per token.
const int MIX = 2 * M + M * M;
threadgroup float part[DS4_HC_SIMDGROUPS * (2 * M + M * M + 1)];
threadgroup float pre_w[M];
uint tok = threadgroup_position_in_grid.y;
uint t = thread_index_in_threadgroup;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
uint md = uint(M) * uint(D);
ulong base_h = ulong(tok) * md;

// sum of squares and the MIX dot products, strided over the threadgroup
float acc[2 * M + M * M + 1];
for (int j = 0; j <= MIX; ++j) acc[j] = 0.0f;
for (uint i = t; i < md; i += DS4_HC_TG) {
  float v = float(h[base_h + i]);
  acc[MIX] += v * v;
  for (int j = 0; j < MIX; ++j) acc[j] += v * float(fn[ulong(j) * md + i]);
}
for (int j = 0; j <= MIX; ++j) {
  float s = simd_sum(acc[j]);
  if (lane == 0) part[sg * (MIX + 1) + j] = s;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

if (t == 0) {
  float tot[2 * M + M * M + 1];
  for (int j = 0; j <= MIX; ++j) {
    tot[j] = 0.0f;
    for (int s = 0; s < DS4_HC_SIMDGROUPS; ++s) tot[j] += part[s * (MIX + 1) + j];
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

for (uint d = t; d < uint(D); d += DS4_HC_TG) {
  float s = 0.0f;
  for (int i = 0; i < M; ++i) s += pre_w[i] * float(h[base_h + ulong(i) * uint(D) + d]);
  x[ulong(tok) * uint(D) + d] = XT(s);
}

// MoE router selection fused in one kernel (ds4mlx/kernels/router.py has the ops twin):
// scores sqrt(softplus(logit)), the biased top-k, the route weights taken from the unbiased
// scores, renormalised and scaled. As ops this is some 10 launches per layer.
//
// Each `// @kernel NAME` section is the body of one mx.fast.metal_kernel (see moe.metal).
// DS4_ROUTER_TG (threads per token) is defined from Python. log / exp are precise::.

#define DS4_ROUTER_SG (DS4_ROUTER_TG / 32)

// log(1 + e) for e in [0, 1], accurate for small e (the twin's logaddexp uses log1p)
METAL_FUNC float ds4_log1p_small(float e) {
  return e < 1e-4f ? e - 0.5f * e * e : precise::log(1.0f + e);
}

// @kernel router_topk
// logits [N, E] float32, bias [E] float32 -> idx [N, K] uint32 (by descending biased score,
// ties: lowest expert), w [N, K] float32. Grid (TG, N), threadgroup (TG, 1, 1): thread t owns
// the experts t, t + TG, ...; K rounds of a threadgroup arg-max.
const int PER = (E + DS4_ROUTER_TG - 1) / DS4_ROUTER_TG;
threadgroup float best_v[DS4_ROUTER_SG];
threadgroup uint best_i[DS4_ROUTER_SG];
threadgroup float picked_score[K];
uint tok = threadgroup_position_in_grid.y;
uint t = thread_index_in_threadgroup;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
float score[PER], biased[PER];
bool taken[PER];
for (int j = 0; j < PER; ++j) {
  uint e = t + uint(j) * DS4_ROUTER_TG;
  taken[j] = e >= uint(E);
  float l = taken[j] ? 0.0f : logits[ulong(tok) * uint(E) + e];
  float sp = max(l, 0.0f) + ds4_log1p_small(precise::exp(-fabs(l)));
  score[j] = precise::sqrt(sp);
  biased[j] = taken[j] ? 0.0f : score[j] + bias[e];
}
for (int r = 0; r < K; ++r) {
  float v = as_type<float>(0xff800000u);
  uint i = 0xffffffffu;
  for (int j = 0; j < PER; ++j) {
    uint e = t + uint(j) * DS4_ROUTER_TG;
    if (!taken[j] && (biased[j] > v || (biased[j] == v && e < i))) {
      v = biased[j];
      i = e;
    }
  }
  float sv = simd_max(v);
  uint si = simd_min(v == sv ? i : 0xffffffffu);
  if (lane == 0) {
    best_v[sg] = sv;
    best_i[sg] = si;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float gv = best_v[0];
  uint gi = best_i[0];
  for (int g = 1; g < DS4_ROUTER_SG; ++g) {
    if (best_v[g] > gv || (best_v[g] == gv && best_i[g] < gi)) {
      gv = best_v[g];
      gi = best_i[g];
    }
  }
  for (int j = 0; j < PER; ++j) {
    if (t + uint(j) * DS4_ROUTER_TG == gi) {
      taken[j] = true;
      picked_score[r] = score[j];
    }
  }
  if (t == 0) idx[ulong(tok) * K + r] = gi;
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
if (t == 0) {
  float sum = 0.0f;
  for (int r = 0; r < K; ++r) sum += picked_score[r];
  for (int r = 0; r < K; ++r) {
    float wr = RENORM ? picked_score[r] / sum : picked_score[r];
    w[ulong(tok) * K + r] = wr * scale;
  }
}

// The MoE router's selection as threadgroup helpers, shared by router_topk (router.metal) and
// the decode kernel that routes for itself (moe_gate_up_decode with ROUTE, moe.metal), so that
// both select exactly alike: scores sqrt(softplus(logit)), the top-k of score + bias (ties: the
// lowest expert), the route weights from the unbiased scores. log / exp are precise::.
#pragma once

// log(1 + e) for e in [0, 1], accurate for small e (the twin's logaddexp uses log1p)
METAL_FUNC float ds4_log1p_small(float e) {
  return e < 1e-4f ? e - 0.5f * e * e : precise::log(1.0f + e);
}

// The first `rounds` picks of one token's E logits by a threadgroup of NT threads (thread t of
// it; every thread calls, `rounds` uniform): thread t owns the experts t, t + NT, ...; each
// round is a threadgroup arg-max. pick_id[r] / pick_score[r] (threadgroup, >= rounds entries)
// hold the r-th expert by descending biased score and its unbiased score, visible to every
// thread on return. best_v / best_i: threadgroup scratch of NT / 32 entries.
template <int E, int NT>
METAL_FUNC void ds4_route_picks(const device float* logits, const device float* bias, uint t,
                                uint rounds, threadgroup float* best_v, threadgroup uint* best_i,
                                threadgroup uint* pick_id, threadgroup float* pick_score) {
  const int PER = (E + NT - 1) / NT;
  const int SG = NT / 32;
  uint lane = t % 32;
  uint sg = t / 32;
  float score[PER], biased[PER];
  bool taken[PER];
  for (int j = 0; j < PER; ++j) {
    uint e = t + uint(j) * NT;
    taken[j] = e >= uint(E);
    float l = taken[j] ? 0.0f : logits[e];
    float sp = max(l, 0.0f) + ds4_log1p_small(precise::exp(-fabs(l)));
    score[j] = precise::sqrt(sp);
    biased[j] = taken[j] ? 0.0f : score[j] + bias[e];
  }
  for (uint r = 0; r < rounds; ++r) {
    float v = as_type<float>(0xff800000u);
    uint i = 0xffffffffu;
    for (int j = 0; j < PER; ++j) {
      uint e = t + uint(j) * NT;
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
    for (int g = 1; g < SG; ++g) {
      if (best_v[g] > gv || (best_v[g] == gv && best_i[g] < gi)) {
        gv = best_v[g];
        gi = best_i[g];
      }
    }
    for (int j = 0; j < PER; ++j) {
      if (t + uint(j) * NT == gi) {
        taken[j] = true;
        pick_score[r] = score[j];
      }
    }
    if (t == 0) pick_id[r] = gi;
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// The route weight of pick r of k: its score, over the k picks' sum when renormalised, scaled.
METAL_FUNC float ds4_route_weight(threadgroup const float* pick_score, uint k, uint r,
                                  bool renorm, float scale) {
  float sum = 0.0f;
  for (uint i = 0; i < k; ++i) sum += pick_score[i];
  float wr = renorm ? pick_score[r] / sum : pick_score[r];
  return wr * scale;
}

// MoE router selection fused in one kernel (ds4mlx/kernels/router.py has the ops twin):
// scores sqrt(softplus(logit)), the biased top-k, the route weights taken from the unbiased
// scores, renormalised and scaled. As ops this is some 10 launches per layer.
//
// Each `// @kernel NAME` section is the body of one mx.fast.metal_kernel (see moe.metal).
// DS4_ROUTER_TG (threads per token) is defined from Python.

#include "route.h"

// @kernel router_topk
// logits [N, E] float32, bias [E] float32 -> idx [N, K] uint32 (by descending biased score,
// ties: lowest expert), w [N, K] float32. Grid (TG, N), threadgroup (TG, 1, 1): K rounds of a
// threadgroup arg-max (ds4_route_picks, metal/route.h).
threadgroup float best_v[DS4_ROUTER_TG / 32];
threadgroup uint best_i[DS4_ROUTER_TG / 32];
threadgroup uint pick_id[K];
threadgroup float pick_score[K];
uint tok = threadgroup_position_in_grid.y;
uint t = thread_index_in_threadgroup;
ds4_route_picks<E, DS4_ROUTER_TG>(logits + ulong(tok) * uint(E), bias, t, uint(K), best_v,
                                  best_i, pick_id, pick_score);
for (uint r = t; r < uint(K); r += DS4_ROUTER_TG) {
  idx[ulong(tok) * K + r] = pick_id[r];
  w[ulong(tok) * K + r] = ds4_route_weight(pick_score, uint(K), r, RENORM, scale);
}

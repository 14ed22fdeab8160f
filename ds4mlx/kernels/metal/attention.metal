// Decode attention of DeepSeek V4 fused in one kernel (ds4mlx/kernels/attention.py has the ops
// twins): a query attends to its window rows, its compressed rows (all visible ones, or the
// indexer's picks) and the per-head sink in one pass with an online softmax, reading the KV
// rows in their storage dtype. The ops path casts every row to float32, materialises the
// scores and the probabilities and runs some 40 MLX ops per call.
//
// Each `// @kernel NAME` section is the body of one mx.fast.metal_kernel (see moe.metal).
// DS4_ATTN_SG (simdgroups per threadgroup) is defined from Python. Exponentials are precise::,
// so the weights match the twin's softmax(precise=True).

#include "index_q.h"

#define DS4_ATTN_TG (32 * DS4_ATTN_SG)

METAL_FUNC float ds4_neg_inf() { return as_type<float>(0xff800000u); }

// An unsigned key with the order of the float (-0 and +0 equal): flip negatives, set the sign.
METAL_FUNC uint ds4_order_key(float v) {
  uint u = as_type<uint>(v);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// @kernel attn_decode
// q [B, S, H, D] float32; kw [B, LW, D] (T): window rows of this call; comp [B, NC, D] (T):
// compressed rows (a dummy when NC = 0); idx [B, S, K] int32: the indexer's picks (INDEXED);
// bounds [S, 3] int32 per query: first and end window row, visible compressed rows; sink [H]
// -> out [B, S, H, D] (OutT). ROPE: q (QT) is the projection as it comes, normalised here (plain
// RMS with eps) and rotated at pos [S] (int32; freqs [RD / 2] float32, interleaved pairs of the
// last RD dims), both in float32 as rope_rows does; the output is rotated back, each rotated
// value rounded to OutT (kernel rope_rows with INV). Without ROPE, q is float32 and OutT too.
// Grid (TG, H, B * S), threadgroup (TG, 1, 1): one threadgroup per (token, head); its
// simdgroups take every DS4_ATTN_SG-th key, each lane D / 32 dims (dims lane + 32 j: a RoPE
// pair sits on two neighbouring lanes).
// WRITE: the call's new window rows knew [B, S, D] (T) go to rows NEWROW.. of the window (read
// from knew, not kw) and kwo [B, LW, D] is the new window buffer: the last query's window rows,
// each written by the simdgroup that read it in one head's threadgroup (no extra read), every
// other row zero (rows no later query reads). Without WRITE kwo is one element, zero.
const int DPL = D / 32;
threadgroup float part_ml[2 * DS4_ATTN_SG];
threadgroup float part_acc[DS4_ATTN_SG * D];
uint head = threadgroup_position_in_grid.y;
uint bs = threadgroup_position_in_grid.z;  // b * S + s
uint b = bs / uint(S);
uint s = bs % uint(S);
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
uint t = thread_index_in_threadgroup;

float qv[DPL];
ulong qbase = (ulong(bs) * uint(H) + head) * uint(D);
for (int j = 0; j < DPL; ++j) qv[j] = float(q[qbase + lane + 32 * j]);
if (ROPE) {
  float ss = 0.0f;
  for (int j = 0; j < DPL; ++j) ss += qv[j] * qv[j];
  float inv = precise::rsqrt(simd_sum(ss) / float(D) + eps);
  float p = float(pos[s]);
  for (int j = 0; j < DPL; ++j) {
    qv[j] *= inv;
    float other = simd_shuffle_xor(qv[j], ushort(1));  // the pair's other half
    int dd = int(lane) + 32 * j;
    if (dd >= D - RD) {
      float angle = p * freqs[(dd - (D - RD)) / 2];
      float c = precise::cos(angle), sn = precise::sin(angle);
      qv[j] = (lane & 1u) ? other * sn + qv[j] * c : qv[j] * c - other * sn;
    }
  }
}
int w_lo = bounds[s * 3], w_hi = bounds[s * 3 + 1], n_vis = bounds[s * 3 + 2];
int n_win = max(w_hi - w_lo, 0);
int n_comp = INDEXED ? K : n_vis;

float m = ds4_neg_inf(), l = 0.0f;
float acc[DPL];
for (int j = 0; j < DPL; ++j) acc[j] = 0.0f;
for (int key = int(sg); key < n_win + n_comp; key += DS4_ATTN_SG) {
  ulong row;
  if (key < n_win) {
    row = (ulong(b) * uint(LW) + uint(w_lo + key)) * uint(D);
  } else {
    int c = key - n_win;
    if (INDEXED) {
      c = idx[ulong(bs) * uint(K) + uint(c)];
      if (c < 0 || c >= n_vis) continue;  // not visible yet (same for every lane)
    }
    row = (ulong(b) * uint(NC) + uint(c)) * uint(D);
  }
  float kv[DPL];
  float dot = 0.0f;
  bool fresh = WRITE && key < n_win && w_lo + key >= NEWROW;  // a row of this call: from knew
  ulong nrow = fresh ? (ulong(b) * uint(S) + uint(w_lo + key - NEWROW)) * uint(D) : 0;
  for (int j = 0; j < DPL; ++j) {
    kv[j] = key >= n_win ? float(comp[row + lane + 32 * j])
            : fresh ? float(knew[nrow + lane + 32 * j]) : float(kw[row + lane + 32 * j]);
    dot += qv[j] * kv[j];
  }
  if (WRITE && key < n_win && s == uint(S) - 1 && uint(key / DS4_ATTN_SG) % uint(H) == head) {
    for (int j = 0; j < DPL; ++j) kwo[row + lane + 32 * j] = T(kv[j]);
  }
  float score = simd_sum(dot) * scale;
  if (score > m) {
    float corr = precise::exp(m - score);
    l *= corr;
    for (int j = 0; j < DPL; ++j) acc[j] *= corr;
    m = score;
  }
  float p = precise::exp(score - m);
  l += p;
  for (int j = 0; j < DPL; ++j) acc[j] += p * kv[j];
}
if (lane == 0) {
  part_ml[2 * sg] = m;
  part_ml[2 * sg + 1] = l;
}
for (int j = 0; j < DPL; ++j) part_acc[sg * uint(D) + lane + 32 * j] = acc[j];
threadgroup_barrier(mem_flags::mem_threadgroup);

// merge the simdgroups' partial softmaxes with the sink (a logit with no value row)
float sk = float(sink[head]);
float top = sk;
for (int g = 0; g < DS4_ATTN_SG; ++g) top = max(top, part_ml[2 * g]);
float total = precise::exp(sk - top);
for (int g = 0; g < DS4_ATTN_SG; ++g) total += part_ml[2 * g + 1] * precise::exp(part_ml[2 * g] - top);
for (uint d = t; d < uint(D); d += DS4_ATTN_TG) {
  float o = 0.0f;
  for (int g = 0; g < DS4_ATTN_SG; ++g) o += part_acc[g * uint(D) + d] * precise::exp(part_ml[2 * g] - top);
  o = o / total;
  if (ROPE) {  // D is a multiple of 32: every lane of a simdgroup runs this round
    float other = simd_shuffle_xor(o, ushort(1));
    if (int(d) >= D - RD) {
      float angle = float(pos[s]) * freqs[(int(d) - (D - RD)) / 2];
      float c = precise::cos(angle), sn = -precise::sin(angle);
      o = (lane & 1u) ? float(OutT(other * sn + o * c)) : float(OutT(o * c - other * sn));
    }
  }
  out[qbase + d] = OutT(o);
}
if (WRITE && s == uint(S) - 1) {  // the rows outside the last query's window: zero
  ulong base = ulong(b) * uint(LW) * uint(D);
  for (ulong e = ulong(head) * DS4_ATTN_TG + t; e < ulong(LW) * uint(D); e += ulong(H) * DS4_ATTN_TG) {
    int r = int(e / uint(D));
    if (r < w_lo || r >= w_hi) kwo[base + e] = T(0.0f);
  }
}
if (!WRITE && bs == 0 && head == 0 && t == 0) kwo[0] = T(0.0f);

// @kernel indexer_scores
// Lightning Indexer scores I(t, n) = sum_h w_h(t) * ReLU(q_h(t) . k_n): q [B, S, H, HD]
// float32, w [B, S, H] float32, keys [B, NK, HD] (T, in storage: never cast to float32),
// n_vis [S] int32 -> scores [B, S, NK] float32, -inf where n >= n_vis[s] (not visible yet).
// Grid (TG * ceil(NK / KT), B * S), threadgroup (TG, 1, 1): KT = TG / HG keys per threadgroup;
// thread t takes key t % KT and the heads h = t / KT, t / KT + HG, ... (HG head groups).
const int HG = 8;
const int KT = DS4_INDEX_TG / HG;
threadgroup float part[DS4_INDEX_TG];
uint bs = threadgroup_position_in_grid.y;
uint b = bs / uint(S);
uint s = bs % uint(S);
uint t = thread_index_in_threadgroup;
uint key = threadgroup_position_in_grid.x * uint(KT) + t % uint(KT);
uint group = t / uint(KT);
int vis = n_vis[s];
float total = 0.0f;
if (key < uint(NK) && int(key) < vis) {
  ulong krow = (ulong(b) * uint(NK) + key) * uint(HD);
  for (uint h = group; h < uint(H); h += HG) {
    ulong qrow = (ulong(bs) * uint(H) + h) * uint(HD);
    float dot = 0.0f;
    for (int d = 0; d < HD; ++d) dot += q[qrow + d] * float(keys[krow + d]);
    total += w[ulong(bs) * uint(H) + h] * max(dot, 0.0f);
  }
}
part[t] = total;
threadgroup_barrier(mem_flags::mem_threadgroup);
if (group == 0 && key < uint(NK)) {
  float sum = 0.0f;
  for (int g = 0; g < HG; ++g) sum += part[g * KT + t];  // head groups in order
  scores[ulong(bs) * uint(NK) + key] = int(key) < vis ? sum : ds4_neg_inf();
}

// @kernel indexer_scores_q
// indexer_scores with kernel index_q's work in the same launch: x [B * S * H, HD] (QT) the
// queries as projected, wr [B * S * H] (WT) the head weights as projected, pos [B * S] int32,
// freqs [RD / 2] float32, wscale; keys, n_vis, S, NK and scores as in indexer_scores. Each
// threadgroup first makes its token's H query rows itself (ds4_index_q_row, metal/index_q.h:
// RoPE, with FP4 Hadamard + FP4; a simdgroup per row, the angles' cos / sin once per
// threadgroup) into threadgroup memory as QS, which is exact: every value is already rounded to
// QT, and with FP4 it is an e2m1 value (2 mantissa bits) times a power of two, so QS is QT, or
// bfloat16 where QT is float32; and w_h = wr_h * wscale. Then it scores DS4_INDEX_KPT * KT keys
// (KT = TG / HG per pass, as indexer_scores; the passes share the queries' cost).
// Grid (TG * ceil(NK / (KT * KPT)), B * S), threadgroup (TG, 1, 1).
const int HG = 8;
const int KT = DS4_INDEX_TG / HG;
const int DPL = HD / 32;
threadgroup QS qs[H * HD];
threadgroup float ws[H];
threadgroup float cs[RD / 2];
threadgroup float sn[RD / 2];
threadgroup float part[DS4_INDEX_TG];
uint bs = threadgroup_position_in_grid.y;
uint b = bs / uint(S);
uint s = bs % uint(S);
uint t = thread_index_in_threadgroup;
uint lane = thread_index_in_simdgroup;
ds4_rope_table(float(pos[bs]), freqs, uint(RD / 2), t, DS4_INDEX_TG, cs, sn);
threadgroup_barrier(mem_flags::mem_threadgroup);
for (uint h = simdgroup_index_in_threadgroup; h < uint(H); h += DS4_INDEX_TG / 32) {
  float v[DPL];
  ds4_index_q_row<QT, HD, RD, FP4>(x + (ulong(bs) * uint(H) + h) * uint(HD), lane, cs, sn, v);
  for (int j = 0; j < DPL; ++j) qs[h * uint(HD) + lane * uint(DPL) + j] = QS(v[j]);
  if (lane == 0) ws[h] = float(wr[ulong(bs) * uint(H) + h]) * wscale;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
uint group = t / uint(KT);
int vis = n_vis[s];
for (uint pass = 0; pass < uint(DS4_INDEX_KPT); ++pass) {  // uniform: barriers inside
  uint key = (threadgroup_position_in_grid.x * uint(DS4_INDEX_KPT) + pass) * uint(KT) +
             t % uint(KT);
  float total = 0.0f;
  if (key < uint(NK) && int(key) < vis) {
    ulong krow = (ulong(b) * uint(NK) + key) * uint(HD);
    for (uint h = group; h < uint(H); h += HG) {
      float dot = 0.0f;
      for (int d = 0; d < HD; ++d) dot += float(qs[h * uint(HD) + uint(d)]) * float(keys[krow + d]);
      total += ws[h] * max(dot, 0.0f);
    }
  }
  part[t] = total;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (group == 0 && key < uint(NK)) {
    float sum = 0.0f;
    for (int g = 0; g < HG; ++g) sum += part[g * KT + t];  // head groups in order
    scores[ulong(bs) * uint(NK) + key] = int(key) < vis ? sum : ds4_neg_inf();
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// @kernel indexer_topk
// The TOPK largest of scores [R, N] float32 per row, as ascending indices idx [R, TOPK] int32
// (ties at the threshold: lowest indices first; -1 pads a row with fewer than TOPK finite
// scores, whose -inf entries are never picked). Grid (TG, R), threadgroup (TG, 1, 1): a
// threadgroup per row finds the TOPK-th largest value by bisecting its order-preserving bit
// pattern (32 counting passes), then writes the picks in index order (deterministic).
threadgroup uint cnt[DS4_INDEX_TG];
threadgroup uint sums[DS4_INDEX_TG / 32];
uint row = threadgroup_position_in_grid.y;
uint t = thread_index_in_threadgroup;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
ulong base = ulong(row) * uint(N);
uint chunk = (uint(N) + DS4_INDEX_TG - 1) / DS4_INDEX_TG;  // thread t owns [t*chunk, ..)
uint lo = min(t * chunk, uint(N)), hi = min(lo + chunk, uint(N));
const uint NEG_INF_KEY = 0x007fffffu;  // the order key of -inf
// threshold: the largest key k with at least TOPK scores >= k, among finite scores
uint thr = 0;
for (int bit = 31; bit >= 0; --bit) {
  uint cand = thr | (1u << uint(bit));
  uint c = 0;
  for (uint i = lo; i < hi; ++i) {
    uint u = ds4_order_key(scores[base + i]);
    c += (u >= cand && u > NEG_INF_KEY) ? 1u : 0u;
  }
  c = simd_sum(c);
  if (lane == 0) sums[sg] = c;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  uint tot = 0;
  for (int g = 0; g < DS4_INDEX_TG / 32; ++g) tot += sums[g];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tot >= uint(TOPK)) thr = cand;
}
// picks: every score above thr, then scores equal to thr (lowest index first) up to TOPK;
// thr = 0 (fewer than TOPK finite scores) picks every finite score
uint above = 0, equal = 0;
for (uint i = lo; i < hi; ++i) {
  uint u = ds4_order_key(scores[base + i]);
  above += (u > thr && u > NEG_INF_KEY) ? 1u : 0u;
  equal += (u == thr && u > NEG_INF_KEY) ? 1u : 0u;
}
// exclusive scans over threads (index order), first of the above counts, then of the equal ones
cnt[t] = above;
threadgroup_barrier(mem_flags::mem_threadgroup);
uint above_before = 0, above_total = 0;
for (uint i = 0; i < DS4_INDEX_TG; ++i) {
  above_total += cnt[i];
  above_before += i < t ? cnt[i] : 0u;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
cnt[t] = equal;
threadgroup_barrier(mem_flags::mem_threadgroup);
uint equal_before = 0, equal_total = 0;
for (uint i = 0; i < DS4_INDEX_TG; ++i) {
  equal_total += cnt[i];
  equal_before += i < t ? cnt[i] : 0u;
}
uint room = uint(TOPK) > above_total ? uint(TOPK) - above_total : 0u;  // ties that fit
// outputs in index order: a pick's slot is (picks above thr before it) + (ties taken before it)
uint a = above_before, e = equal_before;
ulong out_base = ulong(row) * uint(TOPK);
for (uint i = lo; i < hi; ++i) {
  uint u = ds4_order_key(scores[base + i]);
  if (u <= NEG_INF_KEY) continue;
  if (u > thr) {
    idx[out_base + a + min(e, room)] = int(i);
    ++a;
  } else if (u == thr) {
    if (e < room) idx[out_base + a + e] = int(i);
    ++e;
  }
}
for (uint slot = above_total + min(room, equal_total) + t; slot < uint(TOPK); slot += DS4_INDEX_TG)
  idx[out_base + slot] = -1;

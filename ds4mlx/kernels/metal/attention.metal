// Decode attention of DeepSeek V4 fused in one kernel (ds4mlx/kernels/attention.py has the ops
// twins): a query attends to its window rows, its compressed rows (all visible ones, or the
// indexer's picks) and the per-head sink in one pass with an online softmax, reading the KV
// rows in their storage dtype. The ops path casts every row to float32, materialises the
// scores and the probabilities and runs some 40 MLX ops per call.
//
// Each `// @kernel NAME` section is the body of one mx.fast.metal_kernel (see moe.metal).
// DS4_ATTN_SG (simdgroups per threadgroup) is defined from Python. Exponentials are precise::,
// so the weights match the twin's softmax(precise=True).

#include "grid.h"
#include "index_q.h"

#define DS4_ATTN_TG (32 * DS4_ATTN_SG)

METAL_FUNC float ds4_neg_inf() { return as_type<float>(0xff800000u); }

// An unsigned key with the order of the float (-0 and +0 equal): flip negatives, set the sign.
METAL_FUNC uint ds4_order_key(float v) {
  uint u = as_type<uint>(v);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// A row of scores as the top-k reads it: plain device floats, or the float bits that
// threadgroups of the same launch stored atomically (metal/grid.h).
struct ds4_plain_row {
  const device float* p;
  float get(uint i) const { return p[i]; }
};
struct ds4_atomic_row {
  device atomic_uint* p;
  float get(uint i) const { return ds4_grid_get(p + i); }
};

// The TOPK largest of a row's n scores as ascending indices out[TOPK] (ties at the threshold:
// lowest indices first; -1 pads a row with fewer than TOPK finite scores, whose -inf entries
// are never picked), by a threadgroup of DS4_INDEX_TG threads (thread t; every thread calls):
// the TOPK-th largest value by bisecting its order-preserving bit pattern (32 counting passes),
// then the picks in index order (deterministic). cnt [TG], sums [TG / 32]: threadgroup scratch.
template <int TOPK, typename R>
METAL_FUNC void ds4_topk_row(R row, uint n, uint t, threadgroup uint* cnt, threadgroup uint* sums,
                             device int* out) {
  uint lane = t % 32;
  uint sg = t / 32;
  uint chunk = (n + DS4_INDEX_TG - 1) / DS4_INDEX_TG;  // thread t owns [t*chunk, ..)
  uint lo = min(t * chunk, n), hi = min(lo + chunk, n);
  const uint NEG_INF_KEY = 0x007fffffu;  // the order key of -inf
  // threshold: the largest key k with at least TOPK scores >= k, among finite scores
  uint thr = 0;
  for (int bit = 31; bit >= 0; --bit) {
    uint cand = thr | (1u << uint(bit));
    uint c = 0;
    for (uint i = lo; i < hi; ++i) {
      uint u = ds4_order_key(row.get(i));
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
    uint u = ds4_order_key(row.get(i));
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
  for (uint i = lo; i < hi; ++i) {
    uint u = ds4_order_key(row.get(i));
    if (u <= NEG_INF_KEY) continue;
    if (u > thr) {
      out[a + min(e, room)] = int(i);
      ++a;
    } else if (u == thr) {
      if (e < room) out[a + e] = int(i);
      ++e;
    }
  }
  for (uint slot = above_total + min(room, equal_total) + t; slot < uint(TOPK); slot += DS4_INDEX_TG)
    out[slot] = -1;
}

// The indexer's queries of one token made by a threadgroup of DS4_INDEX_TG threads (kernel
// index_q's steps, ds4_index_q_row: a simdgroup per row, the angles' cos / sin once per
// threadgroup): x [H, HD] (QT) as projected -> qs [H * HD] (threadgroup, QS), and the head
// weights wr [H] (WT) times wscale -> ws [H]. QS holds the values exactly: each is already
// rounded to QT, and with FP4 it is an e2m1 value (2 mantissa bits) times a power of two, so
// QS is QT, or bfloat16 where QT is float32 (kernels/attention.py picks it). Every thread
// calls; the queries are visible to all on return.
template <typename QT, typename WT, typename QS, int H, int HD, int RD, bool FP4>
METAL_FUNC void ds4_index_make_q(const device QT* x, const device WT* wr, float p,
                                 const device float* freqs, float wscale, uint t,
                                 threadgroup QS* qs, threadgroup float* ws, threadgroup float* cs,
                                 threadgroup float* sn) {
  const int DPL = HD / 32;
  uint lane = t % 32;
  ds4_rope_table(p, freqs, uint(RD / 2), t, DS4_INDEX_TG, cs, sn);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint h = t / 32; h < uint(H); h += DS4_INDEX_TG / 32) {
    float v[DPL];
    ds4_index_q_row<QT, HD, RD, FP4>(x + ulong(h) * uint(HD), lane, cs, sn, v);
    for (int j = 0; j < DPL; ++j) qs[h * uint(HD) + lane * uint(DPL) + j] = QS(v[j]);
    if (lane == 0) ws[h] = float(wr[h]) * wscale;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// The scores of a threadgroup's DS4_INDEX_KPT passes of TG / 8 keys (pass p: keys
// (key0 + p) * TG / 8 + t % (TG / 8)) from one token's queries as projected, x [H, HD] (QT) and
// wr [H] (WT): the queries made here HB heads at a time (ds4_index_make_q into qs [HB * HD],
// ws [HB]; HB = H, or a multiple of 8 dividing H where H heads do not fit threadgroup memory).
// Thread t takes its key and the heads t / (TG / 8), + 8, ... in ascending order across the
// blocks, into one sum, so the scores are indexer_scores' exactly. out[p]: the key's score
// (-inf past vis) in threads t < TG / 8. Every thread calls (barriers); part: TG floats.
template <typename QT, typename WT, typename QS, int H, int HB, int HD, int RD, bool FP4,
          typename KT>
METAL_FUNC void ds4_index_passes(const device QT* x, const device WT* wr, float p,
                                 const device float* freqs, float wscale, const device KT* keys,
                                 uint b, uint key0, uint nk, int vis, uint t, threadgroup QS* qs,
                                 threadgroup float* ws, threadgroup float* cs,
                                 threadgroup float* sn, threadgroup float* part,
                                 thread float* out) {
  const uint HG = 8, KT_ = DS4_INDEX_TG / 8;
  uint group = t / KT_;
  float total[DS4_INDEX_KPT];
  for (int i = 0; i < DS4_INDEX_KPT; ++i) total[i] = 0.0f;
  for (uint h0 = 0; h0 < uint(H); h0 += HB) {
    if (h0 > 0) threadgroup_barrier(mem_flags::mem_threadgroup);  // the last block is read
    ds4_index_make_q<QT, WT, QS, HB, HD, RD, FP4>(x + ulong(h0) * uint(HD), wr + h0, p, freqs,
                                                  wscale, t, qs, ws, cs, sn);
    for (uint pass = 0; pass < uint(DS4_INDEX_KPT); ++pass) {
      uint key = (key0 + pass) * KT_ + t % KT_;
      if (key >= nk || int(key) >= vis) continue;
      ulong krow = (ulong(b) * nk + key) * uint(HD);
      for (uint h = group; h < uint(HB); h += HG) {
        float dot = 0.0f;
        for (int d = 0; d < HD; ++d) dot += float(qs[h * uint(HD) + uint(d)]) * float(keys[krow + d]);
        total[pass] += ws[h] * max(dot, 0.0f);
      }
    }
  }
  for (uint pass = 0; pass < uint(DS4_INDEX_KPT); ++pass) {
    uint key = (key0 + pass) * KT_ + t % KT_;
    part[t] = total[pass];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float sum = 0.0f;
    if (group == 0)
      for (uint g = 0; g < HG; ++g) sum += part[g * KT_ + t];  // head groups in order
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[pass] = int(key) < vis ? sum : ds4_neg_inf();
  }
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
// threadgroup makes its token's queries itself, HB heads at a time, and scores DS4_INDEX_KPT
// passes of KT = TG / 8 keys (ds4_index_passes; the passes share the queries' cost). Grid
// (TG * ceil(NK / (KT * KPT)), B * S), threadgroup (TG, 1, 1).
threadgroup QS qs[HB * HD];
threadgroup float ws[HB];
threadgroup float cs[RD / 2];
threadgroup float sn[RD / 2];
threadgroup float part[DS4_INDEX_TG];
uint bs = threadgroup_position_in_grid.y;
uint t = thread_index_in_threadgroup;
float v[DS4_INDEX_KPT];
ds4_index_passes<QT, WT, QS, H, HB, HD, RD, FP4>(
    x + ulong(bs) * uint(H) * uint(HD), wr + ulong(bs) * uint(H), float(pos[bs]), freqs, wscale,
    keys, bs / uint(S), threadgroup_position_in_grid.x * uint(DS4_INDEX_KPT), uint(NK),
    n_vis[bs % uint(S)], t, qs, ws, cs, sn, part, v);
for (uint pass = 0; pass < uint(DS4_INDEX_KPT); ++pass) {
  uint key = (threadgroup_position_in_grid.x * uint(DS4_INDEX_KPT) + pass) *
             uint(DS4_INDEX_TG / 8) + t;
  if (t < uint(DS4_INDEX_TG / 8) && key < uint(NK)) scores[ulong(bs) * uint(NK) + key] = v[pass];
}

// @kernel indexer_pick_q
// indexer_scores_q and indexer_topk in one launch (metal/grid.h's last-threadgroup pattern):
// inputs as indexer_scores_q plus counter [>= B * S] uint32 (zero before and after) -> idx
// [B * S, TOPK] int32 as indexer_topk's; part [B * S, NK] uint32 holds the scores' float bits
// (atomic stores: read by another threadgroup). The threadgroups of a token's row score their
// keys; the last of them to finish (ds4_grid_last; none waits for another) runs the top-k over
// the row's scores and puts the row's counter back to 0. Grid as indexer_scores_q.
threadgroup QS qs[HB * HD];
threadgroup float ws[HB];
threadgroup float cs[RD / 2];
threadgroup float sn[RD / 2];
threadgroup float part_h[DS4_INDEX_TG];
threadgroup uint cnt[DS4_INDEX_TG];
threadgroup uint sums[DS4_INDEX_TG / 32];
threadgroup uint last_flag[1];
uint bs = threadgroup_position_in_grid.y;
uint t = thread_index_in_threadgroup;
device atomic_uint* row_scores = (device atomic_uint*)part + ulong(bs) * uint(NK);
float v[DS4_INDEX_KPT];
ds4_index_passes<QT, WT, QS, H, HB, HD, RD, FP4>(
    x + ulong(bs) * uint(H) * uint(HD), wr + ulong(bs) * uint(H), float(pos[bs]), freqs, wscale,
    keys, bs / uint(S), threadgroup_position_in_grid.x * uint(DS4_INDEX_KPT), uint(NK),
    n_vis[bs % uint(S)], t, qs, ws, cs, sn, part_h, v);
for (uint pass = 0; pass < uint(DS4_INDEX_KPT); ++pass) {
  uint key = (threadgroup_position_in_grid.x * uint(DS4_INDEX_KPT) + pass) *
             uint(DS4_INDEX_TG / 8) + t;
  if (t < uint(DS4_INDEX_TG / 8) && key < uint(NK)) ds4_grid_put(row_scores + key, v[pass]);
}
device atomic_uint* arrived = (device atomic_uint*)counter + bs;
if (!ds4_grid_last(arrived, threadgroups_per_grid.x, t, last_flag)) return;
ds4_topk_row<TOPK>(ds4_atomic_row{row_scores}, uint(NK), t, cnt, sums,
                   idx + ulong(bs) * uint(TOPK));
ds4_grid_reset(arrived, t);

// @kernel indexer_topk
// The TOPK largest of scores [R, N] float32 per row, as ascending indices idx [R, TOPK] int32
// (ties at the threshold: lowest indices first; -1 pads a row with fewer than TOPK finite
// scores, whose -inf entries are never picked). Grid (TG, R), threadgroup (TG, 1, 1): a
// threadgroup per row finds the TOPK-th largest value by bisecting its order-preserving bit
// pattern (32 counting passes), then writes the picks in index order (deterministic).
threadgroup uint cnt[DS4_INDEX_TG];
threadgroup uint sums[DS4_INDEX_TG / 32];
uint row = threadgroup_position_in_grid.y;
ds4_topk_row<TOPK>(ds4_plain_row{scores + ulong(row) * uint(N)}, uint(N),
                   thread_index_in_threadgroup, cnt, sums, idx + ulong(row) * uint(TOPK));

// Routed-expert kernels on packed weights (any QFmt), loaded by ds4mlx/kernels/__init__.py.
//
// Each `// @kernel NAME` section is the body of one mx.fast.metal_kernel; the text above the
// first section is the header shared by all of them. Template parameters: T (activation dtype),
// FMT (a DS4_* format id), OutT (output dtype) where noted; the decode kernels also take
// SHARED (the layer's shared expert folded in as one more slot) and SFMT (its format). Weights
// are [E, rows, row_bytes]
// packed bytes `w` plus, for MXFP4, [E, rows, scale_bytes] scales `s` (a dummy otherwise).
// Sizes come in as 0-d int inputs; k (experts per token) is one of them, never a constant, and
// E (experts in the weights) bounds the expert ids: a pair whose id is out of range reads no
// weights and writes NaN, so a bad id cannot read past the weights and cannot pass unnoticed.
// Tile sizes (DS4_ROWS, DS4_SIMDGROUPS, DS4_DOWN_SG, DS4_MV_TOKENS, DS4_BM, DS4_BN, DS4_BK,
// DS4_TG) are defined from Python, which sizes the grids with the same values.
#include "quant.h"
#include "route.h"

// Decode: a simdgroup computes DS4_ROWS output rows of one (token, expert) pair; its lanes
// stride over the row 32 weights at a time (QFmt<F>::dot32, metal/quant.h). A format's lookup
// table is copied into threadgroup memory at the start (QFmt<F>::fill_tab, then a barrier).

METAL_FUNC float ds4_nan() { return as_type<float>(0x7fc00000u); }

// acc[r] += W_a[ra + r] . x and, when NW = 2, acc[DS4_ROWS + r] += W_b[rb + r] . x for
// r < nrows, over this lane's 32-wide pieces of x [K] (lane t of nt): the activations are
// read and prepared once for all the rows. ba / bb: the rows' biases (an affine layout's,
// at the scales' offsets; the other layouts ignore them: pass the scales).
template <int F, int NW, typename XT>
METAL_FUNC void ds4_dot_rows_b(const device XT* x, uint K, uint t, uint nt,
                               const device uint8_t* wa, const device uint8_t* sa,
                               const device uint8_t* ba, ulong ra, const device uint8_t* wb,
                               const device uint8_t* sb, const device uint8_t* bb, ulong rb,
                               uint nrows, threadgroup const uint* tab, thread float* acc) {
  ulong rbytes = QFmt<F>::row_bytes(K);
  ulong sbytes = QFmt<F>::scale_bytes(K);
  for (uint c = t * 32; c < K; c += nt * 32) {
    float xs[34];
    for (int i = 0; i < 32; ++i) xs[i] = float(x[c + i]);
    xs[32] = 0.0f;
    xs[33] = 0.0f;
    QFmt<F>::prep(c, xs);
    for (uint r = 0; r < uint(DS4_ROWS); ++r) {
      if (r >= nrows) break;
      acc[r] += ds4_qdot<F>::dot(wa + (ra + r) * rbytes, sa + (ra + r) * sbytes,
                                 ba + (ra + r) * sbytes, c, xs, tab);
      if (NW == 2)
        acc[DS4_ROWS + r] += ds4_qdot<F>::dot(wb + (rb + r) * rbytes, sb + (rb + r) * sbytes,
                                              bb + (rb + r) * sbytes, c, xs, tab);
    }
  }
}

// ds4_dot_rows_b for the layouts without biases.
template <int F, int NW, typename XT>
METAL_FUNC void ds4_dot_rows(const device XT* x, uint K, uint t, uint nt,
                             const device uint8_t* wa, const device uint8_t* sa, ulong ra,
                             const device uint8_t* wb, const device uint8_t* sb, ulong rb,
                             uint nrows, threadgroup const uint* tab, thread float* acc) {
  ds4_dot_rows_b<F, NW, XT>(x, K, t, nt, wa, sa, sa, ra, wb, sb, sb, rb, nrows, tab, acc);
}

// silu(min(g, limit)) * clip(u, -limit, limit); limit <= 0 means no clamp.
METAL_FUNC float ds4_swiglu(float g, float u, float limit) {
  if (limit > 0.0f) {
    g = min(g, limit);
    u = clamp(u, -limit, limit);
  }
  return g * (1.0f / (1.0f + precise::exp(-g))) * u;  // precise: must match the ops twin
}

// Prefill: a threadgroup of DS4_TG threads computes a DS4_BM x DS4_BN tile of outputs for
// DS4_BM expert-sorted (token, expert) pairs, K in steps of DS4_BK, dequantizing each weight
// tile into threadgroup memory once for all the pairs of the tile that use that expert.

// @kernel dequant_rows
// Dequantize rows: w [R, row_bytes] (+ s [R, scale_bytes]) -> out [R, K] float32.
// Grid (K/8, R): one thread per 8 elements.
uint piece = thread_position_in_grid.x;
uint row = thread_position_in_grid.y;
if (piece * 8 >= uint(K)) return;
float v[8];
QFmt<FMT>::load8(w + ulong(row) * QFmt<FMT>::row_bytes(K),
                 s + ulong(row) * QFmt<FMT>::scale_bytes(K), piece * 8, v);
for (int i = 0; i < 8; ++i) out[ulong(row) * uint(K) + piece * 8 + i] = v[i];

// @kernel moe_gate_up_decode
// x [N, K] (T), w1/w3 [E, F, .] with scales s1/s3, idx [N * k] uint32; with SHARED, the shared
// expert ws [2F, .] in format SFMT (gate rows, then up rows; scales ss, biases sb: an affine
// layout's, else the scales again) rides along as slot k of each token. -> mid [N * kk, F] float32 = swiglu(W1 x, W3 x), kk = k + SHARED, pair
// p = token * kk + slot. Grid (ceil(F / (ROWS * SIMDGROUPS)) * 32 * SIMDGROUPS, N * kk),
// threadgroup (32 * SIMDGROUPS, 1, 1).
// ROUTE: the router's selection in the kernel instead of idx: logits [N, RE] float32 (RE = E)
// and bias [RE]; each threadgroup of a routed slot j picks the token's first j + 1 experts
// itself (ds4_route_picks, as router_topk does: cheap next to its weight rows), and the first
// threadgroup of slot k - 1 writes ids [N * k] uint32 and rw [N * k] float32 (the route
// weights, RENORM, scaled by rscale) for moe_down_decode. Without ROUTE ids / rw are not written.
threadgroup uint tab[QFmt<FMT>::TAB];
threadgroup uint stab[(SHARED && SFMT != FMT) ? QFmt<SFMT>::TAB : 1];
uint t = thread_index_in_threadgroup;
QFmt<FMT>::fill_tab(tab, t, 32 * DS4_SIMDGROUPS);
if (SHARED && SFMT != FMT) QFmt<SFMT>::fill_tab(stab, t, 32 * DS4_SIMDGROUPS);
threadgroup_barrier(mem_flags::mem_threadgroup);
uint pair = threadgroup_position_in_grid.y;
uint lane = thread_index_in_simdgroup;
uint row0 = (threadgroup_position_in_grid.x * DS4_SIMDGROUPS + simdgroup_index_in_threadgroup) *
            DS4_ROWS;
uint nrows = row0 < uint(F) ? min(uint(DS4_ROWS), uint(F) - row0) : 0u;
uint kk = uint(k) + (SHARED ? 1u : 0u);
uint tok = pair / kk;
uint slot = pair % kk;
const device T* xt = x + ulong(tok) * uint(K);
float acc[2 * DS4_ROWS];
for (int r = 0; r < 2 * DS4_ROWS; ++r) acc[r] = 0.0f;
bool bad_id = false;
threadgroup float best_v[ROUTE ? DS4_SIMDGROUPS : 1];
threadgroup uint best_i[ROUTE ? DS4_SIMDGROUPS : 1];
threadgroup uint pick_id[ROUTE ? DS4_ROUTE_MAX_K : 1];
threadgroup float pick_score[ROUTE ? DS4_ROUTE_MAX_K : 1];
if (ROUTE && slot < uint(k)) {  // uniform over the threadgroup
  ds4_route_picks<RE, 32 * DS4_SIMDGROUPS>(logits + ulong(tok) * uint(RE), bias, t, slot + 1,
                                           best_v, best_i, pick_id, pick_score);
  if (threadgroup_position_in_grid.x == 0 && slot + 1 == uint(k))
    for (uint r = t; r < uint(k); r += 32 * DS4_SIMDGROUPS) {
      ids[tok * uint(k) + r] = pick_id[r];
      rw[tok * uint(k) + r] = ds4_route_weight(pick_score, uint(k), r, RENORM, rscale);
    }
}
if (slot < uint(k)) {
  uint e = ROUTE ? pick_id[slot] : idx[tok * uint(k) + slot];
  if (e >= uint(E)) {  // the same for the whole threadgroup: reads nothing, writes NaN
    bad_id = true;
  } else {
    ulong r0 = ulong(e) * uint(F) + row0;
    ds4_dot_rows<FMT, 2>(xt, uint(K), lane, 32, w1, s1, r0, w3, s3, r0, nrows, tab, acc);
  }
} else {
  threadgroup const uint* sp = SFMT == FMT ? tab : stab;
  ds4_dot_rows_b<SFMT, 2>(xt, uint(K), lane, 32, ws, ss, sb, ulong(row0), ws, ss, sb,
                          ulong(F) + row0, nrows, sp, acc);
}
for (int r = 0; r < DS4_ROWS; ++r) {
  float gs = simd_sum(acc[r]);
  float us = simd_sum(acc[DS4_ROWS + r]);
  uint row = row0 + uint(r);
  if (lane == 0 && uint(r) < nrows) {
    if (bad_id) mid[ulong(pair) * uint(F) + row] = ds4_nan();
    else mid[ulong(pair) * uint(F) + row] = ds4_swiglu(gs, us, limit);
  }
}

// @kernel moe_down_decode
// mid [N * kk, F] float32 (kk = k + SHARED), w2 [E, D, .] with scales s2, idx/rw [N * k]
// (uint32 / float32); with SHARED, the shared expert's down ws [D, .] (SFMT, scales ss, biases
// sb) takes
// slot k at weight 1. -> y [N, D] (OutT) = sum_j rw_j * W2[e_j] mid_j (+ Ws mid_k), in float32.
// Grid (ceil(D / ROWS) * 32 * DOWN_SG, N), threadgroup (32 * DOWN_SG, 1, 1): the DOWN_SG
// simdgroups of a threadgroup share its ROWS rows and split the token's slots (simdgroup s
// takes s, s + DOWN_SG, ...), so a token's k + 1 expert rows are read by that many simdgroups
// at once instead of one after the other; the partial sums meet in threadgroup memory and are
// added in simdgroup order (the twin sums over the slots in one mx.sum).
threadgroup uint tab[QFmt<FMT>::TAB];
threadgroup uint stab[(SHARED && SFMT != FMT) ? QFmt<SFMT>::TAB : 1];
threadgroup float part[DS4_DOWN_SG * DS4_ROWS];
uint t = thread_index_in_threadgroup;
QFmt<FMT>::fill_tab(tab, t, 32 * DS4_DOWN_SG);
if (SHARED && SFMT != FMT) QFmt<SFMT>::fill_tab(stab, t, 32 * DS4_DOWN_SG);
threadgroup_barrier(mem_flags::mem_threadgroup);
uint tok = threadgroup_position_in_grid.y;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
uint row0 = threadgroup_position_in_grid.x * DS4_ROWS;
uint nrows = row0 < uint(D) ? min(uint(DS4_ROWS), uint(D) - row0) : 0u;
uint kk = uint(k) + (SHARED ? 1u : 0u);
float acc[DS4_ROWS];
for (int r = 0; r < DS4_ROWS; ++r) acc[r] = 0.0f;
for (uint j = sg; j < kk; j += DS4_DOWN_SG) {  // uniform over the simdgroup
  const device float* m = mid + ulong(tok * kk + j) * uint(F);
  float dot[DS4_ROWS];
  for (int r = 0; r < DS4_ROWS; ++r) dot[r] = 0.0f;
  float weight = 1.0f;
  if (j < uint(k)) {
    uint e = idx[tok * uint(k) + j];
    if (e >= uint(E)) {  // reads nothing; NaN carries into the sum
      for (int r = 0; r < DS4_ROWS; ++r) acc[r] = ds4_nan();
      continue;
    }
    weight = rw[tok * uint(k) + j];
    ds4_dot_rows<FMT, 1>(m, uint(F), lane, 32, w2, s2, ulong(e) * uint(D) + row0, w2, s2, 0,
                         nrows, tab, dot);
  } else {
    threadgroup const uint* sp = SFMT == FMT ? tab : stab;
    ds4_dot_rows_b<SFMT, 1>(m, uint(F), lane, 32, ws, ss, sb, ulong(row0), ws, ss, sb, 0, nrows,
                            sp, dot);
  }
  for (int r = 0; r < DS4_ROWS; ++r) acc[r] += weight * simd_sum(dot[r]);
}
if (lane == 0)
  for (int r = 0; r < DS4_ROWS; ++r) part[sg * DS4_ROWS + r] = acc[r];
threadgroup_barrier(mem_flags::mem_threadgroup);
if (t < nrows) {
  float total = 0.0f;
  for (uint s = 0; s < DS4_DOWN_SG; ++s) total += part[s * DS4_ROWS + t];
  y[ulong(tok) * uint(D) + row0 + t] = OutT(total);
}

// @kernel gguf_matvec
// A dense projection at decode (1 to DS4_MV_TOKENS tokens): x [N, XK] (T), w [R, .] (FMT:
// GGUF blocks, MLX mxfp8 or affine 8-bit, float rows; scales s, biases b: an affine layout's,
// else the scales again) and, when R2 > 0, a second weight w2 [R2, .] in its own layout FMT2
// (s2, b2) whose rows follow: out [N, R + R2] (OutT) = x . W^T, in float32, rounded once to
// OutT (a merged projection of unlike parts in one launch). RG > 0 (grouped, the attention's
// wo_a): output row r reads input group r / RG, x row n at n * XK + (r / RG) * K; else x row n
// at n * XK. With R2 > 0, R is a multiple of DS4_ROWS, and RG > 0 is one (a simdgroup's rows
// lie in one part and one group: the launch checks it). A simdgroup computes DS4_ROWS rows for
// all N tokens, its lanes striding over K 32 weights at a time: each weight is read once from
// memory (the other tokens' passes hit the cache). Grid (32 * SIMDGROUPS, ceil((R + R2) /
// (ROWS * SIMDGROUPS))), threadgroup (32 * SIMDGROUPS, 1, 1).
threadgroup uint tab[QFmt<FMT>::TAB];
threadgroup uint tab2[FMT2 != FMT ? QFmt<FMT2>::TAB : 1];
uint t = thread_index_in_threadgroup;
QFmt<FMT>::fill_tab(tab, t, 32 * DS4_SIMDGROUPS);
if (FMT2 != FMT) QFmt<FMT2>::fill_tab(tab2, t, 32 * DS4_SIMDGROUPS);
threadgroup_barrier(mem_flags::mem_threadgroup);
uint lane = thread_index_in_simdgroup;
uint rows = uint(R) + uint(R2);
uint row0 = (threadgroup_position_in_grid.y * DS4_SIMDGROUPS + simdgroup_index_in_threadgroup) *
            DS4_ROWS;
uint nrows = row0 < rows ? min(uint(DS4_ROWS), rows - row0) : 0u;
bool second = row0 >= uint(R);  // uniform over the simdgroup
ulong xoff = uint(RG) > 0u ? ulong(row0 / uint(RG)) * uint(K) : 0ul;
threadgroup const uint* tp2 = FMT2 == FMT ? tab : tab2;
float acc[DS4_ROWS * DS4_MV_TOKENS];
for (int i = 0; i < DS4_ROWS * DS4_MV_TOKENS; ++i) acc[i] = 0.0f;
for (int n = 0; n < N; ++n) {
  const device T* xn = x + ulong(n) * uint(XK) + xoff;
  if (second)
    ds4_dot_rows_b<FMT2, 1>(xn, uint(K), lane, 32, w2, s2, b2, ulong(row0 - uint(R)), w2, s2, b2,
                            0, nrows, tp2, acc + n * DS4_ROWS);
  else
    ds4_dot_rows_b<FMT, 1>(xn, uint(K), lane, 32, w, s, b, ulong(row0), w, s, b, 0, nrows, tab,
                           acc + n * DS4_ROWS);
}
for (int n = 0; n < N; ++n)
  for (int r = 0; r < DS4_ROWS; ++r) {
    float v = simd_sum(acc[n * DS4_ROWS + r]);
    if (lane == 0 && uint(r) < nrows) out[ulong(n) * rows + row0 + uint(r)] = OutT(v);
  }

// @kernel moe_matmul_sorted
// Expert-grouped tiled matmul for many (token, expert) pairs. Pairs are sorted by expert:
// sorted pair p uses expert eid[p], input row x[xrow[p]] and writes output row order[p].
// GATE_UP: out = swiglu(W1[e] x, W3[e] x) (limit as in moe_gate_up_decode); otherwise
// out = W1[e] x. x [*, K] (T), w1/w3 [E, NOUT, .] -> out [P, NOUT] float32.
// Grid (ceil(NOUT / BN) * TG, ceil(P / BM)), threadgroup (TG = 128, 1, 1): four simdgroups in
// 2 x 2, each owning a (BM / 2) x (BN / 2) block of the BM x BN tile as 8 x 8 simdgroup
// matrices (float32 accumulators). Per K step of BK the threads stage x (float32) and the
// dequantized weights in threadgroup memory, once for the whole tile; the simdgroups then load
// 8 x 8 fragments (the weights transposed: W is [n][k], the product wants [k][n]) and
// multiply-accumulate. Runs of equal experts inside the tile are processed one after the other
// with fresh accumulators (x rows outside the run are staged as zeros, fragments without a row
// of the run or a column below NOUT are skipped); at the end of a run the accumulators go
// through threadgroup memory to the epilogue (SwiGLU, scatter to order[p]), which writes only
// the run's rows.
const int LDK = DS4_BK + 4;  // row stride of the staged tiles (floats)
const int LDN = DS4_BN + 4;  // row stride of the staged results
const int FM = DS4_BM / 16;  // 8 x 8 fragments per simdgroup, down and across
const int FN = DS4_BN / 16;
static_assert(DS4_TG == 128 && DS4_BM % 16 == 0 && DS4_BN % 16 == 0 && DS4_BK % 8 == 0,
              "moe_matmul_sorted: 2 x 2 simdgroups of 8 x 8 fragments");
static_assert(4 * ((DS4_BM + 2 * DS4_BN) * LDK + 2 * DS4_BM * LDN) <= 32768,
              "moe_matmul_sorted: threadgroup memory over 32 KB");
threadgroup float xs[DS4_BM * LDK];
threadgroup float ws1[DS4_BN * LDK];
threadgroup float ws3[DS4_BN * LDK];
threadgroup float c1s[DS4_BM * LDN];
threadgroup float c3s[DS4_BM * LDN];
uint t = thread_index_in_threadgroup;
uint sg = simdgroup_index_in_threadgroup;
uint sm = (sg / 2) * (DS4_BM / 2);  // this simdgroup's first tile row
uint sn = (sg % 2) * (DS4_BN / 2);  // and first tile column
uint p0 = threadgroup_position_in_grid.y * DS4_BM;
uint n0 = threadgroup_position_in_grid.x * DS4_BN;
uint pend = min(p0 + DS4_BM, uint(P));
ulong rb = QFmt<FMT>::row_bytes(K);
ulong sb = QFmt<FMT>::scale_bytes(K);
uint p = p0;
while (p < pend) {
  uint e = eid[p];
  uint q = p + 1;
  while (q < pend && eid[q] == e) ++q;
  if (e >= uint(E)) {  // the run is the same for every thread: no weights read, NaN rows
    for (uint i = t; i < (q - p) * DS4_BN; i += DS4_TG) {
      uint col = n0 + i % DS4_BN;
      if (col < uint(NOUT)) out[ulong(order[p + i / DS4_BN]) * uint(NOUT) + col] = ds4_nan();
    }
    p = q;
    continue;
  }
  simdgroup_float8x8 acc1[FM][FN];
  simdgroup_float8x8 acc3[FM][FN];
  // Fragments that can change: row i holds a pair of the run, column j an output below NOUT
  // (uniform over the simdgroup, so a simdgroup skips the others as a whole).
  bool live[FM];
  bool cols[FN];
  for (int j = 0; j < FN; ++j) cols[j] = n0 + sn + 8 * uint(j) < uint(NOUT);
  for (int i = 0; i < FM; ++i) {
    uint r0 = p0 + sm + 8 * uint(i);
    live[i] = r0 < q && r0 + 8 > p;
    for (int j = 0; j < FN; ++j) {
      acc1[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      acc3[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
  }
  for (uint kb = 0; kb < uint(K); kb += DS4_BK) {
    for (uint i = t; i < DS4_BM * (DS4_BK / 8); i += DS4_TG) {
      uint r = i / (DS4_BK / 8);
      uint c = (i % (DS4_BK / 8)) * 8;
      uint pr = p0 + r;
      bool in_run = pr >= p && pr < q;
      ulong at = in_run ? ulong(xrow[pr]) * uint(K) + kb + c : 0;
      for (int j = 0; j < 8; ++j) xs[r * LDK + c + j] = in_run ? float(x[at + j]) : 0.0f;
    }
    for (uint i = t; i < DS4_BN * (DS4_BK / 8); i += DS4_TG) {
      uint r = i / (DS4_BK / 8);
      uint c = (i % (DS4_BK / 8)) * 8;
      uint nr = n0 + r;
      float v[8];
      if (nr < uint(NOUT)) {
        ulong wrow = ulong(e) * uint(NOUT) + nr;
        QFmt<FMT>::load8(w1 + wrow * rb, s1 + wrow * sb, kb + c, v);
        for (int j = 0; j < 8; ++j) ws1[r * LDK + c + j] = v[j];
        if (GATE_UP) {
          QFmt<FMT>::load8(w3 + wrow * rb, s3 + wrow * sb, kb + c, v);
          for (int j = 0; j < 8; ++j) ws3[r * LDK + c + j] = v[j];
        }
      } else {
        for (int j = 0; j < 8; ++j) {
          ws1[r * LDK + c + j] = 0.0f;
          ws3[r * LDK + c + j] = 0.0f;
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint kk = 0; kk < DS4_BK; kk += 8) {
      simdgroup_float8x8 a[FM];
      simdgroup_float8x8 b[FN];
      for (int i = 0; i < FM; ++i)
        if (live[i]) simdgroup_load(a[i], xs, LDK, ulong2(kk, sm + 8 * uint(i)));
      for (int j = 0; j < FN; ++j)
        if (cols[j]) simdgroup_load(b[j], ws1, LDK, ulong2(kk, sn + 8 * uint(j)), true);
      for (int i = 0; i < FM; ++i)
        for (int j = 0; j < FN; ++j)
          if (live[i] && cols[j])
            simdgroup_multiply_accumulate(acc1[i][j], a[i], b[j], acc1[i][j]);
      if (GATE_UP) {
        for (int j = 0; j < FN; ++j)
          if (cols[j]) simdgroup_load(b[j], ws3, LDK, ulong2(kk, sn + 8 * uint(j)), true);
        for (int i = 0; i < FM; ++i)
          for (int j = 0; j < FN; ++j)
            if (live[i] && cols[j])
              simdgroup_multiply_accumulate(acc3[i][j], a[i], b[j], acc3[i][j]);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  // The K loop's last barrier ordered the previous run's epilogue reads before these stores.
  for (int i = 0; i < FM; ++i)
    for (int j = 0; j < FN; ++j) {
      ulong2 at = ulong2(sn + 8 * uint(j), sm + 8 * uint(i));
      simdgroup_store(acc1[i][j], c1s, LDN, at);
      if (GATE_UP) simdgroup_store(acc3[i][j], c3s, LDN, at);
    }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint i = t; i < (q - p) * DS4_BN; i += DS4_TG) {
    uint r = p - p0 + i / DS4_BN;
    uint c = i % DS4_BN;
    if (n0 + c >= uint(NOUT)) continue;
    float g = c1s[r * LDN + c];
    float v = GATE_UP ? ds4_swiglu(g, c3s[r * LDN + c], limit) : g;
    out[ulong(order[p0 + r]) * uint(NOUT) + n0 + c] = v;
  }
  p = q;
}

// @kernel shared_down
// The shared expert's down projection with the steps around it (ds4mlx/kernels/matvec.py
// shared_down_ops is the twin): gu [N, 2F] (GT) the merged gate | up product, mid = T(swiglu
// (gate, up)) (the cast the ops make before the matmul), y = T(mid . w[r]) for w [R, F] (WT)
// dense, out [N, R] (T) = T(add + y) with add [N, R] (T) the routed experts' sum.
// Grid (32 * DS4_SIMDGROUPS, ceil(R / (DS4_ROWS * DS4_SIMDGROUPS))), threadgroup
// (32 * DS4_SIMDGROUPS, 1, 1): a simdgroup computes DS4_ROWS rows for all N <= 8 tokens (each
// weight read once), its lanes striding over F (the SwiGLU recomputed per simdgroup: a few
// thousand values, no threadgroup memory).
const int NT = 8;
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
uint r0 = (threadgroup_position_in_grid.y * DS4_SIMDGROUPS + sg) * DS4_ROWS;
float acc[DS4_ROWS * NT];
for (int i = 0; i < DS4_ROWS * NT; ++i) acc[i] = 0.0f;
for (uint k = lane; k < uint(F); k += 32) {
  float wv[DS4_ROWS];
  for (int r = 0; r < DS4_ROWS; ++r)
    wv[r] = r0 + uint(r) < uint(R) ? float(w[ulong(r0 + uint(r)) * uint(F) + k]) : 0.0f;
  for (int n = 0; n < N; ++n) {
    ulong at = ulong(n) * uint(2 * F) + k;
    float m = float(T(ds4_swiglu(float(gu[at]), float(gu[at + uint(F)]), limit)));
    for (int r = 0; r < DS4_ROWS; ++r) acc[r * NT + n] += m * wv[r];
  }
}
for (int r = 0; r < DS4_ROWS; ++r)
  for (int n = 0; n < N; ++n) {
    float s = simd_sum(acc[r * NT + n]);
    if (lane == 0 && r0 + uint(r) < uint(R)) {
      ulong o = ulong(n) * uint(R) + r0 + uint(r);
      out[o] = T(float(add[o]) + float(T(s)));
    }
  }

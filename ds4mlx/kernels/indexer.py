"""Lightning Indexer kernels (``metal/attention.metal``, ``metal/rows.metal``), each beside its
MLX-ops twin.

Entry points (kernel | ops twin): :func:`indexer_scores` (Σ_h w_h·ReLU(q_h·k) over the indexer
keys in storage, invisible keys -inf), :func:`indexer_topk` (the top-k of each score row as
ascending indices) and :func:`index_queries` (kernel ``index_q``: the queries' RoPE, Hadamard
and FP4 rounding, the head weights' scale). On the queries as projected (:class:`IndexQueries`),
:func:`indexer_scores` makes them in its own launch and :func:`indexer_pick` adds the top-k to
that launch (the grid form, metal/grid.h). Whether a kernel serves a call is
:func:`ds4mlx.kernels.serves` of the variant ``INDEXER``.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import dispatch
from .dispatch import INDEXER, KernelInputError, ceil_div, device_array
from .source import INDEX_KEY_PASSES, INDEX_THREADS

_INDEX_HEAD_GROUPS = 8  # HG of indexer_scores


def indexer_scores_ops(q: mx.array, w: mx.array, keys: mx.array, n_vis: mx.array) -> mx.array:
    """Ops twin of :func:`indexer_scores`."""
    dots = q @ mx.expand_dims(keys.astype(mx.float32), 1).swapaxes(-1, -2)  # [B, S, H, NK]
    scores = mx.sum(mx.maximum(dots, 0.0) * w[..., None], axis=2)
    seen = mx.arange(keys.shape[1])[None, :] < n_vis[:, None]
    return mx.where(seen, scores, -mx.inf)


def indexer_scores(q: "mx.array | IndexQueries", w: mx.array | None, keys: mx.array,
                   n_vis: mx.array) -> mx.array:
    """Lightning Indexer scores ``[B, S, NK]`` float32: Σ_h w_h·ReLU(q_h·k_n) for the keys a
    query sees (``n < n_vis[s]``), -inf for the others. q ``[B, S, H, HD]`` and w ``[B, S, H]``
    float32; keys ``[B, NK, HD]`` read in their storage dtype; n_vis ``[S]`` int32. ``q`` an
    :class:`IndexQueries` (w None): the queries as projected, made in the scores' launch
    (kernel ``indexer_scores_q``) where that fits, else by :meth:`IndexQueries.compute` first."""
    if isinstance(q, IndexQueries):
        return _scores_with_queries(q, keys, n_vis)
    if q.ndim != 4 or w.shape != q.shape[:3] or keys.ndim != 3 or keys.shape[2] != q.shape[3] \
            or keys.shape[0] != q.shape[0] or tuple(n_vis.shape) != (q.shape[1],):
        raise KernelInputError(
            f"indexer_scores: q {tuple(q.shape)}, w {tuple(w.shape)}, keys {tuple(keys.shape)}, "
            f"n_vis {tuple(n_vis.shape)} must be [B, S, H, HD], [B, S, H], [B, NK, HD], [S]")
    if not (dispatch.serves(INDEXER) and dispatch.first_use_ok(
            INDEXER, keys.dtype, index_heads=q.shape[2], index_head_dim=q.shape[3])):
        return indexer_scores_ops(q, w, keys, n_vis)
    b, s, h, hd = q.shape
    nk = keys.shape[1]
    kt = INDEX_THREADS // _INDEX_HEAD_GROUPS
    (scores,) = dispatch.run("attention.metal", "indexer_scores",
                    {"q": q.astype(mx.float32), "w": w.astype(mx.float32), "keys": keys,
                     "n_vis": n_vis.astype(mx.int32), "S": s, "NK": nk},
                    {"scores": ((b, s, nk), mx.float32)},
                    grid=(INDEX_THREADS * ceil_div(nk, kt), b * s, 1),
                    threadgroup=(INDEX_THREADS, 1, 1),
                    template=[("T", keys.dtype), ("H", h), ("HD", hd)])
    return scores


@dataclass(frozen=True)
class IndexQueries:
    """The indexer's queries ``q [B, S, H, HD]`` and head weights ``w [B, S, H]`` as projected,
    with what kernel ``index_q`` makes of them (:func:`index_queries`: RoPE at host positions
    ``pos [B, S]``, Hadamard + FP4 with ``fp4``, the weights times ``wscale``) left undone, so
    that :func:`indexer_scores` can do it inside its own launch."""

    q: mx.array
    w: mx.array
    pos: np.ndarray
    freqs: mx.array
    wscale: float
    fp4: bool

    def compute(self) -> tuple[mx.array, mx.array]:
        """(queries, weights) in float32: kernel ``index_q`` where it serves, else its twin."""
        kw = dict(wscale=self.wscale, fp4=self.fp4)
        if index_queries_serves(self.q.dtype, self.q.shape[-1], 2 * self.freqs.shape[0]):
            return index_queries(self.q, self.w, self.pos, self.freqs, **kw)
        return self.ops()

    def ops(self) -> tuple[mx.array, mx.array]:
        twin = dispatch.twin("index_q")  # the model's ops (ds4mlx.model.compressor installs it)
        if twin is None:
            raise RuntimeError("index_q: no ops twin installed (import ds4mlx.model)")
        return twin(self.q, self.w, self.pos, self.freqs, wscale=self.wscale, fp4=self.fp4)


def _query_store(dtype: mx.Dtype, fp4: bool, h: int, hd: int, rd: int,
                 extra: int = 0) -> tuple[mx.Dtype, int] | None:
    """(dtype, heads per block) in which kernels ``indexer_scores_q`` / ``indexer_pick_q`` keep
    the queries (threadgroup memory, 32 KB): their own dtype when 16-bit, bfloat16 for float32
    ones that went through FP4 (e2m1 values times a power of two, exact in bfloat16), else
    float32; all ``h`` heads at once, or halves (multiples of 8: each thread's heads stay in
    order) until they fit; None where nothing fits."""
    store = dtype if dtype.size == 2 else (mx.bfloat16 if fp4 else mx.float32)
    hb = h
    while hb * hd * store.size + 4 * (hb + rd + INDEX_THREADS) + extra > 32768:
        if hb % 16:
            return None
        hb //= 2
    return store, hb


def indexer_scores_ops_q(q: IndexQueries, keys: mx.array, n_vis: mx.array) -> mx.array:
    """Ops twin of :func:`indexer_scores` on :class:`IndexQueries`: the queries' twin, then
    :func:`indexer_scores_ops`."""
    return indexer_scores_ops(*q.ops(), keys, n_vis)


def _scores_with_queries(q: IndexQueries, keys: mx.array, n_vis: mx.array) -> mx.array:
    b, s, h, hd = q.q.shape
    rd = 2 * q.freqs.shape[0]
    if tuple(q.w.shape) != (b, s, h) or keys.ndim != 3 or keys.shape[0] != b \
            or keys.shape[2] != hd or tuple(n_vis.shape) != (s,):
        raise KernelInputError(
            f"indexer_scores: queries {tuple(q.q.shape)}, weights {tuple(q.w.shape)}, keys "
            f"{tuple(keys.shape)}, n_vis {tuple(n_vis.shape)} must be [B, S, H, HD], [B, S, H], "
            f"[B, NK, HD], [S]")
    store = _query_store(q.q.dtype, q.fp4, h, hd, rd)
    if not (store is not None and q.q.dtype == keys.dtype and _fits_index_q(hd, rd)
            and dispatch.serves(INDEXER) and dispatch.first_use_ok(
                INDEXER, keys.dtype, index_heads=h, index_head_dim=hd, rope_dims=rd)):
        return indexer_scores(*q.compute(), keys, n_vis)
    (scores,) = _launch_q("indexer_scores_q", q, keys, n_vis, store, {},
                          {"scores": ((b, s, keys.shape[1]), mx.float32)}, [])
    return scores


def _launch_q(name: str, q: IndexQueries, keys: mx.array, n_vis: mx.array,
              store: tuple[mx.Dtype, int], inputs: dict, outputs: dict, template: list):
    """Kernel ``name`` (indexer_scores_q or indexer_pick_q) on the queries as projected."""
    b, s, h, hd = q.q.shape
    rows, nk = b * s, keys.shape[1]
    p = np.broadcast_to(np.asarray(q.pos, dtype=np.int32), (b, s)).reshape(rows)
    per_tg = INDEX_THREADS // _INDEX_HEAD_GROUPS * INDEX_KEY_PASSES
    return dispatch.run(
        "attention.metal", name,
        {"x": q.q.reshape(rows * h, hd), "wr": device_array(q.w.reshape(rows * h)),
         "pos": mx.array(np.pad(p, (0, max(0, 8 - rows)))),
         "freqs": device_array(q.freqs.astype(mx.float32)), "wscale": float(q.wscale),
         "keys": keys, "n_vis": n_vis.astype(mx.int32), "S": s, "NK": nk, **inputs},
        outputs, grid=(INDEX_THREADS * ceil_div(nk, per_tg), rows, 1),
        threadgroup=(INDEX_THREADS, 1, 1),
        template=[("T", keys.dtype), ("QT", q.q.dtype), ("WT", q.w.dtype), ("QS", store[0]),
                  ("H", h), ("HB", store[1]), ("HD", hd), ("RD", 2 * q.freqs.shape[0]),
                  ("FP4", bool(q.fp4)), *template])


# the top-k's threadgroup memory beside the queries' in indexer_pick_q (cnt, sums, flag)
_PICK_BYTES = 4 * (INDEX_THREADS + INDEX_THREADS // 32 + 1)


def indexer_pick_ops(q: IndexQueries, keys: mx.array, n_vis: mx.array, k: int) -> mx.array:
    """Ops twin of :func:`indexer_pick`."""
    return indexer_topk_ops(indexer_scores_ops_q(q, keys, n_vis), k)


def indexer_pick(q: IndexQueries, keys: mx.array, n_vis: mx.array, k: int,
                 grid: bool | None = None) -> mx.array:
    """:func:`indexer_topk` of :func:`indexer_scores` on queries as projected: int32
    ``[B, S, k]``. In one launch where the grid-synchronised form serves (``grid``; None:
    :func:`ds4mlx.kernels.dispatch.grid_sync`): kernel ``indexer_pick_q``, whose threadgroups
    score their keys and the last of a row's to finish picks its top-k (no threadgroup waits
    for another); else the two launches (``indexer_scores_q``, ``indexer_topk``)."""
    b, s, h, hd = q.q.shape
    nk, rd = keys.shape[1], 2 * q.freqs.shape[0]
    if not 1 <= k <= nk:
        raise KernelInputError(f"indexer_pick: k={k} must be in 1..{nk}")
    store = _query_store(q.q.dtype, q.fp4, h, hd, rd, _PICK_BYTES)
    if (store is not None and q.q.dtype == keys.dtype and _fits_index_q(hd, rd) and keys.ndim == 3
            and keys.shape[0] == b and keys.shape[2] == hd and tuple(n_vis.shape) == (s,)
            and dispatch.serves(INDEXER)):
        form = dispatch.grid_sync() if grid is None else grid
        # this form's check is asked either way (it has no cases where the form cannot serve)
        if dispatch.first_use_ok(INDEXER, keys.dtype, index_heads=h, index_head_dim=hd,
                                 index_topk=k, rope_dims=rd) and form:
            _, idx = _launch_q("indexer_pick_q", q, keys, n_vis, store,
                               {"counter": dispatch.counter("indexer_pick_q", b * s)},
                               {"part": ((b * s, nk), mx.uint32), "idx": ((b, s, k), mx.int32)},
                               [("TOPK", k)])
            return idx
    return indexer_topk(indexer_scores(q, None, keys, n_vis), k)


def indexer_topk_ops(scores: mx.array, k: int) -> mx.array:
    """Ops twin of :func:`indexer_topk` (argpartition, then ascending; -1 for -inf picks)."""
    part = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k].astype(mx.int32)
    finite = mx.take_along_axis(scores, part, axis=-1) > -mx.inf
    n = scores.shape[-1]
    ordered = mx.sort(mx.where(finite, part, n), axis=-1)
    return mx.where(ordered < n, ordered, -1)


def indexer_topk(scores: mx.array, k: int) -> mx.array:
    """The ``k`` largest finite scores of each row of ``scores [..., N]`` (float32) as int32
    indices ``[..., k]`` in ascending order, -1 where a row has fewer than ``k`` finite scores.
    Ties at the k-th value keep the lowest indices (the twin may break them otherwise)."""
    n = scores.shape[-1]
    if not 1 <= k <= n:
        raise KernelInputError(f"indexer_topk: k={k} must be in 1..{n}")
    if not (dispatch.serves(INDEXER) and dispatch.first_use_ok(INDEXER, mx.float32, index_topk=k)):
        return indexer_topk_ops(scores, k)
    lead = scores.shape[:-1]
    rows = 1
    for x in lead:
        rows *= x
    (idx,) = dispatch.run("attention.metal", "indexer_topk",
                 {"scores": device_array(scores.astype(mx.float32).reshape(rows, n)), "N": n},
                 {"idx": ((rows, k), mx.int32)},
                 grid=(INDEX_THREADS, rows, 1), threadgroup=(INDEX_THREADS, 1, 1),
                 template=[("TOPK", k)])
    return idx.reshape(*lead, k)


# ----------------------------------------------------------------------------- indexer queries
def index_queries_serves(dtype: mx.Dtype, d: int, rope_dims: int) -> bool:
    """Whether :func:`index_queries` serves queries of ``d`` features (``rope_dims`` rotated)
    for a model in ``dtype``: the ``indexer`` variant is on and its queries passed their
    first-use check. The caller asks, since the twin is its own ops (kernels/check.py gets them
    through ``install_twin("index_q", ...)``)."""
    return _fits_index_q(d, rope_dims) and dispatch.serves(INDEXER) and dispatch.first_use_ok(
        INDEXER, dtype, index_head_dim=d, rope_dims=rope_dims)


def _fits_index_q(d: int, rope_dims: int) -> bool:
    """The query widths kernel index_q's steps take: a power of two, each lane's features
    (d / 32 of them) whole RoPE pairs."""
    return 64 <= d <= 1024 and d & (d - 1) == 0 and 0 < rope_dims <= d and rope_dims % 2 == 0


def index_queries(q: mx.array, w: mx.array, pos: np.ndarray, freqs: mx.array, *,
                  wscale: float, fp4: bool) -> tuple[mx.array, mx.array]:
    """Kernel ``index_q``: the indexer's queries ``q [..., H, D]`` rotated at host positions
    ``pos`` (one per token, broadcast to ``q.shape[:-2]``), with ``fp4`` the Hadamard + FP4
    rounding, as float32; and the head weights ``w [..., H]`` times ``wscale`` in float32. One
    launch for what the ops run as some 15."""
    d = q.shape[-1]
    rd = 2 * freqs.shape[0]
    if tuple(w.shape) != tuple(q.shape[:-1]):
        raise KernelInputError(f"index_queries: w {tuple(w.shape)} must be q's {tuple(q.shape[:-1])}")
    if not index_queries_serves(q.dtype, d, rd):
        raise KernelInputError("index_queries: no kernel serves this call (the caller runs its ops)")
    lead = q.shape[:-1]
    rows = int(np.prod(lead))
    p = np.broadcast_to(np.asarray(pos, dtype=np.int32)[..., None], lead).reshape(rows)
    p = np.pad(p, (0, max(0, 8 - rows)))
    qo, wo = dispatch.run("rows.metal", "index_q",
                          {"x": q.reshape(rows, d), "wr": device_array(w.reshape(rows)),
                           "pos": mx.array(p), "freqs": device_array(freqs.astype(mx.float32)),
                           "wscale": float(wscale)},
                          {"q": ((rows, d), mx.float32), "w": ((rows,), mx.float32)},
                          grid=(32, rows, 1), threadgroup=(32, 1, 1),
                          template=[("T", q.dtype), ("WT", w.dtype), ("FP4", bool(fp4)),
                                    ("D", d), ("RD", rd)])
    return qo.reshape(q.shape), wo.reshape(lead)

"""Attention of DeepSeek V4: Q-LoRA queries against one shared 512-dim KV head (K = V).

Each query attends, in one softmax with a per-head sink, to the raw KV rows of the last
``sliding_window`` positions (itself included) and, in compressed layers, to compressed
rows: all visible ones at ratio 128, the indexer's top-k at ratio 4. The RoPE part of the
output is rotated back, then a grouped low-rank projection (wo_a per group, wo_b) mixes heads.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import kernels, ops
from ..config import ModelConfig
from ..kernels import attention as fused
from ..kernels import indexer as fused_indexer
from ..ops import RMSNorm
from ..state import BatchLayerCache, LayerCache, record_window
from . import qat
from .compressor import Compressor, Indexer
from .attention_one import one_all, one_indexed, one_window
from .merged import MergedLinear
from .rope import apply_rope, host_positions, layer_frequencies, rope_tables, rotate

# Bound on the float32 score elements materialised per query block.
_SCORE_BUDGET = 1 << 26
# Queries per prefill block on the CPU: at most max(this, 2 x window) (Attention._attend_blocks).
_CPU_BLOCK = 32
# Calls of up to this many tokens (decode, speculative verification) take the fused kernels.
FUSED_MAX_TOKENS = 8


def grouped_linear(layer: nn.Module, x: mx.array, groups: int) -> mx.array:
    """Block-diagonal projection: group g of ``x`` [..., G, in] meets rows g·R..(g+1)·R of ``layer``."""
    if hasattr(layer, "grouped"):
        return layer.grouped(x, groups)
    if isinstance(layer, nn.QuantizedLinear):
        out_rows = layer.weight.shape[0] // groups
        parts = []
        for g in range(groups):
            rows = slice(g * out_rows, (g + 1) * out_rows)
            biases = None if layer.get("biases") is None else layer.biases[rows]
            parts.append(mx.quantized_matmul(
                x[..., g, :], layer.weight[rows], layer.scales[rows], biases,
                transpose=True, group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
            ))
        return mx.stack(parts, axis=-2)
    w = layer.weight.reshape(groups, -1, layer.weight.shape[-1])  # [G, R, in]
    return (mx.expand_dims(x, -2) @ mx.swapaxes(w, -1, -2)).squeeze(-2)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.config = config
        self.ratio = config.ratio(layer)
        self.n_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.rope_dims = config.qk_rope_head_dim
        self.window = config.sliding_window
        self.groups = config.o_groups
        self.eps = config.rms_norm_eps
        d = config.hidden_size
        self.wq_a = nn.Linear(d, config.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(config.q_lora_rank, eps=self.eps)
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(d, self.head_dim, bias=False)
        self.kv_norm = RMSNorm(self.head_dim, eps=self.eps)
        self.wo_a = nn.Linear(self.n_heads * self.head_dim // self.groups,
                              self.groups * config.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(self.groups * config.o_lora_rank, d, bias=False)
        self.attn_sink = mx.zeros((self.n_heads,))
        if self.ratio:
            self.compressor = Compressor(config, self.ratio, self.head_dim)
        if self.ratio == 4:
            self.indexer = Indexer(config, self.ratio)
        self._freqs = layer_frequencies(config, self.ratio)
        self._proj: _Projections | None = None
        self.qat_rounding = True

    # ------------------------------------------------------------------ rounding switches
    def _kv_rounding(self):
        if not self.qat_rounding:
            return None
        return lambda rows: qat.kv_fp8(rows, self.rope_dims)

    def _index_rounding(self):
        return qat.hadamard_fp4 if self.qat_rounding else None

    # ------------------------------------------------------------------ merged projections
    def merge_projections(self) -> "_Projections":
        """The projections that read one input, merged (built on first use, again after the
        weights were replaced): x -> wq_a | wkv | indexer head weights; x (float32) -> both
        compressors' wkv | wgate with the APE as per-slot bias rows; qr -> wq_b | indexer wq_b."""
        p = self._proj
        if p is not None and p.current(self):
            return p
        self._proj = p = _Projections(self)
        return p

    def _fused_attention(self, s: int) -> bool:
        return s <= FUSED_MAX_TOKENS and kernels.serves(kernels.ATTENTION)

    def _indexed(self, s: int, offsets: list[int]) -> bool:
        """Whether a call of ``s`` tokens at these start positions needs the indexer's queries:
        once a query sees more compressed rows than it picks (the ops path builds them anyway:
        unused, they are never evaluated)."""
        if self.ratio != 4:
            return False
        return not self._fused_attention(s) or any(
            (p0 + s) // self.ratio > self.config.index_topk for p0 in offsets)

    # ------------------------------------------------------------------ forward
    def __call__(self, x: mx.array, cache: LayerCache | BatchLayerCache,
                 x32: mx.array | None = None) -> mx.array:
        """``x32``: x in float32 where the caller has it (the compressors' input: no cast)."""
        if isinstance(cache, BatchLayerCache):
            return self._call_batch(x, cache, x32)
        s = x.shape[1]
        pos = np.arange(cache.offset, cache.offset + s)[None, :]  # host positions
        p = self._project(x, pos, self._indexed(s, [cache.offset]), x32, cache)
        return self._output(self._positional(p, pos, cache, x.dtype))

    def _call_batch(self, x: mx.array, cache: BatchLayerCache, x32: mx.array | None = None) -> mx.array:
        """Sequences at their own positions: the projections and the rotations run on the whole
        batch (each weight read once), the carried state and the attention per sequence on its
        real tokens."""
        b, s, _ = x.shape
        if b != len(cache.caches):
            raise ValueError(f"batch of {b} sequences for a cache of {len(cache.caches)}")
        spans = cache.spans(s)
        # host positions of every token (padding gets any: its rows are never read)
        pos = np.stack([np.arange(c.offset - a, c.offset - a + s) for c, (a, _) in zip(cache.caches, spans)])
        p = self._project(x, pos, self._indexed(s, [c.offset for c in cache.caches]), x32)
        positions = host_positions(pos)
        q, kv, index_q = self._rotate(p, pos, positions)
        outs = []
        for i, (c, (a, n)) in enumerate(zip(cache.caches, spans)):
            if n == 0:
                outs.append(mx.zeros((1, s, self.n_heads, self.head_dim), dtype=mx.float32))
                continue
            rows = slice(a, a + n)
            o = self._attend_state(q[i:i + 1, rows], kv[i:i + 1, rows], p.rows(i, a, a + n),
                                   None if index_q is None else index_q[i:i + 1, rows], c, x.dtype)
            if n < s:
                o = mx.pad(o, [(0, 0), (a, s - a - n), (0, 0), (0, 0)])
            outs.append(o)
        o = outs[0] if b == 1 else mx.concatenate(outs, axis=0)
        return self._output(self._unrotate(o, pos, positions, x.dtype))

    def _project(self, x: mx.array, pos: np.ndarray, indexed: bool,
                 x32: mx.array | None = None, cache: LayerCache | None = None) -> "_Projected":
        """Every matmul on the layer input, merged where they share an input (the compressors'
        APE, the one positional part, rides along as a per-slot bias of host positions ``pos``
        [B, s]); the indexer's queries only if ``indexed``. With one sequence's ``cache``, a
        decode token's compressor step runs in the launch of its kv rows (kernel rope_rows)."""
        b, s, _ = x.shape
        proj = self.merge_projections()
        p = _Projected()
        if self.ratio and proj.fused_compressors(pos, self.head_dim, self.rope_dims, x.dtype):
            p.comp_x = x if x32 is None else x32  # for kernel comp_rows, or rope_rows' COMP
        xo = proj.x(x, parts=3 if indexed else 2)
        wq, wk = self.q_norm.weight, self.kv_norm.weight
        if (self.q_norm.eps == self.eps and wq.dtype == wk.dtype and xo[0].dtype == xo[1].dtype
                and fused.rope_rows_serves(xo[1].dtype, self.head_dim, self.rope_dims, wq.shape[0])):
            # the kv rows (RMS, RoPE, FP8) and the q_norm of the same projection in one launch
            comp = None if p.comp_x is None or cache is None else self._compress_args(
                p.comp_x, int(pos[0, 0]), cache)
            p.kv_rows, p.qr, *written = fused.rope_rows(
                xo[1], pos, self._freqs, norm=fused.NORM_WEIGHTED, weight=wk, eps=self.eps,
                fp8=self.qat_rounding, q_norm=(xo[0], wq), comp=comp)
            if comp is not None:
                p.comp_written = written + [None] * (2 - len(written))
        else:
            p.qr = self.q_norm(xo[0])
        qo = proj.q(p.qr, parts=2 if indexed else 1)
        p.q = qo[0].reshape(b, s, self.n_heads, self.head_dim)
        p.kv = xo[1]
        if self.ratio and p.comp_x is None:
            ks = proj.compressed(x if x32 is None else x32, pos)
            o = proj.comp.offsets()
            p.comp = ks[..., o[0]:o[2]]
            if self.ratio == 4:
                p.index_comp = ks[..., o[2]:o[4]]
        if indexed:
            p.index_q = self.indexer.project_queries(p.qr, qo[1], xo[2])
            p.index_w = xo[2]
        return p

    def _output(self, o: mx.array) -> mx.array:
        b, s = o.shape[:2]
        o = o.reshape(b, s, self.groups, -1)
        u = grouped_linear(self.wo_a, o, self.groups).reshape(b, s, -1)
        return self.wo_b(u)

    def _positional(self, p: "_Projected", pos: np.ndarray, cache: LayerCache,
                    dtype: mx.Dtype) -> mx.array:
        """Rotation, the carried state and the attention of one sequence's projected tokens at
        host positions ``pos`` (cache.offset..) → outputs [B, s, H, d] in ``dtype``, rotated back."""
        positions = host_positions(pos)
        # the fused attention kernel can take the queries as projected and rotate them, and its
        # output, itself (two launches fewer)
        roped = self._fused_attention(pos.shape[1]) and fused.attention_rope_serves(
            dtype, self.head_dim, self.rope_dims)
        q, kv, index_q = self._rotate(p, pos, positions, rotate_q=not roped, defer_index=True)
        o = self._attend_state(q, kv, p, index_q, cache, dtype, positions,
                               rope=(pos[0], dtype) if roped else None)
        return o if roped else self._unrotate(o, pos, positions, dtype)

    def _rotate(self, p: "_Projected", pos: np.ndarray, positions: mx.array, rotate_q: bool = True,
                defer_index: bool = False):
        """Normalised, rotated (and rounded) queries and KV rows, and indexer queries, of tokens
        at host positions ``pos`` [B, s] (``positions``: the same as ``host_positions``); the
        queries as projected unless ``rotate_q``. With ``defer_index``, indexer queries that
        kernel index_q would make stay undone (``kernels.indexer.IndexQueries``, weights
        with them): the fused scores make them in their own launch."""
        freqs = self._freqs
        rows = fused.rope_rows_serves(p.kv.dtype, self.head_dim, self.rope_dims)
        ops_q = rotate_q and not rows  # the ops path rotates q with the KV rows in one graph
        q = None
        if not rotate_q:
            q = p.q
        elif rows:
            q = fused.rope_rows(p.q, pos[..., None], freqs, norm=fused.NORM_PLAIN,
                                eps=self.eps, out_dtype=mx.float32)
        if p.kv_rows is not None:  # rotated with the q_norm (see _project)
            kv = p.kv_rows
        elif rows:
            kv = fused.rope_rows(p.kv, pos, freqs, norm=fused.NORM_WEIGHTED,
                                 weight=self.kv_norm.weight, eps=self.eps, fp8=self.qat_rounding)
        elif ops_q:
            q, kv = _rotate_ops(p.q, self.kv_norm(p.kv), positions,
                                *rope_tables(freqs, self.head_dim), self.eps,
                                self.rope_dims if self.qat_rounding else 0)
            ops_q = False
        else:
            kv = apply_rope(self.kv_norm(p.kv), positions, freqs)
            if self.qat_rounding:
                kv = qat.kv_fp8(kv, self.rope_dims)
        if ops_q:
            q = p.q.astype(mx.float32)
            q = q * mx.rsqrt(mx.mean(mx.square(q), axis=-1, keepdims=True) + self.eps)
            q = apply_rope(q, positions[..., None], freqs)
        index_q = None
        if p.index_q is not None:  # lazy: computed only where a sequence has indexer keys
            iq = p.index_q[0]
            made = fused_indexer.IndexQueries(iq, p.index_w, pos, freqs, self.indexer.scale,
                                      self.qat_rounding)
            if defer_index and kernels.serves(kernels.INDEXER):
                index_q = made  # the weights come with the queries
                p.index_q = (iq, None)
            elif fused_indexer.index_queries_serves(iq.dtype, iq.shape[-1], self.rope_dims):
                # queries and head weights in one launch (the weights replace the ops' ones)
                index_q, w = made.compute()
                p.index_q = (iq, w)
            else:
                index_q = self.indexer.rotate_queries(iq, pos, positions, freqs,
                                                      self._index_rounding())
        return q, kv, index_q

    def _unrotate(self, o: mx.array, pos: np.ndarray, positions: mx.array, dtype: mx.Dtype) -> mx.array:
        if fused.rope_rows_serves(dtype, self.head_dim, self.rope_dims):
            return fused.rope_rows(o, pos[..., None], self._freqs, inverse=True, out_dtype=dtype)
        return apply_rope(o, positions[..., None], self._freqs, inverse=True).astype(dtype)

    def _attend_state(self, q, kv, p: "_Projected", index_q, cache: LayerCache, dtype: mx.Dtype,
                      positions: mx.array | None = None, rope: tuple | None = None):
        """One sequence's rotated tokens at positions cache.offset..: window, compressors,
        indexer, attention → outputs [1, s, H, d] float32 (not rotated back). With ``rope`` =
        (host positions [s], dtype) the queries come as projected and the fused kernel rotates
        them and its output, which it returns in dtype."""
        s = q.shape[1]
        p0 = cache.offset
        if positions is None:
            positions = mx.arange(p0, p0 + s)
        freqs = self._freqs

        # Window keys: the carried rows of the previous ≤ window-1 positions, then the new ones
        # (rows row0.. of ``keys``; a decode step writes its row into the carried buffer).
        n_prev = 0 if cache.window is None else cache.window.shape[1]
        fused_attention = self._fused_attention(s)
        # the fused kernel writes the rows into the buffer itself when they fit (no launch)
        slot = cache.window_slot(kv) if fused_attention else None
        if slot is not None:
            keys, row0, write = slot[0], slot[1], (kv, slot[2])
        else:
            keys, row0 = cache.push_window(kv, self.window - 1)
            write = None
        record_window(cache, kv, self.window - 1)  # for a speculative rollback

        comp = None
        index_w = index_keys = None
        written = [None, None]
        if p.comp_written is not None:  # done in rope_rows' launch
            written = p.comp_written
        elif p.comp_x is not None:
            written = fused.compress_rows(*self._compress_args(p.comp_x, p0, cache))
            written += [None] * (2 - len(written))
        if self.ratio:
            self.compressor.step(p.comp, p0, cache.compressor, freqs, self._kv_rounding(), dtype,
                                 written=written[0])
            comp = cache.compressor.rows
        if self.ratio == 4:
            self.indexer.compressor.step(p.index_comp, p0, cache.indexer, freqs,
                                         self._index_rounding(), dtype, written=written[1])
            index_keys = cache.indexer.rows
            if index_keys is None or p.index_q is None:
                index_q = None
            else:
                index_w = p.index_q[1]
        if isinstance(index_q, fused_indexer.IndexQueries) and not fused_attention:
            index_q, index_w = index_q.compute()  # the ops paths take them made

        if fused_attention:
            o = self._attend_fused(q, p0, keys, row0, n_prev, cache, index_q, index_w, index_keys,
                                   rope, write)
        elif s == 1:
            o = self._attend_one(q, keys, row0, n_prev, cache, index_q, index_w)
        else:
            keys = keys[:, row0:row0 + n_prev + s]
            o = self._attend_blocks(q, positions, p0, keys, n_prev, comp, index_q, index_w,
                                    index_keys)
        cache.offset = p0 + s
        return o

    def _compress_args(self, x32: mx.array, p0: int, cache: LayerCache) -> tuple:
        """The arguments of kernel comp_rows (``kernels.attention.compress_rows``) for the token
        at position ``p0``: its rows of the layer's compressors (both at ratio 4: one input),
        written into their unfinished windows' buffers, which :meth:`Compressor.step` then takes
        as ``written`` (instead of the ops' product and writes)."""
        proj = self.merge_projections()
        comps = [(self.compressor, cache.compressor)]
        if self.ratio == 4:
            comps.append((self.indexer.compressor, cache.indexer))
        bufs = []
        for comp, state in comps:
            state.ratio = state.ratio or comp.ratio
            buf, n = state.pending_buffer(1, comp.wkv.weight.shape[0])
            bufs.append((buf, n))
        if len({n for _, n in bufs}) != 1:  # the two windows are always at one slot
            raise ValueError(f"compressor state: unfinished windows of {[n for _, n in bufs]} rows")
        rows = proj.comp.offsets()[2 * len(bufs)]
        w = proj.comp.whole["weight"]
        return (x32, w if rows == w.shape[0] else w[:rows], proj.table[p0 % self.ratio, :rows],
                [b for b, _ in bufs], bufs[0][1])

    def _attend_fused(self, q, p0: int, keys, row0: int, n_prev: int, cache: LayerCache, index_q,
                      index_w, index_keys, rope: tuple | None = None,
                      write: tuple | None = None):
        """A few queries through the fused kernels: rows read in storage, one softmax (the
        window rows are read in place: row ``row0`` of ``keys`` is position p0 - n_prev; with
        ``write`` = (rows, row), the call's rows are not in ``keys`` yet: the kernel reads them
        and hands back the buffer with them, which becomes the cache's)."""
        s = q.shape[1]
        bounds = fused.query_bounds(p0, s, p0 - n_prev - row0, self.window, self.ratio)
        comp = idx = None
        if self.ratio:
            comp = cache.compressor.buffer
            n_comp = cache.compressor.n_rows
            if self.ratio == 4 and n_comp > self.config.index_topk:
                idx = self.indexer.pick(index_q, index_w, index_keys, bounds[:, 2])
        extra = {} if rope is None else dict(rope=(rope[0], self._freqs, self.eps),
                                             out_dtype=rope[1])
        o = fused.decode_attention(q, keys, comp, idx, bounds, self.attn_sink,
                                   self.config.softmax_scale, write=write, **extra)
        if write is None:
            return o
        cache.set_window(o[1], s, self.window - 1)
        return o[0]

    def _attend_one(self, q, keys, row0: int, n_prev: int, cache: LayerCache, index_q, index_w):
        """One query (a decode step) through MLX ops, compiled whole at fixed shapes (no retrace
        as the context grows): ``window`` rows of ``keys`` from ``row0`` (the first n_prev + 1
        visible, the rest masked until the window fills), the compressed and indexer row buffers
        in power-of-two prefixes (:func:`_rows_prefix`, not row count), the counts of visible
        rows as arrays."""
        scale, w = self.config.softmax_scale, self.window
        kw = keys[:, row0:row0 + w]
        if kw.shape[1] < w:  # a buffer just built holds only the visible rows
            kw = mx.pad(kw, [(0, 0), (0, w - kw.shape[1]), (0, 0)])
        nw = mx.array(n_prev + 1, dtype=mx.int32)
        state = cache.compressor
        if state is None or state.n_rows == 0:
            return one_window(q, kw, nw, self.attn_sink, scale)
        n = mx.array(state.n_rows, dtype=mx.int32)
        comp = _rows_prefix(state.buffer, state.n_rows)
        if self.ratio == 4 and index_q is not None:
            return one_indexed(q, kw, nw, self.attn_sink, comp, n, index_q, index_w,
                               _rows_prefix(cache.indexer.buffer, state.n_rows), scale,
                               self.config.index_topk)
        return one_all(q, kw, nw, self.attn_sink, comp, n, scale)

    def _attend_blocks(self, q, positions, p0: int, keys, n_prev: int, comp, index_q, index_w,
                       index_keys):
        """Any number of queries through MLX ops, in blocks that bound the score memory."""
        b, s = q.shape[:2]
        # Cast the compressed rows and indexer keys once per call, not once per query block.
        if comp is not None:
            comp = comp.astype(mx.float32)
        if index_keys is not None:
            index_keys = index_keys.astype(mx.float32)
        n_comp = 0 if comp is None else comp.shape[1]
        picked = min(n_comp, self.config.index_topk) if self.ratio == 4 else n_comp
        per_query = (
            self.n_heads * (self.window + min(s, 512) + picked)  # window band + compressed scores
            + (self.head_dim * picked if self.ratio == 4 else 0)  # gathered rows per query
            + self.config.index_n_heads * n_comp  # indexer scores
        )
        block = max(1, min(s, _SCORE_BUDGET // max(per_query, 1)))
        if ops.on_cpu():
            # each block scores its queries against block + window - 1 raw rows: on the CPU,
            # where the products are the cost, blocks near the window's size skip most of the
            # masked band (not on the GPU, where a block's launches cost more than its flops)
            block = min(block, max(_CPU_BLOCK, 2 * self.window))
        outs = []
        for s0 in range(0, s, block):
            s1 = min(s, s0 + block)
            sl = slice(s0, s1)
            outs.append(self._attend(
                q[:, sl], positions[sl], p0 + s0, keys, p0 - n_prev, comp,
                None if index_q is None else (index_q[:, sl], index_w[:, sl], index_keys),
            ))
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)

    def _attend(self, q, positions, t0: int, keys, key_start: int, comp, index):
        """Queries q [B, s, H, d] at positions t0.. → outputs [B, s, H, d] float32."""
        b, s, h, d = q.shape
        scale = self.config.softmax_scale
        t1 = t0 + s
        # Raw window: keys at positions t-window+1 .. t.
        j0 = max(0, t0 - self.window + 1 - key_start)
        j1 = t1 - key_start
        kw = keys[:, j0:j1].astype(mx.float32)
        kpos = mx.arange(key_start + j0, key_start + j1)
        rel = positions[:, None] - kpos[None, :]
        wmask = (rel >= 0) & (rel < self.window)  # [s, Lw]
        qf = q.reshape(b, s * h, d)
        sw = (qf @ kw.swapaxes(-1, -2)).reshape(b, s, h, -1) * scale
        sw = mx.where(wmask[:, None, :], sw, -mx.inf)
        parts = [sw]

        kc = None
        # only the rows the block's last query sees (row w is visible from position (w+1)·r - 1)
        n_vis = 0 if comp is None else min(comp.shape[1], t1 // self.ratio)
        if n_vis > 0:
            comp = comp[:, :n_vis]
            if index is None:  # ratio 128: every visible row
                kc = comp
                sc = (qf @ kc.swapaxes(-1, -2)).reshape(b, s, h, -1) * scale
                cmask = mx.arange(kc.shape[1])[None, :] < ((positions + 1) // self.ratio)[:, None]
                sc = mx.where(cmask[:, None, :], sc, -mx.inf)
            else:  # ratio 4: the indexer's choice per query
                iq, iw, ikeys = index
                idx, valid = self.indexer.select(iq, iw, ikeys[:, :n_vis], positions)
                kc = mx.take_along_axis(mx.expand_dims(comp, 1), idx[..., None], axis=2)  # [B, s, K, d]
                sc = (q @ kc.swapaxes(-1, -2)) * scale  # [B, s, H, K]
                sc = mx.where(valid[:, :, None, :], sc, -mx.inf)
            parts.append(sc)

        sink = mx.broadcast_to(self.attn_sink.astype(mx.float32)[:, None], (b, s, h, 1))
        probs = mx.softmax(mx.concatenate(parts + [sink], axis=-1), axis=-1, precise=True)
        lw = sw.shape[-1]
        out = (probs[..., :lw].reshape(b, s * h, lw) @ kw).reshape(b, s, h, d)
        if kc is not None:
            pc = probs[..., lw:-1]
            if kc.ndim == 3:
                out = out + (pc.reshape(b, s * h, -1) @ kc).reshape(b, s, h, d)
            else:
                out = out + pc @ kc
        return out


@mx.compile
def _rotate_ops(q, kv, positions, per_feature, sign, eps: float, fp8_rope_dims: int):
    """The ops path of Attention._rotate in one graph: the plain RMS and the rotation of the
    queries, the rotation (and the FP8 round trip, when ``fp8_rope_dims``) of the normed KV."""
    q = q.astype(mx.float32)
    q = q * mx.rsqrt(mx.mean(mx.square(q), axis=-1, keepdims=True) + eps)
    q = rotate(q, positions[..., None], per_feature, sign)
    kv = rotate(kv, positions, per_feature, sign)
    return q, (qat.kv_fp8(kv, fp8_rope_dims) if fp8_rope_dims else kv)


def _rows_prefix(buffer: mx.array, n: int) -> mx.array:
    """The first rows of a row buffer [B, capacity, d] holding ``n`` used rows: a power of two
    of them (at least 64), so a compiled step (model/attention_one.py) retraces once per
    doubling of the context and scores at most twice the rows in use (not the whole capacity)."""
    rows = max(64, 1 << max(n - 1, 0).bit_length())
    return buffer if rows >= buffer.shape[1] else buffer[:, :rows]


class _Projected:
    """The position-free projections of one call's tokens (see :meth:`Attention._project`)."""

    qr: mx.array
    q: mx.array
    kv: mx.array
    comp: mx.array | None = None  # the compressor's kv | score rows (APE added), float32
    index_comp: mx.array | None = None  # the indexer compressor's
    index_q: tuple[mx.array, mx.array] | None = None  # indexer queries (not rotated), head weights
    index_w: mx.array | None = None  # the indexer's head weights as projected (not scaled)
    kv_rows: mx.array | None = None  # the kv rows normalised, rotated and rounded (fused path)
    comp_x: mx.array | None = None  # one token's compressor input, for kernel comp_rows
    comp_written: list | None = None  # the compressors' buffers rope_rows wrote (COMP)

    def rows(self, i: int, a: int, b: int) -> "_Projected":
        """Sequence ``i``, tokens a..b-1."""
        out = _Projected()
        for name, v in vars(self).items():
            if isinstance(v, tuple):
                setattr(out, name, tuple(t[i : i + 1, a:b] for t in v))
            else:
                setattr(out, name, v[i : i + 1, a:b])
        return out


class _Projections:
    """The merged projections of one attention layer (:meth:`Attention.merge_projections`)."""

    def __init__(self, attn: Attention):
        x, q, comp, comps = self._groups(attn)
        self.x, self.q = MergedLinear(x), MergedLinear(q)
        self.comp = self.table = None
        self.apes: tuple = ()
        if attn.ratio:
            self.comp = MergedLinear(comp)
            self.apes = tuple(c.ape for c in comps)
            # per slot (position mod r): 0 for the kv rows, the APE for the score rows
            self.table = mx.concatenate([t for c in comps for t in (
                mx.zeros(c.ape.shape, mx.float32), c.ape.astype(mx.float32))], axis=1)
            mx.eval(self.table)
        self.ratio = attn.ratio

    @staticmethod
    def _groups(attn: Attention) -> tuple[list, list, list, list]:
        """The modules of each merge: x -> wq_a | wkv | indexer weights; qr -> wq_b | indexer
        wq_b; x -> the compressors' wkv | wgate; and the compressors."""
        idx = attn.indexer if attn.ratio == 4 else None
        comps = [] if not attn.ratio else [attn.compressor] + ([idx.compressor] if idx else [])
        return ([attn.wq_a, attn.wkv] + ([idx.weights_proj] if idx else []),
                [attn.wq_b] + ([idx.wq_b] if idx else []),
                [m for c in comps for m in (c.wkv, c.wgate)], comps)

    def current(self, attn: Attention) -> bool:
        """Whether the merge still stands for ``attn``: the same modules (none replaced, e.g. by
        the imatrix recorder's wrappers), their weights and the APEs unchanged."""
        x, q, comp, comps = self._groups(attn)
        return (self.x.holds(x) and self.q.holds(q)
                and (self.comp is None or self.comp.holds(comp))
                and all(c.ape is a for c, a in zip(comps, self.apes)))

    def fused_compressors(self, pos: np.ndarray, d: int, rope_dims: int, dtype: mx.Dtype) -> bool:
        """Whether kernel comp_rows takes one token's compressor step (positions ``pos``, rows
        of ``d`` features rotated on ``rope_dims``): one sequence's one token, dense float32
        merged weights, and the rows kernels serve."""
        if pos.shape != (1, 1) or not self.comp.merged or self.comp.kind[0] != "dense":
            return False
        w = self.comp.whole["weight"]
        return w.dtype == mx.float32 and fused.rope_rows_serves(dtype, d, rope_dims)

    def compressed(self, x: mx.array, pos: np.ndarray) -> mx.array:
        """Both compressors' kv | score rows ``[B, S, ...]`` float32 of ``x``'s tokens at host
        positions ``pos`` [B, S], the APE of each token's slot added in the same launch."""
        s = x.shape[1]
        first = int(pos[0, 0]) % self.ratio
        if pos.shape[0] == 1 and first + s <= self.ratio:
            bias = self.table[first:first + s]  # a view: no gather
        else:  # [S, ...] for one sequence, [B, S, ...] for a batch at its own positions
            slots = pos[0] if pos.shape[0] == 1 else pos
            bias = self.table[mx.array(slots % self.ratio)]
        return self.comp.product(x.astype(mx.float32), bias=bias)

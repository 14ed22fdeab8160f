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

from .. import kernels
from ..config import ModelConfig
from ..kernels import attention as fused
from ..state import LayerCache, record_window
from . import qat
from .compressor import Compressor, Indexer
from .merged import MergedLinear
from .rope import apply_rope, layer_frequencies

# Bound on the float32 score elements materialised per query block.
_SCORE_BUDGET = 1 << 26
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
        self.q_norm = nn.RMSNorm(config.q_lora_rank, eps=self.eps)
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(d, self.head_dim, bias=False)
        self.kv_norm = nn.RMSNorm(self.head_dim, eps=self.eps)
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

    # ------------------------------------------------------------------ forward
    def __call__(self, x: mx.array, cache: LayerCache) -> mx.array:
        b, s, _ = x.shape
        p0 = cache.offset
        positions = mx.arange(p0, p0 + s)
        freqs = self._freqs
        proj = self.merge_projections()
        fused_attn = s <= FUSED_MAX_TOKENS and kernels.serves(kernels.ATTENTION)
        # The indexer's queries are needed once a query sees more rows than it picks (the ops
        # path builds them anyway: unused, they are never evaluated).
        indexed = self.ratio == 4 and (not fused_attn
                                       or (p0 + s) // self.ratio > self.config.index_topk)

        fused_rows = kernels.serves(kernels.ROPE_ROWS)
        row_pos = np.arange(p0, p0 + s)[None, :]  # host positions of the fused row kernel

        xo = proj.x(x, parts=3 if indexed else 2)
        qr = self.q_norm(xo[0])
        qo = proj.q(qr, parts=2 if indexed else 1)
        q = qo[0].reshape(b, s, self.n_heads, self.head_dim)
        if fused_rows:
            q = fused.rope_rows(q, row_pos[..., None], freqs, norm=fused.NORM_PLAIN,
                                eps=self.eps, out_dtype=mx.float32)
            kv = fused.rope_rows(xo[1], row_pos, freqs, norm=fused.NORM_WEIGHTED,
                                 weight=self.kv_norm.weight, eps=self.eps, fp8=self.qat_rounding)
        else:
            q = q.astype(mx.float32)
            q = q * mx.rsqrt(mx.mean(mx.square(q), axis=-1, keepdims=True) + self.eps)
            q = apply_rope(q, positions[:, None], freqs)
            kv = self.kv_norm(xo[1])
            kv = apply_rope(kv, positions, freqs)
            if self.qat_rounding:
                kv = qat.kv_fp8(kv, self.rope_dims)

        # Window keys: the carried rows of the previous ≤ window-1 positions, then the new ones
        # (rows row0.. of ``keys``; a decode step writes its row into the carried buffer).
        n_prev = 0 if cache.window is None else cache.window.shape[1]
        keys, row0 = cache.push_window(kv, self.window - 1)
        record_window(cache, kv, self.window - 1)  # for a speculative rollback

        comp = None
        index_q = index_w = index_keys = None
        if self.ratio:
            ks = proj.compressed(x, p0)
            o = proj.comp.offsets()
            self.compressor.step(ks[..., o[0]:o[2]], p0, cache.compressor, freqs,
                                 self._kv_rounding(), x.dtype)
            comp = cache.compressor.rows
        if self.ratio == 4:
            self.indexer.compressor.step(ks[..., o[2]:o[4]], p0, cache.indexer, freqs,
                                         self._index_rounding(), x.dtype)
            index_keys = cache.indexer.rows
            if index_keys is not None and indexed:
                index_q, index_w = self.indexer.queries(x, qr, positions, freqs,
                                                        self._index_rounding(), p0,
                                                        q_proj=qo[1], w_proj=xo[2])

        if fused_attn:
            o = self._attend_fused(q, p0, keys, row0, n_prev, cache, index_q, index_w, index_keys)
        else:
            keys = keys[:, row0:row0 + n_prev + s]
            o = self._attend_blocks(q, positions, p0, keys, n_prev, comp, index_q, index_w,
                                    index_keys)

        if fused_rows:
            o = fused.rope_rows(o, row_pos[..., None], freqs, inverse=True, out_dtype=x.dtype)
        else:
            o = apply_rope(o, positions[:, None], freqs, inverse=True).astype(x.dtype)
        o = o.reshape(b, s, self.groups, -1)
        u = grouped_linear(self.wo_a, o, self.groups).reshape(b, s, -1)
        cache.offset = p0 + s
        return self.wo_b(u)

    def _attend_fused(self, q, p0: int, keys, row0: int, n_prev: int, cache: LayerCache, index_q,
                      index_w, index_keys):
        """A few queries through the fused kernels: rows read in storage, one softmax (the
        window rows are read in place: row ``row0`` of ``keys`` is position p0 - n_prev)."""
        s = q.shape[1]
        bounds = fused.query_bounds(p0, s, p0 - n_prev - row0, self.window, self.ratio)
        comp = idx = None
        if self.ratio:
            comp = cache.compressor.buffer
            n_comp = cache.compressor.n_rows
            if self.ratio == 4 and n_comp > self.config.index_topk:
                idx = self.indexer.pick(index_q, index_w, index_keys, bounds[:, 2])
        return fused.decode_attention(q, keys, comp, idx, bounds, self.attn_sink,
                                      self.config.softmax_scale)

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
        if comp is not None and comp.shape[1] > 0:
            if index is None:  # ratio 128: every visible row
                kc = comp
                sc = (qf @ kc.swapaxes(-1, -2)).reshape(b, s, h, -1) * scale
                cmask = mx.arange(kc.shape[1])[None, :] < ((positions + 1) // self.ratio)[:, None]
                sc = mx.where(cmask[:, None, :], sc, -mx.inf)
            else:  # ratio 4: the indexer's choice per query
                iq, iw, ikeys = index
                idx, valid = self.indexer.select(iq, iw, ikeys, positions)
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


class _Projections:
    """The merged projections of one attention layer (:meth:`Attention.merge_projections`)."""

    def __init__(self, attn: Attention):
        idx = attn.indexer if attn.ratio == 4 else None
        self.x = MergedLinear([attn.wq_a, attn.wkv] + ([idx.weights_proj] if idx else []))
        self.q = MergedLinear([attn.wq_b] + ([idx.wq_b] if idx else []))
        self.comp = self.table = None
        self.apes: tuple = ()
        if attn.ratio:
            comps = [attn.compressor] + ([idx.compressor] if idx else [])
            self.comp = MergedLinear([m for c in comps for m in (c.wkv, c.wgate)])
            self.apes = tuple(c.ape for c in comps)
            # per slot (position mod r): 0 for the kv rows, the APE for the score rows
            self.table = mx.concatenate([t for c in comps for t in (
                mx.zeros((attn.ratio, c.wkv.weight.shape[0]), mx.float32),
                c.ape.astype(mx.float32))], axis=1)
            mx.eval(self.table)
        self.ratio = attn.ratio

    def current(self, attn: Attention) -> bool:
        comps = [] if not attn.ratio else [attn.compressor] + (
            [attn.indexer.compressor] if attn.ratio == 4 else [])
        return (self.x.current() and self.q.current()
                and (self.comp is None or self.comp.current())
                and all(c.ape is a for c, a in zip(comps, self.apes)))

    def compressed(self, x: mx.array, p0: int) -> mx.array:
        """Both compressors' kv | score rows ``[B, S, ...]`` float32 of the tokens at p0.. of
        ``x``, the APE of each token's slot added in the same launch."""
        s = x.shape[1]
        first = p0 % self.ratio
        if first + s <= self.ratio:
            bias = self.table[first:first + s]  # a view: no gather
        else:
            bias = self.table[mx.array(np.arange(p0, p0 + s) % self.ratio)]
        return self.comp.product(x.astype(mx.float32), bias=bias)

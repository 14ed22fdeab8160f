"""Compressed attention rows (ratio 4 with overlapping windows, ratio 128) and the
Lightning Indexer that picks, per query, the compressed rows a ratio-4 layer attends to.

A compressor turns every ``r`` consecutive tokens into one row: per channel, a softmax over
the tokens' gate scores (plus a learned bias per position mod r) weights their projected
values. At ratio 4 each row pools 8 slots: the first halves of the previous window's tokens
and the second halves of its own. Rows are normalised, rotated at position ``w·r`` and
rounded like the raw KV. Row ``w`` becomes visible to the token that closes its window.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ModelConfig
from ..kernels import attention as fused
from ..kernels import indexer as fused_indexer
from ..kernels import check as _check
from ..ops import RMSNorm
from ..state import CompressorState, record_compressor
from .qat import hadamard_fp4
from .rope import apply_rope


class Compressor(nn.Module):
    def __init__(self, config: ModelConfig, ratio: int, dim: int):
        super().__init__()
        self.ratio = ratio
        self.dim = dim
        self.overlap = ratio == 4
        width = (2 if self.overlap else 1) * dim
        self.wkv = nn.Linear(config.hidden_size, width, bias=False)
        self.wgate = nn.Linear(config.hidden_size, width, bias=False)
        self.ape = mx.zeros((ratio, width))
        self.norm = RMSNorm(dim, eps=config.rms_norm_eps)

    def step(
        self,
        ks: mx.array,
        offset: int,
        state: CompressorState,
        freqs: mx.array,
        rounding: Callable[[mx.array], mx.array] | None,
        dtype: mx.Dtype,
        written: mx.array | None = None,
    ) -> None:
        """Feed the projected rows ``ks`` [B, S, kv | score] (float32, APE added to the score;
        the attention's merged projection makes them) of the tokens at positions offset..;
        closed rows, in ``dtype``, go to ``state``. ``written``: instead of ``ks``, one token's
        step already done, the window's buffer with its row (the attention's kernel comp_rows)."""
        r = self.ratio
        if written is not None:
            b, s, width2 = written.shape[0], 1, written.shape[2]
        else:
            b, s, width2 = ks.shape
        width = width2 // 2
        if not state.ratio:
            state.ratio = r
        buf, n = state.pending_buffer(b, width) if s < 2 * r else (None, 0)
        if buf is not None and n + s <= r:
            # a decode step: the token's row is written into the window's buffer in place
            buf = written if written is not None else mx.slice_update(
                buf, ks, mx.array([0, n, 0]), (0, 1, 2))
            start, n = offset - n, n + s
            record_compressor(state, start, buf[:, :n, :width], buf[:, :n, width:])
            state.set_pending_buffer(buf, n % r)
            if n < r:
                return
            n_win = 1
            kv, score = buf[:, None, :, :width], buf[:, None, :, width:]
        else:
            kv, score = ks[..., :width], ks[..., width:]
            if state.pending_kv is not None:
                kv = mx.concatenate([state.pending_kv, kv], axis=1)
                score = mx.concatenate([state.pending_score, score], axis=1)
            start = offset - (0 if state.pending_kv is None else state.pending_kv.shape[1])
            record_compressor(state, start, kv, score)  # for a speculative rollback
            n_win = kv.shape[1] // r
            used = n_win * r
            # Carried tails are copied so they do not keep the whole chunk's buffers alive.
            state.pending_kv, state.pending_score = mx.contiguous(kv[:, used:]), mx.contiguous(score[:, used:])
            if n_win == 0:
                return
            kv = kv[:, :used].reshape(b, n_win, r, -1)
            score = score[:, :used].reshape(b, n_win, r, -1)
        if self.overlap:
            kv, score = self._overlap_slots(kv, score, state)
        weights = mx.softmax(score, axis=2, precise=True)
        rows = mx.sum(weights * kv, axis=2)  # [B, n_win, dd] f32
        rows = self.norm(rows.astype(dtype))
        first = start // r
        rows = apply_rope(rows, (mx.arange(first, first + n_win) * r), freqs)
        if rounding is not None:
            rows = rounding(rows)
        state.append_rows(rows)

    def _overlap_slots(self, kv, score, state: CompressorState):
        """[B, W, 4, 2·dd] → 8 slots per window: previous window's first halves, own second halves."""
        dd = self.dim
        b, n_win, r, _ = kv.shape
        if state.prev_kv is None:
            prev_kv0 = mx.zeros((b, 1, r, dd), dtype=mx.float32)
            prev_score0 = mx.full((b, 1, r, dd), -mx.inf, dtype=mx.float32)
        else:
            prev_kv0, prev_score0 = state.prev_kv[:, None], state.prev_score[:, None]
        prev_kv = mx.concatenate([prev_kv0, kv[:, :-1, :, :dd]], axis=1)
        prev_score = mx.concatenate([prev_score0, score[:, :-1, :, :dd]], axis=1)
        state.prev_kv, state.prev_score = mx.contiguous(kv[:, -1, :, :dd]), mx.contiguous(score[:, -1, :, :dd])
        kv = mx.concatenate([prev_kv, kv[..., dd:]], axis=2)
        score = mx.concatenate([prev_score, score[..., dd:]], axis=2)
        return kv, score


class Indexer(nn.Module):
    """Lightning Indexer: I(t, s) = Σ_h w_h(t) · ReLU(q_h(t) · k_s), keys from its own compressor."""

    def __init__(self, config: ModelConfig, ratio: int):
        super().__init__()
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.topk = config.index_topk
        self.ratio = ratio
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(config, ratio, self.head_dim)
        self.scale = self.head_dim**-0.5 * self.n_heads**-0.5

    def project_queries(self, qr: mx.array, q_proj: mx.array,
                        w_proj: mx.array) -> tuple[mx.array, mx.array]:
        """Indexer queries [B, S, h, dI] before RoPE (see :meth:`rotate_queries`) and head weights
        [B, S, h] float32, from ``wq_b(qr)`` and ``weights_proj(x)`` (the attention's merged
        projections computed them)."""
        b, s, _ = qr.shape
        q = q_proj.reshape(b, s, self.n_heads, self.head_dim)
        return q, w_proj.astype(mx.float32) * self.scale

    def rotate_queries(
        self, q: mx.array, pos: np.ndarray, positions: mx.array, freqs: mx.array,
        rounding: Callable[[mx.array], mx.array] | None,
    ) -> mx.array:
        """RoPE (and the rounding) of projected queries [B, S, h, dI] at host positions ``pos``
        [B, S] (``positions``: the same as ``rope.host_positions``) → float32."""
        if fused.rope_rows_serves(q.dtype, self.head_dim, 2 * freqs.shape[0]):
            q = fused.rope_rows(q, pos[..., None], freqs)
        else:
            q = apply_rope(q, positions[..., None], freqs)
        if rounding is not None:
            q = rounding(q)
        return q.astype(mx.float32)

    def pick(self, q: mx.array, w: mx.array, keys: mx.array, n_vis) -> mx.array:
        """Top-k keys per query for the fused decode path: int32 [B, S, K], -1 where a query
        sees fewer than K keys. ``keys`` stay in storage; ``n_vis`` [S]: keys each query sees.
        ``q`` may be the queries as projected (``kernels.indexer.IndexQueries``, ``w`` None):
        queries, scores and top-k then run in one launch where the kernels' grid form serves."""
        if isinstance(q, fused_indexer.IndexQueries):
            return fused_indexer.indexer_pick(q, keys, mx.array(n_vis), self.topk)
        scores = fused_indexer.indexer_scores(q, w, keys, mx.array(n_vis))
        return fused_indexer.indexer_topk(scores, self.topk)

    def select(
        self, q: mx.array, w: mx.array, keys: mx.array, positions: mx.array
    ) -> tuple[mx.array, mx.array]:
        """Top-k visible float32 ``keys`` per query → (indices [B, S, K] int32, valid [B, S, K] bool)."""
        n = keys.shape[1]
        visible = mx.arange(n)[None, :] < ((positions + 1) // self.ratio)[:, None]  # [S, n]
        k = min(self.topk, n)
        if n <= self.topk:
            idx = mx.broadcast_to(mx.arange(n, dtype=mx.int32), (*q.shape[:2], n))
            return idx, mx.broadcast_to(visible, idx.shape)
        # [B, S, h, n] → [B, S, n]
        scores = mx.maximum(q @ mx.expand_dims(keys, 1).swapaxes(-1, -2), 0.0)
        scores = mx.sum(scores * w[..., None], axis=2)
        scores = mx.where(visible, scores, -mx.inf)
        idx = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k].astype(mx.int32)
        valid = idx < ((positions + 1) // self.ratio)[:, None]
        return idx, valid


def index_queries_ops(q: mx.array, w: mx.array, pos, freqs: mx.array, *, wscale: float,
                      fp4: bool) -> tuple[mx.array, mx.array]:
    """The model's ops for kernel ``index_q`` (``kernels.indexer.index_queries``, same
    arguments): RoPE of the indexer queries at host positions ``pos`` (one per token), the
    Hadamard + FP4 rounding with ``fp4``, float32; the head weights times ``wscale``."""
    positions = mx.array(np.asarray(pos, dtype=np.int32))
    q = apply_rope(q, positions[..., None], freqs)
    if fp4:
        q = hadamard_fp4(q)
    return q.astype(mx.float32), w.astype(mx.float32) * wscale


_check.install_twin("index_q", index_queries_ops)

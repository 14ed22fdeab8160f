"""One decode query of one sequence through MLX ops (the attention's CPU path), compiled.

The same scores, masks and softmax as ``Attention._attend`` for one query, as three compiled
graphs (window only; every visible compressed row; the indexer's top-k), each traced once per
buffer capacity. The keys are joined once, with a zero row whose score column carries the
sink, so one product gives every score and one the output.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np


@functools.cache
def _columns(lw: int, k: int) -> mx.array:
    """Per score column: j - lw for window key j, j for compressed key j, ``k`` for the sink
    (numpy-built: a constant also inside a compiled trace). Parts of it: ``(0, n - 1)`` the rows
    0..n-1, ``(lw, -1)`` the window's columns, ``(0, 0)`` a single 0."""
    return mx.array(np.concatenate([np.arange(lw) - lw, np.arange(k + 1)]).astype(np.int32))


def _visible(cols: mx.array, lw: int, nw: mx.array, n: mx.array | int) -> mx.array:
    """The first ``nw`` of the ``lw`` window columns, compressed columns below ``n``."""
    return mx.where(cols < 0, cols < nw - lw, cols < n)


def _one_out(q, keys, sink, valid, is_sink, scale: float):
    """Scores of q [1, 1, H, d] against ``keys`` [L, d] (last row zero), masked by ``valid``
    and with the sink in the ``is_sink`` column, through one softmax → [1, 1, H, d]."""
    _, _, h, d = q.shape
    scores = (q.reshape(h, d) @ keys.T) * scale
    logits = mx.where(is_sink, sink.astype(mx.float32)[:, None], mx.where(valid, scores, -mx.inf))
    return (mx.softmax(logits, axis=-1, precise=True) @ keys).reshape(1, 1, h, d)


@functools.cache
def _zero_row(d: int) -> mx.array:
    return mx.array(np.zeros((1, d), np.float32))


def _rows2(x: mx.array) -> mx.array:
    """[1, L, d] → [L, d] float32."""
    return x.reshape(x.shape[1:]).astype(mx.float32)


@mx.compile
def one_window(q, kw, nw, sink, scale: float):
    lw = kw.shape[1]
    cols = _columns(lw, 0)
    keys = mx.concatenate([_rows2(kw), _zero_row(kw.shape[-1])])
    return _one_out(q, keys, sink, _visible(cols, lw, nw, 0), cols == 0, scale)


@mx.compile
def one_all(q, kw, nw, sink, comp, n, scale: float):
    """Ratio 128: every visible row of the buffer ``comp`` [1, C, d] (rows < ``n``)."""
    lw, c = kw.shape[1], comp.shape[1]
    cols = _columns(lw, c)
    keys = mx.concatenate([_rows2(kw), _rows2(comp), _zero_row(kw.shape[-1])])
    return _one_out(q, keys, sink, _visible(cols, lw, nw, n), cols == c, scale)


@mx.compile
def one_indexed(q, kw, nw, sink, comp, n, iq, iw, ikeys, scale: float, topk: int):
    """Ratio 4: the Lightning Indexer's top-k of the visible rows (< ``n``) of the buffers
    ``comp`` [1, C, d] and ``ikeys`` [1, C, dI]; queries iq [1, 1, h, dI], weights iw [1, 1, h]."""
    c = comp.shape[1]
    if c <= topk:  # every row is picked: no scores needed
        return one_all(q, kw, nw, sink, comp, n, scale)
    lw, h = kw.shape[1], iq.shape[2]
    scores = iq.reshape(h, -1) @ _rows2(ikeys).T  # [h, C]
    scores = (mx.maximum(scores, 0.0) * iw.reshape(h, 1)).sum(axis=0)  # [C]
    idx = mx.argpartition(mx.where(_columns(0, c - 1) < n, -scores, mx.inf), kth=topk - 1)[:topk]
    keys = mx.concatenate([_rows2(kw), mx.take(_rows2(comp), idx, axis=0), _zero_row(kw.shape[-1])])
    picked = mx.concatenate([_columns(lw, -1), idx.astype(mx.int32), _columns(0, 0) + c])
    return _one_out(q, keys, sink, _visible(picked, lw, nw, n), _columns(lw, topk) == topk, scale)

"""Decode state: what each layer keeps between calls so a new token costs one step.

Per layer: the last ``sliding_window - 1`` raw KV rows; for compressed layers the
compressor's unfinished window (and, at ratio 4, the first halves of the last closed
window, which feed the next row) in float32, plus the compressed rows; at ratio 4 the
same again for the indexer's own compressor. A fresh cache starts clean for every sequence.
"""

from __future__ import annotations

import copy

import mlx.core as mx

_GROW = 256  # compressed-row buffers start at this many rows and grow by half each time


class CompressorState:
    """Carried state of one compressor: unfinished window, last window's overlap half, rows."""

    def __init__(self) -> None:
        self.pending_kv: mx.array | None = None     # [B, n, c·dd] f32, APE already added to score
        self.pending_score: mx.array | None = None
        self.prev_kv: mx.array | None = None        # [B, r, dd] f32 (ratio 4 only)
        self.prev_score: mx.array | None = None
        self._rows: mx.array | None = None          # [B, capacity, dd]
        self.n_rows = 0

    @property
    def rows(self) -> mx.array | None:
        return None if self._rows is None else self._rows[:, : self.n_rows]

    def append_rows(self, new: mx.array) -> None:
        n = new.shape[1]
        if n == 0:
            return
        if self._rows is None or self.n_rows + n > self._rows.shape[1]:
            need = self.n_rows + n
            cap = max(need, _GROW, 0 if self._rows is None else self._rows.shape[1] * 3 // 2)
            cap = ((cap + _GROW - 1) // _GROW) * _GROW
            grown = mx.zeros((new.shape[0], cap, new.shape[2]), dtype=new.dtype)
            if self.n_rows:
                grown[:, : self.n_rows] = self._rows[:, : self.n_rows]
            self._rows = grown
        self._rows[:, self.n_rows : self.n_rows + n] = new
        self.n_rows += n

    def arrays(self) -> list[mx.array]:
        out = [self.pending_kv, self.pending_score, self.prev_kv, self.prev_score, self.rows]
        return [a for a in out if a is not None]


class LayerCache:
    """State of one attention layer. ``offset`` is the number of tokens already processed."""

    def __init__(self, ratio: int) -> None:
        self.ratio = ratio
        self.offset = 0
        self.window: mx.array | None = None  # [B, ≤ sliding_window-1, head_dim]
        self.compressor = CompressorState() if ratio > 0 else None
        self.indexer = CompressorState() if ratio == 4 else None

    # mlx-lm's generation loop evaluates ``c.state`` of every cache entry.
    @property
    def state(self) -> list[mx.array]:
        out = [] if self.window is None else [self.window]
        for c in (self.compressor, self.indexer):
            if c is not None:
                out += c.arrays()
        return out

    def is_trimmable(self) -> bool:
        # Compressed rows and the compressor's rolling state cannot be rewound.
        return False

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    def snapshot(self) -> "LayerCache":
        """A copy that later calls on ``self`` do not change (arrays are immutable)."""
        snap = copy.copy(self)
        for name in ("compressor", "indexer"):
            c = getattr(self, name)
            if c is not None:
                c2 = copy.copy(c)
                if c._rows is not None:
                    # the row buffer is written in place: copy the used part
                    c2._rows = mx.array(c._rows[:, : c.n_rows])
                setattr(snap, name, c2)
        return snap


def cache_nbytes(cache: list[LayerCache]) -> int:
    return sum(c.nbytes for c in cache)


def snapshot(cache: list[LayerCache]) -> list[LayerCache]:
    return [c.snapshot() for c in cache]

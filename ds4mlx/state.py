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
_WINDOW_ROOM = 256  # rows a window buffer has past its carried rows (then it is compacted)


class CompressorState:
    """Carried state of one compressor: unfinished window, last window's overlap half, rows."""

    def __init__(self, ratio: int = 0) -> None:
        self.ratio = ratio  # 0: not known (the buffer of the unfinished window waits for it)
        # The unfinished window [B, n, c·dd] f32 (APE already added to score) is kept as one
        # buffer [B, ratio, kv | score] that a decode step writes a row of (``n_pending`` rows
        # used); set from outside, kv and score wait apart until the buffer is built.
        self._pend: mx.array | None = None
        self.n_pending = 0
        self._loose_kv: mx.array | None = None
        self._loose_score: mx.array | None = None
        self.prev_kv: mx.array | None = None        # [B, r, dd] f32 (ratio 4 only)
        self.prev_score: mx.array | None = None
        self._rows: mx.array | None = None          # [B, capacity, dd]
        self.n_rows = 0

    @property
    def pending_kv(self) -> mx.array | None:
        buf = self._pending_buffer()
        return self._loose_kv if buf is None else buf[:, : self.n_pending, : buf.shape[2] // 2]

    @pending_kv.setter
    def pending_kv(self, v: mx.array | None) -> None:
        self._unbuffer()
        self._loose_kv = v

    @property
    def pending_score(self) -> mx.array | None:
        buf = self._pending_buffer()
        return self._loose_score if buf is None else buf[:, : self.n_pending, buf.shape[2] // 2 :]

    @pending_score.setter
    def pending_score(self, v: mx.array | None) -> None:
        self._unbuffer()
        self._loose_score = v

    def _unbuffer(self) -> None:
        if self._pend is not None:
            buf, n, w = self._pend, self.n_pending, self._pend.shape[2] // 2
            self._loose_kv, self._loose_score = buf[:, :n, :w], buf[:, :n, w:]
            self._pend = None

    def _pending_buffer(self) -> mx.array | None:
        """The unfinished window's buffer, built from what was set once the ratio is known."""
        kv, score = self._loose_kv, self._loose_score
        if self._pend is None and self.ratio and kv is not None and score is not None \
                and kv.shape == score.shape and kv.shape[1] <= self.ratio:
            b, n, w = kv.shape
            rows = mx.concatenate([kv, score], axis=2).astype(mx.float32)
            if n < self.ratio:
                rows = mx.concatenate([rows, mx.zeros((b, self.ratio - n, 2 * w), mx.float32)], axis=1)
            self._pend, self.n_pending = rows, n
            self._loose_kv = self._loose_score = None
        return self._pend

    def pending_buffer(self, b: int, width: int) -> tuple[mx.array, int]:
        """(the buffer ``[B, ratio, 2·width]`` of the unfinished window, rows used); a fresh
        one when nothing is pending yet."""
        buf = self._pending_buffer()
        if buf is None or tuple(buf.shape) != (b, self.ratio, 2 * width):
            if self.pending_kv is not None and self.pending_kv.shape[1]:
                raise ValueError(f"compressor state: pending rows {tuple(self.pending_kv.shape)} "
                                 f"do not fit a buffer of {self.ratio} x {2 * width}")
            self._pend, self.n_pending = mx.zeros((b, self.ratio, 2 * width), mx.float32), 0
            self._loose_kv = self._loose_score = None
        return self._pend, self.n_pending

    def set_pending_buffer(self, buf: mx.array, n: int) -> None:
        self._pend, self.n_pending = buf, n
        self._loose_kv = self._loose_score = None

    @property
    def rows(self) -> mx.array | None:
        # None until a row exists, also after a rollback to before the first one
        return None if self._rows is None or self.n_rows == 0 else self._rows[:, : self.n_rows]

    @property
    def buffer(self) -> mx.array | None:
        """The whole row buffer (rows past ``n_rows`` are stale): for kernels that bound their
        own reads, so no slice of it is copied."""
        return self._rows

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
        # The carried raw rows [B, ≤ sliding_window-1, head_dim] are rows lo..end of a buffer
        # with room for more: a decode step writes its row in place (``push_window``).
        self._win: mx.array | None = None
        self._win_lo = self._win_end = 0
        self.compressor = CompressorState(ratio) if ratio > 0 else None
        self.indexer = CompressorState(ratio) if ratio == 4 else None

    @property
    def window(self) -> mx.array | None:
        return None if self._win is None else self._win[:, self._win_lo : self._win_end]

    @window.setter
    def window(self, v: mx.array | None) -> None:
        self._win, self._win_lo, self._win_end = None, 0, 0
        if v is not None:
            b, n, d = v.shape
            self._win = mx.concatenate([v, mx.zeros((b, _WINDOW_ROOM, d), v.dtype)], axis=1)
            self._win_end = n

    def push_window(self, kv: mx.array, keep: int) -> tuple[mx.array, int]:
        """Append the call's raw rows ``kv [B, s, d]`` and keep the last ``keep`` rows.
        Returns (keys, row): rows row.. of ``keys`` are the carried rows, then ``kv`` (keys may
        hold more rows past them: readers bound their reads)."""
        b, s, d = kv.shape
        slot = self.window_slot(kv)
        if slot is not None:
            buf, lo, end = slot
            keys = mx.slice_update(buf, kv.astype(buf.dtype), mx.array([0, end, 0]), (0, 1, 2))
            self.set_window(keys, s, keep)
            return keys, lo
        prev = self.window
        if prev is not None and prev.dtype != kv.dtype:
            prev = prev.astype(kv.dtype)
        keys = kv if prev is None else mx.concatenate([prev, kv], axis=1)
        n = keys.shape[1]
        kept = keys[:, n - min(keep, n):]
        self._win = mx.concatenate([kept, mx.zeros((b, _WINDOW_ROOM, d), kv.dtype)], axis=1)
        self._win_lo, self._win_end = 0, kept.shape[1]
        return keys, 0

    def window_slot(self, kv: mx.array) -> tuple[mx.array, int, int] | None:
        """(buffer, lo, end) when the call's rows ``kv [B, s, d]`` fit the buffer past its
        carried rows lo..end (a kernel that writes them, e.g. the fused decode attention, then
        hands the new buffer to :meth:`set_window`); None when the buffer must be rebuilt."""
        b, s, d = kv.shape
        buf, lo, end = self._win, self._win_lo, self._win_end
        if buf is not None and s <= _WINDOW_ROOM and end + s <= buf.shape[1] \
                and buf.shape[0] == b and buf.shape[2] == d:
            return buf, lo, end
        return None

    def set_window(self, buf: mx.array, s: int, keep: int) -> None:
        """The buffer of :meth:`window_slot` with the call's ``s`` rows written at ``end``: the
        last ``keep`` rows are carried."""
        self._win, self._win_end = buf, self._win_end + s
        self._win_lo = max(self._win_lo, self._win_end - keep)

    # ---- mlx-lm's cache protocol: its generation loop evaluates ``c.state``, and its prompt-cache
    # file stores ``state`` (arrays, ints, None) and rebuilds the entry with ``from_state``.
    @property
    def state(self) -> list:
        """``[ratio, offset, window, compressor fields, indexer fields, held streams, held
        tokens]``; absent parts are None. The last two are what an MTP drafter keeps on its
        block's entry between calls (``draft_pending``: streams whose next token it has not
        paired yet), so a saved conversation drafts on from where it was."""
        out = [self.ratio, self.offset, self.window]
        for c in (self.compressor, self.indexer):
            out += _FIELDS_NONE if c is None else [getattr(c, f) for f in _FIELDS[:-1]] + [c.rows]
        streams, tokens = getattr(self, "draft_pending", None) or (None, [])
        return out + [streams, mx.concatenate(tokens) if tokens else None]

    @state.setter
    def state(self, v: list) -> None:
        if len(v) != _STATE_LEN:
            raise ValueError(f"LayerCache state has {len(v)} entries, expected {_STATE_LEN}")
        ratio, offset, window = v[:3]
        if not (isinstance(ratio, int) and ratio in (0, 4, 128)) or not (isinstance(offset, int) and offset >= 0):
            raise ValueError(f"LayerCache state: bad ratio {ratio!r} or offset {offset!r}")
        self.ratio, self.offset, self.window = ratio, offset, window
        n = len(_FIELDS)
        self.compressor = _compressor_from(v[3 : 3 + n], ratio) if ratio > 0 else None
        self.indexer = _compressor_from(v[3 + n : 3 + 2 * n], ratio) if ratio == 4 else None
        streams, tokens = v[3 + 2 * n:]
        if streams is not None or tokens is not None:
            self.draft_pending = (streams, [] if tokens is None else [tokens])
        elif hasattr(self, "draft_pending"):
            del self.draft_pending

    @property
    def meta_state(self) -> tuple[str, ...]:
        # Older mlx-lm versions keep scalars here; ours travel in ``state`` (as mlx-lm now does).
        return (str(self.ratio), str(self.offset))

    @meta_state.setter
    def meta_state(self, v: tuple[str, ...]) -> None:
        self.ratio, self.offset = int(v[0]), int(v[1])

    @classmethod
    def from_state(cls, state: list, meta_state: tuple[str, ...] | None = None) -> "LayerCache":
        obj = cls.__new__(cls)
        obj.state = state
        return obj

    def is_trimmable(self) -> bool:
        # Compressed rows and the compressor's rolling state cannot be rewound: take snapshots.
        return False

    def empty(self) -> bool:
        return self.offset == 0

    def size(self) -> int:
        return self.offset

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state if isinstance(a, mx.array))

    @classmethod
    def merge(cls, caches: list["LayerCache"]) -> "BatchLayerCache":
        """mlx-lm's batch protocol: one batch state from per-sequence ones (copied, so the
        originals stay as they are)."""
        return BatchLayerCache([c.snapshot() for c in caches])

    def snapshot(self) -> "LayerCache":
        """A copy that later calls on ``self`` do not change (arrays are immutable)."""
        snap = copy.copy(self)
        snap._mark = None
        for name in ("compressor", "indexer"):
            c = getattr(self, name)
            if c is not None:
                c2 = copy.copy(c)
                if c._rows is not None:
                    # the row buffer is written in place: copy the used part
                    c2._rows = mx.array(c._rows[:, : c.n_rows])
                setattr(snap, name, c2)
        return snap


class BatchLayerCache:
    """One layer's state for a batch of sequences, each at its own position: a LayerCache per
    sequence (own window, compressor phase, compressed and indexer rows). Attention runs the
    projections on the whole batch and the rest per sequence (see ``Attention._call_batch``).

    This is mlx-lm's batch cache protocol (``merge`` / ``extend`` / ``filter`` / ``extract`` /
    ``prepare`` / ``finalize``), which its ``BatchGenerator`` drives: prompts of different
    lengths arrive right-padded (``prepare(lengths=...)``: each sequence takes only its first
    ``lengths[i]`` tokens) or left-padded (``prepare(left_padding=...)``: each skips as many)."""

    def __init__(self, caches: list[LayerCache]) -> None:
        self.caches = list(caches)
        self._skip: list[int] | None = None  # left padding still to skip, per sequence
        self._take: list[int] | None = None  # real tokens still to come, per sequence

    # ---- the tokens of a call each sequence takes
    def spans(self, s: int) -> list[tuple[int, int]]:
        """(first, count) of the real tokens of each sequence in a call of ``s`` tokens; the
        counts of the padded input left are advanced."""
        out = []
        for i in range(len(self.caches)):
            a = 0 if self._skip is None else min(self._skip[i], s)
            n = s - a if self._take is None else min(s - a, self._take[i])
            if self._skip is not None:
                self._skip[i] -= a
            if self._take is not None:
                self._take[i] -= n
            out.append((a, n))
        return out

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None) -> None:
        if left_padding is not None:
            self._skip = [int(v) for v in _ints(left_padding)]
        if lengths is not None:
            self._take = [int(v) for v in _ints(lengths)]

    def finalize(self) -> None:
        # The padded tokens were never taken in: nothing to move.
        self._skip = self._take = None

    # ---- membership
    @classmethod
    def merge(cls, caches: list) -> "BatchLayerCache":
        parts = []
        for c in caches:
            parts += [s.snapshot() for s in c.caches] if isinstance(c, BatchLayerCache) else [c.snapshot()]
        return cls(parts)

    def extend(self, other: "BatchLayerCache") -> None:
        n, m = len(self.caches), len(other.caches)
        self._skip = _join(self._skip, other._skip, n, m, 0)
        self._take = _join(self._take, other._take, n, m, _ALL)
        self.caches += other.caches

    def filter(self, batch_indices) -> None:
        keep = [int(i) for i in _ints(batch_indices)]
        self.caches = [self.caches[i] for i in keep]
        for name in ("_skip", "_take"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, [v[i] for i in keep])

    def extract(self, idx: int) -> LayerCache:
        """Sequence ``idx``'s own state (a copy), as a one-sequence decode would have it."""
        return self.caches[idx].snapshot()

    # ---- what mlx-lm's loops read
    @property
    def state(self) -> list[mx.array]:
        return [a for c in self.caches for a in c.state if isinstance(a, mx.array)]

    @property
    def offset(self) -> mx.array:
        return mx.array([c.offset for c in self.caches])

    def is_trimmable(self) -> bool:
        return False

    def empty(self) -> bool:
        return all(c.empty() for c in self.caches)

    def size(self) -> int:
        return max((c.offset for c in self.caches), default=0)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)


_ALL = 1 << 62  # "every token" in a per-sequence count


def _join(a: list[int] | None, b: list[int] | None, n: int, m: int, fill: int) -> list[int] | None:
    if a is None and b is None:
        return None
    return (a if a is not None else [fill] * n) + (b if b is not None else [fill] * m)


def _ints(v) -> list:
    return v.tolist() if isinstance(v, mx.array) else list(v)


_FIELDS = ("pending_kv", "pending_score", "prev_kv", "prev_score", "rows")
_FIELDS_NONE = [None] * len(_FIELDS)
_STATE_LEN = 3 + 2 * len(_FIELDS) + 2  # ratio, offset, window, compressor, indexer, MTP drafter held


def _compressor_from(values: list, ratio: int = 0) -> CompressorState:
    c = CompressorState(ratio)
    c.pending_kv, c.pending_score, c.prev_kv, c.prev_score, rows = values
    if rows is not None and rows.ndim != 3:
        raise ValueError(f"compressor rows must be [B, n, d], got shape {rows.shape}")
    c._rows, c.n_rows = rows, 0 if rows is None else rows.shape[1]
    return c


def cache_nbytes(cache: list[LayerCache]) -> int:
    return sum(c.nbytes for c in cache)


def snapshot(cache: list[LayerCache]) -> list[LayerCache]:
    return [c.snapshot() for c in cache]


# --------------------------------------------------------------------------- rollback journal
# Speculative decoding forwards guessed tokens and keeps only an accepted prefix. ``mark`` notes
# the state's references (arrays are immutable; row buffers are only appended to), and while a
# mark is open the layers record what each call wrote (``record_*``, called by attention and the
# compressor), so ``restore`` can put a layer back at any position between the mark and now
# without running the model again.


class _CompressorMark:
    def __init__(self, c: CompressorState) -> None:
        self.pending_kv, self.pending_score = c.pending_kv, c.pending_score
        self.prev_kv, self.prev_score = c.prev_kv, c.prev_score
        self.n_rows = c.n_rows
        self.calls: list[tuple[int, mx.array, mx.array]] = []  # (first position, kv, score)


class LayerMark:
    """A layer's state at one position plus what the calls after it wrote."""

    def __init__(self, cache: LayerCache) -> None:
        self.offset = cache.offset
        self.window = cache.window
        self.new_kv: list[mx.array] = []  # raw KV rows of each call since the mark
        self.keep = 0  # window rows a layer keeps (sliding_window - 1)
        self.compressor = None if cache.compressor is None else _CompressorMark(cache.compressor)
        self.indexer = None if cache.indexer is None else _CompressorMark(cache.indexer)


def mark(caches: list[LayerCache]) -> list[LayerMark]:
    """Open a mark on every layer; it stays open until ``restore`` or ``release``."""
    marks = []
    for c in caches:
        m = LayerMark(c)
        c._mark = m
        for name in ("compressor", "indexer"):
            if getattr(c, name) is not None:
                getattr(c, name)._mark = getattr(m, name)
        marks.append(m)
    return marks


def release(caches: list[LayerCache]) -> None:
    """Close the marks and keep the state as it is."""
    for c in caches:
        c._mark = None
        for s in (c.compressor, c.indexer):
            if s is not None:
                s._mark = None


def record_window(cache: LayerCache, kv: mx.array, keep: int) -> None:
    """Attention wrote the raw KV rows ``kv`` of its call (keeping ``keep`` window rows)."""
    m = getattr(cache, "_mark", None)
    if m is not None:
        m.new_kv.append(kv)
        m.keep = keep


def record_compressor(state: CompressorState, start: int, kv: mx.array, score: mx.array) -> None:
    """The compressor saw per-token ``kv``/``score`` rows for positions ``start..`` (its carried
    unfinished window followed by the call's tokens)."""
    m = getattr(state, "_mark", None)
    if m is not None:
        m.calls.append((start, kv, score))


def _rows_at(m: _CompressorMark, a: int, b: int) -> tuple[mx.array, mx.array]:
    """Recorded kv/score rows of positions a..b-1."""
    for start, kv, score in reversed(m.calls):
        if start <= a and b <= start + kv.shape[1]:
            return kv[:, a - start : b - start], score[:, a - start : b - start]
    raise ValueError(f"positions {a}..{b} were not recorded since the mark")


def _restore_compressor(s: CompressorState, m: _CompressorMark, ratio: int, was: int, position: int) -> None:
    if position == was:
        s.pending_kv, s.pending_score, s.prev_kv, s.prev_score = m.pending_kv, m.pending_score, m.prev_kv, m.prev_score
        s.n_rows = m.n_rows
        return
    closed = position // ratio
    kv, score = _rows_at(m, closed * ratio, position)
    s.pending_kv, s.pending_score = mx.contiguous(kv), mx.contiguous(score)
    if ratio == 4:
        if closed == was // ratio:
            s.prev_kv, s.prev_score = m.prev_kv, m.prev_score
        else:  # the first halves of the last window closed before ``position``
            kv, score = _rows_at(m, (closed - 1) * ratio, closed * ratio)
            dd = kv.shape[-1] // 2
            s.prev_kv, s.prev_score = mx.contiguous(kv[..., :dd]), mx.contiguous(score[..., :dd])
    s.n_rows = closed  # closed rows never change; later ones are overwritten when re-appended


def restore(caches: list[LayerCache], marks: list[LayerMark], position: int) -> None:
    """Put every layer back at ``position`` (the mark's position up to the current one), as if
    only the tokens before it had been processed, and close the marks."""
    for c, m in zip(caches, marks):
        if not m.offset <= position <= c.offset:
            raise ValueError(f"cannot restore to position {position}: the mark is at {m.offset} "
                             f"and the state at {c.offset}")
        if position == m.offset:
            c.window = m.window
        else:
            new = mx.concatenate(m.new_kv, axis=1)[:, : position - m.offset]
            keys = new if m.window is None else mx.concatenate([m.window, new], axis=1)
            c.window = mx.contiguous(keys[:, -m.keep:] if m.keep > 0 else keys[:, :0])
        for s, sm in ((c.compressor, m.compressor), (c.indexer, m.indexer)):
            if s is not None:
                _restore_compressor(s, sm, c.ratio, m.offset, position)
        c.offset = position
    release(caches)

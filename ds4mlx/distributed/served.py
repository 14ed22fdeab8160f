"""The served mode of a split model. ``ds4mlx serve`` runs the HTTP server on rank 0 only, so the
other ranks cannot run the same program: rank 0 announces each forward (``PipelineModel.lead``)
and they run it (``follow``). An announcement is one ``all_sum`` of 1024 int32 (the other ranks
add zeros; a second one for what does not fit): a header, then the tokens, the handle naming
each row's state of every layer another rank runs, and the state copies and drops since the last
announcement. Rank 0 keeps a ``RemoteLayer`` for each layer it does not run: it counts
positions, and its handle names the owner's state of that layer. Copying one (a prefix-cache
snapshot) or dropping it (garbage collection) is queued and sent with the next announcement,
before the forward, so the other ranks' states follow rank 0's.
"""

from __future__ import annotations

import gc
import json
import logging
from collections import deque
from pathlib import Path
from typing import Optional

import mlx.core as mx

from ..state import BatchLayerCache, LayerCache
from .watch import DistributedError, one_line

log = logging.getLogger("ds4mlx.distributed")

_QUIT, _FORWARD, _SAVE, _LOAD, _DELETE = range(5)
_BATCHED, _ALL_LOGITS = 1, 2
_HEADER = 7  # op, rows, tokens per row, flags, copies, drops, bytes of text
_BLOCK = 1024  # int32s of the first all_sum: most steps fit (8 rows of Flash: 7 + 8 + 8 × 43), the rest follow


def _positions(c: LayerCache, offset: Optional[int] = None) -> LayerCache:
    """A state with no arrays, at ``c``'s position (or ``offset``)."""
    out = LayerCache(c.ratio)
    out.offset = c.offset if offset is None else offset
    return out


def _without_digest(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "digest"}  # each rank's file has its own digest


class _Leader:
    """Rank 0's side of the announcements: handles, and the copies and drops not yet sent."""

    def __init__(self) -> None:
        self.next_handle = 1
        self.copies: deque = deque()
        self.drops: deque = deque()  # appended by garbage collection, from any thread
        self.live: set[int] = set()  # handles made and not yet dropped (the followers hold at most these)
        self.released = False

    def new_handle(self) -> int:
        h = self.next_handle
        self.next_handle = h + 1 if h < 2**31 - 1 else 1
        self.live.add(h)
        return h

    def drain(self) -> tuple[list[tuple[int, int]], list[int]]:
        copies, drops = [], []
        while self.copies:
            copies.append(self.copies.popleft())
        while self.drops:
            drops.append(self.drops.popleft())
        self.live.difference_update(drops)
        return copies, drops


class RemoteLayer(LayerCache):
    """Rank 0's stand-in, in a served model, for a layer another rank runs: it counts
    positions like every layer of a split model, and ``handle`` names the state the owning rank
    keeps of it. A snapshot is a new handle whose state the owner copies."""

    def __init__(self, ratio: int, leader: _Leader) -> None:
        super().__init__(ratio)
        self.leader, self.handle = leader, leader.new_handle()

    def snapshot(self) -> "RemoteLayer":
        snap = RemoteLayer(self.ratio, self.leader)
        snap.offset = self.offset
        self.leader.copies.append((self.handle, snap.handle))
        return snap

    def __del__(self) -> None:
        leader = getattr(self, "leader", None)
        if leader is not None:
            leader.drops.append(self.handle)


class Served:
    """The served mode of ``PipelineModel``: rank 0 leads, the others follow."""

    _leader: Optional[_Leader] = None

    def lead(self) -> None:
        """Rank 0 of a served model (``ds4mlx serve``): from now on each forward is announced to
        the other ranks, which run it in ``follow``; ``make_cache`` gives ``RemoteLayer``s for
        the layers they run. ``release_followers`` lets them go."""
        if self.stage.rank != 0:
            raise DistributedError(f"rank {self.stage.rank}: only rank 0 leads; the other ranks follow")
        self._leader = _Leader()

    def release_followers(self) -> None:
        """Rank 0 of a served model: the other ranks return from ``follow`` (once; later calls
        do nothing)."""
        lead = self._leader
        if lead is not None and not lead.released:
            lead.released = True
            gc.collect()  # states only a reference cycle still holds: their drops go with the last step
            self._announce(_QUIT)
            log.info("rank 0: letting the other ranks go; %d states of their layers live", len(lead.live))

    def _announce(self, op: int, tokens: Optional[mx.array] = None, cache: Optional[list] = None,
                  flags: int = 0, text: str = "") -> None:
        """One step to the other ranks: a forward of ``tokens`` on ``cache``'s rows, or a file
        (``text``: its path and metadata) of ``cache``'s one row to save, load or delete."""
        lead, L = self._leader, self.config.num_hidden_layers
        B, S = (0 if cache is None else 1, 0) if tokens is None else tokens.shape
        handles = [] if cache is None else self._handles(cache, B)
        raw = list(text.encode())
        copies, drops = lead.drain()
        header = [op, B, S, flags, len(copies), len(drops), len(raw)]
        payload = ([] if tokens is None else tokens.reshape(-1).tolist()) + handles
        payload += [h for pair in copies for h in pair] + drops + raw
        assert len(payload) == B * S + B * L + 2 * len(copies) + len(drops) + len(raw)
        with self._in_step():
            message = header + payload
            first = message[:_BLOCK] + [0] * max(_BLOCK - len(message), 0)
            self._exchange(first, "announcing the next step", self.timeout)
            if len(message) > _BLOCK:
                self._exchange(message[_BLOCK:], "announcing the next step", self.timeout)

    def _failures(self, failed: bool) -> int:
        """How many ranks failed the file step just announced (each says, rank 0 too)."""
        with self._in_step():
            return self._exchange([int(failed)], "waiting for the other ranks' files", self.timeout)[0]

    # -- a served model's prefix-cache files: each rank its own layers' (``prompt_cache.rank_file``)
    def save_state(self, path: Path, cache: list, metadata: Optional[dict] = None) -> None:
        """``save_prompt_cache`` on every rank: rank 0's file, then the others' (or none)."""
        from ..prompt_cache import save_prompt_cache

        # another rank's layer: only its position in rank 0's file (its state goes to that rank's)
        save_prompt_cache(path, [_positions(c) if isinstance(c, RemoteLayer) else c for c in cache], metadata)
        if self._leader is None:
            return
        self._announce(_SAVE, cache=cache, text=json.dumps([str(path), metadata or {}]))
        failed = self._failures(False)
        if failed:
            Path(path).unlink(missing_ok=True)
            raise OSError(f"{path}: {failed} of the other ranks could not write their file (see their warnings)")

    def load_state(self, path: Path, return_metadata: bool = False):
        """``load_prompt_cache`` on every rank: each loads its own file (the split is checked);
        rank 0's state names the others' by ``RemoteLayer`` handles."""
        from ..prompt_cache import PromptCacheError, load_prompt_cache

        state, meta = load_prompt_cache(path, return_metadata=True)
        if self._leader is not None:
            for i, c in enumerate(state):
                if not self.stage.holds_layer(i):
                    state[i] = RemoteLayer(c.ratio, self._leader)
                    state[i].offset = c.offset  # the owner loads its state in its own file
            self._announce(_LOAD, cache=state, text=json.dumps([str(path), _without_digest(meta)]))
            failed = self._failures(False)
            if failed:
                raise PromptCacheError(f"{path}: {failed} of the other ranks could not load their file "
                                       "(see their warnings)")
        return (state, meta) if return_metadata else state

    def delete_state(self, path: Path) -> None:
        """Every rank's file of a saved state, removed."""
        Path(path).unlink(missing_ok=True)
        if self._leader is not None:
            self._announce(_DELETE, text=json.dumps([str(path), {}]))

    def _follow_file(self, op: int, states: dict, handles: list[int], text: str) -> None:
        from ..prompt_cache import PromptCacheError, load_prompt_cache, rank_file, save_prompt_cache

        path, meta = json.loads(text)
        mine = rank_file(path, self.stage.rank)
        if op == _DELETE:
            mine.unlink(missing_ok=True)
            return
        failed = False
        try:
            if op == _SAVE:
                held = [states.get(handles[i]) for i in self.own_layers()]
                offset = max((c.offset for c in held if c is not None), default=0)
                cache = []
                for i in range(len(handles)):
                    c = states.get(handles[i]) if self.stage.holds_layer(i) else None
                    cache.append(_positions(LayerCache(self.config.ratio(i)), offset) if c is None else c)
                save_prompt_cache(path, cache, meta)
            else:
                state, got = load_prompt_cache(path, return_metadata=True)
                if _without_digest(got) != meta or len(state) != len(handles):
                    raise PromptCacheError(f"{mine}: not the state of rank 0's file (its metadata differs)")
                for i in self.own_layers():
                    states[handles[i]] = state[i]
        except (OSError, ValueError) as e:  # PromptCacheError is a ValueError
            log.warning("rank %d: %s", self.stage.rank, one_line(e))
            failed = True
        self._failures(failed)

    def _handles(self, cache: list, rows: int) -> list[int]:
        """Row by row, the handle of each layer another rank runs (0 for rank 0's own)."""
        L = self.config.num_hidden_layers
        out = [0] * (rows * L)
        for i in range(L):
            if self.stage.holds_layer(i):
                continue
            c = cache[i]
            parts = c.caches if isinstance(c, BatchLayerCache) else [c]
            if len(parts) != rows or not all(isinstance(p, RemoteLayer) for p in parts):
                raise ValueError(f"layer {i}'s decode state is not one this split model made (make_cache): "
                                 "rank 0 cannot name it to the rank that runs the layer")
            for j, p in enumerate(parts):
                out[j * L + i] = p.handle
        return out

    def _exchange(self, values, what: str, timeout: Optional[float]) -> list[int]:
        """Rank 0's int32 ``values`` on every rank: the others pass their count and add zeros."""
        if isinstance(values, int):
            x = mx.zeros((values,), mx.int32)
        else:
            x = mx.array(values, dtype=mx.int32)
        with self._watchdog.guard(what, timeout):
            out = mx.distributed.all_sum(x, group=self.group)
            mx.eval(out)
        return out.tolist()

    def follow(self) -> None:
        """Ranks other than 0 of a served model: run each forward rank 0 announces, on this
        rank's states of the rows it names, until rank 0 lets go (``release_followers``)."""
        if self.stage.rank == 0:
            raise DistributedError("rank 0 leads a served model; the other ranks follow")
        c, L = self.config, self.config.num_hidden_layers
        states: dict[int, LayerCache] = {}  # handle -> this rank's state of one layer of one row
        while True:
            first = self._exchange(_BLOCK, "waiting for rank 0's next step", None)
            op, B, S, flags, n_copies, n_drops, n_text = first[:_HEADER]
            n = B * S + B * L + 2 * n_copies + n_drops + n_text
            payload = first[_HEADER:_HEADER + n]
            if _HEADER + n > _BLOCK:
                payload += self._exchange(_HEADER + n - _BLOCK, "reading rank 0's next step", self.timeout)
            tokens, payload = payload[: B * S], payload[B * S:]
            handles, payload = payload[: B * L], payload[B * L:]
            for src, dst in zip(payload[: 2 * n_copies: 2], payload[1: 2 * n_copies: 2]):
                if src in states:  # a handle never forwarded is a fresh state: nothing to copy
                    states[dst] = states[src].snapshot()
            for h in payload[2 * n_copies: 2 * n_copies + n_drops]:
                states.pop(h, None)
            if op == _QUIT:
                log.info("rank %d: let go by rank 0, holding %d states", self.stage.rank, len(states))
                return
            if op in (_SAVE, _LOAD, _DELETE):
                self._follow_file(op, states, handles, bytes(payload[2 * n_copies + n_drops:]).decode())
                continue
            if op != _FORWARD:
                raise DistributedError(f"rank {self.stage.rank}: unknown step {op} from rank 0")
            cache = []
            for i in range(L):
                if self.stage.holds_layer(i):
                    rows = []
                    for j in range(B):
                        h = handles[j * L + i]
                        if h not in states:
                            states[h] = LayerCache(c.ratio(i))
                        rows.append(states[h])
                else:
                    rows = [LayerCache(c.ratio(i)) for _ in range(B)]  # positions only, dropped after
                cache.append(BatchLayerCache(rows) if flags & _BATCHED else rows[0])
            self(mx.array(tokens, dtype=mx.int32).reshape(B, S), cache, all_logits=bool(flags & _ALL_LOGITS))
            mx.eval([cache[i].state for i in self.own_layers()])

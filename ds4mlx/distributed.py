"""The model split by layers over the processes of ``mlx.launch`` (``mx.distributed``).

Every process runs the same program (the CLI, ``stream_generate``, the Python API) and holds
one contiguous range of layers (``ds4mlx.stage``): rank 0 also the embedding, the last rank
the head. A forward pass goes rank to rank: each receives the hyper-connection streams
``[B, S, hc_mult, hidden]`` (float32) from the rank before, runs its layers on them with its
own decode state, and sends them on; the last rank's logits reach every rank through one
``all_sum`` (the others add zeros, so the sum is exact), so each samples the same token with the
same random seed (shared once at load) and the loop goes on in step everywhere. Only rank 0
writes output.

A rank that fails or disappears stops the others: a lost connection surfaces as
``DistributedError`` at once, and every wait for another rank is bounded by a watchdog
(``DS4MLX_DIST_TIMEOUT`` seconds, default 30) that ends the process with one line on stderr.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

from .stage import Stage, SplitError, balanced_split, parse_split, set_process_split, stages
from .state import BatchLayerCache, LayerCache

DEFAULT_TIMEOUT = 30.0  # seconds a rank waits for another during a forward pass
DEFAULT_LOAD_TIMEOUT = 1800.0  # seconds the ranks wait for each other to finish loading
_LAYER = re.compile(r"^layers\.(\d+)\.")
log = logging.getLogger("ds4mlx.distributed")

__all__ = ["DistributedError", "PipelineModel", "RemoteLayer", "SplitError", "launched", "load", "plan", "world"]


class DistributedError(RuntimeError):
    """Another rank failed, left, or did not answer in time (the message says which rank saw it)."""


def launched() -> bool:
    """Whether this process is one of several started by ``mlx.launch`` (or mpirun)."""
    return any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))


def world():
    """The group of all processes, or None when this process runs alone."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def is_output_rank() -> bool:
    """True for the process that writes output: rank 0, or the only one."""
    group = world() if launched() else None
    return group is None or group.rank() == 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _timeout(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name}={text!r}: expected a number of seconds > 0")
    return value


# ----------------------------------------------------------------------------- the split


def layer_bytes(path: Path) -> tuple[list[int], int, int]:
    """``(bytes per layer, embedding bytes, head bytes)`` of a checkpoint, from its headers."""
    from .info import read_tensors

    config, tensors, _ = read_tensors(path)
    n = int(config["num_hidden_layers"])
    per_layer, embed, head = [0] * n, 0, 0
    for t in tensors:
        m = _LAYER.match(t.name)
        if m and int(m.group(1)) < n:
            per_layer[int(m.group(1))] += t.nbytes
        elif t.name.startswith("embed."):
            embed += t.nbytes
        elif not t.name.startswith("mtp."):
            head += t.nbytes
    return per_layer, embed, head


def plan(path: Path, size: int, layers_split: Optional[str] = None) -> list[Stage]:
    """The stages of ``size`` ranks: ``layers_split`` ("3,2": layers per rank) or balanced by
    stored bytes (the embedding counts for rank 0, the head for the last)."""
    per_layer, embed, head = layer_bytes(path)
    if layers_split:
        return parse_split(layers_split, len(per_layer), size)
    return balanced_split(per_layer, size, embed_bytes=embed, head_bytes=head)


# ----------------------------------------------------------------------------- the watchdog


class _Watchdog:
    """Ends the process (one line on stderr, exit status 1) when a guarded wait lasts too long:
    a rank that hangs or vanishes without closing its connection cannot block the others."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._lock = threading.Lock()
        self._deadline: Optional[float] = None
        self._what = ""
        self._timeout = 0.0
        threading.Thread(target=self._watch, name="ds4mlx-watchdog", daemon=True).start()

    @contextmanager
    def guard(self, what: str, timeout: Optional[float]) -> Iterator[None]:
        """``timeout`` None: no deadline (a served model's ranks wait for the next request),
        but a lost connection still raises ``DistributedError``."""
        with self._lock:
            self._deadline = None if timeout is None else time.monotonic() + timeout
            self._what, self._timeout = what, timeout or 0.0
        try:
            yield
        except RuntimeError as e:  # the ring / JACCL backends: a peer closed its connection
            raise DistributedError(f"rank {self.rank}: {what} failed: {e}; another rank stopped") from None
        finally:
            with self._lock:
                self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(0.25)
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                what, timeout = self._what, self._timeout
            if late:
                os.write(2, (f"ds4mlx: error: rank {self.rank}: {what}: no answer in {timeout:g} s; another rank "
                             "stopped or the link is down (DS4MLX_DIST_TIMEOUT sets the wait)\n").encode())
                os._exit(1)


# ----------------------------------------------------------------------------- the model


class PipelineModel(nn.Module):
    """One rank's part of the model, callable as the whole one (mlx-lm's model protocol): the
    same logits on every rank, a decode state with an entry per layer (this rank's layers hold
    state, the others only count positions, so offsets agree everywhere)."""

    def __init__(self, model: nn.Module, stage: Stage, group, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__()
        self.model = model  # the parameters this rank holds
        self.stage, self.group, self.timeout = stage, group, timeout
        self._watchdog = _Watchdog(stage.rank)
        self.sent_bytes = 0  # streams and logits this rank has sent (the benchmark reads it)
        self.model_type = getattr(model, "model_type", "deepseek_v4")
        self._leader: Optional[_Leader] = None  # rank 0 of a served model (``lead``)

    # -- what callers read from a model
    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def experts_per_token(self) -> int:
        return self.model.experts_per_token

    @property
    def mtp(self) -> list:
        return []  # the drafter's block is not split: speculative decoding runs on one machine

    @property
    def layers(self) -> list:
        return self.model.layers

    def own_layers(self) -> range:
        return range(self.stage.first, self.stage.stop)

    def set_experts_per_token(self, k: Optional[int], source: str = "config") -> None:
        self.model.experts_per_token = self.config.check_experts_per_token(k, source)
        for i in self.own_layers():
            self.model.layers[i].ffn.gate.top_k = self.model.experts_per_token

    def set_qat_rounding(self, on: bool) -> None:
        self.model.qat_rounding = bool(on)
        for i in self.own_layers():
            self.model.layers[i].attn.qat_rounding = self.model.qat_rounding

    def make_cache(self) -> list:
        """A state entry per layer; when leading (served), ``RemoteLayer``s for the layers other
        ranks run."""
        c, lead = self.config, self._leader
        return [LayerCache(c.ratio(i)) if lead is None or self.stage.holds_layer(i) else RemoteLayer(c.ratio(i), lead)
                for i in range(c.num_hidden_layers)]

    # -- communication, each wait under the watchdog
    def _eval(self, what: str, *arrays) -> None:
        with self._watchdog.guard(what, self.timeout):
            mx.eval(*arrays)

    def _send(self, h: mx.array, dst: int) -> None:
        self._eval(f"sending to rank {dst}", mx.distributed.send(h, dst, group=self.group))
        self.sent_bytes += h.nbytes

    def _share(self, logits: mx.array) -> mx.array:
        """The last rank's logits on every rank (an exact sum: the others add zeros)."""
        out = mx.distributed.all_sum(logits, group=self.group)
        self.sent_bytes += logits.nbytes * 2 * (self.stage.size - 1) // self.stage.size  # the ring's share
        return out

    # -- forward
    def hidden_streams(self, tokens: mx.array, cache: Optional[list] = None, *,
                       all_logits: bool = False) -> Optional[mx.array]:
        """This rank's share of the pass: the final streams on the last rank (None elsewhere)."""
        if tokens.ndim == 1:
            tokens = tokens[None]
        if cache is None:
            cache = self.make_cache()
        # The tokens depend on the last step's logits (a collective): settle them first, so the
        # collectives run in the same order on every rank.
        self._eval("waiting for the last step's logits", tokens)
        if self._leader is not None:
            batched = isinstance(cache[0], BatchLayerCache)
            self._announce(_FORWARD, tokens, cache, (_BATCHED if batched else 0) | (_ALL_LOGITS if all_logits else 0))
        with self._in_step():
            return self._run_stage(tokens, cache)

    def _run_stage(self, tokens: mx.array, cache: list) -> Optional[mx.array]:
        m, s = self.model, self.stage
        shape = (*tokens.shape, self.config.hc_mult, self.config.hidden_size)
        if s.embeds:
            e = m.embed(tokens).astype(mx.float32)
            h = mx.broadcast_to(e[:, :, None, :], shape)
        else:
            h = mx.distributed.recv(shape, mx.float32, s.rank - 1, group=self.group)
        for i in self.own_layers():
            h = m.layers[i](h, tokens, cache[i], m.dtype)
        for i, c in enumerate(cache):
            if not s.holds_layer(i):  # positions advance on every rank alike
                for row in c.caches if isinstance(c, BatchLayerCache) else [c]:
                    row.offset += tokens.shape[1]
        if not s.heads:
            self._send(h, s.rank + 1)  # evaluates this rank's layers (and the receive) now
            return None
        self._eval(f"waiting for rank {s.rank - 1}" if s.rank else "running the layers", h)
        return h

    def __call__(self, tokens: mx.array, cache: Optional[list] = None, *, all_logits: bool = False) -> mx.array:
        """tokens [B, S] → logits [B, S, vocab] float32, the same on every rank. The last
        position's logits are shared at once (under the watchdog); the others with
        ``all_logits``, or else when the caller evaluates them (every rank runs the same
        program, so each does). When leading, the other ranks cannot know what rank 0 reads:
        without ``all_logits`` those positions are NaN, which the generation loops refuse."""
        if tokens.ndim == 1:
            tokens = tokens[None]
        h = self.hidden_streams(tokens, cache, all_logits=all_logits)
        B, S = tokens.shape
        V = self.config.vocab_size
        with self._in_step():
            logits = self.model.main_head(h) if h is not None else mx.zeros((B, S, V), mx.float32)
            last = self._share(logits[:, -1:])
            self._eval("sharing the logits", last)
            if S == 1:
                return last
            if all_logits:
                rest = self._share(logits[:, :-1])
                self._eval("sharing the logits", rest)
            elif self._leader is not None:
                rest = mx.broadcast_to(mx.array(float("nan")), (B, S - 1, V))
            else:
                rest = self._share(logits[:, :-1])
            return mx.concatenate([rest, last], axis=1)

    @contextmanager
    def _in_step(self) -> Iterator[None]:
        """Once rank 0 has announced a forward, the other ranks run it whatever happens here: a
        failure on rank 0 now would leave them out of step, so it ends the process."""
        if self._leader is None:
            yield
            return
        try:
            yield
        except Exception as e:
            os.write(2, f"ds4mlx: error: rank 0: {_one_line(e)}; the other ranks are out of step, stopping\n".encode())
            os._exit(1)

    # -- served mode (see the section below)
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
            self._exchange(header, "announcing the next step", self.timeout)
            if payload:
                self._exchange(payload, "announcing the next step", self.timeout)

    def _failures(self, failed: bool) -> int:
        """How many ranks failed the file step just announced (each says, rank 0 too)."""
        with self._in_step():
            return self._exchange([int(failed)], "waiting for the other ranks' files", self.timeout)[0]

    # -- a served model's prefix-cache files: each rank its own layers' (``prompt_cache.rank_file``)
    def save_state(self, path: Path, cache: list, metadata: Optional[dict] = None) -> None:
        """``save_prompt_cache`` on every rank: rank 0's file, then the others' (or none)."""
        from .prompt_cache import save_prompt_cache

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
        from .prompt_cache import PromptCacheError, load_prompt_cache

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
        from .prompt_cache import PromptCacheError, load_prompt_cache, rank_file, save_prompt_cache

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
            log.warning("rank %d: %s", self.stage.rank, _one_line(e))
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
            op, B, S, flags, n_copies, n_drops, n_text = self._exchange(_HEADER, "waiting for rank 0's next step",
                                                                         None)
            n = B * S + B * L + 2 * n_copies + n_drops + n_text
            payload = self._exchange(n, "reading rank 0's next step", self.timeout) if n else []
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


# ----------------------------------------------------------------------------- served mode
# ``ds4mlx serve`` runs the HTTP server on rank 0 only, so the other ranks cannot run the same
# program: rank 0 announces each forward (``PipelineModel.lead``) and they run it (``follow``).
# An announcement is two ``all_sum``s of int32 (the other ranks add zeros): a header, then the
# tokens, the handle naming each row's state of every layer another rank runs, and the state
# copies and drops since the last announcement. Rank 0 keeps a ``RemoteLayer`` for each layer
# it does not run: it counts positions, and its handle names the owner's state of that layer.
# Copying one (a prefix-cache snapshot) or dropping it (garbage collection) is queued and sent
# with the next announcement, before the forward, so the other ranks' states follow rank 0's.

_QUIT, _FORWARD, _SAVE, _LOAD, _DELETE = range(5)
_BATCHED, _ALL_LOGITS = 1, 2
_HEADER = 7  # op, rows, tokens per row, flags, copies, drops, bytes of text


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


# ----------------------------------------------------------------------------- loading


def this_stage(path_or_repo, layers_split: Optional[str] = None, group=None) -> Stage:
    """This process's stage of the split (its layers): what it reads and what memory it needs."""
    from .loader import resolve_model_path

    group = group or world()
    if group is None:
        raise DistributedError("ds4mlx.distributed: this process runs alone; start it with mlx.launch -n N")
    return plan(resolve_model_path(path_or_repo), group.size(), layers_split)[group.rank()]


def _counts(stage: Stage, group) -> list[Stage]:
    """Every rank's stage, from each one's layer count (one all_sum at load)."""
    counts = mx.zeros((stage.size,), mx.int32).at[stage.rank].add(stage.stop - stage.first)
    counts = mx.distributed.all_sum(counts, group=group)
    mx.eval(counts)
    return stages(counts.tolist(), stage.num_layers)


def load(path_or_repo, *, layers_split: Optional[str] = None, group=None, timeout: Optional[float] = None,
         status: Optional[Callable[[str], None]] = None, **kwargs: Any) -> tuple[PipelineModel, Any]:
    """``(PipelineModel, tokenizer)`` for this rank of ``group`` (default: every process of
    ``mlx.launch``): the stage's layers read from the file, nothing else of them. Keyword
    arguments are ``ds4mlx.load``'s (``mtp`` excepted)."""
    from .loader import load as load_one, resolve_model_path

    if kwargs.get("mtp") or kwargs.get("mtp_path") is not None:
        raise ValueError("the MTP drafter does not run split over several processes: drop --draft / mtp")
    kwargs.pop("mtp", None)
    kwargs.pop("mtp_path", None)
    group = group or world()
    timeout = _timeout("DS4MLX_DIST_TIMEOUT", DEFAULT_TIMEOUT) if timeout is None else timeout
    path = resolve_model_path(path_or_repo)
    stage = this_stage(path, layers_split, group)
    if status is not None:
        status(f"{stage.describe()}")
    model, tokenizer = load_one(path, stage=stage, **kwargs)
    pipeline = PipelineModel(model, stage, group, timeout=timeout)
    # One random seed for every rank, so sampling draws the same token everywhere.
    seed = mx.array([int.from_bytes(os.urandom(4), "little") if stage.rank == 0 else 0], dtype=mx.uint32)
    with pipeline._watchdog.guard("waiting for the other ranks to load", _timeout(
            "DS4MLX_DIST_LOAD_TIMEOUT", DEFAULT_LOAD_TIMEOUT)):
        seed = mx.distributed.all_sum(seed, group=group)
        mx.eval(seed)
        set_process_split(_counts(stage, group), stage.rank)  # the same on every rank, whoever computed it
    mx.random.seed(int(seed.item()))
    return pipeline, tokenizer


def silence_other_ranks() -> None:
    """Ranks other than 0 write no output (``mlx.launch`` would show it once per rank)."""
    if not is_output_rank():
        sys.stdout = open(os.devnull, "w")

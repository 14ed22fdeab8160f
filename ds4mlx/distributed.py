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

import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

from .stage import Stage, SplitError, balanced_split, parse_split

DEFAULT_TIMEOUT = 30.0  # seconds a rank waits for another during a forward pass
DEFAULT_LOAD_TIMEOUT = 1800.0  # seconds the ranks wait for each other to finish loading
_LAYER = re.compile(r"^layers\.(\d+)\.")

__all__ = ["DistributedError", "PipelineModel", "SplitError", "launched", "load", "plan", "world"]


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
    def guard(self, what: str, timeout: float) -> Iterator[None]:
        with self._lock:
            self._deadline, self._what, self._timeout = time.monotonic() + timeout, what, timeout
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
        c = self.config
        from .state import LayerCache

        return [LayerCache(c.ratio(i)) for i in range(c.num_hidden_layers)]

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
    def hidden_streams(self, tokens: mx.array, cache: Optional[list] = None) -> Optional[mx.array]:
        """This rank's share of the pass: the final streams on the last rank (None elsewhere)."""
        if tokens.ndim == 1:
            tokens = tokens[None]
        if cache is None:
            cache = self.make_cache()
        m, s = self.model, self.stage
        # The tokens depend on the last step's logits (a collective): settle them first, so the
        # collectives run in the same order on every rank.
        self._eval("waiting for the last step's logits", tokens)
        shape = (*tokens.shape, self.config.hc_mult, self.config.hidden_size)
        if s.embeds:
            e = m.embed(tokens).astype(mx.float32)
            h = mx.broadcast_to(e[:, :, None, :], shape)
        else:
            h = mx.distributed.recv(shape, mx.float32, s.rank - 1, group=self.group)
        for i in self.own_layers():
            h = m.layers[i](h, tokens, cache[i], m.dtype)
        for i, c in enumerate(cache):
            if not s.holds_layer(i):
                c.offset += tokens.shape[1]  # positions advance on every rank alike
        if not s.heads:
            self._send(h, s.rank + 1)  # evaluates this rank's layers (and the receive) now
            return None
        self._eval(f"waiting for rank {s.rank - 1}" if s.rank else "running the layers", h)
        return h

    def __call__(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        """tokens [B, S] → logits [B, S, vocab] float32, the same on every rank. The last
        position's logits are shared at once (under the watchdog); the others only when the
        caller evaluates them (a prefill chunk's are usually dropped unread)."""
        if tokens.ndim == 1:
            tokens = tokens[None]
        h = self.hidden_streams(tokens, cache)
        B, S = tokens.shape
        V = self.config.vocab_size
        logits = self.model.main_head(h) if h is not None else mx.zeros((B, S, V), mx.float32)
        last = self._share(logits[:, -1:])
        self._eval("sharing the logits", last)
        if S == 1:
            return last
        return mx.concatenate([self._share(logits[:, :-1]), last], axis=1)


# ----------------------------------------------------------------------------- loading


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
    if group is None:
        raise DistributedError("ds4mlx.distributed.load: this process runs alone; start it with mlx.launch -n N")
    timeout = _timeout("DS4MLX_DIST_TIMEOUT", DEFAULT_TIMEOUT) if timeout is None else timeout
    path = resolve_model_path(path_or_repo)
    stage = plan(path, group.size(), layers_split)[group.rank()]
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
    mx.random.seed(int(seed.item()))
    return pipeline, tokenizer


def silence_other_ranks() -> None:
    """Ranks other than 0 write no output (``mlx.launch`` would show it once per rank)."""
    if not is_output_rank():
        sys.stdout = open(os.devnull, "w")

"""One rank's part of a model split by layers: the forward pass rank to rank (streams with
``send``/``recv``, the last rank's logits to every rank with an exact ``all_sum``)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

from ..stage import Stage
from ..state import BatchLayerCache, LayerCache
from .served import _ALL_LOGITS, _BATCHED, _FORWARD, RemoteLayer, Served, _Leader
from .watch import Watchdog, one_line

DEFAULT_TIMEOUT = 30.0  # seconds a rank waits for another during a forward pass


class PipelineModel(Served, nn.Module):
    """One rank's part of the model, callable as the whole one (mlx-lm's model protocol): the
    same logits on every rank, a decode state with an entry per layer (this rank's layers hold
    state, the others only count positions, so offsets agree everywhere)."""

    def __init__(self, model: nn.Module, stage: Stage, group, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__()
        self.model = model  # the parameters this rank holds
        self.stage, self.group, self.timeout = stage, group, timeout
        self._watchdog = Watchdog(stage.rank)
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
            os.write(2, f"ds4mlx: error: rank 0: {one_line(e)}; the other ranks are out of step, stopping\n".encode())
            os._exit(1)

"""Speculative decoding: a drafter guesses the next tokens, one forward of the main model checks them.

Each round the drafter proposes up to N tokens after the last accepted token ``y``; the main
model runs once over ``[y, d1, .., dN]``. Greedy decoding accepts drafts while they equal the
main model's argmax; sampling uses the standard rule (accept ``d`` with probability
``min(1, p(d)/q(d))``, otherwise draw from the normalised ``max(0, p - q)``), so the output
distribution is the main model's. Either way the round ends with one token from the main model,
so a forward yields between 1 and N+1 tokens. Rejected tokens are taken back out of the decode
state with the journal of ``ds4mlx.state`` (``mark``/``restore``), not by re-running the model.

Drafters: ``MTPDrafter`` runs the checkpoint's multi-token-prediction block, autoregressively
for N > 1 (its own output streams and draft token feed the next step); ``ForcedDrafter``
proposes given tokens (tests, and the acceptance ceiling in benchmarks).

mlx-lm's ``speculative_generate_step`` needs a separate draft model with a trimmable cache;
here the drafter shares the main model's streams and the state cannot be trimmed, hence this loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from .state import mark, release, restore

MAX_DRAFT_TOKENS = 3  # the MTP block is trained for one step; beyond three drafts acceptance collapses


@dataclass
class SpeculativeStats:
    """Counts of one generation: verify forwards, drafts proposed and accepted, tokens produced."""

    forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    def format(self) -> str:
        return (f"Drafts: {self.accepted}/{self.drafted} accepted ({100 * self.acceptance_rate:.1f}%), "
                f"{self.tokens_per_forward:.2f} tokens per verify forward ({self.forwards} forwards)")


# --------------------------------------------------------------------------- distributions


@dataclass(frozen=True)
class Sampling:
    """The target distribution: mlx-lm's filters (top-p, min-p, top-k, in ``make_sampler``'s
    order) on the log-probabilities, then softmax at ``temp``; ``temp == 0`` is greedy."""

    temp: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def probs(self, logits: mx.array) -> mx.array:
        """logits [..., V] -> probabilities [..., V] (float32)."""
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        shape = logprobs.shape
        x = logprobs.reshape(-1, shape[-1])
        if 0 < self.top_p < 1.0:
            x = apply_top_p(x, self.top_p)
        if self.min_p != 0.0:
            x = apply_min_p(x, self.min_p)
        if self.top_k > 0:
            x = apply_top_k(x, self.top_k)
        return mx.softmax(x * (1 / self.temp), axis=-1, precise=True).reshape(shape)

    def draw(self, logits: mx.array) -> tuple[mx.array, Optional[mx.array]]:
        """A token from logits [B, V] and its distribution (None when greedy)."""
        if self.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32), None
        q = self.probs(logits)
        return mx.random.categorical(mx.log(q)).astype(mx.int32), q


def accept_drafts(
    target: mx.array, drafts: mx.array, draft_probs: Optional[mx.array], greedy: bool
) -> tuple[mx.array, mx.array]:
    """The acceptance rule over a batch of rounds.

    ``target`` [B, N+1, V]: the main model's logits (greedy) or probabilities at the N+1 verified
    positions; ``drafts`` [B, N]; ``draft_probs`` [B, N, V] the drafter's distributions, or None
    for drafts that were given (a one-hot q). Returns (accepted count [B], next token [B]): the
    token after the accepted drafts, the main model's own choice there.
    """
    b, n1, v = target.shape
    n = n1 - 1
    if greedy:
        best = mx.argmax(target, axis=-1).astype(mx.int32)  # [B, N+1]
        ok = drafts == best[:, :n]
        count = mx.sum(mx.cumprod(ok.astype(mx.int32), axis=1), axis=1)
        return count, mx.take_along_axis(best, count[:, None], axis=1)[:, 0]
    p_d = mx.take_along_axis(target[:, :n], drafts[..., None], axis=-1)[..., 0]
    q_d = 1.0 if draft_probs is None else mx.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
    u = mx.random.uniform(shape=(b, n))
    ok = u * q_d < p_d  # u < p/q without dividing; q(d) > 0 since d was drawn from q
    count = mx.sum(mx.cumprod(ok.astype(mx.int32), axis=1), axis=1)
    p = mx.take_along_axis(target, count[:, None, None], axis=1)[:, 0]  # [B, V]
    if draft_probs is None:
        q_all = mx.concatenate([(mx.arange(v)[None, None] == drafts[..., None]).astype(p.dtype),
                                mx.zeros((b, 1, v), p.dtype)], axis=1)
    else:
        q_all = mx.concatenate([draft_probs.astype(p.dtype), mx.zeros((b, 1, v), p.dtype)], axis=1)
    q = mx.take_along_axis(q_all, count[:, None, None], axis=1)[:, 0]  # zeros after the last draft
    residual = mx.maximum(p - q, 0.0)
    total = mx.sum(residual, axis=-1, keepdims=True)
    residual = mx.where(total > 0, residual, p)  # p == q: the residual is empty, p itself is right
    return count, mx.random.categorical(mx.log(residual)).astype(mx.int32)


# --------------------------------------------------------------------------- drafters


class ForcedDrafter:
    """Proposes given tokens: ``tokens[i]`` is the guess for the i-th generated token."""

    def __init__(self, tokens: Sequence[int]):
        self.tokens = [int(t) for t in tokens]

    def begin(self, model: nn.Module, cache: list) -> None:
        pass

    def observe(self, streams: mx.array, tokens: mx.array, position: int) -> None:
        pass

    def propose(self, y: mx.array, n: int, generated: int, sampling: Sampling
                ) -> tuple[list[mx.array], Optional[mx.array]]:
        picked = self.tokens[generated : generated + n]
        return [mx.array([t], dtype=mx.int32) for t in picked], None

    def end(self) -> None:
        pass


class MTPDrafter:
    """Drafts with the model's MTP block ``mtp.{index}``.

    The block pairs the main streams at position p with the token at p+1. It is fed every
    position the main model commits (so its window rows are those of the accepted sequence);
    draft steps beyond the first run it ahead on its own output streams and are then taken back.
    Streams whose next token is not known yet wait here; between calls they wait on the MTP
    layer's cache entry, so a conversation keeps drafting from where it was.
    """

    def __init__(self, index: int = 0):
        self.index = index

    def begin(self, model: nn.Module, cache: list) -> None:
        if not getattr(model, "mtp", None):
            raise ValueError("draft='mtp' needs the model's MTP block: load it with mtp=True "
                             "(a GGUF needs its MTP file: --mtp-gguf FILE)")
        self.model = model
        n_layers = model.config.num_hidden_layers
        self.layer = cache[n_layers + self.index]
        self.main = cache[0]
        held = getattr(self.layer, "draft_pending", None)
        # a copy: the held list may be shared with a snapshot of this state (a prefix cache)
        self.streams, self.next_tokens = (held[0], list(held[1])) if held is not None else (None, [])
        if self.layer.offset + self._n_streams() != self.main.offset:
            # The block missed positions (e.g. earlier turns decoded without drafts): restart it
            # here; its window fills again within sliding_window tokens.
            self.layer.window, self.layer.offset = None, self.main.offset
            self.streams, self.next_tokens = None, []

    def _n_streams(self) -> int:
        return 0 if self.streams is None else self.streams.shape[1]

    def observe(self, streams: mx.array, tokens: mx.array, position: int) -> None:
        """The main model committed positions ``position..`` with inputs ``tokens`` [1, k] and
        final streams ``streams`` [1, k, hc, D]."""
        held = sum(t.shape[0] for t in self.next_tokens)
        need = self.layer.offset + 1 + held  # the input at p+1 follows the streams at p
        toks = tokens[0, max(0, need - position):]
        if toks.shape[0]:
            self.next_tokens.append(toks)
        self.streams = streams if self.streams is None else mx.concatenate([self.streams, streams], axis=1)
        self._feed(complete=False)

    def _feed(self, complete: bool, last: Optional[mx.array] = None) -> Optional[mx.array]:
        """Run the block over the waiting (streams, next token) pairs; with ``last`` (the token
        after the final streams) every pair is complete and its output streams are returned."""
        next_tokens = self.next_tokens + ([last] if last is not None else [])
        toks = mx.concatenate(next_tokens) if next_tokens else mx.zeros((0,), mx.int32)
        k = toks.shape[0]
        if k == 0 or (not complete and k < 64):  # batch short pairs into the next draft call
            return None
        h = self.streams[:, :k]
        keep = self.model.config.sliding_window - 1
        if k > keep + 1:
            # Only the last sliding_window-1 positions leave rows in the block's window and only
            # the last output is used: skip the rest (same state as feeding them all).
            skip = k - keep - 1
            self.layer.window, self.layer.offset = None, self.layer.offset + skip
            h, toks = h[:, skip:], toks[skip:]
        z = self.model.mtp_streams(h, toks[None], self.layer, self.index)
        self.streams = self.streams[:, k:] if self.streams.shape[1] > k else None
        self.next_tokens = []
        return z[:, -1:]

    def propose(self, y: mx.array, n: int, generated: int, sampling: Sampling
                ) -> tuple[list[mx.array], Optional[mx.array]]:
        if n == 0:
            return [], None
        z = self._feed(complete=True, last=y)
        drafts, dists = [], []
        marks = None
        for step in range(n):
            if step == 1:
                marks = mark([self.layer])  # steps past the first are guesses: taken back below
            if step > 0:
                z = self.model.mtp_streams(z, drafts[-1][None], self.layer, self.index)
            d, q = sampling.draw(self.model.mtp_head(z)[:, -1])
            drafts.append(d)
            dists.append(q)
        if marks is not None:
            restore([self.layer], marks, marks[0].offset)
        return drafts, None if sampling.greedy else mx.stack(dists, axis=1)

    def end(self) -> None:
        self.layer.draft_pending = (self.streams, self.next_tokens)


def make_drafter(draft: Any) -> Any:
    """``"mtp"`` -> ``MTPDrafter()``; a drafter object is returned as is."""
    if draft == "mtp":
        return MTPDrafter()
    if isinstance(draft, str):
        raise ValueError(f"unknown draft {draft!r} (known: 'mtp')")
    return draft


# --------------------------------------------------------------------------- the loop


def speculative_generate_step(
    prompt: mx.array,
    model: nn.Module,
    drafter: Any,
    *,
    num_draft_tokens: int = 2,
    max_tokens: int = 256,
    sampling: Sampling = Sampling(),
    logits_processors: Optional[list] = None,
    prompt_cache: Optional[list] = None,
    prefill_step_size: int = 2048,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    stats: Optional[SpeculativeStats] = None,
) -> Iterator[tuple[int, mx.array, bool]]:
    """Yields ``(token, logprobs, from_draft)`` like mlx-lm's ``speculative_generate_step``.

    When the consumer stops, ``prompt_cache`` holds exactly the prompt and the tokens yielded.
    """
    from mlx_lm.generate import generation_stream

    if not 0 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
        raise ValueError(f"num_draft_tokens must be 0..{MAX_DRAFT_TOKENS}, got {num_draft_tokens}")
    cache = model.make_cache() if prompt_cache is None else prompt_cache
    main = cache[: model.config.num_hidden_layers]
    stats = SpeculativeStats() if stats is None else stats
    progress = prompt_progress_callback or (lambda done, total: None)
    processors = logits_processors or []
    history = prompt if processors else None  # the tokens mlx-lm's processors see

    def forward(tokens: mx.array) -> tuple[mx.array, mx.array]:
        position = main[0].offset
        h = model.hidden_streams(tokens[None], cache)
        drafter.observe(h, tokens[None], position)
        return h, model.main_head(h)[0]

    def process(logits: mx.array, tokens: Optional[mx.array]) -> mx.array:
        for p in processors:
            logits = p(tokens, logits[None])[0]
        return logits

    drafter.begin(model, cache)
    marks = None
    target = 0  # position to restore to if the consumer stops mid-round
    unprocessed = None  # a yielded token not yet in the state
    try:
        with mx.stream(generation_stream):
            total = prompt.shape[0]
            progress(0, total)
            done = 0
            while total - done > 1:
                n = min(prefill_step_size, total - done - 1)
                forward(prompt[done : done + n])
                mx.eval([c.state for c in cache])
                done += n
                progress(done, total)
                mx.clear_cache()
            _, logits = forward(prompt[done:])
            logits = process(logits[-1], history)
            logprobs = logits - mx.logsumexp(logits, keepdims=True)
            y, _ = sampling.draw(logits[None])
            mx.eval(y)
            progress(total, total)
        unprocessed = y
        yield y.item(), logprobs, False
        emitted = 1
        while emitted < max_tokens:
            with mx.stream(generation_stream):
                n = min(num_draft_tokens, max_tokens - emitted - 1)
                drafts, q = drafter.propose(y, n, emitted, sampling)
                n = len(drafts)
                inputs = mx.concatenate([y] + drafts)
                p0 = main[0].offset
                marks = mark(main)
                h = model.hidden_streams(inputs[None], cache)
                unprocessed = None
                logits = model.main_head(h)[0]  # [n+1, V]
                if processors:
                    hist = mx.concatenate([history, inputs])
                    logits = mx.stack([process(logits[j], hist[: hist.shape[0] - n + j]) for j in range(n + 1)])
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                if n:
                    dr = mx.concatenate(drafts)[None]
                    scores = logits if sampling.greedy else sampling.probs(logits)
                    count, nxt = accept_drafts(scores[None], dr, None if q is None else q, sampling.greedy)
                else:
                    count, (nxt, _) = mx.array([0]), sampling.draw(logits[None])
                mx.eval(count, nxt)
                a = count.item()
            stats.forwards += 1
            stats.drafted += n
            stats.accepted += a
            stats.tokens += a + 1
            if processors:
                history = mx.concatenate([history, inputs[: a + 1]])
            for j in range(a):
                target = p0 + j + 2
                emitted += 1
                yield drafts[j].item(), logprobs[j], True
                if emitted == max_tokens:
                    return
            y = nxt.reshape(1)
            target = p0 + a + 1
            unprocessed = y
            emitted += 1
            yield y.item(), logprobs[a], False
            # the round is over: drop the rejected positions, hand the kept ones to the drafter
            if a < n:
                restore(main, marks, p0 + a + 1)
            else:
                release(main)
            marks = None
            drafter.observe(h[:, : a + 1], inputs[None, : a + 1], p0)
    finally:
        if marks is not None:
            restore(main, marks, target)
            drafter.observe(h[:, : target - p0], inputs[None, : target - p0], p0)
        if unprocessed is not None:
            with mx.stream(generation_stream):
                forward(unprocessed)
            mx.eval([c.state for c in cache])
        drafter.end()

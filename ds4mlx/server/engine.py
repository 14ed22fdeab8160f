"""The model worker: one thread runs every generation, one request at a time, in arrival order.

Routes hand a ``Job`` to ``Engine.submit`` and read its events from an asyncio queue. Only the
worker thread touches the model and decode states, so no two forwards ever share a state. The
prompt is prefilled segment by segment up to its reuse points (message boundaries), with a
snapshot at each, so a later request that shares the prefix starts from there; the cut points
depend only on the prompt, so a cached and an uncached run of one prompt compute the same thing.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .. import encoding
from ..generate import DEFAULT_MIN_P, DEFAULT_PREFILL_STEP, context_limit, stream_generate, think_ids
from .prefix_cache import PrefixCache

log = logging.getLogger("ds4mlx.server")

_FORCE_LOW = -1e9  # finite: stream_generate refuses NaN/Inf logits


@dataclass
class Job:
    ids: list[int]
    boundaries: list[int] = field(default_factory=list)  # reuse points (token positions)
    max_tokens: int = 512
    temp: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = DEFAULT_MIN_P
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    thinking: bool = False  # the prompt opened a reasoning block: stops apply after </think>
    force_content: list[int] = field(default_factory=list)  # tokens the answer must start with
    think_budget: Optional[int] = None  # reasoning tokens before </think> is forced (Anthropic budget_tokens)
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Result:
    text: str  # the completion as ds4mlx.generate returns it (reasoning closed by </think>)
    finish_reason: str  # "stop", "length", "stop_sequence", "cancelled"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    stop_sequence: Optional[str] = None
    prefill_s: float = 0.0
    total_s: float = 0.0
    draft_stats: Optional[Any] = None  # SpeculativeStats with --draft


class ForceContent:
    """mlx-lm logits processor: once the answer starts (at once, or after ``</think>`` when
    reasoning), its first tokens are ``tokens`` (a forced tool-call opening, or a script)."""

    def __init__(self, tokens: list[int], passed: int, think_end: Optional[int]) -> None:
        self.tokens, self.passed, self.think_end = list(tokens), passed, think_end

    def __call__(self, history, logits):
        import mlx.core as mx

        generated = history.tolist()[self.passed:]
        if self.think_end is not None:
            if self.think_end not in generated:
                return logits
            generated = generated[generated.index(self.think_end) + 1:]
        if len(generated) >= len(self.tokens):
            return logits
        want = self.tokens[len(generated)]
        return mx.where(mx.arange(logits.shape[-1]) == want, 0.0, _FORCE_LOW).astype(logits.dtype)[None]


class ThinkBudget:
    """mlx-lm logits processor: after ``budget`` reasoning tokens without ``</think>``, the next
    token is ``</think>`` (the answer follows)."""

    def __init__(self, budget: int, passed: int, think_end: int) -> None:
        self.budget, self.passed, self.think_end = budget, passed, think_end

    def __call__(self, history, logits):
        import mlx.core as mx

        generated = history.tolist()[self.passed:]
        if len(generated) < self.budget or self.think_end in generated:
            return logits
        return mx.where(mx.arange(logits.shape[-1]) == self.think_end, 0.0, _FORCE_LOW).astype(logits.dtype)[None]


def split_points(text: str) -> list[int]:
    """Character positions where a reuse point falls: before each user turn (after the system
    prompt or an answer's EOS) and after each ``<｜Assistant｜>`` (before ``<think>``/``</think>``,
    which the next turn renders differently)."""
    cuts = set()
    for marker, after in ((encoding.USER, False), (encoding.ASSISTANT, True)):
        i = text.find(marker)
        while i >= 0:
            cuts.add(i + len(marker) if after else i)
            i = text.find(marker, i + 1)
    return sorted(c for c in cuts if 0 < c < len(text))


def tokenize_with_boundaries(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the token positions of its reuse points. Every cut sits next to
    a special token, which the tokenizer never merges across; if the pieces still tokenize
    differently from the whole, the prompt gets no inner reuse points."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    cuts = split_points(text)
    if not cuts:
        return ids, []
    pieces, bounds, start = [], [], 0
    for c in cuts + [len(text)]:
        pieces += tokenizer.encode(text[start:c], add_special_tokens=False)
        bounds.append(len(pieces))
        start = c
    if pieces != ids:
        log.debug("prompt pieces tokenize differently from the whole prompt; no reuse points")
        return ids, []
    return ids, bounds[:-1]


def _release_thread_state() -> None:
    """Drop this thread's MLX state while the interpreter still runs. MLX keeps a compiled-
    function cache and a random key per thread, holding Python objects; left to the thread's
    exit, their native destructors take the GIL after ``join`` has returned. If the interpreter
    is finalizing by then, Python ends the thread with pthread_exit inside that destructor and
    the process aborts ("terminate called without an active exception")."""
    import mlx.core as mx

    mx.clear_streams()


_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_engines() -> None:
    """Engines still open at exit: stop their workers before the interpreter finalizes."""
    for engine in list(_engines):
        engine.close()


def _materialize(model: Any) -> None:
    """Evaluate every array the model holds, private ones (RoPE tables) included. MLX streams
    belong to a thread: an array still lazy from the loading thread cannot be evaluated on the
    worker ("There is no Stream(cpu, 0) in current thread")."""
    import mlx.core as mx

    arrays = []
    for m in model.modules():
        for v in m.values():
            arrays += [v] if isinstance(v, mx.array) else [x for x in v if isinstance(x, mx.array)] \
                if isinstance(v, (list, tuple)) else []
    mx.eval(arrays)


class Engine:
    """Owns the model, the tokenizer and the prefix cache; runs jobs on one worker thread."""

    def __init__(self, model: Any, tokenizer: Any, *, ctx: Optional[int] = None,
                 prefix_cache: Optional[PrefixCache] = None, prefill_step: int = DEFAULT_PREFILL_STEP,
                 processors: Optional[Callable[[Job, int], list]] = None, default_max_tokens: int = 4096,
                 draft: Optional[str] = None, num_draft_tokens: int = 2) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.draft, self.num_draft_tokens = draft, num_draft_tokens  # speculative decoding (ds4mlx.speculative)
        self.default_max_tokens = default_max_tokens
        self.ctx, _ = context_limit(model, ctx)
        self.prefix_cache = prefix_cache
        self.prefill_step = prefill_step
        self.processors = processors  # extra logits processors per job (scripted outputs, constraints)
        self.think_start, self.think_end = think_ids(tokenizer)
        _materialize(model)
        self.last: Optional[Result] = None  # the most recent finished job (for tests and logs)
        self.jobs_done = 0
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._closed = False
        self._running: Optional[Job] = None
        # daemon: an engine nobody closed must not keep the process alive (see _close_engines)
        self._worker = threading.Thread(target=self._work, name="ds4mlx-model", daemon=True)
        self._worker.start()
        _engines.add(self)

    def close(self) -> None:
        """Cancel the queued and running jobs and wait for the worker thread to end, so no MLX
        work outlives the server."""
        if self._closed:
            return
        self._closed = True
        running = self._running
        if running is not None:
            running.cancel.set()
        self._jobs.put(None)
        self._worker.join()

    # ------------------------------------------------------------------ async side
    def submit(self, job: Job) -> "asyncio.Queue":
        """Queue ``job``; its events arrive on the returned asyncio queue: ("start", cached
        tokens), ("text", delta)..., then ("done", Result) or ("error", exception). Setting
        ``job.cancel`` stops it within a token (or before it starts)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the server's loop has closed: nobody is listening
                job.cancel.set()

        if self._closed:
            raise RuntimeError("the engine is closed")
        self._jobs.put((job, emit))
        return events

    # ------------------------------------------------------------------ worker side
    def _work(self) -> None:
        try:
            while (item := self._jobs.get()) is not None:
                job, emit = item
                self._running = job  # before the check: close() either sees it or is seen
                if self._closed:
                    job.cancel.set()
                self._run_safely(job, emit)
                self._running = None
        finally:
            _release_thread_state()

    def _run_safely(self, job: Job, emit: Callable[[str, Any], None]) -> None:
        try:
            result = self._run(job, emit)
            self.last = result
            self.jobs_done += 1
            emit("done", result)
            if self.prefix_cache is not None:
                self.prefix_cache.flush()
        except Exception as e:  # reported to the client; the worker keeps serving
            if not isinstance(e, ValueError):
                log.exception("generation failed")
            emit("error", e)

    def _prefill(self, cache: list, ids: list[int]) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        drafter = None
        if self.draft is not None:  # the drafter sees every position, as in a one-piece prefill
            from ..speculative import make_drafter

            drafter = make_drafter(self.draft)
            drafter.begin(self.model, cache)
        with mx.stream(generation_stream):
            for i in range(0, len(ids), self.prefill_step):
                chunk = mx.array([ids[i:i + self.prefill_step]])
                if drafter is None:
                    self.model(chunk, cache)
                else:
                    position = cache[0].offset
                    drafter.observe(self.model.hidden_streams(chunk, cache), chunk, position)
                mx.eval([c.state for c in cache])
        if drafter is not None:
            drafter.end()

    def _run(self, job: Job, emit: Callable[[str, Any], None]) -> Result:
        import mlx.core as mx

        tic = time.perf_counter()
        ids = job.ids
        if job.cancel.is_set():
            return Result("", "cancelled", len(ids), 0, 0)
        cached, cache = (0, None) if self.prefix_cache is None else self.prefix_cache.lookup(ids)
        if cache is None:
            cache = self.model.make_cache()
        emit("start", cached)
        pos = cached
        for b in job.boundaries:
            if job.cancel.is_set():  # a long prompt: the client may leave before its first token
                return Result("", "cancelled", len(ids), cached, 0)
            if pos < b < len(ids):
                self._prefill(cache, ids[pos:b])
                pos = b
                if self.prefix_cache is not None:
                    self.prefix_cache.store(ids[:b], cache)

        rest = ids[pos:]
        processors = []
        if job.force_content:
            processors.append(ForceContent(job.force_content, len(rest), self.think_end if job.thinking else None))
        if job.thinking and job.think_budget is not None and self.think_end is not None:
            processors.append(ThinkBudget(job.think_budget, len(rest), self.think_end))
        if self.processors is not None:
            processors += self.processors(job, len(rest))
        markers = {self.think_start: encoding.THINK_START, self.think_end: encoding.THINK_END}
        text, emitted, tokens, finish, stop_seq, prefill_s = "", 0, [], "length", None, 0.0
        draft_stats = None
        responses = stream_generate(
            self.model, self.tokenizer, rest, max_tokens=job.max_tokens, temp=job.temp, top_p=job.top_p,
            top_k=job.top_k, min_p=job.min_p, seed=job.seed, prompt_cache=cache, max_context=self.ctx,
            prefill_step_size=self.prefill_step,
            logits_processors=processors or None, draft=self.draft, num_draft_tokens=self.num_draft_tokens,
        )
        try:
            for r in responses:
                if not tokens:
                    prefill_s = time.perf_counter() - tic
                tokens.append(r.token)
                draft_stats = r.draft_stats
                text += r.text
                if r.token in markers and r.finish_reason != "stop":
                    text += markers[r.token]
                content_at = self._content_start(text, job.thinking)
                hit = _find_stop(text, content_at, job.stop)
                if hit is not None:
                    at, stop_seq = hit
                    text, finish = text[:at], "stop_sequence"
                    break
                if r.finish_reason is not None:
                    finish = r.finish_reason
                    break
                if job.cancel.is_set():
                    finish = "cancelled"
                    break
                safe = len(text) - _held_back(text, content_at, job.stop)
                if safe > emitted:
                    emit("text", text[emitted:safe])
                    emitted = safe
        finally:
            responses.close()
        if len(text) > emitted:
            emit("text", text[emitted:])
        if self.prefix_cache is not None:
            held = int(cache[0].offset)
            if held <= len(ids) + len(tokens):
                mx.eval([c.state for c in cache])
                self.prefix_cache.store((ids + tokens)[:held], cache)
        return Result(text, finish, len(ids), cached, len(tokens), stop_seq, prefill_s, time.perf_counter() - tic,
                      draft_stats)

    @staticmethod
    def _content_start(text: str, thinking: bool) -> Optional[int]:
        """Where the answer begins in ``text`` (None while still reasoning)."""
        if not thinking:
            return 0
        end = text.find(encoding.THINK_END)
        return None if end < 0 else end + len(encoding.THINK_END)


def _find_stop(text: str, start: Optional[int], stops: list[str]) -> Optional[tuple[int, str]]:
    """The first stop string in the answer part of ``text``: ``(position, string)``."""
    if start is None or not stops:
        return None
    best = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def _held_back(text: str, start: Optional[int], stops: list[str]) -> int:
    """How many trailing characters might begin a stop string (not sent yet)."""
    if not stops:
        return 0
    if start is None:  # still reasoning: "</think>" may be arriving, after which stops apply
        return 0
    tail = text[start:]
    for n in range(min(len(tail), max(len(s) for s in stops) - 1), 0, -1):
        if any(s.startswith(tail[-n:]) for s in stops):
            return n
    return 0

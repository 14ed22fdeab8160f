"""The model worker: one thread runs every generation, in arrival order.

Routes hand a ``Job`` to ``Engine.submit`` and read its events from an asyncio queue. Only the
worker thread touches the model and decode states, so no two forwards ever share a state.
Concurrent requests are decoded together (up to ``max_batch``): each prompt is prefilled alone,
then every decode step runs one forward for all running requests, each at its own position
(``ds4mlx.state.BatchLayerCache``), and each samples from its own row; a seeded request or
speculative decoding runs alone (a shared random stream would not repeat its samples). The
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
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .. import encoding
from ..generate import (DEFAULT_MIN_P, DEFAULT_PREFILL_STEP, context_limit, make_sampling, stream_generate,
                        think_ids)
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
                 draft: Optional[str] = None, num_draft_tokens: int = 2, max_batch: int = 8) -> None:
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
        self.max_batch = max_batch  # requests decoded together
        self.most_together = 0  # the largest batch a decode step has run (for tests and logs)
        self._waiting: deque = deque()  # (job, emit) not started yet
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._closed = False
        self._stopping = False  # shutting down: every job is cancelled (see stop_jobs)
        self._running: list[Job] = []  # the jobs the worker runs now (close cancels them)
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
        for job in list(self._running):
            job.cancel.set()
        self._jobs.put(None)
        self._worker.join()

    @property
    def _cancelling_all(self) -> bool:
        """Closed or shutting down: every job the worker holds or takes from now on is cancelled."""
        return self._closed or self._stopping

    def stop_jobs(self) -> None:
        """Cancel every running, queued and later job without waiting (safe in a signal handler):
        a server shutting down ends its streams within a token instead of waiting them out."""
        self._stopping = True
        for job in list(self._running):
            job.cancel.set()
        self._jobs.put(())  # wakes an idle worker, which then cancels what is queued

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
        """The worker thread: jobs in arrival order; new ones join the running batch between
        decode steps. Once closed, every job left is cancelled (each ends within a step)."""
        try:
            active: list[_Live] = []
            open_ = True
            while open_ or self._waiting or active:
                if open_:
                    open_ = self._take_submitted(block=not (self._waiting or active))
                if self._cancelling_all:
                    for job in [live.job for live in active] + [job for job, _ in self._waiting]:
                        job.cancel.set()
                while self._waiting and len(active) < max(self.max_batch, 1):
                    job, emit = self._waiting[0]
                    alone = self.max_batch <= 1 or self.draft is not None or job.seed is not None
                    if alone and active:
                        break  # after the running batch
                    self._waiting.popleft()
                    self._running = [live.job for live in active] + [job]
                    if self._cancelling_all:  # after the line above: close() sees it or is seen
                        job.cancel.set()
                    if alone:
                        self._run_safely(job, emit)
                    else:
                        live = self._start(job, emit)
                        if live is not None:
                            active.append(live)
                if active:
                    self._running = [live.job for live in active]
                    self._decode_step(active)
                    active = [live for live in active if not live.done]
                self._running = [live.job for live in active]
        finally:
            release = getattr(self.model, "release_followers", None)  # a model split over mlx.launch
            if release is not None:
                release()
            _release_thread_state()

    def _take_submitted(self, block: bool) -> bool:
        """Move the submitted jobs to the waiting line, waiting for one if ``block``; False once
        the engine is closing (its sentinel came)."""
        while True:
            try:
                item = self._jobs.get(block=block)
            except queue.Empty:
                return True
            if item is None:
                return False
            if item:  # () only wakes the worker (stop_jobs)
                self._waiting.append(item)
            block = False

    def _start(self, job: Job, emit: Callable[[str, Any], None]) -> Optional["_Live"]:
        """Prefill ``job`` alone and sample its first token (not taken yet: the first batch step
        feeds it, then the job takes it); None if it is over already."""
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        try:
            live = self._begin(job, emit)
            if live is None:
                return None
            processors = self._processors(live)
            # the sampler and processors stream_generate makes from the same settings
            sampler, made = make_sampling(temp=job.temp, top_p=job.top_p, top_k=job.top_k, min_p=job.min_p)
            live.sampler, live.processors = sampler, processors or made
            live.responses = self._responses(live, processors, steps=self._steps(live))
            rest = live.rest
            if self.ctx is not None and len(job.ids) >= self.ctx or not rest:
                self._advance(live)  # stream_generate refuses it before any prefill
                return None if live.done else live
            if len(rest) > 1:
                self._prefill(live.cache, rest[:-1])
            live.history = mx.array(rest)
            with mx.stream(generation_stream):
                logits = self.model(mx.array([rest[-1:]]), live.cache)[:, -1]
                live.y, live.lp = self._sample(live, logits)
            mx.async_eval(live.y, live.lp)
            return live
        except Exception as e:
            self._fail(e, emit)
            return None

    @staticmethod
    def _sample(live: "_Live", logits):
        """mlx-lm's ``generate_step`` sampling: processors on the history, log-softmax, sampler."""
        import mlx.core as mx

        for p in live.processors:
            logits = p(live.history, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        return live.sampler(logprobs), logprobs

    @staticmethod
    def _steps(live: "_Live") -> Callable:
        """The (token, logprobs) source of one batched job: each time the job is advanced it
        takes the token the batch step just fed (sampled the step before)."""

        def steps(ids: list[int], sampler: Callable, processors: Optional[list]):
            while True:
                yield int(live.y.item()), live.lp[0]

        return steps

    def _decode_step(self, active: list["_Live"]) -> None:
        """One forward for every running job (each at its own position) with the tokens sampled
        the step before, the next tokens sampled lazily, then each job takes the fed token while
        the forward runs (mlx-lm's ``generate_step`` pipelines its steps the same way)."""
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        from ..state import BatchLayerCache

        try:
            caches = [BatchLayerCache([live.cache[i] for live in active]) for i in range(len(active[0].cache))]
            with mx.stream(generation_stream):
                inputs = mx.concatenate([live.y.reshape(1, 1).astype(mx.int32) for live in active])
                logits = self.model(inputs, caches)[:, -1]
                sampled = []
                for i, live in enumerate(active):
                    if live.processors:
                        live.history = mx.concatenate([live.history, live.y.reshape(-1).astype(live.history.dtype)])
                    sampled.append(self._sample(live, logits[i:i + 1]))
            mx.async_eval(sampled)
            self.most_together = max(self.most_together, len(active))
        except Exception as e:  # every running job gets the error; the worker keeps serving
            for live in active:
                live.done = True
                live.responses.close()
                self._fail(e, live.emit)
            return
        for live, nxt in zip(active, sampled):
            try:
                self._advance(live)
            except Exception as e:
                live.done = True
                self._fail(e, live.emit)
            live.y, live.lp = nxt

    def _fail(self, e: Exception, emit: Callable[[str, Any], None]) -> None:
        if not isinstance(e, ValueError):
            log.exception("generation failed")
        emit("error", e)

    def _run_safely(self, job: Job, emit: Callable[[str, Any], None]) -> None:
        """One job alone, start to end (mlx-lm's ``generate_step`` pipelines its steps)."""
        try:
            live = self._begin(job, emit)
            if live is not None:
                live.responses = self._responses(live, self._processors(live))
                while not live.done:
                    self._advance(live)
        except Exception as e:  # reported to the client; the worker keeps serving
            self._fail(e, emit)

    def _done(self, result: Result, emit: Callable[[str, Any], None]) -> None:
        self.last = result
        self.jobs_done += 1
        emit("done", result)
        if self.prefix_cache is not None:
            self.prefix_cache.flush()

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

    def _begin(self, job: Job, emit: Callable[[str, Any], None]) -> Optional["_Live"]:
        """The prefix cache's state and the prompt up to its last reuse point; None (and the
        job answered) if it was cancelled before it started."""
        ids = job.ids
        if job.cancel.is_set():
            self._done(Result("", "cancelled", len(ids), 0, 0), emit)
            return None
        live = _Live(job, emit, time.perf_counter())
        cached, cache = (0, None) if self.prefix_cache is None else self.prefix_cache.lookup(ids)
        if cache is None:
            cache = self.model.make_cache()
        live.cached, live.cache = cached, cache
        emit("start", cached)
        pos = cached
        for b in job.boundaries:
            if job.cancel.is_set():  # a long prompt: the client may leave before its first token
                self._done(Result("", "cancelled", len(ids), cached, 0), emit)
                return None
            if pos < b < len(ids):
                self._prefill(cache, ids[pos:b])
                pos = b
                if self.prefix_cache is not None:
                    self.prefix_cache.store(ids[:b], cache)
        live.rest = ids[pos:]
        return live

    def _processors(self, live: "_Live") -> list:
        job, rest = live.job, live.rest
        processors = []
        if job.force_content:
            processors.append(ForceContent(job.force_content, len(rest), self.think_end if job.thinking else None))
        if job.thinking and job.think_budget is not None and self.think_end is not None:
            processors.append(ThinkBudget(job.think_budget, len(rest), self.think_end))
        if self.processors is not None:
            processors += self.processors(job, len(rest))
        return processors

    def _responses(self, live: "_Live", processors: list, steps: Optional[Callable] = None):
        job, rest = live.job, live.rest
        return stream_generate(
            self.model, self.tokenizer, rest, max_tokens=job.max_tokens, temp=job.temp, top_p=job.top_p,
            top_k=job.top_k, min_p=job.min_p, seed=job.seed, prompt_cache=live.cache, max_context=self.ctx,
            prefill_step_size=self.prefill_step,
            logits_processors=processors or None, draft=None if steps is not None else self.draft,
            num_draft_tokens=self.num_draft_tokens, steps=steps,
        )

    def _advance(self, live: "_Live") -> None:
        """Take the job's next response: text out, or the end (stop, length, cancel)."""
        job = live.job
        markers = {self.think_start: encoding.THINK_START, self.think_end: encoding.THINK_END}
        try:
            r = next(live.responses)
        except StopIteration:
            r = None
        except BaseException:
            live.done = True
            live.responses.close()
            raise
        if r is not None:
            if not live.tokens:
                live.prefill_s = time.perf_counter() - live.tic
            live.tokens.append(r.token)
            live.draft_stats = r.draft_stats
            live.text += r.text
            if r.token in markers and r.finish_reason != "stop":
                live.text += markers[r.token]
            content_at = self._content_start(live.text, job.thinking)
            hit = _find_stop(live.text, content_at, job.stop)
            if hit is not None:
                at, live.stop_seq = hit
                live.text, live.finish = live.text[:at], "stop_sequence"
            elif r.finish_reason is not None:
                live.finish = r.finish_reason
            elif job.cancel.is_set():
                live.finish = "cancelled"
            else:
                safe = len(live.text) - _held_back(live.text, content_at, job.stop)
                if safe > live.emitted:
                    live.emit("text", live.text[live.emitted:safe])
                    live.emitted = safe
                return
        self._end(live)

    def _end(self, live: "_Live") -> None:
        import mlx.core as mx

        live.done = True
        live.responses.close()
        ids, tokens, cache = live.job.ids, live.tokens, live.cache
        if len(live.text) > live.emitted:
            live.emit("text", live.text[live.emitted:])
        if self.prefix_cache is not None:
            held = int(cache[0].offset)
            if held <= len(ids) + len(tokens):
                mx.eval([c.state for c in cache])
                self.prefix_cache.store((ids + tokens)[:held], cache)
        self._done(Result(live.text, live.finish, len(ids), live.cached, len(tokens), live.stop_seq,
                          live.prefill_s, time.perf_counter() - live.tic, live.draft_stats), live.emit)

    @staticmethod
    def _content_start(text: str, thinking: bool) -> Optional[int]:
        """Where the answer begins in ``text`` (None while still reasoning)."""
        if not thinking:
            return 0
        end = text.find(encoding.THINK_END)
        return None if end < 0 else end + len(encoding.THINK_END)


@dataclass
class _Live:
    """A job between its start and its end."""

    job: Job
    emit: Callable[[str, Any], None]
    tic: float
    cache: list = field(default_factory=list)
    cached: int = 0
    rest: list[int] = field(default_factory=list)
    responses: Any = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish: str = "length"
    stop_seq: Optional[str] = None
    prefill_s: float = 0.0
    draft_stats: Any = None
    sampler: Any = None
    processors: list = field(default_factory=list)
    history: Any = None  # the tokens the processors see (mlx-lm's generate_step: prompt rest + fed)
    y: Any = None  # the token the next batch step feeds (sampled, maybe not evaluated yet)
    lp: Any = None  # its log-probabilities
    done: bool = False


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

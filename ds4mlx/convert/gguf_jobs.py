"""The encode jobs of a GGUF conversion and the pool that runs them (``convert/gguf.py`` plans
them, ``write_files`` there writes what they give).

Every tensor is planned as picklable ``EncodeJob``s (one per expert, or per row chunk of a dense
tensor) that ``run_items`` hands to ``--jobs`` threads (worker processes for a numpy quantizer)
and collects in plan order: the file is byte-identical for any job count, and only a bounded
window of jobs is in flight, their source bytes asked for up to 64 MiB ahead of them.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from ..quant import gguf as gguf_quants
from ..quant.codecs import bf16_decode
from ..quant.formats import FLOAT, MXFP4, MXFP8, WeightFormat
from ..quant.gguf import floats as gguf_floats
from ..quant.gguf import mxfp4 as gguf_mxfp4
from .options import ConvertError
from .plan import (F16_NON_FINITE_MASK, BufferPool, Stored, count_bits, dequantize_stored, read_pair, read_stored,
                   row_span, will_need_rows)


# Output types cheap enough to produce in the writing process (no quantization search).
CHEAP_TYPES = ("I32", "F32", "F16", "BF16", "MXFP4")
# Items queued per job ahead of the writer: enough that the threads go on while the writer
# waits for the disk or checks a file (2 per job left them idle within 0.1 s: an expert takes
# ~20 ms), few enough that the finished chunks held stay a few dozen MB.
WINDOW_PER_JOB = 8
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


@dataclass(frozen=True)
class EncodeJob:
    """One output chunk: rows of one source weight in GGML type ``qtype``. Picklable, so a
    thread or a worker process can read, dequantize and quantize it on its own."""

    qtype: str
    fmt: WeightFormat  # the source's form: FLOAT | MXFP8 | MXFP4
    weight: Stored
    scale: Stored | None
    name: str  # official source name, for errors
    rows: tuple[int, int] | None = None  # all rows when None
    importance: np.ndarray | None = field(default=None, compare=False)  # imatrix row [n_in]

    @property
    def heavy(self) -> bool:
        return self.qtype not in CHEAP_TYPES


# Source reads go into reused buffers (fresh memory per read costs page faults and zeroing); the
# decoders copy out of them, so only the bytes returned as stored need a fresh array.
_POOL = BufferPool()
# Types whose output bytes go into the pool too (held until the writer has copied them out):
# fresh memory per chunk otherwise (the Q4_K outputs alone: 8k of a ds4-q4 conversion's 35k
# page faults, counted with perf).
POOLED_OUTPUT = ("F16", "Q8_0", "Q4_K", "Q2_K", "IQ2_XXS")


def encode(job: EncodeJob) -> np.ndarray:
    """The GGML bytes (or stored values) of one job; rows are independent, so chunks concatenate
    to the whole tensor's bytes."""
    if job.qtype == "MXFP4" and job.fmt == MXFP4:  # same codes and scale bytes, nibbles reordered
        codes, scales = read_pair(job.weight, job.scale, _POOL) if job.rows is None else \
            (read_stored(job.weight, job.rows, _POOL), read_stored(job.scale, job.rows, _POOL))
        return gguf_mxfp4.from_pairs(codes.view(np.uint8), scales)
    if job.fmt == FLOAT and job.qtype == job.weight.dtype and job.qtype in ("BF16", "F16", "F32"):
        return read_stored(job.weight, job.rows)  # as stored
    if job.fmt == FLOAT and job.weight.dtype == "BF16" and job.qtype == "F16":  # no float32 array between
        bits = read_stored(job.weight, job.rows, _POOL)
        out = _POOL.take(bits.nbytes).reshape(*bits.shape[:-1], 2 * bits.shape[-1])
        return _finite(job, gguf_quants.get("F16"), gguf_floats.f16_from_bf16(bits, out), lambda: bf16_decode(bits))
    values = dequantize_stored(job.fmt, job.weight, job.scale, job.name, job.rows, _POOL)
    if job.qtype == "BF16":
        return _exact_bf16(values, job.name)
    fmt = gguf_quants.get(job.qtype, job.name)
    return _finite(job, fmt, _quantize(job, fmt, values), lambda: values)


def _quantize(job: EncodeJob, fmt, values: np.ndarray) -> np.ndarray:
    importance = job.importance
    if importance is None and job.qtype == "IQ2_XXS":  # ds4's importance without an imatrix: Σ row² per column
        if job.rows is not None:
            raise ValueError(f"{job.name}: IQ2_XXS importance needs the whole matrix, not rows {job.rows}")
        squares = _POOL.take(values.nbytes).view(values.dtype).reshape(values.shape)  # (not a 4 MB temporary per expert)
        importance = np.sum(np.multiply(values, values, out=squares), axis=0)
        del squares  # free for the next job now, not after the quantizer's tens of ms
    kw = {} if importance is None else {"weights": importance}
    if job.qtype in POOLED_OUTPUT:  # bytes into a reused buffer
        row = gguf_quants.row_bytes(fmt, values.shape[-1], job.name)
        lead = values.shape[:-1]
        return fmt.quantize(values, out=_POOL.take(math.prod(lead) * row).reshape(*lead, row), **kw)
    return fmt.quantize(values, **kw)


def _finite(job: EncodeJob, fmt, packed: np.ndarray, values: Callable[[], np.ndarray]) -> np.ndarray:
    """``packed``, refused where a block's fp16 scale (or an F16 value) came out NaN or Inf: a
    finite source whose values the type cannot hold (fp16 tops out at 65504, so a K-quant's
    scale overflows past roughly 1e6), which would load as a damaged file or turn into NaN."""
    if fmt.NAME == "F16":
        bad = count_bits(np.ascontiguousarray(packed).view(np.uint16), F16_NON_FINITE_MASK)
    else:
        bad = gguf_quants.count_non_finite_scales(fmt, packed)
    if bad:
        top = float(np.max(np.abs(values())))
        what = "value" if job.qtype == "F16" else "block"
        raise ConvertError(f"{job.name}: {bad} {job.qtype} {what}{'s' * (bad > 1)} NaN or Inf from finite source values "
                           f"(largest |value| {top:.3g}, past what {job.qtype} holds); "
                           "this tensor needs a wider type")
    return packed


def _exact_bf16(values: np.ndarray, name: str) -> np.ndarray:
    u = np.ascontiguousarray(values, dtype="<f4").view(np.uint32)
    if not np.any(u & 0xFFFF):  # exact in BF16: the top halves are the BF16 bits (what rounding gives)
        return (u >> 16).astype("<u2").view(np.uint8).reshape(*values.shape[:-1], -1)
    bits = gguf_quants.BF16.quantize(values)
    back = bf16_decode(bits.view(np.uint16)).reshape(values.shape)
    if not np.array_equal(back, values):
        raise ConvertError(f"{name}: FP8 values are not exact in BF16 (scale out of range); use another preset")
    return bits


def run_item(item: EncodeJob | Callable[[], np.ndarray]) -> np.ndarray:
    return encode(item) if isinstance(item, EncodeJob) else item()


def _watch_parent(parent: int) -> None:
    """Worker initializer: leave Ctrl-C to the writing process (it stops the pool), and end
    with the parent, whatever kills it. A worker blocks on a queue whose write end it holds
    itself, so without this it would outlive a SIGKILLed parent (the out-of-memory killer's
    signal) forever, holding the caller's pipes open."""
    import signal
    import sys
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):  # the kernel kills us with the parent
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass

    def watch() -> None:  # macOS has no PDEATHSIG: poll (an orphan is re-parented)
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:  # the parent died while this worker started
        os._exit(1)
    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


class _SpawnQuietly:
    """SIGINT blocked while the pool and its workers are started: the mask is inherited through
    exec, so a worker cannot die of it with a traceback from its imports (they take a second);
    its initializer ignores SIGINT for good. The resource tracker is started first: starting it
    unblocks SIGINT (``multiprocessing`` blocks it around that spawn, then unblocks rather than
    restores). The block covers this thread only, and another thread may take the signal, so
    Python's handler is deferred too: a Ctrl-C then interrupts once the spawn is complete,
    never between a worker's start and the data it waits for."""

    def __enter__(self):
        import signal
        import threading
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        self.hit = None
        self.handler = signal.getsignal(signal.SIGINT)
        self.deferring = callable(self.handler) and threading.current_thread() is threading.main_thread()
        if self.deferring:
            signal.signal(signal.SIGINT, self._defer)
        self.previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        return self

    def _defer(self, signum, frame) -> None:
        self.hit = (signum, frame)

    def __exit__(self, *exc) -> None:
        import signal

        signal.pthread_sigmask(signal.SIG_SETMASK, self.previous)
        if self.deferring:
            signal.signal(signal.SIGINT, self.handler)
            if self.hit is not None:
                self.handler(*self.hit)


def _stop_pool(pool, finished: bool) -> None:
    """Shut the pool down: after the last item, waiting for the workers; on an error or an
    interruption at once, terminating running jobs (``concurrent.futures`` can only wait for them)."""
    if finished:
        pool.shutdown(wait=True)
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown forgets them
    calls, results = getattr(pool, "_call_queue", None), getattr(pool, "_result_queue", None)
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.terminate()
    for p in processes:
        p.join(5)
    # A worker ended while sending its result leaves part of a message in the result pipe; the
    # pool's manager thread then waits for the rest forever, and the interpreter's exit joins
    # that thread (a SIGTERMed convert hung so after "terminated"). The workers are gone, so
    # closing this process's own write end puts the pipe at EOF and the thread ends; likewise
    # the call queue's feeder must not be waited for (no worker reads that pipe any more).
    if calls is not None:
        calls.cancel_join_thread()
    writer = getattr(results, "_writer", None)
    if writer is not None and all(not p.is_alive() for p in processes):
        writer.close()


def run_items(items: Iterable[EncodeJob | Callable[[], np.ndarray]], jobs: int) -> Iterator[np.ndarray]:
    """Every item's array, in order. With ``jobs > 1`` the ``EncodeJob``s run on ``jobs``
    threads, queued at most ``WINDOW_PER_JOB * jobs`` items ahead of the writer, so memory stays bounded and
    the threads stay busy across tensor boundaries while this one writes: file reads, the
    whole-array numpy decodes and the compiled quantizers release the GIL. A type whose
    quantizer is the numpy recipe (no C compiler: many small numpy ops under the GIL, measured
    1.5x for Q4_K and 0.9x for IQ2_XXS on 2 threads) goes to ``jobs`` worker processes
    instead. Hash tables run here. The source bytes of a list's jobs are asked for ahead by the
    list (``_ReadAhead``); another iterable's as its items come."""
    if jobs <= 1:
        yield from map(run_item, items)
        return
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    window = WINDOW_PER_JOB * jobs
    pool = threads = None
    plan = [i for i in items if isinstance(i, EncodeJob)] if isinstance(items, (list, tuple)) else None
    advice = _ReadAhead(plan)  # on a thread of its own
    pending: deque = deque()
    threaded: dict[str, bool] = {}  # per type: whether its quantizer runs outside the GIL
    unset: list[str] = []

    def resolve(x):
        return x.result() if isinstance(x, Future) else run_item(x)

    finished = False
    try:
        for item in items:
            if isinstance(item, EncodeJob):  # the bytes of the jobs after it asked for meanwhile
                advice.queued(item)
            if isinstance(item, EncodeJob) and item.heavy:
                if item.qtype not in threaded:  # (builds and checks the compiled library here, once)
                    threaded[item.qtype] = gguf_quants.compiled(item.qtype)
            if isinstance(item, EncodeJob) and item.heavy and not threaded[item.qtype]:
                if pool is None:
                    pool, unset = _process_pool(jobs)
                with _SpawnQuietly():  # a submit may start processes
                    item = pool.submit(encode, item)
            elif isinstance(item, EncodeJob):
                if threads is None:
                    threads = ThreadPoolExecutor(jobs, thread_name_prefix="ds4mlx-encode")
                item = threads.submit(encode, item)
            pending.append(item)
            if len(pending) > window:
                yield resolve(pending.popleft())
        while pending:
            yield resolve(pending.popleft())
        finished = True
    finally:
        if threads is not None:
            threads.shutdown(wait=True, cancel_futures=True)
        if pool is not None:
            _stop_pool(pool, finished)
        for k in unset:
            os.environ.pop(k, None)
        advice.close()


READ_AHEAD_BYTES = 64 << 20  # source bytes asked for ahead of the jobs queued (page cache, not memory held)


class _ReadAhead:
    """Ask the system to read the jobs' source bytes into the page cache ahead of them: a job's
    reads are plain reads on its thread, which waited for the disk with the core idle. It goes
    by the plan, up to ``READ_AHEAD_BYTES`` past the last job queued (the window alone, a few MB
    ahead, left a 0.8 GB conversion from a cold source waiting 2.3 s on reads on its threads),
    on a thread of its own: ``posix_fadvise`` queues the reads itself and waits while the disk's
    queue is full (0.57 s of a 3.5 s conversion on the thread that hands out the jobs)."""

    def __init__(self, plan: list[EncodeJob] | None) -> None:
        """``plan``: the jobs to come, in order; None: only those queued (advised as they are)."""
        import threading

        self._known = plan is not None
        self._jobs = list(plan or ())
        self._ends = [0]  # source bytes before each job (a plan's summed on the thread, not here)
        self._queued = 0  # jobs handed out so far (by the caller)
        self._over = False
        self._moved = threading.Condition()
        self._fds: dict = {}  # source files open for the advice
        self._thread = threading.Thread(target=self._run, name="ds4mlx-read-ahead", daemon=True)
        self._thread.start()

    def queued(self, job: EncodeJob) -> None:
        """``job`` handed out (the next of the plan, in order)."""
        with self._moved:
            if not self._known:
                self._jobs.append(job)
                self._ends.append(self._ends[-1] + _source_bytes(job))
            self._queued += 1
            self._moved.notify()

    def _run(self) -> None:
        if self._known:
            self._ends += itertools.accumulate(_source_bytes(j) for j in self._jobs)
        given, ends = 0, self._ends  # jobs advised so far

        def more() -> bool:  # a job left, and the bytes advised past the queued ones under the limit
            return given < len(self._jobs) and ends[given] - ends[min(self._queued, given)] < READ_AHEAD_BYTES

        while True:
            with self._moved:
                self._moved.wait_for(lambda: self._over or more())
                if self._over:
                    return
                if self._known:  # the plan's jobs handed out already read for themselves
                    given = max(given, self._queued)
            if given >= len(self._jobs):
                continue  # (waits for close)
            job = self._jobs[given]
            try:
                will_need_rows(job.weight, job.rows, self._fds)
                if job.scale is not None:
                    will_need_rows(job.scale, None, self._fds)  # (small: whole)
            except OSError:  # advice only; the job's own read reports a real problem
                pass
            given += 1

    def close(self) -> None:
        """Stop (the advice not given yet is dropped: after an error nothing more is read)."""
        with self._moved:
            self._over = True
            self._moved.notify()
        self._thread.join()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _source_bytes(job: EncodeJob) -> int:
    return row_span(job.weight, job.rows)[1] + (row_span(job.scale, None)[1] if job.scale is not None else 0)


def _process_pool(jobs: int):
    """``jobs`` spawned worker processes (forking a process that holds MLX/Metal state is
    unsafe), and the BLAS thread variables set for them (to unset after)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Workers inherit the environment when spawned (on demand, during the run): unless the user
    # set them, cap each one's BLAS threads to its share of the cores, or the IQ2_XXS search's
    # matmuls (multithreaded BLAS) oversubscribe the cores and the pool runs slower than one job.
    unset = [k for k in BLAS_THREAD_VARS if k not in os.environ]
    os.environ.update({k: str(max(1, (os.cpu_count() or 1) // jobs)) for k in unset})
    with _SpawnQuietly():  # creating the pool may start processes
        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_watch_parent, initargs=(os.getpid(),))
    return pool, unset


def _warm_up(items: list) -> None:
    """Build and check the compiled kernels the plan uses on a thread of their own, in plan order:
    each is checked against numpy at its first use (Q4_K's check takes 30-500 ms), which held
    the writing thread, or a worker with every other worker waiting on the lock, while the
    cores idled. A kernel still being checked when needed is waited for (one check each)."""
    import threading

    kinds, decoders = [], False
    for item in items:
        if isinstance(item, EncodeJob):
            decoders = decoders or item.fmt in (MXFP4, MXFP8)
            if item.heavy and item.qtype not in kinds:
                kinds.append(item.qtype)

    def run() -> None:
        try:
            if decoders:  # FP4 and FP8 share a library, checked at its first call
                from ..quant.mx import dequant_fp4_np

                dequant_fp4_np(np.zeros((1, 16), np.uint8), np.zeros((1, 1), np.uint8))
            for kind in kinds:
                gguf_quants.compiled(kind)
        except Exception:  # the first use builds and checks again, and reports
            pass

    threading.Thread(target=run, name="ds4mlx-warm-up", daemon=True).start()

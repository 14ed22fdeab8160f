"""The output side of a conversion: path checks, disk space, progress."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .options import ConvertError, OutputExistsError

PARTIAL_SUFFIX = ".partial"


LOCK_SUFFIX = ".lock"


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: reading a checkpoint's headers and planning make
    objects by the tens of thousands (a real model: several per tensor), none of them in a
    cycle, and the collections that allocation set off (a full one among them) took ~25 ms of
    a 2 GB conversion's start-up, before the first byte was written; they run later instead,
    while the main thread waits for the disk."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


class PartialLock:
    """Ownership of ``OUTPUT.partial``: an exclusive ``flock`` on ``OUTPUT.partial.lock`` (which
    holds the owner's pid), held for the whole conversion. The kernel drops it when the owner
    dies, however it dies, so a ``.partial`` whose lock is free was left by a killed run."""

    def __init__(self, partial: Path):
        self.path = partial.with_name(partial.name + LOCK_SUFFIX)
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputExistsError(
                    f"{self.path.with_suffix('')}: another conversion (process {owner}) is writing it; "
                    "wait for it to finish or stop it") from None
            try:  # the file we locked must still be the one at the path (not one a finishing owner removed)
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting run then retries on a new file
            os.close(self.fd)
            self.fd = None


def check_output(source: Path, output: Path, *, resume: bool, is_dir: bool) -> tuple[Path, PartialLock]:
    """Refuse outputs that exist or sit inside the source, claim the partial path; return it
    and its lock (the caller releases it). A partial file left by a killed GGUF run is
    replaced; a partial MLX directory is continued with ``resume`` or refused."""
    src, out = source.resolve(), output.resolve()
    if out == src or src in out.parents:
        raise ConvertError(f"{output}: the output may not be inside the source directory {source} (the source is left untouched)")
    if output.exists() or output.is_symlink():
        if not output.is_dir() or any(output.iterdir()):
            raise OutputExistsError(f"{output}: output already exists and is not an empty directory; choose another path or remove it")
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + PARTIAL_SUFFIX)
    lock = PartialLock(partial)
    lock.acquire()
    try:
        if partial.exists() and not resume:
            if is_dir or not partial.is_file():
                raise OutputExistsError(f"{partial}: left by an interrupted conversion; pass --resume to continue it, "
                                        "or delete it")
            print(f"note: removing {partial}, left by an interrupted conversion", file=sys.stderr)
            partial.unlink()
    except BaseException:
        lock.release()
        raise
    return partial, lock


def publish(partial: Path, output: Path) -> Path:
    """Move the finished ``partial`` into place (replacing the empty directory ``check_output``
    allowed there) in one rename, so ``output`` is never half-written."""
    if output.is_dir():
        output.rmdir()
    os.replace(partial, output)
    return output


def check_free_space(where: Path, needed: int) -> None:
    free = shutil.disk_usage(where).free
    if needed > free:
        raise ConvertError(
            f"{where}: not enough disk space for the output: {needed / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free"
        )


def disk_full_error(exc: OSError, target: Path) -> ConvertError | None:
    """The error to report for ``exc`` raised while writing ``target`` when the file system ran
    out of room (a write error carries no file name of its own), else None."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConvertError(f"{target}: disk full while writing the output ({exc.strerror or exc})")
    if exc.errno == errno.EFBIG:
        return ConvertError(f"{target}: the output outgrew the largest file allowed here (file system or "
                            f"ulimit -f) ({exc.strerror or exc})")
    return None


class Progress:
    """Bytes written, rate and ETA (tqdm when available and wanted)."""

    def __init__(self, total: int, done: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                                desc=desc, dynamic_ncols=True, smoothing=0.05)
            except ImportError:
                pass

    def track(self, chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for c in chunks:
            yield c
            if self.bar is not None:
                self.bar.update(c.nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_ahead(chunks: Iterable[np.ndarray], depth: int = 2) -> Iterator[np.ndarray]:
    """``chunks`` produced on a thread, up to ``depth`` ahead of the consumer: reading and
    converting the next tensor overlaps writing this one (file reads, writes, CRCs and numpy
    release the GIL), so the slower side sets the pace. The producer's errors are raised here."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def run() -> None:
        try:
            for c in chunks:
                if not put((c, None)):
                    return
            put((end, None))
        except BaseException as e:  # handed to the consumer
            put((end, e))

    thread = threading.Thread(target=run, name="convert-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            c, err = q.get()
            if c is end:
                if err is not None:
                    raise err
                return
            yield c
    finally:
        stop.set()
        thread.join()

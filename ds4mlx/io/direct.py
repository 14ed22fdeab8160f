"""Bulk file I/O for conversions, past the page cache: a direct output file and whole-file scans.

Written through the page cache the usual way (write everything, fsync at the end) a conversion
leaves the disk idle until the kernel's dirty limits are reached, waits for all of it at the end,
and every byte takes a fresh cache page (on a VM with free-page reporting a host fault per page).
Measured on this project's Linux VM: 0.20-0.30 GB/s that way, 2.2 GB/s with ``O_DIRECT`` from a
few reused buffers. ``DirectWriter`` stages the output in page-aligned 8 MiB buffers that a
thread writes directly (two in one write where both are staged), so the disk is busy from the
first byte and memory stays flat; ``scan`` reads a file in order the same way (the verification
re-reads what the disk holds, not the cache); ``read_back`` compares each written piece with the
disk's copy on the writer's thread;
``compare`` compares each piece, as handed to the disk, with the caller's own arrays (``expect``).
Where ``O_DIRECT`` is missing (macOS) or refused (tmpfs, some network file systems), both fall
back to ordinary buffered I/O: the same bytes, only slower.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

ALIGN = 4096  # offsets, lengths and addresses of direct transfers: a multiple of any block size
BUFFER_BYTES = 8 << 20  # one staging buffer: the unit of staging, hand-over and checks
BUFFERS = 4  # staged output at most (memory stays at BUFFERS * BUFFER_BYTES)
# buffers in one transfer at most: those staged side by side (one ring in memory) go to the
# disk in one write, so more of the disk's requests are in flight at once than an 8 MiB write
# has (2 of its 4 MiB requests); half the ring, so the other half is filled and checked meanwhile
WRITE_BUFFERS = 2
COMPARE_BYTES = 1 << 20  # a piece of the compare's second read of a source (stays in the cache)
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_PREADV = hasattr(os, "preadv")


def _open(path: str | os.PathLike, flags: int) -> tuple[int, bool]:
    """An fd for ``path``, with ``O_DIRECT`` when the file system takes it; and whether it has."""
    if _O_DIRECT:
        try:
            return os.open(path, flags | _O_DIRECT, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:  # tmpfs and the like refuse the flag
                raise
    return os.open(path, flags, 0o644), False


def _drop_direct(fd: int) -> None:
    """Turn ``O_DIRECT`` off on an fd (a file system that took the flag but not a transfer)."""
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)


def aligned_empty(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """An uninitialised uint8 array of ``nbytes`` whose address is a multiple of ``align``."""
    raw = np.empty(nbytes + align, np.uint8)
    skip = -raw.ctypes.data % align
    return raw[skip: skip + nbytes]


_HUGE = 2 << 20  # a transparent huge page (x86-64, arm64 with 4 KiB pages)


def staging_buffer(count: int = 1) -> np.ndarray:
    """``count`` ``BUFFER_BYTES`` uint8 buffers side by side, on huge-page boundaries (numpy asks
    for transparent huge pages on large arrays where the system has them): an ``O_DIRECT``
    transfer pins its pages and a read fills them, per 4 KiB page otherwise (measured: the
    pinning alone was 5 % of a conversion's CPU from a RAM source)."""
    return aligned_empty(count * BUFFER_BYTES, max(ALIGN, _HUGE if BUFFER_BYTES >= _HUGE else ALIGN))


class StagingPool:
    """A writer's ring and read-back buffer (by size) handed to the next ``DirectWriter`` (a
    conversion's files in turn): a second file's fresh 40 MiB cost 60-140 ms of page zeroing."""

    def __init__(self) -> None:
        self._held: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, count: int = 1) -> np.ndarray:
        """``staging_buffer(count)``, one given back before where there is one."""
        with self._lock:
            for i, buf in enumerate(self._held):
                if len(buf) == count * BUFFER_BYTES:
                    return self._held.pop(i)
        return staging_buffer(count)

    def give(self, buf: np.ndarray) -> None:
        with self._lock:
            self._held.append(buf)

    def __len__(self) -> int:
        return len(self._held)


def _read_full(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` from ``offset`` until it is full or the file ends; the bytes read."""
    done = 0
    while done < len(view):
        if _PREADV:
            n = os.preadv(fd, [view[done:]], offset + done)
        else:  # no preadv (older macOS): the fd is this reader's own
            os.lseek(fd, offset + done, os.SEEK_SET)
            n = os.readv(fd, [view[done:]])
        if n == 0:
            break
        done += n
    return done


def open_read(path: str | os.PathLike) -> tuple[int, bool]:
    """A read fd for :func:`scan` (direct where possible), and whether it is direct."""
    return _open(path, os.O_RDONLY)


def scan(path: str | os.PathLike, chunk_bytes: int = BUFFER_BYTES, *, opened: tuple[int, bool] | None = None,
         ready: Callable[[int], None] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """The whole file as ``(offset, uint8 chunk)`` in order, read directly where possible into
    two reused buffers (each chunk is valid until the next one is taken). ``opened``: an fd from
    :func:`open_read` to read and close instead of opening ``path``; ``ready(end)`` is called
    before reading up to ``end`` (to follow a file while it is written)."""
    fd, direct = opened or open_read(path)
    try:
        bufs = [aligned_empty(chunk_bytes), aligned_empty(chunk_bytes)]
        offset, k = 0, 0
        while True:
            buf = bufs[k % 2]
            if ready is not None:
                ready(offset + chunk_bytes)
            try:
                n = _read_full(fd, memoryview(buf), offset)
            except OSError as e:
                if not direct or e.errno != errno.EINVAL:
                    raise
                _drop_direct(fd)
                direct = False
                continue
            if n:
                yield offset, buf[:n]
            if n < chunk_bytes:
                return
            offset += n
            k += 1
    finally:
        os.close(fd)


def _libc_memcmp():
    """libc's ``memcmp`` through ctypes (the call releases the GIL), or None where there is none."""
    try:
        f = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError, TypeError):
        return None
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int
    return f


_MEMCMP = _libc_memcmp()


def first_difference(a, b) -> int:
    """The first index at which two equally long byte buffers differ, or -1 when they are equal:
    one ``memcmp`` (memory speed, no temporaries, off the GIL), numpy only to find the index."""
    x, y = np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)
    if len(x) != len(y):
        raise ValueError(f"buffers of {len(x)} and {len(y)} bytes")
    if not len(x):
        return -1
    if _MEMCMP is not None:
        if _MEMCMP(x.ctypes.data, y.ctypes.data, len(x)) == 0:
            return -1
    elif np.array_equal(x, y):
        return -1
    return int(np.flatnonzero(x != y)[0])


class ReadBackError(OSError):
    """The bytes at ``offset`` (the first that differs) are not those that were meant: read back
    from the disk, or (``what``) as handed to it."""

    def __init__(self, offset: int, what: str = "read back differ from those written"):
        super().__init__(errno.EIO, f"bytes at offset {offset} {what}")
        self.offset = offset


@dataclass(frozen=True)
class SourceRange:
    """Bytes of another file that go into the output as they are: ``DirectWriter.write_from``
    reads them straight into its staging buffers (no copy through a buffer of the caller's)."""

    path: str | os.PathLike
    offset: int
    nbytes: int
    name: str = ""  # what they are, for messages (a tensor's name)
    # called with each part of the bytes as staged, in order (a uint8 array valid during the
    # call only), before that part can reach the disk: a check of what was read (raising stops
    # the write; the output is then unusable)
    inspect: Callable[[np.ndarray], None] | None = None

    def __len__(self) -> int:  # bytes of output, as for a buffer
        return self.nbytes


class SourceRanges(tuple):
    """Several ``SourceRange``s handed on as one chunk: one hand-over between threads for a
    group of small ranges (a projection's experts are ~0.5 MB each) instead of one per range."""

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self)


class SourceEnded(ValueError):
    """The file of a ``SourceRange`` ends before the range does."""

    def __init__(self, src: SourceRange):
        super().__init__(f"{src.path}: file ends inside {src.name or 'the bytes to copy'!r}")
        self.source = src


class DirectWriter:
    """A write-only binary file for one long sequential write: ``write`` copies into page-aligned
    staging buffers that a thread writes to disk (directly where possible) while the caller goes
    on. ``flush`` writes what is staged, the unaligned tail included, after which the file is
    complete and takes no more writes; ``close`` flushes and closes. A write error on the thread
    is raised by the next ``write``, ``flush`` or ``close``. ``wait_written`` lets a reader
    follow the file as it reaches the disk; ``on_written(offset, bytes)`` sees each piece, in
    order, as it was handed to the disk. ``read_back``: the thread reads each piece back from
    the disk (past the cache where possible) once written and compares it with the staged
    bytes; a difference is a ``ReadBackError`` (one comparison of the two copies, no checksum).
    ``compare``: the caller also hands over, with :meth:`expect` and in file order before the
    bytes themselves, the arrays the file must hold; the thread compares each piece, once handed
    to the disk, with them (``memcmp``) and lets them go. What that catches: any byte of a piece
    that is not the caller's (a staging copy, an offset, a lost or repeated chunk, whatever
    altered the bytes on their way in) and a caller's array changed before its bytes reached the
    disk (a read buffer taken again too early); a difference is a ``ReadBackError``. It holds
    the arrays until their bytes are written (``BUFFERS`` pieces behind the caller at most).
    ``write_from`` reads a ``SourceRange`` of another file straight into the staging buffers
    (the one copy of those bytes on their way to the disk); with ``compare`` the thread then
    compares what it wrote with the source file itself, read again into a buffer of its own
    (apart from the read that staged them): what ``expect`` catches for the caller's arrays, a
    staged byte that is not the source's (an offset, a read cut short, a range lost or repeated,
    a staging buffer taken again too early), it catches for the source's bytes. ``staging``: a
    ``StagingPool`` the ring and read-back buffer come from and go back to once the file is done
    with them (from ``flush`` on), for the next writer."""

    def __init__(self, path: str | os.PathLike, on_written: Callable[[int, memoryview], None] | None = None,
                 *, read_back: bool = False, compare: bool = False, staging: StagingPool | None = None):
        self.name = str(path)
        self._on_written = on_written  # (offset, bytes) of each piece once written, on the thread
        self._expected: collections.deque | None = collections.deque() if compare else None
        self._expected_head = 0  # bytes of the first expected array already compared (thread)
        self._expected_bytes = 0  # bytes handed to expect (caller)
        self._sources: dict[str, int] = {}  # the thread's fds of the files write_from reads (compare)
        self._read_fds: dict[str, int] = {}  # the caller's fds of those files (write_from)
        self._scratch: np.ndarray | None = None  # the thread's second read of them (compare)
        self._fd, self._direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self._verify = None  # (fd, direct, buffer) of the read-back
        if read_back:
            try:
                fd, direct = open_read(path)
            except BaseException:
                os.close(self._fd)
                raise
            self._verify = [fd, direct, None]  # (its buffer taken at the first read-back)
        self._staging = staging if staging is not None else StagingPool()  # (a pool of its own: dropped with it)
        self._free: queue.Queue = queue.Queue()
        # reused (no fresh pages per write), one ring in memory: taken and given back in order,
        # consecutive pieces of the file are side by side and go to the disk in one write (its
        # pages are touched as the writes first need them: a small file touches one buffer's)
        self._ring = self._staging.take(BUFFERS)
        for k in range(BUFFERS):
            self._free.put(self._ring[k * BUFFER_BYTES: (k + 1) * BUFFER_BYTES])
        self._todo: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._buf: np.ndarray | None = None
        self._fill = 0  # bytes staged in _buf
        self._offset = 0  # file offset of _buf
        self._done = False
        self.finished = False  # flushed whole and cut to size
        self._on_disk = 0  # bytes from the start known written (the tail counts once the file is finished)
        self._over = False  # finished or given up: no more bytes will come
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="direct-writer", daemon=True)
        # the checks of a written piece (compare, read_back, on_written) on a thread of their
        # own, so the disk is not idle while they run (one thread did both: the writes waited)
        self._checks: queue.Queue | None = None
        self._checker: threading.Thread | None = None
        if compare or read_back or on_written is not None:
            self._checks = queue.Queue()
            self._checker = threading.Thread(target=self._run_checks, name="direct-check", daemon=True)
            self._checker.start()
        self._thread.start()

    # --- the disk side (thread) ---

    def _batch(self, item: tuple) -> tuple[list[tuple], tuple | None | bool]:
        """``item`` and the pieces already staged after it that continue it, in the file and in
        the ring, ``WRITE_BUFFERS`` at most (none is waited for); and the item taken that does not
        continue them (``None``: the end), or ``False`` where none was."""
        batch = [item]
        while item[1] == BUFFER_BYTES and len(batch) < WRITE_BUFFERS:
            try:
                nxt = self._todo.get_nowait()
            except queue.Empty:
                break
            if nxt is None or nxt[3] != item[3] + item[1] or nxt[0].ctypes.data != item[0].ctypes.data + item[1]:
                return batch, nxt
            batch.append(nxt)
            item = nxt
        return batch, False

    def _run(self) -> None:
        ahead = False  # an item taken from the queue that starts the next batch (None: the end)
        while True:
            item = self._todo.get() if ahead is False else ahead
            if item is None:
                if self._checks is not None:
                    self._checks.put(None)
                return
            batch, ahead = self._batch(item)
            handed = 0
            try:
                if self._error is None:
                    first, last = batch[0], batch[-1]
                    start = first[0].ctypes.data - self._ring.ctypes.data
                    end = last[0].ctypes.data - self._ring.ctypes.data + last[1]
                    self._pwrite(memoryview(self._ring)[start:end], first[3])
                    for piece in batch:
                        if self._checks is not None:  # the next pieces go to the disk meanwhile
                            self._checks.put(piece)
                        else:
                            self._written(*piece)
                            self._free.put(piece[0])
                        handed += 1
            except BaseException as e:  # handed to the writer's caller
                self._error = e
            finally:
                for piece in batch[handed:]:
                    self._free.put(piece[0])

    def _run_checks(self) -> None:
        while True:
            item = self._checks.get()
            if item is None:
                return
            try:
                if self._error is None:
                    self._written(*item)
            except BaseException as e:  # handed to the writer's caller
                self._error = e
            finally:
                self._free.put(item[0])

    def _written(self, buf, length: int, real: int, offset: int) -> None:
        """What follows a piece's write, in file order: its checks, ``on_written``, progress."""
        if self._expected is not None:
            self._compare(memoryview(buf)[:real], offset)
        if self._verify is not None:
            self._read_back(memoryview(buf)[:length], offset)
        if self._on_written is not None:
            self._on_written(offset, memoryview(buf)[:real])
        if length == BUFFER_BYTES:  # a padded tail is not the file's yet (cut at flush)
            self._advance(offset + length, False)

    def _pwrite(self, view: memoryview, offset: int) -> None:
        while len(view):
            try:
                n = os.pwrite(self._fd, view, offset)
            except OSError as e:
                if not self._direct or e.errno != errno.EINVAL:
                    raise
                _drop_direct(self._fd)
                self._direct = False
                continue
            view, offset = view[n:], offset + n

    def _read_back(self, staged: memoryview, offset: int) -> None:
        fd, direct, buf = self._verify
        if buf is None:
            buf = self._verify[2] = self._staging.take()
        view = memoryview(buf)[:len(staged)]
        while True:
            try:
                n = _read_full(fd, view, offset)
                break
            except OSError as e:
                if not direct or e.errno != errno.EINVAL:
                    raise
                _drop_direct(fd)
                self._verify[1] = direct = False
        # memcmp: no 8 MiB boolean temporaries (fresh pages) per piece, and off the GIL
        at = first_difference(staged[:n], view[:n])
        if at >= 0 or n != len(staged):
            raise ReadBackError(offset + (at if at >= 0 else n))

    def _compare(self, staged: memoryview, offset: int) -> None:
        """``staged`` (written at ``offset``) against the expected arrays it holds, in order."""
        done, todo = 0, self._expected
        while done < len(staged):
            if not todo:
                raise ReadBackError(offset + done, "were written but never expected")
            head = todo[0]
            size = head.nbytes if isinstance(head, SourceRange) else len(head)
            take = min(size - self._expected_head, len(staged) - done)
            if isinstance(head, SourceRange):
                at = self._compare_source(staged[done: done + take], head, self._expected_head)
                if at >= 0:
                    raise ReadBackError(offset + done + at, f"handed to the disk differ from {head.path}'s")
            else:
                at = first_difference(staged[done: done + take], head[self._expected_head: self._expected_head + take])
                if at >= 0:
                    raise ReadBackError(offset + done + at, "handed to the disk differ from the caller's")
            done += take
            self._expected_head += take
            if self._expected_head == size:
                todo.popleft()  # its bytes are all written: the caller's array may go
                self._expected_head = 0

    def _compare_source(self, staged: memoryview, src: SourceRange, skip: int) -> int:
        """``staged`` against the bytes of ``src`` from ``skip`` on, read again from the file
        into a reused buffer of the thread's (a second read, apart from the one that staged them:
        mapping the file instead cost more, its page tables one 4 KiB page at a time), a
        ``COMPARE_BYTES`` piece at a time: a piece stays in the cache between its read and its
        comparison (measured 0.19 against 0.25 CPU-s/GB in whole 8 MiB reads)."""
        key = os.fspath(src.path)
        fd = self._sources.get(key)
        if fd is None:
            fd = self._sources[key] = os.open(key, os.O_RDONLY)
        if self._scratch is None:
            self._scratch = aligned_empty(COMPARE_BYTES)
        piece = memoryview(self._scratch)
        staged_u8 = np.frombuffer(staged, np.uint8)
        done = 0
        while done < len(staged):
            n = min(COMPARE_BYTES, len(staged) - done)
            got = _read_full(fd, piece[:n], src.offset + skip + done)
            if got < n:
                return done + got
            at = first_difference(staged_u8[done: done + n], self._scratch[:n])
            if at >= 0:
                return done + at
            done += n
        return -1

    def _advance(self, on_disk: int, over: bool) -> None:
        with self._progress:
            self._on_disk = max(self._on_disk, on_disk)
            self._over = self._over or over
            self._progress.notify_all()

    def wait_written(self, end: int) -> None:
        """Block until the first ``end`` bytes are on disk, or the file is finished or given up."""
        with self._progress:
            self._progress.wait_for(lambda: self._on_disk >= end or self._over)

    # --- the caller's side ---

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _hand_over(self, length: int) -> None:
        self._todo.put((self._buf, length, self._fill, self._offset))
        self._offset += self._fill
        self._buf, self._fill = None, 0

    def tell(self) -> int:
        return self._offset + self._fill

    def expect(self, data) -> None:
        """(``compare``) the next ``len(data)`` bytes to be written must equal ``data``, as it
        is when they reach the disk; call before writing them, keep ``data`` unchanged."""
        view = memoryview(data).cast("B")
        if self._expected is None:
            raise ValueError(f"{self.name}: expect needs DirectWriter(compare=True)")
        if len(view):
            self._expected.append(view)
            self._expected_bytes += len(view)

    def write(self, data) -> int:
        self._check()
        if self._done:
            raise ValueError(f"{self.name}: write after the file was completed")
        view = memoryview(data).cast("B")
        n = len(view)
        while len(view):
            if self._buf is None:
                self._buf = self._free.get()
                self._check()
            take = min(len(view), BUFFER_BYTES - self._fill)
            self._buf[self._fill: self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == BUFFER_BYTES:
                self._hand_over(BUFFER_BYTES)
        return n

    def write_from(self, src: SourceRange) -> int:
        """Write ``src``'s bytes, read from its file straight into the staging buffers; returns
        ``src.nbytes``. A file that ends first raises ``SourceEnded`` (the output is then
        unusable: discard it). With ``compare`` the thread compares them, once written, with
        the source file (no ``expect`` for them)."""
        self._check()
        if self._done:
            raise ValueError(f"{self.name}: write after the file was completed")
        key = os.fspath(src.path)
        if key not in self._read_fds:
            self._read_fds[key] = os.open(key, os.O_RDONLY)
        fd = self._read_fds[key]
        if self._expected is not None and src.nbytes:
            self._expected.append(src)
            self._expected_bytes += src.nbytes
        done = 0
        while done < src.nbytes:
            if self._buf is None:
                self._buf = self._free.get()
                self._check()
            take = min(src.nbytes - done, BUFFER_BYTES - self._fill)
            got = _read_full(fd, memoryview(self._buf)[self._fill: self._fill + take], src.offset + done)
            if got < take:
                raise SourceEnded(src)
            if src.inspect is not None:
                src.inspect(self._buf[self._fill: self._fill + got])
            self._fill += got
            done += got
            if self._fill == BUFFER_BYTES:
                self._hand_over(BUFFER_BYTES)
        return done

    def flush(self) -> None:
        """Write everything staged and wait for it: the file is then whole (and complete)."""
        if not self._done:
            self._done = True
            size = self.tell()
            if self._buf is not None and self._fill:
                # a direct write covers whole blocks: pad the tail, then cut the file back to size
                padded = -(-self._fill // ALIGN) * ALIGN if self._direct else self._fill
                self._buf[self._fill: padded] = 0
                self._hand_over(padded)
            self._todo.put(None)
            self._join()
            self._give_back()
            self._check()
            if self._expected is not None and self._expected_bytes != size:  # the thread compared all it wrote
                self._error = ReadBackError(size, f"end the file, {self._expected_bytes} bytes were expected")
                self._check()
            os.ftruncate(self._fd, size)
            self.finished = True
            self._advance(size, True)
        self._check()

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        """Flush and close (on an error the fd is closed all the same and the error raised)."""
        if self._fd < 0:
            return
        try:
            self.flush()
        finally:
            self.discard()

    def _join(self) -> None:
        self._thread.join()
        if self._checker is not None:
            self._checker.join()

    def _give_back(self) -> None:
        """(the threads stopped) the ring and the read-back buffer, to the pool's next writer."""
        if self._ring is not None:
            self._staging.give(self._ring)
            self._ring = self._buf = None
            if self._verify is not None and self._verify[2] is not None:
                self._staging.give(self._verify[2])
                self._verify[2] = None

    def discard(self) -> None:
        """Stop without writing what is staged and close (the caller removes the file)."""
        self._done = True
        if self._thread.is_alive():
            self._error = self._error or OSError(errno.ECANCELED, f"{self.name}: write abandoned")
            self._todo.put(None)
        self._join()
        self._give_back()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._verify is not None:
            os.close(self._verify[0])
            self._verify = None
        for fds in (self._sources, self._read_fds):
            while fds:
                os.close(fds.popitem()[1])
        self._advance(0, True)

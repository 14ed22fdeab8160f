"""Bounded waits between the ranks of a split model: ``DistributedError`` when a peer's
connection is lost, and a watchdog that ends the process when a wait lasts too long."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional


class DistributedError(RuntimeError):
    """Another rank failed, left, or did not answer in time (the message says which rank saw it)."""


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class Watchdog:
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

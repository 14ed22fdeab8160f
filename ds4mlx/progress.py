"""Progress lines on a terminal: bytes loaded and prefill tokens, each with its rate and ETA.

One line on stderr, redrawn in place at most ten times a second, wiped when done (the load
leaves one summary line). Nothing is drawn when stderr is not a terminal, so logs and pipes
get no carriage returns. tqdm (which huggingface_hub already brings) would draw bars too, but
its bytes and tokens units and "ETA" wording differ from the rest of the CLI's output.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

_REDRAW_S = 0.1


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def clock_time(seconds: float) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05``."""
    s = int(round(max(0.0, seconds)))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class ProgressLine:
    """``line(done, total)`` redraws ``LABEL done / total (p%), rate, ETA m:ss``; ``finish()``
    wipes it and returns the elapsed seconds. ``unit`` formats amounts (bytes or tokens)."""

    def __init__(self, label: str, *, unit: Callable[[float], str], rate_unit: Callable[[float], str],
                 suffix: str = "", stream: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic):
        self.label, self.unit, self.rate_unit, self.suffix = label, unit, rate_unit, suffix
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self.start = clock()
        self.last_draw: Optional[float] = None
        self.drawn = False

    def text(self, done: float, total: float) -> str:
        elapsed = self.clock() - self.start
        line = f"{self.label} {self.unit(done)} / {self.unit(total)}{self.suffix}"
        if total > 0:
            line += f" ({100 * done / total:.0f}%)"
        if elapsed > 0 and done > 0:
            rate = done / elapsed
            line += f", {self.rate_unit(rate)}"
            if done < total:
                line += f", ETA {clock_time((total - done) / rate)}"
        return line

    def __call__(self, done: float, total: float) -> None:
        now = self.clock()
        if self.last_draw is not None and now - self.last_draw < _REDRAW_S and done < total:
            return
        self.last_draw = now
        self.stream.write("\r\x1b[K" + self.text(done, total))
        self.stream.flush()
        self.drawn = True

    def finish(self, summary: Optional[str] = None) -> float:
        elapsed = self.clock() - self.start
        if self.drawn or summary is not None:
            self.stream.write("\r\x1b[K" + (summary + "\n" if summary else ""))
            self.stream.flush()
        return elapsed


def is_terminal(stream: Optional[TextIO] = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class LoadProgress:
    """Bytes of weights read, as ``load(..., progress=...)`` reports them; ``finish()`` leaves
    ``Loaded LABEL: SIZE in TIME (RATE)``."""

    def __init__(self, label: str, stream: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic):
        self.line = ProgressLine(f"Loading {label}:", unit=human_bytes,
                                 rate_unit=lambda r: f"{human_bytes(r)}/s", stream=stream, clock=clock)
        self.label, self.total = label, 0

    def __call__(self, done: int, total: int) -> None:
        self.total = total
        self.line(done, total)

    def finish(self) -> None:
        elapsed = self.line.clock() - self.line.start
        rate = f" ({human_bytes(self.total / elapsed)}/s)" if elapsed > 0 else ""
        self.line.finish(f"Loaded {self.label}: {human_bytes(self.total)} in {elapsed:.1f} s{rate}")


class PrefillProgress:
    """``prompt_progress_callback`` for long prompts: tokens prefilled, tokens/s and ETA; wiped
    when the prefill ends (the statistics line reports it)."""

    def __init__(self, min_tokens: int = 4096, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.min_tokens = min_tokens
        self.stream, self.clock = stream, clock
        self.line: Optional[ProgressLine] = None

    def __call__(self, done: int, total: int) -> None:
        if total < self.min_tokens:
            return
        if self.line is None or done == 0:
            self.line = ProgressLine("prefill", unit=lambda n: f"{n:.0f}", suffix=" tokens",
                                     rate_unit=lambda r: f"{r:.0f} tokens/s", stream=self.stream, clock=self.clock)
        if done >= total:
            self.line.finish()
            self.line = None
        else:
            self.line(done, total)

"""Terminal manners of the CLI: the chat prompt (line editing, history, Ctrl-C), ``NO_COLOR``,
and a closed output pipe.

* ``ChatPrompt``: ``input()`` with readline's line editing and a history kept between sessions
  (``$DS4MLX_CACHE/chat_history``, 1000 lines); Ctrl-C at the prompt clears the line and only a
  second Ctrl-C in a row leaves, as in Python's REPL.
* ``use_color(stream)``: escape sequences only on a terminal and without ``NO_COLOR``
  (https://no-color.org: set and not empty).
* ``silence_stdout()``: after ``| head`` closed the pipe, send what is left to /dev/null so the
  interpreter's final flush does not print an error either.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, TextIO

HISTORY_LINES = 1000
LEAVE_HINT = "(Ctrl-C again, Ctrl-D or /quit leaves)"


def use_color(stream: Optional[TextIO] = None) -> bool:
    stream = sys.stderr if stream is None else stream
    if os.environ.get("NO_COLOR", ""):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def history_path() -> Path:
    """In ds4mlx's cache directory (where the demo model lives)."""
    root = os.environ.get("DS4MLX_CACHE") or Path.home() / ".cache" / "ds4mlx"
    return Path(root) / "chat_history"


class ChatPrompt:
    """Reads chat lines from a terminal. ``read()`` returns the line, or None to leave
    (Ctrl-D, or Ctrl-C twice in a row)."""

    def __init__(self, prompt: str = ">> ", history: Optional[Path] = None, status=None):
        self.prompt = prompt
        self.status = status or (lambda message: print(message, file=sys.stderr, flush=True))
        self.history = history_path() if history is None else history
        self.readline = None
        try:
            import readline  # line editing and up-arrow history for input()
        except ImportError:  # e.g. a Python built without it: plain input() still works
            return
        self.readline = readline
        readline.set_history_length(HISTORY_LINES)
        try:
            readline.read_history_file(self.history)
        except (OSError, UnicodeDecodeError):
            pass  # no history yet, or an unreadable one: start empty

    def read(self) -> Optional[str]:
        interrupted = False
        while True:
            try:
                line = input(self.prompt)
            except EOFError:
                print(file=sys.stderr)
                return None
            except KeyboardInterrupt:
                print(file=sys.stderr)
                if interrupted:
                    return None
                interrupted = True
                self.status(LEAVE_HINT)
                continue
            return line

    def save(self) -> None:
        if self.readline is None:
            return
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(self.history)
        except OSError:
            pass  # a read-only cache only loses the history


def silence_stdout() -> None:
    """Point stdout at /dev/null (its reader has gone), so nothing more fails on it."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass

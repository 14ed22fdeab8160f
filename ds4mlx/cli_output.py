"""What the CLI writes besides the answer, and how it streams answers.

* ``Output`` / ``set_output``: how much goes to stderr (``--quiet``: errors only; ``--verbose``:
  also ``detail`` lines); ``status`` for the normal lines.
* ``Printer``: answer text to stdout, reasoning to stderr (dimmed on a terminal unless
  ``NO_COLOR``); control bytes a model emits are escaped on a terminal.
* ``GracefulInterrupt`` and ``stream_responses``: the first Ctrl-C ends an answer after the
  current token, a second one interrupts at once.
* ``fail`` / ``show_warning``: errors and warnings as one line; ``pipe_safe``: a closed output
  pipe (``| head``) as ``OutputClosed``, which the CLI ends with status 0.
"""

from __future__ import annotations

import re
import signal
import sys
import threading


class UsageProblem(ValueError):
    """Flags that cannot work together, or a missing input."""


class Output:
    """How much goes to stderr: ``quiet`` (errors only), normal, or ``verbose``."""

    quiet = False
    verbose = False


def set_output(verbose: bool, quiet: bool) -> None:
    if verbose and quiet:
        raise UsageProblem("--verbose and --quiet cannot be combined")
    Output.verbose, Output.quiet = verbose, quiet
    if quiet:
        try:  # Hub downloads draw tqdm bars of their own
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except ImportError:
            pass


def status(message: str) -> None:
    if not Output.quiet:
        print(message, file=sys.stderr, flush=True)


def detail(message: str) -> None:
    if Output.verbose:
        print(message, file=sys.stderr, flush=True)


def show_prompt(tokenizer, ids) -> None:
    """--verbose: the prompt exactly as the model reads it (chat format included)."""
    if Output.verbose:
        text = ids if isinstance(ids, str) else tokenizer.decode(ids)
        n = "" if isinstance(ids, str) else f" ({len(ids)} tokens)"
        detail(f"prompt{n}:\n{text}\n---")


def prefill_progress():
    """A progress line for long prefills on a terminal (None elsewhere)."""
    from .progress import PrefillProgress, is_terminal

    return PrefillProgress() if not Output.quiet and is_terminal() else None


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class Printer:
    """Answer text to stdout, reasoning to stderr (dimmed on a terminal)."""

    def __init__(self) -> None:
        from .terminal import use_color

        self.reasoning = False
        self.tty_out, self.tty_err = sys.stdout.isatty(), sys.stderr.isatty()
        self.dim = use_color(sys.stderr)  # NO_COLOR: the plain markers, as off a terminal

    @staticmethod
    def _clean(text: str, tty: bool) -> str:
        # a model can emit raw control bytes; on a terminal they would be escape sequences
        return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text) if tty else text

    def write(self, text: str, reasoning: bool) -> None:
        if reasoning and Output.quiet:
            return  # --quiet: the answer only
        if reasoning and not self.reasoning:
            self._start_reasoning()
        elif self.reasoning and not reasoning:
            self.end_reasoning()
        if not text:
            return
        stream, tty = (sys.stderr, self.tty_err) if reasoning else (sys.stdout, self.tty_out)
        stream.write(self._clean(text, tty))
        stream.flush()

    def _start_reasoning(self) -> None:
        self.reasoning = True
        sys.stderr.write("\x1b[2m" if self.dim else "[reasoning]\n")

    def end_reasoning(self) -> None:
        if self.reasoning:
            self.reasoning = False
            sys.stderr.write("\x1b[0m\n" if self.dim else "\n[/reasoning]\n")
            sys.stderr.flush()


_pending_interrupt = [False]


def interrupt(signum, frame) -> None:
    """SIGINT as KeyboardInterrupt, remembered: one raised while a finalizer (``__del__``) runs
    is reported and dropped by Python, and the command would run on as if nothing happened;
    the next checkpoint (``raise_pending_interrupt``) raises it again."""
    _pending_interrupt[0] = True
    raise KeyboardInterrupt


def quiet_dropped_interrupts(unraisable) -> None:
    """``sys.unraisablehook``: a KeyboardInterrupt that a finalizer dropped is not reported
    (Python would print it with a traceback); :func:`interrupt` remembered it. Everything
    else goes to Python's own hook."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        return
    sys.__unraisablehook__(unraisable)


def forget_interrupts() -> None:
    _pending_interrupt[0] = False


def raise_pending_interrupt() -> None:
    if _pending_interrupt[0]:
        raise KeyboardInterrupt


class GracefulInterrupt:
    """First Ctrl-C asks the generation loop to stop after the current token; a second one
    interrupts at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.hit = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __enter__(self) -> "GracefulInterrupt":
        raise_pending_interrupt()  # a Ctrl-C while loading that a finalizer swallowed
        self.hit = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def stream_responses(responses, printer: Printer, interrupt: GracefulInterrupt) -> tuple[object, str, str]:
    """Print responses until done or interrupted: (last response or None, reasoning, answer)."""
    last, parts = None, {True: "", False: ""}
    try:
        for last in responses:
            printer.write(last.text, last.reasoning)
            parts[last.reasoning] += last.text
            if interrupt.hit:
                break
    finally:
        printer.end_reasoning()
    return last, parts[True], parts[False]


# ----------------------------------------------------------------------------- errors and pipes


def one_line(message) -> str:
    return " ".join(str(message).split())


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (ours or a library's) as one line, without Python's file and source line."""
    print(f"ds4mlx: warning: {one_line(message)}", file=sys.stderr, flush=True)


def fail(message: str, code: int = 1) -> int:
    message = one_line(message)  # one line, whatever the exception held
    print(f"ds4mlx: error: {message}", file=sys.stderr, flush=True)
    return code


def is_usage_error(e: BaseException) -> bool:
    # click's UsageError family (typer vendors its own click since 0.22: match by shape)
    return hasattr(e, "format_message") and hasattr(e, "exit_code")


class OutputClosed(Exception):
    """stdout's reader went away (``| head``)."""


def pipe_safe(callback):
    """``callback`` with a closed output pipe turned into ``OutputClosed`` (typer would answer
    a BrokenPipeError with exit status 1)."""
    import functools

    if callback is None or getattr(callback, "_pipe_safe", False):
        return callback

    @functools.wraps(callback)
    def run(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except BrokenPipeError:
            raise OutputClosed from None

    run._pipe_safe = True
    return run

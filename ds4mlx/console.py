"""The ``ds4mlx`` console entry point: quiet on Ctrl-C from its first line.

Importing the CLI (typer; MLX and the rest inside the commands) takes a noticeable fraction of a
second, and a Ctrl-C during an import would print a traceback from the import machinery. Until
``cli.main`` is running (it calls ``restore_interrupts`` back, which makes SIGINT a
KeyboardInterrupt, on which the commands' cleanup relies), SIGINT ends the process at once with
status 130, as a shell reports an interrupted command. Nothing needs cleaning up that early.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional


def _quit_early(signum, frame) -> None:
    os.write(2, b"\n")
    os._exit(130)


class Terminated(SystemExit):
    """SIGTERM (``kill``, a job controller) as an exception, so the running command cleans up
    (a conversion removes its ``.partial`` output, worker processes stop) and the process
    exits with 143, as a shell reports a terminated command."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated(128 + signal.SIGTERM)


def restore_interrupts() -> None:
    """SIGINT as a KeyboardInterrupt again, if the early handler is still installed: through
    ``cli_output.interrupt``, which remembers one that a finalizer (``__del__``) dropped."""
    if signal.getsignal(signal.SIGINT) is _quit_early:
        from .cli_output import interrupt, quiet_dropped_interrupts

        sys.unraisablehook = quiet_dropped_interrupts
        signal.signal(signal.SIGINT, interrupt)


def _keep_torch_out() -> None:
    """Nothing in ds4mlx runs PyTorch, but transformers (which mlx-lm's tokenizer module imports)
    imports it whenever it is installed: about 2 s more at start and 1 s at exit per command. A
    ``None`` entry in ``sys.modules`` is how Python marks a module as absent, and transformers
    then treats torch as not installed. Only the command's own process: the Python API leaves
    the caller's modules alone."""
    if "torch" not in sys.modules:
        sys.modules["torch"] = None


def main(argv: Optional[list[str]] = None) -> int:
    """Console-script entry point; returns the exit status."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored by the caller
        signal.signal(signal.SIGINT, _quit_early)
    if _run_as_command():
        _keep_torch_out()
    from .cli import main as cli_main

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return cli_main(argv, ready=restore_interrupts)
    except Terminated as e:
        print("ds4mlx: terminated", file=sys.stderr, flush=True)
        return e.code


def _run_as_command() -> bool:
    # the console script, ``python -m ds4mlx`` or ``python -m ds4mlx.console`` (their __main__
    # is in the package), not a test or program calling main() in its own process
    main_module = sys.modules.get("__main__")
    return getattr(main_module, "__package__", None) == "ds4mlx" or os.path.basename(
        sys.argv[0] if sys.argv else "") == "ds4mlx"


if __name__ == "__main__":
    sys.exit(main())

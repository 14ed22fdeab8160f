"""``ds4mlx chat`` on a real pseudo-terminal (the demo model in a child process): readline line
editing and history, Ctrl-C at the prompt, dimmed reasoning and NO_COLOR; and both commands
exiting quietly with status 0 when the reader of their output goes away (``| head``)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds4mlx.terminal import LEAVE_HINT

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120


def child_env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TERM="xterm", INPUTRC="/dev/null")
    env.pop("NO_COLOR", None)
    env.update(extra)
    return env


class Terminal:
    """``python -m ds4mlx ARGS`` with a pseudo-terminal as its controlling terminal."""

    def __init__(self, args, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its stdin, stdout and stderr are the terminal
            try:
                os.execve(sys.executable, [sys.executable, "-m", "ds4mlx", *args], env)
            finally:
                os._exit(127)
        self.seen = b""

    def expect(self, text: str, count: int = 1) -> None:
        """Read until ``text`` has appeared ``count`` times in all the output so far."""
        want = text.encode()
        deadline = time.monotonic() + TIMEOUT
        while self.seen.count(want) < count:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"no {text!r} (x{count}) within {TIMEOUT} s; output: {self.seen[-3000:]!r}")
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the child ended before {text!r} (x{count}); output: {self.seen[-3000:]!r}")
            self.seen += chunk

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def interrupt(self) -> None:
        """Ctrl-C once the child waits for a key. Its prompt is written just before readline's
        select(): a SIGINT landing in between is only noticed with the next key (Python checks
        signals when select is interrupted), so wait until the child sleeps in it (Linux /proc;
        elsewhere a pause)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                wchan = Path(f"/proc/{self.pid}/wchan").read_text()
                state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                wchan = state = ""
            if wchan in ("", "0"):  # no /proc, or its wait channels hidden
                time.sleep(0.5)
                break
            if state == "S" and ("select" in wchan or "poll" in wchan):
                break
            time.sleep(0.01)
        self.send("\x03")

    def wait(self) -> int:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:  # keep draining, so the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.seen += os.read(self.fd, 65536)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"the chat did not end; output: {self.seen[-3000:]!r}")


CHAT = ["chat", "--model", "demo", "--temp", "0", "--max-tokens", "3"]


def test_chat_line_editing_history_and_ctrl_c(demo_dir):
    cache = Path(os.environ["DS4MLX_CACHE"])
    history = cache / "chat_history"
    history.unlink(missing_ok=True)
    term = Terminal(CHAT, child_env())
    term.expect(">> ")
    term.send("hello\r")  # thinking is on: the reasoning is dimmed on a terminal
    term.expect("[prompt ")
    assert b"\x1b[2m" in term.seen
    term.expect(">> ", 2)
    term.send("/nothnk\x1b[D\x1b[Di\r")  # typed with a typo, fixed with the left arrow
    term.expect("[thinking off]")
    term.expect(">> ", 3)
    term.send("/think\r")
    term.expect("[thinking on]")
    term.expect(">> ", 4)
    term.send("\x1b[A\x1b[A\r")  # up arrow twice: the edited line from history
    term.expect("[thinking off]", 2)
    term.expect(">> ", 5)
    term.interrupt()  # Ctrl-C at the prompt: a hint, not the end
    term.expect(LEAVE_HINT)
    term.expect(">> ", 6)
    term.send("/think\r")  # anything else in between: the next Ctrl-C is a first one again
    term.expect("[thinking on]", 2)
    term.expect(">> ", 7)
    term.interrupt()
    term.expect(LEAVE_HINT, 2)
    term.expect(">> ", 8)  # back at the prompt
    term.interrupt()
    assert term.wait() == 0
    out = term.seen.decode("utf-8", "replace")
    assert "Traceback" not in out and "Warning" not in out
    # the history outlives the session, one line per entry
    assert history.read_text().splitlines() == ["hello", "/nothink", "/think", "/nothink", "/think"]


@pytest.mark.slow
def test_chat_no_color(demo_dir):
    term = Terminal(CHAT, child_env(NO_COLOR="1"))
    term.expect(">> ")
    term.send("hello\r")
    term.expect("[prompt ")
    term.expect(">> ", 2)  # readline reads again: a Ctrl-D typed before that would be lost
    term.send("\x04")  # Ctrl-D leaves
    assert term.wait() == 0
    assert b"[reasoning]" in term.seen and b"\x1b[2m" not in term.seen and b"\x1b[0m" not in term.seen


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_closed_output_pipe_exits_quietly(demo_dir, command):
    args = [sys.executable, "-m", "ds4mlx", command, "-m", "demo", "--no-think", "--temp", "0", "-n", "300"]
    if command == "generate":
        args += ["-p", "Hello"]
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=child_env())
    if command == "chat":
        p.stdin.write(b"Hello\n")
    p.stdin.close()
    assert p.stdout.read(1)  # like `| head -c 1`: read a little, then go away
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=TIMEOUT) == 0, err
    assert "tokens/s" not in err  # it really stopped at the closed pipe, before its statistics
    assert "Error" not in err and "Traceback" not in err and "error" not in err

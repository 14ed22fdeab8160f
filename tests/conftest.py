"""Shared fixtures, built once per test session: tiny official-format checkpoints and the demo model."""

from __future__ import annotations

import os

import mlx.core as mx
import pytest

from ds4mlx import kernels
from ds4mlx.synthetic import make_4expert, write_tiny_checkpoint

# The tests compare kernels with their ops twins themselves; the first-use check would switch a
# broken kernel off and hide it (tests of the check turn it back on).
os.environ["DS4MLX_KERNEL_CHECK"] = "off"
# Emulated launches start their threadgroups shuffled: a kernel must not depend on their order.
os.environ.setdefault("DS4MLX_EMU_GROUPS", "shuffled")


@pytest.fixture(autouse=True)
def _kernel_backend():
    """Every test starts and ends with the backend the environment chooses (``kernels`` picks
    it once; tests that switch call ``kernels.set_backend``)."""
    kernels.set_backend()
    yield
    kernels.set_backend()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The tiny test profile (top-6, MTP, 3 shards) from seed 0; treat as read-only."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt_4expert(tiny_ckpt, tmp_path_factory):
    """``tiny_ckpt`` rewritten as its 4Expert variant (k = 4, tid2eid cut to 4 columns)."""
    return make_4expert(tiny_ckpt, tmp_path_factory.mktemp("ckpt4") / "tiny-4expert", k=4)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo model, built once into a session cache that ``--model demo`` also finds
    (``DS4MLX_CACHE`` points there for the session)."""
    cache = tmp_path_factory.getbasetemp() / "ds4mlx-cache"
    old = os.environ.get("DS4MLX_CACHE")
    os.environ["DS4MLX_CACHE"] = str(cache)
    from ds4mlx.demo import demo_path

    yield demo_path()
    if old is None:
        os.environ.pop("DS4MLX_CACHE", None)
    else:
        os.environ["DS4MLX_CACHE"] = old


@pytest.fixture(scope="session")
def demo(demo_dir):
    """``(model, tokenizer)`` of the demo model in float32."""
    from ds4mlx import load

    return load(demo_dir, dtype=mx.float32)


# A checkpoint whose seams come early (window 8, top-k 4, ratio 4 and 128 in three layers), and
# its MLX-dir and GGUF conversions: the batched and speculative decodes cross them all.
SEAMS = dict(num_layers=3, compress_ratios=[0, 4, 128, 0], num_hash_layers=1, sliding_window=8,
             index_topk=4)


@pytest.fixture(scope="session")
def seams_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("seams") / "tiny", seed=3, **SEAMS)


@pytest.fixture(scope="session")
def seams_sources(seams_ckpt, tmp_path_factory):
    """Load source -> the seams checkpoint in it (official dir, MLX dir, ds4-q4 GGUF)."""
    from ds4mlx.convert import convert

    d = tmp_path_factory.mktemp("seams-converted")
    return {
        "official": seams_ckpt,
        "mlx": convert(seams_ckpt, d / "mlx", progress=False),
        "gguf": convert(seams_ckpt, d / "tiny.gguf", to="gguf", preset="ds4-q4", progress=False,
                        jobs=1),
    }


def _leftovers() -> list[str]:
    """Threads and child processes still running once every test and fixture has finished."""
    import sys
    import threading
    import traceback

    frames = sys._current_frames()
    found = []
    for t in threading.enumerate():
        if t is threading.main_thread():
            continue
        stack = "".join(traceback.format_stack(frames[t.ident])[-4:]) if t.ident in frames else ""
        found.append(f"thread {t.name!r} (daemon={t.daemon}):\n{stack}")
    try:
        kids = (f"/proc/self/task/{task}/children" for task in os.listdir("/proc/self/task"))
        for pid in {p for path in kids for p in open(path).read().split()}:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            if "multiprocessing.resource_tracker" not in cmd:  # ends with this process
                found.append(f"process {pid}: {cmd[:200]}")
    except OSError:
        pass
    return found


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    """The suite must leave nothing running: a thread still alive here is joined (or left in
    native code) while the interpreter finalizes, and a child process can hold CI's pipes."""
    _EXIT_STATUS.append(int(exitstatus))
    left = _leftovers()
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        write = reporter.write_line if reporter else print
        write(f"still running after the last test ({len(left)}):")
        for item in left:
            write("  " + item)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with the session's status once pytest is done, without the interpreter's
    finalization: after ~1000 tests it holds threads of MLX, uvicorn and the converters, whose
    native destructors can block there. The exit paths users meet (serve, convert, chat, the
    launcher) are each tested in a process of their own."""
    if _EXIT_STATUS and os.environ.get("DS4MLX_TEST_FINALIZE") != "1":
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])

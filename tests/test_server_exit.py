"""The server's model thread ends cleanly: no abort at interpreter exit.

MLX keeps per-thread state holding Python objects (compiled-function cache, random key). If a
thread that ran the model leaves it to its native TLS destructors, they take the GIL after
``join`` has returned; when the interpreter is finalizing by then, the process aborts with
"terminate called without an active exception" (``ds4mlx serve`` exited -6 now and then). The
subprocess below makes that race certain: the worker's exit lingers in a native destructor
until the main thread is inside finalization.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import asyncio, ctypes, sys, time
    import mlx.core as mx
    from ds4mlx import load
    from ds4mlx.server.engine import Engine, Job

    libc = ctypes.CDLL(None)
    thread_atexit = libc.__cxa_thread_atexit_impl  # glibc: what C++ thread_local destructors use

    class LingerAtExit:
        # a logits processor (it runs on the model thread, after the forward's compiled ops):
        # registers a native TLS destructor after MLX's, so it runs first and delays them

        def __init__(self):
            self.done = False

        def __call__(self, history, logits):
            if not self.done:
                sleep = ctypes.cast(libc.sleep, ctypes.c_void_p)
                thread_atexit(sleep, ctypes.c_void_p(1), sleep)  # sleep(1); owner libc
                self.done = True
            return logits

    class SlowFinalization:
        def __del__(self):
            time.sleep(2)  # called while the interpreter finalizes, GIL released

    model, tok = load(sys.argv[1], dtype=mx.float32)
    engine = Engine(model, tok, processors=lambda job, passed: [LingerAtExit()])

    async def run():
        events = engine.submit(Job([0, 20, 21, 22], max_tokens=2, temp=0.7, seed=1))
        while (kind := (await events.get())[0]) not in ("done", "error"):
            pass
        return kind

    assert asyncio.run(run()) == "done"
    engine.close()
    slow = SlowFinalization()
    print("closed", flush=True)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses glibc's __cxa_thread_atexit_impl")
def test_engine_thread_exit_survives_interpreter_finalization(demo_dir):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(demo_dir)], capture_output=True, text=True,
                          timeout=300)
    assert "closed" in proc.stdout, proc.stderr
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr

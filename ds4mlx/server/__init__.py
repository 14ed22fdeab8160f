"""``ds4mlx serve``: OpenAI and Anthropic APIs over one model, with a prefix cache.

``build_app`` assembles engine, prefix cache and routes; ``serve`` runs them on uvicorn;
``BackgroundServer`` runs an app on 127.0.0.1 and an ephemeral port in a thread (tests, benchmarks).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Optional

DEFAULT_CACHE_BYTES = 8 << 30
DEFAULT_DISK_BYTES = 32 << 30


def build_app(model: Any, tokenizer: Any, *, model_id: str = "ds4mlx", ctx: Optional[int] = None,
              cache_bytes: int = DEFAULT_CACHE_BYTES, cache_dir: Optional[str | os.PathLike] = None,
              disk_bytes: int = DEFAULT_DISK_BYTES, processors: Optional[Callable] = None,
              default_max_tokens: int = 4096, draft: Optional[str] = None, num_draft_tokens: int = 2,
              max_batch: int = 8):
    """The Starlette app serving ``model``; ``cache_bytes=0`` turns the prefix cache off;
    ``draft="mtp"`` decodes speculatively with the model's MTP block (loaded with ``mtp=True``);
    up to ``max_batch`` requests decode together (1: one at a time, in arrival order)."""
    from .app import create_app
    from .engine import Engine
    from .prefix_cache import PrefixCache, model_fingerprint

    cache = None
    if cache_bytes > 0 or cache_dir is not None:
        split = hasattr(model, "save_state")  # ds4mlx.distributed: each rank keeps its own layers' files
        cache = PrefixCache(cache_bytes, directory=cache_dir, max_disk_bytes=disk_bytes,
                            fingerprint=model_fingerprint(model), layout=[c.ratio for c in model.make_cache()],
                            **({"files": model} if split else {}))
    engine = Engine(model, tokenizer, ctx=ctx, prefix_cache=cache, processors=processors,
                    default_max_tokens=default_max_tokens, draft=draft, num_draft_tokens=num_draft_tokens,
                    max_batch=max_batch)
    return create_app(engine, model_id)


def serve(model_path: str, *, host: str = "127.0.0.1", port: int = 8080, ctx: Optional[int] = None,
          cache_dir: Optional[Path] = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
          disk_bytes: int = DEFAULT_DISK_BYTES, experts_per_token: Optional[int] = None,
          default_max_tokens: int = 4096, log_level: str = "info", draft: Optional[str] = None,
          num_draft_tokens: int = 2, mtp_path: Optional[Path] = None, max_batch: int = 8,
          layers_split: Optional[str] = None) -> None:
    """Load and serve until stopped. Under ``mlx.launch`` the model is split by layers
    (``ds4mlx.distributed``): rank 0 serves and the other ranks run the forwards it announces."""
    import uvicorn

    from .. import distributed
    from ..loader import load
    from .common import STREAM_GRACE_S

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    split = distributed.launched()
    load_model = functools.partial(distributed.load, layers_split=layers_split) if split else load
    model, tokenizer = load_model(model_path, experts_per_token=experts_per_token, mtp=draft == "mtp",
                                  mtp_path=mtp_path)
    if split and not distributed.is_output_rank():
        model.follow()
        return
    if split:
        model.lead()
    try:
        if tokenizer is None:
            raise FileNotFoundError(f"{model_path}: no usable tokenizer (the server needs one)")
        app = build_app(model, tokenizer, model_id=Path(str(model_path)).name or str(model_path), ctx=ctx,
                        cache_bytes=cache_bytes, cache_dir=cache_dir, disk_bytes=disk_bytes,
                        default_max_tokens=default_max_tokens, draft=draft, num_draft_tokens=num_draft_tokens,
                        max_batch=max_batch)
        engine = app.state.engine

        class _StoppingServer(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                # SIGTERM or Ctrl-C also cancels the jobs: open streams end within a token, the
                # shutdown does not wait them out (then cancel them mid-response)
                super().handle_exit(sig, frame)
                engine.stop_jobs()

        logging.getLogger("ds4mlx.server").info(
            "context %d tokens; up to %d request%s decoded together%s", engine.ctx, max_batch, "s" * (max_batch > 1),
            f"; speculative ({draft}, {num_draft_tokens} draft tokens)" if draft else "")
        try:
            server = _StoppingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=STREAM_GRACE_S + 1))
            try:
                server.run()
            except KeyboardInterrupt:  # Ctrl-C, raised again once uvicorn has shut down: a clean stop
                pass
            if not server.started:  # the port was taken, say (uvicorn logged why)
                raise SystemExit(3)
        finally:
            engine.close()
    finally:
        if split:
            model.release_followers()  # the engine's worker did, unless the server never started


class BackgroundServer:
    """Serve ``app`` on 127.0.0.1 at an ephemeral port from a daemon thread; ``stop`` (or leaving
    the ``with`` block) shuts it down and waits for it."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="off")
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # not the main thread
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        daemon=True, name="ds4mlx-server")

    def start(self) -> "BackgroundServer":
        self._thread.start()
        for _ in range(500):
            if self._server.started:
                return self
            if not self._thread.is_alive():
                raise RuntimeError("the server thread stopped while starting")
            self._thread.join(0.01)
        raise RuntimeError("the server did not start within 5 s")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()
        self.app.state.engine.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

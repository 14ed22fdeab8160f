"""Fixtures for tests that run the built-in demo model (imported by test_generate/test_cli)."""

from __future__ import annotations

import os

import mlx.core as mx
import pytest


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

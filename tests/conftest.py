"""Shared fixtures: tiny official-format checkpoints, written once per test session."""

from __future__ import annotations

import pytest

from ds4mlx.synthetic import make_4expert, write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The tiny test profile (top-6, MTP, 3 shards) from seed 0; treat as read-only."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt_4expert(tiny_ckpt, tmp_path_factory):
    """``tiny_ckpt`` rewritten as its 4Expert variant (k = 4, tid2eid cut to 4 columns)."""
    return make_4expert(tiny_ckpt, tmp_path_factory.mktemp("ckpt4") / "tiny-4expert", k=4)

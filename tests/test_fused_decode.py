"""The model's decode path through the fused attention and indexer kernels (emulated) against
the ops path: the same logits, token by token and a few tokens per call, across the window,
the indexer's top-k and the ratio-128 seams."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import ds4mlx
from ds4mlx import kernels
from ds4mlx.kernels import emu as kernel_emu

pytestmark = pytest.mark.skipif(kernel_emu.compiler() is None,
                                reason="no C++ compiler for the emulator")


def run_split(model, toks: np.ndarray, sizes) -> np.ndarray:
    cache = model.make_cache()
    outs, i = [], 0
    for n in sizes:
        outs.append(np.array(model(mx.array(toks[:, i:i + n]), cache=cache)))
        i += n
    assert i == toks.shape[1]
    return np.concatenate(outs, axis=1)


def on(backend: str, fn, *args):
    kernels.set_backend(backend)
    try:
        return fn(*args)
    finally:
        kernels.set_backend()


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    # QAT rounding off: an FP8 step turns a 1e-7 difference upstream into a visible one
    m, _ = ds4mlx.load(tiny_ckpt, qat_rounding=False, dtype=mx.float32)
    return m


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# window 16, indexer top-k 4 (ratio-4 rows beyond 4 from position 19), ratio 128
SPLITS = {
    "early": [9, 1, 1, 1, 1, 1, 1, 1, 3, 1, 2],          # window fills, top-k kicks in at 19
    "ratio128": [124] + [1] * 3 + [3, 1, 2],             # positions 124..133 cross 127/128
}


@pytest.mark.parametrize("name", ["early", pytest.param("ratio128", marks=pytest.mark.slow)])
def test_fused_decode_equals_ops(model, name):
    sizes = SPLITS[name]
    toks = np.random.default_rng(5).integers(2, 1024, size=(1, sum(sizes)))
    ref = on("ops", run_split, model, toks, sizes)
    calls = []
    attend = model.layers[0].attn._attend_fused.__func__

    def spy(self, *a):
        calls.append(1)
        return attend(self, *a)

    for blk in model.layers:
        blk.attn._attend_fused = spy.__get__(blk.attn)
    try:
        got = on("emulate", run_split, model, toks, sizes)
    finally:
        for blk in model.layers:
            del blk.attn._attend_fused
    assert len(calls) == len(model.layers) * sum(1 for n in sizes if n <= 8)
    assert rel_err(got, ref) <= 1e-5
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))

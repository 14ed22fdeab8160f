"""Expert ids on the kernel path: the emulated path refuses an out-of-range id before launch;
the kernels themselves (what runs on the GPU, where no host check is paid) read no weights for
such a pair and write NaN, while the in-range pairs stay equal to the ops twin."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from ds4mlx import kernels
from ds4mlx.kernels import emu as kernel_emu
from test_kernels_moe import inputs_for, random_experts

pytestmark = pytest.mark.skipif(kernel_emu.compiler() is None, reason="no C++ compiler")
E, F, K_IN = 3, 12, 64


@pytest.fixture
def emulate(monkeypatch):
    monkeypatch.setenv("DS4MLX_KERNELS", "emulate")
    kernels.set_backend()


def test_out_of_range_id_is_refused_before_launch(emulate):
    w = random_experts("Q8_0", E, F, K_IN, seed=0)
    x = inputs_for(w, "Q8_0", 2, K_IN, seed=1)
    with pytest.raises(kernels.KernelInputError, match=r"expert ids 0\.\.3 out of range \[0, 3\)"):
        kernels.moe_gate_up(x, w, w, "Q8_0", mx.array([[0, 1], [2, 3]], dtype=mx.uint32), None)


@pytest.mark.parametrize("pairs", ["decode", "prefill"])
def test_kernels_flag_out_of_range_ids_with_nan(emulate, monkeypatch, pairs):
    monkeypatch.setattr(kernels.moe, "_check_ids", lambda *a, **k: None)  # what the GPU path skips
    if pairs == "prefill":
        monkeypatch.setattr(kernels.moe, "DECODE_MAX_PAIRS", 0)
    w1, w3 = random_experts("Q8_0", E, F, K_IN, seed=2), random_experts("Q8_0", E, F, K_IN, seed=3)
    w2 = random_experts("Q8_0", E, 20, 32, seed=4)
    x = inputs_for(w1, "Q8_0", 3, K_IN, seed=5)
    idx = mx.array([[0, 1], [2, 7], [1, 1]], dtype=mx.uint32)  # token 1, slot 1: expert 7 of 3
    mid = kernels.moe_gate_up(x, w1, w3, "Q8_0", idx, None)
    ok = mx.array([[0, 1], [2, 0], [1, 1]], dtype=mx.uint32)
    ref = np.asarray(kernels.moe_gate_up_ops(x, w1, w3, "Q8_0", ok, None))
    got = np.asarray(mid)
    assert np.isnan(got[1, 1]).all()
    mask = np.ones(got.shape[:2], bool)
    mask[1, 1] = False
    np.testing.assert_allclose(got[mask], ref[mask], rtol=1e-5, atol=1e-6)
    rows = mx.array(np.random.default_rng(6).standard_normal((3, 2, 32)).astype(np.float32))
    y = np.asarray(kernels.moe_down(rows, w2, "Q8_0", idx, mx.ones((3, 2))))
    y_ref = np.asarray(kernels.moe_down_ops(rows, w2, "Q8_0", ok, mx.ones((3, 2))))
    assert np.isnan(y[1]).all()
    np.testing.assert_allclose(y[[0, 2]], y_ref[[0, 2]], rtol=1e-5, atol=1e-5)


def test_out_of_range_id_with_the_shared_expert_is_nan(emulate, monkeypatch):
    """The folded shared slot does not hide a bad routed id: the token's output is NaN."""
    monkeypatch.setattr(kernels.moe, "_check_ids", lambda *a, **k: None)  # what the GPU path skips
    f = 32  # the down projection's inputs: whole Q8_0 blocks
    w1, w3 = random_experts("Q8_0", E, f, K_IN, seed=7), random_experts("Q8_0", E, f, K_IN, seed=8)
    w2 = random_experts("Q8_0", E, 20, f, seed=9)
    shared = kernels.Shared((random_experts("Q8_0", 1, 2 * f, K_IN, seed=10)[0], "Q8_0"),
                            (random_experts("Q8_0", 1, 20, f, seed=11)[0], "Q8_0"))
    x = inputs_for(w1, "Q8_0", 1, K_IN, seed=12)
    idx = mx.array([[1, 9]], dtype=mx.uint32)
    mid = kernels.moe_gate_up(x, w1, w3, "Q8_0", idx, None, False, shared)
    got = np.asarray(mid)
    assert np.isnan(got[0, 1]).all() and np.isfinite(got[0, [0, 2]]).all()
    y = np.asarray(kernels.moe_down(mid, w2, "Q8_0", idx, mx.ones((1, 2)), mx.float32, False, shared))
    assert np.isnan(y).all()

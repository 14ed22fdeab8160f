"""Fused MoE router selection (metal/router.metal) against numpy and its ops twin, under the
CPU emulator and, on a Mac, on the GPU."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from ds4mlx import kernels
from ds4mlx.kernels.router import router_topk, router_topk_ops

from kernel_paths import path  # noqa: F401 (the kernel-path fixture the tests take)


def numpy_router(logits, bias, k, renorm, scale):
    """float64 reference: ids by descending biased score (ties: lowest id), their weights."""
    scores = np.sqrt(np.logaddexp(logits.astype(np.float64), 0.0))
    biased = scores + bias
    idx = np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in biased])
    w = np.take_along_axis(scores, idx, axis=-1)
    if renorm:
        w = w / w.sum(-1, keepdims=True)
    return idx, w * scale


@pytest.mark.parametrize("n,e,k,renorm", [(3, 256, 6, True), (2, 8, 6, True), (4, 300, 4, False),
                                          (1, 64, 1, True)])
def test_router_matches_numpy_and_twin(path, n, e, k, renorm):
    rng = np.random.default_rng(e + k)
    logits = (rng.standard_normal((n, e)) * 4).astype(np.float32)
    logits[0, :3] = [-30.0, 25.0, 0.0]  # softplus tails and zero
    bias = (rng.standard_normal(e) * 0.1).astype(np.float32)
    idx, w = router_topk(mx.array(logits), mx.array(bias), k, renorm, 1.5)
    ref_idx, ref_w = numpy_router(logits, bias, k, renorm, 1.5)
    np.testing.assert_array_equal(np.asarray(idx), ref_idx)
    np.testing.assert_allclose(np.asarray(w), ref_w, rtol=1e-6, atol=1e-7)
    t_idx, t_w = router_topk_ops(mx.array(logits), mx.array(bias), k, renorm, 1.5)
    order = np.argsort(np.asarray(t_idx), axis=-1)
    mine = np.argsort(np.asarray(idx), axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(t_idx), order, -1),
                                  np.take_along_axis(np.asarray(idx), mine, -1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(t_w), order, -1),
                               np.take_along_axis(np.asarray(w), mine, -1), rtol=1e-6)


def test_router_ties_pick_lowest_ids(path):
    logits = np.zeros((1, 40), np.float32)
    bias = np.zeros(40, np.float32)
    bias[[7, 33]] = 1.0
    idx, _ = router_topk(mx.array(logits), mx.array(bias), 4, True, 1.0)
    np.testing.assert_array_equal(np.asarray(idx)[0], [7, 33, 0, 1])


def test_router_rejects_bad_shapes():
    with pytest.raises(kernels.KernelInputError, match="bias"):
        router_topk(mx.zeros((2, 8)), mx.zeros((7,)), 2, True, 1.0)
    with pytest.raises(kernels.KernelInputError, match="k=9"):
        router_topk(mx.zeros((2, 8)), mx.zeros((8,)), 9, True, 1.0)

"""Fused hyper-connection pre kernel (metal/hc.metal) against the model's HC pre in MLX ops
(ds4mlx/ops.py), under the CPU emulator and, on a Mac, on the GPU."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from ds4mlx import kernels
from ds4mlx import ops as hyper

from kernel_paths import path  # noqa: F401 (the kernel-path fixture the tests take)


def hc_inputs(lead, m, d, seed, h_dtype=mx.float32, fn_dtype=mx.float32):
    rng = np.random.default_rng(seed)
    mix = 2 * m + m * m
    h = mx.array(rng.standard_normal((*lead, m, d)).astype(np.float32)).astype(h_dtype)
    fn = mx.array((rng.standard_normal((mix, m * d)) / np.sqrt(m * d)).astype(np.float32))
    base = mx.array(rng.uniform(-1, 1, mix).astype(np.float32))
    scale = mx.array(rng.uniform(0.5, 3.0, 3).astype(np.float32))
    return h, fn.astype(fn_dtype), base, scale


def assert_close(got, ref, rel=1e-5):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape and got.dtype == np.float32
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= rel, f"relative error {err:.3g} > {rel}"


@pytest.mark.parametrize("lead,m,d", [((3,), 4, 200), ((2, 3), 4, 300), ((5,), 2, 77),
                                      ((1,), 3, 64), ((2,), 1, 40), ((1,), 4, 4096)])
def test_hc_pre_matches_ops(path, lead, m, d):
    h, fn, base, scale = hc_inputs(lead, m, d, seed=d)
    got = kernels.hc_pre(h, fn, base, scale, iters=20, eps=1e-6, norm_eps=1e-6)
    ref = hyper.hc_pre(h, fn, base, scale, iters=20, eps=1e-6, norm_eps=1e-6)
    for g, r in zip(got, ref):
        assert_close(g, r)
    comb = np.asarray(got[2])
    np.testing.assert_allclose(comb.sum(axis=-2), 1.0, atol=1e-5)  # columns end normalised


@pytest.mark.parametrize("h_dtype,fn_dtype", [(mx.bfloat16, mx.float16), (mx.float16, mx.float32)])
@pytest.mark.parametrize("iters", [1, 3])
def test_hc_pre_dtypes_and_iterations(path, h_dtype, fn_dtype, iters):
    h, fn, base, scale = hc_inputs((4,), 4, 96, seed=iters, h_dtype=h_dtype, fn_dtype=fn_dtype)
    got = kernels.hc_pre(h, fn, base, scale, iters=iters, eps=1e-3, norm_eps=1e-5)
    ref = hyper.hc_pre(h, fn, base, scale, iters=iters, eps=1e-3, norm_eps=1e-5)
    for g, r in zip(got, ref):
        assert_close(g, r)


@pytest.mark.parametrize("out_dtype", [mx.bfloat16, mx.float16])
def test_hc_pre_writes_x_in_the_activation_dtype(path, out_dtype):
    """x comes back rounded once to the sublayer's dtype: the float32 sum, then the cast."""
    h, fn, base, scale = hc_inputs((3,), 4, 256, seed=11)
    got = kernels.hc_pre(h, fn, base, scale, iters=20, eps=1e-6, norm_eps=1e-6,
                         out_dtype=out_dtype)
    ref = hyper.hc_pre(h, fn, base, scale, iters=20, eps=1e-6, norm_eps=1e-6)
    assert got[0].dtype == out_dtype
    assert_close(got[0].astype(mx.float32), ref[0], rel=1e-2)  # one rounding to 8 or 11 bits
    # the same rounding as casting the float32 x: equal but where the sum sits on a tie
    same = np.asarray(got[0].astype(mx.float32)) == np.asarray(ref[0].astype(out_dtype).astype(mx.float32))
    assert same.mean() > 0.99
    for g, r in zip(got[1:], ref[1:]):
        assert_close(g, r)


def test_hc_pre_rejects_mismatched_shapes(monkeypatch):
    monkeypatch.setenv("DS4MLX_KERNELS", "ops")
    kernels.set_backend()
    h, fn, base, scale = hc_inputs((2,), 4, 32, seed=0)
    with pytest.raises(kernels.KernelInputError, match="fn must be"):
        kernels.hc_pre(h, fn[:, :-1], base, scale, iters=20, eps=1e-6, norm_eps=1e-6)
    with pytest.raises(kernels.KernelInputError, match="h: expected"):
        kernels.hc_pre(h[0, 0, 0], fn, base, scale, iters=20, eps=1e-6, norm_eps=1e-6)


@pytest.mark.parametrize("lead,d,dtype", [((1,), 200, mx.float32), ((3,), 256, mx.bfloat16)])
def test_hc_pre_runs_the_previous_post_and_the_norm(path, lead, d, dtype):
    """One kernel for HC post (of the previous sublayer) + HC pre + the sublayer's RMSNorm, as
    the model composes them in ops: ops.hc_post, ops.hc_pre, the cast, ops.RMSNorm."""
    m = 4
    h, fn, base, scale = hc_inputs(lead, m, d, seed=d)
    rng = np.random.default_rng(d + 1)
    y = mx.array(rng.standard_normal((*lead, d)).astype(np.float32)).astype(dtype)
    post = mx.array(rng.uniform(0, 2, (*lead, m)).astype(np.float32))
    comb = mx.softmax(mx.array(rng.standard_normal((*lead, m, m)).astype(np.float32)), axis=-1)
    norm = hyper.RMSNorm(d, eps=1e-6)
    norm.weight = mx.array(rng.uniform(0.5, 1.5, d).astype(np.float32)).astype(dtype)
    args = dict(iters=20, eps=1e-6, norm_eps=1e-6)
    x, p2, c2, h2 = kernels.hc_pre(h, fn, base, scale, out_dtype=dtype, norm=norm,
                                   prev=(y, post, comb), **args)
    h_ref = hyper.hc_post(y, h, post, comb)
    x_ref, p_ref, c_ref = hyper.hc_pre(h_ref, fn, base, scale, **args)
    x_ref = norm(x_ref.astype(dtype))
    assert x.dtype == dtype
    assert_close(x.astype(mx.float32), x_ref.astype(mx.float32), rel=1e-5 if dtype == mx.float32 else 8e-3)
    for g, r in ((p2, p_ref), (c2, c_ref), (h2, h_ref)):
        assert_close(g, r)


def prev_and_norm(lead, m, d, seed, dtype=mx.float32):
    rng = np.random.default_rng(seed)
    y = mx.array(rng.standard_normal((*lead, d)).astype(np.float32)).astype(dtype)
    post = mx.array(rng.uniform(0, 2, (*lead, m)).astype(np.float32))
    comb = mx.softmax(mx.array(rng.standard_normal((*lead, m, m)).astype(np.float32)), axis=-1)
    norm = hyper.RMSNorm(d, eps=1e-6)
    norm.weight = mx.array(rng.uniform(0.5, 1.5, d).astype(np.float32)).astype(dtype)
    return (y, post, comb), norm


@pytest.mark.parametrize("lead,d", [((1,), 4096), ((3,), 1100), ((2,), 130)])
@pytest.mark.parametrize("grid", [False, True])
def test_hc_pre_both_forms_match_ops(path, lead, d, grid):
    """The one-threadgroup form and the grid form (each token's M * D inputs split over
    ceil(M * D / HC_CHUNK) threadgroups, the last one finishing: Flash's 4 x 4096 over 32, 1100
    with a partial last chunk, 130 in a single chunk), post, norm and float32 x included."""
    m = 4
    h, fn, base, scale = hc_inputs(lead, m, d, seed=d + 3)
    prev, norm = prev_and_norm(lead, m, d, seed=d + 4)
    kw = dict(iters=20, eps=1e-6, norm_eps=1e-6, norm=norm, prev=prev, also_f32=True)
    got = kernels.hc_pre(h, fn, base, scale, grid=grid, **kw)
    ref = kernels.hc_pre_ops(h, fn, base, scale, **kw)
    assert len(got) == len(ref) == 5
    for g, r in zip(got, ref):
        assert_close(g, r)
    np.testing.assert_allclose(np.asarray(got[2]).sum(axis=-2), 1.0, atol=1e-5)


def test_hc_pre_takes_the_grid_form_at_decode_where_grid_sync_allows(monkeypatch):
    from ds4mlx.kernels import dispatch
    from ds4mlx.kernels.hyper import GRID_TOKENS
    from ds4mlx.kernels.source import HC_CHUNK, HC_THREADS

    monkeypatch.setenv("DS4MLX_KERNELS", "emulate")
    kernels.set_backend()
    grids = []
    real = dispatch.run
    monkeypatch.setattr(dispatch, "run",
                        lambda *a, **kw: grids.append(kw["grid"]) or real(*a, **kw))
    m, d = 4, 1100
    groups = -(-m * d // HC_CHUNK)

    def call(n):
        h, fn, base, scale = hc_inputs((n,), m, d, seed=n)
        got = kernels.hc_pre(h, fn, base, scale, iters=3, eps=1e-6, norm_eps=1e-6)
        ref = kernels.hc_pre_ops(h, fn, base, scale, iters=3, eps=1e-6, norm_eps=1e-6)
        for g, r in zip(got, ref):
            assert_close(g, r)
        return grids.pop()

    assert call(1) == (HC_THREADS * groups, 1, 1)  # decode: split over the threadgroups
    assert call(GRID_TOKENS) == (HC_THREADS * groups, GRID_TOKENS, 1)
    assert call(GRID_TOKENS + 1) == (HC_THREADS, GRID_TOKENS + 1, 1)  # enough tokens to fill
    kernels.disable(kernels.GRID_SYNC, "test: as without Metal 3.2")
    try:
        assert call(1) == (HC_THREADS, 1, 1)  # the one-threadgroup form serves
    finally:
        kernels.enable(kernels.GRID_SYNC)
    # the counters are back to 0 (the emulator checks that on every launch, too)
    assert not any(np.asarray(c).any() for c in dispatch._counters["hc_pre"])

"""The first-use check and ``ds4mlx selftest`` for the fused decode kernels (attention, indexer
scores and top-k, rope_rows, router), under the emulator: each kernel broken on purpose, by a
wrong result or by code that does not compile, is switched off with one warning line naming
it, the ops path then serves it (the entry point's twin, or for rope_rows the model's own ops),
and selftest exits non-zero naming it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from ds4mlx import kernels
from ds4mlx.cli import main
from ds4mlx.kernels import attention as fused
from ds4mlx.kernels import indexer as fused_indexer
from ds4mlx.kernels import check
from ds4mlx.kernels.router import router_topk, router_topk_ops
from ds4mlx.model.rope import rows_ops

import test_kernel_check as _base

# the fixtures (a fresh record cache with the check on; no broken kernel outlives its test) and
# the kernel-breaking helper of the MoE / hc_pre checks
first_use, _fresh_kernels = _base.first_use, _base._fresh_kernels
break_kernel, warnings_in = _base.break_kernel, _base.warnings_in

# kernel -> (file, a statement of its body, the same statement giving a wrong result)
WRONG = {
    "attn_decode": ("attention.metal", "o = o / total;", "o = 1.25f * o / total;"),
    "indexer_scores": ("attention.metal", "? sum : ds4_neg_inf()",
                       "? 1.5f * sum : ds4_neg_inf()"),
    # (the top-k's code is metal/attention.metal's ds4_topk_row: its row one score along)
    "indexer_topk": ("attention.metal", "ds4_plain_row{scores + ulong(row) * uint(N)}, uint(N),",
                     "ds4_plain_row{scores + ulong(row) * uint(N) + 1}, uint(N) - 1u,"),
    # the decode path's one launch of queries, scores and top-k: its picks one score along
    "indexer_pick_q": ("attention.metal", "ds4_atomic_row{row_scores}, uint(NK),",
                       "ds4_atomic_row{row_scores + 1}, uint(NK) - 1u,"),
    "rope_rows": ("rows.metal", "out[base + j] = OutT(v[j]);",
                  "out[base + j] = OutT(1.5f * v[j]);"),
    "router_topk": ("router.metal", "w[ulong(tok) * K + r] = ds4_route_weight(",
                    "w[ulong(tok) * K + r] = 1.5f * ds4_route_weight("),
}
# the variant label each kernel's first-use check switches off, at the dims the calls below
# (and the demo model: head dim 128, 16 indexer heads of 128, top-4, 6 of 8 experts) use
LABEL = {
    "attn_decode": "attention (float32, head_dim=128)",
    "indexer_scores": "indexer (float32, index_heads=16, index_head_dim=128)",
    "indexer_topk": "indexer (float32, index_topk=4)",
    "indexer_pick_q": "indexer (float32, index_heads=16, index_head_dim=128, index_topk=4, "
                      "rope_dims=64)",
    "rope_rows": "rope_rows (float32, head_dim=128, rope_dims=64)",
    "router_topk": "router (float32, n_experts=8, experts_per_token=6, renormalize=1)",
}


def break_it(monkeypatch, kernel: str, how: str) -> None:
    file, old, new = WRONG[kernel]
    if how == "compile":
        new = "ds4_no_such_function(); " + old  # Metal refuses it as the emulator does
    break_kernel(monkeypatch, file, kernel, old, new)


def entry_call(kernel: str):
    """(kernel entry point call, its ops twin call) at the demo's dims."""
    rng = np.random.default_rng(1)

    def rand(*shape, scale=1.0):
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32))

    if kernel == "attn_decode":
        bounds = fused.query_bounds(30, 2, 15, 16, 4)
        idx = mx.array(np.array([[[0, 5, -1, 3], [6, 2, 1, 7]]], np.int32))
        args = (rand(1, 2, 2, 128), rand(1, 17, 128, scale=0.2), rand(1, 8, 128, scale=0.2), idx,
                bounds, rand(2), 128 ** -0.5)
        return (lambda: fused.decode_attention(*args)), (lambda: fused.decode_attention_ops(*args))
    if kernel == "indexer_scores":
        args = (rand(1, 2, 16, 128), rand(1, 2, 16), rand(1, 9, 128), mx.array([8, 9]))
        return (lambda: fused_indexer.indexer_scores(*args)), (lambda: fused_indexer.indexer_scores_ops(*args))
    if kernel == "indexer_topk":
        scores = mx.array(rng.permutation(30).astype(np.float32).reshape(2, 15))
        return (lambda: fused_indexer.indexer_topk(scores, 4)), (lambda: fused_indexer.indexer_topk_ops(scores, 4))
    assert kernel == "router_topk"
    args = (rand(3, 8, scale=4.0), rand(8, scale=0.1), 6, True, 1.5)
    return (lambda: router_topk(*args)), (lambda: router_topk_ops(*args))


def same(got, ref) -> bool:
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    return all(np.array_equal(np.asarray(g), np.asarray(r)) for g, r in zip(got, ref, strict=True))


@pytest.mark.parametrize("how", ["wrong", "compile"])
@pytest.mark.parametrize("kernel", ["attn_decode", "indexer_scores", "indexer_topk", "router_topk"])
def test_broken_fused_kernel_is_switched_off_and_its_twin_serves(first_use, monkeypatch, capfd,
                                                                 kernel, how):
    break_it(monkeypatch, kernel, how)
    call, twin = entry_call(kernel)
    for _ in range(2):  # the second call reuses the verdict: no second warning
        assert same(call(), twin())
    lines = warnings_in(capfd.readouterr().err)
    assert len(lines) == 1, lines
    assert f"kernel {LABEL[kernel]} switched off" in lines[0] and "ops path" in lines[0], lines
    assert kernel in lines[0]
    if how == "compile":
        assert f"{kernel} failed" in lines[0], lines
        if kernels.backend() == "emulate":  # Metal's compiler words it otherwise
            assert "KernelEmulationError" in lines[0] and "does not compile" in lines[0], lines
    else:
        assert "is off by" in lines[0], lines
    assert LABEL[kernel] in kernels.disabled()
    # a failure is not recorded (the indexer's record key asks whether the grid form works:
    # GRID_SYNC's own check, recorded apart)
    assert not [p for p in first_use.glob("kernel-checks/*.json")
                if not p.name.startswith("grid_sync-")]


def test_the_indexer_kernels_are_checked_apart(first_use, monkeypatch, capfd):
    """A broken top-k switches off only the top-k: the scores kernel passes its own check."""
    break_it(monkeypatch, "indexer_topk", "wrong")
    call, twin = entry_call("indexer_scores")
    np.testing.assert_allclose(np.asarray(call()), np.asarray(twin()), rtol=1e-5, atol=1e-5)
    call, twin = entry_call("indexer_topk")
    assert same(call(), twin())
    lines = warnings_in(capfd.readouterr().err)
    assert len(lines) == 1 and LABEL["indexer_topk"] in lines[0], lines
    assert list(kernels.disabled()) == [LABEL["indexer_topk"]]
    assert len(list(first_use.glob("kernel-checks/indexer-float32-*.json"))) == 1  # scores


DEMO_TOKENS = [5, 17, 300, 2, 999, 4, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 7, 9, 11,
               3, 1, 6]


def demo_logits(model) -> mx.array:
    """A prefill, then two decode steps; the second sees 5 compressed rows, more than the
    demo's top-4, so the indexer kernels pick them."""
    cache = model.make_cache()
    tokens = mx.array([DEMO_TOKENS])
    out = [model(tokens[:, a:b], cache=cache) for a, b in ((0, 21), (21, 22), (22, 23))]
    mx.eval(out)
    return mx.concatenate(out, axis=1)


# rope_rows' twin is the model's own ops, so its fallback is shown on the model; the others'
# entry points fall back to their twins above (the indexer's pick path once more here: the
# decode step's one launch switched off, its two launches serve)
@pytest.mark.parametrize("kernel,how", [
    ("rope_rows", "wrong"), ("rope_rows", "compile"),
    pytest.param("indexer_pick_q", "wrong", marks=pytest.mark.slow),
])
def test_demo_model_with_a_broken_fused_kernel_gives_the_ops_logits(demo, first_use, monkeypatch,
                                                                    capfd, kernel, how):
    model, _ = demo
    path = kernels.backend()
    kernels.set_backend("ops")
    ref = demo_logits(model)
    kernels.set_backend(path)
    break_it(monkeypatch, kernel, how)
    got = demo_logits(model)
    lines = warnings_in(capfd.readouterr().err)
    # rope_rows is asked at two keys by the model (alone, and with the q_norm rows alongside)
    labels = {LABEL[kernel]} | ({f"{LABEL[kernel][:-1]}, q_rank=128)"} if kernel == "rope_rows"
                                else set())
    assert len(lines) == len(labels), lines
    assert all(any(f"kernel {lab} switched off" in line for line in lines) for lab in labels), lines
    # the other kernels passed their checks and still serve: equal up to float32 rounding
    assert set(kernels.disabled()) == labels
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel,how", [("rope_rows", "wrong"), ("indexer_topk", "wrong"),
                                        ("attn_decode", "compile"), ("router_topk", "wrong"),
                                        ("indexer_scores", "compile"),
                                        ("indexer_pick_q", "wrong")])
def test_selftest_fails_naming_the_broken_fused_kernel(demo_dir, monkeypatch, capsys, kernel,
                                                       how):
    monkeypatch.setenv("DS4MLX_KERNELS", "emulate")
    break_it(monkeypatch, kernel, how)
    assert main(["selftest", "--model", str(demo_dir)]) == 1
    out = capsys.readouterr().out
    failing = [line for line in out.splitlines() if "FAIL" in line and "checks" not in line]
    assert failing and all(line.startswith(kernel + " ") for line in failing), out
    if how == "compile":
        assert all("does not compile" in line for line in failing), out
    assert "kernel checks FAILED" in out
    check.reset()


@pytest.mark.parametrize("spec", [
    check.Spec("rope_rows", mx.bfloat16, head_dim=128, rope_dims=64),
    pytest.param(check.Spec("attention", mx.bfloat16, head_dim=128), marks=pytest.mark.slow),
    pytest.param(check.Spec("indexer", mx.bfloat16, index_heads=16, index_head_dim=128),
                 marks=pytest.mark.slow),
], ids=lambda s: s.label())
def test_fused_checks_pass_in_bfloat16(spec, monkeypatch):
    """A Mac runs the model in bfloat16: a correct kernel must pass its check there too (the
    row kernel rounds RMS x weight once where the ops round twice, so its FP8-rounded values
    may land one e4m3 step apart now and then)."""
    assert check._twins[kernels.ROPE_ROWS] is rows_ops  # the model installed its own ops
    monkeypatch.setenv("DS4MLX_KERNELS", "emulate")
    kernels.set_backend()
    results = check.run_spec(spec)
    assert results and all(r.ok for r in results), [r.why() for r in results if not r.ok]

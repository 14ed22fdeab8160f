"""``ds4mlx selftest`` and the first-use check (ds4mlx/kernels/check.py), under the emulator.

A kernel source is broken on purpose (a wrong result, or code that does not compile); the
check must name it, switch it off with one warning line, and the ops twin must then serve it.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from ds4mlx import kernels
from ds4mlx.cli import main
from ds4mlx.kernels import check
from ds4mlx.kernels import emu as kernel_emu
from kernel_paths import PATHS

NO_CXX = pytest.mark.skipif(kernel_emu.compiler() is None, reason="no C++ compiler")

GATE_UP_WRITE = "mid[ulong(pair) * uint(F) + row] = ds4_swiglu(gs, us, limit);"
HC_WRITE = "x[ulong(tok) * uint(D) + d] = r;"


@pytest.fixture(params=PATHS)
def first_use(request, monkeypatch, tmp_path):
    """Kernels (emulated, or on the GPU) with the first-use check on, records in a fresh cache."""
    monkeypatch.setenv("DS4MLX_KERNELS", request.param)
    monkeypatch.setenv("DS4MLX_KERNEL_CHECK", "on")
    monkeypatch.setenv("DS4MLX_CACHE", str(tmp_path))
    kernels.set_backend()
    check.reset()
    yield tmp_path
    check.reset()


def break_kernel(monkeypatch, file: str, kernel: str, old: str, new: str) -> None:
    """Serve ``kernel`` of ``metal/<file>`` with ``old`` replaced by ``new`` from now on."""
    real = kernels.source.metal_source

    def patched(name: str):
        header, bodies = real(name)
        if name == file:
            assert old in bodies[kernel]
            bodies = {**bodies, kernel: bodies[kernel].replace(old, new)}
        return header, bodies

    kernels.dispatch.compiled.cache_clear()
    monkeypatch.setattr(kernels.source, "metal_source", patched)


@pytest.fixture(autouse=True)
def _fresh_kernels():
    yield
    kernels.dispatch.compiled.cache_clear()  # no broken kernel outlives its test


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if "warning" in line]


def mx_experts(seed: int, e: int = 8, rows: int = 16, k: int = 256):
    # the demo model's layout and dims (top-6 of 8): the checks share compiled kernels
    return check.random_experts(check.MLX_PAIR, e, rows, k, seed)


def test_wrong_result_is_switched_off_once_and_ops_serves(first_use, monkeypatch, capfd):
    break_kernel(monkeypatch, "moe.metal", "moe_gate_up_decode", GATE_UP_WRITE,
                 GATE_UP_WRITE.replace("= ds4_swiglu", "= 1.5f * ds4_swiglu"))
    w1, w3 = mx_experts(seed=1), mx_experts(seed=2)
    x = mx.array(np.random.default_rng(3).standard_normal((2, 256)).astype(np.float32))
    idx = mx.array([[0, 4, 1, 7, 3, 3], [2, 2, 5, 6, 0, 1]], dtype=mx.uint32)
    for _ in range(2):  # the second call reuses the verdict: no second warning
        got = kernels.moe_gate_up(x, w1, w3, "MXFP4", idx, 10.0)
        assert mx.array_equal(got, kernels.moe_gate_up_ops(x, w1, w3, "MXFP4", idx, 10.0)).item()
    lines = warnings_in(capfd.readouterr().err)
    assert len(lines) == 1, lines
    assert "kernel MXFP4-mlx (float32) switched off" in lines[0]
    assert "moe_gate_up_decode" in lines[0] and "ops path" in lines[0]
    assert "MXFP4-mlx (float32)" in kernels.disabled()
    assert not list(first_use.glob("kernel-checks/MXFP4-mlx-*"))  # a failure is not recorded
    # other variants are unaffected: hc_pre still runs its kernel (and passes its check)
    h = mx.array(np.random.default_rng(4).standard_normal((2, 4, 64)).astype(np.float32))
    fn = mx.array(np.random.default_rng(5).standard_normal((24, 256)).astype(np.float32) * 0.05)
    kernels.hc_pre(h, fn, mx.zeros((24,)), mx.ones((3,)), iters=3, eps=1e-6, norm_eps=1e-6)
    assert list(first_use.glob("kernel-checks/hc_pre-float32-*.json"))


def test_compile_failure_is_switched_off_and_ops_serves(first_use, monkeypatch, capfd):
    break_kernel(monkeypatch, "hc.metal", "hc_pre", HC_WRITE, "float vla[D]; " + HC_WRITE)
    rng = np.random.default_rng(6)
    h = mx.array(rng.standard_normal((3, 4, 64)).astype(np.float32))
    fn = mx.array(rng.standard_normal((24, 256)).astype(np.float32) * 0.05)
    args = (h, fn, mx.array(rng.uniform(-1, 1, 24).astype(np.float32)), mx.ones((3,)))
    got = kernels.hc_pre(*args, iters=3, eps=1e-6, norm_eps=1e-6)
    ref = kernels.hc_pre_ops(*args, iters=3, eps=1e-6, norm_eps=1e-6)
    assert all(mx.array_equal(g, r).item() for g, r in zip(got, ref))
    lines = warnings_in(capfd.readouterr().err)
    assert len(lines) == 1, lines
    assert "kernel hc_pre (float32, hc_mult=4) switched off" in lines[0]
    assert "hc_pre failed" in lines[0]
    if kernels.backend() == "emulate":
        assert "KernelEmulationError" in lines[0] and "does not compile" in lines[0]


def test_grid_sync_is_checked_once_and_switched_off_without_the_fence(first_use, monkeypatch,
                                                                       capfd):
    # passes and is recorded on a kernel backend with the fence
    assert kernels.dispatch.grid_sync() and kernels.dispatch.grid_sync()
    assert len(list(first_use.glob("kernel-checks/grid_sync-float32-*.json"))) == 1
    assert warnings_in(capfd.readouterr().err) == []
    # as on a Mac before macOS 15 (Metal 3.1): no atomic_thread_fence, the probe cannot compile
    check.reset()
    break_kernel(monkeypatch, "grid.metal", "grid_sum", "s = simd_sum(s);",
                 "s = simd_sum(s); metal_3_1_has_no_fence();")
    assert not kernels.dispatch.grid_sync() and not kernels.dispatch.grid_sync()
    lines = warnings_in(capfd.readouterr().err)
    assert len(lines) == 1 and "kernel grid_sync (float32) switched off" in lines[0], lines
    assert "grid_sum failed" in lines[0]
    # a platform limit, said once per machine: the next process falls back without a word,
    # and a wrong result (a fault, not a limit) is never recorded as one
    assert len(list(first_use.glob("kernel-checks/grid_sync-unavailable-*.json"))) == 1
    check.reset()
    assert not kernels.dispatch.grid_sync()
    assert warnings_in(capfd.readouterr().err) == []
    monkeypatch.setenv("DS4MLX_KERNEL_CHECK", "fresh")  # asked afresh: tried and said again
    check.reset()
    assert not kernels.dispatch.grid_sync()
    assert len(warnings_in(capfd.readouterr().err)) == 1
    kernels.set_backend("ops")
    assert not kernels.dispatch.grid_sync()  # no kernels, no grid form


GRID_TOTAL = "gtot[t] = s;"  # hc_pre's last threadgroup summing the chunks' partials (GRID only)


@pytest.mark.parametrize("how", ["compile", "wrong"])
def test_a_failing_grid_form_leaves_hc_pre_its_one_threadgroup_kernel(first_use, monkeypatch,
                                                                       capfd, how):
    """The probe passes, but hc_pre's grid form does not compile or disagrees (only the GRID=true
    instance is broken): that form alone is switched off, with one warning, and the
    one-threadgroup kernel, not the ops twin, serves the decode call."""
    from ds4mlx.kernels.source import HC_THREADS

    if how == "compile":
        new = 'static_assert(!GRID, "the grid form does not build"); ' + GRID_TOTAL
    else:
        new = GRID_TOTAL.replace("= s", "= 1.5f * s")
    break_kernel(monkeypatch, "hc.metal", "hc_pre", GRID_TOTAL, new)
    launches = []
    real = kernels.dispatch.run
    monkeypatch.setattr(kernels.dispatch, "run", lambda *a, **kw: launches.append(
        (a[1], kw["grid"], check.forcing())) or real(*a, **kw))
    rng = np.random.default_rng(8)
    m, d = 4, 300  # 3 chunks of HC_CHUNK: the grid form would serve one token
    h = mx.array(rng.standard_normal((1, m, d)).astype(np.float32))
    fn = mx.array(rng.standard_normal((24, m * d)).astype(np.float32) / np.sqrt(m * d))
    args = (h, fn, mx.array(rng.uniform(-1, 1, 24).astype(np.float32)), mx.ones((3,)))
    for _ in range(2):  # the second call reuses both verdicts: no second warning
        got = kernels.hc_pre(*args, iters=3, eps=1e-6, norm_eps=1e-6)
        ref = kernels.hc_pre_ops(*args, iters=3, eps=1e-6, norm_eps=1e-6)
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)
    served = [g for name, g, forced in launches if name == "hc_pre" and not forced]
    assert served == [(HC_THREADS, 1, 1)] * 2, launches  # the kernel, in one threadgroup
    # the check did try the grid form (its cases split a token over several threadgroups)
    assert any(forced and g[0] > HC_THREADS for name, g, forced in launches if name == "hc_pre")
    lines = warnings_in(capfd.readouterr().err)
    assert len(lines) == 1, lines
    assert "kernel hc_pre (float32, hc_mult=4, grid=1) switched off" in lines[0]
    assert "its one-threadgroup form serves it instead" in lines[0] and "ops path" not in lines[0]
    assert "grid form" in lines[0]  # the failing case, named
    assert list(kernels.disabled()) == ["hc_pre (float32, hc_mult=4, grid=1)"]
    assert kernels.dispatch.grid_sync()  # the probe passed: nothing else loses the grid form
    # one pass recorded: the one-threadgroup form's (a failure is not recorded)
    assert len(list(first_use.glob("kernel-checks/hc_pre-float32-*.json"))) == 1


def _grid_selftest(demo_dir, monkeypatch) -> int:
    """``ds4mlx selftest`` of the demo, on its hc_pre and grid_sync variants only (quick)."""
    from ds4mlx import selftest

    real = selftest.model_specs
    monkeypatch.setattr(selftest, "model_specs", lambda source: [
        s for s in real(source) if s.variant in (kernels.HC_PRE, kernels.GRID_SYNC)])
    monkeypatch.setenv("DS4MLX_KERNELS", "emulate")
    return main(["selftest", "--model", str(demo_dir)])


@pytest.mark.parametrize("how", ["compile", "wrong"])
def test_selftest_grid_sync_not_compiling_is_not_available_but_wrong_fails(
        how, demo_dir, monkeypatch, capsys):
    """macOS 14 (no Metal 3.2): the probe does not compile, a platform limit: selftest says what
    it needs and that the kernels keep their one-threadgroup forms, and exits 0. A probe that
    compiles and gives a wrong sum is a fault: FAIL, exit 1."""
    new = "s = simd_sum(s); metal_3_1_has_no_fence();" if how == "compile" else \
        "s = 1.5f * simd_sum(s);"
    break_kernel(monkeypatch, "grid.metal", "grid_sum", "s = simd_sum(s);", new)
    rc = _grid_selftest(demo_dir, monkeypatch)
    out = capsys.readouterr().out
    lines = out.splitlines()
    probe = [line for line in lines if line.startswith("grid_sum")]
    assert len(probe) == 2, out
    grid_rows = [line for line in lines if line.startswith("hc_pre") and "grid form" in line]
    if how == "compile":
        assert rc == 0, out
        for line in probe:
            assert "not available: " in line and "FAIL" not in line, line
            assert "macOS 15 (Metal 3.2" in line and "keep their one-threadgroup forms" in line
        assert "hc_pre (float32, hc_mult=4, grid=1): not checked, grid_sync is not available" in out
        assert grid_rows == []  # nothing of the grid form is tried where it cannot build
        assert "all 4 kernel checks passed" in out  # hc_pre's one-threadgroup form
        assert "grid_sync is not available on this machine: the multi-threadgroup forms need " \
               "macOS 15" in out
        assert "FAIL" not in out
    else:
        assert rc == 1, out
        assert all("FAIL" in line and "not available" not in line for line in probe), out
        assert len(grid_rows) == 3 and not any("FAIL" in line for line in grid_rows)
        assert "2 of 9 kernel checks FAILED" in out


def test_counters_are_zeroed_slots_taken_in_turn():
    d = kernels.dispatch
    first = [d.counter("test_site", 3) for _ in range(d.COUNTER_SLOTS)]
    assert all(c.dtype == mx.uint32 and c.size == 8 for c in first)  # >= 8: `device` space
    assert not any(np.asarray(c).any() for c in first)
    ptrs = {np.asarray(c).__array_interface__["data"][0] for c in first}
    assert len(ptrs) == d.COUNTER_SLOTS  # consecutive launches never share a counter
    again = np.asarray(d.counter("test_site", 3)).__array_interface__["data"][0]
    assert again == np.asarray(first[0]).__array_interface__["data"][0]  # a full turn later
    assert d.counter("test_site", 100).size >= 100  # grows for more rows


def test_a_pass_is_recorded_and_later_runs_skip_the_check(first_use, monkeypatch):
    calls = []
    real = check.run_spec
    monkeypatch.setattr(check, "run_spec", lambda spec, **kw: (
        spec.variant == "hc_pre" and calls.append(spec)) or real(spec, **kw))
    rng = np.random.default_rng(7)
    h = mx.array(rng.standard_normal((1, 4, 40)).astype(np.float32))
    fn = mx.array(rng.standard_normal((24, 160)).astype(np.float32) * 0.1)

    def hc():
        return kernels.hc_pre(h, fn, mx.zeros((24,)), mx.ones((3,)), iters=2, eps=1e-6,
                              norm_eps=1e-6)

    hc(), hc()
    assert len(calls) == 1 and calls[0].hc_mult == 4
    assert len(list(first_use.glob("kernel-checks/hc_pre-float32-*.json"))) == 1
    check.reset()  # as a new process would start: the record on disk answers
    hc()
    assert len(calls) == 1
    check.reset()
    monkeypatch.setenv("DS4MLX_KERNEL_CHECK", "fresh")
    hc()
    assert len(calls) == 2
    # changed kernel sources are checked again, whatever is recorded
    check.reset()
    monkeypatch.setenv("DS4MLX_KERNEL_CHECK", "on")
    break_kernel(monkeypatch, "hc.metal", "hc_pre", HC_WRITE, HC_WRITE + " // edited")
    hc()
    assert len(calls) == 3
    check.reset()
    monkeypatch.setenv("DS4MLX_KERNEL_CHECK", "off")
    hc()
    assert len(calls) == 3


def test_selftest_on_the_demo_model(demo_dir, monkeypatch, capsys):
    monkeypatch.setenv("DS4MLX_KERNELS", "emulate")
    assert main(["selftest", "--model", str(demo_dir)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    kernels_seen = {(r[0], r[1]) for r in rows if len(r) > 2}
    # the demo model's experts are MLX mxfp4: every MoE kernel with them, and the HC kernel
    for name in ("dequant_rows", "moe_gate_up_decode", "moe_down_decode", "moe_matmul_sorted"):
        assert (name, "MXFP4-mlx") in kernels_seen, out
    assert ("hc_pre", "hc_pre") in kernels_seen
    # the grid form's probe, and hc_pre in that form too (the emulator has the fence)
    assert ("grid_sum", "grid_sync") in kernels_seen
    assert any(line.startswith("hc_pre") and "grid form" in line for line in out.splitlines())
    assert "ids in constant" in out and "ids in device" in out  # both placements of the ids
    # and the fused kernels at the demo's dims
    for name, variant in (("attn_decode", "attention"), ("rope_rows", "rope_rows"),
                          ("indexer_scores", "indexer"), ("indexer_topk", "indexer"),
                          ("index_q", "indexer"), ("indexer_scores_q", "indexer"),
                          ("indexer_pick_q", "indexer"), ("grid_sum", "grid_sync"),
                          ("router_topk", "router"),
                          ("comp_rows", "rope_rows")):
        assert (name, variant) in kernels_seen, out
    # the MXFP4-mlx cases include the decode kernels with the shared expert folded in, in each
    # layout it may take (float rows, Q8_0 blocks, MLX mxfp8, affine 8-bit by scale dtype)
    for name in ("moe_gate_up_decode", "moe_down_decode"):
        for shared in ("shared float32", "shared Q8_0", "shared mxfp8", "shared affine8 float16",
                       "shared affine8 float32", "shared affine8 bfloat16"):
            assert any(line.startswith(f"{name} + shared") and "MXFP4-mlx" in line
                       and shared in line for line in out.splitlines()), (name, shared, out)
    # the router's selection inside moe_gate_up_decode: with the format's kernels, and at the
    # router's dims (top-6 of 8)
    for variant in ("MXFP4-mlx", "router"):
        assert any(line.startswith("moe_gate_up_decode + route") and variant in line
                   for line in out.splitlines()), (variant, out)
    # dense_matvec (the decode step's FP8 [wq_a | wkv] beside the indexer's BF16 weights): one
    # part in each layout, two unlike parts, the grouped form
    for kernel in ("gguf_matvec ", "gguf_matvec two parts", "gguf_matvec grouped"):
        assert any(line.startswith(kernel) and "dense_matvec" in line
                   for line in out.splitlines()), (kernel, out)
    assert "all 82 kernel checks passed" in out


def test_a_selftest_pass_spares_the_first_use_check(demo, demo_dir, monkeypatch, capsys):
    monkeypatch.setenv("DS4MLX_KERNELS", "emulate")
    assert main(["selftest", "--model", str(demo_dir)]) == 0  # records into $DS4MLX_CACHE
    monkeypatch.setenv("DS4MLX_KERNEL_CHECK", "on")
    check.reset()
    calls = []
    monkeypatch.setattr(check, "run_spec", lambda spec, **kw: calls.append(spec) or [])
    found = []
    real = check.recorded
    monkeypatch.setattr(check, "recorded", lambda spec: found.append(spec.variant) or real(spec))
    kernels.set_backend()
    model = demo[0]
    cache = model.make_cache()
    tokens = mx.array([[5, 17, 300, 2, 999, 4, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987,
                        7, 9, 11, 3, 1]])
    for a, b in ((0, 21), (21, 22)):  # a prefill and a decode step that picks compressed rows
        mx.eval(model(tokens[:, a:b], cache=cache))
    # every variant looked up its record
    # indexer: the queries (prefill), then queries, scores and top-k in one launch (decode, the
    # grid form); rope_rows: alone (prefill) and with the q_norm rows; hc_pre: the
    # one-threadgroup form (prefill) and the grid form (decode), checked apart
    # dense_matvec: the decode step's [wq_a | wkv] (FP8) beside the indexer's BF16 weights
    assert sorted(found) == ["MXFP4-mlx", "attention", "dense_matvec", "grid_sync", "hc_pre",
                             "hc_pre", "indexer", "indexer", "rope_rows", "rope_rows",
                             "router"], found
    assert calls == [] and kernels.disabled() == {}
    check.reset()


def test_selftest_fails_on_a_broken_kernel(demo_dir, monkeypatch, capsys):
    monkeypatch.setenv("DS4MLX_KERNELS", "emulate")
    write = "y[ulong(tok) * uint(D) + row0 + t] = OutT(total);"
    break_kernel(monkeypatch, "moe.metal", "moe_down_decode", write,
                 write.replace("OutT(total)", "OutT(part[0])"))
    assert main(["selftest", "--model", str(demo_dir)]) == 1
    out = capsys.readouterr().out
    failing = [line for line in out.splitlines() if "FAIL" in line and "checks" not in line]
    assert failing and all(line.startswith("moe_down_decode") for line in failing), out
    assert "kernel checks FAILED" in out


def test_demo_model_with_a_broken_kernel_gives_the_ops_path_logits(demo, first_use, monkeypatch,
                                                                   capfd):
    model, _ = demo
    tokens = mx.array([[5, 17, 300, 2, 999]])
    path = kernels.backend()
    kernels.set_backend("ops")
    ref = model(tokens)
    mx.eval(ref)
    kernels.set_backend(path)
    break_kernel(monkeypatch, "moe.metal", "moe_gate_up_decode", GATE_UP_WRITE,
                 GATE_UP_WRITE.replace("= ds4_swiglu", "= 1.5f * ds4_swiglu"))
    got = model(tokens)
    lines = warnings_in(capfd.readouterr().err)
    # the experts' variant, and the router's, whose check runs its selection inside that kernel
    assert len(lines) == 2 and "kernel MXFP4-mlx (float32) switched off" in lines[0], lines
    assert "kernel router (float32" in lines[1] and "moe_gate_up_decode + route" in lines[1], lines
    # hc_pre passed its check and still runs as a kernel: equal up to float32 rounding
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def q2_gguf(tmp_path_factory):
    """A 2-layer tiny checkpoint as a q2-style GGUF (IQ2_XXS gate/up, Q2_K down, Q8_0 rest)."""
    from ds4mlx.convert import convert
    from ds4mlx.synthetic import write_tiny_checkpoint

    d = tmp_path_factory.mktemp("selftest-q2")
    ckpt = write_tiny_checkpoint(d / "ckpt", seed=5, num_layers=2, num_hash_layers=1, mtp=False)
    return convert(ckpt, d / "q2.gguf", to="gguf", preset="ds4-q2", progress=False)


@pytest.mark.parametrize("which", ["demo", pytest.param("q2", marks=pytest.mark.slow)])
def test_selftest_lists_what_the_model_dispatches(which, demo_dir, request, monkeypatch):
    """The variants selftest derives from the headers are exactly those a forward pass asks
    the first-use check about (prefill and decode)."""
    from ds4mlx import load
    from ds4mlx.selftest import model_specs

    source = demo_dir if which == "demo" else request.getfixturevalue("q2_gguf")
    monkeypatch.setenv("DS4MLX_KERNELS", "emulate")
    kernels.set_backend()
    asked = set()

    def spy(variant, dtype, **dims):
        # what the check keys its verdict by: the variant, dtype and template dims
        asked.add((variant, dtype, check.Spec(variant, dtype, **dims).key()))
        # the ops twins serve: no kernel needs compiling here; grid_sync passes, so that the
        # grid forms (which have their own checks) are asked about too
        return variant == kernels.GRID_SYNC

    monkeypatch.setattr(check, "passes", spy)
    model, _ = load(source)
    cache = model.make_cache()
    tokens = mx.array([[3, 50, 7, 900, 12, 4, 4, 8, 100, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                        16, 17, 18]])
    # a prefill (tiled kernels), then decode steps: the fused attention and row kernels, and
    # the indexer once a query sees more compressed rows than its top-k
    for a, b in ((0, 21), (21, 22), (22, 23)):
        mx.eval(model(tokens[:, a:b], cache=cache))
    listed = {(s.variant, s.dtype, s.key()) for s in model_specs(str(source))}
    assert asked and listed == asked
    # dense_matvec: the q2 file's Q8_0 projections (float16 scales, float32 x); the demo's FP8
    # attention beside the indexer's BF16 head weights
    fused = {"hc_pre", "grid_sync", "attention", "rope_rows", "router", "dense_matvec"}
    # the demo has ratio-4 layers (indexer); the 2-layer checkpoint's are ratio 0 and 128
    expected = {"IQ2_XXS", "Q2_K"} if which == "q2" else {"MXFP4-mlx", "indexer", "grid_sync"}
    assert {v for v, _, _ in listed} == expected | fused

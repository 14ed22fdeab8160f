"""The emulator's strict passes (ds4mlx/kernels/emu.py): each class of kernel bug that a real
GPU would refuse or break has a deliberately broken kernel here that must fail, next to a fixed
twin that must pass."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from ds4mlx.kernels import emu as kernel_emu
from ds4mlx.kernels.emu import KernelEmulationError

pytestmark = pytest.mark.skipif(kernel_emu.compiler() is None, reason="no C++ compiler")
needs_clang = pytest.mark.skipif(kernel_emu.syntax_compiler() is None,
                                 reason="no clang for the address-space pass")


def run(source: str, inputs, n_out: int, *, header: str = "", tg: int = 32, name: str,
        dtype=mx.float32, input_names=("x",)):
    k = kernel_emu.metal_kernel(name=name, input_names=list(input_names), output_names=["out"],
                                source=source, header=header)
    return k(inputs=inputs, grid=(n_out, 1, 1), threadgroup=(tg, 1, 1),
             output_shapes=[(n_out,)], output_dtypes=[dtype])[0]


# ------------------------------------------------------------------------- address spaces
DEVICE_HELPER = """
METAL_FUNC float first(const device float* p) { return p[0]; }
METAL_FUNC float total(thread const float* p, int n) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) s += p[i];
  return s;
}
"""


@needs_clang
def test_small_input_is_constant_and_device_helper_rejects_it():
    src = "out[thread_position_in_grid.x] = first(x);"
    # 8 elements: MLX passes a `device` pointer, the helper takes it
    ok = run(src, [mx.full((8,), 3.0)], 4, header=DEVICE_HELPER, name="as_ok")
    assert np.asarray(ok).tolist() == [3.0] * 4
    # 5 elements: MLX makes it `constant`; Metal refuses the call, so must the emulator
    # (the reason: no overload takes a `constant` pointer; the same source at 8 elements passed)
    with pytest.raises(KernelEmulationError, match="as_small: the kernel does not compile.*\n"
                       ".*no matching function for call to 'first'"):
        run(src, [mx.full((5,), 3.0)], 4, header=DEVICE_HELPER, name="as_small")


@needs_clang
def test_threadgroup_array_passed_as_thread_pointer_is_rejected():
    src = """
threadgroup float buf[32];
buf[thread_index_in_threadgroup] = x[thread_position_in_grid.x];
threadgroup_barrier(mem_flags::mem_threadgroup);
out[thread_position_in_grid.x] = total(buf, 32);
"""
    with pytest.raises(KernelEmulationError, match="as_tg: the kernel does not compile.*\n"
                       ".*no matching function for call to 'total'"):
        run(src, [mx.ones((32,))], 32, header=DEVICE_HELPER, name="as_tg")
    fixed = src.replace("total(buf, 32)", "buf[0] * 32.0f")
    assert np.asarray(run(fixed, [mx.ones((32,))], 32, name="as_tg_fixed")).tolist() == [32.0] * 32


# ------------------------------------------------------------------------- extensions
@pytest.mark.parametrize("body,fixed,why", [
    ("int n = int(x[0]);\nfloat tmp[n];\ntmp[0] = 1.0f;\nout[0] = tmp[0];",
     "float tmp[4];\ntmp[0] = 1.0f;\nout[0] = tmp[0];", "variable length arrays"),  # -> 1
    ("out[0] = ({ float v = x[0]; v + 1.0f; });", "float v = x[0];\nout[0] = v + 1.0f;",
     "GNU statement expression"),  # -> 5
])
def test_vla_and_gnu_extensions_are_refused(body, fixed, why):
    with pytest.raises(KernelEmulationError, match=f"ext_broken: the kernel does not compile.*\n.*{why}"):
        run(body, [mx.full((8,), 4.0)], 1, tg=1, name="ext_broken")
    got = run(fixed, [mx.full((8,), 4.0)], 1, tg=1, name="ext_fixed")  # the same without it
    assert np.asarray(got).tolist() == ([1.0] if "tmp" in fixed else [5.0])


# ------------------------------------------------------------------------- threadgroup memory
def test_threadgroup_memory_over_32kb_is_refused():
    src = """
threadgroup float big[NWORDS];
big[thread_index_in_threadgroup] = x[0];
threadgroup_barrier(mem_flags::mem_threadgroup);
out[thread_position_in_grid.x] = big[0];
"""
    ok = run(src.replace("NWORDS", "8192"), [mx.ones((8,))], 32, name="tg_32k")  # 32 KB: fits
    assert np.asarray(ok).tolist() == [1.0] * 32
    with pytest.raises(KernelEmulationError, match="over Metal's 32768-byte limit"):
        run(src.replace("NWORDS", "16384"), [mx.ones((8,))], 32, name="tg_64k")


def test_threadgroup_memory_starts_as_garbage():
    # Broken: assumes threadgroup memory starts zeroed (it does not on a GPU) and only writes
    # half of it; the emulator poisons it with 0xFF bytes (NaN) at every threadgroup start.
    src = """
threadgroup float acc[64];
uint t = thread_index_in_threadgroup;
if (t < 32) acc[t] = x[t];
threadgroup_barrier(mem_flags::mem_threadgroup);
out[thread_position_in_grid.x] = acc[t] + ZERO_FILL;
"""
    broken = np.asarray(run(src.replace("ZERO_FILL", "0.0f"), [mx.ones((32,))], 128, tg=64,
                            name="tg_unzeroed"))
    assert (broken.reshape(2, 64)[:, :32] == 1).all()
    assert np.isnan(broken.reshape(2, 64)[:, 32:]).all()
    fixed = src.replace("if (t < 32) acc[t] = x[t];", "acc[t] = t < 32 ? x[t] : 0.0f;")
    out = np.asarray(run(fixed.replace("ZERO_FILL", "0.0f"), [mx.ones((32,))], 128, tg=64,
                         name="tg_zeroed")).reshape(2, 64)
    assert (out[:, :32] == 1).all() and (out[:, 32:] == 0).all()


# ------------------------------------------------------------------------- lane order
LANE0 = """
threadgroup float shared_v;
uint t = thread_index_in_threadgroup;
uint g = threadgroup_position_in_grid.x;
if (t == 0) shared_v = x[g] * 2.0f;
BARRIER
out[thread_position_in_grid.x] = shared_v + float(t);
"""


def test_missing_barrier_after_lane0_write_fails():
    x = mx.arange(8, dtype=mx.float32)
    with pytest.raises(KernelEmulationError, match="lane0_racy: output out depends on the order"):
        run(LANE0.replace("BARRIER", ""), [x], 8 * 64, tg=64, name="lane0_racy")
    fixed = LANE0.replace("BARRIER", "threadgroup_barrier(mem_flags::mem_threadgroup);")
    out = np.asarray(run(fixed, [x], 8 * 64, tg=64, name="lane0_fixed")).reshape(8, 64)
    np.testing.assert_array_equal(out, np.arange(8)[:, None] * 2.0 + np.arange(64)[None, :])


# ------------------------------------------------------------------------- fast math
BUCKET = "uint i = thread_position_in_grid.x;\nout[i] = floor(LOG2(x[i]));"


def test_fast_math_breaks_a_kernel_that_needs_exact_log2():
    # Bucket index floor(log2(x)) of powers of two: exact with precise::, off by one for the
    # ones whose fast log2 lands a few ulp below the integer.
    powers = np.ldexp(1.0, np.arange(-40, 40)).astype(np.float32)
    x = mx.array(powers)
    exact = np.arange(-40, 40, dtype=np.float32)
    precise = np.asarray(run(BUCKET.replace("LOG2", "precise::log2"), [x], 80, name="b_precise"))
    np.testing.assert_array_equal(precise, exact)
    for qual in ("fast::log2", "metal::log2"):  # unqualified math counts as fast
        got = np.asarray(run(BUCKET.replace("LOG2", qual), [x], 80, name="b_fast"))
        assert (got != exact).any()
        assert (np.abs(got - exact) <= 1).all()


def test_fast_math_stays_within_4_ulp():
    rng = np.random.default_rng(0)
    x = mx.array(rng.uniform(-20, 20, 4096).astype(np.float32))
    src = "uint i = thread_position_in_grid.x;\nout[i] = FN(x[i]);"
    fast = np.asarray(run(src.replace("FN", "fast::exp"), [x], 4096, tg=256, name="m_fast"))
    exact = np.asarray(run(src.replace("FN", "precise::exp"), [x], 4096, tg=256, name="m_exact"))
    ulps = np.abs(fast.view(np.int32).astype(np.int64) - exact.view(np.int32).astype(np.int64))
    assert ulps.max() == 4 and (ulps > 0).mean() > 0.5
    ref = np.exp(np.asarray(x).astype(np.float64))
    np.testing.assert_allclose(exact, ref, rtol=2e-7)


# ------------------------------------------------------------------------- simdgroup matrices
# x [64] as an 8 x 8 matrix, squared by each simdgroup, stored to out [S, 64]. BODY is the
# multiply; the broken variants below break one of Metal's rules for simdgroup matrices.
SGM = """
threadgroup float xs[64];
uint t = thread_index_in_threadgroup;
uint lane = thread_index_in_simdgroup;
if (t < 64) xs[t] = x[t];
threadgroup_barrier(mem_flags::mem_threadgroup);
simdgroup_float8x8 a;
simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
LOAD
BODY
simdgroup_store(acc, out + simdgroup_index_in_threadgroup * 64, 8);
"""
SGM_LOAD = "simdgroup_load(a, xs, 8);"
SGM_MMA = "simdgroup_multiply_accumulate(acc, a, a, acc);"


def run_sgm(name: str, body: str = SGM_MMA, load: str = SGM_LOAD, *, tg: int = 64,
            x: mx.array | None = None, header: str = ""):
    x = mx.arange(64, dtype=mx.float32) / 64 if x is None else x
    src = SGM.replace("LOAD", load).replace("BODY", body)
    k = kernel_emu.metal_kernel(name=name, input_names=["x"], output_names=["out"], source=src,
                                header=header)
    n = (tg + 31) // 32 * 64
    return k(inputs=[x], grid=(tg, 1, 1), threadgroup=(tg, 1, 1), output_shapes=[(n,)],
             output_dtypes=[mx.float32])[0]


def test_simdgroup_matrix_fixed_twin_passes():
    m = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    out = np.asarray(run_sgm("sgm_ok")).reshape(2, 8, 8)
    np.testing.assert_allclose(out, np.stack([m @ m] * 2), rtol=1e-6)


@pytest.mark.parametrize("body,match", [
    # half the lanes multiply, the others go on to the store: lanes at different collectives
    ("if (lane < 16) " + SGM_MMA, "different simd collectives"),
    # both halves multiply, but from two call sites (a divergent branch on the GPU)
    ("if (lane < 16) " + SGM_MMA + "\nelse " + SGM_MMA, "different call sites"),
    # the lanes past 16 returned: the multiply runs on a partial simdgroup
    ("if (lane >= 16) return;\n" + SGM_MMA, "16 of the 32 lanes of simdgroup 0 take part"),
])
def test_simdgroup_matrix_from_a_lane_subset_fails(body, match):
    with pytest.raises(KernelEmulationError, match=f"sgm_subset: .*{match}"):
        run_sgm("sgm_subset", body)


def test_simdgroup_matrix_in_a_partial_simdgroup_fails():
    # 48 threads: the second simdgroup has 16 lanes, short of what a matrix operation needs
    with pytest.raises(KernelEmulationError,
                       match="simdgroup_load: 16 of the 32 lanes of simdgroup 1 take part"):
        run_sgm("sgm_partial", tg=48)


def test_simdgroup_load_with_lane_dependent_arguments_fails():
    with pytest.raises(KernelEmulationError, match="simdgroup_load: the lanes of simdgroup 0 "
                       "reached it from different call sites or with different arguments"):
        run_sgm("sgm_args", load="simdgroup_load(a, xs, 8, ulong2(0, 0), lane % 2 == 0);")
    # the same transpose flag in every lane: a^T a^T
    m = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    out = np.asarray(run_sgm("sgm_args_ok", load="simdgroup_load(a, xs, 8, ulong2(0, 0), true);"))
    np.testing.assert_allclose(out.reshape(2, 8, 8)[0], m.T @ m.T, rtol=1e-6)


def test_simdgroup_load_past_the_threadgroup_array_fails():
    # origin row 1 of an 8-row array: the last row lies past the declaration
    with pytest.raises(KernelEmulationError, match="simdgroup_load: threadgroup access at byte "
                       "256, past the 256 bytes"):
        run_sgm("sgm_past", load="simdgroup_load(a, xs, 8, ulong2(0, 1));")


@needs_clang
@pytest.mark.parametrize("load,n", [
    ("simdgroup_load(a, x, 8);", 4),  # 4 elements: MLX passes them `constant`
    ("float loc[64];\nfor (int i = 0; i < 64; ++i) loc[i] = 0.0f;\nsimdgroup_load(a, loc, 8);", 64),
    ("simdgroup_half8x8 h;\nsimdgroup_load(h, xs, 8);", 64),  # a half matrix from float memory
])
def test_simdgroup_load_from_a_space_or_type_metal_lacks_fails(load, n):
    with pytest.raises(KernelEmulationError, match="sgm_space: the kernel does not compile.*\n"
                       ".*no matching function for call to 'simdgroup_load'"):
        run_sgm("sgm_space", load=load, x=mx.zeros((n,)))
    ok = run_sgm("sgm_space_ok", load="simdgroup_load(a, x, 8);", x=mx.ones((64,)))  # device
    assert (np.asarray(ok) == 8.0).all()


def test_simdgroup_load_needs_a_barrier_after_other_simdgroups_write():
    # Broken: the second simdgroup writes half of the tile and nothing orders that before the
    # first simdgroup's load (the lane orders show it); the fixed twin has the barrier.
    racy = SGM.replace("threadgroup_barrier(mem_flags::mem_threadgroup);\n", "")
    k = kernel_emu.metal_kernel(name="sgm_racy", input_names=["x"], output_names=["out"],
                                source=racy.replace("LOAD", SGM_LOAD).replace("BODY", SGM_MMA))
    with pytest.raises(KernelEmulationError, match="sgm_racy: output out depends on the order"):
        k(inputs=[mx.arange(64, dtype=mx.float32)], grid=(64, 1, 1), threadgroup=(64, 1, 1),
          output_shapes=[(128,)], output_dtypes=[mx.float32])


def test_unset_simdgroup_matrix_and_scalar_constructor_are_not_zero():
    # An accumulator never set is garbage on the GPU (NaN here); `simdgroup_float8x8(0.5f)` is
    # a diagonal matrix, not a filled one.
    garbage = np.asarray(run_sgm("sgm_unset", body="simdgroup_float8x8 c;\n"
                                 "simdgroup_multiply_accumulate(acc, a, a, c);"))
    assert np.isnan(garbage).all()
    diag = np.asarray(run_sgm("sgm_diag", body="acc = simdgroup_float8x8(0.5f);"))
    np.testing.assert_array_equal(diag.reshape(2, 8, 8)[0], 0.5 * np.eye(8))


# ------------------------------------------------------------------------- threadgroup order
# The last-threadgroup pattern of metal/grid.h: each threadgroup of 32 lanes sums its chunk of
# x into part[g]; one threadgroup then adds the parts. LAST picks that one, ORDER the order it
# reads them in, RESET puts the counter back.
GRID = """
threadgroup uint last_flag[1];
uint g = threadgroup_position_in_grid.x;
uint groups = threadgroups_per_grid.x;
uint t = thread_index_in_threadgroup;
device atomic_uint* parts = (device atomic_uint*)part;
device atomic_uint* cnt = (device atomic_uint*)counter;
float s = simd_sum(x[g * 32 + t]);
if (t == 0) ds4_grid_put(parts + g, s);
LAST
if (t == 0) {
  float total = 0.0f;
  for (uint c = 0; c < groups; ++c) total += ds4_grid_get(parts + ORDER);
  out[0] = total;
}
RESET
"""
COUNTED = "if (!ds4_grid_last(cnt, groups, t, last_flag)) return;"
RESET = "ds4_grid_reset(cnt, t);"


def run_grid(name: str, x: mx.array, last: str = COUNTED, order: str = "c", reset: str = RESET,
             counter: mx.array | None = None) -> mx.array:
    from ds4mlx.kernels.source import METAL_DIR

    header = (METAL_DIR / "grid.h").read_text().replace("#pragma once", "")
    src = GRID.replace("LAST", last).replace("ORDER", order).replace("RESET", reset)
    k = kernel_emu.metal_kernel(name=name, input_names=["x", "counter"],
                                output_names=["out", "part"], source=src, header=header)
    groups = x.size // 32
    counter = mx.zeros((8,), dtype=mx.uint32) if counter is None else counter
    return k(inputs=[x, counter], grid=(32 * groups, 1, 1), threadgroup=(32, 1, 1),
             output_shapes=[(1,), (groups,)], output_dtypes=[mx.float32, mx.uint32])[0]


def test_reading_other_threadgroups_results_without_the_counter_fails(monkeypatch):
    # Broken: the threadgroup with the highest id adds the parts, as if it ran last; it does on
    # one OS thread in forward order, not when the threadgroups start reversed or shuffled.
    monkeypatch.setenv("DS4MLX_EMU_THREADS", "1")
    monkeypatch.setenv("DS4MLX_EMU_GROUPS", "forward")
    x = mx.array(np.random.default_rng(0).standard_normal(16 * 32).astype(np.float32))
    with pytest.raises(KernelEmulationError, match="grid_uncounted: output out depends on the "
                       "order the lanes or the threadgroups run in"):
        run_grid("grid_uncounted", x, last="if (g != groups - 1) return;", reset="")
    # fixed: counted in, on 2 OS threads (real atomics), the threadgroups shuffled
    monkeypatch.setenv("DS4MLX_EMU_THREADS", "2")
    monkeypatch.setenv("DS4MLX_EMU_GROUPS", "shuffled")
    counter = mx.zeros((8,), dtype=mx.uint32)
    for _ in range(3):  # the order check runs the first launch 3 times; then 2 more launches
        got = run_grid("grid_counted", x, counter=counter)
        np.testing.assert_allclose(np.asarray(got), [np.asarray(x).sum()], rtol=1e-5)
    assert np.asarray(counter).tolist() == [0] * 8


def test_summing_parts_in_the_order_they_arrive_fails(monkeypatch):
    # Broken: the last threadgroup starts from its own part, so the float sum's order (and its
    # rounding) depends on which one was last: 1e8 - 1e8 + 1 = 1, but 1 + 1e8 - 1e8 = 0.
    monkeypatch.setenv("DS4MLX_EMU_GROUPS", "forward")
    x = np.zeros(3 * 32, np.float32)
    x[0], x[32], x[64] = 1e8, -1e8, 1.0
    x = mx.array(x)
    with pytest.raises(KernelEmulationError, match="grid_arrival: output out depends on the order"):
        run_grid("grid_arrival", x, order="(g + c) % groups")
    monkeypatch.setenv("DS4MLX_EMU_GROUPS", "shuffled")
    assert np.asarray(run_grid("grid_fixed_order", x)).tolist() == [1.0]  # chunk order, exactly


def test_a_counter_not_put_back_fails():
    x = mx.ones((4 * 32,))
    with pytest.raises(KernelEmulationError, match="grid_no_reset: the launch left input counter "
                       "changed"):
        run_grid("grid_no_reset", x, reset="")


def test_atomic_functions_take_relaxed_order_only():
    src = """
device atomic_uint* c = (device atomic_uint*)x;
uint seen = atomic_fetch_add_explicit(c, 1u, ORDER);
atomic_fetch_sub_explicit(c, 1u, memory_order_relaxed);
out[thread_position_in_grid.x] = float(seen);
"""
    with pytest.raises(KernelEmulationError, match="atomic_fetch_add_explicit: Metal's atomic "
                       "functions take memory_order_relaxed only"):
        run(src.replace("ORDER", "memory_order_seq_cst"), [mx.zeros((8,), dtype=mx.uint32)], 1,
            tg=1, name="atomic_seq_cst")
    ok = run(src.replace("ORDER", "memory_order_relaxed"), [mx.zeros((8,), dtype=mx.uint32)], 1,
             tg=1, name="atomic_relaxed")
    assert np.asarray(ok).tolist() == [0.0]

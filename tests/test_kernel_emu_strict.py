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

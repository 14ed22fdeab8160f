"""The Metal emulation harness itself (ds4mlx/kernels/emu.py), on small kernels.

Each kernel runs through the emulator and, on a Mac, through ``mx.fast.metal_kernel`` too; the
expectations come from numpy / MLX ops or from the definition of the operation.
"""

from __future__ import annotations

import subprocess

import mlx.core as mx
import numpy as np
import pytest

from ds4mlx.kernels import emu as kernel_emu
from ds4mlx.kernels.emu import KernelEmulationError
from kernel_paths import PATHS

HAS_CXX = kernel_emu.compiler() is not None
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for the Metal emulator")


@pytest.fixture(params=PATHS)
def make(request):
    return kernel_emu.metal_kernel if request.param == "emulate" else mx.fast.metal_kernel


EXP = """
uint i = thread_position_in_grid.x;
if (i >= uint(n)) return;
out[i] = T(metal::exp(float(inp[i])));
"""


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-6), (mx.float16, 1e-3), (mx.bfloat16, 8e-3)])
def test_elementwise_with_dtype_template(make, dtype, tol):
    k = make(name="emu_exp", input_names=["inp", "n"], output_names=["out"], source=EXP)
    a = (mx.random.normal((5, 19), key=mx.random.key(0)) * 2).astype(dtype)
    (out,) = k(inputs=[a, a.size], template=[("T", dtype)], grid=(128, 1, 1),
               threadgroup=(32, 1, 1), output_shapes=[a.shape], output_dtypes=[dtype])
    ref = mx.exp(a.astype(mx.float32))
    assert out.dtype == dtype
    assert mx.allclose(out.astype(mx.float32), ref, rtol=tol, atol=0).item()


CONVERT = """
uint i = thread_position_in_grid.x;
to_half[i] = half(x[i]);
to_bf[i] = bfloat16_t(x[i]);
from_half[i] = float(h[i]);
from_bf[i] = float(b[i]);
"""


def test_half_and_bfloat_conversions_round_like_mlx(make):
    rng = np.random.default_rng(0)
    special = [0.0, -0.0, 1.0, 65504.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8, 1e-40, np.inf, -np.inf,
               np.nan, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3e38]
    vals = np.concatenate([special, rng.standard_normal(46) * 10.0 ** rng.integers(-6, 6, 46)])
    x = mx.array(vals.astype(np.float32))
    h = x.astype(mx.float16)
    b = x.astype(mx.bfloat16)
    k = make(name="emu_convert", input_names=["x", "h", "b"],
             output_names=["to_half", "to_bf", "from_half", "from_bf"], source=CONVERT)
    n = x.size
    to_half, to_bf, from_half, from_bf = k(
        inputs=[x, h, b], grid=(n, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(n,)] * 4,
        output_dtypes=[mx.float16, mx.bfloat16, mx.float32, mx.float32])
    # round to nearest even, overflow to inf, signed zeros, NaN stays NaN: what MLX does
    for got, ref in ((to_half, h), (to_bf, b)):
        nan = mx.isnan(ref)
        assert mx.array_equal(mx.isnan(got), nan).item()
        bits, ref_bits = got.view(mx.uint16), ref.view(mx.uint16)
        assert mx.all(mx.where(nan, True, bits == ref_bits)).item()
    assert mx.array_equal(from_half, h.astype(mx.float32), equal_nan=True).item()
    assert mx.array_equal(from_bf, b.astype(mx.float32), equal_nan=True).item()


ROWSUM_HEADER = """
// Sum of the per-simdgroup partials, through a threadgroup pointer parameter.
METAL_FUNC float partial_total(threadgroup float* partial, uint n) {
  float s = 0.0f;
  for (uint i = 0; i < n; ++i) s += partial[i];
  return s;
}
"""
ROWSUM = """
uint row = threadgroup_position_in_grid.x;
uint tid = thread_index_in_threadgroup;
uint d = x_shape[1];
threadgroup float partial[32];
float s = 0.0f;
for (uint i = tid; i < d; i += threads_per_threadgroup.x) s += x[row * d + i];
s = simd_sum(s);
if (thread_index_in_simdgroup == 0) partial[simdgroup_index_in_threadgroup] = s;
threadgroup_barrier(mem_flags::mem_threadgroup);
if (tid == 0) out[row] = partial_total(partial, simdgroups_per_threadgroup);
"""


def _rowsum(make, x: mx.array, tg: int) -> mx.array:
    k = make(name="emu_rowsum", input_names=["x"], output_names=["out"], source=ROWSUM,
             header=ROWSUM_HEADER)
    rows = x.shape[0]
    return k(inputs=[x], grid=(rows * tg, 1, 1), threadgroup=(tg, 1, 1), output_shapes=[(rows,)],
             output_dtypes=[mx.float32])[0]


@pytest.mark.parametrize("tg", [32, 96, 256, 1024])
def test_threadgroup_memory_simd_sum_and_barrier(make, tg):
    x = mx.random.normal((7, 1000), key=mx.random.key(1))
    out = _rowsum(make, x, tg)
    ref = np.asarray(x).astype(np.float64).sum(axis=1)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-4)


@needs_cxx
def test_portable_context_switch_and_worker_count_agree(monkeypatch):
    x = mx.random.normal((9, 300), key=mx.random.key(2))
    monkeypatch.setenv("DS4MLX_EMU_THREADS", "1")
    one = _rowsum(kernel_emu.metal_kernel, x, 64)
    monkeypatch.setenv("DS4MLX_EMU_THREADS", "2")
    two = _rowsum(kernel_emu.metal_kernel, x, 64)
    monkeypatch.setenv("DS4MLX_EMU_CXXFLAGS", "-DMTLEMU_UCONTEXT")
    ucontext = _rowsum(kernel_emu.metal_kernel, x, 64)
    assert mx.array_equal(one, two).item() and mx.array_equal(one, ucontext).item()


SHUFFLES = """
uint lane = thread_index_in_simdgroup;
uint base = thread_position_in_grid.x * 10;
uint v = lane * 3 + 1;
out[base + 0] = simd_shuffle(v, ushort(31 - lane));
out[base + 1] = simd_shuffle_xor(v, ushort(5));
out[base + 2] = simd_shuffle_down(v, ushort(3));
out[base + 3] = simd_shuffle_up(v, ushort(2));
out[base + 4] = simd_broadcast(v, ushort(7));
out[base + 5] = simd_prefix_exclusive_sum(v);
out[base + 6] = simd_prefix_inclusive_sum(v);
out[base + 7] = simd_max(v);
out[base + 8] = simd_min(v);
out[base + 9] = simd_sum(v);
"""


def test_simd_shuffles_and_scans(make):
    k = make(name="emu_shuffles", input_names=["dummy"], output_names=["out"], source=SHUFFLES)
    (out,) = k(inputs=[mx.zeros((8,))], grid=(64, 1, 1), threadgroup=(64, 1, 1),
               output_shapes=[(64, 10)], output_dtypes=[mx.uint32])
    out = np.asarray(out)
    v = np.arange(32) * 3 + 1
    lane = np.arange(32)
    expect = np.stack([
        v[31 - lane], v[lane ^ 5],
        np.where(lane + 3 < 32, v[np.minimum(lane + 3, 31)], v),
        np.where(lane >= 2, v[np.maximum(lane - 2, 0)], v),
        np.full(32, v[7]), np.cumsum(v) - v, np.cumsum(v),
        np.full(32, v.max()), np.full(32, v.min()), np.full(32, v.sum()),
    ], axis=1)
    np.testing.assert_array_equal(out[:32], expect)
    np.testing.assert_array_equal(out[32:], expect)  # second simdgroup, same lanes


REVERSE = """
uint t = thread_index_in_threadgroup;
uint n = threads_per_threadgroup.x;
uint g = threadgroup_position_in_grid.x;
threadgroup uint buf[256];
buf[t] = t + 1000 * (g + 1);
BARRIER
out[g * n + t] = buf[n - 1 - t];
"""


def test_barrier_orders_threadgroup_memory(make):
    k = make(name="emu_reverse", input_names=["dummy"], output_names=["out"],
             source=REVERSE.replace("BARRIER", "threadgroup_barrier(mem_flags::mem_threadgroup);"))
    (out,) = k(inputs=[mx.zeros((8,))], grid=(4 * 256, 1, 1), threadgroup=(256, 1, 1),
               output_shapes=[(4 * 256,)], output_dtypes=[mx.uint32])
    t = np.arange(256)
    expect = np.concatenate([(255 - t) + 1000 * (g + 1) for g in range(4)])
    np.testing.assert_array_equal(np.asarray(out), expect)


@needs_cxx
def test_missing_barrier_is_caught_by_lane_orders():
    # Without the barrier, early lanes read slots the later lanes have not written yet; which
    # ones depends on the order lanes run in, and the emulator runs forward, reversed, shuffled.
    k = kernel_emu.metal_kernel(name="emu_reverse_racy", input_names=["dummy"],
                                output_names=["out"], source=REVERSE.replace("BARRIER", ""))
    with pytest.raises(KernelEmulationError, match="depends on the order the lanes"):
        k(inputs=[mx.zeros((8,))], grid=(4 * 256, 1, 1), threadgroup=(256, 1, 1),
          output_shapes=[(4 * 256,)], output_dtypes=[mx.uint32])


@needs_cxx
@pytest.mark.parametrize("source", [
    "if (thread_index_in_threadgroup < 16) return;\n"
    "threadgroup_barrier(mem_flags::mem_threadgroup);\nout[0] = 1.0f;",
    "float v = 1.0f;\nif (thread_index_in_simdgroup < 16) v = simd_sum(v);\n"
    "else threadgroup_barrier(mem_flags::mem_threadgroup);\nout[thread_index_in_threadgroup] = v;",
])
def test_divergent_barriers_are_reported(source):
    k = kernel_emu.metal_kernel(name="emu_diverge", input_names=["dummy"], output_names=["out"],
                                source=source)
    with pytest.raises(KernelEmulationError, match="emu_diverge: divergence"):
        k(inputs=[mx.zeros((8,))], grid=(64, 1, 1), threadgroup=(64, 1, 1),
          output_shapes=[(64,)], output_dtypes=[mx.float32])


ATTRS = """
uint3 p = thread_position_in_grid;
uint i = (p.y * threads_per_grid.x + p.x) * 12;
uint3 l = thread_position_in_threadgroup;
uint3 g = threadgroup_position_in_grid;
uint3 n = threads_per_threadgroup;
out[i + 0] = p.x; out[i + 1] = p.y; out[i + 2] = l.x; out[i + 3] = l.y;
out[i + 4] = g.x; out[i + 5] = g.y; out[i + 6] = n.x; out[i + 7] = n.y;
out[i + 8] = thread_index_in_threadgroup; out[i + 9] = thread_index_in_simdgroup;
out[i + 10] = simdgroup_index_in_threadgroup; out[i + 11] = threadgroups_per_grid.x;
"""


def test_thread_attributes_and_partial_threadgroups(make):
    gx, gy, tx, ty = 70, 3, 32, 2  # 70 = 2 * 32 + 6: the last threadgroup in x is partial
    k = make(name="emu_attrs", input_names=["dummy"], output_names=["out"], source=ATTRS)
    (out,) = k(inputs=[mx.zeros((8,))], grid=(gx, gy, 1), threadgroup=(tx, ty, 1),
               output_shapes=[(gy, gx, 12)], output_dtypes=[mx.uint32])
    out = np.asarray(out)
    for y in range(gy):
        for x in range(gx):
            got = out[y, x]
            size_x = min(tx, gx - (x // tx) * tx)
            size_y = min(ty, gy - (y // ty) * ty)
            assert list(got[:8]) == [x, y, x % tx, y % ty, x // tx, y // ty, size_x, size_y]
            assert got[11] == -(-gx // tx)
            if size_x == tx and size_y == ty:  # linear index and simd split of full groups
                linear = (y % ty) * tx + x % tx
                assert list(got[8:11]) == [linear, linear % 32, linear // 32]


EXTRAS = """
uint i = thread_position_in_grid.x;
if (i == 0) {
  info[0] = a_ndim; info[1] = a_shape[0]; info[2] = a_shape[1];
  info[3] = int(a_strides[0]); info[4] = int(a_strides[1]); info[5] = N; info[6] = FLAG ? 1 : 0;
}
if (i < uint(a_shape[0] * a_shape[1])) out[i] = T(float(a[i]) * s + float(n));
if (i % 2 == 0) partial[i] = 1.0f;
"""


def test_generated_signature_extras_scalars_templates(make):
    base = mx.arange(12, dtype=mx.float32).reshape(3, 4)
    a = base.T  # not row-contiguous: the kernel sees a row-contiguous copy
    k = make(name="emu_extras", input_names=["a", "s", "n"],
             output_names=["out", "info", "partial"], source=EXTRAS)
    out, info, partial = k(
        inputs=[a, 0.5, 3], template=[("T", mx.float32), ("N", 7), ("FLAG", True)],
        grid=(16, 1, 1), threadgroup=(16, 1, 1), output_shapes=[(4, 3), (8,), (16,)],
        output_dtypes=[mx.float32, mx.int32, mx.float32], init_value=5.0)
    assert mx.array_equal(out, a * 0.5 + 3).item()
    assert np.asarray(info)[:7].tolist() == [2, 4, 3, 3, 1, 7, 1]
    assert np.asarray(partial).tolist() == [1.0, 5.0] * 8


@needs_cxx
def test_unwritten_outputs_are_poisoned():
    k = kernel_emu.metal_kernel(name="emu_poison", input_names=["dummy"], output_names=["out"],
                                source="if (thread_position_in_grid.x < 2) "
                                       "out[thread_position_in_grid.x] = 1.0f;")
    (out,) = k(inputs=[mx.zeros((8,))], grid=(4, 1, 1), threadgroup=(4, 1, 1),
               output_shapes=[(4,)], output_dtypes=[mx.float32])
    out = np.asarray(out)
    assert out[:2].tolist() == [1.0, 1.0] and np.isnan(out[2:]).all()


@needs_cxx
def test_compiled_kernels_are_cached_by_source(tmp_path, monkeypatch):
    monkeypatch.setenv("DS4MLX_EMU_CACHE", str(tmp_path))
    k = kernel_emu.metal_kernel(name="emu_cached", input_names=["x"], output_names=["out"],
                                source="out[thread_position_in_grid.x] = "
                                       "x[thread_position_in_grid.x] + 1.0f;")
    x = mx.arange(8, dtype=mx.float32)
    call = dict(inputs=[x], grid=(8, 1, 1), threadgroup=(8, 1, 1), output_shapes=[(8,)],
                output_dtypes=[mx.float32])
    first = k(**call)[0]
    assert len(list(tmp_path.glob("emu_cached-*.so"))) == 1
    monkeypatch.setattr(kernel_emu, "_LIBS", {})

    def no_compiler(*args, **kwargs):
        raise AssertionError("recompiled a cached kernel")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert mx.array_equal(k(**call)[0], first).item()
    assert mx.array_equal(first, x + 1).item()


@needs_cxx
def test_compile_errors_name_the_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("DS4MLX_EMU_CACHE", str(tmp_path))
    k = kernel_emu.metal_kernel(name="emu_broken", input_names=["x"], output_names=["out"],
                                source="out[0] = x[0] +;")
    with pytest.raises(KernelEmulationError, match="emu_broken: the kernel does not compile"):
        k(inputs=[mx.zeros((8,))], grid=(1, 1, 1), threadgroup=(1, 1, 1),
          output_shapes=[(1,)], output_dtypes=[mx.float32])


def test_threadgroup_declarations_are_translated():
    src = ("threadgroup float tile[BM * (BK + 1)];\n  threadgroup uint count;\n"
           "threadgroup float* p = tile;\n")
    out = kernel_emu.translate_source(src)
    lines = out.splitlines()
    assert lines[0] == ("typedef threadgroup float ds4tg_tile_t[BM * (BK + 1)]; ds4tg_tile_t& tile = "
                        "*(ds4tg_tile_t*)mtlemu::tg_alloc(sizeof(ds4tg_tile_t), "
                        "alignof(ds4tg_tile_t));")
    assert lines[1].startswith("  typedef threadgroup uint ds4tg_count_t; ds4tg_count_t& count")
    assert lines[2] == "threadgroup float* p = tile;"
    with pytest.raises(KernelEmulationError, match="unsupported threadgroup declaration"):
        kernel_emu.translate_source("threadgroup float a[2] = {1.0f, 2.0f};\n")


# A [16, 8] (device) times B [8, 16] (staged in threadgroup memory), plus C: simdgroup s owns
# rows 8s..8s+7 of the [16, 16] result, through matrix_origin; `tr` gets B[:, 8:].T through a
# transposed load, `diag` the diagonal constructor, `lanes` the layout thread_elements() shows.
SGM = """
threadgroup T bs[8 * 16];
uint t = thread_index_in_threadgroup;
uint sg = simdgroup_index_in_threadgroup;
uint lane = thread_index_in_simdgroup;
for (uint i = t; i < 128; i += 64) bs[i] = b[i];
threadgroup_barrier(mem_flags::mem_threadgroup);
simdgroup_matrix<T, 8, 8> A;
simdgroup_matrix<T, 8, 8> B;
simdgroup_matrix<T, 8, 8> C;
simdgroup_load(A, a, 8, ulong2(0, sg * 8));
for (uint j = 0; j < 2; ++j) {
  simdgroup_load(B, bs + j * 8, 16);
  simdgroup_load(C, c, 16, ulong2(j * 8, sg * 8));
  simdgroup_matrix<T, 8, 8> D;
  if (sg == 0) simdgroup_multiply_accumulate(D, A, B, C);  // uniform over each simdgroup
  else simdgroup_multiply(D, A, B);
  simdgroup_store(D, out, 16, ulong2(j * 8, sg * 8));
}
simdgroup_load(B, bs, 16, ulong2(8, 0), true);
simdgroup_store(B, tr, 8, ulong2(0, sg * 8));
simdgroup_store(simdgroup_matrix<T, 8, 8>(T(2.0f)), diag, 16, ulong2(8, sg * 8), true);
simdgroup_store(make_filled_simdgroup_matrix<T, 8, 8>(T(3.0f)), diag, 16, ulong2(0, sg * 8));
simdgroup_load(A, a, 8, ulong2(0, 0));
vec<T, 2> mine = A.thread_elements();
lanes[t * 2] = float(mine[0]);
lanes[t * 2 + 1] = float(mine[1]);
"""


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-5), (mx.float16, 1e-2), (mx.bfloat16, 5e-2)])
def test_simdgroup_matrices(make, dtype, tol):
    k = make(name="emu_sgm", input_names=["a", "b", "c"],
             output_names=["out", "tr", "diag", "lanes"], source=SGM)
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(s).astype(np.float32) for s in ((16, 8), (8, 16), (16, 16)))
    a, b, c = (np.asarray(mx.array(v).astype(dtype).astype(mx.float32)) for v in (a, b, c))
    out, tr, diag, lanes = k(
        inputs=[mx.array(v).astype(dtype) for v in (a, b, c)], template=[("T", dtype)],
        grid=(64, 1, 1), threadgroup=(64, 1, 1),
        output_shapes=[(16, 16), (16, 8), (16, 16), (128,)],
        output_dtypes=[dtype, dtype, dtype, mx.float32])
    ref = a @ b
    ref[:8] += c[:8]  # simdgroup 0 accumulates C, simdgroup 1 does not
    np.testing.assert_allclose(np.asarray(out.astype(mx.float32)), ref, rtol=tol, atol=tol)
    np.testing.assert_array_equal(np.asarray(tr.astype(mx.float32)), np.tile(b[:, 8:].T, (2, 1)))
    block = np.concatenate([np.full((8, 8), 3.0), 2.0 * np.eye(8)], axis=1)
    np.testing.assert_array_equal(np.asarray(diag.astype(mx.float32)), np.tile(block, (2, 1)))
    # lane l holds row (l/4 & 4) + (l/2) % 4, columns (l/4 & 2) * 2 + (l % 2) * 2 and the next
    lane = np.arange(32)
    row = (lane // 4 & 4) + (lane // 2) % 4
    col = (lane // 4 & 2) * 2 + (lane % 2) * 2
    expect = np.stack([a[row, col], a[row, col + 1]], axis=1).reshape(-1)
    np.testing.assert_array_equal(np.asarray(lanes), np.tile(expect, 2))

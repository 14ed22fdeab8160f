"""The faster GGUF quantizers give the same bytes as the previous numpy implementation
(``tests/gguf_quant_reference.py``) on random inputs, with and without importance weights, the
IQ2_XXS search gives the same bytes with its C kernel and with the numpy fallback, and the
importance weighting's σ² factor is the one with the lower weighted error."""

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq

import gguf_quant_reference as reference
from ds4mlx.quant import codecs
from ds4mlx.quant import gguf as fmts
from ds4mlx.quant.gguf import common, native


def _inputs(seed: int, rows: int, cols: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
    x[0, :256] = 0.0  # an all-zero block
    x[1, 256:512] = 0.75  # a constant block
    heavy = (rng.standard_t(3, size=(rows, cols)) * 0.01).astype(np.float32)  # heavy tails
    imp = rng.gamma(0.5, size=cols).astype(np.float32)  # skewed importance
    imp[::13] = 0.0  # columns never seen by the calibration text
    return [(x, None), (heavy, None), (x, imp), (heavy, imp * imp)]


@pytest.mark.parametrize("name", list(reference.QUANTIZE))
def test_same_bytes_as_reference(name):
    for seed in (0, 1):
        for x, imp in _inputs(seed, 24, 2048):
            new = fmts.get(name).quantize(x, weights=imp)
            old = reference.QUANTIZE[name](x, weights=imp)
            assert new.dtype == old.dtype and new.shape == old.shape
            if name == "IQ2_XXS" and imp is not None:
                _check_near_ties(x, imp, new, old)
            else:
                assert np.array_equal(new, old), (name, seed, imp is not None, int((new != old).sum()))


@pytest.mark.parametrize("name", ["Q4_K", "Q2_K", "IQ2_XXS"])
@pytest.mark.parametrize("native_chunk", [None, 96])
def test_same_bytes_across_batches(name, native_chunk, monkeypatch):
    # 1100 super-blocks: several of the quantizers' batches (and a partial one), where the
    # reference batches differently; the compiled ones also in batches of 96 (each written into
    # its rows of the one output)
    from ds4mlx.quant.gguf import iq2_xxs, q2_k, q4_k

    if native_chunk is not None:
        monkeypatch.setattr({"Q4_K": q4_k, "Q2_K": q2_k, "IQ2_XXS": iq2_xxs}[name], "_NATIVE_CHUNK_BLOCKS", native_chunk)
    x = np.random.default_rng(6).standard_normal((275, 1024), dtype=np.float32) * 0.02
    assert np.array_equal(fmts.get(name).quantize(x), reference.QUANTIZE[name](x))


def _check_near_ties(x, imp, new, old):
    """IQ2_XXS with importance: codebook entries that differ only in elements of (near-)zero
    importance cost the same to within float rounding, and the old matrix-product search broke
    those ties by rounding noise. So: the same importance-weighted error, and values that differ
    only in such elements."""
    qtype = GGMLQuantizationType.IQ2_XXS
    y_new, y_old = gq.dequantize(new, qtype), gq.dequantize(old, qtype)
    err_new = float((imp * (y_new - x) ** 2).sum(dtype=np.float64))
    err_old = float((imp * (y_old - x) ** 2).sum(dtype=np.float64))
    assert err_new <= err_old * (1 + 1e-6), (err_new, err_old)
    cols = np.nonzero(y_new != y_old)[1]
    assert np.all(imp[cols] < 1e-3 * imp.mean()), imp[cols].max()


def test_iq2_xxs_native_and_numpy_search_agree(monkeypatch):
    assert native.load("iq2_search") is not None or pytest.skip("no C compiler here")
    x, imp = _inputs(2, 16, 2048)[2]
    imp = imp + 0.05  # no near-zero importance, so no near-ties (see _check_near_ties)
    with_c = fmts.get("IQ2_XXS").quantize(x, weights=imp)
    monkeypatch.setitem(native._LIBS, "iq2_search", None)
    without = fmts.get("IQ2_XXS").quantize(x, weights=imp)
    assert np.array_equal(with_c, without)
    assert np.array_equal(with_c, reference.quantize_iq2_xxs(x, weights=imp))


@pytest.mark.parametrize("name", ["Q4_K", "Q2_K"])
def test_kquant_native_and_numpy_agree(name, monkeypatch):
    # the C loops (native/kquant_search.c) against the numpy path on inputs unlike the load-time
    # check's: wide dynamic range, all-positive and all-negative rows, exact zeros, imatrix
    lib = native.load_checked("kquant_search", common._check_native)
    assert lib is not None or pytest.skip("no C compiler here")
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((40, 1024)) * np.exp(rng.standard_normal((40, 1))) * 0.02).astype(np.float32)
    x[2] = np.abs(x[2])
    x[3] = -np.abs(x[3])
    x[4, ::3] = 0.0
    imp = rng.gamma(0.3, size=1024).astype(np.float32)
    imp[::7] = 0.0
    for weights in (None, imp):
        with_c = fmts.get(name).quantize(x, weights=weights)
        monkeypatch.setitem(native._CHECKED, "kquant_search", None)
        without = fmts.get(name).quantize(x, weights=weights)
        monkeypatch.setitem(native._CHECKED, "kquant_search", lib)
        assert np.array_equal(with_c, without), (name, weights is not None, int((with_c != without).sum()))


@pytest.mark.parametrize("name", ["Q4_K", "Q2_K"])
def test_kquant_native_partial_batches(name):
    # block counts that leave the kernels' batches (16 blocks), groups (two Q4_K blocks a group)
    # and pairs of groups fitted side by side partly empty, against the numpy recipe
    lib = common.kquant_native()
    assert lib is not None or pytest.skip("no C compiler here")
    numpy_chunk, search = common.KQUANT_NUMPY[name]
    rng = np.random.default_rng(16)
    for n in (1, 2, 3, 5, 15, 17, 19, 30, 33):
        x = (rng.standard_normal((n, 256)) * np.exp(rng.standard_normal((n, 1)))).astype(np.float32)
        imp = rng.gamma(0.3, size=(n, 256)).astype(np.float32)
        for weights in (None, imp):
            got = common.kquant_blocks(lib, name, x, weights, search)
            assert np.array_equal(got, numpy_chunk(x, weights)), (name, n, weights is not None)


def _edge_blocks(rng) -> list[np.ndarray]:
    """Super-blocks [64, 256] that reach the recipes' corner cases: zeros, constant and sparse
    blocks, one-signed blocks, integer values (rounding ties), and magnitudes from subnormal
    (sums that underflow to -0) to fp16-overflowing super-scales."""
    out = []
    for scale in (1e-24, 1e-6, 0.02, 3.0, 1e6):
        for kind in range(5):
            x = [rng.standard_normal((64, 256)), np.abs(rng.standard_normal((64, 256))),
                 -np.abs(rng.standard_t(2, (64, 256))), rng.integers(-3, 4, (64, 256)).astype(float),
                 rng.standard_normal((64, 256)) * (rng.random((64, 256)) < 0.1)][kind]
            x = (x * scale).astype(np.float32)
            x[0], x[1], x[2, ::2] = 0.0, x[1, 0], 0.0
            out.append(x)
    return out


@pytest.mark.parametrize("name", ["Q4_K", "Q2_K"])
def test_kquant_native_edge_cases(name):
    assert common.kquant_native() is not None or pytest.skip("no C compiler here")
    rng = np.random.default_rng(12)
    for x in _edge_blocks(rng):
        imp = rng.gamma(0.3, size=x.shape).astype(np.float32) * (rng.random(x.shape) < 0.8)
        for weights in (None, imp, imp * np.float32(1e-12), imp * np.float32(1e12)):
            got = fmts.get(name).quantize(x, weights=weights)
            with np.errstate(all="ignore"):
                want = reference.QUANTIZE[name](x, weights=weights)
            assert np.array_equal(got, want), (name, float(np.abs(x).max()), weights is not None)


def test_iq2_xxs_native_edge_cases():
    # the compiled recipe against the numpy one with the same candidate search: these blocks
    # have exact ties between codebook entries (integer values, constant runs, costs that
    # underflow to 0), which the reference's matrix-product argmin breaks by its own rounding
    # (test_same_bytes_as_reference covers the reference on blocks without them)
    from ds4mlx.quant.gguf import iq2_xxs

    lib = iq2_xxs._native()
    assert lib is not None or pytest.skip("no C compiler here")
    rng = np.random.default_rng(13)
    for x in _edge_blocks(rng)[::2]:
        imp = rng.gamma(0.3, size=x.shape).astype(np.float32) * (rng.random(x.shape) < 0.8)
        for weights in (None, imp, imp * np.float32(1e-12), imp * np.float32(1e12)):
            got = iq2_xxs.quantize(x, weights=weights)
            with np.errstate(all="ignore"):
                want = iq2_xxs.numpy_chunk(x, weights, lib)
            assert np.array_equal(got, want), (float(np.abs(x).max()), weights is not None)


def _search_in_kernel_order(y: np.ndarray, w: np.ndarray, s_run: np.ndarray, step: float) -> np.ndarray:
    """The C search's entries, from numpy float32 operations in the kernel's order: per run
    t[j][l] = a_j·L_l + b_j·L_l², the sums over elements 0..3 and 4..7 of each level pattern
    ((t0 + t1) + t2) + t3, an entry's cost h_lo + h_hi, the first of least cost (a NaN cost never
    taken, as its compare-and-select)."""
    from ds4mlx.quant.gguf import iq2_xxs

    lv = iq2_xxs.GRID_LEVELS
    a, b = (np.float32(-2.0) * w) * y, w * (s_run * np.float32(step))[:, None]
    t = a[:, :, None] * lv + b[:, :, None] * (lv * lv)  # [n, 8, 3]
    p = np.arange(81)

    def half(j0: int) -> np.ndarray:
        h2 = t[:, j0, p[:9] % 3] + t[:, j0 + 1, p[:9] // 3]
        h3 = h2[:, p[:27] % 9] + t[:, j0 + 2, p[:27] // 9]
        return h3[:, p % 27] + t[:, j0 + 3, p // 27]

    cost = half(0)[:, iq2_xxs._LO_PATTERN] + half(4)[:, iq2_xxs._HI_PATTERN]
    best, idx = cost[:, 0], np.zeros(len(cost), dtype=np.int64)
    for e in range(1, 256):
        take = cost[:, e] < best
        best, idx = np.where(take, cost[:, e], best), np.where(take, e, idx)
    return idx


def test_iq2_xxs_native_search_same_entries_as_kernel_order():
    # the 16-lane search (iq2_search512.h) finds the least cost by group minima, and terms of
    # 2^124 and up take the plain loop: both against the costs added in numpy, on runs with
    # exact ties (integer values), zero weights, skewed and huge magnitudes (infinite, NaN costs)
    from ds4mlx.quant.gguf import iq2_xxs

    lib = iq2_xxs._native()
    assert lib is not None or pytest.skip("no C compiler here")
    rng = np.random.default_rng(16)
    n = 1100  # several 512-run chunks, most of each searched 64 runs at a time
    for scale in (1e-20, 1.0, 1e12, 1e19, 1e21):
        for kind in range(3):
            y = [np.abs(rng.standard_normal((n, 8))), rng.integers(0, 4, (n, 8)).astype(float),
                 np.abs(rng.standard_t(2, (n, 8))) * np.where(rng.random((n, 8)) < 0.1, -1, 1)][kind]
            y = (y * scale).astype(np.float32)
            w = (rng.gamma(0.5, size=(n, 8)) * (rng.random((n, 8)) < 0.9) * scale).astype(np.float32)
            # a group scale per 4 runs (zero in some: those runs all search)
            s0 = np.abs(y).reshape(-1, 32).max(axis=1) / 43.0 * rng.choice([0.0, 0.5, 1.0, 1.0, 1.0], n // 4)
            s0 = s0.astype(np.float32)
            s_run = np.repeat(s0, 4)
            with np.errstate(all="ignore"):
                got = iq2_xxs._candidate_entries(y.reshape(-1, 1, 4, 8), w.reshape(-1, 1, 4, 8), s0[:, None], lib)
                got = got.reshape(n, -1)
                for f, step in enumerate(iq2_xxs._SCALE_STEPS):
                    s = s_run * step
                    level = (y > (s[:, None] * iq2_xxs._MIDPOINTS[0])).astype(np.int64) + (y > (s[:, None] * iq2_xxs._MIDPOINTS[1]))
                    direct = iq2_xxs._ENTRY_OF_PATTERN[level @ iq2_xxs._POW3]
                    searched = (direct < 0) | ~np.all(w > 0, axis=1) | ~(s > 0)
                    assert searched.sum() > 64
                    want = _search_in_kernel_order(y, w, s_run, step)
                    assert np.array_equal(got[searched, f], want[searched]), (scale, kind, f)


@pytest.mark.parametrize("build", ["DS4MLX_QUANT_PORTABLE=1", "DS4MLX_QUANT_TUNE=generic", "CC=cc"])
def test_portable_c_path_same_bytes(monkeypatch, build):
    # the kernels without their x86 intrinsics (DS4MLX_QUANT_PORTABLE=1: the generic vector code
    # that arm64 and other CPUs compile), built for the generic CPU (no -march=native: the
    # 8-lane kernels of CPUs without AVX-512, Apple's among them), and built by the system's
    # cc (GCC on Linux) where clang, the default, is installed, against the numpy recipes,
    # with and without importance
    from ds4mlx.quant.gguf import iq2_xxs

    monkeypatch.setenv(*build.split("="))
    for name in ("kquant_search", "iq2_search"):
        monkeypatch.delitem(native._LIBS, name, raising=False)
        monkeypatch.delitem(native._CHECKED, name, raising=False)
    kq = native.load("kquant_search")
    assert kq is not None or pytest.skip("no C compiler here")
    iq = native.load("iq2_search")
    rng = np.random.default_rng(15)
    for x in _edge_blocks(rng)[::3]:
        imp = rng.gamma(0.3, size=x.shape).astype(np.float32) * (rng.random(x.shape) < 0.8)
        for weights in (None, imp):
            with np.errstate(all="ignore"):
                for name in ("Q4_K", "Q2_K"):
                    numpy_chunk, search = common.KQUANT_NUMPY[name]
                    got = common.kquant_blocks(kq, name, x, weights, search)
                    assert np.array_equal(got, numpy_chunk(x, weights)), (name, weights is not None)
                got = iq2_xxs._compiled_chunk(iq, x, weights)
                assert np.array_equal(got, iq2_xxs.numpy_chunk(x, weights, iq)), weights is not None


def test_q8_0_native_and_numpy_agree():
    from ds4mlx.quant.gguf import q8_0

    lib = q8_0._native()
    assert lib is not None or pytest.skip("no C compiler here")
    rng = np.random.default_rng(14)
    for x in _edge_blocks(rng):
        x = x.reshape(-1, 32)
        x[3] = rng.integers(-8, 9, 32) * np.float32(0.5)  # ties of the rounding
        x[4, 0] = 9e6  # saturating scale
        assert np.array_equal(q8_0._compiled_blocks(lib, x), q8_0._numpy_blocks(x))


def test_q8_0_into_given_output():
    from ds4mlx.quant.gguf import q8_0

    x = np.random.default_rng(3).standard_normal((5, 96)).astype(np.float32)
    out = np.full((5, 3 * 34), 7, np.uint8)
    assert q8_0.quantize(x, out=out) is out
    assert np.array_equal(out, q8_0.quantize(x))
    with pytest.raises(ValueError, match="Q8_0 output"):
        q8_0.quantize(x, out=np.empty((5, 3 * 34 - 1), np.uint8))


@pytest.mark.parametrize("name", ["Q4_K", "Q2_K", "IQ2_XXS"])
@pytest.mark.parametrize("compiled", [True, False])
def test_block_quantizers_into_given_output(name, compiled, monkeypatch):
    """``out=``: the reference's bytes land in the given buffer (leading shape kept, every byte
    written over a filled one), which is returned; a buffer of another shape is refused."""
    from ds4mlx.quant.gguf import iq2_xxs, q2_k, q4_k

    if not compiled:  # the numpy recipe (no C compiler)
        monkeypatch.setattr(q4_k, "kquant_native", lambda: None)
        monkeypatch.setattr(q2_k, "kquant_native", lambda: None)
        monkeypatch.setattr(iq2_xxs, "_native", lambda: None)
    elif not fmts.get(name).compiled():
        pytest.skip("no C compiler here")
    x, imp = _inputs(5, 6, 512)[1]
    x = x.reshape(2, 3, 512)
    row = fmts.row_bytes(fmts.get(name), 512, name)
    out = np.full((2, 3, row), 0xA5, np.uint8)
    assert fmts.get(name).quantize(x, weights=imp, out=out) is out
    # (IQ2_XXS with importance may settle a near-tie otherwise than the reference: its own bytes)
    want = fmts.get(name).quantize(x, weights=imp) if name == "IQ2_XXS" else \
        reference.QUANTIZE[name](x.reshape(6, 512), weights=imp).reshape(2, 3, row)
    assert np.array_equal(out, want)
    with pytest.raises(ValueError, match=f"{name} output"):
        fmts.get(name).quantize(x, out=np.empty((2, 3, row - 1), np.uint8))


@pytest.mark.parametrize("portable", [False, True])
def test_f16_encode_matches_numpy(monkeypatch, portable):
    # the compiled F16 encoder (F16C vectors, or the scalar C conversion with
    # DS4MLX_QUANT_PORTABLE=1) against numpy's astype(float16): ties, overflow edge, subnormals,
    # NaN payloads (in a vector and in the tail), and a wide random sample of bit patterns
    import ctypes

    from ds4mlx.quant.gguf import floats

    if portable:
        monkeypatch.setenv("DS4MLX_QUANT_PORTABLE", "1")
        monkeypatch.setattr(native, "_LIBS", {})  # this build for this test only
    lib = native.load("f16_encode")
    assert lib is not None or pytest.skip("no C compiler here")
    rng = np.random.default_rng(16)
    bits = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([floats.f16_check_values(), bits.view(np.float32)])
    got = np.empty(x.size, np.uint16)
    lib.f16_encode(native.ptr(x), ctypes.c_int64(x.size), native.ptr(got))
    with np.errstate(over="ignore"):
        want = x.astype("<f2").view(np.uint16)
    assert np.array_equal(got, want), np.flatnonzero(got != want)[:5]


@pytest.mark.parametrize("portable", [False, True])
def test_f16_from_bf16_matches_numpy(monkeypatch, portable):
    # BF16 bits -> F16 in one C pass against numpy's astype(float16) of their float32 values:
    # every one of the 65536 BF16 values (NaNs among them), a scalar tail, a given output
    import ctypes

    from ds4mlx.quant.gguf import floats

    if portable:
        monkeypatch.setenv("DS4MLX_QUANT_PORTABLE", "1")
        monkeypatch.setattr(native, "_LIBS", {})
        monkeypatch.setattr(native, "_CHECKED", {})
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)[:-3].reshape(-1, 13)  # 65533: a tail of 5
    with np.errstate(over="ignore", invalid="ignore"):
        want = (bits.astype(np.uint32) << 16).view(np.float32).astype("<f2").view(np.uint8)
    out = np.zeros((bits.shape[0], 26), np.uint8)
    assert floats.f16_from_bf16(bits, out) is out
    assert np.array_equal(out, want.reshape(out.shape))
    lib = native.load("f16_encode")  # the kernel itself (the call above may fall back to numpy)
    assert lib is not None or pytest.skip("no C compiler here")
    got = np.zeros(bits.size, np.uint16)
    lib.f16_encode_bf16(native.ptr(bits), ctypes.c_int64(bits.size), native.ptr(got))
    assert np.array_equal(got.view(np.uint8), want.reshape(-1))
    with pytest.raises(ValueError, match="F16 output"):
        floats.f16_from_bf16(bits, np.zeros((bits.shape[0], 13), np.uint8))


def test_f16_quantize_into_given_output():
    from ds4mlx.quant.gguf import floats

    x = np.random.default_rng(5).standard_normal((3, 4, 10)).astype(np.float32)
    out = np.zeros((3, 4, 20), np.uint8)
    assert floats.F16.quantize(x, out=out) is out
    assert np.array_equal(out, x.astype("<f2").view(np.uint8).reshape(3, 4, 20))
    with pytest.raises(ValueError, match="F16 output"):
        floats.F16.quantize(x, out=np.zeros((3, 4, 10), np.uint8))


def test_mxfp4_repack_native_and_numpy_agree(monkeypatch):
    from ds4mlx.quant.gguf import mxfp4

    assert native.load("mxfp4_repack") is not None or pytest.skip("no C compiler here")
    rng = np.random.default_rng(4)
    packed = rng.integers(0, 256, (3, 40, 64), dtype=np.uint8)
    scales = rng.integers(0, 256, (3, 40, 4), dtype=np.uint8)
    with_c = mxfp4.from_pairs(packed, scales)
    monkeypatch.setitem(native._LIBS, "mxfp4_repack", None)
    without = mxfp4.from_pairs(packed, scales)
    assert with_c.shape == without.shape == (3, 40, 4 * 17)
    assert np.array_equal(with_c, without)


def test_native_kernel_that_disagrees_is_not_used(monkeypatch):
    monkeypatch.delitem(native._CHECKED, "kquant_search", raising=False)
    with pytest.warns(UserWarning, match="does not match the numpy path"):
        lib = native.load_checked("kquant_search", lambda lib: False)
    assert lib is None or native.load("kquant_search") is None
    monkeypatch.delitem(native._CHECKED, "kquant_search")
    x = np.random.default_rng(3).standard_normal((4, 512), dtype=np.float32)
    assert np.array_equal(fmts.get("Q4_K").quantize(x), reference.QUANTIZE["Q4_K"](x))


def test_compiler_order(monkeypatch, tmp_path):
    # $CC alone when set; else plain clang, then versioned clangs newest first, then cc
    for name in ("clang-9", "clang-17", "clang-15", "cc", "clang-tidy"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    assert [Path(c).name for c in native.compilers()] == ["clang-17", "clang-15", "clang-9", "cc"]
    monkeypatch.setenv("CC", "clang-15")
    assert [Path(c).name for c in native.compilers()] == ["clang-15"]
    monkeypatch.setenv("CC", "no-such-cc")
    assert native.compilers() == []


def test_a_build_that_disagrees_gives_way_to_the_next_compiler(monkeypatch):
    # a build failing its check against numpy is passed over for the next compiler's build
    if len(native.compilers()) < 2:
        pytest.skip("one C compiler here")
    monkeypatch.delitem(native._CHECKED, "q8_0", raising=False)
    first = native.load("q8_0")
    assert first is not None
    seen = []
    lib = native.load_checked("q8_0", lambda lib: seen.append(lib._name) or lib._name != first._name)
    assert lib is not None and lib._name != first._name and seen[0] == first._name
    monkeypatch.delitem(native._CHECKED, "q8_0")


def test_native_build_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("DS4MLX_QUANT_NATIVE", "0")
    monkeypatch.delitem(native._LIBS, "iq2_search", raising=False)
    assert native.load("iq2_search") is None
    monkeypatch.delitem(native._LIBS, "iq2_search")


def test_e2m1_encode_same_as_reference():
    rng = np.random.default_rng(3)
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    special = np.concatenate([mids, -mids, np.nextafter(mids, 0), np.nextafter(mids, 9),
                              [0.0, -0.0, 6.0, -6.0, 7.0, -1e30, np.inf, -np.inf, np.nan, -np.nan,
                               1e-45, -1e-45]]).astype(np.float32)
    x = np.concatenate([special, (rng.standard_normal(100_000) * 3).astype(np.float32)])
    assert np.array_equal(codecs.e2m1_encode(x), reference.e2m1_encode(x))
    assert np.array_equal(codecs.e2m1_encode(x[:700].reshape(-1, 7)), reference.e2m1_encode(x[:700].reshape(-1, 7)))


@pytest.mark.parametrize("name", ["Q4_K", "Q2_K", "IQ2_XXS"])
def test_importance_weighting_factor(name, monkeypatch, capsys):
    """Error weights qw·sqrt(f·mean(x²) + x²) (ggml-quants.c, quantize_row_*_impl): llama.cpp
    takes f = 2 for Q4_K and f = 1 for Q2_K and IQ2_XXS; f = 2 gives our searches the lower
    importance-weighted error on skewed statistics for all three."""
    from ds4mlx.quant.gguf import common, iq2_xxs

    rng = np.random.default_rng(5)
    w = (rng.standard_t(4, size=(48, 2048)) * 0.02).astype(np.float32)
    act2 = rng.lognormal(0.0, 1.5, size=2048).astype(np.float32)
    act2[rng.choice(2048, 32, replace=False)] *= 100.0
    qtype = GGMLQuantizationType[name]
    real = common.importance_weights
    seen, errs = [], {}
    # the numpy recipes (the compiled ones give their bytes, checked above) call the weights here
    monkeypatch.setitem(native._CHECKED, "kquant_search", None)
    monkeypatch.setitem(native._CHECKED, "iq2_search", None)
    for factor in (1.0, 2.0):
        def weights(x, xb, qw, sigma_factor=2.0, factor=factor):
            seen.append(sigma_factor)
            return real(x, xb, qw, factor)

        monkeypatch.setattr(common, "importance_weights", weights)
        monkeypatch.setattr(iq2_xxs, "importance_weights", weights)
        y = gq.dequantize(fmts.get(name).quantize(w, weights=act2), qtype)
        errs[factor] = float(((y.astype(np.float64) - w) ** 2 * act2).sum())
    assert set(seen) == {2.0}  # what the package uses
    with capsys.disabled():
        print(f"\n{name}: importance-weighted error, σ² factor 1: {errs[1.0]:.4g}, factor 2: {errs[2.0]:.4g}")
    assert errs[2.0] <= errs[1.0]
    # and the weights are the formula, computed independently
    x = rng.standard_normal((2, 256)).astype(np.float32)
    qw = rng.random((2, 256)).astype(np.float32)
    want = qw * np.sqrt(2 * (x.astype(np.float64) ** 2).mean(axis=1, keepdims=True) + x.astype(np.float64) ** 2)
    np.testing.assert_allclose(real(x, x, qw), want, rtol=1e-6)

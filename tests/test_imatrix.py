"""Importance matrices: llama.cpp's GGUF imatrix (written here with gguf-py's own writer, in the
layout of llama.cpp's tools/imatrix/imatrix.cpp) and its legacy .dat (packed by hand from the
format) read back as llama-quantize uses them, and ``convert --imatrix`` lowers the
importance-weighted quantization error of the experts on skewed statistics."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize

from ds4mlx.convert import ConvertError, convert
from ds4mlx.convert.plan import dequantize as source_values
from ds4mlx.convert.plan import logical_weights
from ds4mlx.io.hf import open_hf_checkpoint
from ds4mlx.io.imatrix import ImatrixError, expert_importance, read_imatrix, write_imatrix
from ds4mlx.names import internal_to_gguf
from ds4mlx.quant import gguf as fmts


def _llama_gguf(path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]], datasets=("calib.txt",)) -> Path:
    """A GGUF imatrix as llama-imatrix writes it, with gguf-py's writer (no ds4mlx code)."""
    w = GGUFWriter(str(path), arch="imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", 7)
    w.add_uint32("imatrix.chunk_size", 512)
    for name in sorted(entries):
        sums, counts = entries[name]
        w.add_tensor(name + ".in_sum2", np.asarray(sums, np.float32).reshape(len(counts), -1))
        w.add_tensor(name + ".counts", np.asarray(counts, np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _legacy_dat(path: Path, entries: dict[str, tuple[int, np.ndarray]], chunks=3, dataset=b"calib.txt") -> Path:
    raw = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        values = np.asarray(values, "<f4").reshape(-1)
        raw += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, values.size) + values.tobytes()
    path.write_bytes(raw + struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset)
    return path


def test_gguf_imatrix_reads_as_llama_quantize_uses_it(tmp_path):
    rng = np.random.default_rng(0)
    sums = rng.random((4, 64)) * 10
    counts = np.array([10.0, 0.0, 3.0, 1.0])  # expert 1 saw no token
    dense = rng.random((1, 32))
    p = _llama_gguf(tmp_path / "im.gguf", {"blk.0.ffn_gate_exps.weight": (sums, counts),
                                           "blk.0.attn_q_a.weight": (dense, np.array([5.0]))})
    im = read_imatrix(p)
    assert sorted(im.entries) == ["blk.0.attn_q_a.weight", "blk.0.ffn_gate_exps.weight"]
    assert im.datasets == ["calib.txt"] and im.chunk_count == 7 and im.chunk_size == 512
    imp = expert_importance(im, "blk.0.ffn_gate_exps.weight", 4, 64)
    want = sums.astype(np.float32) / counts[:, None].clip(1)
    want[1] = 1.0  # llama-quantize: a matrix without data weighs every input alike
    np.testing.assert_allclose(imp, want, rtol=1e-6)
    np.testing.assert_allclose(expert_importance(im, "blk.0.attn_q_a.weight", 3, 32),
                               np.broadcast_to(dense.astype(np.float32) / 5, (3, 32)), rtol=1e-6)
    assert expert_importance(im, "blk.9.ffn_up_exps.weight", 4, 64) is None
    with pytest.raises(ImatrixError, match="blk.0.ffn_gate_exps.weight.*4 x 64.*8 matrices of 64"):
        expert_importance(im, "blk.0.ffn_gate_exps.weight", 8, 64)


def test_legacy_dat_reads_like_the_gguf_one(tmp_path):
    rng = np.random.default_rng(1)
    mean = rng.random((4, 64)).astype(np.float32)
    ncall = 6
    p = _legacy_dat(tmp_path / "im.dat", {"blk.0.ffn_down_exps.weight": (ncall, mean * ncall),
                                          "blk.0.attn_q_a.weight": (ncall, mean[0] * ncall)})
    im = read_imatrix(p)
    assert im.datasets == ["calib.txt"] and im.chunk_count == 3
    np.testing.assert_allclose(expert_importance(im, "blk.0.ffn_down_exps.weight", 4, 64), mean, rtol=1e-6)
    np.testing.assert_allclose(expert_importance(im, "blk.0.attn_q_a.weight", 1, 64), mean[:1], rtol=1e-6)


def test_our_writer_matches_llama_cpp_layout(tmp_path):
    rng = np.random.default_rng(2)
    sums = {"blk.1.ffn_up_exps.weight": rng.random((8, 16)), "blk.0.attn_q_a.weight": rng.random((1, 16))}
    counts = {"blk.1.ffn_up_exps.weight": np.arange(8.0), "blk.0.attn_q_a.weight": np.array([4.0])}
    p = write_imatrix(tmp_path / "ours.gguf", sums, counts, datasets=["a.txt"], chunk_count=2, chunk_size=64)
    r = GGUFReader(p)
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == ["a.txt"]
    got = [(t.name, t.tensor_type.name, [int(d) for d in t.shape]) for t in r.tensors]
    assert got == [("blk.0.attn_q_a.weight.in_sum2", "F32", [16, 1]), ("blk.0.attn_q_a.weight.counts", "F32", [1, 1]),
                   ("blk.1.ffn_up_exps.weight.in_sum2", "F32", [16, 8]), ("blk.1.ffn_up_exps.weight.counts", "F32", [1, 8])]
    assert not list(tmp_path.glob(".*tmp*"))


def test_bad_imatrix_files_are_refused_with_one_line(tmp_path):
    model = tmp_path / "model.gguf"
    w = GGUFWriter(str(model), arch="deepseek4")
    w.add_tensor("blk.0.attn_q_a.weight", np.zeros((2, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ImatrixError, match="general.type is none, not 'imatrix'"):
        read_imatrix(model)
    good = _legacy_dat(tmp_path / "im.dat", {"blk.0.attn_q_a.weight": (2, np.ones(64))})
    cut = tmp_path / "cut.dat"
    cut.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ImatrixError, match="cut.dat: truncated legacy imatrix"):
        read_imatrix(cut)
    (tmp_path / "text.dat").write_text("hello world, not an imatrix")
    with pytest.raises(ImatrixError, match="text.dat"):
        read_imatrix(tmp_path / "text.dat")
    with pytest.raises(ImatrixError, match="missing.gguf: cannot read"):
        read_imatrix(tmp_path / "missing.gguf")
    neg = _llama_gguf(tmp_path / "neg.gguf", {"blk.0.attn_q_a.weight": (-np.ones((1, 32)), np.array([1.0]))})
    with pytest.raises(ImatrixError, match="'blk.0.attn_q_a.weight' has negative"):
        read_imatrix(neg)


# --------------------------------------------------------------------------- error reduction


def _skewed(rng, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Heavy-tailed weights and the mean squared activation of inputs whose scales spread over
    three orders of magnitude (a few outlier channels, as in real LLM activations)."""
    w = (rng.standard_t(4, size=(rows, cols)) * 0.02).astype(np.float32)
    act2 = rng.lognormal(0.0, 1.5, size=cols).astype(np.float32)
    act2[rng.choice(cols, cols // 64, replace=False)] *= 100.0
    return w, act2


def _werr(w_hat: np.ndarray, w: np.ndarray, act2: np.ndarray) -> float:
    """Σ_j E[x_j²] Σ_i (ŵ_ij − w_ij)²: the expected squared matmul output error for inputs with
    those mean squares (independent channels)."""
    return float(((w_hat.astype(np.float64) - w) ** 2 * act2).sum())


@pytest.mark.parametrize("name", ["Q4_K", "Q2_K", "IQ2_XXS"])
def test_imatrix_lowers_weighted_error(name, capsys):
    rng = np.random.default_rng(3)
    w, act2 = _skewed(rng, 32, 1024)
    qtype = GGMLQuantizationType[name]
    fmt = fmts.get(name)
    # without an imatrix, what convert does: plain for the K-quants, ds4's Σ row² for IQ2_XXS
    default = np.sum(w * w, axis=0) if name == "IQ2_XXS" else None
    plain = _werr(dequantize(fmt.quantize(w, weights=default), qtype), w, act2)
    with_im = _werr(dequantize(fmt.quantize(w, weights=act2), qtype), w, act2)
    with capsys.disabled():
        print(f"\n{name}: importance-weighted error {plain:.4g} -> {with_im:.4g} with imatrix "
              f"({100 * (1 - with_im / plain):.0f}% lower)")
    assert with_im < 0.9 * plain


@pytest.fixture(scope="module")
def expert_imatrix(tiny_ckpt, tmp_path_factory):
    """Per-expert skewed statistics for every expert tensor of the tiny checkpoint, with an
    expert that saw no token, in llama.cpp's GGUF format."""
    rng = np.random.default_rng(4)
    ckpt = open_hf_checkpoint(tiny_ckpt)
    entries = {}
    for lw in logical_weights(ckpt, include_mtp=False):
        if lw.experts:
            n_in = lw.shape[-1]
            act2 = np.stack([_skewed(rng, 1, n_in)[1] for _ in lw.names])
            counts = rng.integers(50, 500, size=len(lw.names)).astype(np.float64)
            counts[-1] = 0
            entries[internal_to_gguf(lw.path)] = (act2 * counts[:, None], counts)
    ckpt.close()
    return _llama_gguf(tmp_path_factory.mktemp("im") / "experts.imatrix.gguf", entries)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["ds4-q4", "ds4-q2"])
def test_convert_with_imatrix_lowers_expert_error(tiny_ckpt, expert_imatrix, tmp_path, preset, capsys):
    plain = convert(tiny_ckpt, tmp_path / "plain.gguf", to="gguf", preset=preset, progress=False, jobs=1)
    weighted = convert(tiny_ckpt, tmp_path / "im.gguf", to="gguf", preset=preset, progress=False,
                       jobs=2 if preset == "ds4-q2" else 1, imatrix=expert_imatrix)  # jobs: rows travel to workers
    im = read_imatrix(expert_imatrix)
    ckpt = open_hf_checkpoint(tiny_ckpt)
    readers = {k: {t.name: t for t in GGUFReader(p).tensors} for k, p in (("plain", plain), ("im", weighted))}
    fields = GGUFReader(weighted).fields
    assert fields["quantize.imatrix.file"].contents() == expert_imatrix.name
    assert fields["quantize.imatrix.entries_count"].contents() == len(im.entries)
    totals = {"plain": 0.0, "im": 0.0}
    for lw in logical_weights(ckpt, include_mtp=False):
        if not lw.experts:
            continue
        name = internal_to_gguf(lw.path)
        imp = expert_importance(im, name, len(lw.names), lw.shape[-1])
        for e, src in enumerate(lw.names[:-1]):  # the last expert has no statistics
            w = source_values(ckpt, lw, src)
            for k in totals:
                t = readers[k][name]
                rows = dequantize(t.data[e], t.tensor_type)
                totals[k] += _werr(rows, w, imp[e])
    ckpt.close()
    with capsys.disabled():
        print(f"\nconvert {preset}: expert importance-weighted error {totals['plain']:.4g} -> {totals['im']:.4g} "
              f"({100 * (1 - totals['im'] / totals['plain']):.0f}% lower)")
    assert totals["im"] < 0.9 * totals["plain"]


def test_convert_refuses_an_imatrix_of_another_model(tiny_ckpt, tmp_path):
    other = _llama_gguf(tmp_path / "other.gguf", {"blk.0.ffn_gate_exps.weight": (np.ones((8, 100)), np.ones(8))})
    with pytest.raises(ConvertError, match="other.gguf: entry 'blk.0.ffn_gate_exps.weight' has 8 x 100"):
        convert(tiny_ckpt, tmp_path / "x.gguf", to="gguf", preset="ds4-q4", progress=False, imatrix=other)
    unrelated = _llama_gguf(tmp_path / "unrelated.gguf", {"blk.0.attn_k.weight": (np.ones((1, 64)), np.ones(1))})
    with pytest.raises(ConvertError, match="no imatrix entry matches a tensor of this model"):
        convert(tiny_ckpt, tmp_path / "y.gguf", to="gguf", preset="ds4-q2", progress=False, imatrix=unrelated)
    with pytest.raises(ConvertError, match="MLX output does not use one"):
        convert(tiny_ckpt, tmp_path / "z", to="mlx", progress=False, imatrix=unrelated)
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "x.gguf").exists()

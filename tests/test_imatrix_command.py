"""``ds4mlx imatrix``: the file reads back with gguf-py in llama.cpp's imatrix layout under the
GGUF names and shapes of the model's tensors, its statistics obey the routing invariants, the
recorder sums squares as numpy does, and ``convert --imatrix`` takes the file."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGUFReader

from ds4mlx.cli import main
from ds4mlx.convert.plan import logical_weights
from ds4mlx.imatrix import Recorder, Statistics
from ds4mlx.io.hf import open_hf_checkpoint
from ds4mlx.names import internal_to_gguf

CHUNK, CHUNKS = 32, 2


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "the router sends every token to a few experts and the shared expert sees them all".split()
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(rng.choice(words, size=600)))
    return path


@pytest.fixture(scope="module")
def demo_imatrix(demo_dir, calib_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("im") / "demo.imatrix.gguf"
    assert main(["imatrix", "-m", str(demo_dir), "-f", str(calib_text), "-o", str(out), "-c", str(CHUNK),
                 "--chunks", str(CHUNKS)]) == 0
    return out


def _entries(path):
    r = GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    out = {}
    for name, t in tensors.items():
        if name.endswith(".in_sum2"):
            base = name[: -len(".in_sum2")]
            c = tensors[base + ".counts"]
            assert t.tensor_type.name == "F32" and c.tensor_type.name == "F32"
            n_in, n_mat = (int(d) for d in t.shape)
            assert [int(d) for d in c.shape] == [1, n_mat]
            out[base] = (np.asarray(t.data, np.float64).reshape(n_mat, n_in), np.asarray(c.data, np.float64).ravel())
    assert len(tensors) == 2 * len(out)
    return r, out


def test_reads_back_with_llama_cpp_names_and_shapes(demo_dir, demo_imatrix):
    r, entries = _entries(demo_imatrix)
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.chunk_count"].contents() == CHUNKS
    assert r.fields["imatrix.chunk_size"].contents() == CHUNK
    assert r.fields["imatrix.datasets"].contents()[0].endswith("calib.txt")
    bases = [t.name.rsplit(".", 1)[0] for t in r.tensors]
    assert bases == sorted(bases)  # entries in name order, as llama-imatrix writes them
    # every projection of the blocks, under the tensor name the GGUF file of this model has
    ckpt = open_hf_checkpoint(demo_dir)
    cfg = ckpt.config
    want = {}
    for lw in logical_weights(ckpt, include_mtp=False):
        if lw.path.startswith("layers.") and len(lw.shape) == 2 and ".ffn.gate." not in lw.path:
            n_mat = len(lw.names) if lw.experts else 1
            want[internal_to_gguf(lw.path)] = (n_mat, lw.shape[-1])
    ckpt.close()
    assert {k: v[0].shape for k, v in entries.items()} == {k: v for k, v in want.items() if k in entries}
    # not recorded: the HC mixers (a product inside the HC op, F16 in every preset) and the
    # compressors' positional tables (added, not multiplied)
    missing = {n.split(".", 2)[2] for n in set(want) - set(entries)}
    assert missing <= {"hc_attn_fn.weight", "hc_ffn_fn.weight", "attn_compressor_ape.weight",
                       "indexer_compressor_ape.weight"}, missing
    n_layers = cfg["num_hidden_layers"]
    for kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "attn_q_a", "attn_kv", "ffn_gate_shexp"):
        assert all(f"blk.{i}.{kind}.weight" in entries for i in range(n_layers)), kind


def test_statistics_follow_the_routing(demo_dir, demo_imatrix):
    _, entries = _entries(demo_imatrix)
    cfg = json.loads((demo_dir / "config.json").read_text())
    k, tokens = cfg["num_experts_per_tok"], CHUNK * CHUNKS
    for i in range(cfg["num_hidden_layers"]):
        gate, gate_n = entries[f"blk.{i}.ffn_gate_exps.weight"]
        up, up_n = entries[f"blk.{i}.ffn_up_exps.weight"]
        down, down_n = entries[f"blk.{i}.ffn_down_exps.weight"]
        shared, shared_n = entries[f"blk.{i}.ffn_gate_shexp.weight"]
        assert shared_n.tolist() == [tokens]
        assert gate_n.sum() == k * tokens and np.array_equal(gate_n, up_n) and np.array_equal(gate_n, down_n)
        np.testing.assert_array_equal(gate, up)  # gate and up see the same inputs
        # each token reaches k experts, with the input the shared expert sees once
        np.testing.assert_allclose(gate.sum(axis=0), k * shared[0], rtol=1e-4)
        assert np.all(down >= 0) and np.all(down[gate_n == 0] == 0)


def test_recorder_sums_squares():
    rng = np.random.default_rng(1)
    lin = nn.Linear(16, 8, bias=False)
    stats = Statistics(1)
    rec = Recorder(lin, stats)
    xs = [rng.standard_normal((2, 5, 16)).astype(np.float32) for _ in range(3)]
    for x in xs:
        np.testing.assert_array_equal(np.array(rec(mx.array(x))), np.array(lin(mx.array(x))))
    want = sum((x.astype(np.float64) ** 2).reshape(-1, 16).sum(axis=0) for x in xs)
    np.testing.assert_allclose(np.array(stats.sums)[0], want, rtol=1e-5)
    assert np.array(stats.counts).tolist() == [30.0]
    # routed: per (token, expert) pair, both call shapes of the expert modules
    routed = Statistics(4)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    idx = np.array([[0, 2], [2, 3], [0, 0]])
    routed.add_routed(mx.array(x)[:, None, None, :], mx.array(idx))
    routed.add_routed(mx.array(np.repeat(x, 2, axis=0))[:, None, :], mx.array(idx.reshape(-1)))
    want = np.zeros((4, 16))
    for t in range(3):
        for e in idx[t]:
            want[e] += 2 * x[t].astype(np.float64) ** 2
    np.testing.assert_allclose(np.array(routed.sums), want, rtol=1e-5)
    assert np.array(routed.counts).tolist() == [6.0, 0.0, 4.0, 2.0]


def test_bad_inputs_fail_with_one_line(demo_dir, tmp_path, capsys):
    out = tmp_path / "im.gguf"
    assert main(["imatrix", "-m", str(demo_dir), "-f", str(tmp_path / "nope.txt"), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.txt: cannot read the calibration text" in err[0]
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    assert main(["imatrix", "-m", str(demo_dir), "-f", str(short), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "fewer than one chunk of 512" in err[-1] and "Traceback" not in "".join(err)
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.slow
def test_convert_takes_the_file(demo_dir, demo_imatrix, tmp_path):
    from ds4mlx.convert import convert

    path = convert(demo_dir, tmp_path / "demo-q2.gguf", to="gguf", preset="ds4-q2", progress=False,
                   imatrix=demo_imatrix)
    r = GGUFReader(path)
    n_layers = json.loads((demo_dir / "config.json").read_text())["num_hidden_layers"]
    assert r.fields["quantize.imatrix.entries_count"].contents() == 3 * n_layers
    assert r.fields["quantize.imatrix.chunks_count"].contents() == CHUNKS

"""The MTP block from every source: official and MLX directories, ds4's separate MTP GGUF
(written by ``convert``, found beside the main file or given with ``--mtp-gguf``), a GGUF
that carries the block itself, and llama.cpp's layout of it (a trailing ``blk.N`` layer with
``nextn.*`` extras, as its DeepSeek V4 support names them).

References: ds4's MTP tensor table (``mtp_weights_bind``/``mtp_weights_validate_layout``,
transcribed in shared/research/gguf_layouts.md §2.5) read back with gguf-py's ``GGUFReader``,
and the MTP logits of the official checkpoint.
"""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGUFReader

from ds4mlx import load
from ds4mlx.cli import main
from ds4mlx.convert import convert
from ds4mlx.io.gguf_file import GGUFError
from ds4mlx.synthetic import write_tiny_checkpoint

D = 256  # hidden size of the checkpoint below
PLAIN = {"F16", "F32"}
# ds4's MTP file: suffix after ``mtp.0.`` -> (GGML types ds4 accepts, ne)
DS4_MTP = {
    "e_proj.weight": ({"Q8_0"}, [D, D]),
    "h_proj.weight": ({"Q8_0"}, [D, D]),
    "enorm.weight": ({"F32"}, [D]),
    "hnorm.weight": ({"F32"}, [D]),
    "norm.weight": ({"F32"}, [D]),
    "hc_head_base.weight": ({"F32"}, [4]),
    "hc_head_scale.weight": ({"F32"}, [1]),
    "hc_head_fn.weight": (PLAIN, [4 * D, 4]),
    "hc_attn_fn.weight": (PLAIN, [4 * D, 24]),
    "hc_ffn_fn.weight": (PLAIN, [4 * D, 24]),
    "hc_attn_scale.weight": ({"F32"}, [3]),
    "hc_ffn_scale.weight": ({"F32"}, [3]),
    "hc_attn_base.weight": ({"F32"}, [24]),
    "hc_ffn_base.weight": ({"F32"}, [24]),
    "attn_norm.weight": ({"F32"}, None),
    "attn_q_a.weight": ({"Q8_0"}, None),
    "attn_q_a_norm.weight": ({"F32"}, None),
    "attn_q_b.weight": ({"Q8_0"}, None),
    "attn_kv.weight": ({"Q8_0"}, None),
    "attn_kv_a_norm.weight": ({"F32"}, None),
    "attn_sinks.weight": ({"F32"}, None),
    "attn_output_a.weight": ({"Q8_0"}, None),
    "attn_output_b.weight": ({"Q8_0"}, None),
    "ffn_norm.weight": ({"F32"}, [D]),
    "ffn_gate_inp.weight": (PLAIN, [D, 8]),
    "exp_probs_b.bias": ({"F32"}, [8]),
    "ffn_gate_exps.weight": ({"Q4_K"}, None),
    "ffn_up_exps.weight": ({"Q4_K"}, None),
    "ffn_down_exps.weight": ({"Q4_K"}, None),
    "ffn_gate_shexp.weight": ({"Q8_0"}, None),
    "ffn_up_shexp.weight": ({"Q8_0"}, None),
    "ffn_down_shexp.weight": ({"Q8_0"}, None),
}
TOKENS = mx.array([list(range(5, 37))])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("mtp-src") / "tiny", seed=5, num_layers=3,
                                 compress_ratios=[0, 4, 128, 0], num_hash_layers=1, sliding_window=8)


@pytest.fixture(scope="module")
def ggufs(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("mtp-gguf")
    with pytest.warns(UserWarning, match="no tokenizer"):
        return {p: convert(ckpt, d / f"{p}.gguf", to="gguf", preset=p, progress=False, jobs=1)
                for p in ("ds4-q4", "mxfp4")}


def mtp_logits(model) -> np.ndarray:
    cache = model.make_cache()
    h = model.hidden_streams(TOKENS, cache)
    return np.array(model.mtp_logits(h[:, :-1], TOKENS[:, 1:], cache))


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def official_mtp(ckpt):
    model, _ = load(ckpt, dtype=mx.float32, mtp=True)
    return mtp_logits(model)


def test_convert_writes_ds4s_mtp_file(ggufs):
    main_file = ggufs["ds4-q4"]
    companion = main_file.with_name("ds4-q4-MTP.gguf")
    reader = GGUFReader(companion)
    got = {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in reader.tensors}
    assert set(got) == {f"mtp.0.{s}" for s in DS4_MTP}  # ds4's 32 tensors, nothing else
    for suffix, (types, ne) in DS4_MTP.items():
        qtype, shape = got[f"mtp.0.{suffix}"]
        assert qtype in types, f"{suffix}: {qtype}, ds4 accepts {types}"
        if ne is not None:
            assert shape == ne, f"{suffix}: ne {shape}, ds4 expects {ne}"
    assert not [t.name for t in GGUFReader(main_file).tensors if t.name.startswith("mtp.")]


def test_mtp_block_from_every_source(ckpt, ggufs, official_mtp, tmp_path):
    # MLX dir: lossless. GGUF mxfp4: experts exact, FP8 as BF16 exact, HC mixers F16.
    mlx_dir = convert(ckpt, tmp_path / "mlx", progress=False)
    model, _ = load(mlx_dir, dtype=mx.float32, mtp=True)
    assert rel(mtp_logits(model), official_mtp) < 1e-5
    model, _ = load(ggufs["mxfp4"], dtype=mx.float32, mtp=True)  # finds mxfp4-MTP.gguf beside it
    assert model.config.num_nextn_predict_layers == 1
    assert rel(mtp_logits(model), official_mtp) < 1e-3
    q4 = mtp_logits(load(ggufs["ds4-q4"], dtype=mx.float32, mtp=True)[0])
    assert rel(q4, official_mtp) < 0.2  # Q4_K experts, Q8_0 projections

    # ds4's published name beside the file; the flag for a file elsewhere
    d = tmp_path / "ds4"
    d.mkdir()
    shutil.copy(ggufs["ds4-q4"], d / "DeepSeek-V4-Flash-q4.gguf")
    shutil.copy(ggufs["ds4-q4"].with_name("ds4-q4-MTP.gguf"), tmp_path / "DeepSeek-V4-Flash-MTP-Q4K-Q8_0-F32.gguf")
    with pytest.raises(GGUFError, match="--mtp-gguf"):
        load(d / "DeepSeek-V4-Flash-q4.gguf", dtype=mx.float32, mtp=True)
    model, _ = load(d / "DeepSeek-V4-Flash-q4.gguf", dtype=mx.float32,
                    mtp_path=tmp_path / "DeepSeek-V4-Flash-MTP-Q4K-Q8_0-F32.gguf")
    np.testing.assert_array_equal(mtp_logits(model), q4)
    shutil.move(tmp_path / "DeepSeek-V4-Flash-MTP-Q4K-Q8_0-F32.gguf", d)
    np.testing.assert_array_equal(mtp_logits(load(d / "DeepSeek-V4-Flash-q4.gguf", dtype=mx.float32, mtp=True)[0]), q4)
    assert not load(d / "DeepSeek-V4-Flash-q4.gguf", dtype=mx.float32)[0].mtp  # stays on disk unless asked


def test_gguf_carrying_the_block_itself(ckpt, official_mtp, tmp_path):
    # One file with the main tensors and mtp.* (as a converter that keeps the block writes it).
    from ds4mlx.convert.gguf import gguf_config, gguf_plan, write_stream
    from ds4mlx.convert.options import Options
    from ds4mlx.convert.output import Progress
    from ds4mlx.io.hf import open_hf_checkpoint

    hf = open_hf_checkpoint(ckpt)
    try:
        opts = Options("gguf", "mxfp4", None, None, None, 64, True)
        units = gguf_plan(hf, opts) + gguf_plan(hf, opts, mtp=True)
        write_stream(tmp_path / "one.gguf", gguf_config(hf, opts), units, None, Progress(1, 0, "", False))
    finally:
        hf.close()
    model, _ = load(tmp_path / "one.gguf", dtype=mx.float32, mtp=True)
    assert rel(mtp_logits(model), official_mtp) < 1e-3


def test_llama_cpp_layout_of_the_block(ckpt, official_mtp, tmp_path):
    # llama.cpp keeps the block as a trailing layer blk.{n_layer}: layer names plus nextn.*
    # extras, block_count = n_layer + 1 and deepseek4.nextn_predict_layers = 1.
    import dataclasses
    from itertools import islice

    from gguf import GGUFValueType

    from ds4mlx.convert.gguf import gguf_config, gguf_plan
    from ds4mlx.convert.gguf_jobs import run_items
    from ds4mlx.convert.gguf_writer import TensorEntry, stream_gguf
    from ds4mlx.convert.options import Options
    from ds4mlx.io.hf import open_hf_checkpoint

    extras = {"e_proj": "nextn.e_proj", "h_proj": "nextn.h_proj", "enorm": "nextn.enorm",
              "hnorm": "nextn.hnorm", "norm": "nextn.shared_head_norm", "hc_head_fn": "nextn.hc_head_fn",
              "hc_head_base": "nextn.hc_head_base", "hc_head_scale": "nextn.hc_head_scale"}

    def llama_name(name):
        rest = name[len("mtp.0."):]
        base, _, leaf = rest.rpartition(".")
        return f"blk.3.{extras.get(base, base)}.{leaf}"

    hf = open_hf_checkpoint(ckpt)
    try:
        opts = Options("gguf", "mxfp4", None, None, None, 64, True)
        mtp_units = [dataclasses.replace(u, tensors=[(llama_name(n), q, sh) for n, q, sh in u.tensors])
                     for u in gguf_plan(hf, opts, mtp=True)]
        units = gguf_plan(hf, opts) + mtp_units
        config = {**gguf_config(hf, opts), "num_hidden_layers": 4}
        entries = [TensorEntry(n, q, tuple(sh), u.nbytes) for u in units for n, q, sh in u.tensors]
        encoded = run_items((i for u in units for i in u.items), 1)
        data = (list(islice(encoded, len(u.items))) for u in units for _ in u.tensors)
        stream_gguf(tmp_path / "llama.gguf", config, entries, data,
                    extra_metadata={"deepseek4.nextn_predict_layers": (1, GGUFValueType.UINT32)})
    finally:
        hf.close()
    assert "blk.3.nextn.shared_head_norm.weight" in {t.name for t in GGUFReader(tmp_path / "llama.gguf").tensors}
    plain, _ = load(tmp_path / "llama.gguf", dtype=mx.float32)
    assert plain.config.num_hidden_layers == 3 and not plain.mtp
    model, _ = load(tmp_path / "llama.gguf", dtype=mx.float32, mtp=True)
    assert rel(mtp_logits(model), official_mtp) < 1e-3


def test_cli_draft_without_an_mtp_block_is_one_line(ggufs, tmp_path, capsys):
    lone = tmp_path / "lone.gguf"
    shutil.copy(ggufs["ds4-q4"], lone)
    code = main(["generate", "-m", str(lone), "-p", "hi", "--draft", "mtp"])
    err = capsys.readouterr().err
    assert code != 0 and "no MTP block" in err and "--mtp-gguf" in err and "Traceback" not in err
    code = main(["generate", "-m", str(lone), "-p", "hi", "--draft", "eagle"])
    err = capsys.readouterr().err
    assert code != 0 and "'mtp'" in err and "Traceback" not in err
    # the flag gives the MTP file (bench needs no tokenizer, which this GGUF lacks)
    code = main(["bench", "-m", str(lone), "--contexts", "8", "--gen-tokens", "3", "--draft", "mtp",
                 "--mtp-gguf", str(ggufs["ds4-q4"].with_name("ds4-q4-MTP.gguf"))])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "tokens per forward" in err and "draft_acceptance" in out

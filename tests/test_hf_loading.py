"""Loading official-format directories: exact packed views, strict parameter sets, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

import ds4mlx
from ds4mlx.config import ConfigError
from ds4mlx.io.hf import CheckpointError, open_hf_checkpoint, read_config
from ds4mlx.names import UnknownTensorName, gguf_to_internal, hf_to_internal, internal_to_gguf, internal_to_hf
from ds4mlx.io.safetensors import SafetensorsError, SafetensorsFile, write_safetensors
from ds4mlx.quant.codecs import bf16_decode
from ds4mlx.loader import ModelNotFoundError
from ds4mlx.layers import FormatError, apply_formats
from ds4mlx.quant.formats import MXFP4, MXFP8, WeightFormat, affine
from ds4mlx.quant.mx import dequant_fp4_np, dequant_fp8_np


def _read(ckpt: Path, name: str) -> np.ndarray:
    """Stored bits of one tensor, straight from the header (format definition §2.1)."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    raw = (ckpt / index["weight_map"][name]).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    e = json.loads(raw[8 : 8 + n])[name]
    dtype = {"F8_E4M3": np.uint8, "F8_E8M0": np.uint8, "I8": np.int8, "BF16": np.uint16,
             "F32": np.float32, "I64": np.int64}[e["dtype"]]
    a, b = e["data_offsets"]
    return np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=dtype).reshape(e["shape"])


def _float_value(ckpt: Path, name: str) -> np.ndarray:
    a = _read(ckpt, name)
    return bf16_decode(a) if a.dtype == np.uint16 else a


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    model, tokenizer = ds4mlx.load(tiny_ckpt, dtype=mx.float32, mtp=True)
    # no tokenizer.json, and the published 129 280-id tokenizer would overflow vocab 1024
    assert tokenizer is None
    return model


def test_mtp_block_loads_on_request(tiny_ckpt, loaded):
    main_only, _ = ds4mlx.load(tiny_ckpt, dtype=mx.float32)
    assert not main_only.mtp and main_only.config.num_nextn_predict_layers == 0
    assert loaded.mtp and loaded.config.num_nextn_predict_layers == 1
    tokens = mx.array([[3, 7, 11, 500, 2]])
    assert mx.array_equal(main_only(tokens), loaded(tokens)).item()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensor(ckpt: Path, name: str, new_array: np.ndarray | None):
    """Rewrite the shard holding ``name`` with that tensor replaced (or dropped when None)."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / index["weight_map"][name]
    st = SafetensorsFile(shard)
    entries = []
    for n in st.keys():
        if n == name and new_array is None:
            continue
        entries.append((n, (st.info(n).dtype, new_array if n == name else np.array(st.tensor_np(n)))))
    st.close()
    write_safetensors(shard, entries)
    if new_array is None:
        del index["weight_map"][name]
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


# --- a correct checkpoint -----------------------------------------------------------------------


def test_strict_parameter_set_and_formats(tiny_ckpt, loaded):
    checkpoint = open_hf_checkpoint(tiny_ckpt)
    weights, formats = checkpoint.load_weights()
    checkpoint.close()
    params = dict(tree_flatten(loaded.parameters()))
    assert set(params) == set(weights)
    for name, p in params.items():
        assert p.shape == weights[name].shape, name
    assert checkpoint.has_mtp and "mtp.0.e_proj.scales" in params
    # every official FP8 projection is an mxfp8 QuantizedLinear, every expert stack mxfp4
    assert formats["layers.3.attn.wo_b"] == MXFP8 and formats["layers.0.ffn.experts.w2"] == MXFP4
    assert isinstance(loaded.layers[2].attn.indexer.wq_b, nn.QuantizedLinear)
    assert loaded.layers[2].attn.indexer.wq_b.mode == "mxfp8"
    assert isinstance(loaded.mtp[0].ffn.experts.w1, QuantizedSwitchLinear) and loaded.mtp[0].ffn.experts.w1.mode == "mxfp4"
    assert isinstance(loaded.layers[2].attn.compressor.wkv, nn.Linear)  # BF16 in the file: stays float


def test_packed_weights_dequantize_to_the_file_bytes(tiny_ckpt, loaded):
    params = dict(tree_flatten(loaded.parameters()))
    n_fp8 = n_fp4 = 0
    for path, w in params.items():
        if not path.endswith(".weight") or w.dtype != mx.uint32:
            continue
        module = path[: -len(".weight")]
        s = params[module + ".scales"]
        if ".ffn.experts." in path:
            for e in range(w.shape[0]):
                name = internal_to_hf(path, e)
                ref = dequant_fp4_np(_read(tiny_ckpt, name), _read(tiny_ckpt, name[:-6] + "scale"))
                got = np.array(mx.dequantize(w[e], s[e], mode="mxfp4", group_size=32, dtype=mx.float32))
                assert np.array_equal(got, ref), name
                n_fp4 += 1
        else:
            name = internal_to_hf(path)
            ref = dequant_fp8_np(_read(tiny_ckpt, name), _read(tiny_ckpt, name[:-6] + "scale"))
            got = np.array(mx.dequantize(w, s, mode="mxfp8", group_size=32, dtype=mx.float32))
            assert got.view(np.uint32).tolist() == ref.view(np.uint32).tolist(), name
            n_fp8 += 1
    assert n_fp4 == 6 * 8 * 3 and n_fp8 == 5 * 8 + 2 * 1 + 8 + 2  # experts; 8/layer + 2 indexers + MTP (8 + 2)


def test_float_tensors_hold_the_file_values(tiny_ckpt, loaded):
    params = dict(tree_flatten(loaded.parameters()))
    for path in ("embed.weight", "head.weight", "layers.2.attn.compressor.ape", "layers.0.hc_attn_fn",
                 "layers.4.ffn.gate.bias", "mtp.0.enorm.weight", "layers.2.attn.indexer.compressor.norm.weight"):
        assert np.array_equal(np.array(params[path].astype(mx.float32)), _float_value(tiny_ckpt, path)), path
    tid = params["layers.1.ffn.gate.tid2eid"]
    assert np.array_equal(np.array(tid), _read(tiny_ckpt, "layers.1.ffn.gate.tid2eid"))


def test_forward_and_quantized_projection(loaded, tiny_ckpt):
    tokens = mx.array(np.arange(3, 43, dtype=np.int32)[None])
    logits = loaded(tokens)
    assert logits.shape == (1, 40, 1024) and logits.dtype == mx.float32
    assert np.isfinite(np.array(logits)).all()
    # a swapped projection computes x @ Wᵀ with W the dequantized file weight
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    w = dequant_fp8_np(_read(tiny_ckpt, "layers.1.attn.wo_b.weight"), _read(tiny_ckpt, "layers.1.attn.wo_b.scale"))
    got = np.array(loaded.layers[1].attn.wo_b(mx.array(x)))
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)


def test_4expert_checkpoint_and_override(tiny_ckpt, tiny_ckpt_4expert):
    four, _ = ds4mlx.load(tiny_ckpt_4expert, dtype=mx.float32)
    assert four.experts_per_token == 4 and four.layers[0].ffn.gate.tid2eid.shape == (1024, 4)
    six_as_four, _ = ds4mlx.load(tiny_ckpt, experts_per_token=4, dtype=mx.float32)
    tokens = mx.array([[5, 77, 901, 12, 5, 400, 33]])
    assert np.array_equal(np.array(four(tokens)), np.array(six_as_four(tokens)))


def test_single_file_checkpoint_without_mtp(tiny_ckpt, tmp_path):
    """One ``model.safetensors`` (no index) without the MTP block loads as the main model."""
    dst = tmp_path / "single"
    dst.mkdir()
    shutil.copy(tiny_ckpt / "config.json", dst / "config.json")
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    names = [n for n in index["weight_map"] if not n.startswith("mtp.")]
    files = {s: SafetensorsFile(tiny_ckpt / s) for s in set(index["weight_map"].values())}
    entries = [(n, (files[index["weight_map"][n]].info(n).dtype, files[index["weight_map"][n]].tensor_np(n))) for n in names]
    write_safetensors(dst / "model.safetensors", entries)
    model, _ = ds4mlx.load(dst, dtype=mx.float32)
    assert model.config.num_nextn_predict_layers == 0 and not model.mtp
    full, _ = ds4mlx.load(tiny_ckpt, dtype=mx.float32)
    tokens = mx.array([[1, 2, 3, 700]])
    assert np.array_equal(np.array(model(tokens)), np.array(full(tokens)))


# --- names ----------------------------------------------------------------------------------------


def test_name_table():
    assert hf_to_internal("layers.7.ffn.experts.31.w3.scale") == ("layers.7.ffn.experts.w3.scales", 31)
    assert hf_to_internal("mtp.0.attn.wq_b.scale").path == "mtp.0.attn.wq_b.scales"
    assert internal_to_gguf("embed.weight") == "token_embd.weight"
    assert internal_to_gguf("layers.4.ffn.gate.bias", "llama.cpp") == "blk.4.exp_probs_b.bias"
    assert internal_to_gguf("layers.2.attn.indexer.weights_proj.weight") == "blk.2.indexer.proj.weight"
    assert internal_to_gguf("layers.0.ffn.experts.w2.weight") == "blk.0.ffn_down_exps.weight"
    assert gguf_to_internal("blk.3.attn_kv_a_norm.weight") == "layers.3.attn.kv_norm.weight"
    assert gguf_to_internal("output_hc_scale.weight") == "hc_head_scale"
    assert gguf_to_internal("mtp.0.hc_head_fn.weight") == "mtp.0.hc_head_fn"
    assert gguf_to_internal("mtp.0.ffn_gate_inp.weight") == "mtp.0.ffn.gate.weight"
    for bad in ("model.embed_tokens.weight", "layers.0.attn.q_norm.scale", "layers.0.e_proj.weight"):
        with pytest.raises(UnknownTensorName, match=bad.replace(".", r"\.")):
            hf_to_internal(bad)
    with pytest.raises(UnknownTensorName, match="blk.0.attn_q.weight"):
        gguf_to_internal("blk.0.attn_q.weight")


def test_layout_names_are_official_and_the_layout_reads_only_its_keys():
    """What the shortcuts of the start-up rest on: ``open_hf_checkpoint`` skips the name check
    for the layout's names (and their scales), and layouts are kept by ``LAYOUT_KEYS``' values."""
    from collections.abc import Mapping

    from ds4mlx import names
    from ds4mlx.synthetic import tiny_config

    config = tiny_config()
    layout = names.official_layout(config)
    for spec in layout.values():
        hf_to_internal(spec.name)
        if spec.scale_name:
            hf_to_internal(spec.scale_name)

    class Reads(Mapping):  # records every key looked up
        def __init__(self, d):
            self.d, self.read = d, set()

        def __getitem__(self, k):
            self.read.add(k)
            return self.d[k]

        def __contains__(self, k):
            self.read.add(k)
            return k in self.d

        def __iter__(self):
            return iter(self.d)

        def __len__(self):
            return len(self.d)

    seen = Reads(config)
    assert names._official_layout(seen) == layout
    assert seen.read <= set(names.LAYOUT_KEYS)
    layout.clear()  # a caller's dict: the kept layout is not touched
    assert names.official_layout(dict(config, quantization={"bits": 4})) == names._official_layout(config)
    wider = dict(config, n_routed_experts=config["n_routed_experts"] + 1)
    assert names.official_layout(wider) == names._official_layout(wider) != names._official_layout(config)


def test_header_entries_fast_and_full_checks_agree(tmp_path):
    """``_parse_entry``'s quick path for well-formed entries gives what the full checks
    (``_check_entry``) give, and leaves every malformed entry to them."""
    from ds4mlx.io.safetensors import write_safetensors

    write_safetensors(tmp_path / "a.safetensors", {"x": ("F32", np.zeros((2, 3), np.float32))})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    entries = [
        {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        {"dtype": "BF16", "shape": [], "data_offsets": [8, 10]},
        {"dtype": "U8", "shape": [0, 5], "data_offsets": [4, 4]},
        {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24], "extra": 1},
        {"dtype": "F32", "shape": [True, 3], "data_offsets": [0, 12]},
        {"dtype": "F32", "shape": [2, -3], "data_offsets": [0, 24]},
        {"dtype": "F32", "shape": [2.0, 3], "data_offsets": [0, 24]},
        {"dtype": "F32", "shape": (2, 3), "data_offsets": [0, 24]},
        {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]},
        {"dtype": "F32", "shape": [2, 3], "data_offsets": [-4, 20]},
        {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24, 1]},
        {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24.0]},
        {"dtype": "F32", "shape": [2, 30], "data_offsets": [0, 240]},
        {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 24]},
        {"dtype": ["F32"], "shape": [2, 3], "data_offsets": [0, 24]},
        {"shape": [2, 3], "data_offsets": [0, 24]},
        [1, 2, 3],
    ]

    def outcome(parse, entry):
        try:
            return parse("t", entry, 100, 200)
        except (SafetensorsError, TypeError) as e:  # (a list as dtype: TypeError, as ever)
            return type(e).__name__, str(e)

    for entry in entries:
        assert outcome(f._parse_entry, entry) == outcome(f._check_entry, entry), entry


def test_every_expert_is_checked_not_only_the_first_of_its_shape(tiny_ckpt, tmp_path):
    """The start-up checks each combination of shapes and dtypes once: an expert stored with
    another shape than its siblings is still caught, and named."""
    import struct

    bad = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    name = "layers.1.ffn.experts.5.w1.weight"
    raw = (bad / index[name]).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    header[name]["shape"] = header[name]["shape"][::-1]  # the same bytes, the wrong shape
    assert header[name]["shape"] != header[name]["shape"][::-1]
    h = json.dumps(header).encode()
    (bad / index[name]).write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    with pytest.raises(CheckpointError, match=r"layers\.1\.ffn\.experts\.5\.w1\.weight has shape"):
        open_hf_checkpoint(bad)


def test_apply_formats_errors_name_the_module(tiny_ckpt):
    from ds4mlx.config import ModelConfig
    from ds4mlx.model.transformer import Model

    model = Model(ModelConfig.from_hf(read_config(tiny_ckpt)))
    with pytest.raises(FormatError, match="layers.0.attn_norm"):
        apply_formats(model, {"layers.0.attn_norm": MXFP8})
    with pytest.raises(FormatError, match="layers.9"):
        apply_formats(model, {"layers.9.attn.wq_a": MXFP8})
    with pytest.raises(FormatError, match="layers.0.attn.wq_a.*nvfp9"):
        apply_formats(model, {"layers.0.attn.wq_a": WeightFormat("nvfp9", 4, 16)})
    apply_formats(model, {"layers.0.attn.wq_a": affine(4, 64)})
    assert model.layers[0].attn.wq_a.biases.shape == (128, 4)


# --- bad input -------------------------------------------------------------------------------------


def test_missing_shard(tiny_ckpt, tmp_path):
    bad = _copy(tiny_ckpt, tmp_path / "bad")
    (bad / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        ds4mlx.load(bad)


def test_index_names_a_tensor_the_shard_lacks(tiny_ckpt, tmp_path):
    bad = _copy(tiny_ckpt, tmp_path / "bad")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"]["layers.1.attn.wkv.weight"] = "model-00003-of-00003.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.wkv\.weight.*not there"):
        ds4mlx.load(bad)


def test_missing_tensor(tiny_ckpt, tmp_path):
    bad = _copy(tiny_ckpt, tmp_path / "bad")
    _rewrite_tensor(bad, "layers.3.attn.compressor.norm.weight", None)
    with pytest.raises(CheckpointError, match=r"layers\.3\.attn\.compressor\.norm\.weight.*missing"):
        ds4mlx.load(bad)


def test_unexpected_tensor(tiny_ckpt, tmp_path):
    bad = _copy(tiny_ckpt, tmp_path / "bad")
    # a router bias on a hash layer does not belong to this config
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["layers.0.ffn.gate.weight"]
    st = SafetensorsFile(bad / shard)
    entries = [(n, (st.info(n).dtype, np.array(st.tensor_np(n)))) for n in st.keys()]
    st.close()
    write_safetensors(bad / shard, entries + [("layers.0.ffn.gate.bias", ("F32", np.zeros(8, np.float32)))])
    index["weight_map"]["layers.0.ffn.gate.bias"] = shard
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"layers\.0\.ffn\.gate\.bias.*does not belong"):
        ds4mlx.load(bad)


def test_wrong_shape(tiny_ckpt, tmp_path):
    bad = _copy(tiny_ckpt, tmp_path / "bad")
    _rewrite_tensor(bad, "layers.1.attn.kv_norm.weight", np.zeros(64, np.uint16))
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.kv_norm\.weight.*\(64,\).*expected \(128,\)"):
        ds4mlx.load(bad)
    bad2 = _copy(tiny_ckpt, tmp_path / "bad2")
    _rewrite_tensor(bad2, "layers.2.attn.wq_b.scale", np.zeros((1, 1), np.uint8))
    with pytest.raises(CheckpointError, match=r"layers\.2\.attn\.wq_b\.scale.*\(1, 1\).*expected \(2, 1\)"):
        ds4mlx.load(bad2)


def test_tid2eid_out_of_range(tiny_ckpt, tmp_path):
    bad = _copy(tiny_ckpt, tmp_path / "bad")
    table = _read(bad, "layers.2.ffn.gate.tid2eid").copy()
    table[5, 1] = 8
    _rewrite_tensor(bad, "layers.2.ffn.gate.tid2eid", table)
    with pytest.raises(CheckpointError, match=r"layers\.2\.ffn\.gate\.tid2eid.*0\.\.8.*outside 0\.\.7"):
        ds4mlx.load(bad)


def test_unknown_model_type(tiny_ckpt, tmp_path):
    bad = _copy(tiny_ckpt, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "deepseek_v3"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json.*deepseek_v3"):
        ds4mlx.load(bad)


def test_truncated_shard(tiny_ckpt, tmp_path):
    bad = _copy(tiny_ckpt, tmp_path / "bad")
    shard = bad / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(SafetensorsError, match=r"model-00003-of-00003\.safetensors: tensor 'mtp\.0\..*truncated"):
        ds4mlx.load(bad)
    shard.write_bytes(b"\x00\x10\x00\x00\x00\x00\x00\x00{")  # header length past the end
    with pytest.raises(SafetensorsError, match=r"model-00003-of-00003\.safetensors: header length"):
        ds4mlx.load(bad)


def test_bad_headers(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": ("F32", np.zeros(4, np.float32))})
    raw = path.read_bytes().replace(b'"F32"', b'"F9_X"')
    path.write_bytes(raw)
    with pytest.raises(SafetensorsError, match=r"x\.safetensors: tensor 'a': unknown dtype 'F9_X'"):
        SafetensorsFile(path)
    path.write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{")
    with pytest.raises(SafetensorsError, match=r"x\.safetensors: header is not valid JSON"):
        SafetensorsFile(path)


def test_experts_per_token_larger_than_allowed(tiny_ckpt, tiny_ckpt_4expert):
    with pytest.raises(ConfigError, match=r"config\.json.*experts_per_token=7"):
        ds4mlx.load(tiny_ckpt, experts_per_token=7)
    with pytest.raises(ConfigError, match=r"tiny-4expert/config\.json.*experts_per_token=6"):
        ds4mlx.load(tiny_ckpt_4expert, experts_per_token=6)  # the hash table has 4 columns


def test_unresolvable_sources(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="nothere.gguf"):
        ds4mlx.load(tmp_path / "nothere.gguf")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-model.*Offline"):
        ds4mlx.load("no-such-org/no-such-model")
    with pytest.raises(ModelNotFoundError, match="no/such/dir"):
        ds4mlx.load("no/such/dir")


def test_released_pages_read_back_the_same(tmp_path):
    """A tensor's mapped pages dropped after its copy (the loader does so, to keep a load's peak
    memory the model's) read back from the file unchanged, its neighbours too."""
    rng = np.random.default_rng(3)
    arrays = {f"t{i}": rng.standard_normal((37, 111 + i)).astype(np.float32) for i in range(4)}
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {n: ("F32", a) for n, a in arrays.items()})
    with SafetensorsFile(path) as st:
        views = {n: st.tensor_np(n) for n in arrays}
        for n in arrays:
            st.release(n)
        for n, a in arrays.items():
            assert np.array_equal(views[n], a) and np.array_equal(st.tensor_np(n), a)

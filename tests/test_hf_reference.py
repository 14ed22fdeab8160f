"""Checks of the transformers reference harness (tests/hf_reference.py) on the tiny checkpoint."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers", minversion="5.23")
if not hasattr(__import__("transformers"), "DeepseekV4ForCausalLM"):
    pytest.skip("transformers has no DeepseekV4ForCausalLM", allow_module_level=True)

from ds4mlx.synthetic import make_4expert, write_tiny_checkpoint  # the checkpoint writer only

from hf_reference import (
    HFReferenceError,
    hf_logits,
    hf_logits_cached,
    hf_state_dict,
    load_hf_model,
    read_official_float,
    read_safetensors_raw,
)

SEQ = 300  # crosses the 16-token window, 75 ratio-4 windows (top-k 4), two ratio-128 windows


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("hfref") / "tiny", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return read_official_float(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny):
    return load_hf_model(tiny)


@pytest.fixture(scope="module")
def tokens(tiny):
    config, _ = tiny
    return np.random.default_rng(1).integers(0, config["vocab_size"], size=(2, SEQ))


@pytest.fixture(scope="module")
def logits(model, tokens):
    return hf_logits(model, tokens)


def _raw_all(directory):
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    raw = {}
    for shard in sorted(set(index["weight_map"].values())):
        raw.update(read_safetensors_raw(directory / shard))
    return raw


def test_fp8_dequant_matches_torch_float8(tiny_dir, tiny):
    _, tensors = tiny
    raw = _raw_all(tiny_dir)
    fp8 = [n for n, (dt, _) in raw.items() if dt == "F8_E4M3"]
    assert len(fp8) > 20
    for name in fp8:
        q = torch.from_numpy(np.array(raw[name][1])).view(torch.float8_e4m3fn).float()
        s = torch.from_numpy(np.array(raw[name[: -len("weight")] + "scale"][1])).view(torch.float8_e8m0fnu).float()
        s = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: q.shape[0], : q.shape[1]]
        np.testing.assert_array_equal(tensors[name], (q * s).numpy(), err_msg=name)
    # at least one weight spans 2×2 blocks with different scales (catches a row/column swap)
    s = raw["layers.0.attn.wo_b.scale"][1]
    assert s.shape == (2, 2) and len(np.unique(s)) > 1


def test_fp4_dequant_matches_mlx_mxfp4(tiny_dir, tiny):
    mx = pytest.importorskip("mlx.core")
    _, tensors = tiny
    raw = _raw_all(tiny_dir)
    names = [n for n, (dt, _) in raw.items() if dt == "I8"]
    assert names and all(".experts." in n for n in names)
    for name in names[:12]:
        packed = np.ascontiguousarray(raw[name][1])
        scales = np.ascontiguousarray(raw[name[: -len("weight")] + "scale"][1])
        w = mx.dequantize(mx.array(packed.view(np.uint32)), mx.array(scales), group_size=32, bits=4, mode="mxfp4")
        np.testing.assert_array_equal(tensors[name], np.array(w.astype(mx.float32)), err_msg=name)


def test_bf16_and_int_tensors(tiny_dir, tiny):
    _, tensors = tiny
    raw = _raw_all(tiny_dir)
    dtype, bits = raw["embed.weight"]
    assert dtype == "BF16"
    ref = torch.from_numpy(np.array(bits).view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(tensors["embed.weight"], ref)
    assert tensors["layers.0.ffn.gate.tid2eid"].dtype == np.int64
    assert not any(n.endswith(".scale") for n in tensors)


def test_state_dict_is_complete(tiny, model):
    config, tensors = tiny
    state = hf_state_dict(tensors)
    assert set(state) == set(model.state_dict())  # nothing missing, nothing unexpected
    assert any(n.startswith("mtp.") for n in tensors)  # MTP present on disk, dropped as in transformers
    E, F, H = config["n_routed_experts"], config["moe_intermediate_size"], config["hidden_size"]
    gate_up = state["model.layers.3.mlp.experts.gate_up_proj"]
    assert tuple(gate_up.shape) == (E, 2 * F, H)
    np.testing.assert_array_equal(gate_up[5, :F].numpy(), tensors["layers.3.ffn.experts.5.w1.weight"])
    np.testing.assert_array_equal(gate_up[5, F:].numpy(), tensors["layers.3.ffn.experts.5.w3.weight"])
    loaded = model.state_dict()
    for key in ("lm_head.weight", "model.layers.2.self_attn.compressor.indexer.q_b_proj.weight",
                "model.layers.0.mlp.gate.tid2eid", "model.layers.4.mlp.gate.e_score_correction_bias"):
        assert torch.equal(loaded[key], state[key].to(loaded[key].dtype)), key


def test_config_is_explicit(model, tiny):
    config, _ = tiny
    cfg = model.config
    ratio_of = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    assert [ratio_of[t] for t in cfg.layer_types] == config["compress_ratios"][: config["num_hidden_layers"]]
    assert cfg.mlp_layer_types[: config["num_hash_layers"]] == ["hash_moe"] * config["num_hash_layers"]
    assert cfg.rope_parameters["main"]["rope_type"] == "default"
    assert cfg.rope_parameters["compress"]["rope_type"] == "yarn"
    assert cfg._attn_implementation == "eager"
    # YaRN only on compressed layers, no magnitude scaling: pair 0 keeps 160000^0, the last pair is /16
    rot = model.model.rotary_emb
    assert rot.compress_attention_scaling == 1.0
    half = config["qk_rope_head_dim"] // 2
    plain = 1.0 / (config["compress_rope_theta"] ** (np.arange(half) * 2 / config["qk_rope_head_dim"]))
    np.testing.assert_allclose(rot.compress_inv_freq.numpy()[[0, -1]], [plain[0], plain[-1] / 16], rtol=1e-6)


def test_logits_finite_and_spread(logits, tiny):
    config, _ = tiny
    assert logits.shape == (2, SEQ, config["vocab_size"]) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert logits.std(axis=-1).min() > 0.5  # not degenerate
    assert np.abs(logits[0] - logits[1]).max() > 1e-2  # rows depend on their tokens


def test_causal(model, tokens, logits):
    changed = tokens.copy()
    changed[:, 150:] = (changed[:, 150:] + 1) % model.config.vocab_size
    np.testing.assert_array_equal(hf_logits(model, changed)[:, :150], logits[:, :150])


def test_indexer_topk_is_in_force(tiny, model, tokens):
    config, tensors = tiny
    k = config["index_topk"]
    short = tokens[:, :64]  # 16 ratio-4 rows by the end, 4 times top-k: both models on the same input
    logits = hf_logits(model, short)
    unfiltered = hf_logits(({**config, "index_topk": 4096}, tensors), short)
    # a query at t sees (t+1)//4 compressed rows: identical while that is <= k, different after
    first_filtered = 4 * (k + 1) - 1
    np.testing.assert_array_equal(unfiltered[:, :first_filtered], logits[:, :first_filtered])
    assert np.abs(unfiltered[:, first_filtered:] - logits[:, first_filtered:]).max() > 1e-3


def test_cache_chunked_prefill_and_decode(model, tokens, logits):
    chunked = hf_logits_cached(model, tokens, chunks=(37, 1, 5, 128))
    np.testing.assert_allclose(chunked, logits, rtol=0, atol=1e-4)
    n = 140  # token-by-token across the first ratio-128 boundary
    decoded = hf_logits_cached(model, tokens[:1, :n], chunks=(1,))
    np.testing.assert_allclose(decoded, logits[:1, :n], rtol=0, atol=1e-4)


def test_4expert(tiny_dir, tiny, tokens, logits, tmp_path):
    four_dir = make_4expert(tiny_dir, tmp_path / "tiny4")
    four = hf_logits(four_dir, tokens, experts_per_token=4)
    assert np.isfinite(four).all()
    # the 4Expert rule on the original weights (override k, tid2eid cut to 4 columns) is the same model
    np.testing.assert_array_equal(hf_logits(tiny, tokens, experts_per_token=4), four)
    assert np.abs(four - logits).max() > 1e-2


def _write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_bad_checkpoints_name_the_tensor(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(tiny_dir / "config.json", bad / "config.json")
    _write_safetensors(bad / "model.safetensors", {"layers.0.attn.wq_a.weight": ("F8_E4M3", np.zeros((128, 256), np.uint8))})
    with pytest.raises(HFReferenceError, match=r"layers\.0\.attn\.wq_a\.weight"):
        read_official_float(bad)
    _write_safetensors(bad / "model.safetensors", {
        "layers.0.attn.wq_a.weight": ("F8_E4M3", np.zeros((128, 256), np.uint8)),
        "layers.0.attn.wq_a.scale": ("F8_E8M0", np.zeros((2, 2), np.uint8)),
    })
    with pytest.raises(HFReferenceError, match=r"wq_a\.weight: FP8 scale shape"):
        read_official_float(bad)
    with pytest.raises(HFReferenceError, match="layers.0.attn.bogus"):
        hf_state_dict({"layers.0.attn.bogus": np.zeros(3, np.float32)})

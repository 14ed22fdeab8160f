"""The tiny checkpoints are in the exact official on-disk format (checkpoint_format.md §1.1, §2, §6).

Files are read back with the reference ``safetensors`` package (and torch's FP8 dtypes when
available), never with ds4mlx's own reader.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from ds4mlx.quant.mx import dequant_fp8_np
from ds4mlx.synthetic import demo_model_path, write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]

# config.json keys of DeepSeek-V4-Flash, as published (checkpoint_format.md §1.1)
FLASH_KEYS = {
    "architectures", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id",
    "expert_dtype", "hc_eps", "hc_mult", "hc_sinkhorn_iters", "head_dim", "hidden_act",
    "hidden_size", "index_head_dim", "index_n_heads", "index_topk", "initializer_range",
    "max_position_embeddings", "model_type", "moe_intermediate_size", "n_routed_experts",
    "n_shared_experts", "norm_topk_prob", "num_attention_heads", "num_experts_per_tok",
    "num_hidden_layers", "num_hash_layers", "num_key_value_heads", "num_nextn_predict_layers",
    "o_groups", "o_lora_rank", "q_lora_rank", "qk_rope_head_dim", "quantization_config",
    "rms_norm_eps", "rope_scaling", "rope_theta", "routed_scaling_factor", "scoring_func",
    "sliding_window", "swiglu_limit", "tie_word_embeddings", "topk_method", "torch_dtype",
    "transformers_version", "use_cache", "vocab_size", "compress_rope_theta", "compress_ratios",
}


def _headers(ckpt: Path) -> dict[str, dict]:
    """{tensor: {dtype, shape, shard}} from the raw headers (format definition, §2.1)."""
    out = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        assert (8 + n) % 8 == 0, "data section not 8-byte aligned"
        header.pop("__metadata__", None)
        for name, e in header.items():
            out[name] = {"dtype": e["dtype"], "shape": tuple(e["shape"]), "shard": shard.name,
                         "nbytes": e["data_offsets"][1] - e["data_offsets"][0]}
    return out


def _raw(ckpt: Path, shard: str, name: str) -> np.ndarray:
    """Stored bits as numpy, via the reference reader (torch framework keeps FP8 dtypes)."""
    torch = pytest.importorskip("torch")
    with safe_open(ckpt / shard, framework="pt") as f:
        t = f.get_tensor(name)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu):
        return t.view(torch.uint8).numpy()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _digest(ckpt: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(ckpt.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_files_index_and_config(tiny_ckpt):
    shards = sorted(p.name for p in tiny_ckpt.glob("*.safetensors"))
    assert len(shards) >= 3
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    heads = _headers(tiny_ckpt)
    assert index["weight_map"] == {n: h["shard"] for n, h in heads.items()}
    assert index["metadata"]["total_size"] == sum(h["nbytes"] for h in heads.values())
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert set(config) == FLASH_KEYS
    assert config["model_type"] == "deepseek_v4" and config["compress_ratios"] == [0, 0, 4, 128, 4, 0]
    assert config["index_n_heads"] >= 16 and config["num_experts_per_tok"] == 6
    assert json.loads((tiny_ckpt / "generation_config.json").read_text())["eos_token_id"] == 1
    # the MTP block wholly in the last shard; at least one weight/scale pair split across shards
    assert {h["shard"] for n, h in heads.items() if n.startswith("mtp.")} == {shards[-1]}
    assert not any(n.startswith("mtp.") for n, h in heads.items() if h["shard"] != shards[-1])
    split = [n for n in heads if n.endswith(".scale") and heads[n]["shard"] != heads[n[:-5] + "weight"]["shard"]]
    assert split and any(heads[n[:-5] + "weight"]["dtype"] == "F8_E4M3" for n in split)


def test_tensor_inventory_dtypes_and_shapes(tiny_ckpt):
    heads = _headers(tiny_ckpt)
    config = json.loads((tiny_ckpt / "config.json").read_text())
    H, E, V, k = config["hidden_size"], config["n_routed_experts"], config["vocab_size"], config["num_experts_per_tok"]
    ratios = config["compress_ratios"]
    for name, h in heads.items():
        if name.endswith(".scale"):
            assert h["dtype"] == "F8_E8M0", name
            w = heads[name[:-5] + "weight"]
            out_dim = w["shape"][0]
            if w["dtype"] == "F8_E4M3":
                assert h["shape"] == (-(-out_dim // 128), -(-w["shape"][1] // 128)), name
            else:
                assert w["dtype"] == "I8" and ".ffn.experts." in name
                assert h["shape"] == (out_dim, w["shape"][1] * 2 // 32), name
    quantized = [n for n in heads if n.endswith(".weight") and n[:-6] + "scale" in heads]
    assert quantized and all(heads[n]["dtype"] in ("F8_E4M3", "I8") for n in quantized)
    assert {heads[n]["dtype"] for n in heads if re.search(r"experts\.\d+\.w\d\.weight$", n)} == {"I8"}
    assert heads["layers.0.ffn.experts.3.w2.weight"]["shape"] == (H, config["moe_intermediate_size"] // 2)
    assert heads["layers.3.attn.wo_b.weight"]["shape"] == (H, config["o_groups"] * config["o_lora_rank"])
    assert heads["layers.3.attn.wo_b.scale"]["shape"] == (2, 2)  # a 2×2 block grid
    assert heads["embed.weight"] == {**heads["embed.weight"], "dtype": "BF16", "shape": (V, H)}

    n_layers, n_hash = config["num_hidden_layers"], config["num_hash_layers"]
    for i in range(n_layers + 1):
        p = f"layers.{i}." if i < n_layers else "mtp.0."
        r = ratios[i]
        hashed = i < n_hash and i < n_layers
        assert (p + "ffn.gate.tid2eid" in heads) == hashed and (p + "ffn.gate.bias" in heads) == (not hashed)
        assert (p + "attn.compressor.wkv.weight" in heads) == (r > 0)
        assert (p + "attn.indexer.wq_b.weight" in heads) == (r == 4)
        assert (p + "attn.indexer.compressor.ape" in heads) == (r == 4)
        assert all(f"{p}ffn.experts.{e}.w{j}.weight" in heads for e in range(E) for j in (1, 2, 3))
        if hashed:
            assert heads[p + "ffn.gate.tid2eid"]["dtype"] == "I64"
            assert heads[p + "ffn.gate.tid2eid"]["shape"] == (V, k)
    for extra in ("e_proj.weight", "e_proj.scale", "h_proj.weight", "enorm.weight", "hnorm.weight",
                  "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"):
        assert "mtp.0." + extra in heads
    assert not any(n.startswith("mtp.0.") and ("embed" in n or "head.weight" == n[6:]) for n in heads)


def test_values_are_valid_codes(tiny_ckpt):
    heads = _headers(tiny_ckpt)
    config = json.loads((tiny_ckpt / "config.json").read_text())
    for name, h in heads.items():
        if h["dtype"] == "F8_E4M3":
            codes = _raw(tiny_ckpt, h["shard"], name)
            assert not np.isin(codes, [0x7F, 0xFF]).any(), f"NaN code in {name}"
        elif h["dtype"] == "F8_E8M0":
            s = _raw(tiny_ckpt, h["shard"], name)
            assert s.min() > 100 and s.max() < 140, name  # sane powers of two, never 0/255
        elif name.endswith(".tid2eid"):
            t = _raw(tiny_ckpt, h["shard"], name)
            assert t.min() >= 0 and t.max() < config["n_routed_experts"]
            assert all(len(set(row)) == t.shape[1] for row in t.tolist()), "duplicate expert in a row"
    # different 128×128 blocks carry different scales (catches block-index swaps)
    s = _raw(tiny_ckpt, heads["layers.3.attn.wo_b.scale"]["shard"], "layers.3.attn.wo_b.scale")
    assert len(np.unique(s)) > 1


def test_fp8_bytes_decode_identically_in_torch(tiny_ckpt):
    torch = pytest.importorskip("torch")
    heads = _headers(tiny_ckpt)
    name = "layers.3.attn.wo_b.weight"
    with safe_open(tiny_ckpt / heads[name]["shard"], framework="pt") as f:
        w = f.get_tensor(name).to(torch.float32)
    with safe_open(tiny_ckpt / heads[name[:-6] + "scale"]["shard"], framework="pt") as f:
        s = f.get_tensor(name[:-6] + "scale").to(torch.float32)
    ref = (w * s.repeat_interleave(128, 0).repeat_interleave(128, 1)).numpy()
    ours = dequant_fp8_np(_raw(tiny_ckpt, heads[name]["shard"], name),
                          _raw(tiny_ckpt, heads[name[:-6] + "scale"]["shard"], name[:-6] + "scale"))
    assert np.array_equal(ours, ref)
    assert 0.02 < ref.std() < 0.2  # ≈ 1/sqrt(in): activations stay O(1)


def test_deterministic_from_seed(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", seed=7, num_layers=3, mtp=False)
    b = write_tiny_checkpoint(tmp_path / "b", seed=7, num_layers=3, mtp=False)
    c = write_tiny_checkpoint(tmp_path / "c", seed=8, num_layers=3, mtp=False)
    assert _digest(a) == _digest(b) != _digest(c)
    config = json.loads((a / "config.json").read_text())
    assert config["compress_ratios"] == [0, 0, 4] and config["num_nextn_predict_layers"] == 0
    assert not any(n.startswith("mtp.") for n in _headers(a))


def test_4expert_variant(tiny_ckpt, tiny_ckpt_4expert):
    src, dst = _headers(tiny_ckpt), _headers(tiny_ckpt_4expert)
    assert set(src) == set(dst)
    config = json.loads((tiny_ckpt_4expert / "config.json").read_text())
    original = json.loads((tiny_ckpt / "config.json").read_text())
    assert config == {**original, "num_experts_per_tok": 4}
    index = json.loads((tiny_ckpt_4expert / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(h["nbytes"] for h in dst.values())
    cut = 0
    for name, h in src.items():
        a, b = _raw(tiny_ckpt, h["shard"], name), _raw(tiny_ckpt_4expert, dst[name]["shard"], name)
        if name.endswith(".tid2eid"):
            assert dst[name]["dtype"] == "I64" and np.array_equal(b, a[:, :4])
            cut += 1
        else:
            assert dst[name]["dtype"] == h["dtype"] and np.array_equal(a, b), name
    assert cut == original["num_hash_layers"]


def test_demo_model_is_cached_atomically(tmp_path):
    first = demo_model_path(cache_dir=tmp_path, num_layers=3, mtp=False)
    stamp = (first / "model.safetensors.index.json").stat().st_mtime_ns
    again = demo_model_path(cache_dir=tmp_path, num_layers=3, mtp=False)
    assert again == first and (first / "model.safetensors.index.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary directory left
    assert json.loads((first / "config.json").read_text())["model_type"] == "deepseek_v4"


def test_cli_script(tmp_path):
    out = tmp_path / "cli"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tiny_checkpoint.py"), str(out), "--4expert",
         "--seed", "3", "--num-layers", "3", "--no-mtp"],
        check=True, cwd=REPO, capture_output=True,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts_per_tok"] == 4 and config["num_hidden_layers"] == 3
    assert _headers(out)["layers.0.ffn.gate.tid2eid"]["shape"] == (config["vocab_size"], 4)

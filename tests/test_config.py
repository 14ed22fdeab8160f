"""ModelConfig: values come from the file, bad values are named."""

import dataclasses
import json

import pytest

from ds4mlx.config import ConfigError, ModelConfig
from ds4mlx.io.hf import read_config

FLASH = {
    "model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43,
    "num_attention_heads": 64, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024,
    "o_groups": 8, "o_lora_rank": 1024, "sliding_window": 128,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "n_routed_experts": 256,
    "num_experts_per_tok": 6, "moe_intermediate_size": 2048, "num_hash_layers": 3,
    "num_nextn_predict_layers": 1, "rope_theta": 10000, "compress_rope_theta": 160000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0, "scoring_func": "sqrtsoftplus", "quantization_config": {"fmt": "e4m3"},
}


def test_flash_schedule():
    c = ModelConfig.from_hf(FLASH)
    assert [c.ratio(i) for i in (0, 1, 2, 3, 41, 42, 43)] == [0, 0, 4, 128, 128, 4, 0]
    assert [c.is_hash_layer(i) for i in (0, 2, 3, 43)] == [True, True, False, False]
    assert c.check_experts_per_token(None) == 6 and c.extra["quantization_config"] == {"fmt": "e4m3"}


def test_override_and_limits():
    c = ModelConfig.from_hf(FLASH)
    assert c.check_experts_per_token(4) == 4 and c.num_experts_per_tok == 6
    with pytest.raises(ConfigError, match="experts_per_token=7"):
        c.check_experts_per_token(7)
    with pytest.raises(ConfigError, match="experts_per_token=0"):
        c.check_experts_per_token(0)
    # Without hash layers the table width does not bind.
    assert ModelConfig.from_hf({**FLASH, "num_hash_layers": 0}).check_experts_per_token(8) == 8


def test_config_is_immutable():
    src = {**FLASH, "compress_ratios": FLASH["compress_ratios"][:43]}  # no entry for the MTP layer
    c = ModelConfig.from_hf(src)
    assert len(c.compress_ratios) == 44 and c.compress_ratios[43] == 0  # MTP slot padded, in a copy
    assert len(src["compress_ratios"]) == 43 and c.to_hf()["compress_ratios"] == list(c.compress_ratios)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_experts_per_tok = 4


@pytest.mark.parametrize("change, key", [
    ({"model_type": "deepseek_v3"}, "model_type"),
    ({"compress_ratios": [0, 0, 8] + [4] * 41}, "compress_ratios"),
    ({"compress_ratios": [0] * 10}, "compress_ratios"),
    ({"rope_scaling": None}, "rope_scaling"),
    ({"scoring_func": "sigmoid"}, "scoring_func"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
])
def test_bad_values_are_named(change, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_hf({**FLASH, **change})


def test_missing_key_named(tmp_path):
    d = dict(FLASH)
    del d["num_hash_layers"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="num_hash_layers"):
        ModelConfig.from_hf(read_config(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_config(tmp_path / "nowhere")

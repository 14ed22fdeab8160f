"""Model configuration, built from an HF ``config.json`` dict (GGUF metadata is mapped to one).

Every field that shapes the graph is read from the file; library defaults (transformers,
mlx-lm) are wrong for Flash (layer pattern, RoPE regime), so nothing falls back silently.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing or inconsistent; the message names the key."""


ATTENTION_RATIOS = (0, 4, 128)

# Keys the graph cannot be built without.
_REQUIRED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
    "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window",
    "compress_ratios", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
    "num_hash_layers",
)

# What each scalar key must hold (checked before anything is built from it, so a bad value is
# reported as the key and value, never as an error deep inside the model code).
_POSITIVE_INT = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
    "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window",
    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "num_key_value_heads",
    "hc_mult", "index_n_heads", "index_head_dim", "index_topk", "max_position_embeddings",
)
_NONNEGATIVE_INT = ("num_hash_layers", "n_shared_experts", "hc_sinkhorn_iters", "num_nextn_predict_layers",
                    "bos_token_id")
_POSITIVE_FLOAT = ("hc_eps", "rms_norm_eps", "rope_theta", "compress_rope_theta", "routed_scaling_factor",
                   "swiglu_limit")
_BOOL = ("norm_topk_prob", "tie_word_embeddings")
_ROPE_SCALING_NUMBERS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def json_kind(value: Any) -> str:
    """How JSON spells the kind of a parsed value ("null", "an array", ...), for messages."""
    kinds = {type(None): "null", bool: "a boolean", str: "a string", list: "an array", dict: "an object"}
    return kinds.get(type(value), "a number")


def _shown(value: Any) -> str:
    """A config value as the file spells it (JSON), so ``null`` and ``"5"`` read as written."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def check_hf_values(d: Any, source: str = "config.json", names: dict[str, str] | None = None) -> None:
    """Raise ``ConfigError`` naming the key and value when a config dict holds a value of the
    wrong type or range (null, a string for a number, a negative count or eps, ...).
    ``names`` maps config keys to how the source spells them (GGUF metadata keys)."""
    names = names or {}

    def bad(key: str, value: Any, expected: str):
        raise ConfigError(f"{source}: {names.get(key, key)} is {_shown(value)}, expected {expected}")

    if not isinstance(d, dict):
        raise ConfigError(f"{source}: the configuration is {json_kind(d)}, expected a JSON object")
    for key in _POSITIVE_INT:
        if key in d and not (_is_int(d[key]) and d[key] > 0):
            bad(key, d[key], "a positive integer")
    for key in _NONNEGATIVE_INT:
        if key in d and not (_is_int(d[key]) and d[key] >= 0):
            bad(key, d[key], "an integer >= 0")
    for key in _POSITIVE_FLOAT:
        if key in d and not (_is_number(d[key]) and d[key] > 0):
            bad(key, d[key], "a positive finite number")
    for key in _BOOL:
        if key in d and not isinstance(d[key], bool):
            bad(key, d[key], "true or false")
    if "scoring_func" in d and not isinstance(d["scoring_func"], str):
        bad("scoring_func", d["scoring_func"], "a string")
    ratios = d.get("compress_ratios")
    if "compress_ratios" in d and not (isinstance(ratios, list) and all(_is_int(r) for r in ratios)):
        bad("compress_ratios", ratios, "a list of integers")
    eos = d.get("eos_token_id")
    if "eos_token_id" in d and not (
        (_is_int(eos) and eos >= 0) or (isinstance(eos, list) and eos and all(_is_int(e) and e >= 0 for e in eos))
    ):
        bad("eos_token_id", eos, "a token id or a list of token ids")
    vocab = d.get("vocab_size")
    if _is_int(vocab):
        for key in ("bos_token_id", "eos_token_id"):
            ids = d.get(key)
            for i in ids if isinstance(ids, list) else [ids]:
                if _is_int(i) and i >= vocab:
                    bad(key, ids, f"ids below vocab_size {vocab}")
    rope = d.get("rope_scaling")
    if rope is not None:
        if not isinstance(rope, dict):
            bad("rope_scaling", rope, "an object (or null)")
        for key in _ROPE_SCALING_NUMBERS:
            if key in rope and not (_is_number(rope[key]) and rope[key] > 0):
                bad(f"rope_scaling.{key}", rope[key], "a positive finite number")


@dataclass(frozen=True)
class ModelConfig:
    """Immutable once built: ``from_hf`` validates and returns the finished config. The routed
    top-k actually used at run time lives on the model (``Model.experts_per_token``)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    compress_ratios: tuple[int, ...]
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    num_hash_layers: int
    n_shared_experts: int = 1
    num_key_value_heads: int = 1
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict[str, Any] | None = None
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    num_nextn_predict_layers: int = 0
    max_position_embeddings: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int | list[int] = 1
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_hf(cls, d: dict[str, Any], *, source: str = "config.json",
                names: dict[str, str] | None = None) -> "ModelConfig":
        """``names``: how the source spells the keys (GGUF metadata keys), for the messages."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: the configuration is {json_kind(d)}, expected a JSON object")
        model_type = d.get("model_type")
        if model_type != "deepseek_v4":
            raise ConfigError(
                f"{source}: model_type is {model_type!r}, expected 'deepseek_v4' "
                "(DeepSeek V4 Flash)"
            )
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing keys {[(names or {}).get(k, k) for k in missing]}")
        check_hf_values(d, source, names)
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        kwargs["compress_ratios"] = tuple(int(r) for r in kwargs["compress_ratios"])
        return cls(**kwargs, extra=extra).validate(source, names)

    def to_hf(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d["compress_ratios"] = list(self.compress_ratios)
        d.update(self.extra)
        d["model_type"] = "deepseek_v4"
        return d

    # ---------------------------------------------------------------- checks
    def validate(self, source: str = "config", names: dict[str, str] | None = None) -> "ModelConfig":
        """The checked config: a copy with ``compress_ratios`` padded for the MTP layers (which
        are sliding-window only); raises ``ConfigError`` naming the key at fault."""
        def bad(key: str, why: str):
            raise ConfigError(f"{source}: {(names or {}).get(key, key)} {why}")

        n_total = self.num_hidden_layers + self.num_nextn_predict_layers
        if len(self.compress_ratios) < self.num_hidden_layers:
            bad("compress_ratios", f"has {len(self.compress_ratios)} entries for "
                f"{self.num_hidden_layers} layers")
        ratios = tuple(self.compress_ratios) + (0,) * max(0, n_total - len(self.compress_ratios))
        for r in ratios:
            if r not in ATTENTION_RATIOS:
                bad("compress_ratios", f"contains {r}; supported ratios are {ATTENTION_RATIOS}")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            bad("qk_rope_head_dim", f"= {self.qk_rope_head_dim} does not fit head_dim {self.head_dim}")
        if self.num_attention_heads % self.o_groups:
            bad("o_groups", f"= {self.o_groups} does not divide num_attention_heads")
        if self.num_key_value_heads != 1:
            bad("num_key_value_heads", "must be 1 (one shared KV head)")
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            bad("num_experts_per_tok", f"= {self.num_experts_per_tok} outside 1..{self.n_routed_experts}")
        if self.scoring_func != "sqrtsoftplus":
            bad("scoring_func", f"= {self.scoring_func!r}; only 'sqrtsoftplus' is supported")
        if any(r > 0 for r in ratios) and self.rope_scaling is None:
            # Compressed layers use YaRN; a config without it would silently change the graph.
            bad("rope_scaling", "is missing but compressed layers need the YaRN parameters")
        if self.hc_mult < 1:
            bad("hc_mult", "must be positive")
        return self if ratios == self.compress_ratios else replace(self, compress_ratios=ratios)

    def check_experts_per_token(self, k: int | None, source: str = "config") -> int:
        """The routed top-k to run: the file's ``num_experts_per_tok`` when ``k`` is None. Hash
        layers use the first k columns of ``tid2eid``, which only has ``num_experts_per_tok``
        columns, so k may not exceed the file's value when the model has hash layers."""
        if k is None:
            return self.num_experts_per_tok
        k = int(k)
        limit = self.num_experts_per_tok if self.num_hash_layers > 0 else self.n_routed_experts
        if not 1 <= k <= limit:
            raise ConfigError(
                f"{source}: experts_per_token={k} not allowed; must be 1..{limit} "
                f"(num_experts_per_tok={self.num_experts_per_tok}, tid2eid width of the hash layers)"
            )
        return k

    # ---------------------------------------------------------------- derived
    def ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        # MTP blocks sit at ids >= num_hidden_layers and are never hashed.
        return layer < min(self.num_hash_layers, self.num_hidden_layers)

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

"""THE tensor-name table: official HF names ↔ internal module paths ↔ GGUF names.

* Official (HF safetensors): ``embed.weight``, ``layers.{i}.attn.wq_a.weight`` (+ ``.scale``),
  ``layers.{i}.ffn.experts.{e}.w1.weight``, ``mtp.{j}.e_proj.weight``, … (no ``model.`` prefix).
* Internal (``Model`` parameter paths): the official names, with routed experts stacked per
  layer and projection (``layers.{i}.ffn.experts.w1.weight`` is ``[E, out, in]``, expert e is
  row e) and the quantisation scales of packed weights under ``.scales`` (MLX's name).
* GGUF (antirez/ds4 and upstream llama.cpp ``deepseek4``, which use the same names):
  ``token_embd.weight``, ``blk.{i}.attn_q_a.weight``,
  ``blk.{i}.ffn_gate_exps.weight`` (experts stacked), ``mtp.{j}.attn_q_a.weight``, …

The same table also knows which tensors an official checkpoint holds for a given config and
with what logical shapes and storage (``official_layout``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple


class UnknownTensorName(ValueError):
    """A tensor name is not part of DeepSeek V4 Flash."""


GGUF_FLAVORS = ("ds4", "llama.cpp")

# --- the table ------------------------------------------------------------------------------
# (official suffix, GGUF suffix, storage, presence, ds4 type); globals have no presence
# storage: fp8 = E4M3 weight + 128×128 E8M0 ``.scale``; fp4 = packed E2M1 ``I8`` + E8M0 per 32;
#          bf16 / f32 / i64 = the official dtype of an unquantised tensor.
# presence: all | compress (ratio > 0) | index (ratio == 4) | hash | score | mtp (MTP extras)
# ds4 type: the GGML type antirez/ds4 validates for the tensor in its q2/q4 files (routed experts
#           vary by preset: None; MTP extras are not in the main file: None)

_GLOBAL = [
    ("embed.weight", "token_embd.weight", "bf16", "F16"),
    ("head.weight", "output.weight", "bf16", "Q8_0"),
    ("norm.weight", "output_norm.weight", "bf16", "F32"),
    ("hc_head_fn", "output_hc_fn.weight", "f32", "F16"),
    ("hc_head_base", "output_hc_base.weight", "f32", "F32"),
    ("hc_head_scale", "output_hc_scale.weight", "f32", "F32"),
]

_BLOCK = [
    ("hc_attn_fn", "hc_attn_fn.weight", "f32", "all", "F16"),
    ("hc_attn_base", "hc_attn_base.weight", "f32", "all", "F32"),
    ("hc_attn_scale", "hc_attn_scale.weight", "f32", "all", "F32"),
    ("hc_ffn_fn", "hc_ffn_fn.weight", "f32", "all", "F16"),
    ("hc_ffn_base", "hc_ffn_base.weight", "f32", "all", "F32"),
    ("hc_ffn_scale", "hc_ffn_scale.weight", "f32", "all", "F32"),
    ("attn_norm.weight", "attn_norm.weight", "bf16", "all", "F32"),
    ("ffn_norm.weight", "ffn_norm.weight", "bf16", "all", "F32"),
    ("attn.attn_sink", "attn_sinks.weight", "f32", "all", "F32"),
    ("attn.wq_a.weight", "attn_q_a.weight", "fp8", "all", "Q8_0"),
    ("attn.q_norm.weight", "attn_q_a_norm.weight", "bf16", "all", "F32"),
    ("attn.wq_b.weight", "attn_q_b.weight", "fp8", "all", "Q8_0"),
    ("attn.wkv.weight", "attn_kv.weight", "fp8", "all", "Q8_0"),
    ("attn.kv_norm.weight", "attn_kv_a_norm.weight", "bf16", "all", "F32"),
    ("attn.wo_a.weight", "attn_output_a.weight", "fp8", "all", "Q8_0"),
    ("attn.wo_b.weight", "attn_output_b.weight", "fp8", "all", "Q8_0"),
    ("attn.compressor.ape", "attn_compressor_ape.weight", "f32", "compress", "F16"),
    ("attn.compressor.wkv.weight", "attn_compressor_kv.weight", "bf16", "compress", "F16"),
    ("attn.compressor.wgate.weight", "attn_compressor_gate.weight", "bf16", "compress", "F16"),
    ("attn.compressor.norm.weight", "attn_compressor_norm.weight", "bf16", "compress", "F32"),
    ("attn.indexer.wq_b.weight", "indexer.attn_q_b.weight", "fp8", "index", "F16"),
    ("attn.indexer.weights_proj.weight", "indexer.proj.weight", "bf16", "index", "F16"),
    ("attn.indexer.compressor.ape", "indexer_compressor_ape.weight", "f32", "index", "F16"),
    ("attn.indexer.compressor.wkv.weight", "indexer_compressor_kv.weight", "bf16", "index", "F16"),
    ("attn.indexer.compressor.wgate.weight", "indexer_compressor_gate.weight", "bf16", "index", "F16"),
    ("attn.indexer.compressor.norm.weight", "indexer_compressor_norm.weight", "bf16", "index", "F32"),
    ("ffn.gate.weight", "ffn_gate_inp.weight", "bf16", "all", "F16"),
    ("ffn.gate.bias", "exp_probs_b.bias", "f32", "score", "F32"),
    ("ffn.gate.tid2eid", "ffn_gate_tid2eid.weight", "i64", "hash", "I32"),
    ("ffn.experts.w1.weight", "ffn_gate_exps.weight", "fp4", "all", None),
    ("ffn.experts.w3.weight", "ffn_up_exps.weight", "fp4", "all", None),
    ("ffn.experts.w2.weight", "ffn_down_exps.weight", "fp4", "all", None),
    ("ffn.shared_experts.w1.weight", "ffn_gate_shexp.weight", "fp8", "all", "Q8_0"),
    ("ffn.shared_experts.w3.weight", "ffn_up_shexp.weight", "fp8", "all", "Q8_0"),
    ("ffn.shared_experts.w2.weight", "ffn_down_shexp.weight", "fp8", "all", "Q8_0"),
    # MTP extras (ds4's MTP GGUF keeps the official suffixes; types of ds4's mtp_weights_bind)
    ("e_proj.weight", "e_proj.weight", "fp8", "mtp", "Q8_0"),
    ("h_proj.weight", "h_proj.weight", "fp8", "mtp", "Q8_0"),
    ("enorm.weight", "enorm.weight", "bf16", "mtp", "F32"),
    ("hnorm.weight", "hnorm.weight", "bf16", "mtp", "F32"),
    ("norm.weight", "norm.weight", "bf16", "mtp", "F32"),
    ("hc_head_fn", "hc_head_fn.weight", "f32", "mtp", "F32"),
    ("hc_head_base", "hc_head_base.weight", "f32", "mtp", "F32"),
    ("hc_head_scale", "hc_head_scale.weight", "f32", "mtp", "F32"),
]

_GLOBAL_TO_GGUF = {o: g for o, g, _, _ in _GLOBAL}
_GLOBAL_FROM_GGUF = {g: o for o, g, _, _ in _GLOBAL}
_LAYER_TO_GGUF = {o: g for o, g, _, p, _ in _BLOCK if p != "mtp"}
_LAYER_FROM_GGUF = {g: o for o, g, _, p, _ in _BLOCK if p != "mtp"}
_MTP_TO_GGUF = {o: g for o, g, _, _, _ in _BLOCK}
_MTP_FROM_GGUF = {g: o for o, g, _, _, _ in _BLOCK}

# ds4's GGML type of every non-expert tensor of the main file, by GGUF name (globals) or suffix
# after ``blk.N.`` (block tensors).
DS4_GGUF_TYPES = {g: t for o, g, _, t in _GLOBAL if t} | {g: t for o, g, _, p, t in _BLOCK if t}

# Projections stored as packed weight + scale in official files (and thus quantisable modules).
QUANTIZED_WEIGHTS = frozenset(o for o, _, s, _, _ in _BLOCK if s in ("fp8", "fp4"))
EXPERT_PROJECTIONS = ("w1", "w2", "w3")  # gate, down, up

_PREFIX = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")
_GGUF_PREFIX = re.compile(r"^(blk|mtp)\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)$")
# A whole official routed-expert weight name: (``layers.3.ffn.experts``, expert, projection).
EXPERT_WEIGHT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")


def block_suffix(name: str) -> str | None:
    """The part of an official or internal name after ``layers.N.`` / ``mtp.N.`` (None outside blocks)."""
    m = _PREFIX.match(name)
    return m.group(3) if m else None


def is_routed_expert(name: str) -> bool:
    """Whether an official or internal name belongs to the routed experts (not the shared one)."""
    return ".ffn.experts." in name


def scale_name(weight_name: str) -> str:
    """The official name of a packed weight's E8M0 scale: ``X.weight`` -> ``X.scale``."""
    return weight_name[: -len(".weight")] + ".scale"


class InternalName(NamedTuple):
    path: str  # internal parameter path
    expert: int | None  # row of the stacked expert tensor, for routed experts


def _block_suffix_known(suffix: str, mtp: bool) -> bool:
    return suffix in (_MTP_TO_GGUF if mtp else _LAYER_TO_GGUF)


def hf_to_internal(name: str) -> InternalName:
    """Official HF tensor name -> internal path (+ expert row). ``X.scale`` -> ``X.scales``."""
    if name in _GLOBAL_TO_GGUF:
        return InternalName(name, None)
    m = _PREFIX.match(name)
    if m:
        kind, idx, suffix = m.groups()
        e = _EXPERT.match(suffix)
        if e:
            expert, proj, part = e.groups()
            part = "scales" if part == "scale" else "weight"
            return InternalName(f"{kind}.{idx}.ffn.experts.{proj}.{part}", int(expert))
        if _block_suffix_known(suffix, kind == "mtp"):
            return InternalName(name, None)
        weight = suffix[: -len(".scale")] + ".weight"
        if suffix.endswith(".scale") and weight in QUANTIZED_WEIGHTS and _block_suffix_known(weight, kind == "mtp"):
            return InternalName(name + "s", None)
    raise UnknownTensorName(f"unknown DeepSeek V4 tensor name {name!r}")


def internal_to_hf(path: str, expert: int | None = None) -> str:
    """Inverse of ``hf_to_internal``."""
    m = _PREFIX.match(path)
    if m and m.group(3).startswith("ffn.experts.w"):
        if expert is None:
            raise UnknownTensorName(f"{path!r} is a stacked expert tensor; give the expert index")
        proj, part = m.group(3)[len("ffn.experts.") :].split(".")
        part = {"weight": "weight", "scales": "scale"}.get(part)
        if part is None:
            raise UnknownTensorName(f"{path!r} has no official counterpart")
        name = f"{m.group(1)}.{m.group(2)}.ffn.experts.{expert}.{proj}.{part}"
    else:
        name = path[:-1] if path.endswith(".scales") else path
    hf_to_internal(name)  # validates
    return name


def _rename_block(name: str, pattern: re.Pattern, block: str, layer: dict, mtp: dict) -> str | None:
    """``<kind>.N.<suffix>`` -> ``<block or mtp>.N.<table[suffix]>`` (None when not a block name)."""
    m = pattern.match(name)
    if m:
        kind, idx, suffix = m.groups()
        table = mtp if kind == "mtp" else layer
        if suffix in table:
            return f"{'mtp' if kind == 'mtp' else block}.{idx}.{table[suffix]}"
    return None


def internal_to_gguf(path: str, flavor: str = "ds4") -> str:
    """Internal path -> GGUF tensor name. Both flavors name tensors identically; upstream
    llama.cpp's MTP sidecar naming is undocumented, so MTP follows ds4."""
    if flavor not in GGUF_FLAVORS:
        raise ValueError(f"unknown GGUF flavor {flavor!r} (known: {GGUF_FLAVORS})")
    name = _GLOBAL_TO_GGUF.get(path) or _rename_block(path, _PREFIX, "blk", _LAYER_TO_GGUF, _MTP_TO_GGUF)
    if name is None:
        raise UnknownTensorName(f"no GGUF name for internal tensor {path!r}")
    return name


def gguf_to_internal(name: str) -> str:
    """GGUF tensor name (ds4 or llama.cpp flavor) -> internal path."""
    path = _GLOBAL_FROM_GGUF.get(name) or _rename_block(name, _GGUF_PREFIX, "layers",
                                                        _LAYER_FROM_GGUF, _MTP_FROM_GGUF)
    if path is None:
        raise UnknownTensorName(f"unknown DeepSeek V4 GGUF tensor name {name!r}")
    return path


# --- the official layout for a config ------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an official checkpoint (experts: one per expert)."""

    name: str  # official name
    shape: tuple[int, ...]  # logical shape ([out, in] for weights, unpacked)
    storage: str  # fp8 | fp4 | bf16 | f32 | i64 (the official dtype)

    @property
    def scale_name(self) -> str | None:
        """The ``.scale`` tensor of a packed weight (its shape: ``quant.mx.official_shapes``)."""
        if self.storage not in ("fp8", "fp4"):
            return None
        return scale_name(self.name)


def _cfg(config: Mapping[str, Any], key: str, default: Any = None):
    if key in config:
        return config[key]
    if default is None:
        raise UnknownTensorName(f"config has no {key!r}, needed to lay out the tensors")
    return default


# The config keys ``official_layout`` reads (a test holds it to them): the layouts of the last
# few configs are kept by their values, so the output's config (the same model, other keys
# changed) finds the source's
LAYOUT_KEYS = ("hidden_size", "vocab_size", "q_lora_rank", "num_attention_heads", "head_dim", "o_groups",
               "o_lora_rank", "n_routed_experts", "moe_intermediate_size", "n_shared_experts",
               "num_experts_per_tok", "hc_mult", "index_n_heads", "index_head_dim", "num_hidden_layers",
               "num_hash_layers", "num_nextn_predict_layers", "compress_ratios")
_LAYOUTS: dict[str, dict[str, TensorSpec]] = {}


def official_layout(config: Mapping[str, Any]) -> dict[str, TensorSpec]:
    """Every tensor an official-format checkpoint holds for this HF config, in file order (a
    fresh dict each call; a conversion lays out its model three times, a real one has tens of
    thousands of tensors, so the specs, immutable, are kept)."""
    try:
        key = json.dumps([[k, config[k]] for k in LAYOUT_KEYS if k in config])
    except (TypeError, ValueError):  # not plain JSON values: laid out each time
        return _official_layout(config)
    if key not in _LAYOUTS:
        if len(_LAYOUTS) >= 4:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[key] = _official_layout(config)
    return dict(_LAYOUTS[key])


def _official_layout(config: Mapping[str, Any]) -> dict[str, TensorSpec]:
    H = _cfg(config, "hidden_size")
    V = _cfg(config, "vocab_size")
    Q = _cfg(config, "q_lora_rank")
    n = _cfg(config, "num_attention_heads")
    d = _cfg(config, "head_dim")
    G = _cfg(config, "o_groups")
    R = _cfg(config, "o_lora_rank")
    E = _cfg(config, "n_routed_experts")
    F = _cfg(config, "moe_intermediate_size")
    Fs = F * _cfg(config, "n_shared_experts", 1)
    k = _cfg(config, "num_experts_per_tok")
    hc = _cfg(config, "hc_mult", 4)
    nI = _cfg(config, "index_n_heads", 64)
    dI = _cfg(config, "index_head_dim", 128)
    n_layers = _cfg(config, "num_hidden_layers")
    n_hash = _cfg(config, "num_hash_layers", 0)
    n_mtp = _cfg(config, "num_nextn_predict_layers", 0)
    ratios = list(_cfg(config, "compress_ratios"))
    ratios += [0] * (n_layers + n_mtp - len(ratios))
    M = (2 + hc) * hc

    def block_shapes(r: int) -> dict[str, tuple[int, ...]]:
        c = 2 if r == 4 else 1
        return {
            "hc_attn_fn": (M, hc * H), "hc_attn_base": (M,), "hc_attn_scale": (3,),
            "hc_ffn_fn": (M, hc * H), "hc_ffn_base": (M,), "hc_ffn_scale": (3,),
            "attn_norm.weight": (H,), "ffn_norm.weight": (H,),
            "attn.attn_sink": (n,),
            "attn.wq_a.weight": (Q, H), "attn.q_norm.weight": (Q,), "attn.wq_b.weight": (n * d, Q),
            "attn.wkv.weight": (d, H), "attn.kv_norm.weight": (d,),
            "attn.wo_a.weight": (G * R, n * d // G), "attn.wo_b.weight": (H, G * R),
            "attn.compressor.ape": (r, c * d),
            "attn.compressor.wkv.weight": (c * d, H), "attn.compressor.wgate.weight": (c * d, H),
            "attn.compressor.norm.weight": (d,),
            "attn.indexer.wq_b.weight": (nI * dI, Q), "attn.indexer.weights_proj.weight": (nI, H),
            "attn.indexer.compressor.ape": (4, 2 * dI),
            "attn.indexer.compressor.wkv.weight": (2 * dI, H),
            "attn.indexer.compressor.wgate.weight": (2 * dI, H),
            "attn.indexer.compressor.norm.weight": (dI,),
            "ffn.gate.weight": (E, H), "ffn.gate.bias": (E,), "ffn.gate.tid2eid": (V, k),
            "ffn.experts.w1.weight": (F, H), "ffn.experts.w3.weight": (F, H),
            "ffn.experts.w2.weight": (H, F),
            "ffn.shared_experts.w1.weight": (Fs, H), "ffn.shared_experts.w3.weight": (Fs, H),
            "ffn.shared_experts.w2.weight": (H, Fs),
            "e_proj.weight": (H, H), "h_proj.weight": (H, H),
            "enorm.weight": (H,), "hnorm.weight": (H,), "norm.weight": (H,),
            "hc_head_fn": (hc, hc * H), "hc_head_base": (hc,), "hc_head_scale": (1,),
        }

    layout: dict[str, TensorSpec] = {}

    def add(name: str, shape: tuple[int, ...], storage: str) -> None:
        layout[name] = TensorSpec(name, tuple(int(s) for s in shape), storage)

    globals_ = {o: s for o, _, s, _ in _GLOBAL}
    shapes0 = {"embed.weight": (V, H), "head.weight": (V, H), "norm.weight": (H,),
               "hc_head_fn": (hc, hc * H), "hc_head_base": (hc,), "hc_head_scale": (1,)}
    add("embed.weight", shapes0["embed.weight"], globals_["embed.weight"])

    for layer in range(n_layers + n_mtp):
        mtp = layer >= n_layers
        prefix = f"mtp.{layer - n_layers}." if mtp else f"layers.{layer}."
        r = ratios[layer]
        shapes = block_shapes(r)
        present = {
            "all": True, "compress": r > 0, "index": r == 4,
            "hash": layer < n_hash and not mtp, "score": not (layer < n_hash and not mtp), "mtp": mtp,
        }
        for suffix, _, storage, where, _ in _BLOCK:
            if not present[where]:
                continue
            if suffix.startswith("ffn.experts."):
                proj = suffix.split(".")[2]
                for e in range(E):
                    add(f"{prefix}ffn.experts.{e}.{proj}.weight", shapes[suffix], storage)
            else:
                add(prefix + suffix, shapes[suffix], storage)
        if layer == n_layers - 1:
            for name in ("norm.weight", "head.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"):
                add(name, shapes0[name], globals_[name])
    return layout


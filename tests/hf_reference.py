"""Independent numeric reference: transformers' ``DeepseekV4ForCausalLM`` on official-format weights.

Nothing here imports ds4mlx: the checkpoint is parsed with json + numpy straight from the format
definition (research/checkpoint_format.md §2.1, §2.6), dequantized to float32 and loaded into
transformers (torch CPU, float32, eager attention) under a name map written from transformers'
module tree.

Deviations of transformers 5.24 from the official graph (research/architecture.md §2, §5);
line numbers are in ``transformers/models/deepseek_v4/modeling_deepseek_v4.py``:
- no FP8 round trip of the KV non-RoPE dims, neither raw rows (:832-836) nor compressed rows
  (:434, :690), and no Hadamard + FP4 round trip of the indexer q (:576) and keys (:566):
  compare against ds4mlx with ``qat_rounding=False``;
- no FP8/FP4 activation quantisation before the quantized GEMMs (ds4mlx skips it too);
- routed-expert weight applied after w2 (:1063; official before), equal up to rounding;
- the router always renormalises the selected scores (:1094, :1125; ``norm_topk_prob`` unread),
  so ``hf_config`` refuses ``norm_topk_prob: false``;
- the CSA/HCA block bias is only added when the mask is a tensor (:849-853, pitfall 24). The
  eager mask is always materialised (masking_utils.py:607) and ``load_hf_model`` installs a
  pre-hook that raises if an attention call ever gets no tensor mask;
- the hash router's ``tid2eid`` buffer is ``[vocab, num_experts_per_tok]`` (:1115), so a k
  override cuts the table to its first k columns (the 4Expert rule) here.
The bf16 casts of both graphs (HC post/comb :1189-1198, compressor and router projections)
vanish in float32.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

BLOCK = 128  # FP8 weight scale block (rows and columns)
FP4_GROUP = 32  # inputs per FP4 scale

E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)


class HFReferenceError(ValueError):
    """Bad checkpoint or config for the reference; the message names the file, tensor or key."""


# --------------------------------------------------------------------------- format decoding
def _e4m3_table() -> np.ndarray:
    """float32 value of each E4M3FN byte: sign | 4-bit exponent (bias 7) | 3-bit mantissa."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0x0F
    man = codes & 0x07
    normal = (1.0 + man / 8.0) * np.exp2(exp.astype(np.float64) - 7.0)
    subnormal = man * 2.0 ** -9
    table = sign * np.where(exp == 0, subnormal, normal)
    table[(codes & 0x7F) == 0x7F] = np.nan
    return table.astype(np.float32)


E4M3_VALUES = _e4m3_table()


def ue8m0_to_float(b: np.ndarray) -> np.ndarray:
    """E8M0 byte → exact power of two 2^(b-127) (b=255 is NaN)."""
    b = np.asarray(b, dtype=np.int32)
    out = np.ldexp(np.float64(1.0), b - 127).astype(np.float32)  # 2^-127 is a float32 subnormal
    return np.where(b == 255, np.float32(np.nan), out)


def dequant_fp8(q: np.ndarray, s: np.ndarray, name: str = "?") -> np.ndarray:
    """``W[r, c] = e4m3(q[r, c]) * 2^(s[r // 128, c // 128] - 127)`` (ceil block grid)."""
    rows, cols = q.shape
    want = (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    if s.shape != want:
        raise HFReferenceError(f"{name}: FP8 scale shape {s.shape}, expected {want} for weight {q.shape}")
    scale = ue8m0_to_float(s)
    scale = np.repeat(np.repeat(scale, BLOCK, axis=0), BLOCK, axis=1)[:rows, :cols]
    return E4M3_VALUES[q] * scale


def dequant_fp4(packed: np.ndarray, s: np.ndarray, name: str = "?") -> np.ndarray:
    """Packed E2M1 ``[out, in/2]`` (low nibble = even column) with E8M0 per 32 inputs → float32."""
    rows, half = packed.shape
    cols = 2 * half
    if s.shape != (rows, cols // FP4_GROUP):
        raise HFReferenceError(f"{name}: FP4 scale shape {s.shape}, expected {(rows, cols // FP4_GROUP)}")
    codes = np.empty((rows, cols), dtype=np.uint8)
    codes[:, 0::2] = packed & 0x0F
    codes[:, 1::2] = packed >> 4
    return E2M1_VALUES[codes] * np.repeat(ue8m0_to_float(s), FP4_GROUP, axis=1)


# --------------------------------------------------------------------------- safetensors reading
_RAW_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
    "F8_E4M3": np.uint8, "F8_E8M0": np.uint8, "I8": np.uint8, "U8": np.uint8,
    "I16": np.int16, "I32": np.int32, "I64": np.int64,
}


def read_safetensors_raw(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name → (dtype string, raw little-endian array; F8_*/I8 as uint8, BF16 as uint16)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise HFReferenceError(f"{path}: truncated safetensors header")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise HFReferenceError(f"{path}: bad safetensors header JSON ({e})") from e
    blob = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        if dtype not in _RAW_DTYPES:
            raise HFReferenceError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        begin, end = info["data_offsets"]
        np_dtype = np.dtype(_RAW_DTYPES[dtype]).newbyteorder("<")
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize:
            raise HFReferenceError(f"{path}: tensor {name} byte size does not match {dtype}{list(shape)}")
        out[name] = (dtype, np.frombuffer(blob[begin:end], dtype=np_dtype).reshape(shape))
    return out


def _to_float32(dtype: str, raw: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def read_official_float(directory: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read an official-format directory → (config dict, float32 tensors; ``tid2eid`` stays int).

    FP8 ``.weight`` tensors are dequantized with their ``.scale`` sibling (128×128 E8M0 blocks),
    ``I8`` routed experts as packed E2M1 with E8M0 per 32 inputs; BF16/F16 become float32.
    """
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing config.json")
    config = json.loads(cfg_path.read_text())
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFReferenceError(f"{index_path}: no weight_map")
        shards = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").is_file():
        weight_map, shards = None, ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{directory}: no model.safetensors.index.json or model.safetensors")

    raw: dict[str, tuple[str, np.ndarray]] = {}
    for shard in shards:
        shard_path = directory / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"{shard_path}: shard listed in the index is missing")
        for name, item in read_safetensors_raw(shard_path).items():
            if weight_map is not None and weight_map.get(name) != shard:
                raise HFReferenceError(f"{shard_path}: tensor {name} is not mapped to this shard by the index")
            raw[name] = item
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(raw))
        if missing:
            raise HFReferenceError(f"{index_path}: tensors in the index but in no shard: {missing[:5]}")

    tensors: dict[str, np.ndarray] = {}
    used_scales = set()
    for name, (dtype, arr) in raw.items():
        if name.endswith(".scale"):
            continue
        scale_name = name[: -len("weight")] + "scale" if name.endswith(".weight") else None
        if dtype == "F8_E4M3":
            if scale_name not in raw or raw[scale_name][0] != "F8_E8M0":
                raise HFReferenceError(f"{name}: FP8 weight without an F8_E8M0 {scale_name}")
            tensors[name] = dequant_fp8(arr, raw[scale_name][1], name)
            used_scales.add(scale_name)
        elif dtype == "I8" and ".experts." in name:
            if scale_name not in raw or raw[scale_name][0] != "F8_E8M0":
                raise HFReferenceError(f"{name}: FP4 expert weight without an F8_E8M0 {scale_name}")
            tensors[name] = dequant_fp4(arr, raw[scale_name][1], name)
            used_scales.add(scale_name)
        elif dtype in ("I64", "I32", "I16"):
            tensors[name] = arr.astype(np.int64)
        elif dtype in ("F32", "F16", "BF16", "F64"):
            tensors[name] = _to_float32(dtype, arr)
        else:
            raise HFReferenceError(f"{name}: unexpected dtype {dtype} for a non-quantized tensor")
    orphans = sorted(n for n in raw if n.endswith(".scale") and n not in used_scales)
    if orphans:
        raise HFReferenceError(f"scale tensors without a quantized weight: {orphans[:5]}")
    return config, tensors


# --------------------------------------------------------------------------- config
_RATIO_TO_LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


def _need(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg:
        raise HFReferenceError(f"config.json: missing key {key!r}")
    return cfg[key]


def hf_config(config: dict[str, Any], *, experts_per_token: int | None = None):
    """Official ``config.json`` dict → ``DeepseekV4Config`` with every graph field set explicitly."""
    from transformers import DeepseekV4Config

    n_layers = int(_need(config, "num_hidden_layers"))
    ratios = list(_need(config, "compress_ratios"))
    if len(ratios) < n_layers:
        raise HFReferenceError(f"config.json: compress_ratios has {len(ratios)} entries for {n_layers} layers")
    bad = [r for r in ratios if r not in _RATIO_TO_LAYER_TYPE]
    if bad:
        raise HFReferenceError(f"config.json: compress_ratios holds unsupported ratios {bad}")
    n_hash = int(_need(config, "num_hash_layers"))
    head_dim = int(_need(config, "head_dim"))
    rope_dim = int(_need(config, "qk_rope_head_dim"))
    partial = rope_dim / head_dim
    if config.get("scoring_func", "sqrtsoftplus") != "sqrtsoftplus":
        raise HFReferenceError(f"config.json: scoring_func {config['scoring_func']!r} is not sqrtsoftplus")
    if not config.get("norm_topk_prob", True):
        raise HFReferenceError("config.json: norm_topk_prob false is not honoured by transformers' router")
    if int(config.get("n_group", 1) or 1) > 1:
        raise HFReferenceError("config.json: grouped routing (n_group > 1) is not modelled by transformers")
    k = int(experts_per_token or _need(config, "num_experts_per_tok"))

    main_rope = {"rope_type": "default", "rope_theta": float(_need(config, "rope_theta")),
                 "partial_rotary_factor": partial}
    scaling = config.get("rope_scaling")
    compress_rope = {"rope_type": "default", "rope_theta": float(_need(config, "compress_rope_theta")),
                     "partial_rotary_factor": partial}
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind != "yarn":
            raise HFReferenceError(f"config.json: rope_scaling type {kind!r}, expected 'yarn'")
        # No YaRN magnitude scaling in V4 (official torch.polar(ones, ...)): attention_factor 1.
        compress_rope.update(
            rope_type="yarn", factor=float(scaling["factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            beta_fast=float(scaling["beta_fast"]), beta_slow=float(scaling["beta_slow"]),
            attention_factor=1.0, truncate=True,
        )

    hf = DeepseekV4Config(
        vocab_size=int(_need(config, "vocab_size")),
        hidden_size=int(_need(config, "hidden_size")),
        moe_intermediate_size=int(_need(config, "moe_intermediate_size")),
        num_hidden_layers=n_layers,
        num_attention_heads=int(_need(config, "num_attention_heads")),
        num_key_value_heads=int(config.get("num_key_value_heads", 1)),
        head_dim=head_dim,
        q_lora_rank=int(_need(config, "q_lora_rank")),
        num_experts_per_tok=k,
        n_routed_experts=int(_need(config, "n_routed_experts")),
        n_shared_experts=int(config.get("n_shared_experts", 1)),
        scoring_func="sqrtsoftplus",
        norm_topk_prob=True,
        routed_scaling_factor=float(_need(config, "routed_scaling_factor")),
        max_position_embeddings=int(_need(config, "max_position_embeddings")),
        rope_theta=float(config["rope_theta"]),
        layer_types=[_RATIO_TO_LAYER_TYPE[r] for r in ratios[:n_layers]],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        compress_rope_theta=float(config["compress_rope_theta"]),
        hc_mult=int(_need(config, "hc_mult")),
        hc_sinkhorn_iters=int(_need(config, "hc_sinkhorn_iters")),
        hc_eps=float(_need(config, "hc_eps")),
        mlp_layer_types=["hash_moe" if i < n_hash else "moe" for i in range(n_layers)],
        swiglu_limit=float(_need(config, "swiglu_limit")),
        sliding_window=int(_need(config, "sliding_window")),
        o_groups=int(_need(config, "o_groups")),
        o_lora_rank=int(_need(config, "o_lora_rank")),
        index_n_heads=int(_need(config, "index_n_heads")),
        index_head_dim=int(_need(config, "index_head_dim")),
        index_topk=int(_need(config, "index_topk")),
        num_nextn_predict_layers=int(config.get("num_nextn_predict_layers", 0)),
        output_router_logits=False,
        router_jitter_noise=0.0,
        hidden_act=str(config.get("hidden_act", "silu")),
        initializer_range=float(config.get("initializer_range", 0.02)),
        rms_norm_eps=float(_need(config, "rms_norm_eps")),
        use_cache=True,
        pad_token_id=None,
        bos_token_id=config.get("bos_token_id", 0),
        eos_token_id=config.get("eos_token_id", 1),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_parameters={"main": main_rope, "compress": compress_rope},
        partial_rotary_factor=partial,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        dtype="float32",
        attn_implementation="eager",
        experts_implementation="eager",
    )
    if hf.qk_rope_head_dim != rope_dim:
        raise HFReferenceError(f"config.json: qk_rope_head_dim {rope_dim} not representable (head_dim {head_dim})")
    return hf


# --------------------------------------------------------------------------- names
_GLOBAL_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
_LAYER_NAMES = {
    "hc_attn_fn": "attn_hc.fn", "hc_attn_base": "attn_hc.base", "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn", "hc_ffn_base": "ffn_hc.base", "hc_ffn_scale": "ffn_hc.scale",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.attn_sink": "self_attn.sinks",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.weight$")


def hf_state_dict(tensors: dict[str, np.ndarray], *, experts_per_token: int | None = None):
    """Official names → transformers names (torch tensors). ``mtp.*`` is dropped, as transformers does.

    Routed experts become ``mlp.experts.gate_up_proj`` ``[E, 2F, H]`` (w1 rows, then w3 rows) and
    ``mlp.experts.down_proj`` ``[E, H, F]``. With ``experts_per_token`` smaller than the width of
    ``tid2eid`` the table keeps its first k columns (the 4Expert rule).
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[int, dict[str, np.ndarray]]] = {}
    for name, arr in tensors.items():
        if name.startswith("mtp."):
            continue
        if name in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[name]] = torch.from_numpy(np.ascontiguousarray(arr))
            continue
        m = _LAYER_RE.match(name)
        if m is None:
            raise HFReferenceError(f"{name}: tensor name not known to the transformers name map")
        layer, rest = int(m.group(1)), m.group(2)
        em = _EXPERT_RE.match(rest)
        if em is not None:
            experts.setdefault(layer, {}).setdefault(int(em.group(1)), {})[em.group(2)] = arr
            continue
        if rest not in _LAYER_NAMES:
            raise HFReferenceError(f"{name}: tensor name not known to the transformers name map")
        if rest == "ffn.gate.tid2eid":
            k = experts_per_token or arr.shape[1]
            if arr.shape[1] < k:
                raise HFReferenceError(f"{name}: tid2eid has {arr.shape[1]} columns, fewer than k={k}")
            arr = arr[:, :k]
        out[f"model.layers.{layer}.{_LAYER_NAMES[rest]}"] = torch.from_numpy(np.ascontiguousarray(arr))

    for layer, by_expert in experts.items():
        ids = sorted(by_expert)
        if ids != list(range(len(ids))):
            raise HFReferenceError(f"layers.{layer}.ffn.experts: expert ids are not 0..{len(ids) - 1}")
        for e in ids:
            if set(by_expert[e]) != {"w1", "w2", "w3"}:
                raise HFReferenceError(f"layers.{layer}.ffn.experts.{e}: needs w1, w2 and w3")
        gate_up = np.stack([np.concatenate([by_expert[e]["w1"], by_expert[e]["w3"]], axis=0) for e in ids])
        down = np.stack([by_expert[e]["w2"] for e in ids])
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.from_numpy(gate_up)
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.from_numpy(down)
    return out


# --------------------------------------------------------------------------- model and logits
def _require_tensor_mask(module, args, kwargs):
    # Pitfall 24: without a tensor mask transformers silently drops the CSA/HCA block bias.
    import torch

    if not isinstance(kwargs.get("attention_mask"), torch.Tensor):
        raise RuntimeError(f"layer {module.layer_idx}: attention got no tensor mask; indexer would be ignored")


def load_hf_model(source, *, experts_per_token: int | None = None):
    """``source``: an official-format directory or a ``(config_dict, tensors)`` pair.

    Returns a float32 eval-mode ``DeepseekV4ForCausalLM`` loaded strictly (no missing or unexpected
    keys; ``mtp.*`` dropped) with a guard that every attention call gets a tensor mask.
    """
    import torch
    from transformers import DeepseekV4ForCausalLM

    if isinstance(source, (str, Path)):
        config, tensors = read_official_float(source)
    else:
        config, tensors = source
    hf_cfg = hf_config(config, experts_per_token=experts_per_token)
    state = hf_state_dict(tensors, experts_per_token=hf_cfg.num_experts_per_tok)
    model = DeepseekV4ForCausalLM(hf_cfg).to(torch.float32)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise HFReferenceError(f"transformers state dict: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key, value in model.state_dict().items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise HFReferenceError(f"{key}: shape {tuple(state[key].shape)}, transformers wants {tuple(value.shape)}")
        if value.is_floating_point():
            state[key] = state[key].to(torch.float32)
    model.load_state_dict(state, strict=True)
    model.eval()
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(_require_tensor_mask, with_kwargs=True)
    return model


def _as_model(source, experts_per_token):
    from transformers import DeepseekV4ForCausalLM

    if isinstance(source, DeepseekV4ForCausalLM):
        if experts_per_token is not None and experts_per_token != source.config.num_experts_per_tok:
            raise HFReferenceError("experts_per_token differs from the given model's num_experts_per_tok")
        return source
    return load_hf_model(source, experts_per_token=experts_per_token)


def _tokens(tokens: np.ndarray, vocab_size: int):
    import torch

    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.size == 0:
        raise HFReferenceError(f"tokens must be a non-empty [B, S] array, got shape {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise HFReferenceError(f"token ids must lie in [0, {vocab_size}), got {tokens.min()}..{tokens.max()}")
    return torch.from_numpy(tokens.astype(np.int64))


def hf_logits(source, tokens: np.ndarray, *, experts_per_token: int | None = None) -> np.ndarray:
    """One full forward from position 0 without a cache → float32 logits ``[B, S, V]``.

    ``source``: a directory, a ``(config_dict, tensors)`` pair or a model from ``load_hf_model``.
    An explicit all-ones 2-D attention mask is passed so the 4-D eager mask (and with it the
    compressed-row causality and the indexer's top-k) is always applied.
    """
    import torch

    model = _as_model(source, experts_per_token)
    ids = _tokens(tokens, model.config.vocab_size)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits.float().numpy()


def hf_logits_cached(source, tokens: np.ndarray, chunks: Sequence[int] = (1,), *,
                     experts_per_token: int | None = None) -> np.ndarray:
    """Logits from chunked calls sharing one transformers ``DynamicCache`` (V4 cache layers).

    Chunk sizes are taken from ``chunks`` in turn, cycling, until the sequence is consumed:
    ``(1,)`` is token-by-token decode, ``(37, 1)`` alternates a 37-token prefill chunk with one
    decode step. The per-layer cache carries the sliding window, the compressor buffers, the
    CSA overlap halves and the compressed rows.
    """
    import torch
    from transformers import DynamicCache

    if not chunks or any(int(c) < 1 for c in chunks):
        raise HFReferenceError(f"chunks must be positive sizes, got {chunks}")
    model = _as_model(source, experts_per_token)
    ids = _tokens(tokens, model.config.vocab_size)
    cache = DynamicCache(config=model.config)
    pieces, start, i = [], 0, 0
    with torch.no_grad():
        while start < ids.shape[1]:
            stop = min(start + int(chunks[i % len(chunks)]), ids.shape[1])
            out = model(input_ids=ids[:, start:stop], attention_mask=torch.ones_like(ids[:, :stop]),
                        cache=cache, use_cache=True)
            pieces.append(out.logits.float().numpy())
            start, i = stop, i + 1
    return np.concatenate(pieces, axis=1)

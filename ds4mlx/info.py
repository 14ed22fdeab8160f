"""``ds4mlx info``: what a checkpoint holds and what running it costs, from headers alone.

Reports the format, the quantisation mix per tensor kind (attention, routed experts, ...),
top-k (file value and override), the layer schedule (sliding / compressed ratio 4 / ratio 128,
hash-routed layers), parameter and byte counts, and the memory needed at a given context:
weights as stored (ds4mlx keeps the file's bytes) plus the decode state.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from .names import is_routed_expert

if TYPE_CHECKING:
    from .config import ModelConfig

KINDS = (
    "embedding", "attention", "compressor", "indexer", "router", "routed experts",
    "shared expert", "hyper-connections", "norms", "output head", "MTP block",
)
_SCALE_SUFFIXES = (".scale", ".scales", ".biases")


@dataclass
class Tensor:
    """One stored tensor, attributed to the weight it belongs to (scales fold into it)."""

    name: str
    kind: str
    fmt: str
    nbytes: int


def tensor_kind(name: str) -> str:
    """Kind of a tensor from its official, internal or (mapped) GGUF name."""
    if name.startswith("mtp."):
        return "MTP block"
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("head.") or name.startswith("hc_head"):
        return "output head"
    if name == "norm.weight":
        return "norms"
    if is_routed_expert(name):
        return "routed experts"
    if ".ffn.shared_experts." in name:
        return "shared expert"
    if ".ffn.gate." in name:
        return "router"
    if ".attn.indexer." in name:
        return "indexer"
    if ".attn.compressor." in name:
        return "compressor"
    if ".hc_" in name:
        return "hyper-connections"
    if name.endswith("norm.weight"):
        return "norms"
    if ".attn." in name:
        return "attention"
    return "other"


def _weight_of(name: str) -> str:
    for suffix in _SCALE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight"
    return name


# ----------------------------------------------------------------------------- sources


def resolve_model(source: str | os.PathLike) -> Path:
    """A model argument (directory, ``.gguf``, ``demo`` or Hugging Face repo id) -> local path."""
    from .loader import resolve_model_path

    return resolve_model_path(source)


_OFFICIAL_LABELS = {"mxfp8": "FP8 E4M3, E8M0 /128x128", "mxfp4": "FP4 E2M1, E8M0 /32"}
_MLX_LABELS = {"mxfp8": "mxfp8 (E4M3, E8M0 /32)", "mxfp4": "mxfp4 (E2M1, E8M0 /32)"}


def _label(fmt: Any, dtype: str) -> str:
    kind = getattr(fmt, "kind", "float")
    if kind == "float":
        return dtype
    if kind == "affine":
        return f"affine {fmt.bits}-bit /{fmt.group_size}"
    return _MLX_LABELS.get(kind, str(fmt))


def _hf_tensors(path: Path) -> tuple[dict, list[Tensor], str]:
    from .io.hf import open_hf_checkpoint

    ckpt = open_hf_checkpoint(path)
    try:
        tensors = []
        for name, entry in ckpt.entries.items():
            info = ckpt.file(entry.shard).info(name)
            nbytes = info.nbytes
            if entry.scale_shard is not None:
                nbytes += ckpt.file(entry.scale_shard).info(name[: -len("weight")] + "scale").nbytes
            fmt = _OFFICIAL_LABELS.get(entry.fmt.kind, info.dtype)
            tensors.append(Tensor(name, tensor_kind(name), fmt, nbytes))
        shards = len(set(ckpt.weight_map.values()))
        return ckpt.config, tensors, f"official DeepSeek V4 safetensors ({shards} shard{'s' * (shards > 1)})"
    finally:
        ckpt.close()


def _mlx_tensors(path: Path) -> tuple[dict, list[Tensor], str]:
    from .io.mlx_dir import open_mlx_dir

    ckpt = open_mlx_dir(path)
    from .io.safetensors import SafetensorsFile

    try:
        infos = {}
        for shard in sorted(set(ckpt.weight_map.values())):
            with SafetensorsFile(path / shard) as f:
                infos.update({n: f.info(n) for n in f.keys() if n in ckpt.weight_map})
        weights: dict[str, Tensor] = {}
        for name, info in infos.items():
            owner = _weight_of(name)
            module = owner[: -len(".weight")]
            dtype = infos[owner].dtype if owner in infos else info.dtype
            t = weights.setdefault(owner, Tensor(owner, tensor_kind(owner), _label(ckpt.formats.get(module), dtype), 0))
            t.nbytes += info.nbytes
        return ckpt.config, list(weights.values()), "ds4mlx MLX directory"
    finally:
        ckpt.close()


def _gguf_tensors(path: Path) -> tuple[dict, list[Tensor], str]:
    from gguf import Keys

    from .io.gguf import hf_config_from_gguf
    from .io.gguf_file import open_gguf
    from .names import UnknownTensorName, gguf_to_internal

    with open_gguf(path) as gf:
        config = hf_config_from_gguf(gf)
        tensors = []
        for name, info in gf.tensors.items():
            try:
                internal = gguf_to_internal(name)
            except UnknownTensorName:
                internal = name
            tensors.append(Tensor(internal, tensor_kind(internal), info.type_name, info.nbytes or 0))
        label = gf.fields.get(Keys.General.NAME)
    return config, tensors, "GGUF deepseek4" + (f" ({label})" if isinstance(label, str) and label else "")


def read_tensors(path: Path) -> tuple[dict, list[Tensor], str]:
    """``(HF-style config dict, tensors, format description)`` of a checkpoint."""
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_tensors(path)
    if path.is_dir():
        from .io.mlx_dir import is_mlx_dir

        return _mlx_tensors(path) if is_mlx_dir(path) else _hf_tensors(path)
    raise FileNotFoundError(f"{path}: expected a model directory or a .gguf file")


# ----------------------------------------------------------------------------- accounting


def state_nbytes(config: Any, n_tokens: int, dtype_bytes: int = 2, layers: Optional[Iterable[int]] = None) -> int:
    """Bytes of the decode state after ``n_tokens`` (``state.py``'s layout, main layers only):
    the window's last ``sliding_window - 1`` raw KV rows; per compressor one row per ``ratio``
    tokens (activation dtype), the unfinished window's KV and scores and, at ratio 4, the last
    window's overlap half (float32); at ratio 4 the indexer's compressor likewise. ``layers``:
    only those (a pipeline stage's)."""
    n = int(n_tokens)
    d, di = config.head_dim, config.index_head_dim
    total = 0
    for layer in range(config.num_hidden_layers) if layers is None else layers:
        r = config.ratio(layer)
        total += min(n, max(config.sliding_window - 1, 0)) * d * dtype_bytes
        for dim, present in ((d, r > 0), (di, r == 4)):
            if not present:
                continue
            width = 2 * dim if r == 4 else dim
            total += (n // r) * dim * dtype_bytes  # compressed rows
            total += (n % r) * width * 4 * 2  # pending KV + scores
            if r == 4 and n >= r:
                total += r * dim * 4 * 2  # previous window's overlap half
    return total


def logical_params(config_dict: dict) -> dict[str, int]:
    """Parameters per kind as the official layout defines them (packing and scales aside)."""
    from .names import official_layout

    counts: dict[str, int] = defaultdict(int)
    for name, spec in official_layout(config_dict).items():
        size = 1
        for s in spec.shape:
            size *= s
        counts[tensor_kind(name)] += size
    return dict(counts)


def _ranges(ids: list[int]) -> str:
    if not ids:
        return "-"
    if len(ids) == 1:
        return str(ids[0])
    step = ids[1] - ids[0]
    if all(b - a == step for a, b in zip(ids, ids[1:])):
        if step == 1:
            return f"{ids[0]}-{ids[-1]}"
        if len(ids) > 3:
            return f"{ids[0]},{ids[1]},...,{ids[-1]}"
    return ",".join(map(str, ids))


def layer_schedule(config: Any) -> dict[str, Any]:
    names = {0: "sliding window", 4: "compressed r=4 (CSA)", 128: "compressed r=128 (HCA)"}
    groups: dict[int, list[int]] = defaultdict(list)
    for layer in range(config.num_hidden_layers):
        groups[config.ratio(layer)].append(layer)
    hashed = [i for i in range(config.num_hidden_layers) if config.is_hash_layer(i)]
    return {
        "attention": {names[r]: _ranges(ids) for r, ids in sorted(groups.items())},
        "hash_routed_layers": _ranges(hashed),
        "sliding_window": config.sliding_window,
        "mtp_layers": config.num_nextn_predict_layers,
    }


def checked_config(config_dict: dict[str, Any], path: Path, fmt: str) -> "ModelConfig":
    """The ``ModelConfig`` of what ``read_tensors`` returned; errors name the file's own keys
    (a GGUF's metadata keys)."""
    from .config import ModelConfig

    names = None
    if fmt.startswith("GGUF"):
        from .io.gguf import GGUF_KEY_NAMES as names
    return ModelConfig.from_hf(config_dict, source=str(path), names=names)


def describe(
    source: str | os.PathLike, *, ctx: int = 32768, experts_per_token: Optional[int] = None,
    dtype_bytes: Optional[int] = None,
) -> dict[str, Any]:
    """Everything ``ds4mlx info`` prints, as a dict (``--json``)."""
    path = resolve_model(source)
    config_dict, tensors, fmt = read_tensors(path)
    config = checked_config(config_dict, path, fmt)
    k_used = config.check_experts_per_token(experts_per_token, str(path))
    if dtype_bytes is None:
        from .loader import default_dtype

        dtype_bytes = default_dtype().size
    params = logical_params(config_dict)
    has_mtp = any(t.kind == "MTP block" for t in tensors)
    if not has_mtp:
        params.pop("MTP block", None)

    mix: dict[str, dict[str, dict[str, int]]] = {}
    for t in tensors:
        entry = mix.setdefault(t.kind, {}).setdefault(t.fmt, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += t.nbytes
    kinds = [k for k in KINDS if k in mix or k in params] + sorted(set(mix) - set(KINDS))
    by_kind = {
        k: {"params": params.get(k, 0), "bytes": sum(e["bytes"] for e in mix.get(k, {}).values()),
            "formats": mix.get(k, {})}
        for k in kinds
    }
    total_params = sum(params.values())
    routed = params.get("routed experts", 0)
    active = total_params - routed - params.get("MTP block", 0) + routed * k_used // config.n_routed_experts
    weight_bytes = sum(t.nbytes for t in tensors)
    state = state_nbytes(config, ctx, dtype_bytes)
    return {
        "path": str(path),
        "format": fmt,
        "layers": config.num_hidden_layers,
        "mtp_layers": config.num_nextn_predict_layers if has_mtp else 0,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "max_context": config.max_position_embeddings,
        "routed_experts": config.n_routed_experts,
        "shared_experts": config.n_shared_experts,
        "experts_per_token": {"file": config.num_experts_per_tok, "used": k_used,
                              "override": experts_per_token},
        "schedule": layer_schedule(config),
        "params": {"total": total_params, "active_per_token": active},
        "weight_bytes": weight_bytes,
        "by_kind": by_kind,
        "memory": {"ctx": ctx, "dtype_bytes": dtype_bytes, "weights": weight_bytes, "state": state,
                   "total": weight_bytes + state},
    }


def _scaled(n: float, units: tuple[str, ...], sep: str) -> str:
    """``n`` in the largest unit (steps of 1000) that keeps it under 1000; whole in the first."""
    for i, unit in enumerate(units[:-1]):
        if abs(n) < 1000:
            return f"{n:.0f}{sep}{unit}" if i == 0 else f"{n:.2f}{sep}{unit}"
        n /= 1000
    return f"{n:.2f}{sep}{units[-1]}"


def human_bytes(n: float) -> str:
    return _scaled(n, ("B", "KB", "MB", "GB", "TB"), " ")


def human_count(n: float) -> str:
    return _scaled(n, ("", "K", "M", "B"), "")


def format_info(d: dict[str, Any]) -> str:
    """The human-readable report."""
    k = d["experts_per_token"]
    topk = f"{k['used']} routed experts per token (file: {k['file']}"
    topk += f", override: {k['override']})" if k["override"] is not None else ")"
    s = d["schedule"]
    sched = "; ".join(f"{name}: {ids}" for name, ids in s["attention"].items())
    mtp = f" + {d['mtp_layers']} MTP" if d["mtp_layers"] else ""
    lines = [
        f"Model       {d['path']}",
        f"Format      {d['format']}",
        f"Shape       {d['layers']} layers{mtp}, hidden {d['hidden_size']}, vocab {d['vocab_size']}, "
        f"{d['routed_experts']} routed + {d['shared_experts']} shared experts",
        f"Top-k       {topk}",
        f"Context     up to {d['max_context']} tokens (max_position_embeddings)",
        f"Layers      {sched}",
        f"            hash-routed: {s['hash_routed_layers']}; sliding window {s['sliding_window']}",
        f"Parameters  {human_count(d['params']['total'])} total, "
        f"{human_count(d['params']['active_per_token'])} active per token",
        f"Weights     {human_bytes(d['weight_bytes'])}",
        "",
        f"{'kind':<18} {'format':<32} {'tensors':>8} {'params':>10} {'bytes':>11}",
    ]
    for kind, e in d["by_kind"].items():
        first = True
        formats = sorted(e["formats"].items(), key=lambda kv: -kv[1]["bytes"])
        for fmt, f in formats or [("-", {"tensors": 0, "bytes": 0})]:
            params = human_count(e["params"]) if first else ""
            lines.append(f"{kind if first else '':<18} {fmt:<32} {f['tensors']:>8} {params:>10} "
                         f"{human_bytes(f['bytes']):>11}")
            first = False
    m = d["memory"]
    dtype = {2: "bfloat16", 4: "float32"}.get(m["dtype_bytes"], f"{m['dtype_bytes']}-byte")
    lines += [
        "",
        f"Memory at {m['ctx']} tokens of context: weights {human_bytes(m['weights'])} + decode state "
        f"{human_bytes(m['state'])} ({dtype}) = {human_bytes(m['total'])}, plus activations",
    ]
    return "\n".join(lines)


"""Tiny checkpoints in the exact official DeepSeek V4 Flash on-disk format.

The files *are* the ground truth: FP8 weights are E4M3 codes with E8M0 128×128 block scales,
routed experts are packed E2M1 (``I8``) with E8M0 scales per 32 inputs, everything else is
BF16/F32/I64 as in the official release (deepseek-ai/DeepSeek-V4-Flash). Every tensor is drawn
from its own generator seeded by (seed, name), so a checkpoint is a pure function of its
parameters, and value scales keep activations O(1) through the layers and the logits spread
out (not softmax-saturated).

Profiles are plain functions with keyword parameters: ``write_tiny_checkpoint`` (the test
profile), ``make_4expert`` (the community top-4 recipe applied to any checkpoint) and
``demo_model_path`` (a cached demo model for ``ds4mlx generate --model demo``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .names import TensorSpec, official_layout
from .io.safetensors import SafetensorsFile, write_safetensors
from .quant.codecs import FP8_WEIGHT_BLOCK, MX_GROUP, bf16_encode, e2m1_encode, e4m3_encode, e8m0_decode
from .quant.mx import fp8_scale_shape, pack_fp4

INDEX_FILE = "model.safetensors.index.json"


def default_compress_ratios(num_layers: int, num_mtp: int = 1) -> list[int]:
    """Flash's rule (ds4 ``ds4_layer_compress_ratio``): layers 0–1 sliding, then 4 (even) / 128 (odd); MTP sliding."""
    ratios = [0 if i < 2 else (4 if i % 2 == 0 else 128) for i in range(num_layers)]
    return ratios + [0] * num_mtp


def tiny_config(
    *,
    experts_per_token: int = 6,
    num_layers: int = 5,
    compress_ratios: list[int] | None = None,
    vocab_size: int = 1024,
    hidden_size: int = 256,
    num_attention_heads: int = 2,
    head_dim: int = 128,
    qk_rope_head_dim: int = 64,
    q_lora_rank: int = 128,
    o_groups: int = 2,
    o_lora_rank: int = 128,
    index_n_heads: int = 16,
    index_head_dim: int = 128,
    index_topk: int = 4,
    sliding_window: int = 16,
    n_routed_experts: int = 8,
    moe_intermediate_size: int = 256,
    num_hash_layers: int = 3,
    mtp: bool = True,
    max_position_embeddings: int = 4096,
) -> dict[str, Any]:
    """An HF ``config.json`` with every key of the Flash config (§1.1), all values explicit."""
    num_mtp = 1 if mtp else 0
    if compress_ratios is None:
        compress_ratios = default_compress_ratios(num_layers, num_mtp)
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "expert_dtype": "fp4",
        "hc_eps": 1e-06,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "index_head_dim": index_head_dim,
        "index_n_heads": index_n_heads,
        "index_topk": index_topk,
        "initializer_range": 0.02,
        "max_position_embeddings": max_position_embeddings,
        "model_type": "deepseek_v4",
        "moe_intermediate_size": moe_intermediate_size,
        "n_routed_experts": n_routed_experts,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": num_attention_heads,
        "num_experts_per_tok": experts_per_token,
        "num_hidden_layers": num_layers,
        "num_hash_layers": num_hash_layers,
        "num_key_value_heads": 1,
        "num_nextn_predict_layers": num_mtp,
        "o_groups": o_groups,
        "o_lora_rank": o_lora_rank,
        "q_lora_rank": q_lora_rank,
        "qk_rope_head_dim": qk_rope_head_dim,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128],
        },
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 16,
            "original_max_position_embeddings": 65536,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 1.5,
        "scoring_func": "sqrtsoftplus",
        "sliding_window": sliding_window,
        "swiglu_limit": 10.0,
        "tie_word_embeddings": False,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1",
        "use_cache": True,
        "vocab_size": vocab_size,
        "compress_rope_theta": 160000,
        "compress_ratios": list(compress_ratios),
    }


# --- tensor values ------------------------------------------------------------------------


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _fp8(rng: np.random.Generator, shape: tuple[int, int], std: float) -> tuple[np.ndarray, np.ndarray]:
    """E4M3 codes ≈ N(0, std²) with a different E8M0 byte per 128×128 block."""
    out_dim, in_dim = shape
    base = 127 + round(math.log2(std / 8.0))  # typical |code value| ≈ 8: fine mantissa use
    scale = (base + rng.integers(-1, 2, size=fp8_scale_shape(out_dim, in_dim))).astype(np.uint8)
    s_full = e8m0_decode(scale)[np.arange(out_dim)[:, None] // FP8_WEIGHT_BLOCK,
                                np.arange(in_dim)[None, :] // FP8_WEIGHT_BLOCK]
    codes = e4m3_encode(rng.standard_normal(shape, dtype=np.float32) * std / s_full)
    return codes, scale


def _fp4(rng: np.random.Generator, shape: tuple[int, int], std: float) -> tuple[np.ndarray, np.ndarray]:
    """Packed E2M1 codes ≈ N(0, std²) with a different E8M0 byte per (row, 32 inputs)."""
    out_dim, in_dim = shape
    base = 127 + round(math.log2(std / 1.5))
    scale = (base + rng.integers(-1, 2, size=(out_dim, in_dim // MX_GROUP))).astype(np.uint8)
    s_full = np.repeat(e8m0_decode(scale), MX_GROUP, axis=-1)
    codes = e2m1_encode(rng.standard_normal(shape, dtype=np.float32) * std / s_full)
    return pack_fp4(codes), scale


def _float_std(name: str, spec: TensorSpec) -> tuple[float, float]:
    """(mean, std) of a float tensor, by role."""
    if name == "embed.weight":
        return 0.0, 1.0
    if name == "head.weight":
        return 0.0, 2.5 / math.sqrt(spec.shape[1])  # logits std ≈ 2.5
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name.endswith("_fn"):
        return 0.0, 0.6 / math.sqrt(spec.shape[1])  # HC mixes std ≈ 0.6
    if name.endswith("_base"):
        return 0.0, 0.3
    if name.endswith("_scale"):
        return 1.0, 0.1
    if name.endswith("attn_sink"):
        return 0.0, 1.0
    if name.endswith(".ape"):
        return 0.0, 0.5
    if name.endswith("gate.bias"):
        return 0.0, 0.2
    # projections kept in float (compressor, indexer weights, router): outputs ≈ N(0, 1)
    return 0.0, 1.0 / math.sqrt(spec.shape[-1])


def checkpoint_tensors(config: dict[str, Any], seed: int = 0) -> Iterator[tuple[str, str, np.ndarray]]:
    """``(official name, safetensors dtype, stored array)`` for every tensor, in file order."""
    n_experts = config["n_routed_experts"]
    for name, spec in official_layout(config).items():
        rng = _rng(seed, name)
        if spec.storage in ("fp8", "fp4"):
            std = 1.0 / math.sqrt(spec.shape[1])
            if spec.storage == "fp8":
                codes, scale = _fp8(rng, spec.shape, std)
                yield name, "F8_E4M3", codes
            else:
                codes, scale = _fp4(rng, spec.shape, std)
                yield name, "I8", codes
            yield spec.scale_name, "F8_E8M0", scale
        elif spec.storage == "i64":
            vocab, k = spec.shape
            # each row: k distinct experts (the first k of a random permutation)
            table = np.argsort(rng.random((vocab, n_experts)), axis=1)[:, :k]
            yield name, "I64", table.astype(np.int64)
        else:
            mean, std = _float_std(name, spec)
            values = (mean + std * rng.standard_normal(spec.shape)).astype(np.float32)
            if spec.storage == "bf16":
                yield name, "BF16", bf16_encode(values)
            else:
                yield name, "F32", values


# --- files ------------------------------------------------------------------------------------


def _shard_plan(items: list[tuple[str, str, np.ndarray]], num_shards: int) -> list[list[int]]:
    """Indices of ``items`` per shard: MTP tensors wholly in the last shard, main tensors
    split by size over the others, with the first cut placed between a ``.weight`` and its
    ``.scale`` (the index, not adjacency, must pair them)."""
    main = [i for i, (n, _, _) in enumerate(items) if not n.startswith("mtp.")]
    mtp = [i for i, (n, _, _) in enumerate(items) if n.startswith("mtp.")]
    n_main = num_shards - 1 if mtp else num_shards
    if n_main < 1 or len(main) < n_main:
        raise ValueError(f"cannot split {len(items)} tensors into {num_shards} shards")
    sizes = np.cumsum([items[i][2].nbytes for i in main])
    cuts = [int(np.searchsorted(sizes, sizes[-1] * j / n_main)) + 1 for j in range(1, n_main)]
    if cuts:  # move the first cut to just after the next FP8 weight whose scale follows it
        for pos in range(cuts[0], len(main) - 1):
            (name, dtype, _), next_name = items[main[pos - 1]], items[main[pos]][0]
            if dtype == "F8_E4M3" and next_name == name[: -len("weight")] + "scale":
                cuts[0] = pos
                break
    cuts = sorted(set(min(max(c, 1), len(main) - 1) for c in cuts))
    bounds = [0] + cuts + [len(main)]
    plan = [main[a:b] for a, b in zip(bounds, bounds[1:])]
    if mtp:
        plan.append(mtp)
    return plan


def write_checkpoint(
    path: str | os.PathLike,
    config: dict[str, Any],
    tensors: Iterator[tuple[str, str, np.ndarray]],
    *,
    num_shards: int = 3,
    generation_config: bool = True,
) -> Path:
    """Write tensors as ``model-0000K-of-0000N.safetensors`` + index + ``config.json``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    items = list(tensors)
    plan = _shard_plan(items, num_shards)
    n = len(plan)
    weight_map: dict[str, str] = {}
    total = 0
    for k, indices in enumerate(plan, start=1):
        shard = f"model-{k:05d}-of-{n:05d}.safetensors"
        total += write_safetensors(path / shard, [(items[i][0], (items[i][1], items[i][2])) for i in indices])
        weight_map.update({items[i][0]: shard for i in indices})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if generation_config:
        gen = {"bos_token_id": config.get("bos_token_id", 0), "eos_token_id": config.get("eos_token_id", 1)}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return path


def write_tiny_checkpoint(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    num_shards: int = 3,
    generation_config: bool = True,
    **config_kwargs: Any,
) -> Path:
    """Write the tiny test checkpoint; keyword arguments are those of ``tiny_config``."""
    config = tiny_config(**config_kwargs)
    return write_checkpoint(
        path, config, checkpoint_tensors(config, seed), num_shards=num_shards, generation_config=generation_config
    )


def make_4expert(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, k: int = 4) -> Path:
    """Rewrite a checkpoint as its "4Expert" variant (cloudyu recipe): ``num_experts_per_tok = k``
    and every ``tid2eid`` cut to its first ``k`` columns; everything else byte-identical."""
    src, dst = Path(src_dir), Path(dst_dir)
    config = json.loads((src / "config.json").read_text())
    index = json.loads((src / INDEX_FILE).read_text())
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json", INDEX_FILE) and not f.name.endswith(".safetensors"):
            shutil.copy2(f, dst / f.name)
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        with SafetensorsFile(src / shard) as st:
            entries = []
            for name in st.keys():
                info = st.info(name)
                array = st.tensor_np(name)
                if name.endswith(".tid2eid"):
                    if array.shape[1] < k:
                        raise ValueError(f"{src / shard}: {name} has {array.shape[1]} columns, fewer than k={k}")
                    array = np.ascontiguousarray(array[:, :k])
                entries.append((name, (info.dtype, array)))
            total += write_safetensors(dst / shard, entries, st.metadata)
            entries = array = None  # drop the views before the map closes
    index["metadata"]["total_size"] = total
    (dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config["num_experts_per_tok"] = k
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst


# --- demo model -------------------------------------------------------------------------------

DEMO_PROFILE: dict[str, Any] = {"seed": 1234, "vocab_size": 1024}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(directory: Path, prefix: str) -> None:
    """Remove ``PREFIX{pid}-*`` temporaries in ``directory`` whose creating process is gone (a
    build killed before its final rename); those of running builds are left alone."""
    for p in directory.glob(prefix + "*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def demo_model_path(cache_dir: str | os.PathLike | None = None, **profile: Any) -> Path:
    """A small demo checkpoint, generated once into the cache (``$DS4MLX_CACHE`` or
    ``~/.cache/ds4mlx``) via a temporary directory and an atomic rename."""
    params = {**DEMO_PROFILE, **profile}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("DS4MLX_CACHE") or Path.home() / ".cache" / "ds4mlx")
    target = root / f"demo-{key}"
    if (target / INDEX_FILE).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root, ".demo-tmp-")
    tmp = Path(tempfile.mkdtemp(prefix=f".demo-tmp-{os.getpid()}-", dir=root))
    try:
        write_tiny_checkpoint(tmp, **params)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / INDEX_FILE).is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target

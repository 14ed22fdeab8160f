"""DeepSeek V4 GGUF files (antirez/ds4 and upstream llama.cpp ``deepseek4``) -> config and tensors.

* ``hf_config_from_gguf``: the ``deepseek4.*`` metadata as an HF-style
  config dict; the routed top-k is ``deepseek4.expert_used_count``, checked against the width of
  the hash tables (``ffn_gate_tid2eid``, ne ``[k, vocab]``), which may be wider (cut to k), never
  narrower.
* ``open_gguf_checkpoint(...).load_weights``: the tensors a model asks for (``ds4mlx.loader``
  builds the model and assembles). Every tensor is dispatched on its own GGML type (files mix types per layer):
  float types load as float; Q8_0 projections become MLX affine 8-bit (exact) and MXFP4 ones MLX
  ``mxfp4`` (exact); other block types stay as native GGUF blocks in ``GGUFLinear`` /
  ``GGUFSwitchLinear`` (routed experts are never dequantized in memory). Quantized tensors that
  are not projections (embedding, router, HC mixers, ...) are dequantized exactly to float.
* ``gguf_metadata``: the same keys from a config, for the writer (``convert/gguf_writer.py``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, Keys

from ..quant import gguf as qgguf
from ..quant.formats import MXFP4, WeightFormat, affine, gguf_kind
from ..quant.gguf import mxfp4, q8_0
from .checks import check_expert_ids, hash_table_fits
from .gguf_file import INT_TYPES, PLAIN_DTYPES, GGUFError, GGUFFile, TensorInfo, open_gguf
from ..names import QUANTIZED_WEIGHTS, UnknownTensorName, block_suffix, internal_to_gguf

ARCH = "deepseek4"
T = GGMLQuantizationType
_FLOAT_TYPES = {T.F32: mx.float32, T.F16: mx.float16, T.BF16: mx.bfloat16}
TID2EID = "ffn_gate_tid2eid.weight"
SQRTSOFTPLUS = 4  # llama.cpp's expert_gating_func enum value


def _key(template: str) -> str:
    return template.format(arch=ARCH)


# (metadata key, HF config key, GGUF type); the first block is required. Keys come from
# gguf-py's ``Keys`` where it has them; the rest are ds4's ``deepseek4.*`` additions.
_REQUIRED_KEYS = [
    (_key(Keys.LLM.BLOCK_COUNT), "num_hidden_layers", "u32"),
    (_key(Keys.LLM.EMBEDDING_LENGTH), "hidden_size", "u32"),
    (_key(Keys.LLM.VOCAB_SIZE), "vocab_size", "u32"),
    (_key(Keys.Attention.HEAD_COUNT), "num_attention_heads", "u32"),
    (_key(Keys.Attention.KEY_LENGTH), "head_dim", "u32"),
    (_key(Keys.Rope.DIMENSION_COUNT), "qk_rope_head_dim", "u32"),
    (_key(Keys.Attention.Q_LORA_RANK), "q_lora_rank", "u32"),
    (_key("{arch}.attention.output_group_count"), "o_groups", "u32"),
    (_key("{arch}.attention.output_lora_rank"), "o_lora_rank", "u32"),
    (_key(Keys.Attention.SLIDING_WINDOW), "sliding_window", "u32"),
    (_key("{arch}.attention.compress_ratios"), "compress_ratios", "i32[]"),
    (_key(Keys.LLM.EXPERT_COUNT), "n_routed_experts", "u32"),
    (_key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH), "moe_intermediate_size", "u32"),
    (_key("{arch}.hash_layer_count"), "num_hash_layers", "u32"),
]
_OPTIONAL_KEYS = [
    (_key(Keys.LLM.CONTEXT_LENGTH), "max_position_embeddings", "u32"),
    (_key(Keys.Attention.HEAD_COUNT_KV), "num_key_value_heads", "u32"),
    (_key(Keys.LLM.EXPERT_SHARED_COUNT), "n_shared_experts", "u32"),
    (_key("{arch}.attention.indexer.head_count"), "index_n_heads", "u32"),
    (_key("{arch}.attention.indexer.key_length"), "index_head_dim", "u32"),
    (_key("{arch}.attention.indexer.top_k"), "index_topk", "u32"),
    (_key("{arch}.hyper_connection.count"), "hc_mult", "u32"),
    (_key("{arch}.hyper_connection.sinkhorn_iterations"), "hc_sinkhorn_iters", "u32"),
    (_key("{arch}.hyper_connection.epsilon"), "hc_eps", "f32"),
    (_key(Keys.Attention.LAYERNORM_RMS_EPS), "rms_norm_eps", "f32"),
    (_key(Keys.Rope.FREQ_BASE), "rope_theta", "f32"),
    (_key("{arch}.attention.compress_rope_freq_base"), "compress_rope_theta", "f32"),
    (_key(Keys.LLM.EXPERT_WEIGHTS_SCALE), "routed_scaling_factor", "f32"),
    (_key(Keys.LLM.EXPERT_WEIGHTS_NORM), "norm_topk_prob", "bool"),
]
_BLOCK = re.compile(r"^blk\.(\d+)\.")

_ROPE_KEYS = [  # rope.scaling.* -> HF rope_scaling
    (_key(Keys.Rope.SCALING_FACTOR), "factor", "f32"),
    (_key(Keys.Rope.SCALING_ORIG_CTX_LEN), "original_max_position_embeddings", "u32"),
    (_key(Keys.Rope.SCALING_YARN_BETA_FAST), "beta_fast", "f32"),
    (_key(Keys.Rope.SCALING_YARN_BETA_SLOW), "beta_slow", "f32"),
]
VALUE_LENGTH = _key(Keys.Attention.VALUE_LENGTH)
EXPERT_USED_COUNT = _key(Keys.LLM.EXPERT_USED_COUNT)
EXPERT_GATING_FUNC = _key(Keys.LLM.EXPERT_GATING_FUNC)
SWIGLU_CLAMP_EXP = _key(Keys.LLM.SWIGLU_CLAMP_EXP)
ROPE_SCALING_TYPE = _key(Keys.Rope.SCALING_TYPE)
BLOCK_COUNT = _key(Keys.LLM.BLOCK_COUNT)
VOCAB_SIZE = _key(Keys.LLM.VOCAB_SIZE)
# HF config key -> the GGUF metadata key it comes from (config errors name the file's key)
GGUF_KEY_NAMES = {hf: key for key, hf, _ in _REQUIRED_KEYS + _OPTIONAL_KEYS}
GGUF_KEY_NAMES.update(num_experts_per_tok=EXPERT_USED_COUNT, swiglu_limit=SWIGLU_CLAMP_EXP)


# --------------------------------------------------------------------------- metadata -> config
def _number(value: Any, key: str, source: str, integer: bool) -> int | float:
    if isinstance(value, (bool, str, list, np.ndarray)):
        raise GGUFError(f"{source}: metadata {key!r} is {value!r}, expected a number")
    if integer:
        if float(value) != int(value) or value < 0:
            raise GGUFError(f"{source}: metadata {key!r} is {value!r}, expected a count")
        return int(value)
    # f32 metadata: keep the shortest decimal that rounds to it (1e-6, not 9.99999997e-07)
    return float(str(np.float32(value))) if isinstance(value, float) else float(value)


def _read_key(fields: Mapping[str, Any], key: str, kind: str, source: str):
    value = fields[key]
    if kind == "bool":
        if not isinstance(value, bool):
            raise GGUFError(f"{source}: metadata {key!r} is {value!r}, expected a bool")
        return value
    if kind == "i32[]":
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu":
            raise GGUFError(f"{source}: metadata {key!r} is {value!r}, expected an integer array")
        return [int(v) for v in value]
    return _number(value, key, source, integer=kind == "u32")


def hf_config_from_gguf(gf: GGUFFile, *, tensors: Mapping[str, TensorInfo] | None = None) -> dict[str, Any]:
    """The HF ``config.json`` dict described by a DeepSeek V4 GGUF's metadata."""
    source, f = str(gf.path), gf.fields
    arch = gf.architecture
    if arch != ARCH:
        raise GGUFError(
            f"{source}: {Keys.General.ARCHITECTURE} is {arch!r}, expected {ARCH!r} (DeepSeek V4 Flash)"
        )
    missing = [k for k, _, _ in _REQUIRED_KEYS if k not in f]
    if missing:
        raise GGUFError(f"{source}: metadata key {missing[0]!r} is missing"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    d: dict[str, Any] = {"model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"]}
    for key, hf_key, kind in _REQUIRED_KEYS + _OPTIONAL_KEYS:
        if key in f:
            d[hf_key] = _read_key(f, key, kind, source)
    if VALUE_LENGTH in f:
        v = _read_key(f, VALUE_LENGTH, "u32", source)
        if v != d["head_dim"]:
            raise GGUFError(f"{source}: {VALUE_LENGTH} = {v} differs from key_length "
                            f"{d['head_dim']} (K and V share one head here)")
    clamp = f.get(SWIGLU_CLAMP_EXP)
    if clamp is not None:
        values = np.atleast_1d(np.asarray(clamp, dtype=np.float64))
        if values.size == 0 or np.any(values != values[0]):
            raise GGUFError(f"{source}: {SWIGLU_CLAMP_EXP} must hold one value for every layer")
        d["swiglu_limit"] = _number(float(np.float32(values[0])), SWIGLU_CLAMP_EXP, source, False)
    gating = f.get(EXPERT_GATING_FUNC)
    if gating is not None and gating != SQRTSOFTPLUS:
        raise GGUFError(f"{source}: {EXPERT_GATING_FUNC} = {gating!r}; DeepSeek V4 uses "
                        f"sqrtsoftplus ({SQRTSOFTPLUS})")
    if any(k in f for k, _, _ in _ROPE_KEYS):
        kind = f.get(ROPE_SCALING_TYPE, "yarn")
        if kind != "yarn":
            raise GGUFError(f"{source}: {ROPE_SCALING_TYPE} is {kind!r}, expected 'yarn'")
        d["rope_scaling"] = {"type": "yarn"}
        for key, hf_key, kind in _ROPE_KEYS:
            if key not in f:
                raise GGUFError(f"{source}: metadata key {key!r} is missing (YaRN needs it)")
            d["rope_scaling"][hf_key] = _read_key(f, key, kind, source)
    for hf_key, key in (("bos_token_id", Keys.Tokenizer.BOS_ID), ("eos_token_id", Keys.Tokenizer.EOS_ID)):
        if key in f:
            d[hf_key] = _number(f[key], key, source, True)

    # top-k: the metadata value, checked against the hash tables' width (ne[0])
    tensors = gf.tensors if tensors is None else tensors
    widths = {n: t.ne[0] for n, t in tensors.items() if n.endswith(TID2EID) and t.ne}
    k = f.get(EXPERT_USED_COUNT)
    if k is None:
        if not widths:
            raise GGUFError(f"{source}: metadata key {EXPERT_USED_COUNT} is missing")
        k = min(widths.values())
    k = _number(k, EXPERT_USED_COUNT, source, True)
    for name, width in widths.items():
        if width < k:
            raise GGUFError(
                f"{source}: {EXPERT_USED_COUNT} = {k} but tensor {name!r} holds only {width} "
                f"expert ids per token"
            )
    if k < 1:
        raise GGUFError(f"{source}: {EXPERT_USED_COUNT} is {k}, expected at least 1 routed expert per token")
    d["num_experts_per_tok"] = k
    _check_block_count(source, d["num_hidden_layers"], tensors)
    # llama.cpp counts its MTP layers (blk.{n_layer}.nextn.*) in block_count
    d["num_hidden_layers"] -= _llama_cpp_nextn(f, tensors, d["num_hidden_layers"])
    d["num_nextn_predict_layers"] = 0  # loaded only when asked for (open_gguf_checkpoint's mtp)
    return d


# llama.cpp keeps the MTP block as trailing layers blk.{n_layer + j}: the usual layer names plus
# these under ``nextn.`` (ds4 keeps the official suffixes under mtp.{j}.).
_NEXTN_SUFFIXES = {
    "nextn.e_proj.weight": "e_proj.weight", "nextn.h_proj.weight": "h_proj.weight",
    "nextn.enorm.weight": "enorm.weight", "nextn.hnorm.weight": "hnorm.weight",
    "nextn.shared_head_norm.weight": "norm.weight", "nextn.hc_head_fn.weight": "hc_head_fn.weight",
    "nextn.hc_head_base.weight": "hc_head_base.weight", "nextn.hc_head_scale.weight": "hc_head_scale.weight",
}
NEXTN_LAYERS = f"{ARCH}.nextn_predict_layers"


def _llama_cpp_nextn(fields: Mapping[str, Any], tensors: Mapping[str, TensorInfo], block_count: int) -> int:
    """How many of the ``block_count`` layers are llama.cpp's MTP layers (0 for ds4's files)."""
    n = fields.get(NEXTN_LAYERS)
    n = int(n) if isinstance(n, (int, np.integer)) else 0
    if not 0 < n < block_count:
        return 0
    ok = all(f"blk.{block_count - n + j}.nextn.e_proj.weight" in tensors for j in range(n))
    return n if ok else 0


def mtp_tensors(gf: GGUFFile, n_layers: int) -> dict[str, TensorInfo]:
    """The MTP block's tensors of a file under ds4's names (``mtp.{j}.*``): its own ``mtp.*``
    tensors, or llama.cpp's trailing layers ``blk.{n_layers + j}.*`` renamed."""
    out = {n: t for n, t in gf.tensors.items() if n.startswith("mtp.")}
    for name, info in gf.tensors.items():
        m = _BLOCK.match(name)
        if m and int(m.group(1)) >= n_layers:
            suffix = name[m.end():]
            out[f"mtp.{int(m.group(1)) - n_layers}.{_NEXTN_SUFFIXES.get(suffix, suffix)}"] = info
    return out


def _check_block_count(source: str, block_count: int, tensors: Mapping[str, TensorInfo]) -> None:
    """The layers the tensors hold must be exactly ``block_count``: a smaller count would
    silently drop layers, a larger one fail later on a missing tensor."""
    present = sorted({int(m.group(1)) for n in tensors if (m := _BLOCK.match(n))})
    if present and present != list(range(block_count)):
        held = f"blk.{present[0]}..blk.{present[-1]}" if present == list(range(present[0], present[-1] + 1)) \
            else f"{len(present)} layers ({present[0]}..{present[-1]}, with gaps)"
        raise GGUFError(f"{source}: {BLOCK_COUNT} is {block_count}, but the tensors hold layers {held}")


def _check_tokenizer_size(source: str, fields: Mapping[str, Any], vocab_size: int) -> None:
    """A token id at or past ``vocab_size`` would index past the embedding table."""
    tokens = fields.get(Keys.Tokenizer.LIST)
    if isinstance(tokens, list) and len(tokens) > vocab_size:
        raise GGUFError(f"{source}: {Keys.Tokenizer.LIST} has {len(tokens)} tokens but {VOCAB_SIZE} "
                        f"is {vocab_size}: ids {vocab_size}..{len(tokens) - 1} have no embedding")


def gguf_metadata(config: Mapping[str, Any]) -> list[tuple[str, Any, GGUFValueType]]:
    """``(key, value, type)`` of the ``deepseek4.*`` metadata for an HF config dict (or a
    ``ModelConfig``, via ``to_hf``), in the types llama.cpp's converter writes."""
    if hasattr(config, "to_hf"):
        config = config.to_hf()
    kinds = {"u32": GGUFValueType.UINT32, "f32": GGUFValueType.FLOAT32, "bool": GGUFValueType.BOOL,
             "i32[]": GGUFValueType.ARRAY}
    out = []
    for key, hf_key, kind in _REQUIRED_KEYS + _OPTIONAL_KEYS:
        if hf_key in config:
            out.append((key, config[hf_key], kinds[kind]))
    out.append((VALUE_LENGTH, config["head_dim"], GGUFValueType.UINT32))
    out.append((EXPERT_USED_COUNT, config["num_experts_per_tok"], GGUFValueType.UINT32))
    out.append((EXPERT_GATING_FUNC, SQRTSOFTPLUS, GGUFValueType.UINT32))
    if "swiglu_limit" in config:
        out.append((SWIGLU_CLAMP_EXP, [float(config["swiglu_limit"])] * config["num_hidden_layers"],
                    GGUFValueType.ARRAY))
    rope = config.get("rope_scaling")
    if rope:
        out.append((ROPE_SCALING_TYPE, rope.get("type", "yarn"), GGUFValueType.STRING))
        for key, hf_key, kind in _ROPE_KEYS:
            out.append((key, rope[hf_key], kinds[kind]))
    return out


# --------------------------------------------------------------------------- tensors
def _quantizable(path: str) -> bool:
    """Projections that may be held packed: those the official checkpoint quantizes, and the head
    (the model calls these modules; other Linears are read as float)."""
    if path == "head":
        return True
    suffix = block_suffix(path)
    return suffix is not None and suffix + ".weight" in QUANTIZED_WEIGHTS


# Tensors are copied out of the map in pieces of about this many bytes, each piece's file pages
# released right after, into MLX arrays allocated once at their final size.
_PIECE_BYTES = 64 << 20


def _new_buffer(shape: tuple[int, ...], dtype: mx.Dtype) -> tuple[mx.array, np.ndarray]:
    """A fresh evaluated MLX array and a writable byte view of its memory. Filling it through
    the view avoids a second full-size copy; the array is new and referenced only here."""
    a = mx.zeros(shape, dtype=dtype)
    mx.eval(a)
    return a, np.asarray(memoryview(a)).reshape(-1).view(np.uint8)


def _read(gf: GGUFFile, info: TensorInfo) -> mx.array:
    """A tensor's stored bytes as an MLX array (plain types in their dtype and logical shape,
    BF16 as bfloat16; block types as uint8 ``[..., row_bytes]``)."""
    src = gf.array(info.name)
    dtype = mx.bfloat16 if info.ggml_type == T.BF16 else mx.uint8
    flat = src.reshape(-1).view(np.uint8)
    out, dst = _new_buffer((flat.size,), mx.uint8)
    for start in range(0, flat.size, _PIECE_BYTES):
        stop = min(flat.size, start + _PIECE_BYTES)
        dst[start:stop] = flat[start:stop]
        gf.release(info.offset + start, stop - start)
    if dtype == mx.uint8 and src.dtype != np.uint8:
        dtype = {np.dtype("<f4"): mx.float32, np.dtype("<f2"): mx.float16,
                 np.dtype("<i4"): mx.int32}[src.dtype]
    return mx.view(out, dtype).reshape(src.shape)


def _converted(gf: GGUFFile, info: TensorInfo, fn) -> list[mx.array]:
    """``fn`` (MLX bytes rows -> tuple of arrays with one row each) applied to the tensor's rows
    in pieces, the outputs gathered in arrays allocated once: bounded transient memory."""
    src = gf.array(info.name)
    rows = src.reshape(-1, src.shape[-1]) if src.ndim else src.reshape(1, -1)
    step = max(1, _PIECE_BYTES // max(1, rows.shape[1]))
    outs: list[tuple[mx.array, np.ndarray]] = []
    for r in range(0, rows.shape[0], step):
        pieces = fn(mx.array(rows[r:r + step]))
        mx.eval(pieces)
        if not outs:
            outs = [_new_buffer((rows.shape[0], *p.shape[1:]), p.dtype) for p in pieces]
        for (_, dst), p in zip(outs, pieces):
            raw = np.asarray(memoryview(p)).reshape(-1).view(np.uint8)
            at = r * (raw.size // p.shape[0])  # bytes per output row × first row
            dst[at:at + raw.size] = raw
        gf.release(info.offset + r * rows.shape[1], min(step, rows.shape[0] - r) * rows.shape[1])
    return [a.reshape(*src.shape[:-1], *a.shape[1:]) for a, _ in outs]


def _float_array(gf: GGUFFile, info: TensorInfo) -> mx.array:
    """An unquantized or exactly dequantized tensor as an MLX array (ints as int32)."""
    qtype = T(info.ggml_type)
    if qtype in _FLOAT_TYPES or qtype == T.I32:
        return _read(gf, info)
    if qtype in INT_TYPES:
        raw = gf.array(info.name)
        if raw.size and (raw.min() < np.iinfo(np.int32).min or raw.max() > np.iinfo(np.int32).max):
            raise GGUFError(f"{gf.path}: tensor {info.name!r} holds values outside int32")
        return mx.array(raw.astype(np.int32))
    if qtype in PLAIN_DTYPES:  # F64
        return mx.array(gf.array(info.name).astype(np.float32))
    fmt = qgguf.by_type(info.ggml_type, f"{gf.path}: {info.name}")
    (values,) = _converted(gf, info, lambda b: (fmt.dequantize(b),))
    return values.reshape(info.shape)


def _load_tensor(gf: GGUFFile, info: TensorInfo, path: str, module: str | None,
                 weights: dict[str, mx.array], formats: dict[str, WeightFormat]) -> None:
    """Put one GGUF tensor into ``weights`` (and its module's format into ``formats``)."""
    qtype = info.ggml_type
    packed = module is not None and qtype not in _FLOAT_TYPES and qtype not in INT_TYPES
    if not packed:
        weights[path] = _float_array(gf, info)
        return
    fmt = qgguf.by_type(qtype, f"{gf.path}: {info.name}")  # the clear error for unsupported types
    if fmt is q8_0:
        d = gf.array(info.name).reshape(-1, q8_0.BLOCK_BYTES)[:, :2].view("<f2")
        scale_dtype = mx.float16 if q8_0.fits_fp16(d) else mx.float32
        gf.release(info.offset, info.nbytes)
        w, s, b = _converted(gf, info, lambda x: q8_0.to_mlx_affine8(x, scale_dtype))
        weights.update({path: w, module + ".scales": s, module + ".biases": b})
        formats[module] = affine(8, 32)
    elif fmt is mxfp4:
        w, s = _converted(gf, info, mxfp4.to_mlx_mxfp4)
        weights.update({path: w, module + ".scales": s})
        formats[module] = MXFP4
    else:
        weights[path] = _read(gf, info)
        formats[module] = WeightFormat(gguf_kind(fmt.NAME), None, fmt.BLOCK_SIZE)


def _check_shape(gf: GGUFFile, info: TensorInfo, expected: tuple[int, ...], path: str) -> None:
    got = info.shape
    if path.endswith(".tid2eid"):
        ok = hash_table_fits(got, *expected)
    else:
        ok = got == tuple(expected)
    if not ok:
        raise GGUFError(
            f"{gf.path}: tensor {info.name!r} has shape {list(got)} (ne {list(info.ne)}), "
            f"expected {list(expected)} for this model's metadata"
        )


def _gguf_name_or_none(param: str) -> str | None:
    try:
        return internal_to_gguf(param)
    except UnknownTensorName:
        return None  # load_weights names the failure


@dataclass
class GGUFCheckpoint:
    """An open DeepSeek V4 GGUF (plus optionally ds4's separate MTP file): its HF-style
    ``config`` from the metadata, and ``load_weights`` for the tensors a model asks for."""

    path: Path
    config: dict[str, Any]
    files: list[GGUFFile]
    by_name: dict[str, tuple[GGUFFile, TensorInfo]]

    @property
    def has_mtp(self) -> bool:
        return int(self.config.get("num_nextn_predict_layers", 0)) > 0

    def load_weights(self, params: Mapping[str, tuple[int, ...]], projections: set[str],
                     progress: Callable[[int, int], None] | None = None,
                     ) -> tuple[dict[str, mx.array], dict[str, WeightFormat]]:
        """``({internal path: array}, {module path: WeightFormat})`` for the model parameters
        ``params`` (path -> shape). Modules in ``projections`` (the model's float projections)
        may stay packed; every other quantized tensor is dequantized exactly to float.
        ``progress(bytes read, bytes to read)`` is called after each tensor."""
        gf = self.files[0]
        n_experts = int(self.config["n_routed_experts"])
        weights: dict[str, mx.array] = {}
        formats: dict[str, WeightFormat] = {}
        total = sum(self.by_name[n][1].nbytes or 0 for p in params
                    if (n := _gguf_name_or_none(p)) in self.by_name) if progress else 0
        done = 0
        for param, shape in params.items():
            try:
                name = internal_to_gguf(param)
            except UnknownTensorName as e:
                raise GGUFError(f"{gf.path}: the model needs {param!r}, which has no GGUF name ({e})") from None
            if name not in self.by_name:
                where = self.files[-1].path if param.startswith("mtp.") else gf.path  # the MTP file, if any
                raise GGUFError(f"{where}: tensor {name!r} is missing (needed for {param})")
            src, info = self.by_name[name]
            _check_shape(src, info, tuple(shape), param)
            module = param[: -len(".weight")] if param.endswith(".weight") else None
            if module not in projections or not _quantizable(module):
                module = None
            _load_tensor(src, info, param, module, weights, formats)
            if param.endswith(".tid2eid"):
                check_expert_ids(weights[param], n_experts, f"{src.path}: tensor {info.name!r}", GGUFError)
            if progress is not None:
                done += info.nbytes or 0
                progress(done, total)
        return weights, formats

    def tokenizer_fields(self) -> dict[str, Any] | None:
        """The ``tokenizer.*`` metadata, or None when the file carries no tokenizer."""
        f = self.files[0].fields
        if Keys.Tokenizer.MODEL not in f and Keys.Tokenizer.HF_JSON not in f:
            return None
        return {k: v for k, v in f.items() if k.startswith("tokenizer.")}

    def close(self) -> None:
        for f in self.files:
            f.close()


def _mtp_blocks(tensors: Mapping[str, TensorInfo]) -> int:
    return len({int(m.group(1)) for n in tensors if (m := re.match(r"^mtp\.(\d+)\.", n))})


def open_gguf_checkpoint(path: str | os.PathLike, mtp_path: str | os.PathLike | None = None,
                         *, mtp: bool = False) -> GGUFCheckpoint:
    """Open a DeepSeek V4 GGUF and read its config. With ``mtp`` the MTP block comes from the
    file's own ``mtp.{j}.*`` tensors when it has them, else from ``mtp_path`` (ds4's separate
    MTP file; given alone it is used too); it shares the main file's embedding and head."""
    files = [open_gguf(path)]
    try:
        gf = files[0]
        by_name = {n: (gf, t) for n, t in gf.tensors.items()}
        hf = hf_config_from_gguf(gf)
        _check_tokenizer_size(str(gf.path), gf.fields, hf["vocab_size"])
        own = mtp_tensors(gf, hf["num_hidden_layers"])
        if (mtp or mtp_path is not None) and own:  # the block travels in the main file
            hf["num_nextn_predict_layers"] = _mtp_blocks(own)
            by_name.update({n: (gf, t) for n, t in own.items()})
        elif mtp_path is not None:
            files.append(open_gguf(mtp_path))
            first = [int(m.group(1)) for n in files[1].tensors
                     if (m := _BLOCK.match(n)) and n.endswith(".nextn.e_proj.weight")]
            extra = mtp_tensors(files[1], min(first) if first else 1 << 30)  # a sidecar's first MTP layer
            if not extra:
                raise GGUFError(f"{files[1].path}: no MTP tensors (mtp.* or blk.N.nextn.*) in the MTP file")
            hf["num_nextn_predict_layers"] = _mtp_blocks(extra)
            by_name.update({n: (files[1], t) for n, t in extra.items()})
    except BaseException:
        for f in files:
            f.close()
        raise
    return GGUFCheckpoint(gf.path, hf, files, by_name)

"""GGUF output of ``ds4mlx convert``: the preset type tables and the streaming GGUF writer.

Tensor names and shapes are the ``deepseek4`` layout that antirez's ds4 and llama.cpp share
(``io/names.py``; gguf_layouts.md §2–3). Presets choose the GGML type of every tensor:

* ``ds4-q4`` / ``ds4-q2`` — exactly the types ds4 validates (``weights_validate_layout``,
  gguf_layouts.md §2.2–2.3): Q8_0 attention projections, shared experts and head; F16 embedding,
  router, HC mixers, compressor and indexer (incl. the FP8 indexer ``wq_b``); F32 1-D tensors;
  I32 hash tables; routed experts Q4_K (q4) or IQ2_XXS gate/up + Q2_K down (q2). IQ2_XXS uses
  ds4's importance without an imatrix: Σ row² per input column of each expert.
* ``mxfp4`` — lossless: experts repacked to GGML MXFP4 (same codes and E8M0 bytes), FP8
  weights as BF16 (E4M3 × power-of-two scale is exact in BF16; checked), BF16/F32 as stored,
  1-D tensors F32 (as llama.cpp's converters do).

The MTP block is not written: ds4 loads it from a separate file, and llama.cpp refuses files
with tensors it does not use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .convert import (ConvertError, Logical, Options, Progress, Unit, check_free_space, check_output,
                      dequantize, disk_full_error, hash_table, logical_weights, ordered_map, read_tensor,
                      source_nbytes, _scale_name)
from .io.hf import HFCheckpoint
from .io.names import internal_to_gguf
from .quant import gguf as gguf_quants
from .quant.gguf import mxfp4 as gguf_mxfp4
from .quant.layers import FLOAT, MXFP4, MXFP8

PRESETS = ("ds4-q4", "ds4-q2", "mxfp4")
DEFAULT_PRESET = "ds4-q4"

EXPERT_TYPES = {
    "ds4-q4": {"w1": "Q4_K", "w3": "Q4_K", "w2": "Q4_K"},
    "ds4-q2": {"w1": "IQ2_XXS", "w3": "IQ2_XXS", "w2": "Q2_K"},
    "mxfp4": {"w1": "MXFP4", "w3": "MXFP4", "w2": "MXFP4"},
}

# ds4's type for every non-expert tensor, by GGUF name (the suffix after ``blk.N.``).
DS4_TYPES = {
    "token_embd.weight": "F16", "output.weight": "Q8_0", "output_norm.weight": "F32",
    "output_hc_fn.weight": "F16", "output_hc_base.weight": "F32", "output_hc_scale.weight": "F32",
    "hc_attn_fn.weight": "F16", "hc_attn_scale.weight": "F32", "hc_attn_base.weight": "F32",
    "hc_ffn_fn.weight": "F16", "hc_ffn_scale.weight": "F32", "hc_ffn_base.weight": "F32",
    "attn_norm.weight": "F32", "ffn_norm.weight": "F32",
    "attn_q_a.weight": "Q8_0", "attn_q_a_norm.weight": "F32", "attn_q_b.weight": "Q8_0",
    "attn_kv.weight": "Q8_0", "attn_kv_a_norm.weight": "F32", "attn_sinks.weight": "F32",
    "attn_output_a.weight": "Q8_0", "attn_output_b.weight": "Q8_0",
    "attn_compressor_ape.weight": "F16", "attn_compressor_kv.weight": "F16",
    "attn_compressor_gate.weight": "F16", "attn_compressor_norm.weight": "F32",
    "indexer.attn_q_b.weight": "F16", "indexer.proj.weight": "F16",
    "indexer_compressor_ape.weight": "F16", "indexer_compressor_kv.weight": "F16",
    "indexer_compressor_gate.weight": "F16", "indexer_compressor_norm.weight": "F32",
    "ffn_gate_inp.weight": "F16", "exp_probs_b.bias": "F32", "ffn_gate_tid2eid.weight": "I32",
    "ffn_gate_shexp.weight": "Q8_0", "ffn_up_shexp.weight": "Q8_0", "ffn_down_shexp.weight": "Q8_0",
}


def _suffix(gguf_name: str) -> str:
    parts = gguf_name.split(".", 2)
    return parts[2] if parts[0] == "blk" else gguf_name


def tensor_type(preset: str, lw: Logical, gguf_name: str) -> str:
    """The GGML type name of one tensor under ``preset``."""
    if lw.experts:
        return EXPERT_TYPES[preset][lw.path.split(".")[-2]]
    if preset != "mxfp4":
        return DS4_TYPES[_suffix(gguf_name)]
    if lw.path.endswith(".tid2eid"):
        return "I32"
    if len(lw.shape) == 1:
        return "F32"
    if lw.fmt == MXFP8:
        return "BF16"
    return {"BF16": "BF16", "F16": "F16"}.get(lw.dtype, "F32")


def _exact_bf16(values: np.ndarray, name: str) -> np.ndarray:
    bits = gguf_quants.BF16.quantize(values)
    back = (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(values.shape)
    if not np.array_equal(back, values):
        raise ConvertError(f"{name}: FP8 values are not exact in BF16 (scale out of range); use another preset")
    return bits


def gguf_unit(ckpt: HFCheckpoint, lw: Logical, preset: str, k: int | None) -> Unit:
    """The GGUF unit of one logical weight: one tensor of ``tensor_type`` in numpy shape order."""
    name = internal_to_gguf(lw.path)
    qtype = tensor_type(preset, lw, name)
    fmt = gguf_quants.get(qtype, name) if qtype != "I32" else None
    lead = (len(lw.names),) if lw.experts else ()
    if lw.path.endswith(".tid2eid"):
        width = ckpt.file(ckpt.weight_map[lw.names[0]]).info(lw.names[0]).shape[1]
        shape = (lw.shape[0], k if k is not None else width)
        nbytes = 4 * shape[0] * shape[1]
    else:
        shape = lead + lw.shape
        try:
            row = gguf_quants.row_bytes(fmt, shape[-1], name)
        except ValueError as e:
            raise ConvertError(f"{e} (preset {preset})") from None
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * row

    def encode(src_name: str) -> np.ndarray:
        if lw.path.endswith(".tid2eid"):
            return hash_table(ckpt, src_name, k).astype("<i4")
        if qtype == "MXFP4" and lw.fmt == MXFP4:  # same codes and scale bytes, nibbles reordered
            return gguf_mxfp4.from_pairs(read_tensor(ckpt, src_name).view(np.uint8),
                                         read_tensor(ckpt, _scale_name(src_name)))
        if lw.fmt == FLOAT and qtype == lw.dtype and qtype in ("BF16", "F16", "F32"):
            return read_tensor(ckpt, src_name)  # as stored
        values = dequantize(ckpt, lw, src_name)
        if qtype == "BF16":
            return _exact_bf16(values, src_name)
        if qtype == "IQ2_XXS":  # ds4's importance without an imatrix: Σ row² per column
            return fmt.quantize(values, weights=np.sum(values * values, axis=0))
        return fmt.quantize(values)

    def produce():
        cheap = qtype in ("I32", "F32", "F16", "BF16", "MXFP4")
        yield name, (map(encode, lw.names) if cheap else ordered_map(encode, lw.names))

    return Unit([(name, qtype, shape)], produce, source_nbytes(ckpt, lw.names), nbytes)


def gguf_plan(ckpt: HFCheckpoint, opts: Options) -> list[Unit]:
    preset = opts.preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ConvertError(f"--preset must be one of {PRESETS}, got {preset!r}")
    return [gguf_unit(ckpt, lw, preset, opts.experts_per_token)
            for lw in logical_weights(ckpt, include_mtp=False)]


def gguf_config(ckpt: HFCheckpoint, opts: Options) -> dict[str, Any]:
    """The HF config the GGUF metadata is written from (K experts, no MTP block in the file)."""
    config = dict(ckpt.config)
    if opts.experts_per_token is not None:
        config["num_experts_per_tok"] = opts.experts_per_token
    config["num_nextn_predict_layers"] = 0
    return config


def tokenizer_fields(source: Path) -> dict[str, Any] | None:
    path = source / "tokenizer.json"
    if not path.is_file():
        import warnings

        warnings.warn(f"{source}: no tokenizer.json, so the GGUF carries no tokenizer "
                      "(ds4 and llama.cpp need one; ds4mlx falls back to the published V4 tokenizer)")
        return None
    from .tokenizer import gguf_tokenizer_fields

    return gguf_tokenizer_fields(path)


# --------------------------------------------------------------------------- writing


def write_stream(path: Path, config: dict[str, Any], units: list[Unit], tokenizer: dict[str, Any] | None,
                 bar: Progress) -> dict[str, int]:
    """Write the GGUF header from the plan, then each tensor's bytes as they are produced.
    Returns the CRC-32 of every tensor's data for the verification pass."""
    import zlib

    from .io.mlx_dir import write_bytes

    writer = metadata_writer(path, config, tokenizer)
    crcs = {}
    try:
        for u in units:
            for name, qtype, shape in u.tensors:
                writer.add_tensor_info(name, shape, np.dtype(np.float32), u.nbytes,
                                       raw_dtype=gguf_type_id(qtype))
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        f = writer.fout[0]
        for u in units:
            for name, chunks in u.produce():
                write_bytes(f, memoryview(b"\0" * (-f.tell() % writer.data_alignment)))
                crc, done = 0, 0
                for chunk in bar.track(chunks):
                    buf = memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
                    write_bytes(f, buf)
                    crc = zlib.crc32(buf, crc)
                    done += len(buf)
                if done != u.nbytes:
                    raise ConvertError(f"{path}: tensor {name!r} produced {done} bytes, expected {u.nbytes}")
                crcs[name] = crc
        write_bytes(f, memoryview(b"\0" * (-f.tell() % writer.data_alignment)))
        f.flush()
        os.fsync(f.fileno())
    finally:
        writer.close()
    return crcs


def metadata_writer(path: Path, config: dict[str, Any], tokenizer: dict[str, Any] | None):
    """A ``gguf.GGUFWriter`` holding the ``deepseek4`` metadata of ``io/gguf.py`` and the tokenizer."""
    from gguf import GGUFValueType, GGUFWriter

    from .io.gguf import ARCH, gguf_metadata

    writer = GGUFWriter(str(path), ARCH)
    writer.add_name("DeepSeek-V4-Flash")
    for key, value, vtype in gguf_metadata(config):
        if vtype == GGUFValueType.ARRAY:
            writer.add_array(key, list(value))
        else:
            writer.add_key_value(key, value, vtype)
    if tokenizer:
        from .tokenizer import add_tokenizer_to_gguf

        add_tokenizer_to_gguf(writer, tokenizer)
    return writer


def gguf_type_id(qtype: str) -> int:
    from gguf import GGMLQuantizationType

    return int(GGMLQuantizationType[qtype])


def verify_gguf(path: Path, units: list[Unit], crcs: dict[str, int]) -> None:
    """Re-read the file: every tensor with the planned type and shape, and the bytes written."""
    import zlib

    from .io.gguf_file import open_gguf

    with open_gguf(path) as g:
        planned = {name: (qtype, shape) for u in units for name, qtype, shape in u.tensors}
        if set(g.tensors) != set(planned):
            raise ConvertError(f"{path}: verification failed: the tensor list does not match the plan")
        for name, (qtype, shape) in planned.items():
            info = g.info(name)
            if info.type_name != qtype or info.shape != tuple(shape):
                raise ConvertError(f"{path}: verification failed: {name} is {info.type_name} {info.shape}, "
                                   f"planned {qtype} {tuple(shape)}")
            data = g.array(name)
            if zlib.crc32(memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))) != crcs[name]:
                raise ConvertError(f"{path}: verification failed: tensor {name!r} differs from what was written")
            del data
            g.release(name)


def convert_gguf(ckpt: HFCheckpoint, source: str, output: Path, opts: Options, *, progress: bool) -> Path:
    if output.suffix != ".gguf":
        raise ConvertError(f"{output}: a GGUF output path must end in .gguf")
    partial = check_output(ckpt.path, output, resume=False, is_dir=False)
    units = gguf_plan(ckpt, opts)
    config = gguf_config(ckpt, opts)
    tokenizer = tokenizer_fields(ckpt.path)
    total = sum(u.nbytes for u in units)
    check_free_space(output.parent, total)
    bar = Progress(total, 0, f"convert → {output.name}", progress)
    try:
        crcs = write_stream(partial, config, units, tokenizer, bar)
        bar.close()
        verify_gguf(partial, units, crcs)
    except BaseException as exc:
        bar.close()
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and (err := disk_full_error(exc, partial)):
            raise err from exc
        raise
    if output.is_dir():
        output.rmdir()
    os.replace(partial, output)
    return output

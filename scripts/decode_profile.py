"""Launches and bytes of one decoded token, per layer, at the real DeepSeek V4 Flash shapes.

One decoder layer of each kind (ratio 0, 4, 128) at Flash's widths (hidden 4096, 64 heads x 512,
q_lora 1024, o_groups 8 x o_lora 1024, indexer 64 x 128 with top-512, window 128, experts of
2048, hc_mult 4) with random weights, each tensor in the form a real file of the format loads
into (``--dense file``, the default; ``file_formats``):

* q2 / q4: a ds4-style GGUF (antirez/ds4's files and our ``convert --preset ds4-q2 / ds4-q4``,
  which share ``names.DS4_GGUF_TYPES``): routed experts IQ2_XXS gate/up + Q2_K down (q2) or
  Q4_K (q4), kept as GGUF blocks; the attention projections (wq_a, wq_b, wkv, wo_a, wo_b) and
  the shared expert Q8_0, which the reader (``io/gguf.py``) turns into MLX affine 8-bit group
  32 ``QuantizedLinear`` with float16 scales and biases (= -128 x scale), made here the same
  way (``q8_0.quantize`` of random weights, then ``q8_0.to_mlx_affine8``); the compressors,
  the indexer (its ``wq_b`` too), the router and the HC mixers F16, read as float; the head Q8_0.
* mxfp4: an official safetensors checkpoint: FP8 projections (the attention's, the indexer's
  ``wq_b``, the shared expert) as MLX ``mxfp8`` ``QuantizedLinear`` (``io/hf.py``), FP4 experts
  as MLX ``mxfp4``, BF16 / F32 tensors as float; the head BF16.

Float tensors are held as the loader holds them: float32 where the model keeps float32
(``keeps_float32``: HC, sinks, APE, compressors, router), else the activation dtype.
``--dense bf16`` builds every dense projection in the activation dtype instead (the build
before real formats, for comparison). Only ``--experts`` experts are built (a decode token reads
only the k it routes to); byte figures use Flash's 256. The decode state is synthesised at each context
length (window rows, compressed rows, indexer keys, unfinished compressor windows), so a 128k
state costs no prefill. For every layer it reports, for one decoded token:

* launches on the Metal path, counted exactly so: every launch site of ``ds4mlx.kernels``
  (``_run`` is replaced by a recorder that returns placeholder outputs) and every
  ``mx.fast.rms_norm`` (one kernel on the GPU, a dozen fallback ops on the CPU), plus every MLX
  primitive left in the lazy graph of the step's outputs (the new streams and the new decode
  state) that runs a kernel: views (reshape, slice, broadcast, transpose, ...) excluded, and a
  compiled (``mx.compile``) function counts as one. Nothing is evaluated for this count. The
  layer runs as in the model's loop (``Block.deferred``): the previous layer's last HC post
  comes in and runs in this layer's first HC pre, its own goes out to the next layer (the
  last layer's is counted with the head).
* the same count on the ops path (the kernels' MLX twins); its host syncs (the GGUF experts'
  twin reads the routed ids) are counted as graph cuts, each segment once;
* bytes read: weights (each parameter the layer reads as held in memory: packed weights with
  their scales and biases, the router matrix for all 256 experts, k routed experts in their
  packed format) plus the decode state the path reads, itemised from the code (the float32
  copies the ops path makes are counted as written once and read by each op that reads them);
  where a quantized projection's float scales / biases differ from the activation dtype,
  ``mx.quantized_matmul`` casts them to float32 on every call (bf16 activations with a GGUF's
  float16 scales), counted as read, written in float32 and read again; the minimum reads every
  weight and the state it needs once, as held in memory (no casts);
* CPU time of the ops path (one evaluated step, best of ``--repeat``).

Then the whole 43-layer model (2 ratio-0, 21 ratio-4, 20 ratio-128 layers, head and embedding)
and a bandwidth model: time per token = bytes / bandwidth + launches x ``--launch-us``. It
assumes every layer of a kind costs what the measured one does (Flash's 3 hash-routed layers
counted as score-routed ones), the embedding reads one row, the head one
matmul in the file's head format (Q8_0 -> affine 8-bit for q2 / q4, BF16 for mxfp4; its scale
casts included), and no MTP block. The last line is one JSON object.

Usage: python scripts/decode_profile.py [--formats q2 q4 mxfp4] [--contexts 2048 32768 131072]
       [--dense file|bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds4mlx import kernels, ops  # noqa: E402
from ds4mlx.config import ModelConfig  # noqa: E402
from ds4mlx.layers import apply_formats, decode_kernel_takes  # noqa: E402
from ds4mlx.layers.gguf import GGUFSwitchLinear  # noqa: E402
from ds4mlx.model.transformer import Block, keeps_float32  # noqa: E402
from ds4mlx.names import DS4_GGUF_TYPES, QUANTIZED_WEIGHTS, internal_to_gguf, official_layout  # noqa: E402
from ds4mlx.quant.formats import FLOAT, MXFP4, MXFP8, WeightFormat, affine  # noqa: E402
from ds4mlx.quant.gguf import get as gguf_format, q8_0  # noqa: E402
from ds4mlx.state import LayerCache  # noqa: E402
from ds4mlx.synthetic import default_compress_ratios, tiny_config  # noqa: E402

FLASH_EXPERTS, FLASH_LAYERS, FLASH_VOCAB = 256, 43, 129280
RECIPES = {"q2": ("IQ2_XXS", "Q2_K"), "q4": ("Q4_K", "Q4_K"), "mxfp4": ("MXFP4", "MXFP4")}
# the kernels the before/after columns switch
DECODE_VARIANTS = ("attention", "indexer", "rope_rows", "router")
# embedding gather, the last layer's HC post, HC head (one compiled function), final RMSNorm;
# the head's product is counted from its graph (head_launches)
HEAD_LAUNCHES = 4
DEVICES = {"m3_ultra": 819e9, "m3_max": 400e9}
VIEWS = {"Broadcast", "Reshape", "Squeeze", "ExpandDims", "Transpose", "Slice", "AsStrided",
         "View", "StopGradient", "Depends", "Flatten", "Unflatten"}
_NODE = re.compile(r'\{ (\d+) \[label ="([^"]+)"')
# Byte offsets of the float16 scale fields of each block format, set to a small value so
# random blocks decode to finite weights.
_SCALE_FIELDS = {"IQ2_XXS": (0,), "Q2_K": (80, 82), "Q4_K": (0, 2)}


def flash_hf(n_experts: int, top_k: int) -> dict:
    """The HF config of three Flash-width layers (ratio 0, 4, 128)."""
    return tiny_config(num_layers=3, compress_ratios=[0, 4, 128], mtp=False, hidden_size=4096,
                     num_attention_heads=64, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024,
                     o_groups=8, o_lora_rank=1024, index_n_heads=64, index_head_dim=128,
                     index_topk=512, sliding_window=128, n_routed_experts=n_experts,
                     moe_intermediate_size=2048, num_hash_layers=0, experts_per_token=top_k,
                     max_position_embeddings=1 << 20)


def flash_config(n_experts: int, top_k: int) -> ModelConfig:
    return ModelConfig.from_hf(flash_hf(n_experts, top_k))


# ----------------------------------------------------------------------------- formats
GGUF_RECIPES = ("q2", "q4")  # ds4-style GGUF files; the others are official safetensors


def file_formats(hf: dict, layer: int, recipe: str) -> dict[str, WeightFormat]:
    """``{module path in the block: WeightFormat}`` of the dense projections of layer ``layer``
    as the reader of a real file of ``recipe`` reports them (experts are built apart): a GGUF's
    (q2 / q4) Q8_0 projections -> affine 8-bit group 32 (``io/gguf.py``: quantizable module,
    ds4 type of the tensor from ``names.DS4_GGUF_TYPES``), an official checkpoint's FP8 / FP4
    ones -> mxfp8 / mxfp4 (``io/hf.py``: storage from ``names.official_layout``); float else."""
    prefix = f"layers.{layer}."
    out: dict[str, WeightFormat] = {}
    layout = None if recipe in GGUF_RECIPES else official_layout(hf)
    for name in sorted(QUANTIZED_WEIGHTS):
        if name.startswith("ffn.experts.") or name in ("e_proj.weight", "h_proj.weight"):
            continue
        path = prefix + name
        if recipe in GGUF_RECIPES:
            gguf_type = DS4_GGUF_TYPES[internal_to_gguf(path).split(".", 2)[2]]
            fmt = affine(8, 32) if gguf_type == "Q8_0" else FLOAT
        else:
            spec = layout.get(path)
            fmt = None if spec is None else {"fp8": MXFP8, "fp4": MXFP4}.get(spec.storage, FLOAT)
            if spec is None:
                continue  # not in this layer kind
        if (name.startswith("attn.compressor.") and hf["compress_ratios"][layer] == 0) or (
                name.startswith("attn.indexer.") and hf["compress_ratios"][layer] != 4):
            continue
        out[name[: -len(".weight")]] = fmt
    return out


def head_format(recipe: str) -> WeightFormat:
    """The head's format in a real file: Q8_0 (ds4 GGUF) -> affine 8-bit, BF16 (official)."""
    return affine(8, 32) if DS4_GGUF_TYPES["output.weight"] == "Q8_0" and recipe in GGUF_RECIPES else FLOAT


def quantize_as(w: mx.array, fmt: WeightFormat) -> dict[str, mx.array]:
    """The packed leaves of float ``w [out, in]`` in ``fmt`` as the loader holds them: affine 8
    from Q8_0 blocks (``q8_0.to_mlx_affine8``, the GGUF reader's conversion and its scale
    dtype choice), mxfp8 / mxfp4 by ``mx.quantize`` (the official FP8 -> mxfp8 view is exact,
    so the layout is the same)."""
    if fmt.kind == "affine":
        blocks = q8_0.quantize(np.asarray(w.astype(mx.float32)))
        d = blocks.reshape(-1, q8_0.BLOCK_BYTES)[:, :2].view("<f2")
        scale_dtype = mx.float16 if q8_0.fits_fp16(d) else mx.float32
        q, s, b = q8_0.to_mlx_affine8(mx.array(blocks), scale_dtype)
        return {"weight": q, "scales": s, "biases": b}
    q, s = mx.quantize(w.astype(mx.float32), group_size=fmt.group_size, bits=fmt.bits, mode=fmt.kind)[:2]
    return {"weight": q, "scales": s}


# ----------------------------------------------------------------------------- layer
def random_experts(fmt: str, n: int, rows: int, k_in: int, rng: np.random.Generator) -> nn.Module:
    if fmt == "MXFP4":
        w = mx.array(rng.standard_normal((n, rows, k_in), dtype=np.float32) / np.sqrt(k_in))
        q, s = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")[:2]
        from mlx_lm.models.switch_layers import QuantizedSwitchLinear

        m = QuantizedSwitchLinear(k_in, rows, n, bias=False, group_size=32, bits=4, mode="mxfp4")
        m.weight, m.scales = q, s
        return m
    mod = gguf_format(fmt)
    nbytes = k_in // mod.BLOCK_SIZE * mod.BLOCK_BYTES
    blocks = rng.integers(0, 256, size=(n, rows, k_in // mod.BLOCK_SIZE, mod.BLOCK_BYTES),
                          dtype=np.uint8)
    half = np.frombuffer(np.float16(0.01 / np.sqrt(k_in)).tobytes(), np.uint8)
    for off in _SCALE_FIELDS[fmt]:
        blocks[..., off:off + 2] = half
    m = GGUFSwitchLinear(k_in, rows, n, fmt)
    m.weight = mx.array(blocks.reshape(n, rows, nbytes))
    return m


def build_layer(config: ModelConfig, layer: int, recipe: str, dtype, seed: int,
                dense: str = "file", hf: dict | None = None) -> Block:
    """Layer ``layer`` of ``config`` with random weights; ``dense="file"``: each dense projection
    in the format a real ``recipe`` file loads it into (``file_formats``; ``hf``: the config's
    HF dict, by default ``flash_hf`` of its expert counts), ``"bf16"``: in ``dtype``."""
    rng = np.random.default_rng(seed)
    blk = Block(config, layer)
    params = []
    for name, v in tree_flatten(blk.parameters()):
        if "norm" in name and v.ndim == 1:
            a = np.ones(v.shape, np.float32)
        elif "hc_" in name and name.endswith("scale"):
            a = np.ones(v.shape, np.float32)
        else:
            fan = v.shape[-1] if v.ndim > 1 else 1
            a = rng.standard_normal(v.shape, dtype=np.float32) / np.sqrt(fan)
        params.append((name, mx.array(a).astype(mx.float32 if keeps_float32(name) else dtype)))
    blk.update(tree_unflatten(params))
    if dense == "file":
        if hf is None:
            hf = flash_hf(config.n_routed_experts, config.num_experts_per_tok)
        formats = {p: f for p, f in file_formats(hf, layer, recipe).items() if f.kind != "float"}
        packed = {p: quantize_as(_module(blk, p).weight, f) for p, f in formats.items()}
        apply_formats(blk, formats)
        for p, leaves in packed.items():
            m = _module(blk, p)
            for k, v in leaves.items():
                m[k] = v
    elif dense != "bf16":
        raise ValueError(f"dense must be 'file' or 'bf16', not {dense!r}")
    gate_fmt, down_fmt = RECIPES[recipe]
    ex = blk.ffn.experts
    e, d, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    ex.w1 = random_experts(gate_fmt, e, f, d, rng)
    ex.w3 = random_experts(gate_fmt, e, f, d, rng)
    ex.w2 = random_experts(down_fmt, e, d, f, rng)
    # RoPE frequencies are computed once, on the first call; the count starts after that
    mx.eval(blk.parameters(), blk.attn._freqs)
    return blk


def _module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = root[part]
    return root


def synth_state(config: ModelConfig, ratio: int, n_tokens: int, dtype, seed: int) -> LayerCache:
    """The decode state of one layer after ``n_tokens`` tokens (random contents)."""
    rng = np.random.default_rng(seed)

    def rand(shape, dt=mx.float32):
        return mx.array(rng.standard_normal(shape, dtype=np.float32)).astype(dt)

    d = config.head_dim
    cache = LayerCache(ratio)
    cache.offset = n_tokens
    cache.window = rand((1, min(n_tokens, config.sliding_window - 1), d), dtype)
    parts = [(cache.compressor, d)] if ratio else []
    if ratio == 4:
        parts.append((cache.indexer, config.index_head_dim))
    for state, dd in parts:
        width = (2 if ratio == 4 else 1) * dd
        pend = n_tokens % ratio
        state.pending_kv, state.pending_score = rand((1, pend, width)), rand((1, pend, width))
        if ratio == 4:
            state.prev_kv, state.prev_score = rand((1, 4, dd)), rand((1, 4, dd))
        state.append_rows(rand((1, n_tokens // ratio, dd), dtype))
    mx.eval(cache.state)
    return cache


# ----------------------------------------------------------------------------- counting
def graph_nodes(*arrays: mx.array) -> list[str]:
    """The primitive of each node of the lazy graph producing ``arrays`` (evaluated arrays are
    leaves). Counted per node statement, not per node id: the id is the primitive object's,
    which a compiled function shares between its calls of one shape (two HC posts of a layer
    are two launches)."""
    arrays = [a for a in arrays if isinstance(a, mx.array)]
    if not arrays:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "g.dot")
        mx.export_to_dot(path, *arrays)
        return [prim for _, prim in _NODE.findall(Path(path).read_text())]


def kernel_nodes(nodes: list[str]) -> int:
    return sum(1 for prim in nodes if prim.split()[0] not in VIEWS)


class Recorder:
    """Stands in for ``kernels.dispatch.run``: records each launch and returns leaf placeholders."""

    def __init__(self):
        self.launches: list[str] = []
        self.inputs: list[mx.array] = []

    def __call__(self, file, name, inputs, outputs, *, grid, threadgroup, template):
        self.launches.append(name)
        self.inputs += [a for a in inputs.values() if isinstance(a, mx.array)]
        outs = [mx.zeros(shape, dtype=dtype) for shape, dtype in outputs.values()]
        mx.eval(outs)
        return outs


def count_step(blk: Block, cache: LayerCache, dtype, path: str,
               histogram: dict[str, int] | None = None) -> tuple[int, dict[str, int]]:
    """(launches, {launch site: count}) of one decoded token through ``blk`` on ``path``."""
    rng = np.random.default_rng(1)
    h = mx.array(rng.standard_normal((1, 1, 4, blk.config.hidden_size), dtype=np.float32))
    toks = mx.array([[7]])
    # the state as a decode step finds it: evaluated (a snapshot's row copy is not the step's)
    mx.eval(h, toks, [a for a in cache.state if isinstance(a, mx.array)])
    recorder = Recorder()
    segments = [0]
    saved = kernels.dispatch.run, kernels.dispatch.backend, kernels.moe.switch_matmul_ops, ops.on_cpu
    original_switch = kernels.moe.switch_matmul_ops

    def cut_then_switch(x, w, fmt, indices, sorted_indices=False):
        segments[0] += kernel_nodes(graph_nodes(x, indices))  # the twin syncs on the ids here
        mx.eval(x, indices)
        return original_switch(x, w, fmt, indices, sorted_indices)

    rms_norm = mx.fast.rms_norm

    def one_rms_norm(x, weight, eps, **kw):
        # one launch on the GPU; on the CPU MLX expands it into its fallback ops
        recorder.launches.append("rms_norm")
        recorder.inputs += [x] + ([weight] if weight is not None else [])
        out = mx.zeros(x.shape, dtype=x.dtype)
        mx.eval(out)
        return out

    check_mode = os.environ.get("DS4MLX_KERNEL_CHECK")
    try:
        # the recorder's placeholder outputs would fail the first-use check (kernels/check.py)
        # and switch the variant off for the process: the count runs no kernel, so no check
        os.environ["DS4MLX_KERNEL_CHECK"] = "off"
        mx.fast.rms_norm = one_rms_norm
        if path == "metal":
            kernels.dispatch.run, kernels.dispatch.backend = recorder, lambda: "metal"
            ops.on_cpu = lambda: False  # the GPU's graph (one rms_norm, quantized matmuls)
        else:
            kernels.dispatch.backend = lambda: "ops"
            kernels.moe.switch_matmul_ops = cut_then_switch
        # as in the model's loop: the previous layer's last HC post comes in (run by this
        # layer's HC pre kernel), this layer's goes out to the next
        d = blk.config.hidden_size
        pending = (mx.array(rng.standard_normal((1, 1, d), dtype=np.float32)).astype(dtype),
                   mx.ones((1, 1, 4)), mx.full((1, 1, 4, 4), 0.25))
        mx.eval(pending)
        h, pending = blk.deferred(h, toks, cache, dtype, pending)
        nodes = graph_nodes(h, *pending, *cache.state, *recorder.inputs)
    finally:
        kernels.dispatch.run, kernels.dispatch.backend, kernels.moe.switch_matmul_ops, ops.on_cpu = saved
        mx.fast.rms_norm = rms_norm
        if check_mode is None:
            os.environ.pop("DS4MLX_KERNEL_CHECK", None)
        else:
            os.environ["DS4MLX_KERNEL_CHECK"] = check_mode
    if histogram is not None:  # primitive -> count of the graph left between the launches
        for prim in nodes:
            if prim.split()[0] not in VIEWS:
                histogram[prim.split()[0]] = histogram.get(prim.split()[0], 0) + 1
    sites: dict[str, int] = {}
    for name in recorder.launches:
        sites[name] = sites.get(name, 0) + 1
    return len(recorder.launches) + kernel_nodes(nodes) + segments[0], sites


def time_ops_step(blk: Block, cache: LayerCache, dtype, repeat: int) -> float:
    h = mx.array(np.random.default_rng(2).standard_normal((1, 1, 4, blk.config.hidden_size),
                                                          dtype=np.float32))
    best = float("inf")
    chosen = kernels.dispatch.backend()
    kernels.set_backend("ops")
    try:
        for _ in range(repeat):
            c = cache.snapshot()
            t0 = time.perf_counter()
            out = blk(h, mx.array([[7]]), c, dtype)
            mx.eval(out, c.state)
            best = min(best, time.perf_counter() - t0)
    finally:
        kernels.set_backend(chosen)
    return best


# ----------------------------------------------------------------------------- bytes
def expert_bytes(fmt: str, rows: int, k_in: int) -> int:
    if fmt == "MXFP4":
        return rows * (k_in // 2 + k_in // 32)
    mod = gguf_format(fmt)
    return rows * k_in // mod.BLOCK_SIZE * mod.BLOCK_BYTES


def scale_cast_bytes(m: nn.Module, dtype) -> int:
    """Bytes a quantized projection's call moves beyond reading its float scales / biases once
    when they are not in the activation dtype: ``mx.quantized_matmul`` promotes to float32, so
    each call writes them in float32 and the product reads that copy."""
    if not isinstance(m, nn.QuantizedLinear) or decode_kernel_takes(
            m.mode, m.bits, m.group_size, m["scales"].dtype, dtype):
        return 0  # the decode kernel reads them as held (kernels.dense_matvec)
    leaves = [a for a in (m.get("scales"), m.get("biases"))
              if a is not None and mx.issubdtype(a.dtype, mx.floating)]
    if not leaves or all(a.dtype == dtype for a in leaves):
        return 0
    return sum(2 * a.size * 4 for a in leaves)


def weight_bytes(blk: Block, config: ModelConfig, recipe: str, top_k: int,
                 dtype) -> tuple[int, int, int]:
    """(weights every path reads, float32 expert copies the ops twins write and read, the
    per-call scale casts of quantized projections: ``scale_cast_bytes``)."""
    dense = 0
    for name, v in tree_flatten(blk.parameters()):
        if ".experts." in name:
            continue
        dense += v.nbytes * (FLASH_EXPERTS // config.n_routed_experts
                             if name.startswith("ffn.gate.") else 1)
    casts = sum(scale_cast_bytes(m, dtype) for _, m in blk.named_modules())
    gate_fmt, down_fmt = RECIPES[recipe]
    d, f = config.hidden_size, config.moe_intermediate_size
    routed = top_k * (2 * expert_bytes(gate_fmt, f, d) + expert_bytes(down_fmt, d, f))
    copies = 0 if gate_fmt == "MXFP4" else top_k * 3 * f * d * 4 * 2
    return dense + routed, copies, casts


def head_launches(config: ModelConfig, recipe: str, dense: str, dtype) -> int:
    """``HEAD_LAUNCHES`` + the launches of the head's product and the logits' float32 cast on
    the GPU's graph, in the head's format (a few rows: the graph does not depend on them)."""
    fmt = head_format(recipe) if dense == "file" else FLOAT
    d = config.hidden_size
    w = mx.array(np.random.default_rng(0).standard_normal((64, d), dtype=np.float32) / np.sqrt(d))
    head = nn.Linear(d, 64, bias=False)
    head.weight = w.astype(dtype)
    if fmt.kind != "float":
        leaves = quantize_as(w, fmt)
        head = apply_formats({"h": head}, {"h": fmt})["h"]
        for k, v in leaves.items():
            head[k] = v
    x = mx.zeros((1, 1, d), dtype=dtype)
    mx.eval(head.parameters(), x)
    saved = ops.on_cpu, kernels.dispatch.run, kernels.dispatch.backend
    check_mode = os.environ.get("DS4MLX_KERNEL_CHECK")
    recorder = Recorder()
    os.environ["DS4MLX_KERNEL_CHECK"] = "off"  # the recorder's outputs would fail the check
    ops.on_cpu, kernels.dispatch.run, kernels.dispatch.backend = (
        lambda: False, recorder, lambda: "metal")
    try:
        y = head(x).astype(mx.float32)
    finally:
        ops.on_cpu, kernels.dispatch.run, kernels.dispatch.backend = saved
        if check_mode is None:
            os.environ.pop("DS4MLX_KERNEL_CHECK", None)
        else:
            os.environ["DS4MLX_KERNEL_CHECK"] = check_mode
    return HEAD_LAUNCHES + len(recorder.launches) + kernel_nodes(graph_nodes(y))


def head_bytes(config: ModelConfig, recipe: str, dense: str, dtype) -> tuple[int, int]:
    """(head weights as held: the matmul, the final norm, the HC head; its scale casts) of a
    file of ``recipe`` (``head_format``); ``dense="bf16"``: the head in ``dtype``."""
    v, d, b = FLASH_VOCAB, config.hidden_size, dtype.size
    rest = d * b + 4 * 4 * d * 4  # final RMSNorm weight, HC head mixer (float32)
    fmt = head_format(recipe) if dense == "file" else FLOAT
    if fmt.kind != "affine":
        return v * d * b + rest, 0
    groups = v * d // fmt.group_size
    scale_b = 2  # Q8_0's fp16 scales stay fp16 (q8_0.fits_fp16 for any real head)
    kernel = decode_kernel_takes(fmt.kind, fmt.bits, fmt.group_size, mx.float16, dtype)
    casts = 0 if dtype == mx.float16 or kernel else 2 * 2 * groups * 4
    return v * d * fmt.bits // 8 + 2 * groups * scale_b + rest, casts


def state_bytes(config: ModelConfig, ratio: int, n: int, b: int, fused: set[str]) -> dict[str, int]:
    """Bytes of decode state one token reads: the minimum and the path's own (itemised from
    attention.py / compressor.py; ``fused`` names the kernels that serve the path)."""
    d, di, w = config.head_dim, config.index_head_dim, config.sliding_window
    win = (w - 1) * d * b  # carried window rows
    comp = n // ratio * d * b if ratio else 0
    picked = min(config.index_topk, n // 4) * d * b if ratio == 4 else 0
    keys = n // 4 * di * b if ratio == 4 else 0
    heads = config.index_n_heads
    minimum = win + (picked + keys if ratio == 4 else comp)
    # window: the new row is written into the carried buffer in place (state.push_window)
    path = 0
    if "attention" in fused:
        path += win  # the kernel reads the window once, in storage
        path += picked if ratio == 4 else comp
    else:
        f32 = 4 // b  # float32 copy per stored byte
        path += win + 2 * win * f32  # cast, then scores and values read the float32 copy
        if ratio == 128:
            path += comp + 2 * comp * f32
        if ratio == 4:
            path += comp  # every row cast to float32 per call (written, then gathered from)
            path += 3 * picked * 4 // b  # gather reads, scores and values read the gathered copy
    if ratio and "rope_rows" in fused:
        # kernel comp_rows copies the unfinished windows' float32 buffers (the ops write a row
        # in place): [ratio, kv | score] per compressor
        widths = [2 * (2 if ratio == 4 else 1) * d] + ([2 * 2 * di] if ratio == 4 else [])
        path += ratio * sum(widths) * 4
    if ratio == 4:
        if "indexer" in fused:
            path += keys
        else:
            scores = heads * (n // 4) * 4
            path += keys + keys * 4 // b + 3 * scores + 2 * (n // 4) * 4  # cast, ReLU·w·Σ, top-k
    return {"min": minimum, "path": path}


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--contexts", nargs="+", type=int, default=[2048, 32768, 131072])
    parser.add_argument("--ratios", nargs="+", type=int, default=[0, 4, 128], choices=[0, 4, 128],
                        help="layer kinds to measure (the whole-model figures need all three)")
    parser.add_argument("--experts", type=int, default=8, help="experts built per layer")
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--dense", default="file", choices=["file", "bf16"],
                        help="dense projections as a real file of the format loads them (file), or "
                             "all in the activation dtype (bf16: the build before real formats)")
    parser.add_argument("--repeat", type=int, default=2, help="ops-path timings (best of)")
    parser.add_argument("--no-time", action="store_true", help="skip the ops-path CPU timing")
    parser.add_argument("--no-ops", action="store_true",
                        help="skip the ops path (its launch count evaluates the layer up to the "
                             "router on the CPU) and its timing")
    parser.add_argument("--primitives", action="store_true",
                        help="print the MLX primitives left on the Metal path, per layer")
    parser.add_argument("--launch-us", type=float, default=5.0, help="assumed cost per launch")
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)
    b = dtype.size
    hf = flash_hf(args.experts, args.top_k)
    config = ModelConfig.from_hf(hf)
    decode_variants = [v for v in DECODE_VARIANTS if v in getattr(kernels, "NAMED_VARIANTS", ())]
    print(f"Flash decode step per layer, {args.dtype} activations, top-{args.top_k}, dense "
          f"projections {'as real files load them' if args.dense == 'file' else 'in ' + args.dtype}. Metal "
          f"path 'before': the decode kernels {decode_variants} switched off; 'after': on.")
    print(f"{'ratio':>5} {'fmt':>6} {'ctx':>7} {'launches before':>15} {'after':>5} {'ops':>4} "
          f"{'MiB before':>10} {'after':>7} {'min':>7} {'x min before':>12} {'after':>6} "
          f"{'ops CPU ms':>10}  kernel launches (after)")
    rows = []
    for recipe in args.formats:
        for layer, ratio in enumerate((0, 4, 128)):
            if ratio not in args.ratios:
                continue
            blk = build_layer(config, layer, recipe, dtype, seed=layer, dense=args.dense, hf=hf)
            weights, copies, casts = weight_bytes(blk, config, recipe, args.top_k, dtype)
            for n in args.contexts:
                cache = synth_state(config, ratio, n, dtype, seed=n)
                for v in decode_variants:
                    kernels.disable(v, "decode_profile: the path before the decode kernels")
                count_step(blk, cache.snapshot(), dtype, "metal")  # traces mx.compile functions
                before, _ = count_step(blk, cache.snapshot(), dtype, "metal")
                for v in decode_variants:
                    kernels.enable(v)
                count_step(blk, cache.snapshot(), dtype, "metal")
                prims: dict[str, int] = {}
                after, sites = count_step(blk, cache.snapshot(), dtype, "metal", prims)
                ops = -1 if args.no_ops else count_step(blk, cache.snapshot(), dtype, "ops")[0]
                fused = {"attention", "indexer", "rope_rows"} & set(decode_variants)
                sb_after = state_bytes(config, ratio, n, b, fused)
                sb_before = state_bytes(config, ratio, n, b, set())
                minimum = weights + sb_after["min"]
                read_before = weights + casts + sb_before["path"]
                read_after = weights + casts + sb_after["path"]
                timed = not (args.no_time or args.no_ops)
                ms = 1e3 * time_ops_step(blk, cache, dtype, args.repeat) if timed else float("nan")
                rows.append(dict(ratio=ratio, fmt=recipe, ctx=n, before=before, launches=after, casts=casts,
                                 ops_launches=ops, bytes_before=read_before, bytes=read_after,
                                 min=minimum, ops_bytes=read_before + copies, cpu_ms=ms))
                mib = 2.0**20
                print(f"{ratio:>5} {recipe:>6} {n:>7} {before:>15} {after:>5} {ops:>4} "
                      f"{read_before / mib:>10.1f} {read_after / mib:>7.1f} {minimum / mib:>7.1f} "
                      f"{read_before / minimum:>12.3f} {read_after / minimum:>6.3f} "
                      f"{ms:>10.1f}  {sites}", flush=True)
                if args.primitives:
                    print("        primitives:", dict(sorted(prims.items(), key=lambda kv: -kv[1])))
            del blk
    worst = max(rows, key=lambda r: r["launches"])
    if set(args.ratios) != {0, 4, 128}:
        print(json.dumps({"launches_per_layer_max": worst["launches"],
                          "launches_per_layer_max_at": f"ratio {worst['ratio']} {worst['fmt']} ctx {worst['ctx']}"}))
        return
    # whole model
    kinds = default_compress_ratios(FLASH_LAYERS, 0)
    per_kind = {r: kinds.count(r) for r in (0, 4, 128)}
    summary = {}
    print(f"\nWhole model ({FLASH_LAYERS} layers: {per_kind}), {args.launch_us:g} us per launch:")
    gb_per_token = {}
    for recipe in args.formats:
        head_w, head_casts = head_bytes(config, recipe, args.dense, dtype)
        head = head_w + head_casts
        head_n = head_launches(config, recipe, args.dense, dtype)
        print(f"  {recipe}: head {head_w / 2**20:.0f} MiB (+ {head_casts / 2**20:.0f} MiB of scale "
              f"casts), {head_n} launches with the embedding, HC head and final norm")
        for n in args.contexts:
            sel = {r["ratio"]: r for r in rows if r["fmt"] == recipe and r["ctx"] == n}
            for when, lk, bk in (("before", "before", "bytes_before"),
                                 ("after", "launches", "bytes")):
                launches = sum(per_kind[r] * sel[r][lk] for r in per_kind) + head_n
                nbytes = sum(per_kind[r] * sel[r][bk] for r in per_kind) + head
                tps = {dev: 1.0 / (nbytes / bw + launches * args.launch_us * 1e-6)
                       for dev, bw in DEVICES.items()}
                summary[(when, recipe, n)] = dict(launches=launches, bytes=nbytes, **tps)
                if when == "after" and n == min(args.contexts):
                    casts = sum(per_kind[r] * sel[r]["casts"] for r in per_kind) + head_casts
                    gb_per_token[recipe] = dict(ctx=n, read=round(nbytes / 1e9, 3),
                                                scale_casts=round(casts / 1e9, 3))
                print(f"  {when:>6} {recipe:>6} ctx {n:>7}: {launches:>6} launches, "
                      f"{nbytes / 2**30:6.2f} GiB, M3 Ultra {tps['m3_ultra']:5.1f} t/s, M3 Max "
                      f"{tps['m3_max']:5.1f} t/s (bandwidth only: {819e9 / nbytes:5.1f} / "
                      f"{400e9 / nbytes:5.1f})")

    def over_min(ctx):
        sel = [r["bytes"] / r["min"] for r in rows if r["ctx"] == ctx]
        return round(max(sel), 4) if sel else None

    def ctx_ratio():
        lo, hi = min(args.contexts), max(args.contexts)
        vals = [summary[("after", f, hi)]["bytes"] / summary[("after", f, lo)]["bytes"]
                for f in args.formats]
        return round(max(vals), 4)

    result = {
        "launches_per_layer_max": worst["launches"],
        "launches_per_layer_max_at": f"ratio {worst['ratio']} {worst['fmt']} ctx {worst['ctx']}",
        "launches_per_layer_max_by_format": {f: max(r["launches"] for r in rows if r["fmt"] == f)
                                             for f in args.formats},
        "launches_per_layer_max_before": max(r["before"] for r in rows),
        "ops_launches_per_layer_max": max(r["ops_launches"] for r in rows),
        "bytes_over_min_2k": over_min(2048),
        "bytes_over_min_32k": over_min(32768),
        "bytes_128k_over_2k": ctx_ratio() if {2048, 131072} <= set(args.contexts) else None,
        "tokens_per_s_m3_ultra": round(min(s["m3_ultra"] for k, s in summary.items()
                                           if k[0] == "after"), 2),
        "tokens_per_s_m3_max": round(min(s["m3_max"] for k, s in summary.items()
                                         if k[0] == "after"), 2),
        "tokens_per_s_m3_ultra_before": round(min(s["m3_ultra"] for k, s in summary.items()
                                                  if k[0] == "before"), 2),
        "launch_us": args.launch_us,
        "dense": args.dense,
        "gb_per_token": gb_per_token,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

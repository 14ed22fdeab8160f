"""Bad input, end to end: damaged files, bad values and interruptions, each answered with one
line naming the file, tensor, key or value at fault, a non-zero exit status, no traceback, no
death by signal, no process left behind, nothing that looks like a finished output, and the
source untouched.

Damaged inputs are made from the demo model (a tiny official-format checkpoint with a
tokenizer) and a GGUF converted from it, patched byte by byte in temporary directories. The CLI
runs in this process (``ds4mlx.cli.main``) where the process itself is not what is tested, and
as ``python -m ds4mlx`` where it is (argv bytes, signals, worker processes)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from damage import (GGUF_NAME, cli_process, finish, gguf_copy, gguf_poke, gguf_rewrite, gguf_set, gguf_set_type,
                    model_copy, one_line, overlap, poke, run, shard_of, tree_digest)


@pytest.fixture(scope="module")
def good_gguf(demo_dir, tmp_path_factory):
    """The demo model as a lossless GGUF (mxfp4 preset) with its tokenizer."""
    from ds4mlx.convert import convert

    return convert(demo_dir, tmp_path_factory.mktemp("gguf") / GGUF_NAME, to="gguf", preset="mxfp4",
                   progress=False, jobs=1)


# ----------------------------------------------------------------------------- config.json


CONFIG_CASES = [
    # (what config.json holds, words the message must contain)
    ("null", ["is null, expected a JSON object"]),
    ("[1, 2]", ["is an array, expected a JSON object"]),
    ({"hidden_size": None}, ["hidden_size is null"]),
    ({"num_hidden_layers": "5"}, ['num_hidden_layers is "5"']),
    ({"num_hidden_layers": -1}, ["num_hidden_layers is -1"]),
    ({"rms_norm_eps": -1e-6}, ["rms_norm_eps is -1e-06"]),
    ({"max_position_embeddings": 0}, ["max_position_embeddings is 0"]),
    ({"sliding_window": -128}, ["sliding_window is -128"]),
    ({"vocab_size": 1.5}, ["vocab_size is 1.5"]),
    ({"compress_ratios": "4"}, ["compress_ratios"]),
    ({"rope_scaling": [1]}, ["rope_scaling is [1]"]),
]


@pytest.mark.parametrize("change,needles", CONFIG_CASES, ids=[str(c)[:40] for c, _ in CONFIG_CASES])
def test_bad_config_values(change, needles, demo_dir, tmp_path, capsys, monkeypatch):
    model = model_copy(demo_dir, tmp_path / "m")
    config = model / "config.json"
    if isinstance(change, str):
        config.write_text(change)
    else:
        config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    before = tree_digest(model)
    for args in (["generate", "-m", model, "-p", "hi"], ["info", model]):
        one_line(*run(capsys, monkeypatch, *args), str(config), *needles)
    assert tree_digest(model) == before


# ----------------------------------------------------------------------------- safetensors weights

NAN_BF16, INF_BF16, INF_F32 = b"\xc0\x7f", b"\x80\x7f", b"\x00\x00\x80\x7f"

WEIGHT_CASES = [
    # (tensor, byte offset, bytes written, what the message names)
    ("layers.1.attn_norm.weight", 6, NAN_BF16, "layers.1.attn_norm.weight"),
    ("embed.weight", 1000, INF_BF16, "embed.weight"),
    ("layers.2.hc_ffn_fn", 40, INF_F32, "layers.2.hc_ffn_fn"),
    ("layers.0.attn.wq_a.weight", 17, b"\x7f", "layers.0.attn.wq_a.weight"),  # FP8 E4M3 NaN code
    ("layers.3.attn.wo_b.scale", 1, b"\xff", "layers.3.attn.wo_b"),  # E8M0 NaN scale
    ("layers.4.ffn.experts.5.w2.scale", 9, b"\xff", "layers.4.ffn.experts"),  # expert E8M0 NaN scale
]


@pytest.mark.parametrize("tensor,at,data,named", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_non_finite_weights_refused_at_load(tensor, at, data, named, demo_dir, tmp_path, capsys, monkeypatch):
    model = model_copy(demo_dir, tmp_path / "m", real=(shard_of(demo_dir, tensor).name,))
    poke(model, tensor, at, data)
    before = tree_digest(model)
    line = one_line(*run(capsys, monkeypatch, "generate", "-m", model, "-p", "hi", "--max-tokens", "2"),
                    str(model), named, "NaN or Inf")
    assert tree_digest(model) == before, line


@pytest.mark.parametrize("to,tensor,at,data", [
    ("mlx", "layers.1.attn_norm.weight", 6, NAN_BF16),
    ("gguf", "layers.4.ffn.experts.5.w2.scale", 9, b"\xff"),  # read by a conversion thread (--jobs 2)
])
def test_convert_refuses_non_finite_source(to, tensor, at, data, demo_dir, tmp_path, capsys, monkeypatch):
    model = model_copy(demo_dir, tmp_path / "m", real=(shard_of(demo_dir, tensor).name,))
    poke(model, tensor, at, data)
    before = tree_digest(model)
    out = tmp_path / ("out.gguf" if to == "gguf" else "out")
    extra = ["--to", "gguf", "--preset", "ds4-q4", "--jobs", "2"] if to == "gguf" else []
    one_line(*run(capsys, monkeypatch, "convert", model, out, *extra), shard_of(model, tensor).name,
             repr(tensor), "NaN or Inf")
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert tree_digest(model) == before
    import multiprocessing

    assert not multiprocessing.active_children()  # the workers were stopped with the error


def test_nan_logits_stop_before_any_text(demo_dir, tmp_path):
    """With the load check off, damaged weights still never become text: generation stops at
    the first NaN logits."""
    import mlx.core as mx

    import ds4mlx
    from ds4mlx.generate import NonFiniteLogitsError

    model = model_copy(demo_dir, tmp_path / "m", real=(shard_of(demo_dir, "norm.weight").name,))
    poke(model, "norm.weight", 0, NAN_BF16)
    loaded, tokenizer = ds4mlx.load(model, dtype=mx.float32, check_finite=False)
    texts = []
    with pytest.raises(NonFiniteLogitsError, match="NaN or Inf logits at generated token 1"):
        for response in ds4mlx.stream_generate(loaded, tokenizer, "hi", max_tokens=3):
            texts.append(response.text)
    assert texts == []


def test_overlapping_safetensors_offsets(demo_dir, tmp_path, capsys, monkeypatch):
    a, b = "layers.0.hc_attn_fn", "layers.0.hc_attn_base"
    model = model_copy(demo_dir, tmp_path / "m", real=(shard_of(demo_dir, a).name,))
    overlap(model, a, b)
    before = tree_digest(model)
    one_line(*run(capsys, monkeypatch, "generate", "-m", model, "-p", "hi"),
             shard_of(model, a).name, repr(b), repr(a), "overlap")
    out = tmp_path / "out"
    one_line(*run(capsys, monkeypatch, "convert", model, out), shard_of(model, a).name, "overlap")
    assert not out.exists() and not out.with_name("out.partial").exists()
    assert tree_digest(model) == before


# ----------------------------------------------------------------------------- GGUF files


def _mxfp4_scale_nan(path: Path) -> None:
    gguf_poke(path, "blk.3.ffn_down_exps.weight", 17 * 5, b"\xff")  # the E8M0 byte of block 5


GGUF_CASES = [
    # (damage, words the message must contain)
    (lambda p: gguf_set(p, "deepseek4.block_count", 4), ["deepseek4.block_count is 4", "blk.0..blk.4"]),
    (lambda p: gguf_set(p, "deepseek4.expert_used_count", 0), ["deepseek4.expert_used_count is 0"]),
    (lambda p: gguf_set_type(p, "blk.2.attn_norm.weight", 99), ["'blk.2.attn_norm.weight'", "type id 99"]),
    (lambda p: gguf_poke(p, "blk.1.ffn_norm.weight", 8, INF_F32), ["'blk.1.ffn_norm.weight'", "NaN or Inf"]),
    (lambda p: gguf_poke(p, "token_embd.weight", 512, NAN_BF16), ["'token_embd.weight'", "NaN or Inf"]),
    (_mxfp4_scale_nan, ["blk.3.ffn_down_exps", "NaN or Inf"]),
    (lambda p: gguf_set(p, "deepseek4.attention.layer_norm_rms_epsilon", math.nan),
     ["deepseek4.attention.layer_norm_rms_epsilon is NaN"]),
    (lambda p: gguf_set(p, "deepseek4.context_length", 0), ["deepseek4.context_length is 0"]),
]


@pytest.mark.parametrize("damage,needles", GGUF_CASES,
                         ids=["block_count", "expert_used_count", "type_id", "inf_f32", "nan_bf16", "nan_mxfp4",
                              "nan_eps", "zero_context"])
def test_damaged_gguf(damage, needles, good_gguf, tmp_path, capsys, monkeypatch):
    path = gguf_copy(good_gguf, tmp_path / GGUF_NAME)
    damage(path)
    before = tree_digest(path)
    one_line(*run(capsys, monkeypatch, "generate", "-m", path, "-p", "hi", "--max-tokens", "2"),
             str(path), *needles)
    if "NaN or Inf" not in needles:  # metadata and tables: info (which reads no weights) refuses too
        one_line(*run(capsys, monkeypatch, "info", path), str(path), *needles)
    assert tree_digest(path) == before


def test_nan_scale_in_a_packed_gguf_block(good_gguf, tmp_path, capsys, monkeypatch):
    """GGUF block types the model keeps packed (K-quants, IQ2_XXS) are checked by their fp16
    block scales at load."""
    from ds4mlx.quant.gguf import q4_k

    name = "blk.3.ffn_gate_exps.weight"
    path = gguf_rewrite(good_gguf, tmp_path / "q4k.gguf", retype={name: "Q4_K"})
    rows = 256  # moe_intermediate_size: one Q4_K block per row of 256 inputs
    gguf_poke(path, name, 2 * rows * q4_k.BLOCK_BYTES + 1, b"\x7c")  # expert 2, block 0: d = Inf/NaN
    before = tree_digest(path)
    one_line(*run(capsys, monkeypatch, "generate", "-m", path, "-p", "hi", "--max-tokens", "2"),
             str(path), repr(name), "expert 2", "1 blocks with a NaN or Inf scale")
    assert tree_digest(path) == before


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "Q8_0"])
def test_block_scale_check_agrees_with_gguf_py(qtype):
    """A block is flagged exactly when gguf-py's dequantization of it holds NaN or Inf."""
    import mlx.core as mx
    from gguf import GGMLQuantizationType
    from gguf import quants as gq

    from ds4mlx.quant import gguf as qgguf

    fmt = qgguf.get(qtype)
    n_blocks = 512
    blocks = np.random.default_rng(1).integers(0, 256, (n_blocks, fmt.BLOCK_BYTES), dtype=np.uint8)
    for at in fmt.SCALE_FIELDS:  # keep most scales small and finite, break a known few
        blocks[:, at + 1] &= 0x3B
        blocks[at::17, at + 1] = 0x7C | (blocks[at::17, at + 1] & 0x83)
    with np.errstate(all="ignore"):
        values = gq.dequantize(blocks, GGMLQuantizationType[qtype]).reshape(n_blocks, -1)
    expected = ~np.isfinite(values).all(axis=1)
    got = np.array(qgguf.non_finite_scales(fmt, mx.array(blocks.reshape(1, -1)))).reshape(-1)
    assert expected.any() and not expected.all()
    assert np.array_equal(got, expected)
    assert qgguf.count_non_finite_scales(fmt, blocks.reshape(1, -1)) == expected.sum()  # the numpy twin


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F8_E4M3", "F8_E5M2", "F8_E8M0"])
def test_non_finite_count_agrees_with_torch(dtype):
    """The conversions' NaN/Inf count of stored bits (block by block, a block passed over when
    its maxima say it holds none) is torch's count of the same bits as floats: random bits with
    the hits of both signs planted sparsely (in a few blocks only), densely, and none at all."""
    import torch

    from ds4mlx.convert.plan import F16_NON_FINITE_MASK, _NON_FINITE_MASK, count_bits

    as_torch = {"BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn,
                "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu}[dtype]
    mask = F16_NON_FINITE_MASK if dtype == "F16" else _NON_FINITE_MASK[dtype]
    bits = np.uint16 if dtype in ("BF16", "F16") else np.uint8
    rng = np.random.default_rng(3)
    n = (3 << 18) + 12345  # several blocks of the check and a part of one
    raw = rng.integers(0, np.iinfo(bits).max + 1, n, dtype=bits)
    torch_bits = torch.int16 if bits is np.uint16 else torch.uint8

    def reference(x: np.ndarray) -> int:
        floats = torch.from_numpy(x.view(np.int16) if bits is np.uint16 else x).view(torch_bits).view(as_torch)
        return int((~torch.isfinite(floats.float())).sum())

    assert count_bits(raw, mask) == reference(raw) > 1000  # dense
    clean = raw.copy()
    clean[(clean & mask) == mask] &= ~np.array(1 << (mask.bit_length() - 1), bits)  # every hit made finite
    assert count_bits(clean, mask) == reference(clean) == 0
    sparse = clean.copy()
    top = np.array(1 << (8 * sparse.itemsize - 1), bits)
    for k, at in enumerate((5, (1 << 18) + 7, n - 1)):  # one positive, one negative, one at the end
        sparse[at] = mask | (top if k % 2 else 0)
    assert count_bits(sparse, mask) == reference(sparse) == 3


def test_convert_refuses_values_its_types_cannot_hold(demo_dir, tmp_path, capsys, monkeypatch):
    """A finite source whose values overflow the output type (an expert scaled by 2^65: FP4
    values ~2e20, past the fp16 scales of Q4_K) fails naming the tensor, and writes nothing,
    instead of a file with NaN/Inf blocks."""
    tensor = "layers.4.ffn.experts.5.w2.scale"
    model = model_copy(demo_dir, tmp_path / "m", real=(shard_of(demo_dir, tensor).name,))
    poke(model, tensor, 9, bytes([127 + 65]))  # one E8M0 scale: 2^65
    before = tree_digest(model)
    out = tmp_path / "out.gguf"
    one_line(*run(capsys, monkeypatch, "convert", model, out, "--to", "gguf", "--preset", "ds4-q4", "--jobs", "2"),
             "layers.4.ffn.experts.5.w2", "1 Q4_K block NaN or Inf", f"largest |value| {6 * 2.0**65:.3g}")
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert tree_digest(model) == before


def test_f16_output_overflow_is_refused():
    """F16 output of values past 65504 (finite in the BF16 source) is refused, not written as Inf."""
    from ds4mlx.convert import gguf_jobs
    from ds4mlx.quant import gguf as qgguf

    x = np.tile(np.array([1.0, 7e4, -1e6, 65504.0], np.float32), (4, 64))  # 2 of every 4 overflow
    job = gguf_jobs.EncodeJob("F16", None, None, None, "t.weight")
    f16 = qgguf.get("F16")
    with pytest.raises(gguf_jobs.ConvertError, match=r"t.weight: 512 F16 values NaN or Inf .*largest \|value\| 1e\+06"):
        gguf_jobs._finite(job, f16, f16.quantize(x), lambda: x)
    assert gguf_jobs._finite(job, f16, f16.quantize(x[:, :1]), lambda: x) is not None


def test_gguf_tokenizer_larger_than_vocabulary(good_gguf, demo_dir, tmp_path, capsys, monkeypatch):
    import ds4mlx

    path = gguf_rewrite(good_gguf, tmp_path / "big-vocab.gguf", extra_tokens=6)
    needles = ["big-vocab.gguf", "tokenizer.ggml.tokens has 1030 tokens", "vocab_size is 1024"]
    one_line(*run(capsys, monkeypatch, "generate", "-m", path, "-p", "hi"), *needles)
    with pytest.raises(ValueError, match="1030 tokens"):
        ds4mlx.load(path)
    # the same tokenizer in a source checkpoint is refused by convert, before anything is written
    src = model_copy(demo_dir, tmp_path / "src")
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["added_tokens"].append({**tok["added_tokens"][-1], "id": 1029, "content": "<extra>"})
    (src / "tokenizer.json").write_text(json.dumps(tok))
    before = tree_digest(src)
    out = tmp_path / "out.gguf"
    one_line(*run(capsys, monkeypatch, "convert", src, out, "--to", "gguf", "--preset", "mxfp4"),
             "tokenizer.json", "1030", "1024")
    assert not out.exists() and not out.with_name("out.gguf.partial").exists()
    assert tree_digest(src) == before


# ----------------------------------------------------------------------------- prompts and settings


def test_token_ids_and_settings_through_the_api(demo):
    from ds4mlx import generate
    from ds4mlx.generate import PromptError, stream_generate

    model, tokenizer = demo
    vocab = model.config.vocab_size
    for ids, named in (([0, 5, vocab], f"token id {vocab} at position 2"), ([0, -1], "token id -1 at position 1"),
                       ([0, 2.5], "2.5")):
        with pytest.raises(PromptError, match=named):
            generate(model, tokenizer, ids, max_tokens=2)
    import mlx.core as mx

    with pytest.raises(PromptError, match="float32"):
        generate(model, tokenizer, mx.array([1.0, 2.0]), max_tokens=2)
    with pytest.raises(PromptError, match="lone surrogate U\\+D800"):
        generate(model, tokenizer, "hi \ud800", max_tokens=2)
    for setting, value in (("temp", math.nan), ("temp", math.inf), ("top_p", math.nan), ("min_p", math.inf),
                           ("seed", -1), ("top_k", -3)):
        with pytest.raises(ValueError, match=f"{setting} .*{value}"):
            next(stream_generate(model, tokenizer, [0, 5], max_tokens=2, **{setting: value}))


SETTING_CASES = [
    (["--temp", "inf"], "temp must be a finite number >= 0, got inf"),
    (["--temp", "nan"], "--temp"),
    (["--top-p", "nan"], "--top-p"),
    (["--min-p", "nan"], "--min-p"),
    (["--seed", "-1"], "seed must be an integer in 0..18446744073709551615, got -1"),
    (["--seed", str(2**64)], "seed"),
    (["--ctx", "0"], "--ctx"),
    (["--system", "be \udcff"], "--system is not valid UTF-8 text: invalid UTF-8 byte 0xff"),
]


@pytest.mark.parametrize("extra,needle", SETTING_CASES, ids=[" ".join(a) for a, _ in SETTING_CASES])
def test_bad_settings_fail_before_loading(extra, needle, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "not-loaded"  # never reached: the settings are checked first
    for command in (["generate", "-m", missing, "-p", "hi"], ["chat", "-m", missing]):
        code, out, err = run(capsys, monkeypatch, *command, *extra)
        one_line(code, out, err, needle)
        assert "Loading" not in err


def test_invalid_utf8_prompts(demo, capsys, monkeypatch):
    bad = b"caf\xc3 \xff\n"
    one_line(*run(capsys, monkeypatch, "generate", "-m", "demo", "-p", bad.decode("utf-8", "surrogateescape")),
             "--prompt is not valid UTF-8 text", "0xc3")
    one_line(*run(capsys, monkeypatch, "generate", "-m", "demo", "-p", "-", stdin=bad),
             "the prompt on standard input is not valid UTF-8 text", "0xc3")
    one_line(*run(capsys, monkeypatch, "chat", "-m", "demo", "--temp", "0", "--max-tokens", "2", stdin=bad),
             "is not valid UTF-8 text", "0xc3")


def test_invalid_utf8_argv_and_stdin_in_a_process():
    proc = cli_process("generate", "-m", "demo", "-p", os.fsdecode(b"\xff\xfe hi"))
    code, out, err = finish(proc)
    one_line(code, out, err, "--prompt is not valid UTF-8 text: invalid UTF-8 byte 0xff at character 0")
    proc = cli_process("generate", "-m", "demo", "-p", "-", stdin=subprocess.PIPE)
    out, err = proc.communicate(b"\x80abc", timeout=120)
    one_line(proc.returncode, out.decode(), err.decode(), "standard input is not valid UTF-8 text", "0x80")


def test_context_cap_is_said_and_the_advice_fits(demo, capsys, monkeypatch):
    limit = demo[0].config.max_position_embeddings
    code, out, err = run(capsys, monkeypatch, "generate", "-m", "demo", "-p", "word " * (limit + 200),
                         "--ctx", str(4 * limit))
    line = one_line(code, out, err, f"more than the context of {limit} tokens")
    assert f"note: --ctx {4 * limit} is more than this model's maximum context" in err
    assert "raise --ctx" not in line and str(limit) in line


# ----------------------------------------------------------------------------- pre-tokenizer


def _escaped(pattern: str) -> str:
    return pattern.replace("\r", "\\r").replace("\n", "\\n").replace('"', '\\"')


def test_pre_tokenizer_compared_by_meaning(demo_dir, tmp_path, capsys, monkeypatch):
    from ds4mlx.tokenizer import PRETOKENIZER_REGEXES, TokenizerFormatError, gguf_tokenizer_fields

    original = json.loads((demo_dir / "tokenizer.json").read_text())
    splits = [s for s in original["pre_tokenizer"]["pretokenizers"] if s.get("type") == "Split"]
    assert [s["pattern"]["Regex"] for s in splits] == list(PRETOKENIZER_REGEXES)
    assert any(_escaped(p) != p for p in PRETOKENIZER_REGEXES)

    def variant(name, edit):
        data = json.loads(json.dumps(original))
        for s in data["pre_tokenizer"]["pretokenizers"]:
            if s.get("type") == "Split":
                s["pattern"]["Regex"] = edit(s["pattern"]["Regex"])
        path = tmp_path / name / "tokenizer.json"
        path.parent.mkdir()
        path.write_text(json.dumps(data))
        return path

    expected = gguf_tokenizer_fields(demo_dir / "tokenizer.json")
    assert gguf_tokenizer_fields(variant("escaped", _escaped)) == expected
    different = variant("different", lambda p: p.replace("{1,3}", "{1,4}"))
    with pytest.raises(TokenizerFormatError, match="pre-tokenizer is not DeepSeek V4's"):
        gguf_tokenizer_fields(different)
    src = model_copy(demo_dir, tmp_path / "src")
    shutil.copy(different, src / "tokenizer.json")
    before = tree_digest(src)
    out = tmp_path / "out.gguf"
    one_line(*run(capsys, monkeypatch, "convert", src, out, "--to", "gguf"), str(src / "tokenizer.json"),
             "pre-tokenizer")
    assert not out.exists() and not out.with_name("out.gguf.partial").exists() and tree_digest(src) == before


# ----------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("to", ["mlx", "gguf"])
def test_disk_full_names_the_path(to, demo_dir, tmp_path, capsys, monkeypatch):
    from ds4mlx.io import mlx_dir

    real, written = mlx_dir.write_bytes, [0]

    def write(f, data):
        if written[0] + len(data) > 3 << 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += len(data)
        real(f, data)

    monkeypatch.setattr(mlx_dir, "write_bytes", write)
    before = tree_digest(demo_dir)
    out = tmp_path / ("out.gguf" if to == "gguf" else "out")
    extra = ["--to", "gguf", "--preset", "mxfp4", "--jobs", "1"] if to == "gguf" else []
    partial = out.with_name(out.name + ".partial")
    one_line(*run(capsys, monkeypatch, "convert", demo_dir, out, *extra), str(partial), "disk full")
    assert not out.exists()
    assert not partial.exists() or not (partial / "config.json").exists()
    assert tree_digest(demo_dir) == before


@pytest.mark.slow
def test_file_size_limit_while_writing_an_mlx_dir(demo_dir, tmp_path):
    """A real write failure (``ulimit -f``: EFBIG from the kernel, no monkeypatching) names the
    output path; nothing that looks complete is left."""
    import resource

    limit = 4 << 20
    out = tmp_path / "out"
    before = tree_digest(demo_dir)
    proc = cli_process("convert", demo_dir, out,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    code, out_text, err = finish(proc)
    assert code != -signal.SIGXFSZ
    one_line(code, out_text, err, f"{out}.partial", "largest file", "nothing was kept")
    assert sorted(tmp_path.iterdir()) == []
    assert tree_digest(demo_dir) == before

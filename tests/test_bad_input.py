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
import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ds4mlx.cli import main

ROOT = Path(__file__).resolve().parents[1]
ERROR = "ds4mlx: error:"


# ----------------------------------------------------------------------------- helpers


def run(capsys, monkeypatch, *args, stdin: bytes | None = None) -> tuple[int, str, str]:
    """The CLI in this process: ``(exit status, stdout, stderr)``."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, out: str, err: str, *needles: str, status: int = 1) -> str:
    """Assert the answer to bad input: ``status``, no traceback, nothing on stdout (no answer
    that looks complete), exactly one error line, last on stderr, holding every needle."""
    assert code == status, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert out == "", out
    errors = [line for line in err.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or the file itself) -> SHA-256 of its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def cli_process(*args, **kw) -> subprocess.Popen:
    """``python -m ds4mlx ARGS`` in a session of its own (so what it leaves behind can be found)."""
    return subprocess.Popen([sys.executable, "-m", "ds4mlx", *map(os.fsencode, map(str, args))],
                            env=env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Linux /proc, else ``ps``), zombies excluded."""
    pids = []
    if Path("/proc/self/stat").exists():
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(stat.parent.name))
        return pids
    ps = subprocess.run(["ps", "-A", "-o", "pid=,sess=,stat="], capture_output=True, text=True).stdout
    return [int(p) for p, s, st in (line.split()[:3] for line in ps.splitlines()) if int(s) == sid
            and not st.startswith("Z")]


def assert_none_left(sid: int, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while (left := session_members(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left running: {left}"


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    """Wait for the process and its pipes (a survivor holding them open would hang here)."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# ----------------------------------------------------------------------------- damaged files


def model_copy(src: Path, dst: Path, *, real: tuple[str, ...] = ()) -> Path:
    """``src`` as a new directory: the files named in ``real`` (and the small ones) copied, the
    other weight shards linked (they stay read-only: the source check covers them)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors" and f.name not in real:
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy2(f, dst / f.name)
    return dst


def st_header(shard: Path) -> tuple[dict, int]:
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), 8 + n


def shard_of(model: Path, tensor: str) -> Path:
    return model / json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def poke(model: Path, tensor: str, at: int, data: bytes) -> None:
    """Overwrite bytes ``at`` of ``tensor``'s data in its shard."""
    shard = shard_of(model, tensor)
    header, start = st_header(shard)
    begin = start + header[tensor]["data_offsets"][0]
    with open(shard, "r+b") as f:
        f.seek(begin + at)
        f.write(data)


def overlap(model: Path, a: str, b: str) -> None:
    """Rewrite the shard header so tensor ``b``'s data starts inside tensor ``a``'s."""
    shard = shard_of(model, a)
    raw = shard.read_bytes()
    header, start = st_header(shard)
    (a0, a1), (b0, b1) = header[a]["data_offsets"], header[b]["data_offsets"]
    assert b1 - b0 <= a1 - a0
    header[b]["data_offsets"] = [a0 + 2, a0 + 2 + (b1 - b0)]
    text = json.dumps(header).encode()
    shard.write_bytes(len(text).to_bytes(8, "little") + text + raw[start:])


GGUF_NAME = "demo.gguf"


@pytest.fixture(scope="module")
def good_gguf(demo_dir, tmp_path_factory):
    """The demo model as a lossless GGUF (mxfp4 preset) with its tokenizer."""
    from ds4mlx.convert import convert

    return convert(demo_dir, tmp_path_factory.mktemp("gguf") / GGUF_NAME, to="gguf", preset="mxfp4",
                   progress=False, jobs=1)


def gguf_copy(good: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(good, dst)
    return dst


def gguf_set(path: Path, key: str, value) -> None:
    """Change a scalar metadata value in place (gguf-py's reader, opened for writing)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][0] = value
    reader.data.flush()
    del reader


def gguf_set_type(path: Path, tensor: str, type_id: int) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    (t,) = [t for t in reader.tensors if t.name == tensor]
    t.field.parts[-2][0] = type_id  # parts: name length, name, n_dims, dims, type, offset
    reader.data.flush()
    del reader


def gguf_poke(path: Path, tensor: str, at: int, data: bytes) -> None:
    from ds4mlx.io.gguf_file import open_gguf

    with open_gguf(path) as g:
        offset = g.info(tensor).offset
    with open(path, "r+b") as f:
        f.seek(offset + at)
        f.write(data)


def gguf_rewrite(good: Path, dst: Path, *, extra_tokens: int = 0, retype: dict[str, str] | None = None) -> Path:
    """``good`` rewritten by the project's GGUF writer: ``extra_tokens`` more tokenizer tokens
    than the model's vocabulary (the embedding and head keep ``vocab_size`` rows), and the
    tensors of ``retype`` re-quantized to another block type (``{name: "Q4_K"}``)."""
    from gguf import quants as gq

    from ds4mlx.convert.gguf_writer import stream_gguf, tensor_entry
    from ds4mlx.io.gguf import hf_config_from_gguf
    from ds4mlx.io.gguf_file import open_gguf
    from ds4mlx.quant import gguf as qgguf

    retype = retype or {}
    with open_gguf(good) as g:
        config = hf_config_from_gguf(g)
        fields = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in g.fields.items()
                  if k.startswith("tokenizer.")}
        assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"]
        fields["tokenizer.ggml.tokens"] += [f"[EXTRA{i}]" for i in range(extra_tokens)]
        fields["tokenizer.ggml.token_type"] += [1] * extra_tokens
        entries, data = [], []
        for name, info in g.tensors.items():
            array = np.array(g.array(name))
            qtype = info.type_name
            if name in retype:
                values = gq.dequantize(array, info.ggml_type).reshape(info.shape)
                qtype, array = retype[name], qgguf.get(retype[name]).quantize(values)
            entries.append(tensor_entry(name, qtype, info.shape))
            data.append([array])
    stream_gguf(dst, config, entries, data, tokenizer=fields)
    return dst


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
    ("gguf", "layers.4.ffn.experts.5.w2.scale", 9, b"\xff"),  # read by a worker process (--jobs 2)
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


# ----------------------------------------------------------------------------- interruptions


def test_ctrl_c_at_any_moment_of_the_start():
    """SIGINT at growing delays after start: a quiet exit 130 each time once ds4mlx's entry
    point (``console.main``) runs. A signal that lands earlier, while the interpreter starts
    (``site``'s .pth files, runpy, the package's own import: 0.1-0.7 s on a loaded machine),
    ends in Python's own report, which no entry point can intercept; those are told apart by
    the traceback, which then holds no frame of ``console.main``, and counted out."""
    import re

    reached = 0
    delays = (0.05, 0.2, 0.4, 0.7, 1.0, 1.4, 2.0)
    for delay in delays:
        proc = cli_process("generate", "-m", "demo", "-p", "hi", "--max-tokens", "400")
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        code, out, err = finish(proc)
        assert_none_left(proc.pid)
        started = re.search(r'console\.py", line \d+, in main', err) or "cli.py" in err
        if code in (1, -signal.SIGINT) and not started:
            continue  # the interpreter's own start, before the entry point
        reached += 1
        assert code == 130, (delay, err)
        assert "Traceback" not in err and "error" not in err, (delay, err)
    assert reached >= 3


def test_sigterm_while_generating_is_a_clean_exit():
    """``kill PID`` while the model loads or generates: exit 143 with one line, no traceback."""
    import threading

    proc = cli_process("generate", "-m", "demo", "-p", "hi", "--max-tokens", "4000", "--temp", "0")
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    _wait_for(lambda: any(b"Loading demo" in line for line in lines), what="the model loading")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    reader.join(10)
    proc.stdout.close()
    err = b"".join(lines).decode()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.rstrip().endswith("ds4mlx: terminated"), err
    assert_none_left(proc.pid)


# ----------------------------------------------------------------------------- stray processes


def _wait_for(condition, timeout: float = 90.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _convert_jobs_2(src: Path, out: Path) -> subprocess.Popen:
    return cli_process("convert", src, out, "--to", "gguf", "--preset", "ds4-q4", "--jobs", "2")


def _workers_writing(proc: subprocess.Popen, partial: Path) -> None:
    _wait_for(lambda: len(session_members(proc.pid)) >= 4 and partial.is_file()
              and partial.stat().st_size > 1 << 20, what="workers writing")


@pytest.mark.slow
def test_killed_gguf_conversion_leaves_nothing_running(demo_dir, tmp_path):
    """``convert --jobs 2`` killed by SIGKILL (the out-of-memory killer's signal) while its
    workers work: no worker or resource tracker survives (the pipes close, so a caller waiting
    on them returns). The partial file stays, and does not block the rerun, which SIGTERM then
    stops: with its cleanup, the partial file and lock removed, exit status 143."""
    before = tree_digest(demo_dir)
    out, partial = tmp_path / "out.gguf", tmp_path / "out.gguf.partial"
    proc = _convert_jobs_2(demo_dir, out)
    _workers_writing(proc, partial)
    proc.send_signal(signal.SIGKILL)
    code, out_text, err = finish(proc, timeout=60)  # would time out if a survivor held the pipes
    assert code == -signal.SIGKILL
    assert_none_left(proc.pid)
    assert partial.exists() and not out.exists()

    proc = _convert_jobs_2(demo_dir, out)
    _workers_writing(proc, partial)
    proc.send_signal(signal.SIGTERM)
    code, out_text, err = finish(proc, timeout=60)
    assert_none_left(proc.pid)
    assert code == 143, err
    assert f"note: removing {partial}, left by an interrupted conversion" in err
    assert "Traceback" not in err and err.rstrip().endswith("ds4mlx: terminated"), err
    assert sorted(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    assert tree_digest(demo_dir) == before


@pytest.mark.slow
def test_ctrl_c_while_workers_start(demo_dir, tmp_path):
    """Ctrl-C as a terminal sends it (to the whole foreground group, workers included) while
    the workers start: exit 130, no traceback from any process, nothing left."""
    out = tmp_path / "out.gguf"
    proc = _convert_jobs_2(demo_dir, out)
    _wait_for(lambda: len(session_members(proc.pid)) >= 3, what="worker processes")
    os.killpg(proc.pid, signal.SIGINT)
    code, out_text, err = finish(proc, timeout=60)
    assert_none_left(proc.pid)
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert sorted(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_a_running_conversion_is_not_disturbed(demo_dir, tmp_path, capsys, monkeypatch):
    """The lock of a live conversion refuses a second one on the same output; the partial
    file stays the owner's."""
    from ds4mlx.convert.output import PartialLock

    out = tmp_path / "out.gguf"
    partial = tmp_path / "out.gguf.partial"
    partial.write_bytes(b"being written")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from ds4mlx.convert.output import PartialLock\n"
        "PartialLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(60)"), str(partial)],
        env=env(), stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        one_line(*run(capsys, monkeypatch, "convert", demo_dir, out, "--to", "gguf"),
                 str(partial), f"process {holder.pid}")
        assert partial.read_bytes() == b"being written" and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    lock = PartialLock(partial)  # the holder is gone: its lock went with it
    lock.acquire()
    lock.release()


def test_killed_demo_build_leaves_no_temporary(tmp_path):
    from ds4mlx.synthetic import demo_model_path

    cache = tmp_path / "cache"
    profile = dict(num_layers=2, num_hash_layers=1, mtp=False, n_routed_experts=4, experts_per_token=2)
    script = ("import sys; from ds4mlx.synthetic import demo_model_path\n"
              f"demo_model_path(sys.argv[1], **{profile!r})")
    proc = subprocess.Popen([sys.executable, "-c", script, str(cache)], env=env(), start_new_session=True)
    _wait_for(lambda: any(cache.glob(".demo-tmp-*")), what="the demo build")
    proc.kill()
    proc.wait()
    assert list(cache.glob(".demo-tmp-*"))
    live = cache / f".demo-tmp-{os.getpid()}-building"  # a build still running here: kept
    live.mkdir()
    path = demo_model_path(cache, **profile)
    assert (path / "model.safetensors.index.json").is_file()
    assert sorted(cache.glob(".demo-tmp-*")) == [live]

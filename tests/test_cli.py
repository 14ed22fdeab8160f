"""The ``ds4mlx`` command driven through its entry point (``ds4mlx.cli.main``) on the demo model.

References are independent of the CLI: mlx-lm's own generation loop on hand-rendered prompts,
safetensors headers parsed here, gguf-py's reader, and the real decode-state arrays.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys

import pytest

from ds4mlx import encoding
from ds4mlx.cli import main

GEN_STATS = re.compile(r"Prompt: (\d+) tokens, .*\| Generation: (\d+) tokens, .*\| Peak memory: .* \| (.+)$", re.M)
CHAT_STATS = re.compile(
    r"^\[prompt (\d+) tokens, .*? \| (\d+) tokens, .*? \| context (\d+)/\d+ \| peak .*? \| (\w+)\]$", re.M
)


def run(capsys, monkeypatch, *args, stdin=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def encode(tok, text):
    return list(tok.encode(text, add_special_tokens=False))


def mlx_lm_greedy(model, tok, ids, n):
    """mlx-lm's own loop: (text, tokens incl. a final EOS, finish reason)."""
    from mlx_lm.generate import stream_generate

    out = list(stream_generate(model, tok, ids, max_tokens=n))
    return "".join(r.text for r in out), [r.token for r in out], out[-1].finish_reason


def no_think_turn(text, first=True):
    return (encoding.BOS if first else "") + encoding.USER + text + encoding.ASSISTANT + encoding.THINK_END


# ----------------------------------------------------------------------------- entry point


def test_help_is_light_and_lists_commands():
    code = (
        "import sys, ds4mlx.cli\n"
        "print(sorted(m for m in ('mlx_lm', 'transformers', 'torch', 'ds4mlx.model') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    res = subprocess.run([sys.executable, "-m", "ds4mlx.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for command in ("generate", "chat", "info", "bench", "convert"):
        assert command in res.stdout


# ----------------------------------------------------------------------------- generate


def test_generate_greedy_matches_python_api_and_mlx_lm(demo, capsys, monkeypatch):
    import ds4mlx

    model, tok = demo
    code, out, err = run(capsys, monkeypatch, "generate", "--model", "demo", "--prompt", "Hello",
                         "--no-think", "--temp", "0", "--max-tokens", "12")
    assert code == 0, err
    ids = encode(tok, no_think_turn("Hello"))
    text, _, _ = mlx_lm_greedy(model, tok, ids, 12)
    assert out == text + "\n"
    assert out == ds4mlx.generate(model, tok, ids, max_tokens=12, temp=0.0) + "\n"
    prompt_tokens, gen_tokens, _ = GEN_STATS.search(err).groups()
    assert int(prompt_tokens) == len(ids)


def test_generate_raw_prompt_file_and_thinking(demo, tmp_path, capsys, monkeypatch):
    model, tok = demo
    f = tmp_path / "prompt.txt"
    f.write_text("Once upon a time", encoding="utf-8")
    code, out, err = run(capsys, monkeypatch, "generate", "-m", "demo", "--prompt-file", f, "--raw",
                         "--temp", "0", "--max-tokens", "6")
    assert code == 0, err
    ids = [tok.bos_token_id] + encode(tok, "Once upon a time")
    assert int(GEN_STATS.search(err).group(1)) == len(ids)
    assert out == mlx_lm_greedy(model, tok, ids, 6)[0] + "\n"

    # thinking (the default): the prompt ends with <think>, output is reasoning until </think>
    code, out, err = run(capsys, monkeypatch, "generate", "-m", "demo", "-p", "Hi", "--system", "Be brief.",
                         "--temp", "0", "--max-tokens", "4")
    assert code == 0, err
    ids = encode(tok, encoding.BOS + "Be brief." + encoding.USER + "Hi" + encoding.ASSISTANT + encoding.THINK_START)
    assert int(GEN_STATS.search(err).group(1)) == len(ids)
    _, tokens, _ = mlx_lm_greedy(model, tok, ids, 4)
    if tok.think_end_id not in tokens:  # all reasoning: it goes to stderr, stdout stays empty
        assert out == "\n" and "[reasoning]" in err


def interrupt_at_sample(monkeypatch, n: int) -> None:
    """Send SIGINT (Ctrl-C) while the n-th token of the session is being sampled."""
    gen = importlib.import_module("ds4mlx.generate")  # the module (ds4mlx.generate is the function)
    real = gen.make_sampling
    calls = []

    def interrupting_sampling(**kw):
        sampler, processors = real(**kw)

        def sample(logprobs):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGINT)
            return sampler(logprobs)

        return sample, processors

    monkeypatch.setattr(gen, "make_sampling", interrupting_sampling)


def test_generate_ctrl_c_stops_cleanly(demo, capsys, monkeypatch):
    interrupt_at_sample(monkeypatch, 3)
    code, out, err = run(capsys, monkeypatch, "generate", "-m", "demo", "-p", "Hello", "--no-think",
                         "--max-tokens", "50")
    assert code == 130
    prompt_tokens, gen_tokens, why = GEN_STATS.search(err).groups()
    assert why == "interrupted" and int(gen_tokens) < 10
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- chat


def test_chat_two_turns_reuse_the_state(demo, capsys, monkeypatch):
    model, tok = demo
    code, out, err = run(capsys, monkeypatch, "chat", "-m", "demo", "--no-think", "--temp", "0",
                         "--max-tokens", "5", stdin="Hi\nHow are you?\n/quit\nnever read\n")
    assert code == 0, err
    turns = CHAT_STATS.findall(err)
    assert len(turns) == 2
    (p1, g1, c1, why1), (p2, g2, c2, why2) = [(int(a), int(b), int(c), d) for a, b, c, d in turns]

    # reference: mlx-lm over the whole conversation, rendered by hand, from a fresh state
    ids1 = encode(tok, no_think_turn("Hi"))
    text1, gen1, finish1 = mlx_lm_greedy(model, tok, ids1, 5)
    close = [] if finish1 == "stop" else [tok.eos_token_id]
    new2 = close + encode(tok, no_think_turn("How are you?", first=False))
    text2, gen2, _ = mlx_lm_greedy(model, tok, ids1 + gen1 + new2, 5)

    assert (p1, g1, c1, why1) == (len(ids1), len(gen1), len(ids1) + len(gen1), finish1)
    assert p2 == len(new2)  # only the new turn is prefilled
    assert c2 == c1 + p2 + g2 and g2 == len(gen2)
    assert out == text1 + "\n" + text2 + "\n"


def test_chat_commands_and_ctrl_c(demo, capsys, monkeypatch):
    model, tok = demo
    interrupt_at_sample(monkeypatch, 2)  # during the first answer only
    stdin = "Hi\n/think\nMore\n/reset\n/bogus\nHi\n"
    code, out, err = run(capsys, monkeypatch, "chat", "-m", "demo", "--no-think", "--temp", "0",
                         "--max-tokens", "20", stdin=stdin)
    assert code == 0, err
    turns = [(int(a), int(b), int(c), d) for a, b, c, d in CHAT_STATS.findall(err)]
    assert len(turns) == 3
    assert turns[0][3] == "interrupted" and turns[0][1] < 20
    # the cut answer is closed with EOS, then the thinking turn is rendered after it
    new2 = [tok.eos_token_id] + encode(tok, encoding.USER + "More" + encoding.ASSISTANT + encoding.THINK_START)
    assert turns[1][0] == len(new2)
    assert turns[1][2] == turns[0][2] + turns[1][0] + turns[1][1]
    assert "[thinking on]" in err and "[new conversation]" in err and "unknown command" in err
    # after /reset the conversation starts afresh (BOS, and thinking is still on)
    ids = encode(tok, encoding.BOS + encoding.USER + "Hi" + encoding.ASSISTANT + encoding.THINK_START)
    assert turns[2][0] == len(ids) and turns[2][2] == len(ids) + turns[2][1]


# ----------------------------------------------------------------------------- info


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def test_info_counts_match_the_files(demo_dir, capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, "info", "demo", "--json", "--ctx", "100")
    assert code == 0, err
    d = json.loads(out)
    config = json.loads((demo_dir / "config.json").read_text())

    data_bytes, params, routed, mtp = 0, 0, 0, 0
    for shard in demo_dir.glob("*.safetensors"):
        n, header = _header(shard)
        data_bytes += shard.stat().st_size - 8 - n
        for name, entry in header.items():
            if name == "__metadata__" or name.endswith(".scale"):
                continue
            size = 1
            for s in entry["shape"]:
                size *= s
            size *= 2 if entry["dtype"] == "I8" else 1  # two FP4 values per byte
            params += size
            mtp += size if name.startswith("mtp.") else 0
            routed += size if ".ffn.experts." in name and not name.startswith("mtp.") else 0
    assert d["weight_bytes"] == data_bytes
    assert d["params"]["total"] == params
    k, e = config["num_experts_per_tok"], config["n_routed_experts"]
    assert d["params"]["active_per_token"] == params - mtp - routed + routed * k // e
    assert d["experts_per_token"] == {"file": k, "used": k, "override": None}
    assert d["layers"] == config["num_hidden_layers"]
    ratios = config["compress_ratios"][: config["num_hidden_layers"]]
    sched = d["schedule"]["attention"]
    assert sched["sliding window"] == "0-1" and ratios[:2] == [0, 0]
    assert sched["compressed r=4 (CSA)"] == ",".join(str(i) for i, r in enumerate(ratios) if r == 4)
    assert sched["compressed r=128 (HCA)"] == ",".join(str(i) for i, r in enumerate(ratios) if r == 128)
    assert d["schedule"]["hash_routed_layers"] == f"0-{config['num_hash_layers'] - 1}"
    assert d["by_kind"]["routed experts"]["formats"] == {
        "FP4 E2M1, E8M0 /32": {"tensors": 3 * e * config["num_hidden_layers"],
                               "bytes": d["by_kind"]["routed experts"]["bytes"]}}
    assert d["memory"]["total"] == d["memory"]["weights"] + d["memory"]["state"]

    code, out, err = run(capsys, monkeypatch, "info", "demo", "--experts-per-token", "4")
    assert code == 0, err
    assert "4 routed experts per token (file: 6, override: 4)" in out
    assert "Memory at 32768 tokens" in out


@pytest.mark.parametrize("n_tokens", [1, 3, 4, 15, 16, 17, 37, 130])
def test_state_estimate_matches_the_real_cache(demo, n_tokens):
    import mlx.core as mx

    from ds4mlx.info import state_nbytes
    from ds4mlx.state import cache_nbytes

    model, _ = demo
    cache = model.make_cache()
    mx.eval(model(mx.arange(3, 3 + n_tokens)[None] % model.config.vocab_size, cache=cache))
    assert state_nbytes(model.config, n_tokens, dtype_bytes=4) == cache_nbytes(cache)


def test_info_on_gguf(demo_dir, tmp_path, capsys, monkeypatch):
    gguf = pytest.importorskip("gguf")
    from ds4mlx.convert import convert

    path = convert(demo_dir, tmp_path / "demo-mxfp4.gguf", to="gguf", preset="mxfp4", progress=False)
    code, out, err = run(capsys, monkeypatch, "info", path, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["format"].startswith("GGUF")
    reader = gguf.GGUFReader(str(path))
    assert d["weight_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    expert_types = {t.tensor_type.name for t in reader.tensors if "_exps" in t.name}
    assert set(d["by_kind"]["routed experts"]["formats"]) == expert_types
    # the converted file generates like the source model through the same command
    code, out, err = run(capsys, monkeypatch, "generate", "-m", path, "-p", "Hi", "--no-think",
                         "--temp", "0", "--max-tokens", "3")
    assert code == 0, err


# ----------------------------------------------------------------------------- bench


def test_bench_csv(demo, tmp_path, capsys, monkeypatch):
    from ds4mlx.info import state_nbytes

    model, _ = demo
    out_csv, out_png = tmp_path / "bench.csv", tmp_path / "bench.png"
    code, out, err = run(capsys, monkeypatch, "bench", "-m", "demo", "--contexts", "24,48", "--gen-tokens", "3",
                         "--prefill-step", "16", "--csv", out_csv, "--plot", out_png)
    assert code == 0, err
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["context"]) for r in rows] == [24, 48]
    assert [int(r["prefill_tokens"]) for r in rows] == [24, 48 - 24 - 3]
    for r in rows:
        assert int(r["gen_tokens"]) == 3 and float(r["prefill_tps"]) > 0 and float(r["gen_tps"]) > 0
        assert int(r["state_bytes"]) == state_nbytes(model.config, int(r["context"]), dtype_bytes=4)
    try:
        import matplotlib  # noqa: F401

        assert out_png.stat().st_size > 0
    except ImportError:
        assert "matplotlib is not installed" in err and not out_png.exists()

    code, out, err = run(capsys, monkeypatch, "bench", "-m", "demo", "--contexts", "24,26", "--gen-tokens", "3")
    assert code == 1 and "too close" in err


# ----------------------------------------------------------------------------- Hugging Face ids


def test_repo_id_from_the_hub_cache_offline(demo_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hf

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-v4"
    shutil.copytree(demo_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    code, out, err = run(capsys, monkeypatch, "generate", "-m", "someone/tiny-v4", "-p", "Hi", "--no-think",
                         "--temp", "0", "--max-tokens", "3")
    assert code == 0, err
    code, out, err = run(capsys, monkeypatch, "generate", "-m", "someone/not-cached", "-p", "Hi")
    assert code == 1 and "someone/not-cached" in err and "Offline?" in err


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def broken(demo_dir, tmp_path):
    """Factory of bad inputs by name."""

    def make(kind):
        if kind == "truncated":
            d = tmp_path / "truncated"
            shutil.copytree(demo_dir, d)
            shard = d / "model-00002-of-00003.safetensors"
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
            return d
        if kind == "llama":
            d = tmp_path / "llama"
            shutil.copytree(demo_dir, d)
            config = json.loads((d / "config.json").read_text())
            config["model_type"] = "llama"
            (d / "config.json").write_text(json.dumps(config))
            return d
        if kind == "garbage_gguf":
            f = tmp_path / "garbage.gguf"
            f.write_bytes(b"this is not a gguf file at all" * 4)
            return f
        if kind == "binary-prompt":
            f = tmp_path / "prompt.bin"
            f.write_bytes(bytes([0xFF, 0xFE, 0x00, 0x80]) * 8)
            return f
        raise KeyError(kind)

    return make


BAD_INPUTS = [
    # (arguments, a word the one-line message must contain)
    (["generate", "-m", "{tmp}/no-such-dir", "-p", "hi"], "no-such-dir"),
    (["generate", "-m", "{truncated}", "-p", "hi"], "model-00002-of-00003.safetensors"),
    (["generate", "-m", "{llama}", "-p", "hi"], "model_type"),
    (["generate", "-m", "{garbage_gguf}", "-p", "hi"], "garbage.gguf"),
    (["info", "{llama}"], "model_type"),
    (["generate", "-m", "demo", "-p", "word " * 40, "--ctx", "16"], "context of 16 tokens"),
    (["generate", "-m", "demo", "-p", "hi", "--think-max", "--no-think"], "--no-think"),
    (["generate", "-m", "demo", "-p", "hi", "--prompt-file", "{tmp}"], "not both"),
    (["generate", "-m", "demo", "--prompt-file", "{tmp}"], "directory"),
    (["generate", "-m", "demo", "--prompt-file", "{binary-prompt}"], "UTF-8"),
    (["generate", "-m", "demo", "--prompt-file", "{tmp}/missing.txt"], "missing.txt"),
    (["generate", "-m", "demo", "-p", "hi", "--raw", "--system", "x"], "--raw"),
    (["generate", "-m", "demo", "-p", "hi", "--top-p", "2"], "--top-p"),
    (["generate", "-m", "demo", "-p", "hi", "--experts-per-token", "7"], "experts_per_token=7"),
    (["generate", "-m", "demo"], "no prompt"),
    (["generate", "-p", "hi"], "--model"),
    (["generate", "-m", "demo", "-p", "hi", "--no-such-flag"], "--no-such-flag"),
    (["chat", "-m", "demo", "--think-max", "--no-think"], "--no-think"),
    (["bench", "-m", "demo", "--contexts", "4k,2k"], "increase"),
    (["convert", "demo", "{tmp}/out", "--to", "onnx"], "--to"),
]


@pytest.mark.parametrize("args,needle", BAD_INPUTS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line(args, needle, broken, tmp_path, demo_dir, capsys, monkeypatch):
    names = {"tmp": tmp_path}
    for a in args:
        for key in re.findall(r"\{([^}]+)\}", a):
            if key not in names:
                names[key] = broken(key)
    args = [a.format(**names) for a in args]
    code, out, err = run(capsys, monkeypatch, *args)
    assert code == 1
    assert "Traceback" not in err and out == ""
    errors = [line for line in err.splitlines() if line.startswith("ds4mlx: error:")]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0])
    assert needle in errors[0]

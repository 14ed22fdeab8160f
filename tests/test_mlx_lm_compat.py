"""MLX directories from ``ds4mlx convert`` open in mlx-lm's own tools through mlx-lm's
``model_file`` + ``trust_remote_code``: mlx-lm's loader and its generation loop (and the real
``mlx_lm generate`` command) give the tokens ds4mlx gives for the same prompt ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def converted(demo_dir, tmp_path_factory):
    from ds4mlx.convert import convert

    root = tmp_path_factory.mktemp("mlx-lm")
    return {
        "lossless": convert(demo_dir, root / "lossless", to="mlx", progress=False),
        "affine": convert(demo_dir, root / "affine", to="mlx", expert_bits=4, dense_bits=8, progress=False),
    }


def greedy_mlx_lm(model, ids, n):
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(ids), model, max_tokens=n, sampler=lambda logits: mx.argmax(logits, axis=-1))
    return [int(t) for t, _ in steps]


def greedy_ds4mlx(model, tokenizer, ids, n):
    from ds4mlx.generate import stream_generate

    return [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=n, temp=0.0)]


@pytest.mark.parametrize("kind", ["lossless", "affine"])
def test_mlx_lm_load_generates_like_ds4mlx(converted, kind):
    from mlx_lm.utils import load as mlx_lm_load

    from ds4mlx import load

    path = converted[kind]
    config = json.loads((path / "config.json").read_text())
    assert (path / config["model_file"]).is_file()
    with pytest.raises(ValueError, match="trust_remote_code"):  # mlx-lm's own guard stays in place
        mlx_lm_load(str(path))
    theirs, their_tokenizer = mlx_lm_load(str(path), trust_remote_code=True)
    ours, our_tokenizer = load(path, dtype=mx.float32)
    ids = [our_tokenizer.bos_token_id] + their_tokenizer.encode("Hello there", add_special_tokens=False)
    tokens = greedy_ds4mlx(ours, our_tokenizer, ids, 12)
    assert greedy_mlx_lm(theirs, ids, 12) == tokens
    # On the CPU ours dequantizes the mxfp8 projections of several rows once and multiplies in
    # float32 (ops.quantized_matmul); mlx-lm's nn.QuantizedLinear multiplies quantized: the
    # same values summed in another order.
    a, b = np.asarray(theirs(mx.array([ids]))), np.asarray(ours(mx.array([ids])))
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


@pytest.mark.slow
def test_mlx_lm_generate_command(converted):
    """The real ``mlx_lm generate`` command on a converted directory, with the directory's chat
    template, prints ds4mlx's greedy answer to the same question."""
    path = converted["lossless"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    theirs = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(path), "--trust-remote-code",
         "--prompt", "Hello there", "--max-tokens", "10", "--temp", "0", "--verbose", "False",
         "--chat-template-config", '{"enable_thinking": false}'],
        capture_output=True, text=True, env=env, timeout=300)
    assert theirs.returncode == 0, theirs.stderr
    ours = subprocess.run(
        [sys.executable, "-m", "ds4mlx", "generate", "--model", str(path), "--prompt", "Hello there", "--no-think",
         "--max-tokens", "10", "--temp", "0", "--quiet"],
        capture_output=True, text=True, env=env, timeout=300)
    assert ours.returncode == 0, ours.stderr
    # the same tokens; mlx-lm's streaming detokenizer drops the first token's leading space
    assert theirs.stdout.strip() and theirs.stdout.strip() == ours.stdout.strip()

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d", "reasoning_content": "r"}],
]


@pytest.mark.parametrize("options", [
    {"add_generation_prompt": True},
    {"add_generation_prompt": True, "enable_thinking": False},
    {"add_generation_prompt": False},
    {"add_generation_prompt": True, "reasoning_effort": "max"},
])
def test_chat_template_renders_like_the_encoder(converted, options):
    """The directory's Jinja chat template (what transformers and so mlx-lm apply) gives the
    prompt ds4mlx's port of DeepSeek's encoder gives, for plain conversations."""
    from transformers import AutoTokenizer

    from ds4mlx.encoding import apply_chat_template

    tokenizer = AutoTokenizer.from_pretrained(str(converted["lossless"]))
    assert tokenizer.chat_template
    for messages in CONVERSATIONS:
        if messages[-1]["role"] == "assistant" and options.get("add_generation_prompt"):
            continue
        assert tokenizer.apply_chat_template(messages, tokenize=False, **options) == \
            apply_chat_template(messages, **options), messages
    with pytest.raises(Exception, match="ds4mlx"):
        tokenizer.apply_chat_template(CONVERSATIONS[0], tools=[{"type": "function", "function": {"name": "f"}}],
                                      tokenize=False)


@pytest.mark.slow
def test_mlx_lm_server(converted):
    """``mlx_lm server`` on a converted directory answers an OpenAI chat request (the real openai
    client) with ds4mlx's greedy answer."""
    import socket
    import time

    openai = pytest.importorskip("openai")
    from ds4mlx import load
    from ds4mlx.generate import chat_prompt, stream_generate

    path = converted["lossless"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm", "server", "--model", str(path), "--trust-remote-code",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 180
        while True:  # until the server listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()[-2000:]
                time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=180)
        reply = client.chat.completions.create(
            model="default_model", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    finally:
        server.terminate()
        server.wait(timeout=30)
    model, tokenizer = load(path, dtype=mx.float32)
    ids = chat_prompt(tokenizer, "Hello", thinking=False)
    ours = "".join(r.text for r in stream_generate(model, tokenizer, ids, max_tokens=8, temp=0.0))
    assert reply.choices[0].message.content.strip() == ours.strip() and ours.strip()

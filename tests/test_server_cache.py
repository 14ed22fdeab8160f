"""Prompt-cache files (mlx-lm's layout, our classes) and the server's prefix cache: LRU bound,
longest-prefix reuse, snapshots on disk across a restart, damaged or foreign files skipped."""

from __future__ import annotations

import json
import logging

import mlx.core as mx
import pytest

from ds4mlx import load_prompt_cache, save_prompt_cache
from ds4mlx.generate import generate
from ds4mlx.prompt_cache import PromptCacheError, read_metadata
from ds4mlx.server import BackgroundServer, build_app
from ds4mlx.server.prefix_cache import PrefixCache, model_fingerprint

openai = pytest.importorskip("openai")

IDS = [0] + list(range(20, 160))  # crosses several ratio-4 windows and a sliding window's worth


def _prefilled(model, ids):
    cache = model.make_cache()
    mx.eval(model(mx.array([ids]), cache))
    return cache


def _flip_data_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-9] ^= 0x40  # in the tensor data, after the header
    path.write_bytes(bytes(raw))


def test_file_round_trip_continues_like_the_live_state(demo, tmp_path):
    model, tok = demo
    live = _prefilled(model, IDS)
    path = tmp_path / "state.safetensors"
    save_prompt_cache(path, live, {"note": "hello"})
    loaded, meta = load_prompt_cache(path, return_metadata=True)
    assert meta["note"] == "hello" and [c.offset for c in loaded] == [c.offset for c in live]
    # mlx-lm's layout: tensors "layer.item", metadata [user metadata, class names, scalar markers]
    arrays, flat = mx.load(str(path), return_metadata=True)
    assert flat["1.0"] == "LayerCache" and flat["0.note"] == "hello" and "0.2" in arrays
    assert read_metadata(path)["note"] == "hello"
    # mlx-lm's own helpers see an untrimmable state of the right size
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    assert not can_trim_prompt_cache(loaded) and trim_prompt_cache(loaded, 3) == 0
    assert loaded[0].nbytes == live[0].nbytes > 0 and loaded[0].size() == len(IDS)
    want = generate(model, tok, [5, 6, 7], temp=0.0, max_tokens=4, prompt_cache=live)
    assert generate(model, tok, [5, 6, 7], temp=0.0, max_tokens=4, prompt_cache=loaded) == want
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_damaged_or_truncated_file_is_refused(demo, tmp_path):
    model, _ = demo
    path = tmp_path / "state.safetensors"
    save_prompt_cache(path, _prefilled(model, IDS[:40]))
    _flip_data_byte(path)
    with pytest.raises(PromptCacheError, match="digest"):
        load_prompt_cache(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PromptCacheError, match=str(path)):
        load_prompt_cache(path)
    with pytest.raises(ValueError, match=".safetensors"):
        save_prompt_cache(tmp_path / "x.bin", _prefilled(model, IDS[:8]))


def test_lru_keeps_within_bytes_and_finds_longest_prefix(demo):
    model, tok = demo
    states = {n: _prefilled(model, IDS[:n]) for n in (30, 60, 90)}
    one = sum(c.nbytes for c in states[90])
    pc = PrefixCache(int(2.5 * one))
    for n, s in states.items():
        pc.store(IDS[:n], s)
    assert pc.nbytes <= 2.5 * one and len(pc) == 3
    n, state = pc.lookup(IDS + [7])
    assert n == 90 and state[0].offset == 90
    # the copy handed out is private: extending it leaves the stored snapshot as it was
    mx.eval(model(mx.array([[7, 8]]), state))
    assert pc.lookup(IDS)[0] == 90
    assert pc.lookup(IDS[:90])[0] == 60  # a whole-prompt match leaves one token to prefill
    assert pc.lookup([1, 2, 3])[0] == 0
    pc.store(IDS[:100], _prefilled(model, IDS[:100]))
    assert pc.nbytes <= 2.5 * one and len(pc) < 4  # the least recently used went


def _ask(server, text):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": text}], max_tokens=4,
                                       temperature=0, extra_body={"thinking": {"type": "disabled"}})
    return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens


def test_disk_cache_survives_restart_and_skips_bad_files(demo, tmp_path, caplog):
    model, tok = demo
    question = "Recipes need flour, sugar, butter, eggs, milk and a pinch of salt. How long do I bake?"
    with BackgroundServer(build_app(model, tok, cache_dir=tmp_path)) as srv:
        first, cached = _ask(srv, question)
    assert cached == 0
    files = sorted(tmp_path.glob("*.safetensors"))
    assert files and all(read_metadata(f)["fingerprint"] == model_fingerprint(model) for f in files)
    # a snapshot of another model in the same directory
    foreign = tmp_path / "foreign.safetensors"
    save_prompt_cache(foreign, _prefilled(model, IDS[:10]), {"fingerprint": "another-model", "tokens": "[0]"})

    caplog.set_level(logging.WARNING, logger="ds4mlx.server")
    with BackgroundServer(build_app(model, tok, cache_dir=tmp_path)) as srv:
        again, cached = _ask(srv, question)
        assert srv.app.state.engine.prefix_cache.loaded_from_disk >= 1
    assert again == first and cached > 0
    assert any("another model" in r.getMessage() for r in caplog.records)

    for f in files:
        _flip_data_byte(f)
    caplog.clear()
    with BackgroundServer(build_app(model, tok, cache_dir=tmp_path)) as srv:
        third, cached = _ask(srv, question)
    assert third == first and cached == 0
    assert any("skipping" in r.getMessage() for r in caplog.records)


def test_disk_bound_drops_least_recently_used_files(demo, tmp_path):
    model, _ = demo
    states = {n: _prefilled(model, IDS[:n]) for n in (20, 40, 60)}
    sizes = {}
    for n, state in states.items():
        save_prompt_cache(tmp_path / f"probe{n}.safetensors", state, {"fingerprint": "", "tokens": json.dumps(IDS[:n])})
        sizes[n] = (tmp_path / f"probe{n}.safetensors").stat().st_size
    bound = sizes[40] + sizes[60]
    disk = tmp_path / "cache"
    pc = PrefixCache(1 << 30, directory=disk, max_disk_bytes=bound)
    for n in (20, 40, 60):
        pc.store(IDS[:n], states[n])
    assert not list(disk.glob("*.safetensors"))  # written after the answer, by flush
    pc.flush()
    files = list(disk.glob("*.safetensors"))
    kept = sorted(len(json.loads(read_metadata(f)["tokens"])) for f in files)
    assert sum(f.stat().st_size for f in files) <= bound
    assert kept == [40, 60]  # the oldest file went; its snapshot is still in memory
    assert pc.lookup(IDS[:21])[0] == 20


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_serve_command_answers_and_stops(demo_dir, tmp_path, stop):
    # Ctrl-C and a service manager's SIGTERM both stop it cleanly with requests in flight:
    # status 0, no abort at exit, each open request answered (cancelled within a token, not
    # waited out for uvicorn's 5 s graceful timeout and then cut off with a 500)
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    cmd = [sys.executable, "-m", "ds4mlx", "serve", "--model", "demo", "--port", str(port), "--ctx", "1024",
           "--cache-dir", str(tmp_path / "cache"), "--max-batch", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.5)
        r = httpx.post(url, timeout=120, json={
            "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3

        # three long requests in flight (two streamed, one not; one of them waits for the batch)
        answers, streaming = {}, threading.Semaphore(0)

        def client(i: int) -> None:
            body = {"messages": [{"role": "user", "content": f"Story {i}"}], "max_tokens": 900,
                    "temperature": 0, "stream": i < 2}
            try:
                if i < 2:
                    with httpx.stream("POST", url, json=body, timeout=120) as r:
                        lines = []
                        for line in filter(None, r.iter_lines()):
                            lines.append(line)
                            if len(lines) == 3:
                                streaming.release()
                        answers[i] = (r.status_code, lines[-1] if lines else "")
                else:
                    r = httpx.post(url, json=body, timeout=120)
                    answers[i] = (r.status_code, r.json()["choices"][0]["finish_reason"])
            except httpx.HTTPError as e:
                answers[i] = (0, repr(e))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for _ in range(2):
            assert streaming.acquire(timeout=120)
        tic = time.time()
        proc.send_signal(getattr(signal, stop))
        assert proc.wait(60) == 0
        took = time.time() - tic
        for t in threads:
            t.join(30)
        out = proc.stdout.read()
        assert "terminate called" not in out and "Traceback" not in out, out
        assert "context 1024 tokens; up to 2 requests decoded together" in out, out
        # the whole request is answered: cut short ("stop"), or done before the signal under load
        assert answers[0] == answers[1] == (200, "data: [DONE]"), (answers, out)
        assert answers[2] in ((200, "stop"), (200, "length")), (answers, out)
        assert took < 4, f"the shutdown took {took:.1f} s: the open requests were waited out"
        assert list((tmp_path / "cache").glob("*.safetensors"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_mtp_drafter_sees_the_segmented_prefill(demo_dir):
    # The engine prefills a chat prompt segment by segment (snapshots at message boundaries);
    # with --draft mtp the MTP block must still see every position, as it does in one
    # stream_generate over the whole prompt: same answer, same drafts, same MTP window.
    import asyncio

    from ds4mlx import encoding, load
    from ds4mlx.generate import stream_generate
    from ds4mlx.server.engine import Engine, Job, tokenize_with_boundaries

    model, tok = load(demo_dir, dtype=mx.float32, mtp=True)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Name three colours."}]
    ids, bounds = tokenize_with_boundaries(tok, encoding.encode_messages(messages, "chat"))
    assert len(bounds) >= 2 and bounds[-1] > len(ids) - 8  # most of the prompt goes in segments

    ref_cache = model.make_cache()
    ref = list(stream_generate(model, tok, ids, temp=0.0, max_tokens=6, draft="mtp", num_draft_tokens=2,
                               prompt_cache=ref_cache))
    engine = Engine(model, tok, ctx=512, prefix_cache=PrefixCache(1 << 30), draft="mtp", num_draft_tokens=2)

    async def run():
        events = engine.submit(Job(ids, bounds, max_tokens=6, temp=0.0))
        while True:
            kind, value = await events.get()
            if kind in ("done", "error"):
                return value

    try:
        result = asyncio.run(run())
    finally:
        engine.close()
    assert not isinstance(result, Exception), result
    assert result.text == "".join(r.text for r in ref) and result.completion_tokens == len(ref)
    want, got = ref[-1].draft_stats, result.draft_stats
    assert (got.forwards, got.drafted, got.accepted) == (want.forwards, want.drafted, want.accepted)
    n = model.config.num_hidden_layers
    held, end = engine.prefix_cache.lookup(ids + [r.token for r in ref] + [0])
    assert held == ref_cache[0].offset and end[n].offset == ref_cache[n].offset
    assert end[n].window.shape == ref_cache[n].window.shape
    assert mx.allclose(end[n].window, ref_cache[n].window, atol=1e-4).item()

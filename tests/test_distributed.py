"""The model split by layers over ``mlx.launch -n N --backend ring --hosts 127.0.0.1`` processes
(tests/distributed_run.py): logits equal to one process's for prefill, chunked prefill and
decode (official-format and GGUF checkpoints, top-6 and top-4, 2 and 3 ranks), the CLI's greedy
text and a split server's answers (prefix cache in memory and on disk) equal to one process's,
prompt-cache files per rank (another split refused), the memory check per rank, and a rank that
dies or hangs ending the run with an error on the others within 30 s. Each launch does several
checks; the comparisons run here."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

import ds4mlx
from ds4mlx import memory
from distributed_run import TOKENS, passes
from ds4mlx.convert.gguf_writer import write_gguf
from ds4mlx.names import internal_to_gguf
from ds4mlx.prompt_cache import PromptCacheError
from ds4mlx.stage import SplitError, Stage, balanced_split, parse_split

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("distributed_run.py")
LAUNCH = Path(sys.executable).with_name("mlx.launch")
LAUNCH_TIMEOUT = 600  # the loaded CI machine imports slowly; a healthy launch ends well before
TOL = 1e-6
CHAT_INPUT = "hello\n/reset\nhi\n/quit\n"


def _free_port_base(n: int) -> int:
    """A base port with ``n`` free ports after it (the ring listens on base + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65536:
            continue
        try:
            socks = []
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def _launch_cmd(n: int, args: list[str]) -> list[str]:
    launcher = [str(LAUNCH)] if LAUNCH.exists() else [sys.executable, "-c",
                                                      "from mlx._distributed_utils.launch import main; main()"]
    return launcher + ["-n", str(n), "--backend", "ring", "--hosts", "127.0.0.1",
                       "--starting-port", str(_free_port_base(n)), "--", sys.executable, str(RUNNER), *args]


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra)
    env.setdefault("DS4MLX_KERNEL_CHECK", "off")
    return env


def launch(n: int, out: Path, args: list[str], stdin: str = "", **env) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(_launch_cmd(n, [str(out), *args]), env=_env(**env), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT, cwd=out, input=stdin)


def start(n: int, out: Path, args: list[str], stdin: str = "", **env) -> subprocess.Popen:
    """A launch left running, its output in OUT/launch.out and launch.err (no pipe to fill)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "launch.in").write_text(stdin)
    with open(out / "launch.in") as i, open(out / "launch.out", "w") as o, open(out / "launch.err", "w") as e:
        return subprocess.Popen(_launch_cmd(n, [str(out), *args]), env=_env(**env), stdin=i, stdout=o, stderr=e,
                                text=True, cwd=out, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """Whatever is left of a launch (a failed test's), killed and reaped."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _server_url(out: Path, proc: subprocess.Popen, limit: float, nth: int = 1) -> str:
    """The address rank 0's ``nth`` server listens on (``--port 0``: from uvicorn's start line)."""
    end = time.monotonic() + limit
    while True:
        found = re.findall(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", (out / "launch.err").read_text())
        if len(found) >= nth:
            return found[nth - 1]
        assert proc.poll() is None, (out / "launch.err").read_text()
        assert time.monotonic() < end, "the server did not start"
        time.sleep(0.2)


TURN1 = [{"role": "user", "content": "Write a short poem about the sea."}]


def second_turn(client, answer: str):
    turn2 = TURN1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Thank you. One more?"}]
    return client.chat.completions.create(model="m", messages=turn2, max_tokens=12, temperature=0,
                                          extra_body={"thinking": {"type": "disabled"}})


def after_restart(url: str, answer: str) -> dict:
    """The second turn again, on a server restarted over the same --cache-dir."""
    import openai

    r2 = second_turn(openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=120, max_retries=0), answer)
    health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=30).read())
    return {"turn2": r2.choices[0].message.content, "cached": r2.usage.prompt_tokens_details.cached_tokens,
            "loaded_from_disk": health["prefix_cache"]["loaded_from_disk"]}


def serve_requests(url: str) -> dict:
    """What a client sees: a greedy answer, a second turn that resumes from the prefix cache,
    two requests at once (one batched decode step runs both) and a seeded sampled one (it runs
    alone, through mlx-lm's loop)."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=120, max_retries=0)
    off = {"thinking": {"type": "disabled"}}
    r1 = client.chat.completions.create(model="m", messages=TURN1, max_tokens=12, temperature=0, extra_body=off)
    r2 = second_turn(client, r1.choices[0].message.content)
    with ThreadPoolExecutor(2) as pool:
        both = [pool.submit(client.completions.create, model="m", prompt=p, max_tokens=10, temperature=0)
                for p in ("The sea is", "Once upon a time there was")]
        batch = [f.result().choices[0].text for f in both]
    seeded = client.chat.completions.create(model="m", messages=TURN1, max_tokens=10, temperature=0.9, top_p=0.95,
                                            seed=7, extra_body=off)
    return {"turn1": r1.choices[0].message.content, "turn2": r2.choices[0].message.content,
            "cached": r2.usage.prompt_tokens_details.cached_tokens, "prompt1": r1.usage.prompt_tokens,
            "batch": batch, "seeded": seeded.choices[0].message.content}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_gguf(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint as a GGUF: experts and a few projections in Q8_0 (packed modules), the
    rest F32."""
    model, _ = ds4mlx.load(tiny_ckpt, dtype=mx.float32)
    config = json.loads((tiny_ckpt / "config.json").read_text())
    modules = dict(model.named_modules())
    tensors = {}
    for path, value in tree_flatten(model.parameters()):
        if path.startswith("mtp.") or path.endswith(".scales"):
            continue
        mod = modules[path.rpartition(".")[0]]
        if isinstance(mod, (nn.QuantizedLinear, QuantizedSwitchLinear)):
            value = mx.dequantize(mod.weight, mod.scales, mod.get("biases"), group_size=mod.group_size,
                                  bits=mod.bits, mode=mod.mode, dtype=mx.float32)
        value = np.array(value)
        if value.dtype.kind in "iu":
            qtype = T.I32
            value = value.astype(np.int32)
        elif ".ffn.experts." in path or path.endswith(("wq_b.weight", "wo_b.weight")):
            qtype = T.Q8_0
        else:
            qtype = T.F32
        tensors[internal_to_gguf(path)] = (value, qtype)
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", config, tensors)


def _reference(path, k=None) -> dict[str, np.ndarray]:
    model, _ = ds4mlx.load(path, experts_per_token=k, dtype=mx.float32)
    return passes(model, TOKENS)


def _check(out: Path, name: str, reference: dict[str, np.ndarray]) -> None:
    for part, want in reference.items():
        got = np.load(out / f"{name}-{part}.npy")
        assert got.shape == want.shape, (name, part)
        assert rel(got, want) <= TOL, (name, part, rel(got, want))


@pytest.fixture(scope="module")
def two_ranks(tiny_ckpt, tiny_gguf, demo_dir, tmp_path_factory):
    """One 2-rank launch: the logits jobs, then generate, chat and a server (its answers taken
    here, then stopped with SIGTERM to rank 0, which lets rank 1 go)."""
    out = tmp_path_factory.mktemp("two")
    model, _ = ds4mlx.load(tiny_ckpt, dtype=mx.float32)
    one = model.make_cache()
    model(mx.array(TOKENS)[None], one)
    ds4mlx.save_prompt_cache(out / "one.safetensors", one)  # a one-process state, which the ranks refuse
    cli = [f"generate -m {demo_dir} -p 'hello there' --temp 0 -n 12 --no-think -q",
           f"chat -m {demo_dir} --temp 0 -n 6 --no-think -q",
           f"serve -m {demo_dir} --port 0 --cache-gb 1 --cache-dir {out / 'prefixes'}",
           f"serve -m {demo_dir} --port 0 --cache-gb 1 --cache-dir {out / 'prefixes'}"]  # restarted
    # mlx.launch copies its standard input to every rank (but never closes theirs: hence /quit)
    proc = start(2, out, ["--job", f"hf6={tiny_ckpt}", "--job", f"hf4={tiny_ckpt},4",
                          "--job", f"gguf6={tiny_gguf}", "--job", f"gguf4={tiny_gguf},4,3+2",
                          "--cache-job", str(tiny_ckpt), *[a for c in cli for a in ("--cli", c)]], stdin=CHAT_INPUT)
    try:
        answers = serve_requests(_server_url(out, proc, LAUNCH_TIMEOUT))
        os.kill(int((out / "pid-0").read_text()), signal.SIGTERM)
        answers["restarted"] = after_restart(_server_url(out, proc, 120, nth=2), answers["turn1"])
        os.kill(int((out / "pid-0").read_text()), signal.SIGTERM)
        proc.wait(60)
    finally:
        _stop(proc)
    err = (out / "launch.err").read_text()
    assert proc.returncode == 0 and (out / "cli-rc-3-1").exists(), err
    return out, cli, answers


# ----------------------------------------------------------------------------- the split itself


def test_balanced_split_is_the_best_contiguous_split():
    import itertools

    sizes = [7, 1, 1, 9, 3, 3, 2]
    for n in (1, 2, 3, 4):
        got = balanced_split(sizes, n, embed_bytes=4, head_bytes=5)
        cost = lambda b: max(sum(sizes[a:c]) + 4 * (i == 0) + 5 * (i == len(b) - 2)  # noqa: E731
                             for i, (a, c) in enumerate(zip(b, b[1:])))
        best = min(cost([0, *cuts, len(sizes)]) for cuts in itertools.combinations(range(1, len(sizes)), n - 1))
        assert cost([s.first for s in got] + [len(sizes)]) == best
        assert [s.stop for s in got][-1] == len(sizes) and all(s.stop > s.first for s in got)


def test_split_option_errors():
    assert [(s.first, s.stop) for s in parse_split("3,2", 5, 2)] == [(0, 3), (3, 5)]
    for text, size in (("3,3", 2), ("5,0", 2), ("3,2", 3), ("a,b", 2)):
        with pytest.raises(SplitError, match=text.replace("+", r"\+")):
            parse_split(text, 5, size)


def test_stages_read_disjoint_shares_of_the_file(tiny_ckpt):
    """Each stage's model holds exactly its layers (+ embedding / head) and together they hold
    the one-process model's parameters, value for value; the memory check's estimate of each
    stage is what it loads, and the stages' decode states add up to the whole one's."""
    full, _ = ds4mlx.load(tiny_ckpt, dtype=mx.float32)
    whole = dict(tree_flatten(full.parameters()))
    seen: dict[str, mx.array] = {}
    states = 0
    for stage in (Stage(0, 3, 0, 2, 5), Stage(1, 3, 2, 4, 5), Stage(2, 3, 4, 5, 5)):
        part, _ = ds4mlx.load(tiny_ckpt, dtype=mx.float32, stage=stage)
        params = dict(tree_flatten(part.parameters()))
        est = memory.estimate(tiny_ckpt, ctx=4096, dtype=mx.float32, stage=stage)
        loaded = sum(v.nbytes for v in params.values())
        assert abs(est.weights - loaded) <= 0.01 * loaded, (stage, est.weights, loaded)
        states += est.state
        layers = {int(p.split(".")[1]) for p in params if p.startswith("layers.")}
        assert layers == set(range(stage.first, stage.stop))
        assert ("embed.weight" in params) == (stage.rank == 0)
        assert ("head.weight" in params) == ("hc_head_fn" in params) == (stage.rank == 2)
        assert not set(params) & set(seen)
        seen.update(params)
    assert set(seen) == {p for p in whole if not p.startswith("mtp.")}
    for p, v in seen.items():
        assert mx.array_equal(v, whole[p]).item(), p
    assert states == memory.estimate(tiny_ckpt, ctx=4096, dtype=mx.float32).state > 0


def test_memory_check_refuses_a_rank_by_its_share(demo_dir, monkeypatch, capfd):
    """Under mlx.launch each rank checks its own share, before reading a weight, and says so."""
    from ds4mlx import distributed, loader
    from ds4mlx.cli import main

    stage = Stage(1, 2, 3, 5, 5)
    share = memory.estimate(demo_dir, ctx=4096, stage=stage).total
    assert share < memory.estimate(demo_dir, ctx=4096).total
    monkeypatch.setattr(distributed, "launched", lambda: True)
    monkeypatch.setattr(distributed, "this_stage", lambda *a: stage)
    monkeypatch.setattr(loader, "load", lambda *a, **k: pytest.fail("the loader was reached"))
    monkeypatch.setattr(memory, "device_memory", lambda: memory.DeviceMemory(share - 1, None))
    assert main(["generate", "-m", str(demo_dir), "-p", "hi", "--ctx", "4096"]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ds4mlx: error: rank 1/2: layers 3-4, head of "), err
    monkeypatch.setattr(memory, "device_memory", lambda: memory.DeviceMemory(share + (1 << 20), None))
    monkeypatch.setattr(distributed, "load", lambda *a, **k: (_ for _ in ()).throw(OSError("stopped at the load")))
    assert main(["generate", "-m", str(demo_dir), "-p", "hi", "--ctx", "4096"]) == 1
    assert "stopped at the load" in capfd.readouterr().err  # its share fits: it goes on to load


# ----------------------------------------------------------------------------- launched


def test_two_ranks_logits_match_one_process(two_ranks, tiny_ckpt, tiny_gguf):
    out, _, _ = two_ranks
    assert (out / "hf6-stage-0").read_text() != "0 5"  # really split
    assert (out / "gguf4-stage-0").read_text() == "0 3"  # --layers-split 3,2
    _check(out, "hf6", _reference(tiny_ckpt))
    _check(out, "hf4", _reference(tiny_ckpt, 4))
    _check(out, "gguf6", _reference(tiny_gguf))
    _check(out, "gguf4", _reference(tiny_gguf, 4))


@pytest.mark.parametrize("i", [0, 1], ids=["generate", "chat"])
def test_two_ranks_cli_greedy_text_matches_one_process(two_ranks, i):
    out, cli, _ = two_ranks
    one = subprocess.run([sys.executable, "-m", "ds4mlx", *shlex.split(cli[i])], env=_env(), capture_output=True,
                         text=True, timeout=LAUNCH_TIMEOUT, cwd=out, input=CHAT_INPUT)
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip() and (out / f"cli-{i}.txt").read_text() == one.stdout
    assert (out / f"cli-rc-{i}-0").read_text() == (out / f"cli-rc-{i}-1").read_text() == "0"


def test_two_ranks_prompt_cache_files(two_ranks, tiny_ckpt):
    """Each rank saves its own layers' state to its own file; loaded back, the decode goes on as
    one process's; a one-process file, or a file of another split, is refused with one line."""
    out, _, _ = two_ranks
    want = _reference(tiny_ckpt)["decode"]
    assert rel(np.load(out / "state-decode.npy"), want) <= TOL
    assert (out / "state.safetensors").exists() and (out / "rank1" / "state.safetensors").exists()
    for rank in (0, 1):
        one = (out / f"refused-one-{rank}.txt").read_text()
        if rank == 0:
            assert one.endswith("saved by one process, but this run is 2 processes with --layers-split 3,2; "
                                "load it with the same split"), one
        else:  # its own file is not there
            assert "rank1/one.safetensors: no such file: rank 1 of 2 processes" in one, one
        split = (out / f"refused-split-{rank}.txt").read_text()
        assert split.endswith("saved by 2 processes with --layers-split 3,2, but this run is 2 processes with "
                              "--layers-split 2,3; load it with the same split"), split
    with pytest.raises(PromptCacheError, match="saved by 2 processes with --layers-split 3,2, "
                       "but this run is one process"):
        ds4mlx.load_prompt_cache(out / "state.safetensors")


def test_two_ranks_server_answers_like_one_process(two_ranks, demo_dir):
    """Rank 0 serves, rank 1 runs every forward it announces (prefill segments, batched decode
    steps, prefix-cache snapshots of its own layers): a client sees what one process answers."""
    from ds4mlx.server import BackgroundServer, build_app

    out, _, split = two_ranks
    split = dict(split)
    split.pop("restarted")  # its own test below
    model, tokenizer = ds4mlx.load(demo_dir)  # as `ds4mlx serve` loads it
    with BackgroundServer(build_app(model, tokenizer, cache_bytes=1 << 30)) as server:
        alone = serve_requests(server.url)
    assert split == alone
    assert split["turn1"] and split["prompt1"] - 1 <= split["cached"]  # the second turn resumed
    for i in (2, 3):
        assert (out / f"cli-rc-{i}-0").read_text() == (out / f"cli-rc-{i}-1").read_text() == "0"
    # rank 1 let go holding exactly the states rank 0 still names (the dropped ones freed)
    err = (out / "launch.err").read_text()
    live = re.findall(r"rank 0: letting the other ranks go; (\d+) states", err)
    held = re.findall(r"rank 1: let go by rank 0, holding (\d+) states", err)
    assert len(live) == 2 and live == held and int(live[0]) > 0, err


def test_two_ranks_server_prefix_files_survive_a_restart(two_ranks):
    """--cache-dir under mlx.launch: each rank writes its own layers' file of every snapshot;
    restarted, the server resumes the second turn from them, as it did from memory."""
    out, _, split = two_ranks
    ranks0 = sorted(p.name for p in (out / "prefixes").glob("*.safetensors"))
    assert ranks0 and ranks0 == sorted(p.name for p in (out / "prefixes" / "rank1").iterdir())
    assert split["restarted"]["loaded_from_disk"] >= 1
    # the first run's snapshot at the end of the second prompt's reuse points is on disk now
    assert split["restarted"]["turn2"] == split["turn2"] and split["restarted"]["cached"] > split["cached"]


@pytest.mark.slow
def test_three_ranks_on_five_layers(tiny_ckpt, tiny_gguf, tmp_path):
    r = launch(3, tmp_path, ["--job", f"hf6={tiny_ckpt}", "--job", f"gguf4={tiny_gguf},4"])
    assert r.returncode == 0 and (tmp_path / "gguf4-decode.npy").exists(), r.stdout + r.stderr
    stages = [tuple(map(int, (tmp_path / f"hf6-stage-{i}").read_text().split())) for i in range(3)]
    assert stages[0][0] == 0 and stages[-1][1] == 5 and all(a[1] == b[0] for a, b in zip(stages, stages[1:]))
    _check(tmp_path, "hf6", _reference(tiny_ckpt))
    _check(tmp_path, "gguf4", _reference(tiny_gguf, 4))


def _wait_for(path: Path, proc: subprocess.Popen, limit: float) -> None:
    end = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path.name} did not appear"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _start_hanging(out: Path, model: Path, **env) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(_launch_cmd(2, [str(out), "--mode", "hang", "--job", f"m={model}"]), env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out,
                            start_new_session=True)


def test_killed_rank_stops_the_other_within_30s(tiny_ckpt, tmp_path):
    proc = _start_hanging(tmp_path, tiny_ckpt)
    try:
        _wait_for(tmp_path / "running-0", proc, LAUNCH_TIMEOUT)
        _wait_for(tmp_path / "running-1", proc, 60)
        pids = [int((tmp_path / f"pid-{r}").read_text()) for r in (0, 1)]
        time.sleep(1)  # decoding
        os.kill(pids[1], signal.SIGKILL)
        tic = time.monotonic()
        while _alive(pids[0]) and time.monotonic() - tic < 30:
            time.sleep(0.1)
        assert not _alive(pids[0]), "rank 0 still runs 30 s after rank 1 was killed"
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # mlx.launch ends the other ranks, or rank 0 sees the connection go first
    assert "rank 1 exited with code -9" in err or "DistributedError" in err, err


@pytest.mark.slow
def test_hung_rank_stops_the_other_by_the_watchdog(tiny_ckpt, tmp_path):
    proc = _start_hanging(tmp_path, tiny_ckpt, DS4MLX_DIST_TIMEOUT="3")
    pids = []
    try:
        _wait_for(tmp_path / "running-0", proc, LAUNCH_TIMEOUT)
        _wait_for(tmp_path / "running-1", proc, 60)
        pids = [int((tmp_path / f"pid-{r}").read_text()) for r in (0, 1)]
        time.sleep(1)
        os.kill(pids[1], signal.SIGSTOP)  # alive, connection open, never answers
        tic = time.monotonic()
        while _alive(pids[0]) and time.monotonic() - tic < 30:
            time.sleep(0.1)
        waited = time.monotonic() - tic
        assert not _alive(pids[0]), "rank 0 still waits 30 s after rank 1 stopped answering"
        os.kill(pids[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "ds4mlx: error: rank 0:" in err and "no answer in 3 s" in err, err
    assert waited < 15


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_layers_split_needs_the_launcher(demo_dir, command, capfd):
    from ds4mlx.cli import main

    extra = ["-p", "hi"] if command == "generate" else []
    assert main([command, "-m", str(demo_dir), "--layers-split", "3,2", *extra]) != 0
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--layers-split splits the model over the processes of mlx.launch" in err[0], err

"""The model split by layers over 1, 2 and 3 processes on this machine (``mlx.launch --backend
ring --hosts 127.0.0.1``): greedy decode tokens/s, bytes each rank sends per token, peak RSS of
each rank and the bytes of the weights it holds.

Bytes sent are measured from the kernel's TCP counters of the rank's own sockets (``ss -tinp``,
Linux); elsewhere the rank's own count of what it handed to send / all_sum is shown. The
streams between two ranks are ``hc_mult × hidden × 4`` bytes per token; the logits' all_sum
adds ``2 (n-1)/n × vocab × 4`` per rank.

    python scripts/bench_distributed.py [--model DIR|FILE.gguf] [--tokens 32]

``--serve``: ``ds4mlx serve`` alone and under the launcher on the demo model (it has a
tokenizer): decode tokens/s of one request and of four at once (completion tokens over wall
time, the prompt's prefill included), and each rank's peak RSS.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [5, 17, 900, 3, 42, 42, 7, 1000, 64, 11, 300, 2]


def tcp_bytes_sent() -> int | None:
    """Bytes this process has sent on its TCP sockets (None without ``ss``)."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True).stdout
    total, mine = 0, False
    for line in out.splitlines():
        if not line[:1].isspace():
            mine = f"pid={os.getpid()}," in line
        elif mine and (m := re.search(r"bytes_sent:(\d+)", line)):
            total += int(m.group(1))
    return total


def worker(model_path: str, out: Path, n: int) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ds4mlx import distributed, load

    importlib.import_module("ds4mlx.loader")  # the imports' own memory is the baseline

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if distributed.launched():
        model, _ = distributed.load(model_path, dtype=mx.float32)
        rank, stage = model.stage.rank, model.stage.describe()
    else:
        model, _ = load(model_path, dtype=mx.float32)
        rank, stage = 0, "one process"
    mlx_bytes = mx.get_active_memory()
    cache, tok = model.make_cache(), mx.array([[PROMPT[-1]]])
    mx.eval(model(mx.array(PROMPT)[None], cache))
    counted, tcp, tic = getattr(model, "sent_bytes", 0), tcp_bytes_sent(), time.perf_counter()
    for _ in range(n):
        tok = mx.argmax(model(tok, cache)[:, -1:], axis=-1)
        mx.eval(tok)
    seconds = time.perf_counter() - tic
    tcp_after = tcp_bytes_sent()
    c = model.config
    result = {
        "rank": rank, "stage": stage, "tokens_per_s": n / seconds,
        "sent_per_token": (tcp_after - tcp) / n if tcp is not None else None,
        "counted_per_token": (getattr(model, "sent_bytes", 0) - counted) / n,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "base_rss": base_rss, "mlx_after_load": mlx_bytes,
        "weights": sum(v.nbytes for _, v in tree_flatten(model.parameters())),
        "streams_per_token": c.hc_mult * c.hidden_size * 4, "logits_per_token": c.vocab_size * 4,
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(result))


def run(ranks: int, model: str, out: Path, n: int) -> list[dict]:
    out.mkdir(parents=True)
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), "--model", model, "--tokens", str(n)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if ranks > 1:
        me = [str(Path(sys.executable).with_name("mlx.launch")), "-n", str(ranks), "--backend", "ring",
              "--hosts", "127.0.0.1", "--", *me]
    r = subprocess.run(me, env=env, capture_output=True, text=True, timeout=900)
    found = sorted(out.glob("rank-*.json"))
    if len(found) != ranks:
        sys.exit(f"bench_distributed: {ranks} ranks: {r.stderr.strip().splitlines()[-1:]}")
    return [json.loads(p.read_text()) for p in found]


def _post(url: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def _servers(tag: str) -> dict[int, int]:
    """``{rank: pid}`` of the ``ds4mlx serve`` processes started with DS4MLX_BENCH_TAG=tag."""
    out = {}
    for d in Path("/proc").iterdir():
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:4] == [b"-m", b"ds4mlx", b"serve"] and f"DS4MLX_BENCH_TAG={tag}".encode() in env:
            out[next((int(e.split(b"=")[1]) for e in env if e.startswith(b"MLX_RANK=")), 0)] = int(d.name)
    return out


def _peak_rss(pid: int) -> int:
    m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) * 1024 if m else 0


def serve_bench(ranks: int, model: str, out: Path, n: int) -> dict:
    """Tokens/s of the server (one request, then four at once) and each rank's peak RSS."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    out.mkdir(parents=True)
    tag = f"{os.getpid()}-{ranks}"
    cmd = [sys.executable, "-m", "ds4mlx", "serve", "-m", model, "--port", "0", "--cache-gb", "0"]
    if ranks > 1:
        cmd = [str(Path(sys.executable).with_name("mlx.launch")), "-n", str(ranks), "--backend", "ring",
               "--hosts", "127.0.0.1", "--", *cmd]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               DS4MLX_BENCH_TAG=tag)
    err = open(out / "err.txt", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        end = time.monotonic() + 600
        while not (m := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", (out / "err.txt").read_text())):
            if proc.poll() is not None or time.monotonic() > end:
                sys.exit(f"bench_distributed: the server did not start: {(out / 'err.txt').read_text()[-500:]}")
            time.sleep(0.2)
        url = m.group(1) + "/v1/completions"

        def ask(prompt: str) -> int:
            body = {"model": "m", "prompt": prompt, "max_tokens": n, "temperature": 0}
            return _post(url, body)["usage"]["completion_tokens"]

        ask("warm up")
        tic = time.perf_counter()
        one = ask("The sea is") / (time.perf_counter() - tic)
        tic = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            four = sum(pool.map(ask, ["The sea is", "Once upon a time", "Why is the sky", "A list of"]))
        four /= time.perf_counter() - tic
        servers = _servers(tag)
        rss = {rank: _peak_rss(pid) for rank, pid in servers.items()}
        os.kill(servers[0], signal.SIGTERM)  # rank 0 (or the only process) stops the others
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"one": one, "four": four, "rss": rss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the tiny checkpoint, written to a temporary folder")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--ranks", default="1,2,3")
    p.add_argument("--wide", action="store_true", help="a wider tiny checkpoint (hidden 1024, 32 experts), "
                   "whose weights outweigh the interpreter's memory")
    p.add_argument("--serve", action="store_true", help="the server's tokens/s and peak RSS per rank (1 and 2 ranks)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker is not None:
        return worker(a.model, a.worker, a.tokens)
    if a.serve:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{'ranks':>5} {'tok/s one':>9} {'tok/s four':>10}  peak RSS MB by rank")
            for ranks in map(int, a.ranks.replace("1,2,3", "1,2").split(",")):
                r = serve_bench(ranks, a.model or "demo", Path(tmp) / f"s{ranks}", a.tokens)
                rss = ", ".join(f"{k}: {v / 1e6:.0f}" for k, v in sorted(r["rss"].items()))
                print(f"{ranks:>5} {r['one']:>9.1f} {r['four']:>10.1f}  {rss}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model
        if model is None:
            sys.path.insert(0, str(ROOT))
            from ds4mlx.synthetic import write_tiny_checkpoint

            wide = dict(hidden_size=1024, n_routed_experts=32, moe_intermediate_size=1024) if a.wide else {}
            model = str(write_tiny_checkpoint(Path(tmp) / "tiny", seed=0, **wide))
        one_weights = None
        print(f"{'ranks':>5} {'rank':>4} {'tok/s':>7} {'sent B/tok':>10} {'counted':>8} {'weights MB':>10} "
              f"{'share':>6} {'MLX MB':>7} {'RSS+ MB':>8} {'RSS MB':>7}  stage")
        for ranks in map(int, a.ranks.split(",")):
            rows = run(ranks, model, Path(tmp) / f"r{ranks}", a.tokens)
            one_weights = one_weights or (rows[0]["weights"] if ranks == 1 else None)
            for row in rows:
                share = row["weights"] / one_weights if one_weights else float("nan")
                sent = "-" if row["sent_per_token"] is None else f"{row['sent_per_token']:.0f}"
                print(f"{ranks:>5} {row['rank']:>4} {row['tokens_per_s']:>7.1f} {sent:>10} "
                      f"{row['counted_per_token']:>8.0f} {row['weights'] / 1e6:>10.2f} {share:>6.2f} "
                      f"{row['mlx_after_load'] / 1e6:>7.1f} {(row['peak_rss'] - row['base_rss']) / 1e6:>8.1f} "
                      f"{row['peak_rss'] / 1e6:>7.1f}  {row['stage']}")
        r0 = rows[0]
        print(f"streams per boundary per token: {r0['streams_per_token']} B; logits: {r0['logits_per_token']} B; "
              "MLX MB: MLX's memory after loading; RSS+ MB: peak RSS above the imports' own")


if __name__ == "__main__":
    main()

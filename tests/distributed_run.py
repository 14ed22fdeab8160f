"""Run under ``mlx.launch`` by tests/test_distributed.py and scripts/bench_distributed.py: one
rank of a pipeline-split model computes logits (prefill, chunked prefill, decode) and rank 0
saves them as .npy files in OUT; ``--mode hang`` keeps decoding (for the kill tests)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from ds4mlx import distributed

TOKENS = [5, 17, 900, 3, 42, 42, 7, 1000, 64, 11, 300, 2, 77, 5, 19, 640, 33, 8]  # past the window of 16
CHUNK = 7
DECODE = 4


def passes(model, tokens: list[int]) -> dict[str, np.ndarray]:
    """Logits of one prefill, of a prefill in chunks, and of single-token decode steps."""
    ids = mx.array(tokens)[None]
    out = {"prefill": np.array(model(ids, model.make_cache()))}
    cache = model.make_cache()
    parts = [model(ids[:, i:i + CHUNK], cache) for i in range(0, ids.shape[1], CHUNK)]
    out["chunked"] = np.array(mx.concatenate(parts, axis=1))
    cache = model.make_cache()
    n = len(tokens) - DECODE
    steps = [model(ids[:, :n], cache)[:, -1:]]
    steps += [model(ids[:, i:i + 1], cache) for i in range(n, len(tokens))]
    out["decode"] = np.array(mx.concatenate(steps, axis=1))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--job", action="append", default=[],
                   help="NAME=MODEL[,EXPERTS[,SPLIT]]: save NAME-{prefill,chunked,decode}.npy (SPLIT as 2+3)")
    p.add_argument("--cli", action="append", default=[],
                   help="a ds4mlx command line (serve too), run after the jobs; rank 0's stdout to cli-I.txt")
    p.add_argument("--cache-job", metavar="MODEL", help="decode with the state saved and loaded on the way "
                   "(state-decode.npy), then load OUT/one.safetensors (one process's) and, split 2,3, the saved "
                   "state: refused-{one,split}-RANK.txt")
    p.add_argument("--mode", choices=("logits", "hang", "bench"), default="logits")
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args()
    rank = distributed.world().rank()
    (a.out / f"pid-{rank}").write_text(str(os.getpid()))
    for job in a.job:
        name, _, spec = job.partition("=")
        model_path, experts, split = (spec.split(",") + ["", ""])[:3]
        model, _ = distributed.load(model_path, layers_split=split.replace("+", ",") or None,
                                    experts_per_token=int(experts) if experts else None, dtype=mx.float32)
        (a.out / f"{name}-stage-{rank}").write_text(f"{model.stage.first} {model.stage.stop}")
        if a.mode == "logits":
            results = passes(model, TOKENS)
            if rank == 0:
                for part, value in results.items():
                    np.save(a.out / f"{name}-{part}.npy", value)
        elif a.mode == "hang":
            hang(model, a.out)
        else:
            bench(model, a.out / f"{name}-bench-{rank}.txt", a.tokens)
    if a.cache_job:
        cache_job(a.cache_job, a.out, rank)
    for i, command in enumerate(a.cli):
        from ds4mlx.console import main as console_main  # SIGTERM as `ds4mlx` takes it (a served model's stop)

        stdout = sys.stdout
        if rank == 0:
            sys.stdout = open(a.out / f"cli-{i}.txt", "w")
        code = console_main(shlex.split(command))
        sys.stdout.flush()
        sys.stdout = stdout
        (a.out / f"cli-rc-{i}-{rank}").write_text(str(code))


def cache_job(model_path: str, out: Path, rank: int) -> None:
    """``passes``'s decode, the state saved after the prefill and the steps run on it loaded
    back; then the loads a split must refuse."""
    from ds4mlx import load_prompt_cache, save_prompt_cache
    from ds4mlx.prompt_cache import PromptCacheError

    model, _ = distributed.load(model_path, dtype=mx.float32)
    ids, n = mx.array(TOKENS)[None], len(TOKENS) - DECODE
    cache = model.make_cache()
    steps = [model(ids[:, :n], cache)[:, -1:]]
    save_prompt_cache(out / "state.safetensors", cache, {"tokens": str(n)})
    cache, meta = load_prompt_cache(out / "state.safetensors", return_metadata=True)
    assert meta["tokens"] == str(n) and cache[0].offset == n
    steps += [model(ids[:, i:i + 1], cache) for i in range(n, len(TOKENS))]
    steps = np.array(mx.concatenate(steps, axis=1))  # on every rank: the prefill's other logits are shared lazily
    if rank == 0:
        np.save(out / "state-decode.npy", steps)
    for name, split in (("one", None), ("split", "2,3")):
        if split:
            distributed.load(model_path, dtype=mx.float32, layers_split=split)
        try:
            load_prompt_cache(out / ("one.safetensors" if name == "one" else "state.safetensors"))
            message = "loaded"
        except PromptCacheError as e:
            message = str(e)
        (out / f"refused-{name}-{rank}.txt").write_text(message)


def hang(model, out: Path) -> None:
    """Decode until killed from outside (the kill tests)."""
    cache, tok = model.make_cache(), mx.array([[5]])
    (out / f"running-{model.stage.rank}").write_text("1")
    while True:
        tok = mx.argmax(model(tok, cache)[:, -1:], axis=-1)


def bench(model, out: Path, n: int) -> None:
    """Greedy decode speed, bytes this rank sends per token, peak RSS, bytes of its weights."""
    import resource

    from mlx.utils import tree_flatten

    cache, tok = model.make_cache(), mx.array([[5]])
    mx.eval(model(mx.array(TOKENS)[None], cache))
    sent, tic = model.sent_bytes, time.perf_counter()
    for _ in range(n):
        tok = mx.argmax(model(tok, cache)[:, -1:], axis=-1)
        mx.eval(tok)
    dt = time.perf_counter() - tic
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    out.write_text(f"{n / dt} {(model.sent_bytes - sent) / n} {rss} {weights}")


if __name__ == "__main__":
    main()

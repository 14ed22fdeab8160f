"""Run under ``mlx.launch`` by tests/test_distributed.py and scripts/bench_distributed.py: one
rank of a pipeline-split model computes logits (prefill, chunked prefill, decode) and rank 0
saves them as .npy files in OUT; ``--mode hang`` keeps decoding (for the kill tests)."""

from __future__ import annotations

import argparse
import os
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
    p.add_argument("model")
    p.add_argument("out", type=Path)
    p.add_argument("--split", default=None)
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--mode", choices=("logits", "hang", "bench"), default="logits")
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args()
    model, _ = distributed.load(a.model, layers_split=a.split, experts_per_token=a.experts, dtype=mx.float32)
    rank = model.stage.rank
    (a.out / f"pid-{rank}").write_text(str(os.getpid()))
    (a.out / f"stage-{rank}").write_text(f"{model.stage.first} {model.stage.stop}")
    if a.mode == "logits":
        results = passes(model, TOKENS)
        if rank == 0:
            for name, value in results.items():
                np.save(a.out / f"{name}.npy", value)
    elif a.mode == "hang":  # decode until killed from outside
        cache, tok = model.make_cache(), mx.array([[5]])
        (a.out / f"running-{rank}").write_text("1")
        while True:
            tok = mx.argmax(model(tok, cache)[:, -1:], axis=-1)
    else:  # bench: greedy decode speed and bytes sent per token
        cache, tok = model.make_cache(), mx.array([[5]])
        mx.eval(model(mx.array(TOKENS)[None], cache))
        sent0, tic = model.sent_bytes, time.perf_counter()
        for _ in range(a.tokens):
            tok = mx.argmax(model(tok, cache)[:, -1:], axis=-1)
            mx.eval(tok)
        dt = time.perf_counter() - tic
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        params = sum(v.nbytes for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
        (a.out / f"bench-{rank}.txt").write_text(
            f"{a.tokens / dt} {(model.sent_bytes - sent0) / a.tokens} {rss} {params}")


if __name__ == "__main__":
    main()

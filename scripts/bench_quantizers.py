#!/usr/bin/env python3
"""Weights/s per core of each GGUF quantizer: today's (``ds4mlx.quant.gguf``) next to the
previous numpy implementation (``tests/gguf_quant_reference.py``), on the same Gaussian weights,
in one process with one BLAS thread, old and new interleaved (best of ``--repeat``), timed in
this process's CPU time, so that a busy machine (other processes on the cores) affects the
figures little. Also checks that both give the same bytes.

    python scripts/bench_quantizers.py [--rows 128] [--cols 4096] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ.setdefault(var, "1")  # per-core figures (what each convert worker gets)

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ds4mlx.quant import gguf  # noqa: E402
import gguf_quant_reference as reference  # noqa: E402

TYPES = ("Q8_0", "Q4_K", "Q2_K", "IQ2_XXS", "MXFP4")


def best_time(fn, x, repeat: int) -> tuple[float, np.ndarray]:
    out, best = None, float("inf")
    for _ in range(repeat):
        t = time.process_time()
        out = fn(x)
        best = min(best, time.process_time() - t)
    return best, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    x = np.random.default_rng(0).standard_normal((args.rows, args.cols), dtype=np.float32) * 0.02
    print(f"{'type':8s} {'before':>8s} {'after':>8s}  M weights/s/core  speed-up  same bytes")
    for name in TYPES:
        new = gguf.get(name).quantize
        old = reference.QUANTIZE.get(name, new)  # Q8_0 did not change
        t_old = t_new = float("inf")
        for _ in range(args.repeat):  # interleaved
            a, out_old = best_time(old, x, 1)
            b, out_new = best_time(new, x, 1)
            t_old, t_new = min(t_old, a), min(t_new, b)
        same = np.array_equal(out_old, out_new)
        print(f"{name:8s} {x.size / t_old / 1e6:8.2f} {x.size / t_new / 1e6:8.2f}  {'':16s}  "
              f"{t_old / t_new:7.2f}x  {same}")


if __name__ == "__main__":
    main()

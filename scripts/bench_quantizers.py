#!/usr/bin/env python3
"""Weights/s of each GGUF quantizer (numpy, one process), on Gaussian weights.

    python scripts/bench_quantizers.py [--rows 256] [--cols 4096]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds4mlx.quant import gguf  # noqa: E402

TYPES = ("Q8_0", "Q4_K", "Q2_K", "IQ2_XXS", "MXFP4")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--cols", type=int, default=4096)
    args = p.parse_args(argv)
    x = np.random.default_rng(0).standard_normal((args.rows, args.cols), dtype=np.float32) * 0.02
    for name in TYPES:
        t = time.perf_counter()
        gguf.get(name).quantize(x)
        dt = time.perf_counter() - t
        print(f"{name:8s} {x.size / dt / 1e6:7.2f} M weights/s (one process)")


if __name__ == "__main__":
    main()

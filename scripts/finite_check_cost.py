#!/usr/bin/env python3
"""What the load-time NaN/Inf check (``load(check_finite=True)``, the default) costs.

    python scripts/finite_check_cost.py [--hidden 1024] [--experts 32] [--layers 4] [--repeats 3]

Writes a synthetic official-format checkpoint (``synthetic.write_tiny_checkpoint`` with wider
layers and more experts, so the weights are hundreds of MB rather than the test profile's 11),
then loads it alternately with the check on and off, in this process, and reports the best time
of each, their ratio, and the check's own rate over the bytes it reads (every float tensor, the
FP8 codes and the E8M0 scales; packed FP4 codes cannot hold NaN and are skipped).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from ds4mlx import loader  # noqa: E402
from ds4mlx.synthetic import write_tiny_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(Path(tmp) / "ckpt", num_layers=args.layers, hidden_size=args.hidden,
                                     moe_intermediate_size=args.hidden, n_routed_experts=args.experts,
                                     num_hash_layers=min(3, args.layers), mtp=False)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for check in (False, True):
                t = time.perf_counter()
                model = loader.load_dir(path, dtype=mx.float32, check_finite=check)
                mx.eval(model.parameters())
                times[check].append(time.perf_counter() - t)
                del model

        # the check alone, over the weights in their stored forms, as load_into sees them
        checkpoint = loader.open_checkpoint(path)
        weights, formats = checkpoint.load_weights(include_mtp=False)
        checkpoint.close()
        mx.eval(list(weights.values()))
        t = time.perf_counter()
        loader.check_all_finite(weights, formats, str(path))
        alone = time.perf_counter() - t
        checked = sum(a.nbytes for p, a in weights.items()
                      if loader._non_finite(a, formats.get(p.rpartition(".")[0]), p.rpartition(".")[2]) is not None)

    off, on = min(times[False]), min(times[True])
    print(f"checkpoint: {size / 1e6:.0f} MB on disk, {args.layers} layers, {args.experts} experts, hidden {args.hidden}")
    print(f"load without check: {off:.2f} s   with check: {on:.2f} s   ratio {on / off:.3f}")
    print(f"check alone: {alone:.3f} s over {checked / 1e6:.0f} MB in memory ({checked / alone / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Write a tiny DeepSeek V4 Flash checkpoint in the exact official on-disk format.

    python scripts/make_tiny_checkpoint.py OUT_DIR [--seed N] [--4expert] [--vocab-size V] ...
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds4mlx.synthetic import make_4expert, write_tiny_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--4expert", dest="four_expert", action="store_true",
                   help="write the 4Expert variant (num_experts_per_tok=4, tid2eid cut to 4 columns)")
    p.add_argument("--num-layers", type=int, default=5)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--index-topk", type=int, default=4)
    p.add_argument("--sliding-window", type=int, default=16)
    p.add_argument("--num-shards", type=int, default=3)
    p.add_argument("--no-mtp", dest="mtp", action="store_false", help="leave out the MTP block")
    args = p.parse_args(argv)

    kwargs = dict(seed=args.seed, num_layers=args.num_layers, vocab_size=args.vocab_size,
                  hidden_size=args.hidden_size, index_topk=args.index_topk,
                  sliding_window=args.sliding_window, num_shards=args.num_shards, mtp=args.mtp)
    if not args.four_expert:
        write_tiny_checkpoint(args.out, **kwargs)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            make_4expert(write_tiny_checkpoint(Path(tmp) / "six", **kwargs), args.out)
    print(args.out)


if __name__ == "__main__":
    main()

"""Speculative decoding side by side: greedy tokens/s and forward passes per generated token
without drafts, with MTP drafts (N = 1..3) and with drafts forced to the target's own greedy
tokens (the ceiling: every draft accepted). Each run's output is checked against the plain one.

    python scripts/bench_speculative.py [--model demo] [--tokens 128] [--prompt-tokens 64]

On the tiny random-weight demo model the MTP block guesses almost nothing, so its rows show the
cost of drafting; the forced rows show what a perfect drafter gains on this machine.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

from ds4mlx import load
from ds4mlx.speculative import ForcedDrafter, MTPDrafter, SpeculativeStats, speculative_generate_step


def run(model, prompt, drafter, n_draft, tokens):
    stats = SpeculativeStats()
    steps = speculative_generate_step(prompt, model, drafter, num_draft_tokens=n_draft, max_tokens=tokens + 1,
                                      stats=stats)
    out = [next(steps)[0]]  # the prefill's token: not timed
    tic = time.perf_counter()
    out += [t for t, _, _ in steps]
    return out, time.perf_counter() - tic, stats


def plain(model, prompt, tokens):
    """mlx-lm's own loop, no drafts: the reference output and time."""
    from mlx_lm.generate import generate_step

    steps = generate_step(prompt, model, max_tokens=tokens + 1, sampler=lambda x: mx.argmax(x, -1),
                          prompt_cache=model.make_cache())
    out = [next(steps)[0]]
    tic = time.perf_counter()
    out += [t for t, _ in steps]
    return out, time.perf_counter() - tic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--tokens", type=int, default=128, help="generated tokens per run (after the first)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model, _ = load(args.model, mtp=True)
    rng = np.random.default_rng(args.seed)
    prompt = mx.array(rng.integers(2, model.config.vocab_size, size=args.prompt_tokens), dtype=mx.int32)
    base, base_s = plain(model, prompt, args.tokens)
    rows = [("none (mlx-lm)", 0, base_s, SpeculativeStats(forwards=args.tokens, tokens=args.tokens))]
    for n in (1, 2, 3):
        for name, drafter in (("MTP", MTPDrafter()), ("forced greedy", ForcedDrafter(base))):
            out, s, stats = run(model, prompt, drafter, n, args.tokens)
            assert out == base, f"{name} N={n}: output differs from greedy without drafts"
            rows.append((name, n, s, stats))
    print(f"model {args.model}, prompt {args.prompt_tokens} tokens, {args.tokens} generated tokens, greedy")
    print(f"{'drafter':>14} {'N':>2} {'tokens/s':>9} {'vs none':>8} {'forwards/token':>15} "
          f"{'tokens/forward':>15} {'accepted':>9}")
    for name, n, s, stats in rows:
        forwards = stats.forwards / args.tokens
        print(f"{name:>14} {n:>2} {args.tokens / s:9.2f} {base_s / s:7.2f}x {forwards:15.3f} "
              f"{stats.tokens_per_forward:15.2f} {100 * stats.acceptance_rate:8.1f}%")


if __name__ == "__main__":
    main()

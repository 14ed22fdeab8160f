"""``ds4mlx bench``: prefill and generation speed at context frontiers, ds4-bench style.

One context grows through the frontiers (2k, 4k, 8k, ...): at each, the tokens since the last
one are prefilled in chunks (prefill tokens/s at that depth), then ``gen_tokens`` tokens are
decoded greedily (generation tokens/s at that depth). Prompt tokens are random ids from a fixed
seed, so runs are repeatable. Results go to CSV and, when matplotlib is installed, a plot.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, TextIO

import mlx.core as mx
import mlx.nn as nn
import numpy as np

DEFAULT_CONTEXTS = (2048, 4096, 8192, 16384, 32768, 65536)
DEFAULT_GEN_TOKENS = 32


@dataclass
class BenchRow:
    context: int  # tokens in the state when generation starts
    prefill_tokens: int
    prefill_s: float
    prefill_tps: float
    gen_tokens: int
    gen_s: float
    gen_tps: float
    state_bytes: int  # decode state after the prefill
    peak_memory_gb: float


CSV_FIELDS = tuple(f.name for f in fields(BenchRow))


def parse_contexts(text: str) -> list[int]:
    """``"2k,4096,8K"`` -> ``[2048, 4096, 8192]`` (k = 1024), checked to increase."""
    values = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        try:
            values.append(int(part.rstrip("k")) * scale)
        except ValueError:
            raise ValueError(f"--contexts: {part!r} is not a token count (e.g. 2048 or 2k)") from None
    if not values or any(v < 2 for v in values):
        raise ValueError("--contexts needs token counts of at least 2, e.g. 2k,4k,8k")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"--contexts must increase, got {values}")
    return values


def run_bench(
    model: nn.Module,
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    *,
    gen_tokens: int = DEFAULT_GEN_TOKENS,
    prefill_step: int = 2048,
    seed: int = 0,
    on_row: Optional[Callable[[BenchRow], None]] = None,
) -> Iterator[BenchRow]:
    """Measure at each frontier; frontiers must leave room for the generated tokens."""
    from .state import cache_nbytes

    if gen_tokens < 1 or prefill_step < 1:
        raise ValueError("gen_tokens and prefill_step must be positive")
    config = model.config
    limit = config.max_position_embeddings
    pos = 0
    for a, b in zip(contexts, list(contexts[1:]) + [None]):
        if b is not None and b < a + gen_tokens + 1:
            raise ValueError(f"context {b} is too close to {a}: each frontier must exceed the previous one "
                             f"by more than --gen-tokens ({gen_tokens})")
    if contexts[-1] + gen_tokens > limit:
        raise ValueError(f"context {contexts[-1]} + {gen_tokens} generated tokens exceeds the model's "
                         f"max_position_embeddings ({limit})")
    rng = np.random.default_rng(seed)
    cache = model.make_cache()
    for ctx in contexts:
        n = ctx - pos
        tokens = mx.array(rng.integers(0, config.vocab_size, size=(1, n)), dtype=mx.int32)
        mx.eval(tokens)
        mx.reset_peak_memory()
        tic = time.perf_counter()
        for start in range(0, n, prefill_step):
            logits = model(tokens[:, start : start + prefill_step], cache=cache)
            if start + prefill_step < n:
                mx.eval([c.state for c in cache])  # the chunk's logits are never needed
        y = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(y, [c.state for c in cache])
        prefill_s = time.perf_counter() - tic
        state_bytes = cache_nbytes(cache)

        tic = time.perf_counter()
        for _ in range(gen_tokens):
            logits = model(y[:, None], cache=cache)
            y = mx.argmax(logits[:, -1, :], axis=-1)
            mx.async_eval(y)  # build the next step while this one runs
        mx.eval(y)
        gen_s = time.perf_counter() - tic
        pos = ctx + gen_tokens
        row = BenchRow(
            context=ctx, prefill_tokens=n, prefill_s=prefill_s, prefill_tps=n / prefill_s,
            gen_tokens=gen_tokens, gen_s=gen_s, gen_tps=gen_tokens / gen_s,
            state_bytes=state_bytes, peak_memory_gb=mx.get_peak_memory() / 1e9,
        )
        if on_row is not None:
            on_row(row)
        yield row


def write_csv(rows: Sequence[BenchRow], out: TextIO) -> None:
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        d = asdict(row)
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in d.items()})


def plot(rows: Sequence[BenchRow], path: str | Path, title: str = "ds4mlx bench") -> bool:
    """Prefill and generation tokens/s against context as a PNG; False when matplotlib is
    not installed (the plot is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ctx = [r.context for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, values, label in ((axes[0], [r.prefill_tps for r in rows], "prefill tokens/s"),
                              (axes[1], [r.gen_tps for r in rows], "generation tokens/s")):
        ax.plot(ctx, values, marker="o")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)  # rates read as ratios: an axis from zero does not exaggerate a dip
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def format_row(row: BenchRow) -> str:
    return (f"context {row.context:>7}: prefill {row.prefill_tps:8.1f} tokens/s ({row.prefill_tokens} tokens), "
            f"generation {row.gen_tps:6.1f} tokens/s, state {row.state_bytes / 1e6:.1f} MB, "
            f"peak {row.peak_memory_gb:.2f} GB")

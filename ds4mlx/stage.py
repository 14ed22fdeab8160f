"""One pipeline stage: the contiguous range of layers one process holds when the model is split
by layers over several processes (``ds4mlx.distributed``), and which tensors that means.

The first stage also holds the embedding, the last one the head (final norm, HC head, output
projection). Tensor names here are official or internal ones alike: both start with
``layers.N.`` for a block and use the same global names (``embed.weight``, ``head.weight``,
``norm.weight``, ``hc_head_*``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

_BLOCK = re.compile(r"^(layers|mtp)\.(\d+)\.")


class SplitError(ValueError):
    """A layer split that cannot be used (the message names the value)."""


@dataclass(frozen=True)
class Stage:
    """Layers ``first .. stop-1`` of ``num_layers``, on rank ``rank`` of ``size``."""

    rank: int
    size: int
    first: int
    stop: int
    num_layers: int

    @property
    def embeds(self) -> bool:
        return self.rank == 0

    @property
    def heads(self) -> bool:
        return self.rank == self.size - 1

    def holds_layer(self, i: int) -> bool:
        return self.first <= i < self.stop

    def holds(self, name: str) -> bool:
        """Whether this stage reads tensor ``name`` (the MTP block is never split)."""
        m = _BLOCK.match(name)
        if m:
            return m.group(1) == "layers" and self.holds_layer(int(m.group(2)))
        return self.embeds if name.startswith("embed.") else self.heads

    def describe(self) -> str:
        parts = ["embedding"] if self.embeds else []
        parts.append(f"layers {self.first}-{self.stop - 1}" if self.stop - self.first > 1 else f"layer {self.first}")
        if self.heads:
            parts.append("head")
        return f"rank {self.rank}/{self.size}: " + ", ".join(parts)


def stages(counts: Sequence[int], num_layers: int) -> list[Stage]:
    """Stages from the number of layers per rank (each at least one, summing to ``num_layers``)."""
    if any(c < 1 for c in counts) or sum(counts) != num_layers:
        raise SplitError(f"layer split {','.join(map(str, counts))}: every rank needs at least one layer and the "
                         f"counts must add up to the model's {num_layers} layers")
    out, first = [], 0
    for r, c in enumerate(counts):
        out.append(Stage(r, len(counts), first, first + c, num_layers))
        first += c
    return out


def parse_split(text: str, num_layers: int, size: int) -> list[Stage]:
    """``"3,2"`` -> stages: layers per rank, in rank order (``--layers-split``)."""
    try:
        counts = [int(p) for p in text.split(",")]
    except ValueError:
        raise SplitError(f"layer split {text!r}: expected comma-separated layer counts, e.g. 3,2") from None
    if len(counts) != size:
        raise SplitError(f"layer split {text!r} names {len(counts)} ranks, but {size} processes run")
    return stages(counts, num_layers)


def balanced_split(layer_bytes: Sequence[int], size: int, *, embed_bytes: int = 0, head_bytes: int = 0
                   ) -> list[Stage]:
    """Contiguous ranges that minimise the largest rank's bytes (the embedding counts for rank 0,
    the head for the last rank); ties go to the earlier split found."""
    n = len(layer_bytes)
    if not 1 <= size <= n:
        raise SplitError(f"{size} processes for {n} layers: each rank needs at least one layer")
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + int(b))

    def cost(r: int, a: int, b: int) -> int:
        return prefix[b] - prefix[a] + (embed_bytes if r == 0 else 0) + (head_bytes if r == size - 1 else 0)

    # best[r][i]: smallest max over ranks 0..r-1 holding layers 0..i-1; cut[r][i] where rank r-1 starts
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(size + 1)]
    cut = [[0] * (n + 1) for _ in range(size + 1)]
    best[0][0] = 0
    for r in range(1, size + 1):
        for i in range(r, n - (size - r) + 1):
            for j in range(r - 1, i):
                v = max(best[r - 1][j], cost(r - 1, j, i))
                if v < best[r][i]:
                    best[r][i], cut[r][i] = v, j
    bounds, i = [], n
    for r in range(size, 0, -1):
        bounds.append(i - cut[r][i])
        i = cut[r][i]
    return stages(bounds[::-1], n)


@dataclass(frozen=True)
class ProcessSplit:
    """The split this process is one rank of, for what outlives a run (prompt-cache files):
    set by ``ds4mlx.distributed.load``."""

    rank: int
    counts: tuple[int, ...]  # layers per rank

    @property
    def text(self) -> str:
        return ",".join(map(str, self.counts))

    def describe(self) -> str:
        return f"{len(self.counts)} processes with --layers-split {self.text}"


_process_split: ProcessSplit | None = None


def set_process_split(stage_list: Sequence[Stage], rank: int) -> None:
    global _process_split
    _process_split = ProcessSplit(rank, tuple(s.stop - s.first for s in stage_list))


def process_split() -> ProcessSplit | None:
    """This process's split, or None when it holds the whole model."""
    return _process_split

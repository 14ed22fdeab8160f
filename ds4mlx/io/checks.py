"""Checks every reader (and ``convert``) makes on the hash-routing tables, ``tid2eid``.

A hash layer routes token t to experts ``tid2eid[t, :k]``: the table must have a row per
vocabulary entry and at least k columns (a wider one is cut to k), and every id must name an
expert. Readers call these with their own error class and the file and tensor at fault.
"""

from __future__ import annotations

from typing import Any, Sequence


def hash_table_fits(shape: Sequence[int], vocab: int, k: int) -> bool:
    """Whether a stored ``tid2eid`` of ``shape`` serves a model with ``vocab`` tokens and top-k ``k``."""
    return len(shape) == 2 and shape[0] == vocab and shape[1] >= k


def check_expert_ids(table: Any, n_experts: int, where: str, error: type[Exception]) -> None:
    """Raise ``error("<where> holds expert ids lo..hi, outside 0..n-1")`` unless every id of
    ``table`` (a numpy or MLX integer array) is a valid expert index."""
    if table.size == 0:
        return
    lo, hi = int(table.min()), int(table.max())
    if lo < 0 or hi >= n_experts:
        raise error(f"{where} holds expert ids {lo}..{hi}, outside 0..{n_experts - 1}")

"""The model split by layers over the processes of ``mlx.launch`` (``mx.distributed``).

Every process runs the same program (the CLI, ``stream_generate``, the Python API) and holds
one contiguous range of layers (``ds4mlx.stage``): rank 0 also the embedding, the last rank
the head. A forward pass goes rank to rank: each receives the hyper-connection streams
``[B, S, hc_mult, hidden]`` (float32) from the rank before, runs its layers on them with its
own decode state, and sends them on; the last rank's logits reach every rank through one
``all_sum`` (the others add zeros, so the sum is exact), so each samples the same token with the
same random seed (shared once at load) and the loop goes on in step everywhere. Only rank 0
writes output.

``ds4mlx serve`` runs the HTTP server on rank 0 alone: rank 0 announces every forward and the
other ranks follow it (``served.py``). The forward itself is ``pipeline.py``.

A rank that fails or disappears stops the others: a lost connection surfaces as
``DistributedError`` at once, and every wait for another rank is bounded by a watchdog
(``DS4MLX_DIST_TIMEOUT`` seconds, default 30) that ends the process with one line on stderr
(``watch.py``).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx

from ..stage import Stage, SplitError, balanced_split, parse_split, set_process_split, stages
from .pipeline import DEFAULT_TIMEOUT, PipelineModel
from .served import RemoteLayer
from .watch import DistributedError

DEFAULT_LOAD_TIMEOUT = 1800.0  # seconds the ranks wait for each other to finish loading
_LAYER = re.compile(r"^layers\.(\d+)\.")

__all__ = ["DEFAULT_TIMEOUT", "DistributedError", "PipelineModel", "RemoteLayer", "SplitError", "launched", "load",
           "plan", "this_stage", "world"]


def launched() -> bool:
    """Whether this process is one of several started by ``mlx.launch`` (or mpirun)."""
    return any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))


def world():
    """The group of all processes, or None when this process runs alone."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def is_output_rank() -> bool:
    """True for the process that writes output: rank 0, or the only one."""
    group = world() if launched() else None
    return group is None or group.rank() == 0


def _timeout(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name}={text!r}: expected a number of seconds > 0")
    return value


# ----------------------------------------------------------------------------- the split


def layer_bytes(path: Path) -> tuple[list[int], int, int]:
    """``(bytes per layer, embedding bytes, head bytes)`` of a checkpoint, from its headers."""
    from ..info import read_tensors

    config, tensors, _ = read_tensors(path)
    n = int(config["num_hidden_layers"])
    per_layer, embed, head = [0] * n, 0, 0
    for t in tensors:
        m = _LAYER.match(t.name)
        if m and int(m.group(1)) < n:
            per_layer[int(m.group(1))] += t.nbytes
        elif t.name.startswith("embed."):
            embed += t.nbytes
        elif not t.name.startswith("mtp."):
            head += t.nbytes
    return per_layer, embed, head


def plan(path: Path, size: int, layers_split: Optional[str] = None) -> list[Stage]:
    """The stages of ``size`` ranks: ``layers_split`` ("3,2": layers per rank) or balanced by
    stored bytes (the embedding counts for rank 0, the head for the last)."""
    per_layer, embed, head = layer_bytes(path)
    if layers_split:
        return parse_split(layers_split, len(per_layer), size)
    return balanced_split(per_layer, size, embed_bytes=embed, head_bytes=head)


# ----------------------------------------------------------------------------- loading


def this_stage(path_or_repo, layers_split: Optional[str] = None, group=None) -> Stage:
    """This process's stage of the split (its layers): what it reads and what memory it needs."""
    from ..loader import resolve_model_path

    group = group or world()
    if group is None:
        raise DistributedError("ds4mlx.distributed: this process runs alone; start it with mlx.launch -n N")
    return plan(resolve_model_path(path_or_repo), group.size(), layers_split)[group.rank()]


def _counts(stage: Stage, group) -> list[Stage]:
    """Every rank's stage, from each one's layer count (one all_sum at load)."""
    counts = mx.zeros((stage.size,), mx.int32).at[stage.rank].add(stage.stop - stage.first)
    counts = mx.distributed.all_sum(counts, group=group)
    mx.eval(counts)
    return stages(counts.tolist(), stage.num_layers)


def load(path_or_repo, *, layers_split: Optional[str] = None, group=None, timeout: Optional[float] = None,
         status: Optional[Callable[[str], None]] = None, **kwargs: Any) -> tuple[PipelineModel, Any]:
    """``(PipelineModel, tokenizer)`` for this rank of ``group`` (default: every process of
    ``mlx.launch``): the stage's layers read from the file, nothing else of them. Keyword
    arguments are ``ds4mlx.load``'s (``mtp`` excepted)."""
    from ..loader import load as load_one, resolve_model_path

    if kwargs.get("mtp") or kwargs.get("mtp_path") is not None:
        raise ValueError("the MTP drafter does not run split over several processes: drop --draft / mtp")
    kwargs.pop("mtp", None)
    kwargs.pop("mtp_path", None)
    group = group or world()
    timeout = _timeout("DS4MLX_DIST_TIMEOUT", DEFAULT_TIMEOUT) if timeout is None else timeout
    path = resolve_model_path(path_or_repo)
    stage = this_stage(path, layers_split, group)
    if status is not None:
        status(f"{stage.describe()}")
    model, tokenizer = load_one(path, stage=stage, **kwargs)
    pipeline = PipelineModel(model, stage, group, timeout=timeout)
    # One random seed for every rank, so sampling draws the same token everywhere.
    seed = mx.array([int.from_bytes(os.urandom(4), "little") if stage.rank == 0 else 0], dtype=mx.uint32)
    with pipeline._watchdog.guard("waiting for the other ranks to load", _timeout(
            "DS4MLX_DIST_LOAD_TIMEOUT", DEFAULT_LOAD_TIMEOUT)):
        seed = mx.distributed.all_sum(seed, group=group)
        mx.eval(seed)
        set_process_split(_counts(stage, group), stage.rank)  # the same on every rank, whoever computed it
    mx.random.seed(int(seed.item()))
    return pipeline, tokenizer


def silence_other_ranks() -> None:
    """Ranks other than 0 write no output (``mlx.launch`` would show it once per rank)."""
    if not is_output_rank():
        sys.stdout = open(os.devnull, "w")

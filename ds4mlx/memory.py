"""Memory a model will need, checked against this machine before any weight is read.

The estimate comes from the checkpoint's headers (``info.read_tensors``): each tensor's bytes as
it will be resident (file bytes for packed formats, which ds4mlx keeps as they are; float
tensors at the model's dtype, float32 where the model keeps float32), the decode state at
``--ctx`` (``info.state_nbytes``) and a fixed working margin. It is compared with physical
memory and, with Metal, ``mx.device_info()["max_recommended_working_set_size"]`` (the most the GPU
keeps wired; macOS sets it to about 2/3–3/4 of RAM, ``sudo sysctl iogpu.wired_limit_mb=N``
raises it until reboot). Too big: :class:`MemoryLimitError` with the sysctl value that would
make it fit; close to the limit: a warning. Then, with Metal, the wired limit is raised for the
run as mlx-lm does, and MLX's buffer cache is capped to the memory left over.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import gguf
import mlx.core as mx

if TYPE_CHECKING:
    from .stage import Stage

GIB, MIB = 1 << 30, 1 << 20
WORKING_MARGIN = GIB  # activations of a prefill chunk, the sampler, MLX's scratch buffers
MACOS_RESERVE = 8 * GIB  # what to leave to macOS when suggesting iogpu.wired_limit_mb
WARN_FRACTION = 0.9  # mlx-lm warns above 90% of the recommended working set too
_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
# Kinds the loader never keeps packed: quantized GGUF tensors of these are dequantized to float.
_DEQUANTIZED_KINDS = ("embedding", "router", "hyper-connections", "norms")


class MemoryLimitError(ValueError):
    """The model will not fit this machine's memory (the message says how to make it fit)."""


@dataclass(frozen=True)
class Estimate:
    weights: int
    state: int  # every sequence's decode state at ``ctx``
    ctx: int
    margin: int = WORKING_MARGIN
    sequences: int = 1  # decoded together (a server's batch)
    cache: int = 0  # a server's in-memory prefix-cache snapshots, at their bound

    @property
    def total(self) -> int:
        return self.weights + self.state + self.cache + self.margin


@dataclass(frozen=True)
class DeviceMemory:
    physical: int  # bytes of RAM
    working_set: Optional[int]  # Metal's max recommended working set; None without Metal


def device_memory() -> DeviceMemory:
    """This machine's memory: RAM, and the GPU working set where Metal is available."""
    info = mx.device_info() if mx.metal.is_available() else {}
    physical = int(info.get("memory_size") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    working = info.get("max_recommended_working_set_size")
    return DeviceMemory(physical, int(working) if working else None)


def _resident_bytes(name: str, kind: str, fmt: str, nbytes: int, dtype_bytes: int) -> int:
    from .model.transformer import keeps_float32

    width = 4 if keeps_float32(name) else dtype_bytes
    if fmt in _FLOAT_BYTES:
        return nbytes // _FLOAT_BYTES[fmt] * width
    if fmt in gguf.GGMLQuantizationType.__members__:
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt]]
        if kind in _DEQUANTIZED_KINDS:
            return nbytes // block_bytes * block * width
        if fmt == "Q8_0":  # loads as MLX affine 8-bit: 32 codes + fp16 scale and bias per block
            return nbytes // block_bytes * (block + 4)
    if fmt.startswith("FP8"):  # official 128x128 scales become mxfp8's one byte per 32 weights
        return nbytes + nbytes // 32
    return nbytes  # packed as stored (FP4 as mxfp4, GGUF blocks, affine) or integer tables


def estimate(source: Any, *, ctx: int, dtype: Optional[mx.Dtype] = None, mtp: bool = False,
             stage: Optional["Stage"] = None, sequences: int = 1, cache: int = 0) -> Estimate:
    """Bytes ``source`` will take once loaded, with the decode state of ``ctx`` tokens (capped
    at the model's ``max_position_embeddings``); reads headers only. ``stage``: only the share
    of one process of a model split by layers (``ds4mlx.distributed``). A server adds the states
    of the ``sequences`` it decodes together and its prefix ``cache`` bound."""
    from .info import checked_config, read_tensors, resolve_model, state_nbytes
    from .loader import default_dtype

    path = resolve_model(source)
    config_dict, tensors, fmt = read_tensors(path)
    config = checked_config(config_dict, path, fmt)
    dtype_bytes = (default_dtype() if dtype is None else dtype).size
    weights = sum(_resident_bytes(t.name, t.kind, t.fmt, t.nbytes, dtype_bytes)
                  for t in tensors if (mtp or t.kind != "MTP block") and (stage is None or stage.holds(t.name)))
    ctx = min(int(ctx), config.max_position_embeddings)
    layers = None if stage is None else range(stage.first, stage.stop)
    state = sequences * state_nbytes(config, ctx, dtype_bytes, layers)
    return Estimate(weights, state, ctx, sequences=sequences, cache=cache)


def _gb(n: int) -> str:
    from .info import human_bytes

    return human_bytes(n)


def verdict(est: Estimate, mem: DeviceMemory, what: str = "the model") -> tuple[str, str] | None:
    """``None`` when ``est`` fits comfortably, else ``(level, message)`` with level ``"refuse"``
    (it does not fit) or ``"warn"`` (close to the limit)."""
    states = "decode state" if est.sequences == 1 else f"decode states of {est.sequences} requests"
    cache = f", prefix cache {_gb(est.cache)} (--cache-gb)" if est.cache else ""
    need = (f"{what} needs about {_gb(est.total)} (weights {_gb(est.weights)}, {states} at "
            f"--ctx {est.ctx} {_gb(est.state)}{cache}, working margin {_gb(est.margin)})")
    usable = mem.physical - (MACOS_RESERVE if mem.working_set is not None else 0)
    if est.total > usable:
        shorter = " or a shorter --ctx" if est.state > est.total // 10 else ""
        if est.cache > est.total // 10:
            shorter += " or a smaller --cache-gb"
        return "refuse", (f"{need}, more than this machine's {_gb(mem.physical)} of memory can "
                          f"hold; use a smaller quantization{shorter}")
    if mem.working_set is not None and est.total > mem.working_set:
        mb = math.ceil((est.total + GIB) / MIB)
        return "refuse", (f"{need}, more than the GPU's working set of {_gb(mem.working_set)}; "
                          f"raise it with 'sudo sysctl iogpu.wired_limit_mb={mb}' (until reboot)")
    limit = mem.working_set if mem.working_set is not None else mem.physical
    if est.total > WARN_FRACTION * limit:
        where = "the GPU's working set" if mem.working_set is not None else "this machine's memory"
        return "warn", f"{need}, close to {where} of {_gb(limit)}; it may run slowly"
    return None


def set_limits(est: Estimate, mem: DeviceMemory) -> None:
    """With Metal: wire up to the recommended working set for the run (as mlx-lm's
    ``wired_limit`` does while generating) and keep MLX's cache of freed buffers within the
    memory the model leaves."""
    if mem.working_set is None or not mx.metal.is_available():
        return
    mx.set_wired_limit(mem.working_set)
    headroom = max(mem.working_set - est.weights - est.state - est.cache, 0)
    mx.set_cache_limit(max(headroom, 256 * MIB))


def check_memory(source: Any, *, ctx: int, force: bool = False, dtype: Optional[mx.Dtype] = None,
                 mtp: bool = False, warn: Callable[[str], None] | None = None,
                 stage: Optional["Stage"] = None, sequences: int = 1, cache: int = 0) -> Estimate:
    """Estimate, compare with this machine, refuse (unless ``force``) or warn, set the limits;
    with ``stage``, for this process's share of a split model; ``sequences`` and ``cache`` as
    in ``estimate``."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    est = estimate(source, ctx=ctx, dtype=dtype, mtp=mtp, stage=stage, sequences=sequences, cache=cache)
    mem = device_memory()
    found = verdict(est, mem, what=str(source) if stage is None else f"{stage.describe()} of {source}")
    if found is not None:
        level, message = found
        if level == "refuse" and not force:
            raise MemoryLimitError(f"{message}, or pass --ignore-memory-limit")
        anyway = " (loading anyway: --ignore-memory-limit)" if level == "refuse" else ""
        warn(f"warning: {message}{anyway}")
    set_limits(est, mem)
    return est

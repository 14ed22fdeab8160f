"""Which path serves a kernel call, and the one place kernels are launched.

The backend is chosen once, on first use, from ``DS4MLX_KERNELS`` and the default device:
``metal`` (the GPU kernels), ``ops`` (the twins: MLX ops with the same semantics) or ``emulate``
(the same Metal sources compiled as C++ and run on the CPU by :mod:`ds4mlx.kernels.emu`).
Default: ``metal`` when Metal is available and the default device is the GPU, else ``ops``.
Single variants (a weight format's kernels, or a named kernel such as ``HC_PRE``; ``GRID_SYNC``
is the multi-threadgroup form of the kernels that have one, see :func:`grid_sync` and
:func:`counter`) can be switched off with :func:`disable`, and each is checked against its twin
on first use in a process (:mod:`ds4mlx.kernels.check`); a switched-off variant is served by its ops twin.

Entry points call :func:`backend`, :func:`serves` and :func:`run` through this module's
attributes, so a profiler can stand in for the launch (``scripts/decode_profile.py``).
"""

from __future__ import annotations

import functools
import os
from typing import Protocol

import mlx.core as mx
import numpy as np

from . import source
from .source import KERNEL_FORMATS

BACKENDS = ("metal", "ops", "emulate")
HC_PRE = "hc_pre"  # the variant name of the fused HC pre kernel
ATTENTION = "attention"  # fused decode attention (kernels/attention.py)
INDEXER = "indexer"  # fused Lightning Indexer scores (kernels/indexer.py)
ROPE_ROWS = "rope_rows"  # fused RMS + RoPE + FP8 rounding of attention rows (kernels/attention.py)
ROUTER = "router"  # fused MoE router selection (kernels/router.py)
SHARED_DOWN = "shared_down"  # shared expert's SwiGLU + down + routed sum (kernels/matvec.py)
# a decoded token's dense projection in MLX mxfp8 / affine 8-bit or float rows, one or two unlike
# parts, grouped, written in the activation dtype (kernels/matvec.py dense_matvec)
DENSE_MATVEC = "dense_matvec"
# The one-launch multi-threadgroup form of kernels (metal/grid.h; probe kernel in kernels/grid.py):
# switched off, or failing its check (no Metal 3.2), they take their one-threadgroup form.
GRID_SYNC = "grid_sync"
NAMED_VARIANTS = (HC_PRE, ATTENTION, INDEXER, ROPE_ROWS, ROUTER, SHARED_DOWN, DENSE_MATVEC,
                  GRID_SYNC)  # not weight formats


class KernelInputError(ValueError):
    """An argument of a kernel entry point has the wrong dtype or shape (names it)."""


# ----------------------------------------------------------------------------- backend
_backend: str | None = None
_disabled: dict[str, str] = {}


def _choose(choice: str) -> str:
    choice = choice.strip().lower()
    if not choice:
        gpu = mx.default_device().type == mx.DeviceType.gpu
        return "metal" if mx.metal.is_available() and gpu else "ops"
    if choice not in BACKENDS:
        raise ValueError(f"DS4MLX_KERNELS={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "metal" and not mx.metal.is_available():
        raise ValueError("DS4MLX_KERNELS=metal, but Metal is not available on this machine")
    return choice


def backend() -> str:
    """The path kernels take: chosen on first use from ``DS4MLX_KERNELS`` and the default device."""
    global _backend
    if _backend is None:
        _backend = _choose(os.environ.get("DS4MLX_KERNELS", ""))
    return _backend


def set_backend(name: str | None = None) -> str:
    """Choose the backend again: ``name`` (one of ``BACKENDS``), or from the environment and the
    default device when None. Returns the backend now in use."""
    global _backend
    _backend = _choose(os.environ.get("DS4MLX_KERNELS", "") if name is None else name)
    return _backend


def disable(variant: str, reason: str) -> None:
    """Stop using the kernels of ``variant`` (a format of ``KERNEL_FORMATS`` or one of
    ``NAMED_VARIANTS``); its ops twin serves those calls from now on. ``reason`` is kept for
    :func:`disabled`."""
    _disabled[_variant_key(variant)] = reason


def _variant_key(variant: str) -> str:
    return variant if variant in NAMED_VARIANTS else variant.upper()


def enable(variant: str) -> None:
    _disabled.pop(_variant_key(variant), None)


def enabled(variant: str) -> bool:
    return _variant_key(variant) not in _disabled


def disabled() -> dict[str, str]:
    """Variant -> reason of every kernel variant switched off (by :func:`disable` or by the
    first-use check)."""
    return {**_disabled, **(_check.failures() if _check else {})}


def serves(fmt: str) -> bool:
    """Whether a kernel serves calls on weights of format ``fmt`` (or a named variant such as
    ``HC_PRE``): the one decision between kernel and ops twin (the entry points then ask
    :func:`first_use_ok` whether the call's variant passed its first-use check)."""
    if backend() == "ops":
        return False
    if fmt not in NAMED_VARIANTS and fmt.upper() not in KERNEL_FORMATS:
        return False
    return enabled(fmt) or (_check is not None and _check.forcing())


def first_use_ok(variant: str, dtype: mx.Dtype, **dims: int) -> bool:
    """The first-use check of ``variant`` at ``dtype`` (kernels/check.py); True once passed."""
    return _check is None or _check.passes(variant, dtype, **dims)


def grid_sync() -> bool:
    """Whether kernels may take their grid-synchronised form (several threadgroups in one
    launch, the last to finish combining: metal/grid.h): on a kernel backend, unless
    ``GRID_SYNC`` is switched off or its probe fails the first-use check (no Metal 3.2). Ask
    it outside a check's forced run (which passes every variant): the check cases pick the
    form explicitly."""
    return backend() != "ops" and enabled(GRID_SYNC) and first_use_ok(GRID_SYNC, mx.float32)


# Arrival counters of the grid-synchronised kernels, by call site. A persistent zeroed input
# that the kernel's last threadgroup puts back to 0, rather than an output with init_value:
# that would be a fill launch per call. MLX does not know the kernel writes it, and runs
# launches with no data between them concurrently (no barrier), so two independent chains
# evaluated together could meet on one counter: the calls of a key take COUNTER_SLOTS slots in
# turn, and launches a full turn apart are ordered by the barriers of the work in between.
COUNTER_SLOTS = 16
_counters: dict[str, list[mx.array]] = {}
_turns: dict[str, int] = {}


def counter(key: str, n: int) -> mx.array:
    """A uint32 array of zeros, at least ``n`` long (and 8: shorter inputs would be passed in
    the `constant` space, which a kernel cannot write), for one launch of the call site ``key``
    (the next of its slots, views of one persistent buffer): a kernel casts it to
    ``device atomic_uint*``, one counter per row, and leaves it zeroed."""
    slots = _counters.get(key)
    if slots is None or slots[0].size < n:
        size = max(n, 8, 0 if slots is None else 2 * slots[0].size)
        base = mx.array(np.zeros(size * COUNTER_SLOTS, np.uint32))
        slots = [base[i * size:(i + 1) * size] for i in range(COUNTER_SLOTS)]
        mx.eval(slots)
        _counters[key] = slots
    turn = _turns[key] = (_turns.get(key, -1) + 1) % COUNTER_SLOTS
    return slots[turn]


class FirstUseCheck(Protocol):
    """What the serving decision asks of the first-use check (:mod:`ds4mlx.kernels.check`, which
    installs itself when the package is imported: it runs the kernels, so it sits above them)."""

    def passes(self, variant: str, dtype: mx.Dtype, **dims: int) -> bool: ...
    def forcing(self) -> bool: ...
    def failures(self) -> dict[str, str]: ...


_check: FirstUseCheck | None = None


def install_check(check: FirstUseCheck) -> None:
    global _check
    _check = check


# ----------------------------------------------------------------------------- twins above
# Ops twins that live above the kernels (the model's own ops, e.g. rope_rows'), installed by
# the module that has them; the entry points and the first-use check look them up here.
_twins: dict[str, object] = {}


def install_twin(name: str, twin) -> None:
    _twins[name] = twin


def twin(name: str):
    """The ops twin installed for ``name``, or None."""
    return _twins.get(name)


# ----------------------------------------------------------------------------- launch
@functools.cache
def compiled(path: str, file: str, name: str, inputs: tuple[str, ...], outputs: tuple[str, ...]):
    """Kernel ``name`` of ``metal/<file>``, built once per (path, signature)."""
    header, bodies = source.metal_source(file)
    make = mx.fast.metal_kernel
    if path == "emulate":
        from . import emu

        make = emu.metal_kernel
    return make(name=f"ds4_{name}", input_names=list(inputs), output_names=list(outputs),
                source=bodies[name], header=header)


def run(file: str, name: str, inputs: dict, outputs: dict, *, grid, threadgroup, template):
    """Launch kernel ``name`` of ``metal/<file>`` on the metal or emulate path: ``inputs`` name ->
    array or scalar, ``outputs`` name -> (shape, dtype)."""
    kernel = compiled(backend(), file, name, tuple(inputs), tuple(outputs))
    return kernel(inputs=list(inputs.values()), output_shapes=[s for s, _ in outputs.values()],
                  output_dtypes=[d for _, d in outputs.values()], grid=grid,
                  threadgroup=threadgroup, template=template)


def device_array(a: mx.array) -> mx.array:
    """``a``, padded to 8 elements if shorter: mx.fast.metal_kernel passes inputs under 8
    elements in the `constant` address space, and the kernels hand weight pointers to helpers
    that take `device` pointers."""
    return a if a.size >= 8 else mx.pad(a.reshape(-1), (0, 8 - a.size))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)

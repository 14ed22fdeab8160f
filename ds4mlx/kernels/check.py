"""Kernel variants checked against their ops twins: ``ds4mlx selftest`` and the first-use check.

A *variant* is the kernels of one weight layout (``Q4_K``, ``Q2_K``, ``IQ2_XXS``, ``MXFP4`` GGUF
blocks, ``MXFP4-mlx`` pairs, ...) at one activation dtype, or a named fused kernel (``hc_pre``,
``attention``, ``indexer``, ``rope_rows``, ``router``, ``shared_down``) at one dtype and the model dims that are
its template arguments (:data:`KEY_DIMS`). Checking it runs each of its kernels (:func:`cases`:
for a layout, dequantize, the decode kernels with ids in ``constant`` and in ``device`` memory
and with a shared expert folded in (each format it may take), the tiled kernel for gate/up,
down and plain products, the dense call site (the matvec and the tiled kernel); for a fused kernel,
its call shapes) on small random inputs, forced onto the kernel path, and compares with the ops
twin. Sizes the kernel takes at run time (heads, rows, tokens) are small and off the tile sizes;
the template dims are the model's, so the instance checked is the one that serves.

First use: the first call that would dispatch a variant in a process checks it (unless a pass is
already recorded on disk under ``$DS4MLX_CACHE/kernel-checks`` for the same sources, backend,
device, MLX version and dims). A variant that fails to compile or disagrees is switched off for
the process with one warning line on stderr, and its ops twin serves its calls (a kernel's
grid-synchronised form, ``grid=1``, is checked apart: its one-threadgroup form serves then).
``DS4MLX_KERNEL_CHECK``: ``on`` (default), ``off`` (no check; the test suite runs so, since it
compares kernels with twins itself) or ``fresh`` (ignore recorded passes).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np

from . import check_attention, check_cases, dispatch, moe, source
from .check_cases import (CHECK_VERSION, KEY_DIMS, MLX_PAIR, SYNC_USERS, TOLERANCE, Case, Spec,
                          _twins, dtype_name, install_twin, random_experts, twin)

# what the check's users reach through this module (the cases live in check_cases and, for the
# fused attention kernels, check_attention)
__all__ = ["CHECK_VERSION", "KEY_DIMS", "MLX_PAIR", "TOLERANCE", "Case", "Spec", "Result", "_twins", "cases",
           "dtype_name", "install_twin", "random_experts", "twin", "forcing", "run_case", "run_spec",
           "recorded", "record", "records_dir", "mode", "passes", "failures", "reset"]


# what a compile failure's message says: MLX's Metal backend, the emulator (kernels/emu.py)
COMPILE_ERRORS = ("Unable to build metal library", "does not compile")


@dataclass
class Result:
    kernel: str
    spec: Spec
    inputs: str  # what the case exercises, e.g. "1 token, ids in constant"
    rel_error: float = float("nan")
    seconds: float = 0.0
    error: str | None = None  # compile or launch failure (first line)
    tolerance: float = field(default=0.0)

    @property
    def ok(self) -> bool:
        return self.error is None and self.rel_error <= self.tolerance

    @property
    def compile_failed(self) -> bool:
        """Whether the kernel failed to compile (Metal's or the emulator's compiler), as
        opposed to running and disagreeing, or failing at launch."""
        return self.error is not None and any(m in self.error for m in COMPILE_ERRORS)

    def why(self) -> str:
        if self.error is not None:
            return f"{self.kernel} failed: {self.error}"
        return f"{self.kernel} ({self.inputs}) is off by {self.rel_error:.3g} > {self.tolerance:g}"



def cases(spec: Spec) -> list[Case]:
    """The kernel calls that make up ``spec``'s check."""
    named = {**check_cases.builders(), dispatch.ATTENTION: check_attention.attention_cases,
             dispatch.INDEXER: check_attention.indexer_cases,
             dispatch.ROPE_ROWS: check_attention.rope_cases}
    return named.get(spec.variant, check_cases.moe_cases)(spec)


# ----------------------------------------------------------------------------- running
_local = threading.local()


def forcing() -> bool:
    """Whether this thread runs a check: kernels then serve even a variant switched off."""
    return getattr(_local, "forcing", False)


@contextmanager
def _forced() -> Iterator[None]:
    was = forcing()
    _local.forcing = True
    try:
        yield
    finally:
        _local.forcing = was


def rel_error(got: list[mx.array], ref: list[mx.array]) -> float:
    """max |got - ref| / max |ref| over the finite values; inf when a shape differs, a value is
    NaN or an infinity is not the twin's, or an integer output (indices) is not the twin's."""
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        exact = mx.issubdtype(r.dtype, mx.integer)
        g, r = np.asarray(g.astype(mx.float32)), np.asarray(r.astype(mx.float32))
        if g.shape != r.shape or np.isnan(g).any() or np.isnan(r).any():
            return float("inf")
        finite = np.isfinite(r)
        if not np.array_equal(np.isfinite(g), finite) or (g[~finite] != r[~finite]).any():
            return float("inf")
        if exact and not np.array_equal(g, r):
            return float("inf")
        if finite.any():
            err = np.abs(g[finite] - r[finite]).max() / max(np.abs(r[finite]).max(), 1e-30)
            worst = max(worst, float(err))
    return worst


def run_case(case: Case, spec: Spec) -> Result:
    res = Result(case.kernel, spec, case.inputs, tolerance=TOLERANCE.get(spec.dtype, 2e-2))
    with _forced():
        start = time.perf_counter()
        try:
            got, ref = case.run()
            mx.eval(got, ref)
            res.seconds = time.perf_counter() - start
            res.rel_error = rel_error(got, ref)
        except Exception as e:  # a compile or launch failure of the kernel: the check's answer
            res.seconds = time.perf_counter() - start
            lines = [s.strip() for s in str(e).splitlines() if s.strip()] or [""]
            first = next((s for s in lines[1:] if "error:" in s), "")  # the compiler's first
            res.error = f"{type(e).__name__}: {lines[0]} {first}".strip()[:400]
    return res


def run_spec(spec: Spec, *, stop_at_failure: bool = False) -> list[Result]:
    """Every case of ``spec`` on the current backend (which must not be ``ops``); with
    ``stop_at_failure``, up to the first that fails (the first-use check needs no more)."""
    if dispatch.backend() == "ops":
        raise ValueError("the kernel backend is 'ops': there are no kernels to check")
    results = []
    for c in cases(spec):
        results.append(run_case(c, spec))
        if stop_at_failure and not results[-1].ok:
            break
    return results


# ----------------------------------------------------------------------------- records
def _device() -> str:
    if dispatch.backend() == "metal":
        info = mx.device_info()
        return f"metal {info.get('device_name', '')} {info.get('architecture', '')}"
    from . import emu

    return f"emulate {emu.compiler()} {' '.join(emu._cxx_flags())} {emu.syntax_compiler()}"


def _sources() -> str:
    parts = []
    for file in sorted(p.name for p in source.METAL_DIR.glob("*.metal")):
        header, bodies = source.metal_source(file)
        parts += [header, *(f"{n}\n{b}" for n, b in sorted(bodies.items()))]
    if dispatch.backend() == "emulate":
        from . import emu

        parts.append(emu._runtime_text())
    return "\0".join(parts)


def record_key(spec: Spec) -> str:
    """Hash of what a pass depends on: every kernel source, backend and device, MLX, the
    variant and dtype, and a named variant's template dims (:data:`KEY_DIMS`). The MoE cases
    cover both placements of the ids whatever k, so a pass holds for every k and E."""
    dims = spec.dims_text()
    if spec.variant in SYNC_USERS:  # their cases include the grid form only where it works
        dims += f" grid_sync={dispatch.grid_sync()}"
    what = [str(CHECK_VERSION), dispatch.backend(), _device(), mx.__version__, _sources(), spec.variant,
            dtype_name(spec.dtype), dims, str(moe.DECODE_MAX_PAIRS)]
    return hashlib.sha256("\0".join(what).encode()).hexdigest()[:32]


def records_dir() -> Path:
    root = os.environ.get("DS4MLX_CACHE") or Path.home() / ".cache" / "ds4mlx"
    return Path(root) / "kernel-checks"


def _record_path(spec: Spec) -> Path:
    return records_dir() / f"{spec.variant}-{dtype_name(spec.dtype)}-{record_key(spec)}.json"


def recorded(spec: Spec) -> bool:
    return _record_path(spec).is_file()


def _unavailable_path(spec: Spec) -> Path:
    # keyed by the OS release too: an upgrade (macOS 15 brings Metal 3.2) tries the probe again
    return records_dir() / f"{spec.variant}-unavailable-{record_key(spec)}-{platform.release()}.json"


def record(spec: Spec, results: list[Result]) -> None:
    """Remember that ``spec`` passed (best effort: an unwritable cache only costs a re-check)."""
    path = _record_path(spec)
    body = {"variant": spec.variant, "dtype": dtype_name(spec.dtype), "mlx": mx.__version__,
            "backend": dispatch.backend(), "results": [
                {"kernel": r.kernel, "inputs": r.inputs, "rel_error": r.rel_error,
                 "seconds": round(r.seconds, 4)} for r in results]}
    _write_record(path, body)


def _write_record(path: Path, body: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


# ----------------------------------------------------------------------------- first use
_verdicts: dict[tuple, bool] = {}
_failures: dict[str, str] = {}
_lock = threading.RLock()  # reentrant: a variant's check may first ask GRID_SYNC's (grid_sync)


def mode() -> str:
    value = os.environ.get("DS4MLX_KERNEL_CHECK", "on").strip().lower() or "on"
    if value not in ("on", "off", "fresh"):
        raise ValueError(f"DS4MLX_KERNEL_CHECK={value!r}: expected on, off or fresh")
    return value


def passes(variant: str, dtype: mx.Dtype, **dims: int) -> bool:
    """Whether the kernels of ``variant`` may serve a call in ``dtype``: checked on the first
    call of the process (``dims``: the fields of :class:`Spec` that call knows), remembered
    for the process per template dims (:data:`KEY_DIMS`), and a pass recorded on disk."""
    if forcing():
        return True
    key = (variant, dtype, *(dims.get(f) for f in KEY_DIMS.get(variant, ())))
    verdict = _verdicts.get(key)
    if verdict is not None:
        return verdict
    if mode() == "off":
        return True
    with _lock:
        if key not in _verdicts:
            _verdicts[key] = _first_use(Spec(variant, dtype, **dims))
        return _verdicts[key]


def _first_use(spec: Spec) -> bool:
    if mode() != "fresh" and recorded(spec):
        return True
    results = run_spec(spec, stop_at_failure=True)
    bad = [r for r in results if not r.ok]
    if not bad:
        record(spec, results)
        return True
    _failures[spec.label()] = bad[0].why()
    if spec.variant == dispatch.GRID_SYNC and bad[0].compile_failed:
        # a platform limit (no Metal 3.2), not a fault: said once per machine, then recorded
        # (best effort), so every later process falls back in silence
        path = _unavailable_path(spec)
        if path.is_file() and mode() != "fresh":
            return False
        _write_record(path, {"variant": spec.variant, "unavailable": bad[0].why()})
    print(f"ds4mlx: warning: kernel {spec.label()} switched off for this process, "
          f"{spec.fallback()} ({bad[0].why()})", file=sys.stderr, flush=True)
    return False


def failures() -> dict[str, str]:
    """Variant label -> reason, for each variant the first-use check switched off."""
    return dict(_failures)


def reset() -> None:
    """Forget this process's verdicts (the records on disk stay)."""
    with _lock:
        _verdicts.clear()
        _failures.clear()


dispatch.install_check(sys.modules[__name__])

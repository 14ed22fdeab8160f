"""Small C kernels for the quantizers' hot loops (and ``sinkhorn.c``, the CPU decode path's
Sinkhorn rounds, :func:`ds4mlx.kernels.hyper.host_sinkhorn`), compiled on first use with the system C
compiler (``$CC``; else clang where installed, then ``cc``: :func:`compilers`) and cached by source hash in ``$DS4MLX_QUANT_CACHE`` (default
``~/.cache/ds4mlx/quant``). Without a compiler, or with ``DS4MLX_QUANT_NATIVE=0``, :func:`load`
returns None and the quantizers use their numpy path (same choices, slower).
``DS4MLX_QUANT_TUNE=generic`` builds them for the generic CPU of the target (no
``-march=native``: on x86 the 8-lane kernels that CPUs without AVX-512 take).
``DS4MLX_QUANT_PORTABLE=1`` builds them without their x86 intrinsics (``-DDS4MLX_PORTABLE``: the
plain C vector-extension path other CPUs take; tests check that it gives the same bytes).

numpy has no fused "matrix product then argmin" and MLX on the CPU is slower still for these
shapes (measured), hence a few lines of C rather than a dependency.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
# no contraction into fused multiply-adds: the kernels repeat numpy's rounding step by step
_FLAGS = ["-O3", "-fPIC", "-shared", "-std=c99", "-ffp-contract=off"]
# tuned for this CPU where the compiler can (1.3x for the K-quants, measured), else generic; the
# build is cached per CPU (see _cpu_identity), and every library is checked against numpy anyway
_TUNE = (["-march=native"], [])
_LIBS: dict[str, ctypes.CDLL | None] = {}
_CHECKED: dict[str, ctypes.CDLL | None] = {}
# conversion threads call the quantizers side by side: one build and one check per library
_LOCK = threading.RLock()


def _cache_dir() -> Path:
    root = os.environ.get("DS4MLX_QUANT_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "ds4mlx" / "quant"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = Path(tempfile.gettempdir()) / f"ds4mlx-quant-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_identity() -> bytes:
    """What a ``-march=native`` build depends on: the machine and its CPU's features."""
    import platform

    ident = f"{platform.machine()} {platform.processor()}"
    try:
        with open("/proc/cpuinfo") as f:
            ident += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return ident.encode()


def compilers() -> list[str]:
    """The C compilers to build with, best first: ``$CC`` alone when set; else clang (plain or
    versioned, the newest on ``PATH``), then ``cc``. Clang first because it keeps the search
    kernels' vectors in registers where GCC 12 spills them: measured on an AVX2 EPYC, Q4_K
    2.0x, Q2_K 1.3-1.6x and IQ2_XXS 1.3-1.6x GCC's speed, same bytes (macOS's cc is clang)."""
    if os.environ.get("CC"):
        found = shutil.which(os.environ["CC"])
        return [found] if found else []
    names = ["clang"]
    for d in os.environ.get("PATH", "").split(os.pathsep):
        try:
            names += [f for f in os.listdir(d) if f.startswith("clang-") and f[6:].isdigit()]
        except OSError:
            pass
    clangs = sorted(set(names) - {"clang"}, key=lambda f: -int(f[6:]))
    out: list[str] = []
    for cc in ["clang", *clangs, "cc"]:
        path = shutil.which(cc)
        if path is not None and path not in out:
            out.append(path)
    return out


def _build(name: str, cc: str) -> ctypes.CDLL | None:
    flags = _FLAGS + (["-DDS4MLX_PORTABLE"] if os.environ.get("DS4MLX_QUANT_PORTABLE") == "1" else [])
    # DS4MLX_QUANT_TUNE=generic: no -march=native, the code CPUs without AVX-512 run (tests)
    tunes = _TUNE[1:] if os.environ.get("DS4MLX_QUANT_TUNE") == "generic" else _TUNE
    # the headers beside the sources are part of every build's identity
    sources = [(HERE / f"{name}.c").read_bytes()] + [h.read_bytes() for h in sorted(HERE.glob("*.h"))]
    digest = hashlib.sha256(b"\0".join([*sources, cc.encode(), " ".join(flags).encode(),
                                         repr(tunes).encode(), _cpu_identity()])).hexdigest()[:24]
    lib = _cache_dir() / f"{name}-{digest}.so"
    if not lib.exists():
        # build beside the target and rename: worker processes may build at the same time
        tmp = lib.with_name(f".{lib.name}.{os.getpid()}.tmp")
        for tune in tunes:
            try:
                subprocess.run([cc, *flags, *tune, "-o", str(tmp), str(HERE / f"{name}.c")], check=True,
                               capture_output=True, timeout=120)
                os.replace(tmp, lib)
                break
            except (OSError, subprocess.SubprocessError):
                tmp.unlink(missing_ok=True)
        else:
            return None
    try:
        return ctypes.CDLL(str(lib))
    except OSError:
        return None


def _builds(name: str):
    """The library ``native/<name>.c`` built by each of :func:`compilers` in turn (lazily)."""
    if os.environ.get("DS4MLX_QUANT_NATIVE", "1") == "0":
        return
    for cc in compilers():
        lib = _build(name, cc)
        if lib is not None:
            yield lib


def load(name: str) -> ctypes.CDLL | None:
    """The compiled library ``native/<name>.c`` (built once per process, by the first of
    :func:`compilers` that builds it), or None. Its calls release the GIL (``ctypes.CDLL``),
    so threads quantize side by side."""
    if name not in _LIBS:
        with _LOCK:
            if name not in _LIBS:
                _LIBS[name] = next(_builds(name), None)
    return _LIBS[name]


def load_checked(name: str, check: Callable[[ctypes.CDLL], bool]) -> ctypes.CDLL | None:
    """The first build (by :func:`compilers` in turn) for which ``check(lib)`` holds (it
    compares the kernel with the numpy path it replaces), once per process; otherwise None,
    with a warning."""
    if name not in _CHECKED:
        with _LOCK:
            if name not in _CHECKED:
                lib, tried = None, 0
                for built in _builds(name):
                    tried += 1
                    if check(built):  # else the next compiler's build
                        lib = built
                        break
                if lib is None and tried:
                    import warnings

                    warnings.warn(f"ds4mlx: the compiled {name} kernel does not match the numpy path on "
                                  "this platform; using numpy (slower)")
                _CHECKED[name] = lib
    return _CHECKED[name]


def ptr(a, kind=None) -> ctypes.c_void_p:
    """The address of the data of the contiguous numpy array ``a``, as a C pointer argument
    (``kind`` only documents the element type at the call)."""
    return ctypes.c_void_p(a.ctypes.data)

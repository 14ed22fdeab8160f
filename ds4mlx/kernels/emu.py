"""Run ``mx.fast.metal_kernel`` kernels on the CPU by compiling their Metal source as C++.

:func:`metal_kernel` takes the same arguments as ``mx.fast.metal_kernel`` and returns a callable
with the same call signature. On a call it writes out the function MLX would generate (template
parameters, one parameter per input (by reference for 0-d inputs), ``_shape``/``_strides``/
``_ndim`` extras when the body mentions them, the outputs, then the thread-position attributes
the body mentions), compiles it with g++ against ``metal/metal_compat.h`` (a C++ stand-in for
the subset of MSL we use), and runs every thread of the grid: each lane of a threadgroup is a
fiber, so ``threadgroup_barrier``, the simd collectives (32-wide simdgroups) and the simdgroup
matrices synchronise as on the GPU (``metal/emu_runtime.h``). Compiled libraries are cached by
source hash in ``$DS4MLX_EMU_CACHE`` (default ``~/.cache/ds4mlx/metal-emu``).
``$DS4MLX_EMU_THREADS`` sets how many OS threads share the threadgroups, ``$DS4MLX_EMU_CXXFLAGS``
adds compiler flags.

Stricter than the GPU, so that what Metal would refuse or break fails here first:

- address spaces: before the build, clang (``$DS4MLX_EMU_CLANG``, default ``clang-16``)
  compiles the same translation unit with the qualifiers as clang address spaces, and the
  parameters as MLX declares them (inputs of fewer than 8 elements are ``constant``, the others
  ``device``; outputs ``device``), so a mismatch is a compile error (skipped, with one warning,
  when there is no clang);
- ``-pedantic-errors``: variable-length arrays and other GNU extensions are refused;
- threadgroup memory is capped at Metal's 32 KB and filled with 0xFF bytes at the start of every
  threadgroup (metal/emu_runtime.h);
- lane and threadgroup order: the first launch of each compiled kernel runs every threadgroup
  with its lanes forward, reversed and shuffled, the threadgroups started in the same three
  orders, and the outputs must be byte-identical (a missing barrier, or a threadgroup that
  reads another's results without the counter pattern of ``dispatch.counters``, or sums them
  in arrival order, shows up as a difference); ``$DS4MLX_EMU_ORDERS`` = ``every`` checks every
  launch, ``off`` none; ``$DS4MLX_EMU_GROUPS`` (``forward``, ``reversed``, ``shuffled``; the
  tests run ``shuffled``) orders the threadgroups of the other launches;
- inputs are read-only: a launch that leaves an input changed fails (a counter of the
  "last threadgroup" pattern must be put back to 0; checked on every launch for inputs up to
  64 KiB, on the order-checked ones for all);
- atomics (atomic_int / atomic_uint, device or threadgroup): memory_order_relaxed only, as in
  Metal; ordering comes from ``atomic_thread_fence`` (Metal 3.2);
- fast math: ``fast::`` and unqualified transcendental functions are off by up to 4 ulp
  (metal/metal_compat.h), ``precise::`` is libm;
- simdgroup matrices (``simdgroup_float8x8`` etc., metal/metal_compat.h): 8 x 8 fragments spread
  over the 32 lanes as on Apple GPUs; load, store and multiply are collectives that every lane
  of a full simdgroup must reach from one call site with the same pointer, stride, origin and
  transpose flag (else an error); loads and stores take only threadgroup or device pointers of
  the matrix's element type, stay inside the threadgroup declarations, and touch memory when
  each lane arrives (so a missing barrier shows in the lane orders); a matrix never set is NaN.

Other deviations, on purpose: inputs are always passed row-contiguous (``_strides`` then
describe that layout), outputs not covered by ``init_value`` start as all-ones bytes (NaN for
floats) so a kernel that forgets to write an element is caught, and atomic outputs are not
supported.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import numpy as np


class KernelEmulationError(RuntimeError):
    """The emulated kernel could not be compiled or run (names the kernel)."""


METAL_DIR = Path(__file__).resolve().parent / "metal"  # the sources ship inside this package

MAX_THREADS_PER_THREADGROUP = 1024
_CXX_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-pthread", "-pedantic-errors",
              "-fno-strict-aliasing", "-fwrapv", "-ffp-contract=off"]
_SYNTAX_FLAGS = ["-std=c++17", "-fsyntax-only", "-pedantic-errors", "-Wno-unused-value",
                 "-DMTLEMU_ADDRESS_SPACES", "-x", "c++"]
MAX_CONSTANT_ARRAY_SIZE = 8  # MLX passes inputs of fewer elements in the `constant` space
ORDERS = {"forward": 0, "reversed": 1, "shuffled": 2}  # ORDER_* of metal/emu_runtime.h

# (name, type) of every attribute mx.fast.metal_kernel adds when the body mentions it, in MLX order.
_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

# mx dtype -> (numpy dtype holding its bytes, the type name MLX writes into Metal source)
_DTYPES = {
    mx.float32: (np.float32, "float"),
    mx.float16: (np.float16, "float16_t"),
    mx.bfloat16: (np.uint16, "bfloat16_t"),
    mx.bool_: (np.bool_, "bool"),
    mx.int8: (np.int8, "int8_t"),
    mx.int16: (np.int16, "int16_t"),
    mx.int32: (np.int32, "int32_t"),
    mx.int64: (np.int64, "int64_t"),
    mx.uint8: (np.uint8, "uint8_t"),
    mx.uint16: (np.uint16, "uint16_t"),
    mx.uint32: (np.uint32, "uint32_t"),
    mx.uint64: (np.uint64, "uint64_t"),
}

# A threadgroup variable declared on a line of its own becomes a reference into the threadgroup
# arena (metal/emu_runtime.h: shared by the lanes, 32 KB, poisoned per threadgroup); every other
# `threadgroup` (pointer and parameter qualifiers) stays, a macro of the compat header.
_TG_LINE = re.compile(r"(?m)^([ \t]*)threadgroup\b")
_TG_TYPE = r"(?:const\s+)?[A-Za-z_][\w:<>, ]*?"
_TG_DECL = re.compile(
    rf"threadgroup\s+({_TG_TYPE})\s+([A-Za-z_]\w*)\s*((?:\[[^;\]]*\]\s*)*);")
_TG_QUALIFIER = re.compile(rf"threadgroup\s+{_TG_TYPE}\s*[*&]")


def translate_source(text: str) -> str:
    """MSL kernel text -> the C++ the compat header compiles."""
    out, pos = [], 0
    for m in _TG_LINE.finditer(text):
        start = m.start() + len(m.group(1))
        if _TG_QUALIFIER.match(text, start):
            continue
        decl = _TG_DECL.match(text, start)
        if decl is None:
            line = text[start:text.find("\n", start)]
            raise KernelEmulationError(f"unsupported threadgroup declaration: {line!r} (declare "
                                       "one variable per line: `threadgroup T name[N];`)")
        ctype, name, dims = decl.group(1), decl.group(2), decl.group(3).strip()
        t = f"ds4tg_{name}_t"
        out.append(text[pos:start])
        out.append(f"typedef threadgroup {ctype} {t}{dims}; {t}& {name} = "
                   f"*({t}*)mtlemu::tg_alloc(sizeof({t}), alignof({t}));")
        pos = decl.end()
    out.append(text[pos:])
    return "".join(out)


def _dtype_info(dtype: mx.Dtype, what: str) -> tuple[Any, str]:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise KernelEmulationError(f"{what}: dtype {dtype} is not supported by the emulator") from None


def _template_value(name: str, value: Any) -> tuple[str, str]:
    """(C++ template parameter kind, C++ argument) of one template argument."""
    if isinstance(value, bool):
        return "bool", "true" if value else "false"
    if isinstance(value, int):
        return "int", str(value)
    if isinstance(value, mx.Dtype):
        return "typename", _dtype_info(value, f"template argument {name}")[1]
    raise KernelEmulationError(f"template argument {name}: expected bool, int or dtype, got {value!r}")


def _as_input(x: Any) -> mx.array:
    if isinstance(x, mx.array):
        return x
    if isinstance(x, bool):
        return mx.array(x, dtype=mx.bool_)
    if isinstance(x, int):
        return mx.array(x, dtype=mx.int32)
    if isinstance(x, float):
        return mx.array(x, dtype=mx.float32)
    return mx.array(x)


def _to_numpy(a: mx.array, np_dtype: Any) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.asarray(a), dtype=np_dtype)


def _cache_dir() -> Path:
    root = os.environ.get("DS4MLX_EMU_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "ds4mlx" / "metal-emu"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        path = Path(tempfile.gettempdir()) / f"ds4mlx-metal-emu-{os.getuid()}"
        path.mkdir(parents=True, exist_ok=True)
    return path


def compiler() -> str | None:
    """The C++ compiler the emulator uses ($CXX or g++), or None when there is none."""
    cxx = os.environ.get("CXX", "g++")
    return shutil.which(cxx)


def syntax_compiler() -> str | None:
    """The clang of the address-space pass ($DS4MLX_EMU_CLANG, clang-16 or clang), or None."""
    for name in (os.environ.get("DS4MLX_EMU_CLANG"), "clang-16", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


_LIBS: dict[str, ctypes.CDLL] = {}
_LOCK = threading.Lock()
_ORDER_CHECKED: set[str] = set()
_warned_no_clang = False


def check_address_spaces(cpp: str, name: str) -> None:
    """Compile ``cpp`` with the address-space qualifiers as clang address spaces (syntax only;
    a pass is remembered in the cache by source hash). Raises KernelEmulationError on a
    mismatch; without clang, warns once and returns."""
    global _warned_no_clang
    clang = syntax_compiler()
    if clang is None:
        if not _warned_no_clang:
            _warned_no_clang = True
            print("ds4mlx: no clang found; the emulator skips its address-space check "
                  "(install clang-16 or set DS4MLX_EMU_CLANG)", file=sys.stderr)
        return
    digest = hashlib.sha256("\0".join([cpp, _runtime_text(), clang]).encode()).hexdigest()[:32]
    mark = _cache_dir() / f"{name}-{digest}.as-ok"
    if mark.exists():
        return
    cmd = [clang, *_SYNTAX_FLAGS, "-I", str(METAL_DIR), "-"]
    proc = subprocess.run(cmd, input=cpp, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        raise KernelEmulationError(
            f"{name}: the kernel does not compile under Metal's rules (clang with address "
            f"spaces, -pedantic-errors):\n" + "\n".join(errors[:8] or [proc.stderr[-2000:]]))
    mark.write_bytes(b"")


def _cxx_flags() -> list[str]:
    # DS4MLX_EMU_CXXFLAGS adds flags, e.g. -DMTLEMU_UCONTEXT for the portable fiber switch.
    return _CXX_FLAGS + os.environ.get("DS4MLX_EMU_CXXFLAGS", "").split()


def _runtime_text() -> str:
    return "".join((METAL_DIR / f).read_text() for f in ("metal_compat.h", "emu_runtime.h"))


def load_library(cpp: str, name: str) -> ctypes.CDLL:
    """Compile (or fetch from the cache) one generated C++ kernel and load it."""
    cxx = compiler()
    if cxx is None:
        raise KernelEmulationError(f"{name}: no C++ compiler found (set $CXX or install g++)")
    flags = _cxx_flags()
    key = hashlib.sha256("\0".join([cpp, _runtime_text(), " ".join(flags), cxx]).encode())
    digest = key.hexdigest()[:32]
    with _LOCK:
        lib = _LIBS.get(digest)
        if lib is not None:
            return lib
        out = _cache_dir() / f"{name}-{digest}.so"
        if not out.exists():
            src = out.with_suffix(f".{os.getpid()}.cpp")
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            src.write_text(cpp)
            cmd = [cxx, *flags, "-I", str(METAL_DIR), str(src), "-o", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise KernelEmulationError(
                    f"{name}: the kernel does not compile as C++ ({src}):\n{proc.stderr[-4000:]}"
                )
            os.replace(tmp, out)
            src.unlink()
        lib = ctypes.CDLL(str(out))
        lib.ds4emu_launch.restype = ctypes.c_int
        lib.ds4emu_launch.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_longlong),
                  ctypes.POINTER(ctypes.c_longlong), ctypes.c_int, ctypes.c_longlong, ctypes.c_int,
            ctypes.c_int, ctypes.c_longlong, ctypes.c_char_p, ctypes.c_int,
        ]
        _LIBS[digest] = lib
        return lib


class EmulatedKernel:
    """Same construction and call signature as the object ``mx.fast.metal_kernel`` returns."""

    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str],
                 source: str, header: str = "", ensure_row_contiguous: bool = True,
                 atomic_outputs: bool = False):
        if not output_names:
            raise ValueError(f"[metal_kernel] {name}: must specify at least one output.")
        if atomic_outputs:
            raise KernelEmulationError(f"{name}: atomic outputs are not supported by the emulator")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        # Like MLX: the extras and attributes come from what the body (not the header) mentions.
        self.shape_infos = [
            (f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source)
            for n in self.input_names
        ]
        self.attributes = [(a, t) for a, t in _ATTRIBUTES if a in source]

    def cpp_source(self, inputs: Sequence[mx.array], output_dtypes: Sequence[mx.Dtype],
                   template: Sequence[tuple[str, Any]]) -> str:
        """The C++ translation unit for one call signature."""
        # Parameters as MLX declares them: `constant` for inputs of fewer than 8 elements and the
        # shape extras, `device` otherwise (C-style casts: they may change the address space).
        params, args = [], []
        slot = 0
        for name, arr, (has_shape, has_strides, has_ndim) in zip(
                self.input_names, inputs, self.shape_infos):
            ctype = _dtype_info(arr.dtype, f"{self.name} input {name}")[1]
            space = "constant" if arr.size < MAX_CONSTANT_ARRAY_SIZE else "device"
            if arr.ndim == 0:
                params.append(f"const {space} {ctype}& {name}")
                args.append(f"*(const {space} {ctype}*)p[{slot}]")
            else:
                params.append(f"const {space} {ctype}* {name}")
                args.append(f"(const {space} {ctype}*)p[{slot}]")
            slot += 1
            if arr.ndim > 0:
                for present, decl, cast in (
                        (has_shape, f"const constant int* {name}_shape", "(const constant int*)"),
                        (has_strides, f"const constant int64_t* {name}_strides",
                         "(const constant int64_t*)"),
                        (has_ndim, f"const constant int& {name}_ndim", "*(const constant int*)")):
                    if present:
                        params.append(decl)
                        args.append(f"{cast}p[{slot}]")
                        slot += 1
        for name, dtype in zip(self.output_names, output_dtypes):
            ctype = _dtype_info(dtype, f"{self.name} output {name}")[1]
            params.append(f"device {ctype}* {name}")
            args.append(f"(device {ctype}*)p[{slot}]")
            slot += 1
        for attr, atype in self.attributes:
            params.append(f"{atype} {attr}")
            args.append(f"ids.{attr}")

        tparams = [(n, *_template_value(n, v)) for n, v in template]
        lines = ['#include "metal_compat.h"', translate_source(self.header), "namespace {"]
        if tparams:
            lines.append("template <" + ", ".join(f"{kind} {n}" for n, kind, _ in tparams) + ">")
        lines.append("void kernel_lane(\n    " + ",\n    ".join(params) + ") {")
        lines.append(translate_source(self.source))
        lines.append("}")
        targs = "<" + ", ".join(v for _, _, v in tparams) + ">" if tparams else ""
        lines.append("void lane_entry(void* a, const mtlemu::LaneIds& ids) {")
        lines.append("  void** p = static_cast<void**>(a);")
        lines.append(f"  kernel_lane{targs}(\n      " + ",\n      ".join(args) + ");")
        lines.append("}")
        lines.append("}  // namespace")
        lines.append(
            'extern "C" int ds4emu_launch(void** args, const long long* grid, const long long* tg,'
            " int workers, long long stack, int order, int group_order, long long seed, char* err,"
            " int errlen) {\n"
            "  return mtlemu::launch(lane_entry, args, grid, tg, workers, stack, order,"
            " group_order, seed, err, errlen);\n}\n"
        )
        return "\n".join(lines)

    def __call__(self, *, inputs: Sequence[Any], output_shapes: Sequence[Sequence[int]],
                 output_dtypes: Sequence[mx.Dtype], grid: tuple[int, int, int],
                 threadgroup: tuple[int, int, int], template: Sequence[tuple[str, Any]] | None = None,
                 init_value: float | None = None, verbose: bool = False,
                 stream: Any = None) -> list[mx.array]:
        name = self.name
        if len(inputs) != len(self.input_names):
            raise ValueError(f"[metal_kernel] {name}: expected {len(self.input_names)} inputs, "
                             f"got {len(inputs)}")
        if len(output_shapes) != len(self.output_names) or len(output_dtypes) != len(self.output_names):
            raise ValueError(f"[metal_kernel] {name}: expected {len(self.output_names)} output "
                             "shapes and dtypes")
        grid = tuple(int(g) for g in grid)
        threadgroup = tuple(int(t) for t in threadgroup)
        if len(grid) != 3 or len(threadgroup) != 3 or min(threadgroup) < 1 or min(grid) < 0:
            raise ValueError(f"[metal_kernel] {name}: bad grid {grid} or threadgroup {threadgroup}")
        if threadgroup[0] * threadgroup[1] * threadgroup[2] > MAX_THREADS_PER_THREADGROUP:
            raise ValueError(f"[metal_kernel] {name}: threadgroup {threadgroup} has more than "
                             f"{MAX_THREADS_PER_THREADGROUP} threads")
        arrays = [_as_input(x) for x in inputs]
        cpp = self.cpp_source(arrays, output_dtypes, list(template or []))
        if verbose:
            print(f"Generated C++ for `{name}`:\n{cpp}")
        cname = re.sub(r"\W", "_", name)
        check_address_spaces(cpp, cname)
        lib = load_library(cpp, cname)

        keep: list[np.ndarray] = []
        given: list[tuple[str, np.ndarray]] = []  # the inputs proper (not the shape extras)
        for in_name, arr, (has_shape, has_strides, has_ndim) in zip(
                self.input_names, arrays, self.shape_infos):
            np_dtype = _dtype_info(arr.dtype, f"{name} input")[0]
            keep.append(_to_numpy(arr, np_dtype))
            given.append((in_name, keep[-1]))
            if arr.ndim > 0:
                if has_shape:
                    keep.append(np.array(arr.shape, dtype=np.int32))
                if has_strides:
                    strides = np.cumprod((list(arr.shape[1:]) + [1])[::-1])[::-1]
                    keep.append(np.ascontiguousarray(strides, dtype=np.int64))
                if has_ndim:
                    keep.append(np.array(arr.ndim, dtype=np.int32))
        checked = _check_orders(cpp)

        def launch(order: str, groups: str) -> list[np.ndarray]:
            watched = [(n, b, b.copy()) for n, b in given
                       if checked or b.nbytes <= _WATCH_BYTES]
            outs = []
            for shape, dtype in zip(output_shapes, output_dtypes):
                np_dtype = _dtype_info(dtype, f"{name} output")[0]
                if init_value is None:
                    buf = np.empty(tuple(shape), dtype=np_dtype)
                    buf.view(np.uint8)[...] = 0xFF
                else:
                    buf = _to_numpy(mx.full(tuple(shape), init_value, dtype=dtype), np_dtype)
                outs.append(np.ascontiguousarray(buf))
            ptrs = (ctypes.c_void_p * (len(keep) + len(outs)))(
                *[b.ctypes.data for b in keep], *[b.ctypes.data for b in outs])
            err = ctypes.create_string_buffer(512)
            rc = lib.ds4emu_launch(ptrs, (ctypes.c_longlong * 3)(*grid),
                                   (ctypes.c_longlong * 3)(*threadgroup), _workers(),
                                   _stack_size(), ORDERS[order], ORDERS[groups], _next_seed(),
                                   err, len(err))
            if rc != 0:
                raise KernelEmulationError(f"{name}: {err.value.decode(errors='replace')}")
            for in_name, buf, before in watched:
                if buf.tobytes() != before.tobytes():
                    raise KernelEmulationError(
                        f"{name}: the launch left input {in_name} changed (a kernel may write an "
                        "input only as a counter it puts back to 0: kernels/dispatch.py counters)")
            return outs

        first_groups = _group_order()
        outs = launch("forward", first_groups)
        if checked:
            for order in ("reversed", "shuffled"):
                for out_name, a, b in zip(self.output_names, outs, launch(order, order)):
                    if a.tobytes() != b.tobytes():
                        raise KernelEmulationError(
                            f"{name}: output {out_name} depends on the order the lanes or the "
                            f"threadgroups run in (lanes forward, threadgroups {first_groups} vs "
                            f"both {order}); a threadgroup_barrier is probably missing, or a "
                            "threadgroup reads another's results without the counter pattern "
                            "(kernels/dispatch.py counters) or sums them in arrival order")
        results = []
        for buf, dtype in zip(outs, output_dtypes):
            out = mx.array(buf)
            results.append(out.view(mx.bfloat16) if dtype == mx.bfloat16 else out)
        return results


def _check_orders(cpp: str) -> bool:
    """Whether this launch runs in every lane order: the first of each compiled kernel (or every
    one / none, as $DS4MLX_EMU_ORDERS says)."""
    mode = os.environ.get("DS4MLX_EMU_ORDERS", "first").strip().lower()
    if mode == "off":
        return False
    if mode == "every":
        return True
    key = hashlib.sha256(cpp.encode()).hexdigest()
    with _LOCK:
        if key in _ORDER_CHECKED:
            return False
        _ORDER_CHECKED.add(key)
        return True


_WATCH_BYTES = 64 * 1024  # inputs up to this size are compared after every launch
_seed = [0]


def _next_seed() -> int:
    # each launch shuffles its threadgroups differently (deterministic within a process)
    with _LOCK:
        _seed[0] += 1
        return _seed[0]


def _group_order() -> str:
    order = os.environ.get("DS4MLX_EMU_GROUPS", "forward").strip().lower() or "forward"
    if order not in ORDERS:
        raise KernelEmulationError(f"DS4MLX_EMU_GROUPS={order!r}: expected one of "
                                   f"{', '.join(ORDERS)}")
    return order


def _workers() -> int:
    return max(1, int(os.environ.get("DS4MLX_EMU_THREADS", min(os.cpu_count() or 1, 8))))


def _stack_size() -> int:
    return int(os.environ.get("DS4MLX_EMU_STACK", 256 * 1024))


def metal_kernel(name: str, input_names: Sequence[str], output_names: Sequence[str], source: str,
                 header: str = "", ensure_row_contiguous: bool = True,
                 atomic_outputs: bool = False) -> EmulatedKernel:
    """Drop-in for ``mx.fast.metal_kernel`` that runs on the CPU."""
    return EmulatedKernel(name, input_names, output_names, source, header, ensure_row_contiguous,
                          atomic_outputs)

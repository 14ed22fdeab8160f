"""A GGUF v2/v3 container over a memory map: metadata as plain Python values, tensors as views.

Layout (little-endian): magic ``GGUF``, version u32, tensor count u64, metadata count u64, the
metadata ``(key: string, type: u32, value)``, the tensor infos ``(name: string, n_dims: u32,
ne: u64[n_dims], type: u32, offset: u64)``, padding to ``general.alignment`` (default 32), then
the data; each tensor's offset is relative to the data start. ``ne[0]`` varies fastest, so the
numpy shape is ``ne`` reversed; block-quantized rows are ``ne[0] / block_size · block_bytes``
bytes.

We parse the header ourselves (rather than with ``gguf.GGUFReader``) so that every defect gets an
error naming the file and the key or tensor at fault, and so that the 129k-string tokenizer
arrays become plain lists quickly.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

_SCALARS = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "<u1", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}
# numpy dtype of the elements of unquantized tensor types
PLAIN_DTYPES = {
    GGMLQuantizationType.F32: "<f4", GGMLQuantizationType.F16: "<f2", GGMLQuantizationType.F64: "<f8",
    GGMLQuantizationType.I8: "<i1", GGMLQuantizationType.I16: "<i2", GGMLQuantizationType.I32: "<i4",
    GGMLQuantizationType.I64: "<i8", GGMLQuantizationType.BF16: "<u2",
}
INT_TYPES = (GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32, GGMLQuantizationType.I64)


class GGUFError(ValueError):
    """A GGUF file is malformed or does not fit; the message names the file and key or tensor."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    ne: tuple[int, ...]  # GGUF order: ne[0] is the row length
    offset: int  # absolute byte offset in the file

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical numpy shape (``ne`` reversed)."""
        return tuple(reversed(self.ne))

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type id {self.ggml_type}"

    @property
    def block(self) -> tuple[int, int] | None:
        """(weights, bytes) per block, or None for a type gguf-py does not know."""
        try:
            return GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        except (ValueError, KeyError):
            return None

    @property
    def nbytes(self) -> int | None:
        block = self.block
        if block is None:
            return None
        n = int(np.prod(self.ne, dtype=np.int64)) if self.ne else 1
        return n // block[0] * block[1]


class _Cursor:
    """Bounds-checked reads from the header; errors say what was being read."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)
        self.what = "the header"

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: file ends inside {self.what} (truncated or corrupt)")
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        raw = bytes(self.take(n))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: invalid UTF-8 in {self.what}") from None

    def value(self, vtype: int) -> tuple[Any, Any]:
        """(value, type tag); arrays of numbers come back as numpy arrays, strings as lists."""
        try:
            vtype = GGUFValueType(vtype)
        except ValueError:
            raise GGUFError(f"{self.path}: unknown metadata value type {vtype} in {self.what}") from None
        if vtype == GGUFValueType.STRING:
            return self.string(), vtype
        if vtype == GGUFValueType.ARRAY:
            item = self.scalar("<I")
            count = self.scalar("<Q")
            try:
                item = GGUFValueType(item)
            except ValueError:
                raise GGUFError(f"{self.path}: unknown array item type {item} in {self.what}") from None
            if item == GGUFValueType.STRING:
                return [self.string() for _ in range(count)], (vtype, item)
            if item == GGUFValueType.ARRAY:
                return [self.value(GGUFValueType.ARRAY)[0] for _ in range(count)], (vtype, item)
            dt = np.dtype(_SCALARS[item])
            arr = np.frombuffer(self.take(count * dt.itemsize), dtype=dt).copy()
            return (arr.astype(bool) if item == GGUFValueType.BOOL else arr), (vtype, item)
        v = np.frombuffer(self.take(np.dtype(_SCALARS[vtype]).itemsize), dtype=_SCALARS[vtype])[0]
        return (bool(v) if vtype == GGUFValueType.BOOL else v.item()), vtype


class GGUFFile:
    """An open GGUF file. ``fields``: metadata key -> value; ``tensors``: name -> TensorInfo."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: GGUF file not found")
        self._file = open(self.path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        if size < 24:
            self._file.close()
            raise GGUFError(f"{self.path}: {size} bytes is too short for a GGUF header")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self) -> None:
        c = _Cursor(self._map, self.path)
        magic = bytes(c.take(4))
        if magic != MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        self.version = c.scalar("<I")
        if self.version not in VERSIONS:
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (only {VERSIONS})")
        n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
        self.fields: dict[str, Any] = {}
        self.field_types: dict[str, Any] = {}
        for i in range(n_kv):
            c.what = f"metadata entry {i}"
            key = c.string()
            c.what = f"metadata key {key!r}"
            self.fields[key], self.field_types[key] = c.value(c.scalar("<I"))
        alignment = self.fields.get(Keys.General.ALIGNMENT, DEFAULT_ALIGNMENT)
        if self.field_types.get(Keys.General.ALIGNMENT, GGUFValueType.UINT32) != GGUFValueType.UINT32 \
                or not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
            raise GGUFError(f"{self.path}: general.alignment must be a u32 multiple of 8, got {alignment!r}")
        self.alignment = alignment
        infos = []
        for i in range(n_tensors):
            c.what = f"tensor info {i}"
            name = c.string()
            c.what = f"tensor info of {name!r}"
            n_dims = c.scalar("<I")
            if n_dims > 8:
                raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions")
            ne = tuple(c.scalar("<Q") for _ in range(n_dims))
            infos.append((name, c.scalar("<I"), ne, c.scalar("<Q")))
        self.data_offset = -(-c.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ggml_type, ne, offset in infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: tensor {name!r} appears twice")
            info = TensorInfo(name, ggml_type, ne, self.data_offset + offset)
            nbytes = info.nbytes
            if nbytes is None:  # its size is unknown, so nothing after it could be trusted
                raise GGUFError(f"{self.path}: tensor {name!r} has GGML type id {ggml_type}, "
                                "which is not a known GGML type")
            if nbytes is not None and info.offset + nbytes > len(self._map):
                raise GGUFError(
                    f"{self.path}: data of tensor {name!r} ({info.type_name}, {nbytes} bytes at "
                    f"offset {info.offset}) runs past the end of the file ({len(self._map)} bytes); "
                    "truncated download?"
                )
            self.tensors[name] = info

    # ------------------------------------------------------------------ access
    @property
    def architecture(self) -> str | None:
        return self.fields.get(Keys.General.ARCHITECTURE)

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: tensor {name!r} is missing")
        return self.tensors[name]

    def array(self, name: str) -> np.ndarray:
        """Read-only numpy view of a tensor's bytes in the map: plain types as their dtype in
        the logical shape (BF16 as uint16), block types as uint8 ``[..., row_bytes]``."""
        info = self.info(name)
        if info.nbytes is None:
            from ..quant.gguf import UnsupportedQuantType

            raise UnsupportedQuantType(info.ggml_type, f"{self.path}: {name}")
        block = info.block
        qtype = GGMLQuantizationType(info.ggml_type)
        if qtype in PLAIN_DTYPES:
            dtype, shape = np.dtype(PLAIN_DTYPES[qtype]), info.shape
        else:
            if info.ne and info.ne[0] % block[0]:
                raise GGUFError(
                    f"{self.path}: tensor {name!r} has rows of {info.ne[0]} values, not a multiple of "
                    f"the {info.type_name} block size {block[0]}"
                )
            dtype, shape = np.dtype(np.uint8), (*info.shape[:-1], info.ne[0] // block[0] * block[1])
        return np.frombuffer(self._map, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)),
                             offset=info.offset).reshape(shape)

    def release(self, where: str | int, length: int | None = None) -> None:
        """Tell the OS the file pages of a tensor (by name) or of ``[where, where+length)`` are
        no longer needed, so peak RSS follows what was copied out of the map, not the map too."""
        if isinstance(where, str):
            info = self.tensors.get(where)
            if info is None or info.nbytes is None:
                return
            start, length = info.offset, info.nbytes
        else:
            start = where
        if not hasattr(self._map, "madvise") or length <= 0:
            return
        page = mmap.PAGESIZE
        begin = start // page * page
        end = min(len(self._map), -(-(start + length) // page) * page)
        try:
            self._map.madvise(mmap.MADV_DONTNEED, begin, end - begin)
        except (OSError, ValueError, AttributeError):
            pass  # advisory only

    def close(self) -> None:
        m = getattr(self, "_map", None)
        if m is not None:
            try:
                m.close()
            except BufferError:
                pass  # views still alive: the map closes when they go
        self._file.close()

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)

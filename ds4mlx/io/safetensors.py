"""Memory-mapped safetensors reader (and a small writer for fixtures and conversion).

A safetensors file is: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
data blob (offsets relative to the blob, row-major, little-endian).

numpy has no FP8 or bfloat16 dtypes, so those are read as their raw bits: ``F8_E4M3`` and
``F8_E8M0`` as ``uint8``, ``BF16`` as ``uint16`` (``tensor_mx`` turns the latter into
``mx.bfloat16``; ``quant/codecs.py`` encodes and decodes the bits). Arrays from ``tensor_np`` are read-only views of the memory map: nothing is
copied until MLX needs its own buffer.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

# safetensors dtype string -> numpy dtype of the stored bits (little-endian)
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "U8": np.dtype("uint8"),
    "I8": np.dtype("int8"),
    "F8_E4M3": np.dtype("uint8"),
    "F8_E5M2": np.dtype("uint8"),
    "F8_E8M0": np.dtype("uint8"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}

# numpy dtype -> safetensors dtype string, for arrays whose numpy dtype says it all
_NUMPY_TO_ST = {
    np.dtype("bool"): "BOOL",
    np.dtype("uint8"): "U8",
    np.dtype("int8"): "I8",
    np.dtype("uint16"): "U16",
    np.dtype("int16"): "I16",
    np.dtype("float16"): "F16",
    np.dtype("uint32"): "U32",
    np.dtype("int32"): "I32",
    np.dtype("float32"): "F32",
    np.dtype("uint64"): "U64",
    np.dtype("int64"): "I64",
    np.dtype("float64"): "F64",
}

_ITEMSIZE = {k: v.itemsize for k, v in DTYPES.items()}

# The dtypes a checkpoint may store an unquantised float tensor in, and a hash table in.
FLOAT_DTYPES = ("BF16", "F16", "F32")
INT_DTYPES = ("I64", "I32")

_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


class SafetensorsError(ValueError):
    """A safetensors file is malformed; the message names the file (and tensor)."""


@dataclass(frozen=True, slots=True)  # slots: made once per tensor of a checkpoint, a third cheaper
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string, e.g. "F8_E4M3"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """One safetensors file, memory-mapped; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"safetensors file not found: {self.path}")
        size = self.path.stat().st_size
        if size < 8:
            raise SafetensorsError(f"{self.path}: file too short ({size} bytes) for a safetensors header")
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(
                    f"{self.path}: header length {header_len} exceeds the file ({size} bytes); "
                    "the file is truncated or not safetensors"
                )
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{self.path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object")

        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        blob_size = size - data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = self._parse_entry(name, entry, data_start, blob_size)
        self._check_overlaps(data_start)
        self._mmap: mmap.mmap | None = None

    def _parse_entry(self, name: str, entry, data_start: int, blob_size: int) -> TensorInfo:
        # called once per tensor of a checkpoint (tens of thousands, most of a conversion's
        # start-up): the common well-formed entry takes one pass of plain type tests; anything
        # else goes to the full checks below, which accept it or say what is wrong
        if type(entry) is dict:
            dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
            size = _ITEMSIZE.get(dtype) if type(dtype) is str else None
            if size is not None and type(shape) is list and type(offsets) is list and len(offsets) == 2:
                begin, end = offsets
                for d in shape:
                    if type(d) is not int or d < 0:
                        break
                    size *= d
                else:
                    if type(begin) is int and type(end) is int and 0 <= begin and end - begin == size \
                            and end <= blob_size:
                        return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)
        return self._check_entry(name, entry, data_start, blob_size)

    def _check_entry(self, name: str, entry, data_start: int, blob_size: int) -> TensorInfo:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise SafetensorsError(f"{self.path}: tensor {name!r}: header entry needs dtype, shape and data_offsets")
        dtype = entry["dtype"]
        if dtype not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name!r}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        shape = entry["shape"]
        offsets = entry["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise SafetensorsError(f"{self.path}: tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise SafetensorsError(f"{self.path}: tensor {name!r}: bad data_offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if begin < 0 or end - begin != nbytes:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r}: data_offsets {offsets} span {end - begin} bytes, "
                f"but {dtype} {shape} needs {nbytes}"
            )
        if end > blob_size:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r}: data ends at byte {end} of the data section, which has only "
                f"{blob_size} bytes (truncated file?)"
            )
        return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)

    def _check_overlaps(self, data_start: int) -> None:
        """Two tensors sharing bytes would silently alias each other's data."""
        spans = sorted((t.start, t.end, t.name) for t in self.tensors.values() if t.end > t.start)
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise SafetensorsError(
                    f"{self.path}: tensor {b!r} starts at byte {start_b - data_start} of the data section, "
                    f"inside tensor {a!r} (data_offsets overlap)"
                )

    # --- access -------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None

    def _buffer(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mmap

    def tensor_np(self, name: str) -> np.ndarray:
        """The stored bits as a read-only numpy view of the memory map (F8_* as uint8, BF16 as uint16)."""
        info = self.info(name)
        dtype = DTYPES[info.dtype]
        count = info.nbytes // dtype.itemsize
        if count == 0:
            return np.zeros(info.shape, dtype)
        return np.frombuffer(self._buffer(), dtype=dtype, count=count, offset=info.start).reshape(info.shape)

    def tensor_mx(self, name: str):
        """The tensor as an ``mx.array`` (one copy out of the map). BF16 becomes ``mx.bfloat16``."""
        import mlx.core as mx

        info = self.info(name)
        if info.dtype in ("F64", "U64"):
            raise SafetensorsError(f"{self.path}: tensor {name!r}: MLX has no {info.dtype}")
        a = mx.array(self.tensor_np(name))
        if info.dtype == "BF16":
            a = a.view(mx.bfloat16)
        return a

    def release(self, name: str) -> None:
        """Drop the pages of tensor ``name`` from this process's memory (after its copy was
        taken): the map is read-only, so a later read faults them in from the file again. Without
        it the pages a load touched stay resident until the file is closed, and a load's peak
        memory is the file plus the model instead of the model."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if self._mmap is None or advice is None:
            return
        info = self.info(name)
        start = info.start - info.start % mmap.PAGESIZE
        if info.end > start:
            try:
                self._mmap.madvise(advice, start, info.end - start)
            except (OSError, ValueError):  # advice only: the load is correct either way
                pass

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # numpy views still alive; the map goes with them
                pass
            self._mmap = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_shards(directory: Path, weight_map: dict[str, str]) -> dict[str, SafetensorsFile]:
    """Open every shard an index names; a missing shard is named with a tensor it should hold."""
    files: dict[str, SafetensorsFile] = {}
    for shard in sorted(set(weight_map.values())):
        if not (directory / shard).is_file():
            example = next(n for n, s in weight_map.items() if s == shard)
            raise FileNotFoundError(f"{directory / shard}: shard listed in the index (e.g. for {example}) is missing")
        files[shard] = SafetensorsFile(directory / shard)
    return files


# --- writer -------------------------------------------------------------------------------


def tensor_entry(array: np.ndarray, dtype: str | None = None) -> tuple[str, np.ndarray]:
    """Pair an array with its safetensors dtype string (inferred from numpy when not given)."""
    array = np.asarray(array)
    if dtype is None:
        if array.dtype not in _NUMPY_TO_ST:
            raise SafetensorsError(f"no safetensors dtype for numpy {array.dtype}; pass one")
        dtype = _NUMPY_TO_ST[array.dtype]
    if dtype not in DTYPES:
        raise SafetensorsError(f"unknown safetensors dtype {dtype!r}")
    if array.dtype.itemsize != DTYPES[dtype].itemsize:
        raise SafetensorsError(f"{dtype} needs {DTYPES[dtype].itemsize}-byte elements, got numpy {array.dtype}")
    return dtype, array


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, tuple[str, np.ndarray]] | Iterable[tuple[str, tuple[str, np.ndarray]]],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write ``{name: (dtype string, array)}`` in file order; returns the data-section size.

    The array's bits are written as they are (little-endian), so FP8 codes go in as uint8 and
    BF16 as uint16 bits.
    """
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, (dtype, array) in items:
        dtype, array = tensor_entry(array, dtype)
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        header[name] = {"dtype": dtype, "shape": list(data.shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
        arrays.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for data in arrays:
            f.write(data.tobytes())
    return offset

"""The one GGUF writer: a ``deepseek4`` file from a config (metadata as ``io/gguf.py`` defines
it), an optional tokenizer, and tensors whose bytes arrive in chunks.

gguf-py's ``GGUFWriter`` writes the header, the metadata and the tensor table. It wants every
tensor whole in memory for the data, so the data is streamed here instead, with gguf-py's
padding (each tensor starts on the alignment, the file ends on it) and a CRC-32 of each tensor
taken while writing, for the caller's verification pass. ``convert`` streams quantized chunks
from worker threads; ``write_gguf`` takes arrays (tests, benchmarks, the logits recorder).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

from ..io import mlx_dir
from ..io.gguf import ARCH, gguf_metadata
from ..io.gguf_file import INT_TYPES, PLAIN_DTYPES, GGUFError
from ..quant import gguf as qgguf

DEFAULT_NAME = "DeepSeek-V4-Flash"
T = GGMLQuantizationType


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the plan: GGUF name, GGML type name, value shape (numpy order), data bytes."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    nbytes: int


def tensor_entry(name: str, qtype: str, shape: tuple[int, ...]) -> TensorEntry:
    """The entry of a tensor of ``shape`` values stored as ``qtype`` (its size from gguf-py's
    block table); a row that does not fill whole blocks is refused."""
    shape = tuple(int(d) for d in shape)
    row = qgguf.row_bytes(qtype, shape[-1] if shape else 1, name)
    return TensorEntry(name, qtype, shape, int(np.prod(shape[:-1], dtype=np.int64)) * row)


def _padding(f, align: int) -> None:
    mlx_dir.write_bytes(f, memoryview(b"\0" * (-f.tell() % align)))


def stream_gguf(path: Path, config: Any, entries: list[TensorEntry], data: Iterable[Iterable[np.ndarray]], *,
                tokenizer: Mapping[str, Any] | None = None, name: str = DEFAULT_NAME,
                extra_metadata: Mapping[str, tuple[Any, GGUFValueType]] | None = None) -> dict[str, int]:
    """Write ``path``: metadata from ``config`` (HF dict or ``ModelConfig``), ``extra_metadata``
    ``{key: (value, type)}``, ``tokenizer`` (``ds4mlx.tokenizer.gguf_tokenizer_fields``), the
    table of ``entries``, then each entry's bytes from the matching item of ``data`` (an
    iterable of chunks, concatenated). Returns every tensor's CRC-32."""
    writer = GGUFWriter(str(path), ARCH)
    chunks = iter(data)
    try:
        writer.add_name(name)
        for key, value, vtype in gguf_metadata(config):
            if vtype == GGUFValueType.ARRAY:
                writer.add_array(key, list(value))
            else:
                writer.add_key_value(key, value, vtype)
        for key, (value, vtype) in (extra_metadata or {}).items():
            writer.add_key_value(key, value, vtype)
        if tokenizer:
            from ..tokenizer import add_tokenizer_to_gguf

            add_tokenizer_to_gguf(writer, dict(tokenizer))
        for e in entries:  # a non-uint8 dtype makes the writer take ``shape`` as the value shape
            writer.add_tensor_info(e.name, e.shape, np.dtype(np.float32), e.nbytes, raw_dtype=T[e.qtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        f = writer.fout[0]
        crcs = {}
        for e in entries:
            _padding(f, writer.data_alignment)
            crc, done = 0, 0
            for chunk in next(chunks):
                buf = memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
                mlx_dir.write_bytes(f, buf)
                crc = zlib.crc32(buf, crc)
                done += len(buf)
            if done != e.nbytes:
                raise GGUFError(f"{path}: tensor {e.name!r} produced {done} bytes, expected {e.nbytes}")
            crcs[e.name] = crc
            _padding(f, writer.data_alignment)
        f.flush()
        os.fsync(f.fileno())
    finally:
        if hasattr(chunks, "close"):
            chunks.close()  # a generator that feeds worker threads or processes stops them now, also on errors
        writer.close()
    return crcs


# --------------------------------------------------------------------------- from arrays
def _value_shape(name: str, array: np.ndarray, qtype: T) -> tuple[int, ...]:
    """Value shape of ``array`` stored as ``qtype`` (packed uint8 rows count as their values)."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    if qtype in INT_TYPES or array.dtype != np.uint8 or block == 1:
        return tuple(array.shape)
    if array.ndim == 0 or array.shape[-1] % nbytes:
        raise GGUFError(f"{name}: uint8 array of shape {array.shape} is not packed {qtype.name} rows")
    return (*array.shape[:-1], array.shape[-1] // nbytes * block)


def _tensor_bytes(name: str, array: np.ndarray, qtype: T) -> np.ndarray:
    """What the file stores for ``array`` as ``qtype``: uint8 arrays for block types are taken
    as packed bytes (any type gguf-py knows); values are quantized with our quantizers."""
    if qtype in INT_TYPES:
        return np.ascontiguousarray(array, dtype=PLAIN_DTYPES[qtype])
    if array.dtype == np.uint8 and qtype not in PLAIN_DTYPES:
        return np.ascontiguousarray(array)
    fmt = qgguf.by_type(int(qtype), name)
    quantize = getattr(fmt, "quantize", None)
    if quantize is None:
        raise GGUFError(f"{name}: ds4mlx has no quantizer for {fmt.NAME}; pass packed uint8 bytes")
    return quantize(np.asarray(array, dtype=np.float32))


def write_gguf(path: str | os.PathLike, config: Any,
               tensors: Mapping[str, tuple[np.ndarray, int]],
               tokenizer_fields: Mapping[str, Any] | None = None, *, name: str = DEFAULT_NAME,
               extra_metadata: Mapping[str, tuple[Any, GGUFValueType]] | None = None) -> Path:
    """Write a ``deepseek4`` GGUF with ``tensors`` as ``{gguf name: (array, GGML type)}`` in the
    given order (float values are quantized to the type; uint8 arrays for block types are packed
    bytes). Tensors are packed one at a time, so memory holds one packed tensor beyond the
    caller's arrays. The file appears under ``path`` only once complete."""
    path = Path(path)
    entries, arrays = [], []
    for tname, (array, qtype) in tensors.items():
        qtype, array = T(int(qtype)), np.asarray(array)
        try:
            entries.append(tensor_entry(tname, qtype.name, _value_shape(tname, array, qtype)))
        except ValueError as e:
            raise GGUFError(str(e)) from None
        arrays.append((tname, array, qtype))
    data: Iterator[list[np.ndarray]] = ([_tensor_bytes(*a)] for a in arrays)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        stream_gguf(tmp, config, entries, data, tokenizer=tokenizer_fields, name=name,
                    extra_metadata=extra_metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

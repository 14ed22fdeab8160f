"""The one GGUF writer: a ``deepseek4`` file from a config (metadata as ``io/gguf.py`` defines
it), an optional tokenizer, and tensors whose bytes arrive in chunks.

gguf-py's ``GGUFWriter`` builds the header, the metadata and the tensor table (in memory). It
wants every tensor whole in memory for the data, so the data is streamed here instead, with
gguf-py's padding (each tensor starts on the alignment, the file ends on it), past the page
cache (``io/direct.py``), and checked against the disk as it is written (``stream_gguf``).
``convert`` streams quantized chunks from worker threads; ``write_gguf`` takes arrays (tests,
benchmarks, the logits recorder).
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.gguf_writer import WriterState

from ..io.direct import DirectWriter, ReadBackError, StagingPool
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


def _header_bytes(config: Any, entries: list[TensorEntry], tokenizer: Mapping[str, Any] | None, name: str,
                  extra_metadata: Mapping[str, tuple[Any, GGUFValueType]] | None) -> tuple[bytes, int]:
    """gguf-py's header, metadata and tensor table, built in memory (the data goes to the disk
    directly, so the file is written by one writer from the first byte), padded to the data
    alignment; and that alignment."""
    writer = GGUFWriter(None, ARCH)
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
    writer.fout, writer.state = [io.BytesIO()], WriterState.EMPTY  # what opening a file would set
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    head = writer.fout[0].getvalue()
    align = writer.data_alignment
    writer.close()
    return head + bytes(-len(head) % align), align


def _spans(base: int, entries: list[TensorEntry], align: int) -> list[tuple[int, int, str]]:
    """``(start, end, name)`` of every tensor's data in the file (each starts on ``align``)."""
    out, pos = [], base
    for e in entries:
        out.append((pos, pos + e.nbytes, e.name))
        pos += -(-e.nbytes // align) * align
    return out


SYNC_BYTES = 64 << 20  # the written part is synced every this many bytes (see _SyncBehind)


class _SyncBehind:
    """A thread that syncs the file every ``SYNC_BYTES`` written, behind the writer: direct
    writes leave the journal and the disk's cache to the final ``fsync``, which then waited for
    all of it at once (measured 0.5 s for 360 MB, up to 2 s on a busy disk, all of it serial
    time at the end of a conversion); synced as it goes, the final one waits for the last
    piece only (0.06 s) and the total is the same. Its own fd: the writer's may close first."""

    def __init__(self, path: Path, f: DirectWriter):
        self.f, self.fd, self.stop = f, os.open(path, os.O_RDONLY), False
        self.thread = threading.Thread(target=self._run, name="gguf-sync", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        mark = SYNC_BYTES
        while True:
            self.f.wait_written(mark)  # returns once the file is finished or given up, too
            if self.stop or self.f.finished:
                return
            try:
                os.fdatasync(self.fd)
            except OSError:  # the writer's own fsync reports what matters
                return
            mark += SYNC_BYTES

    def close(self) -> None:
        """Stop (once the writer is flushed or discarded: ``wait_written`` has returned)."""
        self.stop = True
        self.thread.join()
        os.close(self.fd)


def stream_gguf(path: Path, config: Any, entries: list[TensorEntry], data: Iterable[Iterable[np.ndarray]], *,
                tokenizer: Mapping[str, Any] | None = None, name: str = DEFAULT_NAME,
                extra_metadata: Mapping[str, tuple[Any, GGUFValueType]] | None = None) -> None:
    """Write ``path``: metadata from ``config`` (HF dict or ``ModelConfig``), ``extra_metadata``
    ``{key: (value, type)}``, ``tokenizer`` (``ds4mlx.tokenizer.gguf_tokenizer_fields``), the
    table of ``entries``, then each entry's bytes from the matching item of ``data`` (an
    iterable of chunks, concatenated), and verify it.

    The file is written past the page cache (``io/direct.py``), and verified as it goes: the
    writer's thread reads every piece back from the disk (past the cache where possible) and
    compares it with the bytes it handed over, header included. That catches what a disk or
    file system can do to a write (lost, torn, misplaced, changed bytes) in one comparison of
    the two copies: no checksum of either. Then the parsed tensor table must place every
    tensor where its bytes went."""
    begin_gguf(path, config, entries, data, tokenizer=tokenizer, name=name, extra_metadata=extra_metadata).finish()


class WrittenGGUF:
    """A GGUF whose bytes are all handed to its writer: ``finish`` waits for the disk, syncs and
    checks it (``stream_gguf``'s last steps; another thread may run them while the next file is
    written), ``abandon`` stops the writer without them (the caller removes the file)."""

    def __init__(self, path: Path, f: DirectWriter, sync: _SyncBehind, spans: list[tuple[int, int, str]]):
        self.path, self.f, self.sync, self.spans = path, f, sync, spans

    def finish(self) -> None:
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
        except ReadBackError as err:
            raise _differs(self.path, self.spans, err) from None
        finally:
            self.abandon()  # a no-op once closed
        _check_table(self.path, self.spans)

    def abandon(self) -> None:
        self.f.discard()  # stops the writer thread
        self.sync.close()


def _differs(path: Path, spans: list[tuple[int, int, str]], err: ReadBackError) -> GGUFError:
    where = next((n if n == "the header" else f"tensor {n!r}" for a, b, n in spans if a <= err.offset < b),
                 "the padding")
    return GGUFError(f"{path}: verification failed: {where} differs on disk from what was written")


def begin_gguf(path: Path, config: Any, entries: list[TensorEntry], data: Iterable[Iterable[np.ndarray]], *,
               tokenizer: Mapping[str, Any] | None = None, name: str = DEFAULT_NAME,
               extra_metadata: Mapping[str, tuple[Any, GGUFValueType]] | None = None,
               staging: StagingPool | None = None) -> WrittenGGUF:
    """``stream_gguf`` up to the last byte handed to the writer; its ``finish`` does the rest.
    ``staging``: the writer's buffers come from (and go back to) this pool, shared by the files
    of one conversion."""
    chunks = iter(data)
    try:
        head, align = _header_bytes(config, entries, tokenizer, name, extra_metadata)
        spans = [(0, len(head), "the header")] + _spans(len(head), entries, align)
        size = spans[-1][1] + (-spans[-1][1] % align) if entries else len(head)
        f = DirectWriter(path, read_back=True, staging=staging)
        sync = None
        try:
            sync = _SyncBehind(path, f)
            mlx_dir.write_bytes(f, memoryview(head))
            for (start, stop, _), e in zip(spans[1:], entries):
                done = 0
                for chunk in next(chunks):
                    buf = memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
                    mlx_dir.write_bytes(f, buf)
                    done += len(buf)
                if done != e.nbytes:
                    raise GGUFError(f"{path}: tensor {e.name!r} produced {done} bytes, expected {e.nbytes}")
                mlx_dir.write_bytes(f, memoryview(bytes(-stop % align)))
            if f.tell() != size:
                raise GGUFError(f"{path}: wrote {f.tell()} bytes, planned {size}")
            return WrittenGGUF(path, f, sync, spans)
        except BaseException as err:
            f.discard()  # stops the writer thread
            if sync is not None:
                sync.close()
            if isinstance(err, ReadBackError):
                raise _differs(path, spans, err) from None
            raise
    finally:
        if hasattr(chunks, "close"):
            chunks.close()  # a generator that feeds worker threads or processes stops them now, also on errors


def _check_table(path: Path, spans: list[tuple[int, int, str]]) -> None:
    from ..io.gguf_file import open_gguf

    with open_gguf(path) as g:
        placed = {n: (i.offset, i.offset + i.nbytes) for n, i in g.tensors.items()}
    if placed != {n: (a, b) for a, b, n in spans[1:]}:
        raise GGUFError(f"{path}: verification failed: the tensor table does not place the tensors "
                        "where they were written")


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

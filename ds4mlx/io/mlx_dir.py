"""Our converted MLX directories (written by ``ds4mlx convert --to mlx``): layout, reader, writer.

A directory holds ``model-0000K-of-0000N.safetensors`` shards, ``model.safetensors.index.json``
and a ``config.json`` (the HF config with ``num_experts_per_tok`` as converted). Tensors carry the
model's internal parameter paths (``io/names.py``): routed experts stacked per layer and
projection, packed weights as MLX stores them (``weight`` uint32, ``scales``, and ``biases`` for
affine). ``config["quantization"]`` records the format of every packed module in mlx-lm's
style (``{path: {"mode", "bits", "group_size"}}``); unlisted projections are float.
``config["ds4mlx"]`` marks the directory as ours (``is_mlx_dir``).

``open_mlx_dir`` checks the whole directory from headers alone against the layout the config
implies, then ``MLXDirCheckpoint.load_weights`` returns exactly what the official reader returns:
``({internal path: mx.array}, {module path: WeightFormat})``.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..config import check_hf_values
from ..quant.formats import WeightFormat, packed_shapes
from ..names import EXPERT_WEIGHT, hf_to_internal, official_layout
from .checks import check_expert_ids, hash_table_fits
from .direct import (BUFFER_BYTES, DirectWriter, ReadBackError, SourceEnded, SourceRange, SourceRanges, _read_full,
                     open_read, scan)
from .json_file import read_json_object, read_weight_map
from .safetensors import DTYPES, FLOAT_DTYPES, INT_DTYPES, SafetensorsFile, open_shards

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
FORMAT_KEY = "ds4mlx"
FORMAT_NAME = "mlx-dir"
FORMAT_VERSION = 1
PACKED_DTYPES = {"mxfp8": "U8", "mxfp4": "U8"}  # scale dtype of the mx modes; affine: float


class MLXDirError(ValueError):
    """A converted MLX directory is inconsistent; the message names the file, tensor or key."""


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def is_mlx_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by ``ds4mlx convert --to mlx``."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        return False
    try:
        return isinstance(json.loads(p.read_text()).get(FORMAT_KEY), dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def format_entry(fmt: WeightFormat) -> dict[str, Any]:
    return {"mode": fmt.kind, "bits": fmt.bits, "group_size": fmt.group_size}


# --------------------------------------------------------------------------- expected layout


@dataclass(frozen=True)
class Expected:
    """One tensor the directory must hold: internal name, shape, allowed dtypes."""

    name: str
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]
    min_last: bool = False  # tid2eid: last dim may be wider than the shape says


def expected_layout(config: dict[str, Any], formats: dict[str, WeightFormat],
                    *, include_mtp: bool = True) -> dict[str, Expected]:
    """Every internal tensor for this config and module formats, in file order.

    Float weights keep their logical shape; a packed module of format ``f`` holds ``weight``
    uint32 ``[..., out, in·bits/32]`` and ``scales`` ``[..., out, in/group]`` (+ ``biases`` for
    affine). Stacked experts have a leading ``n_routed_experts`` dimension.
    """
    layout: dict[str, Expected] = {}
    n_experts = int(config["n_routed_experts"])
    for name, spec in official_layout(config).items():
        if name.startswith("mtp.") and not include_mtp:
            continue
        expert_weight = EXPERT_WEIGHT.match(name)
        if expert_weight and expert_weight.group(2) != "0":
            continue  # a routed expert past the first (tens of thousands): no name to work out
        path, expert = hf_to_internal(name)
        if expert not in (None, 0):
            continue  # one stacked tensor per projection
        lead = (n_experts,) if expert is not None else ()
        module = path[: -len(".weight")] if path.endswith(".weight") else None
        fmt = formats.get(module) if module else None
        if fmt is None:
            if spec.storage == "i64":
                layout[path] = Expected(path, spec.shape, INT_DTYPES, min_last=True)
            else:
                layout[path] = Expected(path, lead + spec.shape, FLOAT_DTYPES)
            continue
        try:
            w_shape, s_shape = packed_shapes(fmt, lead + spec.shape)
        except ValueError as e:
            raise MLXDirError(f"{module}: {e}") from None
        scale_dtypes = (PACKED_DTYPES[fmt.kind],) if fmt.kind in PACKED_DTYPES else FLOAT_DTYPES
        layout[path] = Expected(path, w_shape, ("U32",))
        layout[module + ".scales"] = Expected(module + ".scales", s_shape, scale_dtypes)
        if fmt.kind == "affine":
            layout[module + ".biases"] = Expected(module + ".biases", s_shape, FLOAT_DTYPES)
    return layout


def read_formats(config: dict[str, Any], source: str) -> dict[str, WeightFormat]:
    quant = config.get("quantization")
    if not isinstance(quant, dict):
        raise MLXDirError(f"{source}: 'quantization' is missing or not an object")
    formats = {}
    for path, entry in quant.items():
        if not isinstance(entry, dict):
            continue  # mlx-lm's top-level defaults (bits, group_size, mode)
        try:
            formats[path] = WeightFormat(str(entry["mode"]), int(entry["bits"]), int(entry["group_size"]))
        except (KeyError, TypeError, ValueError):
            raise MLXDirError(f"{source}: quantization[{path!r}] needs mode, bits and group_size") from None
    return formats


# --------------------------------------------------------------------------- reader


@dataclass
class MLXDirCheckpoint:
    path: Path
    config: dict[str, Any]
    weight_map: dict[str, str]  # internal name -> shard
    formats: dict[str, WeightFormat]
    has_mtp: bool
    _files: dict[str, SafetensorsFile] = field(default_factory=dict, repr=False)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def load_weights(self, *, include_mtp: bool = True, progress: Callable[[int, int], None] | None = None,
                     keep: Callable[[str], bool] | None = None) -> tuple[dict[str, Any], dict[str, WeightFormat]]:
        """``({internal path: mx.array}, {module path: WeightFormat})``, one tensor at a time;
        ``progress(bytes read, bytes to read)`` after each. ``keep(name)``: read only the
        tensors it accepts (one pipeline stage's share)."""
        names = [n for n in self.weight_map
                 if (include_mtp or not n.startswith("mtp.")) and (keep is None or keep(n))]
        total = sum(self._files[self.weight_map[n]].info(n).nbytes for n in names)
        done = 0
        weights = {}
        for name in names:
            shard = self.weight_map[name]
            weights[name] = self._files[shard].tensor_mx(name)
            if progress is not None:
                done += self._files[shard].info(name).nbytes
                progress(done, total)
            if name.endswith(".tid2eid"):
                check_expert_ids(weights[name], int(self.config["n_routed_experts"]),
                                 f"{self.path / self.weight_map[name]}: {name}", MLXDirError)
        formats = {p: f for p, f in self.formats.items()
                   if (include_mtp or not p.startswith("mtp.")) and (keep is None or keep(p + ".weight"))}
        return weights, formats



def read_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no config.json in the MLX directory")
    config = read_json_object(p, MLXDirError, "the configuration")
    if config.get("model_type") != "deepseek_v4":
        raise MLXDirError(f"{p}: model_type is {config.get('model_type')!r}, expected 'deepseek_v4'")
    marker = config.get(FORMAT_KEY)
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_NAME:
        raise MLXDirError(f"{p}: not a ds4mlx MLX directory (no {FORMAT_KEY!r} marker)")
    if int(marker.get("version", 0)) > FORMAT_VERSION:
        raise MLXDirError(f"{p}: format version {marker.get('version')} is newer than this ds4mlx ({FORMAT_VERSION})")
    check_hf_values(config, str(p))  # before the layout is derived from the values
    return config


def open_mlx_dir(path: str | os.PathLike) -> MLXDirCheckpoint:
    """Open and validate a converted MLX directory from its headers."""
    path = Path(path)
    config = read_config(path)
    formats = read_formats(config, str(path / CONFIG_FILE))
    index = path / INDEX_FILE
    if not index.is_file():
        raise FileNotFoundError(f"{index}: index missing from the MLX directory")
    weight_map = read_weight_map(index, MLXDirError)

    files = open_shards(path, weight_map)

    has_mtp = any(n.startswith("mtp.") for n in weight_map)
    try:
        expected = expected_layout(config, formats, include_mtp=has_mtp)
    except (KeyError, ValueError) as e:
        raise MLXDirError(f"{path / CONFIG_FILE}: {e}") from None
    missing = [n for n in expected if n not in weight_map]
    if missing:
        raise MLXDirError(f"{path}: tensor {missing[0]!r} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(weight_map) - set(expected))
    if extra:
        raise MLXDirError(f"{path / weight_map[extra[0]]}: tensor {extra[0]!r} does not belong to this config")
    k = int(config["num_experts_per_tok"])
    for name, exp in expected.items():
        shard = weight_map[name]
        if name not in files[shard]:
            raise MLXDirError(f"{path / shard}: the index lists tensor {name!r} in this shard, but it is not there")
        info = files[shard].info(name)
        where = f"{path / shard}: {name}"
        if info.dtype not in exp.dtypes:
            raise MLXDirError(f"{where}: dtype {info.dtype}, expected one of {exp.dtypes}")
        shape_ok = hash_table_fits(info.shape, exp.shape[0], k) if exp.min_last else info.shape == exp.shape
        if not shape_ok:
            want = f"({exp.shape[0]}, ≥{k})" if exp.min_last else str(exp.shape)
            raise MLXDirError(f"{where}: shape {info.shape}, expected {want}")
    return MLXDirCheckpoint(path, config, weight_map, formats, has_mtp, files)


# --------------------------------------------------------------------------- writer


def safetensors_header(entries: Iterable[tuple[str, str, tuple[int, ...]]],
                       metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header bytes (length prefix included, padded to 8) and each tensor's (start, end)
    relative to the data section, for ``(name, dtype, shape)`` in file order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "mlx"})}
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        spans[name] = (offset, offset + nbytes)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, spans


def write_bytes(f, data: memoryview | SourceRange) -> None:
    """All output goes through here (one place to observe or simulate write failures): bytes,
    or a range of a source file read straight into the writer's buffers (``len`` is its size)."""
    f.write_from(data) if isinstance(data, SourceRange) else f.write(data)


HEADER_SPAN = "\0header"  # the header among the spans a shard's verification reads (no tensor has this name)


class ShardWriter:
    """Stream one safetensors file whose header is known up front: tensors arrive in file order
    as byte chunks, written past the page cache (``io/direct.py``) and checked (``verify``):

    - ``"written"``: every byte as handed to the disk is compared with the converter's own chunk
      (``DirectWriter(compare=True)``: one ``memcmp`` on the writer's thread, no checksum), and
      the header and the file's size are read back from the disk once it is synced. What it
      catches: a byte the converter did not produce (a staging copy, an offset, a chunk lost,
      repeated or altered on its way in), a chunk's buffer reused before its bytes were written,
      a header or a file length the disk does not hold. ``SourceRange`` chunks (a source file's
      bytes as they are, read straight into the staging buffers) are compared, once written,
      with a second read of the source file instead. Not the disk returning other bytes
      later: that is ``"disk"``.
    - ``"disk"``: each tensor's CRC-32 as produced, and the whole file re-read from the disk
      (past the page cache where possible) following the writer (:meth:`verify`): a third more
      disk traffic.
    """

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, *, verify: str | None = None):
        self.path = Path(path)
        header, self.spans = safetensors_header(entries, metadata)
        self.header = header
        self.order = [name for name, _, _ in entries]
        self.crc: dict[str, int] = {}  # "disk": each tensor's CRC-32 as produced
        self._next = 0
        self._piece: np.ndarray | None = None  # "disk": SourceRange bytes on their way in
        if verify not in (None, "disk", "written"):
            raise ValueError(f"verify must be None, 'disk' or 'written', got {verify!r}")
        self.verify_mode = verify
        base = len(header)
        spans = [(0, base, HEADER_SPAN)] + [(base + a, base + b, n) for n, (a, b) in self.spans.items()]
        self._crcs = SpanCRCs(spans) if verify == "disk" else None
        self._compare = verify == "written"
        # staged, written on a thread, past the page cache where possible
        self._f = DirectWriter(self.path, compare=self._compare)
        self._lock = threading.Lock()
        # opened now: the file is renamed when done
        self._reader = open_read(self.path) if verify == "disk" else None
        self._put(memoryview(header))

    @property
    def nbytes(self) -> int:
        return max((end for _, end in self.spans.values()), default=0)

    def _put(self, buf: memoryview) -> None:
        if self._compare:
            self._f.expect(buf)  # what the disk must get: this very chunk, as it is when written
        try:
            write_bytes(self._f, buf)
        except ReadBackError as e:
            raise self._differs(e) from None

    def _put_source(self, src: SourceRange) -> None:
        """``src``'s bytes, read straight into the writer's staging buffers (with "written" the
        writer's thread compares them, once written, with the source file)."""
        try:
            write_bytes(self._f, src)
        except ReadBackError as e:
            raise self._differs(e) from None
        except SourceEnded:
            raise MLXDirError(f"{src.path}: file ends inside tensor {src.name!r}; the source is truncated") from None

    def _read_source(self, src: SourceRange) -> Iterator[np.ndarray]:
        """(``"disk"``) ``src``'s bytes in pieces of at most ``BUFFER_BYTES``, read into one reused
        buffer (each piece is copied into the staging buffers before the next is read), each
        inspected as ``write_from`` inspects them: memory stays at a piece, whatever the tensor's size."""
        want = min(src.nbytes, BUFFER_BYTES)
        if self._piece is None or len(self._piece) < want:
            self._piece = np.empty(want, np.uint8)
        fd = os.open(src.path, os.O_RDONLY)
        try:
            done = 0
            while done < src.nbytes:
                n = min(BUFFER_BYTES, src.nbytes - done)
                piece = self._piece[:n]
                if _read_full(fd, memoryview(piece), src.offset + done) != n:
                    raise MLXDirError(f"{src.path}: file ends inside tensor {src.name!r}; the source is truncated")
                if src.inspect is not None:
                    src.inspect(piece)
                yield piece
                done += n
        finally:
            os.close(fd)

    def _differs(self, e: ReadBackError) -> MLXDirError:
        """The verification's error for bytes at ``e.offset`` that are not what was meant."""
        at = e.offset - len(self.header)
        what = "the header" if at < 0 else next(
            (f"tensor {n!r}" for n, (a, b) in self.spans.items() if a <= at < b), "the end of the file")
        return MLXDirError(f"{self.path}: verification failed: {what} differs from what was written ({e.strerror})")

    def write_tensor(self, name: str, chunks: Iterable[np.ndarray | SourceRange | SourceRanges]) -> int:
        """Write one tensor from its byte chunks (arrays, or ``SourceRange``s: bytes of a source
        file as they are, one or a group at a time); returns the bytes written. With ``verify="written"`` the arrays'
        buffers must stay unchanged until written (held here)."""
        if self._next >= len(self.order) or self.order[self._next] != name:
            raise MLXDirError(f"{self.path}: tensor {name!r} written out of order")
        start, end = self.spans[name]
        size = end - start
        crc, done = 0, 0
        for chunk in chunks:
            for part in (chunk if isinstance(chunk, SourceRanges) else (chunk,)):
                if isinstance(part, SourceRange):
                    if done + part.nbytes > size:
                        raise MLXDirError(f"{self.path}: tensor {name!r} got more than its {size} bytes")
                    if self._crcs is None:  # straight from the source file into the staging buffers
                        self._put_source(part)
                        done += part.nbytes
                        continue
                    for piece in self._read_source(part):  # "disk": its CRC as produced
                        self._put(memoryview(piece))
                        crc = zlib.crc32(piece, crc)
                    done += part.nbytes
                    continue
                buf = memoryview(np.ascontiguousarray(part).reshape(-1).view(np.uint8))
                if done + len(buf) > size:
                    raise MLXDirError(f"{self.path}: tensor {name!r} got more than its {size} bytes")
                self._put(buf)
                if self._crcs is not None:
                    crc = zlib.crc32(buf, crc)
                done += len(buf)
        if done != size:
            raise MLXDirError(f"{self.path}: tensor {name!r} got {done} bytes, expected {size}")
        if self._crcs is not None:
            self.crc[name] = crc
        self._next += 1
        return done

    def finish(self) -> dict[str, int]:
        """Write the rest, sync and check (``"written"``); returns the CRCs (``"disk"``) or ``{}``."""
        if self._next != len(self.order):
            raise MLXDirError(f"{self.path}: tensor {self.order[self._next]!r} was never written")
        try:
            self._f.flush()
        except ReadBackError as e:
            raise self._differs(e) from None
        os.fsync(self._f.fileno())
        self._f.close()
        if self._compare:  # the disk's header and length (a direct write leaves no cached copy)
            fd = os.open(self.path, os.O_RDONLY)
            try:
                head, size = os.pread(fd, len(self.header), 0), os.fstat(fd).st_size
            finally:
                os.close(fd)
            if head != self.header:
                raise MLXDirError(f"{self.path}: verification failed: the header does not match the plan")
            if size != len(self.header) + self.nbytes:
                raise MLXDirError(f"{self.path}: verification failed: the file holds {size} bytes, "
                                  f"{len(self.header) + self.nbytes} were written")
        return self.crc

    def abort(self) -> None:
        try:
            self._f.discard()
            reader = self._take_reader()  # unless a verification already has it (and closes it)
            if reader is not None:
                os.close(reader[0])
        finally:
            self.path.unlink(missing_ok=True)

    def _take_reader(self) -> tuple[int, bool] | None:
        with self._lock:
            reader, self._reader = self._reader, None
        return reader

    def verify(self) -> dict[str, int]:
        """``verify="disk"``: re-read the file from disk as the writer goes on (past the page cache
        where possible), header and every tensor, against the CRCs as produced (call once, on
        another thread; returns the CRCs checked)."""
        reader = self._take_reader()
        if reader is None:
            raise MLXDirError(f"{self.path}: nothing to verify (open with verify='disk', verify once; not after abort)")
        for offset, chunk in scan(self.path, opened=reader, ready=self._f.wait_written):
            self._crcs.feed(offset, chunk)
        if not self._f.finished:  # given up; the writer's error is the one to report
            raise MLXDirError(f"{self.path}: writing stopped before the file was finished")
        on_disk = dict(self._crcs.result(self.path))
        if on_disk.pop(HEADER_SPAN) != zlib.crc32(self.header):
            raise MLXDirError(f"{self.path}: verification failed: the header does not match the plan")
        for tensor, crc in self.crc.items():
            if on_disk.get(tensor) != crc:
                raise MLXDirError(f"{self.path}: verification failed: tensor {tensor!r} differs from what was written")
        return on_disk


def file_crcs(path: str | os.PathLike, names: Iterable[str]) -> dict[str, int]:
    """CRC-32 of each named tensor's bytes as stored on disk, from one sequential pass over the
    file (direct reads where possible: the disk's bytes, not the page cache's)."""
    with SafetensorsFile(path) as st:
        crcs = SpanCRCs([(st.info(n).start, st.info(n).start + st.info(n).nbytes, n) for n in names])
    for offset, chunk in scan(path):
        crcs.feed(offset, chunk)
    return crcs.result(path)


class SpanCRCs:
    """CRC-32 of named ``(start, end)`` byte spans of a file fed as ``(offset, chunk)`` in order."""

    def __init__(self, spans: Iterable[tuple[int, int, str]]):
        self.spans = sorted(spans)
        self.crc = {n: 0 for _, _, n in self.spans}
        self._k = 0  # first span not yet complete
        self.end = 0  # bytes fed

    def feed(self, offset: int, chunk) -> None:
        if offset != self.end:
            raise MLXDirError(f"bytes fed out of order: {offset}, expected {self.end}")
        end = self.end = offset + len(chunk)
        k, spans = self._k, self.spans
        while k < len(spans) and spans[k][0] < end:
            start, stop, name = spans[k]
            lo, hi = max(start, offset), min(stop, end)
            if hi > lo:
                self.crc[name] = zlib.crc32(chunk[lo - offset: hi - offset], self.crc[name])
            if stop > end:
                break
            k += 1
        self._k = k

    def result(self, path: str | os.PathLike) -> dict[str, int]:
        """The CRCs once the whole file was fed (``path`` names it in the error otherwise)."""
        k = self._k
        while k < len(self.spans) and self.spans[k][1] <= self.end:  # empty tensors at the very end
            k += 1
        if k < len(self.spans):
            raise MLXDirError(f"{path}: file ends inside tensor {self.spans[k][2]!r}")
        return self.crc

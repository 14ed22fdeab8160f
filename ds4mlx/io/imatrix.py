"""llama.cpp importance matrices ("imatrix"): read its GGUF format and the legacy ``.dat``, write
the GGUF format.

GGUF (``llama-imatrix`` today): ``general.type = "imatrix"``, ``imatrix.datasets`` (strings),
``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32), and per weight matrix ``<name>``
(the model's GGUF tensor name) the F32 tensors ``<name>.in_sum2`` with ggml shape
``[n_in, n_mat]`` (sum over tokens of each squared input activation; ``n_mat`` is the number of
experts of a stacked expert tensor, else 1), ``<name>.counts`` ``[1, n_mat]`` (tokens seen by
each matrix) and, from newer versions, ``<name>.in_sum`` (sums of the activations, unused here).
Tensors are sorted by name. gguf-py reads and writes it.

Legacy ``.dat`` (gguf-py has no reader): int32 entry count; per entry an int32 name length, the
name, int32 ``ncall``, int32 ``nval`` and ``nval`` float32 values (the mean squared activation
times ``ncall``, experts one after another); then int32 chunk count and the dataset name
(int32 length + bytes).

The importance of a matrix is what ``llama-quantize`` hands its quantizers: ``in_sum2 / count``
per matrix (all ones for an expert that saw no token), or ``values / ncall`` for ``.dat``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import gguf
import numpy as np

GGUF_MAGIC = b"GGUF"
KEY_DATASETS = gguf.Keys.IMatrix.DATASETS
KEY_CHUNK_COUNT = gguf.Keys.IMatrix.CHUNK_COUNT
KEY_CHUNK_SIZE = gguf.Keys.IMatrix.CHUNK_SIZE
SUM2, COUNTS, SUM = ".in_sum2", ".counts", ".in_sum"


class ImatrixError(ValueError):
    """An importance-matrix file cannot be read; the message names the file and entry."""


@dataclass
class ImatrixEntry:
    """One matrix's statistics: ``sums`` float64 ``[n_mat, n_in]`` of squared activations and
    ``counts`` ``[n_mat]`` tokens (``legacy``: ``sums`` are mean·ncall, ``counts`` all ncall)."""

    sums: np.ndarray
    counts: np.ndarray
    legacy: bool = False

    @property
    def n_mat(self) -> int:
        return self.sums.shape[0]

    @property
    def n_in(self) -> int:
        return self.sums.shape[1]

    def importance(self) -> np.ndarray:
        """float32 ``[n_mat, n_in]``: the mean squared activation of each input of each matrix
        (ones for a matrix that saw no token, as llama-quantize does)."""
        counts = self.counts[:, None]
        if self.legacy:
            out = np.where(counts > 0, self.sums / np.where(counts > 0, counts, 1), self.sums)
        else:
            out = np.where(counts > 0, self.sums / np.where(counts > 0, counts, 1), 1.0)
        return out.astype(np.float32)


@dataclass
class Imatrix:
    path: Path
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read a GGUF or legacy ``.dat`` imatrix (told apart by the GGUF magic)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ImatrixError(f"{path}: cannot read the imatrix ({e.strerror or e})") from None
    im = _read_gguf(path) if magic == GGUF_MAGIC else _read_dat(path)
    if not im.entries:
        raise ImatrixError(f"{path}: the imatrix holds no entries")
    for name, e in im.entries.items():
        if not (np.all(np.isfinite(e.sums)) and np.all(e.sums >= 0)):
            raise ImatrixError(f"{path}: entry {name!r} has negative or non-finite sums")
        if not (np.all(np.isfinite(e.counts)) and np.all(e.counts >= 0)):
            raise ImatrixError(f"{path}: entry {name!r} has negative or non-finite counts")
    return im


def _read_gguf(path: Path) -> Imatrix:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError, struct.error, ... on damaged files
        raise ImatrixError(f"{path}: not a readable GGUF imatrix ({e})") from None
    fields = reader.fields
    kind = fields.get(gguf.Keys.General.TYPE)
    if kind is None or kind.contents() != "imatrix":
        got = "none" if kind is None else repr(kind.contents())
        raise ImatrixError(f"{path}: general.type is {got}, not 'imatrix' (is this a model file?)")
    tensors = {t.name: t for t in reader.tensors}
    entries = {}
    for tname, t in tensors.items():
        if not tname.endswith(SUM2):
            continue
        name = tname[: -len(SUM2)]
        counts = tensors.get(name + COUNTS)
        if counts is None:
            raise ImatrixError(f"{path}: entry {name!r} has {SUM2} but no {COUNTS}")
        n_in, n_mat = (list(int(d) for d in t.shape) + [1])[:2]
        if t.tensor_type.name != "F32" or counts.tensor_type.name != "F32":
            raise ImatrixError(f"{path}: entry {name!r} is not F32")
        if int(np.prod(counts.shape)) != n_mat:
            raise ImatrixError(f"{path}: entry {name!r}: {n_mat} matrices but {int(np.prod(counts.shape))} counts")
        sums = np.asarray(t.data, dtype=np.float64).reshape(n_mat, n_in)
        entries[name] = ImatrixEntry(sums, np.asarray(counts.data, dtype=np.float64).reshape(n_mat))
    orphans = [n for n in tensors if n.endswith(COUNTS) and n[: -len(COUNTS)] not in entries]
    if orphans:
        raise ImatrixError(f"{path}: {orphans[0]!r} has no matching {SUM2}")

    def value(key, default):
        f = fields.get(key)
        return f.contents() if f is not None else default

    return Imatrix(path, entries, list(value(KEY_DATASETS, [])), int(value(KEY_CHUNK_COUNT, 0)),
                   int(value(KEY_CHUNK_SIZE, 0)))


def _read_dat(path: Path) -> Imatrix:
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise ImatrixError(f"{path}: truncated legacy imatrix (reading {what} at byte {pos})")
        out = struct.unpack_from(fmt, raw, pos)
        pos += size
        return out

    (n_entries,) = take("<i", "the entry count")
    if n_entries < 1:
        raise ImatrixError(f"{path}: not an imatrix (neither GGUF nor a legacy .dat with entries)")
    entries = {}
    for i in range(n_entries):
        (length,) = take("<i", f"the name length of entry {i}")
        if not 0 < length <= 4096:
            raise ImatrixError(f"{path}: entry {i} has a bad name length {length}; not a legacy imatrix")
        (name,) = take(f"<{length}s", f"the name of entry {i}")
        name = name.decode("utf-8", "replace")
        ncall, nval = take("<ii", f"the sizes of entry {name!r}")
        if nval < 1:
            raise ImatrixError(f"{path}: entry {name!r} has {nval} values")
        values = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos) if pos + 4 * nval <= len(raw) else None
        if values is None:
            raise ImatrixError(f"{path}: truncated legacy imatrix (values of entry {name!r})")
        pos += 4 * nval
        # the legacy format has one ncall for all experts; their values follow one another, so the
        # expert count is only known from the model (see ``expert_importance``)
        entries[name] = ImatrixEntry(values.astype(np.float64)[None, :], np.array([float(ncall)]), legacy=True)
    chunk_count, datasets = 0, []
    if pos + 4 <= len(raw):
        (chunk_count,) = take("<i", "the chunk count")
        if pos + 4 <= len(raw):
            (length,) = take("<i", "the dataset name length")
            if 0 <= length <= len(raw) - pos:
                datasets = [raw[pos:pos + length].decode("utf-8", "replace")]
    return Imatrix(path, entries, datasets, chunk_count)


def expert_importance(im: Imatrix, name: str, n_mat: int, n_in: int) -> np.ndarray | None:
    """Importance ``[n_mat, n_in]`` of matrix ``name`` of a model with ``n_mat`` stacked matrices
    (experts) of ``n_in`` inputs, or None when the imatrix has no entry for it. One row for all
    experts is broadcast; other shapes are refused, naming the entry."""
    e = im.entries.get(name)
    if e is None:
        return None
    imp = e.importance()
    if e.legacy and imp.shape[1] == n_mat * n_in and n_mat > 1:
        imp = imp.reshape(n_mat, n_in)
    if imp.shape[1] != n_in or imp.shape[0] not in (1, n_mat):
        raise ImatrixError(f"{im.path}: entry {name!r} has {imp.shape[0]} x {imp.shape[1]} values, but the "
                           f"model's tensor has {n_mat} matrices of {n_in} inputs (imatrix of another model?)")
    return np.broadcast_to(imp, (n_mat, n_in))


def write_imatrix(path: str | os.PathLike, sums: Mapping[str, np.ndarray], counts: Mapping[str, np.ndarray],
                  *, datasets: list[str], chunk_count: int, chunk_size: int) -> Path:
    """Write a GGUF imatrix as ``llama-imatrix`` does: for every name (sorted) ``sums[name]``
    ``[n_mat, n_in]`` and ``counts[name]`` ``[n_mat]``. The file appears only once complete."""
    from gguf import GGUFWriter

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(str(tmp), arch="imatrix")  # gguf-py always writes an architecture key
    try:
        writer.add_type("imatrix")
        writer.add_array(KEY_DATASETS, list(datasets))
        writer.add_uint32(KEY_CHUNK_COUNT, int(chunk_count))
        writer.add_uint32(KEY_CHUNK_SIZE, int(chunk_size))
        for name in sorted(sums):
            s = np.ascontiguousarray(sums[name], dtype=np.float32)
            s = s.reshape(1, -1) if s.ndim == 1 else s
            c = np.ascontiguousarray(counts[name], dtype=np.float32).reshape(s.shape[0], 1)
            writer.add_tensor(name + SUM2, s)  # numpy [n_mat, n_in] = ggml [n_in, n_mat]
            writer.add_tensor(name + COUNTS, c)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path

"""The source side of a conversion: official tensors as file locations, logical weights
(a dense tensor, or one projection of all routed experts) and the output ``Unit``s they become.

Tensors are read with plain file reads (no long-lived memory map), so a worker process can
read its own piece and resident memory stays bounded by the largest unit.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..io.checks import check_expert_ids
from ..io.hf import HFCheckpoint
from ..io.safetensors import DTYPES
from ..names import EXPERT_WEIGHT, hf_to_internal, official_layout, scale_name
from ..quant.formats import MXFP4, MXFP8, WeightFormat
from ..quant.codecs import FP8_WEIGHT_BLOCK, bf16_decode
from ..quant.mx import dequant_fp4_np, dequant_fp8_np
from .options import ConvertError


def resolve_source(source: str | os.PathLike) -> Path:
    """A local official-format directory, ``demo``, or a Hugging Face repo id (through the hub cache)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        # the loader imports mlx-lm (and through it transformers): seconds of a conversion's
        # start-up (measured 5 s of a 21 s ds4-q4 run), needed only for ``demo`` and hub ids
        from ..loader import resolve_model_path

        path = resolve_model_path(source)
    if not path.is_dir():
        raise ConvertError(f"{path}: the source must be a model directory (or a Hugging Face repo id)")
    return path


@dataclass(frozen=True)
class Stored:
    """Where one source tensor's bytes live: enough to read it in another process."""

    path: Path
    offset: int
    dtype: str
    shape: tuple[int, ...]
    name: str = ""  # the official name, for messages


def stored(ckpt: HFCheckpoint, name: str) -> Stored:
    f = ckpt.file(ckpt.weight_map[name])
    info = f.info(name)
    return Stored(f.path, info.start, info.dtype, tuple(info.shape), name)  # the file's own path: no join per tensor


# The dtypes read as unsigned ints whose NaN/Inf are exactly the values with all the bits of
# this mask set (the exponent field; E4M3's NaN is S.1111.111, E8M0's 0xFF)
_NON_FINITE_MASK = {"BF16": 0x7F80, "F8_E4M3": 0x7F, "F8_E8M0": 0xFF, "F8_E5M2": 0x7C}
F16_NON_FINITE_MASK = 0x7C00  # the same for fp16 bits (what an F16 output holds; F16 sources read as floats)


_CHECK_BLOCK = 1 << 18  # elements per block of the finiteness check
_scratch = threading.local()  # per thread: the check's reused block buffers


def count_bits(raw: np.ndarray, mask: int) -> int:
    """How many elements (unsigned ints) have all the bits of ``mask`` set, block by block. A
    block holds none where its maximum falls short of ``mask`` with the sign bit set and, read as
    signed ints, short of ``mask`` (an element with the bits and a clear sign bit is at least
    ``mask`` as signed; one with the sign bit at least ``sign | mask`` as unsigned): two read-only
    passes, no temporary (measured 1.3-2x the masked maximum it replaced); a block that may hold
    some is counted exactly through reused buffers (fresh whole-tensor temporaries cost more
    in page zeroing than the test)."""
    flat = raw.reshape(-1)
    if flat.size <= _CHECK_BLOCK // 16:
        return int(np.count_nonzero((flat & mask) == mask))
    sign = 1 << (8 * flat.itemsize - 1)
    unsigned = flat.view(f"u{flat.itemsize}")
    signed = None if mask & sign else flat.view(f"i{flat.itemsize}")
    bad = 0
    for i in range(0, flat.size, _CHECK_BLOCK):
        part = unsigned[i: i + _CHECK_BLOCK]
        if part.max() < (mask | sign) and (signed is None or signed[i: i + _CHECK_BLOCK].max() < mask):
            continue
        bufs = getattr(_scratch, "bufs", None)
        if bufs is None or bufs[0].dtype != part.dtype:
            bufs = _scratch.bufs = (np.empty(_CHECK_BLOCK, part.dtype), np.empty(_CHECK_BLOCK, np.bool_))
        m, h = bufs[0][: part.size], bufs[1][: part.size]
        np.bitwise_and(part, mask, out=m)
        np.equal(m, mask, out=h)
        bad += int(np.count_nonzero(h))
    return bad


_NUMPY_FLOATS = ("F16", "F32", "F64")  # the dtypes numpy reads as floats (np.isfinite)


def holds_non_finite(dtype: str) -> bool:
    """Whether values of the safetensors ``dtype`` can be NaN or Inf."""
    return dtype in _NON_FINITE_MASK or dtype in _NUMPY_FLOATS


def non_finite(s: Stored, raw: np.ndarray) -> int:
    """How many of ``raw``'s values (stored bits of ``s``, as ``DTYPES[s.dtype]``) are NaN or Inf."""
    if s.dtype in _NON_FINITE_MASK:
        return count_bits(raw, _NON_FINITE_MASK[s.dtype])
    if s.dtype in _NUMPY_FLOATS:
        return int(raw.size - np.count_nonzero(np.isfinite(raw)))
    return 0


def _damaged(s: Stored, bad: int) -> ConvertError:
    return ConvertError(f"{s.path}: tensor {s.name!r} holds {bad} NaN or Inf values; the source is damaged")


def _check_finite(s: Stored, raw: np.ndarray) -> None:
    """A source tensor holding NaN/Inf would be converted into a file that cannot work: stop
    here, naming it, before anything looks written (one vectorised pass per read)."""
    if bad := non_finite(s, raw):
        raise _damaged(s, bad)


def read_chunks(s: Stored, pool: BufferPool, chunk_bytes: int = 8 << 20) -> Iterator[np.ndarray]:
    """A tensor's stored bits as flat pieces of at most ``chunk_bytes`` (whole elements), read
    into ``pool``'s buffers and checked piece by piece: memory stays at a piece, not the tensor
    (an embedding is a GB in the full model)."""
    dtype = DTYPES[s.dtype]
    total = _nbytes(s)
    step = max(dtype.itemsize, chunk_bytes // dtype.itemsize * dtype.itemsize)
    bad = 0
    for start in range(0, total, step):
        n = min(step, total - start)
        raw = _read_bytes(s.path, s.offset + start, n, pool)
        if raw.nbytes != n:
            raise ConvertError(f"{s.path}: file ends inside tensor {s.name!r}; the source is truncated")
        raw = raw.view(dtype)
        bad += non_finite(s, raw)
        if not bad:
            yield raw
    if bad:  # counted to the end, so the message gives the tensor's count
        raise _damaged(s, bad)


def read_stored(s: Stored, rows: tuple[int, int] | None = None, pool: BufferPool | None = None) -> np.ndarray:
    """The stored bits of a tensor (or of its rows ``[r0, r1)``): a fresh array, or a view of one
    of ``pool``'s buffers (keep it only as long as needed)."""
    dtype = DTYPES[s.dtype]
    if rows is None:
        count = math.prod(s.shape)
        raw = np.fromfile(s.path, dtype=dtype, count=count, offset=s.offset).reshape(s.shape) if pool is None \
            else _read_bytes(s.path, s.offset, count * dtype.itemsize, pool)
        shape = s.shape
    else:
        r0, r1 = rows
        row = math.prod(s.shape[1:])
        shape = (r1 - r0,) + s.shape[1:]
        raw = np.fromfile(s.path, dtype=dtype, count=(r1 - r0) * row,
                          offset=s.offset + r0 * row * dtype.itemsize).reshape(shape) if pool is None \
            else _read_bytes(s.path, s.offset + r0 * row * dtype.itemsize, (r1 - r0) * row * dtype.itemsize, pool)
    if pool is not None:
        if raw.nbytes != math.prod(shape) * dtype.itemsize:
            raise ConvertError(f"{s.path}: file ends inside tensor {s.name!r}; the source is truncated")
        raw = raw.view(dtype).reshape(shape)
    _check_finite(s, raw)
    return raw


def read_pair(a: Stored, b: Stored, pool: BufferPool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two tensors' stored bits, in one read when they lie side by side in one file (a weight
    and its scale: one sequential read instead of a large and a small one at a distance), into
    ``pool``'s buffers when given (views of them: keep them only as long as needed)."""
    (lo, hi), (na, nb) = sorted((a, b), key=lambda t: t.offset), (_nbytes(a), _nbytes(b))
    if lo.path != hi.path or lo.offset + _nbytes(lo) != hi.offset:
        return read_stored(a, pool=pool), read_stored(b, pool=pool)
    raw = _read_bytes(lo.path, lo.offset, na + nb, pool)
    out = []
    for t, n in ((a, na), (b, nb)):
        part = raw[t.offset - lo.offset: t.offset - lo.offset + n]
        if len(part) != n:
            raise ConvertError(f"{t.path}: file ends inside tensor {t.name!r}; the source is truncated")
        out.append(part.view(DTYPES[t.dtype]).reshape(t.shape))
        _check_finite(t, out[-1])
    return out[0], out[1]


def _preadv_full(fd: int, views: list[memoryview], offset: int) -> int:
    """Read the file from ``offset`` into ``views`` (one after the other) until they are full or
    the file ends: one ``preadv`` for them all; the bytes read."""
    done, want = 0, sum(len(v) for v in views)
    while views:
        if _PREADV:
            n = os.preadv(fd, views, offset + done)
        else:  # no preadv (older macOS): one read per view
            os.lseek(fd, offset + done, os.SEEK_SET)
            n = os.readv(fd, views[:1])
        if n == 0:
            break
        done += n
        while views and n >= len(views[0]):  # drop the views filled, cut the one filled in part
            n -= len(views[0])
            views = views[1:]
        if views and n:
            views = [views[0][n:]] + views[1:]
    return min(done, want)


_PREADV = hasattr(os, "preadv")


def expert_groups(weights: list[Stored], chunk_bytes: int = 8 << 20) -> list[slice]:
    """Consecutive experts whose weights together take at most ``chunk_bytes`` (one expert at
    least): the steps in which a projection's experts are read ahead and their scales read."""
    groups, start, size = [], 0, 0
    for i, w in enumerate(weights):
        n = _nbytes(w)
        if i > start and size + n > chunk_bytes:
            groups.append(slice(start, i))
            start, size = i, 0
        size += n
    if weights:
        groups.append(slice(start, len(weights)))
    return groups


def read_into(tensors: list[Stored], out: np.ndarray, fds: dict[Path, int]) -> None:
    """The stored bits of ``tensors`` side by side into ``out`` (flat uint8 of their sizes),
    checked as :func:`read_stored` checks them (``fds``: open files by path, kept by the caller)."""
    pos = 0
    for t in tensors:
        n = _nbytes(t)
        if t.path not in fds:
            fds[t.path] = os.open(t.path, os.O_RDONLY)
        if _preadv_full(fds[t.path], [memoryview(out[pos: pos + n])], t.offset) != n:
            raise ConvertError(f"{t.path}: file ends inside tensor {t.name!r}; the source is truncated")
        pos += n
    # checked together where they share a dtype (a projection's scales: one pass, not one per
    # expert); tensor by tensor to name the one that fails
    same = all(t.dtype == tensors[0].dtype for t in tensors)
    if tensors and same and not non_finite(tensors[0], out[:pos].view(DTYPES[tensors[0].dtype])):
        return
    pos = 0
    for t in tensors:
        _check_finite(t, out[pos: pos + _nbytes(t)].view(DTYPES[t.dtype]))
        pos += _nbytes(t)


def will_need(tensors: list[Stored], fds: dict[Path, int]) -> None:
    """Ask the system to start reading ``tensors`` into the page cache (no wait), where it can:
    reads that come later find them there instead of waiting for the disk one by one."""
    if not hasattr(os, "posix_fadvise"):
        return
    spans: list[list] = []  # tensors that follow each other in a file: one call (a weight and its scale)
    for t in tensors:
        if spans and spans[-1][0] == t.path and spans[-1][2] == t.offset:
            spans[-1][2] += _nbytes(t)
        else:
            spans.append([t.path, t.offset, t.offset + _nbytes(t)])
    for path, start, end in spans:
        _will_need_span(path, start, end - start, fds)


def row_span(s: Stored, rows: tuple[int, int] | None) -> tuple[int, int]:
    """(file offset, bytes) of rows ``[r0, r1)`` of ``s`` (all of it when ``rows`` is None)."""
    start, n = s.offset, _nbytes(s)
    if rows is not None:
        row = n // max(s.shape[0], 1)
        start, n = s.offset + rows[0] * row, (rows[1] - rows[0]) * row
    return start, n


def will_need_rows(s: Stored, rows: tuple[int, int] | None, fds: dict[Path, int]) -> None:
    """:func:`will_need` for rows ``[r0, r1)`` of ``s`` only (all of it when ``rows`` is None)."""
    if hasattr(os, "posix_fadvise"):
        _will_need_span(s.path, *row_span(s, rows), fds)


def _will_need_span(path: Path, start: int, n: int, fds: dict[Path, int]) -> None:
    if path not in fds:
        fds[path] = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fds[path], start, n, os.POSIX_FADV_WILLNEED)


class BufferPool:
    """Read buffers used again once nothing refers to them (by reference count: a view of a
    buffer keeps it, so none is reused while any chunk cut from it is alive). Fresh memory for
    every read costs page faults and zeroing: measured 1.2 of 4.5 CPU-seconds on a 3 GB
    conversion. Without reference counts (not CPython) every read gets fresh memory."""

    def __init__(self, limit: int = 48):
        self.limit = limit
        self.bufs: list[np.ndarray] = []
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        if hasattr(sys, "getrefcount"):
            with self.lock:
                # the smallest free buffer that fits (a small read must not hold a large one);
                # 2 references when free: the list's and getrefcount's argument
                best = -1
                for i in range(len(self.bufs)):
                    if self.bufs[i].nbytes >= nbytes and sys.getrefcount(self.bufs[i]) == 2 and \
                            (best < 0 or self.bufs[i].nbytes < self.bufs[best].nbytes):
                        best = i
                if best >= 0:
                    return self.bufs[best][:nbytes]
                if len(self.bufs) < self.limit:
                    self.bufs.append(np.empty(max(nbytes, 1 << 20), np.uint8))
                    return self.bufs[-1][:nbytes]
        return np.empty(nbytes, np.uint8)


    def clear(self) -> None:
        """Forget every buffer (those in use live on until their last view goes)."""
        with self.lock:
            self.bufs.clear()


def _read_bytes(path: Path, offset: int, count: int, pool: BufferPool | None) -> np.ndarray:
    """``count`` bytes from ``offset`` (fewer at the end of the file), into ``pool``'s buffers."""
    out = pool.take(count) if pool is not None else np.empty(count, np.uint8)
    if _PREADV:  # one preadv on a bare fd: no file object, no seek (600+ reads a conversion)
        fd = os.open(path, os.O_RDONLY)
        try:
            return out[:_preadv_full(fd, [memoryview(out)], offset)]
        finally:
            os.close(fd)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        view, done = memoryview(out), 0
        while done < count:
            n = f.readinto(view[done:])
            if not n:
                break
            done += n
    return out[:done]


def _nbytes(s: Stored) -> int:
    return math.prod(s.shape) * DTYPES[s.dtype].itemsize  # np.prod costs microseconds per call


def read_tensor(ckpt: HFCheckpoint, name: str) -> np.ndarray:
    """The stored bits of one source tensor, read into a fresh array (F8/BF16 as unsigned ints)."""
    return read_stored(stored(ckpt, name))


@dataclass
class Logical:
    """One logical weight of the source: a dense tensor, or one projection of all experts."""

    path: str  # internal path (``layers.3.ffn.experts.w1.weight`` for stacked experts)
    names: list[str]  # official names (one per expert for experts)
    fmt: WeightFormat  # as held by the official reader: FLOAT | MXFP8 | MXFP4
    dtype: str  # stored dtype of the weight
    shape: tuple[int, ...]  # logical shape of one weight ([out, in] unpacked)
    experts: bool

    @property
    def module(self) -> str:
        return self.path[: -len(".weight")]


def logical_weights(ckpt: HFCheckpoint, *, include_mtp: bool = True) -> list[Logical]:
    """The source's logical weights in file-layout order, experts grouped per projection."""
    layout = official_layout(ckpt.config)
    groups: dict[str, Logical] = {}
    for name, entry in ckpt.entries.items():
        if name.startswith("mtp.") and not include_mtp:
            continue
        info = ckpt.file(entry.shard).info(name)
        m = EXPERT_WEIGHT.match(name)
        path = f"{m.group(1)}.{m.group(3)}.weight" if m else hf_to_internal(name).path
        if path not in groups:
            shape = layout[name].shape if name in layout else info.shape
            groups[path] = Logical(path, [], entry.fmt, info.dtype, tuple(shape), m is not None)
        groups[path].names.append(name)
    for g in groups.values():
        if g.experts:
            g.names.sort(key=lambda n: int(EXPERT_WEIGHT.match(n).group(2)))
    return list(groups.values())


def dequantize(ckpt: HFCheckpoint, lw: Logical, name: str) -> np.ndarray:
    """float32 values of one source weight (exact: FP8/FP4 codes times power-of-two scales)."""
    scale = stored(ckpt, scale_name(name)) if lw.fmt in (MXFP8, MXFP4) else None
    return dequantize_stored(lw.fmt, stored(ckpt, name), scale, name)


def dequantize_stored(fmt: WeightFormat, weight: Stored, scale: Stored | None, name: str,
                      rows: tuple[int, int] | None = None, pool: BufferPool | None = None) -> np.ndarray:
    """``dequantize`` from file locations, optionally of rows ``[r0, r1)`` only (``r0`` a
    multiple of the FP8 scale block, 128, for FP8 weights); the stored bits are read into
    ``pool``'s buffers when given (a weight and its scale in one read when whole and adjacent)."""
    if rows is None and scale is not None and pool is not None:
        raw, sc = read_pair(weight, scale, pool)
    else:
        raw, sc = read_stored(weight, rows, pool), None
    if fmt in (MXFP8, MXFP4):  # the values into the pool too (fresh pages cost zeroing)
        out = None if pool is None else \
            pool.take(4 * raw.size * (2 if fmt == MXFP4 else 1)).view(np.float32).reshape(
                *raw.shape[:-1], raw.shape[-1] * (2 if fmt == MXFP4 else 1))
    if fmt == MXFP8:
        if rows is not None and rows[0] % FP8_WEIGHT_BLOCK:
            raise ValueError(f"{name}: FP8 rows must start on a {FP8_WEIGHT_BLOCK}-row scale block, got {rows[0]}")
        srows = None if rows is None else (rows[0] // FP8_WEIGHT_BLOCK, -(-rows[1] // FP8_WEIGHT_BLOCK))
        return dequant_fp8_np(raw, sc if sc is not None else read_stored(scale, srows, pool), name, out=out)
    if fmt == MXFP4:
        return dequant_fp4_np(raw, sc if sc is not None else read_stored(scale, rows, pool), name, out=out)
    return float_values(raw, weight.dtype, pool)


def float_values(raw: np.ndarray, dtype: str, pool: BufferPool | None = None) -> np.ndarray:
    """float32 values of stored floats (into ``pool``'s buffers when given: a large BF16 tensor
    decoded into fresh memory spent more time zeroing pages than shifting bits)."""
    if dtype == "BF16" and pool is not None:  # bf16_decode's bits, in one pass, no fresh pages
        out = pool.take(raw.size * 4).view(np.uint32).reshape(raw.shape)
        return np.left_shift(raw, 16, out=out, dtype=np.uint32).view(np.float32)
    return bf16_decode(raw) if dtype == "BF16" else raw.astype(np.float32)


def source_nbytes(ckpt: HFCheckpoint, names: Iterable[str]) -> int:
    total = 0
    for name in names:
        for n in (name, scale_name(name)):
            if n in ckpt.weight_map:
                total += ckpt.file(ckpt.weight_map[n]).info(n).nbytes
    return total


def hash_table_shape(ckpt: HFCheckpoint, name: str, k: int | None) -> tuple[int, int]:
    """Shape :func:`hash_table` returns: ``[vocab, k]``, or as stored when ``k`` is None."""
    vocab, width = ckpt.file(ckpt.weight_map[name]).info(name).shape
    return vocab, width if k is None else k


def hash_table(ckpt: HFCheckpoint, name: str, k: int | None) -> np.ndarray:
    """``tid2eid`` as stored, cut to its first ``k`` columns (the 4Expert recipe), range-checked."""
    table = read_tensor(ckpt, name)
    check_expert_ids(table, int(ckpt.config["n_routed_experts"]), f"{ckpt.path / ckpt.weight_map[name]}: {name}",
                     ConvertError)
    return np.ascontiguousarray(table[:, :k]) if k is not None else table


@dataclass
class Unit:
    """Output tensors produced together: ``produce()`` yields ``(name, chunks)`` in ``tensors`` order."""

    tensors: list[tuple[str, str, tuple[int, ...]]]  # (name, dtype, shape)
    produce: Callable[[], Iterator[tuple[str, Iterable[np.ndarray]]]]
    source_bytes: int
    nbytes: int

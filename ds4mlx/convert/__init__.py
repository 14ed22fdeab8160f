"""``ds4mlx convert``: official (or 4Expert) safetensors -> an MLX directory or a GGUF file.

The pipeline streams one logical weight at a time:

1. **plan** — ``open_hf_checkpoint`` validates the source from its headers; every logical weight
   (a dense tensor, or one projection of all routed experts) becomes a ``Unit`` that knows its
   output tensors (names, dtypes, shapes) before any byte is read;
2. **stream** — each unit reads its source tensors with plain file reads (no long-lived memory
   map, so resident memory stays bounded by the largest unit), transforms them, and hands byte
   chunks to the writer; experts are read, transformed and written expert by expert;
3. **verify** — every output tensor's CRC-32, taken while writing, is compared with a re-read of
   the file, and the result is opened with the matching reader;
4. **publish** — output lives under ``OUTPUT.partial`` until the final rename, so an interrupted
   run never leaves something that looks complete. MLX output is written shard by shard with a
   journal, so ``resume=True`` continues after the last finished shard.

MLX output (``io/mlx_dir.py``) is lossless by default: FP4 experts as ``mxfp4`` and FP8 dense
weights as ``mxfp8`` with the original bytes (``quant/mx.py``), the rest as stored. GGUF output
uses the ``deepseek4`` tensor names of ds4 and llama.cpp with a preset type table
(``convert/gguf.py``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..io import mlx_dir
from ..io.hf import HFCheckpoint, open_hf_checkpoint
from ..names import hf_to_internal, official_layout
from ..io.safetensors import DTYPES, SafetensorsFile
from ..quant.formats import FLOAT, MXFP4, MXFP8, WeightFormat, affine
from ..quant.mx import FP8_BLOCK, dequant_fp4_np, dequant_fp8_np, fp8_to_mxfp8

DEFAULT_SHARD_BYTES = 5 << 30  # mlx-lm's shard size
STATE_FILE = ".ds4mlx-convert.json"
PARTIAL_SUFFIX = ".partial"
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")
_WEIGHT_FILES = (".safetensors",)
_SKIP_FILES = ("config.json", mlx_dir.INDEX_FILE)


class ConvertError(ValueError):
    """Conversion cannot proceed; the message names the file, tensor, option or path at fault."""


class OutputExistsError(ConvertError):
    """The output path is already taken."""


# =============================================================================== sources


def resolve_source(source: str | os.PathLike) -> Path:
    """A local official-format directory, ``demo``, or a Hugging Face repo id (through the hub cache)."""
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


def stored(ckpt: HFCheckpoint, name: str) -> Stored:
    shard = ckpt.weight_map[name]
    info = ckpt.file(shard).info(name)
    return Stored(ckpt.path / shard, info.start, info.dtype, tuple(info.shape))


def read_stored(s: Stored, rows: tuple[int, int] | None = None) -> np.ndarray:
    """The stored bits of a tensor (or of its rows ``[r0, r1)``) read into a fresh array."""
    dtype = DTYPES[s.dtype]
    if rows is None:
        count = int(np.prod(s.shape, dtype=np.int64))
        return np.fromfile(s.path, dtype=dtype, count=count, offset=s.offset).reshape(s.shape)
    r0, r1 = rows
    row = int(np.prod(s.shape[1:], dtype=np.int64))
    return np.fromfile(s.path, dtype=dtype, count=(r1 - r0) * row,
                       offset=s.offset + r0 * row * dtype.itemsize).reshape((r1 - r0,) + s.shape[1:])


def read_tensor(ckpt: HFCheckpoint, name: str) -> np.ndarray:
    """The stored bits of one source tensor, read into a fresh array (F8/BF16 as unsigned ints)."""
    return read_stored(stored(ckpt, name))


def _scale_name(weight_name: str) -> str:
    return weight_name[: -len(".weight")] + ".scale"


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
        m = _EXPERT.match(name)
        path = f"{m.group(1)}.{m.group(3)}.weight" if m else hf_to_internal(name).path
        if path not in groups:
            shape = layout[name].shape if name in layout else info.shape
            groups[path] = Logical(path, [], entry.fmt, info.dtype, tuple(shape), m is not None)
        groups[path].names.append(name)
    for g in groups.values():
        if g.experts:
            g.names.sort(key=lambda n: int(_EXPERT.match(n).group(2)))
    return list(groups.values())


def dequantize(ckpt: HFCheckpoint, lw: Logical, name: str) -> np.ndarray:
    """float32 values of one source weight (exact: FP8/FP4 codes times power-of-two scales)."""
    scale = stored(ckpt, _scale_name(name)) if lw.fmt in (MXFP8, MXFP4) else None
    return dequantize_stored(lw.fmt, stored(ckpt, name), scale, name)


def dequantize_stored(fmt: WeightFormat, weight: Stored, scale: Stored | None, name: str,
                      rows: tuple[int, int] | None = None) -> np.ndarray:
    """``dequantize`` from file locations, optionally of rows ``[r0, r1)`` only (``r0`` a
    multiple of the FP8 scale block, 128, for FP8 weights)."""
    raw = read_stored(weight, rows)
    if fmt == MXFP8:
        if rows is not None and rows[0] % FP8_BLOCK:
            raise ValueError(f"{name}: FP8 rows must start on a {FP8_BLOCK}-row scale block, got {rows[0]}")
        srows = None if rows is None else (rows[0] // FP8_BLOCK, -(-rows[1] // FP8_BLOCK))
        return dequant_fp8_np(raw, read_stored(scale, srows), name)
    if fmt == MXFP4:
        return dequant_fp4_np(raw, read_stored(scale, rows), name)
    return float_values(raw, weight.dtype)


def float_values(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def source_nbytes(ckpt: HFCheckpoint, names: Iterable[str]) -> int:
    total = 0
    for name in names:
        for n in (name, _scale_name(name)):
            if n in ckpt.weight_map:
                total += ckpt.file(ckpt.weight_map[n]).info(n).nbytes
    return total


def hash_table(ckpt: HFCheckpoint, name: str, k: int | None) -> np.ndarray:
    """``tid2eid`` as stored, cut to its first ``k`` columns (the 4Expert recipe), range-checked."""
    table = read_tensor(ckpt, name)
    n_experts = int(ckpt.config["n_routed_experts"])
    if table.size and (table.min() < 0 or table.max() >= n_experts):
        raise ConvertError(
            f"{ckpt.path / ckpt.weight_map[name]}: {name} holds expert ids {table.min()}..{table.max()}, "
            f"outside 0..{n_experts - 1}"
        )
    return np.ascontiguousarray(table[:, :k]) if k is not None else table


# =============================================================================== units


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int | None = None) -> Iterator[Any]:
    """``map(fn, items)`` on a few threads (numpy releases the GIL), in order, with at most
    ``workers + 1`` results alive at once so memory stays bounded."""
    workers = workers or min(4, os.cpu_count() or 1)
    if workers <= 1:
        yield from map(fn, items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


@dataclass
class Unit:
    """Output tensors produced together: ``produce()`` yields ``(name, chunks)`` in ``tensors`` order."""

    tensors: list[tuple[str, str, tuple[int, ...]]]  # (name, dtype, shape)
    produce: Callable[[], Iterator[tuple[str, Iterable[np.ndarray]]]]
    source_bytes: int
    nbytes: int


def _st_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize


def _mx_affine(values: np.ndarray, fmt: WeightFormat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 ``[out, in]`` -> MLX affine ``(w uint32, scales bf16 bits, biases bf16 bits)``."""
    import mlx.core as mx

    w, s, b = mx.quantize(mx.array(values).astype(mx.bfloat16), group_size=fmt.group_size, bits=fmt.bits)
    return np.array(w), np.array(s.view(mx.uint16)), np.array(b.view(mx.uint16))


def mlx_unit(ckpt: HFCheckpoint, lw: Logical, target: WeightFormat, k: int | None) -> tuple[Unit, WeightFormat]:
    """The MLX-directory unit of one logical weight (``target``: FLOAT keeps the source's form)."""
    lead = (len(lw.names),) if lw.experts else ()
    src_bytes = source_nbytes(ckpt, lw.names)
    module = lw.module

    if lw.fmt == FLOAT and target == FLOAT:  # as stored (tid2eid possibly cut)
        if lw.path.endswith(".tid2eid"):
            shape = (lw.shape[0], k if k is not None else ckpt.file(ckpt.weight_map[lw.names[0]]).info(lw.names[0]).shape[1])
            produce = lambda: iter([(lw.path, [hash_table(ckpt, lw.names[0], k)])])  # noqa: E731
        else:
            shape = lead + lw.shape
            produce = lambda: iter([(lw.path, (read_tensor(ckpt, n) for n in lw.names))])  # noqa: E731
        t = [(lw.path, lw.dtype, shape)]
        return Unit(t, produce, src_bytes, _st_nbytes(lw.dtype, shape)), FLOAT

    out_dim, in_dim = lw.shape
    if target == lw.fmt and target in (MXFP8, MXFP4):  # lossless: the same codes and scale bytes
        fmt = target
    elif target.kind == "affine":
        fmt = target
    else:
        raise ConvertError(f"{lw.path}: cannot convert {lw.fmt} to {target}")
    w_shape = lead + (out_dim, in_dim * fmt.bits // 32)
    s_shape = lead + (out_dim, in_dim // fmt.group_size)
    s_dtype = "U8" if fmt.kind in ("mxfp8", "mxfp4") else "BF16"
    tensors = [(module + ".weight", "U32", w_shape), (module + ".scales", s_dtype, s_shape)]
    if fmt.kind == "affine":
        tensors.append((module + ".biases", "BF16", s_shape))
    nbytes = sum(_st_nbytes(d, s) for _, d, s in tensors)

    def packed(name: str) -> tuple[np.ndarray, ...]:
        if fmt == MXFP4:  # official FP4 bytes are already MLX mxfp4 (quant/mx.fp4_to_mxfp4)
            return read_tensor(ckpt, name).view(np.uint8), read_tensor(ckpt, _scale_name(name))
        if fmt == MXFP8:
            w, s = fp8_to_mxfp8(read_tensor(ckpt, name), read_tensor(ckpt, _scale_name(name)), name)
            return np.array(w), np.array(s)
        return _mx_affine(dequantize(ckpt, lw, name), fmt)

    def produce():
        if fmt == MXFP4:  # weights then scales, straight from the source (reads run ahead of writes)
            yield tensors[0][0], ordered_map(lambda n: read_tensor(ckpt, n).view(np.uint8), lw.names)
            yield tensors[1][0], ordered_map(lambda n: read_tensor(ckpt, _scale_name(n)), lw.names)
            return
        stash: list[tuple[np.ndarray, ...]] = []

        def weights():
            for n in lw.names:
                w, *rest = packed(n)
                stash.append(tuple(rest))
                yield w

        yield tensors[0][0], weights()
        for i, (name, _, _) in enumerate(tensors[1:]):
            yield name, (r[i] for r in stash)

    return Unit(tensors, produce, src_bytes, nbytes), fmt


# =============================================================================== options


@dataclass(frozen=True)
class Options:
    to: str
    preset: str | None
    experts_per_token: int | None
    expert_bits: int | None
    dense_bits: int | None
    group_size: int
    include_mtp: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_options(ckpt: HFCheckpoint, opts: Options) -> None:
    if opts.to not in ("mlx", "gguf"):
        raise ConvertError(f"--to must be 'mlx' or 'gguf', got {opts.to!r}")
    if opts.to == "mlx" and opts.preset is not None:
        raise ConvertError("--preset is for GGUF output; MLX output uses --expert-bits / --dense-bits")
    if opts.to == "gguf" and (opts.expert_bits or opts.dense_bits):
        raise ConvertError("--expert-bits / --dense-bits are for MLX output; GGUF output uses --preset")
    for what, bits in (("--expert-bits", opts.expert_bits), ("--dense-bits", opts.dense_bits)):
        if bits is not None and bits not in AFFINE_BITS:
            raise ConvertError(f"{what} must be one of {AFFINE_BITS}, got {bits}")
    if opts.group_size not in GROUP_SIZES:
        raise ConvertError(f"--group-size must be one of {GROUP_SIZES}, got {opts.group_size}")
    k = opts.experts_per_token
    if k is not None:
        cfg = ckpt.config
        widths = [ckpt.file(ckpt.weight_map[n]).info(n).shape[1] for n in ckpt.entries if n.endswith(".tid2eid")]
        limit = min(widths) if widths else int(cfg["n_routed_experts"])
        if not 1 <= k <= limit:
            why = f"the hash tables (tid2eid) have {limit} columns" if widths else f"there are {limit} experts"
            raise ConvertError(f"--experts-per-token {k}: must be 1..{limit} ({why})")


# =============================================================================== output paths


def check_output(source: Path, output: Path, *, resume: bool, is_dir: bool) -> Path:
    """Refuse outputs that exist or sit inside the source; return the partial path."""
    src, out = source.resolve(), output.resolve()
    if out == src or src in out.parents:
        raise ConvertError(f"{output}: the output may not be inside the source directory {source} (the source is left untouched)")
    if output.exists() or output.is_symlink():
        if not output.is_dir() or any(output.iterdir()):
            raise OutputExistsError(f"{output}: output already exists and is not an empty directory; choose another path or remove it")
    partial = output.with_name(output.name + PARTIAL_SUFFIX)
    if partial.exists() and not resume:
        hint = "pass --resume to continue it, or delete it" if is_dir else "delete it"
        raise OutputExistsError(f"{partial}: left by an interrupted conversion; {hint}")
    output.parent.mkdir(parents=True, exist_ok=True)
    return partial


def check_free_space(where: Path, needed: int) -> None:
    free = shutil.disk_usage(where).free
    if needed > free:
        raise ConvertError(
            f"{where}: not enough disk space for the output: {needed / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free"
        )


def disk_full_error(exc: OSError, target: Path) -> ConvertError | None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConvertError(f"{target}: disk full while writing the output ({exc.strerror or exc})")
    return None


def source_fingerprint(ckpt: HFCheckpoint) -> str:
    h = hashlib.sha256()
    h.update((ckpt.path / "config.json").read_bytes())
    h.update(json.dumps(ckpt.weight_map, sort_keys=True).encode())
    for shard in sorted(set(ckpt.weight_map.values())):
        st = (ckpt.path / shard).stat()
        h.update(f"{shard}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Tokenizer, generation config, license and the like: top-level files that are not weights."""
    copied = []
    for f in sorted(source.iterdir()):
        if f.is_file() and f.name not in _SKIP_FILES and not f.name.endswith(_WEIGHT_FILES):
            shutil.copy2(f, dest / f.name)
            copied.append(f.name)
    return copied


# =============================================================================== progress


class Progress:
    """Bytes written, rate and ETA (tqdm when available and wanted)."""

    def __init__(self, total: int, done: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                                desc=desc, dynamic_ncols=True, smoothing=0.05)
            except ImportError:
                pass

    def track(self, chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for c in chunks:
            yield c
            if self.bar is not None:
                self.bar.update(c.nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# =============================================================================== MLX output


def mlx_plan(ckpt: HFCheckpoint, opts: Options) -> tuple[list[Unit], dict[str, WeightFormat]]:
    units, formats = [], {}
    for lw in logical_weights(ckpt, include_mtp=opts.include_mtp):
        target = lw.fmt
        if lw.experts and opts.expert_bits is not None:
            target = affine(opts.expert_bits, opts.group_size)
        elif not lw.experts and lw.fmt != FLOAT and opts.dense_bits is not None:
            target = affine(opts.dense_bits, opts.group_size)
        if target.kind == "affine" and lw.shape[-1] % target.group_size:
            raise ConvertError(f"{lw.path}: input dimension {lw.shape[-1]} is not a multiple of --group-size {target.group_size}")
        unit, fmt = mlx_unit(ckpt, lw, target, opts.experts_per_token)
        units.append(unit)
        if fmt != FLOAT:
            formats[lw.module] = fmt
    return units, formats


def plan_shards(units: list[Unit], max_bytes: int) -> list[list[Unit]]:
    shards: list[list[Unit]] = [[]]
    size = 0
    for u in units:
        if shards[-1] and size + u.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(u)
        size += u.nbytes
    return shards


def mlx_config(ckpt: HFCheckpoint, opts: Options, formats: dict[str, WeightFormat], source: str) -> dict[str, Any]:
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}  # no longer HF FP8 layout
    if opts.experts_per_token is not None:
        config["num_experts_per_tok"] = opts.experts_per_token
    if not (opts.include_mtp and ckpt.has_mtp):
        config["num_nextn_predict_layers"] = 0
    expert_fmt = next((f for p, f in formats.items() if ".ffn.experts." in p), MXFP4)
    quant: dict[str, Any] = {"group_size": expert_fmt.group_size, "bits": expert_fmt.bits, "mode": expert_fmt.kind}
    quant.update({p: mlx_dir.format_entry(f) for p, f in formats.items()})
    config["quantization"] = quant
    from .. import __version__

    config[mlx_dir.FORMAT_KEY] = {
        "format": mlx_dir.FORMAT_NAME, "version": mlx_dir.FORMAT_VERSION, "ds4mlx_version": __version__,
        "converted_from": source, "options": opts.as_dict(),
    }
    return config


def _save_state(partial: Path, state: dict) -> None:
    tmp = partial / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, partial / STATE_FILE)


def _load_state(partial: Path, plan_id: str) -> dict:
    path = partial / STATE_FILE
    if not path.is_file():
        raise ConvertError(f"{partial}: no conversion journal ({STATE_FILE}); delete the directory and start again")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: unreadable journal ({e}); delete {partial} and start again") from None
    if state.get("plan_id") != plan_id:
        raise ConvertError(
            f"{partial}: was started from a different source or with different options; "
            "rerun with the same ones, or delete it and start again"
        )
    return state


def convert_mlx(ckpt: HFCheckpoint, source: str, output: Path, opts: Options, *, resume: bool,
                progress: bool, max_shard_bytes: int) -> Path:
    partial = check_output(ckpt.path, output, resume=resume, is_dir=True)
    units, formats = mlx_plan(ckpt, opts)
    shards = plan_shards(units, max_shard_bytes)
    names = [mlx_dir.shard_name(i + 1, len(shards)) for i in range(len(shards))]
    plan = [[t for u in s for t in u.tensors] for s in shards]
    plan_id = hashlib.sha256(json.dumps([source_fingerprint(ckpt), opts.as_dict(), plan]).encode()).hexdigest()

    state = {"plan_id": plan_id, "done": {}}
    if resume and partial.exists():
        state = _load_state(partial, plan_id)
        for shard in list(state["done"]):  # a finished shard must still be there, whole
            entries = plan[names.index(shard)]
            header, _ = mlx_dir.safetensors_header(entries)
            f = partial / shard
            if not f.is_file() or f.stat().st_size != len(header) + sum(_st_nbytes(d, s) for _, d, s in entries):
                del state["done"][shard]
        for f in partial.iterdir():  # anything else is from the unfinished shard
            if f.name not in state["done"] and f.name != STATE_FILE:
                f.unlink() if f.is_file() else shutil.rmtree(f)
    else:
        partial.mkdir()
        _save_state(partial, state)

    total = sum(u.nbytes for u in units)
    done = sum(u.nbytes for s, n in zip(shards, names) if n in state["done"] for u in s)
    check_free_space(partial, total - done)
    bar = Progress(total, done, f"convert → {output.name}", progress)
    writer = None
    try:
        for shard_units, name, entries in zip(shards, names, plan):
            if name in state["done"]:
                continue
            writer = mlx_dir.ShardWriter(partial / (name + ".tmp"), entries)
            for u in shard_units:
                for tensor, chunks in u.produce():
                    writer.write_tensor(tensor, bar.track(chunks))
            crcs = writer.finish()
            os.replace(writer.path, partial / name)
            writer = None
            state["done"][name] = crcs
            _save_state(partial, state)
    except BaseException as exc:
        if writer is not None:
            writer.abort()
        bar.close()
        if not state["done"]:
            shutil.rmtree(partial, ignore_errors=True)
            where = "nothing was kept"
        else:
            where = f"{len(state['done'])} of {len(shards)} shards are kept in {partial}: rerun with --resume to continue, or delete it"
        if isinstance(exc, OSError) and (err := disk_full_error(exc, partial)):
            raise ConvertError(f"{err}; {where}") from exc
        if isinstance(exc, KeyboardInterrupt):
            print(f"\nconversion interrupted; {where}", file=sys.stderr)
        raise
    bar.close()

    verify_mlx(partial, names, plan, state["done"])
    weight_map = {t: n for n, entries in zip(names, plan) for t, _, _ in entries}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (partial / mlx_dir.INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    copy_side_files(ckpt.path, partial)
    (partial / "config.json").write_text(json.dumps(mlx_config(ckpt, opts, formats, source), indent=2) + "\n")
    mlx_dir.open_mlx_dir(partial).close()  # the reader accepts what we wrote
    (partial / STATE_FILE).unlink()
    if output.is_dir():
        output.rmdir()
    os.replace(partial, output)
    return output


def verify_mlx(partial: Path, names: list[str], plan: list[list[tuple]], crcs: dict[str, dict[str, int]]) -> None:
    """Re-read every shard: header as planned, each tensor's bytes as written."""
    for name, entries in zip(names, plan):
        path = partial / name
        with SafetensorsFile(path) as st:
            got = [(n, st.info(n).dtype, st.info(n).shape) for n in st.keys()]
        if sorted(got) != sorted((n, d, tuple(s)) for n, d, s in entries):
            raise ConvertError(f"{path}: verification failed: the header does not match the plan")
        on_disk = mlx_dir.file_crcs(path, [n for n, _, _ in entries])
        for tensor, crc in crcs[name].items():
            if on_disk.get(tensor) != crc:
                raise ConvertError(f"{path}: verification failed: tensor {tensor!r} differs from what was written")


# =============================================================================== entry point


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    to: str = "mlx",
    preset: str | None = None,
    experts_per_token: int | None = None,
    expert_bits: int | None = None,
    dense_bits: int | None = None,
    group_size: int = 64,
    include_mtp: bool = True,
    resume: bool = False,
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    jobs: int | None = None,
) -> Path:
    """Convert an official-format checkpoint (directory or Hugging Face repo id).

    ``to="mlx"``: a directory that ``ds4mlx.load`` reads; lossless unless ``expert_bits``
    (routed experts as affine 2–8 bits, ``group_size``) or ``dense_bits`` (FP8 projections,
    i.e. attention and shared experts, as affine) ask for less. ``to="gguf"``: one ``.gguf``
    file in the ``deepseek4`` layout, types from ``preset`` (``ds4-q4``, ``ds4-q2``, ``mxfp4``).
    ``experts_per_token=K`` writes the K-expert variant (hash tables cut to K columns).
    ``jobs``: GGUF quantization worker processes (default ``os.cpu_count()``; 1 quantizes in
    this process); the file is byte-identical whatever the count. Workers are spawned, so a
    script calling this needs the usual ``if __name__ == "__main__":`` guard.
    Returns the output path.
    """
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ConvertError(f"--jobs must be a positive integer, got {jobs!r}")
    src = resolve_source(source)
    output = Path(output).expanduser()
    ckpt = open_hf_checkpoint(src)
    try:
        opts = Options(to, preset, experts_per_token, expert_bits, dense_bits, group_size, include_mtp)
        check_options(ckpt, opts)
        if to == "mlx":
            return convert_mlx(ckpt, str(source), output, opts, resume=resume, progress=progress,
                               max_shard_bytes=max_shard_bytes)
        if resume:
            raise ConvertError("--resume continues MLX conversions only; a GGUF is written in one pass")
        from .gguf import convert_gguf

        return convert_gguf(ckpt, str(source), output, opts, progress=progress, jobs=jobs or os.cpu_count() or 1)
    finally:
        ckpt.close()

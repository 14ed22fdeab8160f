"""MLX-directory output of ``ds4mlx convert`` (``io/mlx_dir.py``), written shard by shard with a
journal, so ``resume=True`` continues after the last finished shard.

Lossless by default: FP4 experts as ``mxfp4`` and FP8 dense weights as ``mxfp8`` with the
original bytes (``quant/mx.py``), the rest as stored; ``expert_bits`` / ``dense_bits`` ask for
MLX affine quantization instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..io import mlx_dir
from ..io.direct import SourceRange, SourceRanges
from ..io.hf import HFCheckpoint
from ..io.json_file import read_json_object
from ..io.safetensors import DTYPES, SafetensorsFile
from ..names import is_routed_expert, scale_name
from ..quant.formats import FLOAT, MXFP4, MXFP8, WeightFormat, affine, packed_shapes
from ..quant.mx import fp8_scales_to_mxfp8_np
from .options import ConvertError, Options
from .output import Progress, check_free_space, check_output, disk_full_error, gc_paused, publish, read_ahead
from .plan import (BufferPool, Logical, Stored, Unit, dequantize, expert_groups, hash_table, hash_table_shape,
                   holds_non_finite, logical_weights, non_finite, read_chunks, read_into, read_stored,
                   source_nbytes, stored, will_need)

DEFAULT_SHARD_BYTES = 5 << 30  # mlx-lm's shard size
STATE_FILE = ".ds4mlx-convert.json"
_WEIGHT_FILES = (".safetensors",)
_SKIP_FILES = ("config.json", mlx_dir.INDEX_FILE)


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


def _st_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPES[dtype].itemsize


class FiniteCheck:
    """``SourceRange.inspect`` for a source tensor read straight into the writer's staging
    buffers: refuses NaN/Inf in each part as staged, before it can reach the disk (what
    ``read_chunks`` refuses, without a read buffer or a copy). A value split between two parts
    is put together; a hit is counted over the whole tensor for the message (``read_chunks``)."""

    def __init__(self, s: Stored):
        self.s = s
        self.dtype = DTYPES[s.dtype]
        self.size = self.dtype.itemsize
        self.carry = b""  # the start of a value cut at the end of the last part

    def __call__(self, part: np.ndarray) -> None:
        if self.carry:
            head = self.carry + bytes(part[: self.size - len(self.carry)])
            part = part[self.size - len(self.carry):]
            self.carry = head if len(head) < self.size else b""
            if not self.carry:
                self._scan(np.frombuffer(head, np.uint8))
        whole = len(part) // self.size * self.size
        self.carry += bytes(part[whole:])
        self._scan(part[:whole])

    def _scan(self, raw: np.ndarray) -> None:
        if non_finite(self.s, raw.view(self.dtype)):  # (the check ``read_chunks`` makes)
            self.refuse()

    def refuse(self) -> None:
        for _ in read_chunks(self.s, BufferPool(1)):  # counts the tensor's NaN/Inf, raises
            pass
        raise ConvertError(f"{self.s.path}: tensor {self.s.name!r} holds NaN or Inf values; the source is damaged")


def _with_scales(ws: list[Stored], ss: list[Stored], g: slice) -> list[Stored]:
    """The weights of group ``g`` and their scales, each weight's scale after it (side by side
    in the file, where ``will_need`` makes one request of the two)."""
    return [t for w, s in zip(ws[g], ss[g]) for t in (w, s)]


def _as_stored(s: Stored) -> SourceRange:
    """A source tensor's bytes as they are, read straight into the writer's staging buffers,
    checked there (``FiniteCheck``) where its dtype can hold NaN/Inf."""
    check = FiniteCheck(s) if holds_non_finite(s.dtype) else None
    return SourceRange(s.path, s.offset, _st_nbytes(s.dtype, s.shape), s.name, check)


def _mx_affine(values: np.ndarray, fmt: WeightFormat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 ``[out, in]`` -> MLX affine ``(w uint32, scales bf16 bits, biases bf16 bits)``."""
    import mlx.core as mx

    w, s, b = mx.quantize(mx.array(values).astype(mx.bfloat16), group_size=fmt.group_size, bits=fmt.bits)
    return np.array(w), np.array(s.view(mx.uint16)), np.array(b.view(mx.uint16))


def mlx_unit(ckpt: HFCheckpoint, lw: Logical, target: WeightFormat, k: int | None) -> tuple[Unit, WeightFormat]:
    """The MLX-directory unit of one logical weight (``target``: FLOAT keeps the source's form).
    Bytes kept as they are (float weights, FP8 and FP4 codes) go as ``SourceRange``s, read
    straight into the writer's staging buffers; what is computed (scales, affine) as arrays."""
    lead = (len(lw.names),) if lw.experts else ()
    src_bytes = source_nbytes(ckpt, lw.names)
    module = lw.module

    if lw.fmt == FLOAT and target == FLOAT:  # as stored (tid2eid possibly cut)
        if lw.path.endswith(".tid2eid"):
            shape = hash_table_shape(ckpt, lw.names[0], k)
            produce = lambda: iter([(lw.path, [hash_table(ckpt, lw.names[0], k)])])  # noqa: E731
        else:
            shape = lead + lw.shape
            produce = lambda: iter([(lw.path, [SourceRanges(_as_stored(stored(ckpt, n)) for n in lw.names)])])  # noqa: E731
        t = [(lw.path, lw.dtype, shape)]
        return Unit(t, produce, src_bytes, _st_nbytes(lw.dtype, shape)), FLOAT

    if target == lw.fmt and target in (MXFP8, MXFP4):  # lossless: the same codes and scale bytes
        fmt = target
    elif target.kind == "affine":
        fmt = target
    else:
        raise ConvertError(f"{lw.path}: cannot convert {lw.fmt} to {target}")
    w_shape, s_shape = packed_shapes(fmt, lead + lw.shape)
    s_dtype = "U8" if fmt.kind in ("mxfp8", "mxfp4") else "BF16"
    tensors = [(module + ".weight", "U32", w_shape), (module + ".scales", s_dtype, s_shape)]
    if fmt.kind == "affine":
        tensors.append((module + ".biases", "BF16", s_shape))
    nbytes = sum(_st_nbytes(d, s) for _, d, s in tensors)

    def produce():
        if fmt == MXFP4:  # weights then scales, the weights straight from the source file
            ws = [stored(ckpt, n) for n in lw.names]
            ss = [stored(ckpt, scale_name(n)) for n in lw.names]
            starts = np.cumsum([0] + [_st_nbytes(s.dtype, s.shape) for s in ss])
            scales = np.empty(starts[-1], np.uint8)  # read with their weights' group (small reads)

            def weights() -> Iterator[SourceRanges]:
                # the writer reads each weight's bytes into its staging buffers (FP4 codes hold
                # no NaN/Inf to check), a group of them per hand-over; the disk is asked for a
                # group ahead meanwhile
                groups, fds = expert_groups(ws), {}
                try:
                    will_need(_with_scales(ws, ss, groups[0]) if groups else [], fds)
                    for k, g in enumerate(groups):
                        if k + 1 < len(groups):
                            will_need(_with_scales(ws, ss, groups[k + 1]), fds)
                        read_into(ss[g], scales[starts[g.start]: starts[g.stop]], fds)
                        yield SourceRanges(SourceRange(w.path, w.offset, _st_nbytes(w.dtype, w.shape), w.name)
                                           for w in ws[g])
                finally:
                    for fd in fds.values():
                        os.close(fd)

            yield tensors[0][0], weights()
            yield tensors[1][0], iter([scales])
            return
        if fmt == MXFP8:  # the codes as they are (checked as staged), the scales spread to 32-wide groups
            spread: list[np.ndarray] = []

            def codes() -> Iterator[SourceRange]:
                for n in lw.names:
                    w, s = stored(ckpt, n), stored(ckpt, scale_name(n))
                    spread.append(fp8_scales_to_mxfp8_np(read_stored(s), w.shape, n))
                    yield _as_stored(w)

            yield tensors[0][0], codes()
            yield tensors[1][0], iter(spread)
            return
        stash: list[tuple[np.ndarray, ...]] = []

        def weights():
            for n in lw.names:
                w, *rest = _mx_affine(dequantize(ckpt, lw, n), fmt)
                stash.append(tuple(rest))
                yield w

        yield tensors[0][0], weights()
        for i, (name, _, _) in enumerate(tensors[1:]):
            yield name, (r[i] for r in stash)

    return Unit(tensors, produce, src_bytes, nbytes), fmt


def tensor_chunks(units: list[Unit]) -> Iterator[tuple[str, np.ndarray | None]]:
    """The units' tensors as one stream: ``(tensor, None)`` opens a tensor, ``(tensor, chunk)``
    follow. One stream (read ahead on a thread) keeps reading across tensor boundaries."""
    for u in units:
        for tensor, chunks in u.produce():
            yield tensor, None
            for c in chunks:
                yield tensor, c


def split_tensors(stream: Iterator[tuple[str, np.ndarray | None]]) -> Iterator[tuple[str, Iterator[np.ndarray]]]:
    """:func:`tensor_chunks`' stream back to ``(tensor, chunks)``; each ``chunks`` must be
    consumed before the next pair is taken."""
    head = next(stream, None)
    while head is not None:
        tensor, head = head[0], None

        def chunks() -> Iterator[np.ndarray]:
            nonlocal head
            for item in stream:
                if item[1] is None:
                    head = item
                    return
                yield item[1]

        yield tensor, chunks()


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
    expert_fmt = next((f for p, f in formats.items() if is_routed_expert(p)), MXFP4)
    quant: dict[str, Any] = {"group_size": expert_fmt.group_size, "bits": expert_fmt.bits, "mode": expert_fmt.kind}
    quant.update({p: mlx_dir.format_entry(f) for p, f in formats.items()})
    config["quantization"] = quant
    from .. import __version__
    from ..mlx_lm_files import MODEL_FILE

    config["model_file"] = MODEL_FILE  # mlx-lm's tools build the model from it (trust_remote_code)

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
        state = read_json_object(path, ConvertError, "the journal")
    except ConvertError as e:
        raise ConvertError(f"{e}; delete {partial} and start again") from None
    if state.get("plan_id") != plan_id:
        raise ConvertError(
            f"{partial}: was started from a different source or with different options; "
            "rerun with the same ones, or delete it and start again"
        )
    return state


def convert_mlx(ckpt: HFCheckpoint, source: str, output: Path, opts: Options, *, resume: bool,
                progress: bool, max_shard_bytes: int, verify: str = "written") -> Path:
    """``verify``: how each new shard is checked, ``"written"`` or ``"disk"`` (``ShardWriter.verify``)."""
    verifier = None
    partial, lock = check_output(ckpt.path, output, resume=resume, is_dir=True)
    try:
        with gc_paused():
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
        # kept shards are checked on a thread (header, and their CRCs where an older journal has
        # them); new ones as they are written (ShardWriter), and with --verify-disk re-read
        checks: list = []

        def check(fn, *args) -> None:
            """``fn(*args)`` on the verifiers' threads; made at the first check (a conversion
            from scratch checked as written has none: no pool, nor its import, ~12 ms)."""
            nonlocal verifier
            if verifier is None:
                from concurrent.futures import ThreadPoolExecutor

                verifier = ThreadPoolExecutor(2, thread_name_prefix="convert-verify")
            checks.append(verifier.submit(fn, *args))

        for n, e in zip(names, plan):
            if n in state["done"]:
                check(verify_shard, partial / n, e, state["done"][n])
        try:
            for shard_units, name, entries in zip(shards, names, plan):
                if name in state["done"]:
                    continue
                writer = mlx_dir.ShardWriter(partial / (name + ".tmp"), entries, verify=verify)
                if verify == "disk":
                    check(verify_written, writer)  # done as the writer finishes
                for tensor, chunks in split_tensors(read_ahead(tensor_chunks(shard_units), depth=4)):
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
            if isinstance(exc, mlx_dir.MLXDirError):  # a shard failed its verification
                raise ConvertError(f"{exc}; {where}") from None
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # Ctrl-C, SIGTERM (console.Terminated)
                print(f"\nconversion interrupted; {where}", file=sys.stderr)
            raise
        bar.close()

        for done_check in checks:
            done_check.result()
        weight_map = {t: n for n, entries in zip(names, plan) for t, _, _ in entries}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        try:
            (partial / mlx_dir.INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            copy_side_files(ckpt.path, partial)
            from ..mlx_lm_files import write_model_file

            write_model_file(partial)
            (partial / "config.json").write_text(json.dumps(mlx_config(ckpt, opts, formats, source), indent=2) + "\n")
        except OSError as exc:
            if err := disk_full_error(exc, partial):
                raise ConvertError(f"{err}; all {len(shards)} shards are kept in {partial}: rerun with --resume "
                                   "to finish, or delete it") from exc
            raise
        mlx_dir.open_mlx_dir(partial).close()  # the reader accepts what we wrote
        (partial / STATE_FILE).unlink()
        return publish(partial, output)
    finally:
        if verifier is not None:
            verifier.shutdown(wait=True, cancel_futures=True)
        lock.release()


def verify_written(writer: mlx_dir.ShardWriter) -> None:
    """:meth:`ShardWriter.verify` (header as planned, each tensor's bytes as written), failures
    as conversion errors."""
    try:
        writer.verify()
    except mlx_dir.MLXDirError as e:
        raise ConvertError(str(e)) from None


def verify_shard(path: Path, entries: list[tuple], crcs: dict[str, int]) -> None:
    """A kept shard (its size was checked): header as planned; each tensor's bytes against the
    CRCs the journal lists, where it lists any (``--verify-disk``, older journals). A shard
    written with ``verify="written"`` was compared byte for byte as it went to the disk and its
    header and size read back before the journal listed it; a CRC pass over it now could only
    catch a change by something else between the runs, not worth reading every byte again."""
    with SafetensorsFile(path) as st:
        got = [(n, st.info(n).dtype, st.info(n).shape) for n in st.keys()]
    if sorted(got) != sorted((n, d, tuple(s)) for n, d, s in entries):
        raise ConvertError(f"{path}: verification failed: the header does not match the plan")
    if not crcs:
        return
    on_disk = mlx_dir.file_crcs(path, [n for n, _, _ in entries])
    for tensor, crc in crcs.items():
        if on_disk.get(tensor) != crc:
            raise ConvertError(f"{path}: verification failed: tensor {tensor!r} differs from what was written")

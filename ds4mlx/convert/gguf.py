"""GGUF output of ``ds4mlx convert``: the preset type tables, the plan of encode jobs
(``gguf_jobs``, which also runs them) and the files they are written to (by ``gguf_writer``).

Tensor names and shapes are the ``deepseek4`` layout that antirez's ds4 and llama.cpp share
(``names.py``, which also holds ds4's type of each tensor). Presets choose the GGML type of
every tensor:

* ``ds4-q4`` / ``ds4-q2`` — exactly the types ds4 validates (``weights_validate_layout``):
  Q8_0 attention projections, shared experts and head; F16 embedding, router, HC mixers, compressor and indexer (incl. the FP8 indexer ``wq_b``); F32 1-D tensors;
  I32 hash tables; routed experts Q4_K (q4) or IQ2_XXS gate/up + Q2_K down (q2). IQ2_XXS uses
  ds4's importance without an imatrix: Σ row² per input column of each expert.
* ``mxfp4`` — lossless: experts repacked to GGML MXFP4 (same codes and E8M0 bytes), FP8
  weights as BF16 (E4M3 × power-of-two scale is exact in BF16; checked), BF16/F32 as stored,
  1-D tensors F32 (as llama.cpp's converters do).

The MTP block is not written: ds4 loads it from a separate file, and llama.cpp refuses files
with tensors it does not use.

Quantization is the slow part (100-200 M weights/s per core compiled): every tensor is planned
as ``EncodeJob``s, run on ``--jobs`` threads in plan order (``gguf_jobs.run_items``), and the
main and MTP files are written from that one stream (``write_files``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from gguf import GGUFValueType

from ..io.direct import StagingPool
from ..io.hf import HFCheckpoint
from ..io.gguf_file import GGUFError
from ..names import DS4_GGUF_TYPES, internal_to_gguf, scale_name
from ..quant import gguf as gguf_quants
from ..quant.codecs import FP8_WEIGHT_BLOCK
from ..quant.formats import MXFP4, MXFP8
from .gguf_jobs import _POOL, EncodeJob, _warm_up, run_item, run_items
from .gguf_writer import TensorEntry, begin_gguf
from .options import ConvertError, Options
from .output import Progress, check_free_space, check_output, disk_full_error, publish
from .plan import Logical, Unit, hash_table, hash_table_shape, logical_weights, source_nbytes, stored

if TYPE_CHECKING:
    from ..io.imatrix import Imatrix

PRESETS = ("ds4-q4", "ds4-q2", "mxfp4")
DEFAULT_PRESET = "ds4-q4"

EXPERT_TYPES = {
    "ds4-q4": {"w1": "Q4_K", "w3": "Q4_K", "w2": "Q4_K"},
    "ds4-q2": {"w1": "IQ2_XXS", "w3": "IQ2_XXS", "w2": "Q2_K"},
    "mxfp4": {"w1": "MXFP4", "w3": "MXFP4", "w2": "MXFP4"},
}

def _suffix(gguf_name: str) -> str:
    parts = gguf_name.split(".", 2)
    return parts[2] if parts[0] in ("blk", "mtp") else gguf_name


def tensor_type(preset: str, lw: Logical, gguf_name: str) -> str:
    """The GGML type name of one tensor under ``preset``."""
    if lw.experts:
        return EXPERT_TYPES[preset][lw.path.split(".")[-2]]
    if preset != "mxfp4":
        return DS4_GGUF_TYPES[_suffix(gguf_name)]
    if lw.path.endswith(".tid2eid"):
        return "I32"
    if len(lw.shape) == 1:
        return "F32"
    if lw.fmt == MXFP8:
        return "BF16"
    return {"BF16": "BF16", "F16": "F16"}.get(lw.dtype, "F32")


# Types whose quantizer weights its error by an importance matrix (llama.cpp's quant_weights).
IMATRIX_TYPES = ("Q4_K", "Q2_K", "IQ2_XXS")
# Dense tensors are encoded in row chunks of about this many weights (experts: one per job), so
# large ones (the head, the embedding) spread over the workers and never sit whole in memory.
CHUNK_WEIGHTS = 1 << 21
ROW_ALIGN = FP8_WEIGHT_BLOCK  # chunks start on an FP8 scale block


def row_chunks(n_rows: int, n_cols: int) -> list[tuple[int, int] | None]:
    """Row ranges of about ``CHUNK_WEIGHTS`` weights, each starting on ``ROW_ALIGN``."""
    step = max(ROW_ALIGN, CHUNK_WEIGHTS // max(n_cols, 1) // ROW_ALIGN * ROW_ALIGN)
    if n_rows <= step:
        return [None]
    return [(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]


@dataclass
class GGUFUnit(Unit):
    """A GGUF tensor and the items that produce its bytes in order: ``EncodeJob``s, or (hash
    tables) zero-argument callables run in the writing process."""

    items: list[EncodeJob | Callable[[], np.ndarray]] = field(default_factory=list)
    wants_imatrix: bool = False  # an imatrix was given and the type uses one
    has_imatrix: bool = False  # ... and it has an entry for this tensor


def gguf_unit(ckpt: HFCheckpoint, lw: Logical, preset: str, k: int | None,
              imatrix: Imatrix | None = None) -> GGUFUnit:
    """The GGUF unit of one logical weight: one tensor of ``tensor_type`` in numpy shape order,
    quantized with its ``imatrix`` entry (per expert) where the type uses one."""
    name = internal_to_gguf(lw.path)
    qtype = tensor_type(preset, lw, name)
    importance = None
    if imatrix is not None and qtype in IMATRIX_TYPES:
        from ..io.imatrix import ImatrixError, expert_importance  # (its import: 30 ms of every start-up)

        n_mat = len(lw.names) if lw.experts else 1
        try:
            importance = expert_importance(imatrix, name, n_mat, int(lw.shape[-1]))
        except ImatrixError as e:
            raise ConvertError(str(e)) from None
    fmt = gguf_quants.get(qtype, name) if qtype != "I32" else None
    lead = (len(lw.names),) if lw.experts else ()
    if lw.path.endswith(".tid2eid"):
        shape = hash_table_shape(ckpt, lw.names[0], k)
        nbytes = 4 * shape[0] * shape[1]
        items = [lambda: hash_table(ckpt, lw.names[0], k).astype("<i4")]
    else:
        shape = lead + lw.shape
        try:
            row = gguf_quants.row_bytes(fmt, shape[-1], name)
        except ValueError as e:
            raise ConvertError(f"{e} (preset {preset})") from None
        nbytes = math.prod(shape[:-1]) * row

        def job(src: str, rows: tuple[int, int] | None = None, i: int = 0) -> EncodeJob:
            scale = stored(ckpt, scale_name(src)) if lw.fmt in (MXFP8, MXFP4) else None
            imp = None if importance is None else np.ascontiguousarray(importance[i])
            return EncodeJob(qtype, lw.fmt, stored(ckpt, src), scale, src, rows, imp)

        if lw.experts or len(lw.shape) < 2:
            items = [job(n, i=i) for i, n in enumerate(lw.names)]
        else:
            items = [job(lw.names[0], r) for r in row_chunks(lw.shape[0], math.prod(lw.shape[1:]))]

    def produce():
        yield name, map(run_item, items)

    return GGUFUnit([(name, qtype, shape)], produce, source_nbytes(ckpt, lw.names), nbytes, items,
                    imatrix is not None and qtype in IMATRIX_TYPES, importance is not None)


def gguf_plan(ckpt: HFCheckpoint, opts: Options, imatrix: Imatrix | None = None, *,
              mtp: bool = False) -> list[GGUFUnit]:
    """The main file's tensors, or with ``mtp`` those of ds4's separate MTP file (``mtp.*``)."""
    preset = opts.preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ConvertError(f"--preset must be one of {PRESETS}, got {preset!r}")
    units = [gguf_unit(ckpt, lw, preset, opts.experts_per_token, imatrix)
             for lw in logical_weights(ckpt, include_mtp=mtp) if lw.path.startswith("mtp.") == mtp]
    if imatrix is not None and not mtp:
        check_imatrix_coverage(imatrix, units, preset)
    return units


def check_imatrix_coverage(imatrix: Imatrix, units: list[GGUFUnit], preset: str) -> None:
    """Refuse an imatrix that names none of the tensors it would weight (another model's, or a
    preset without such types); warn about the tensors it leaves out, which keep the default."""
    wanting = [u.tensors[0][0] for u in units if u.wants_imatrix]
    missing = [u.tensors[0][0] for u in units if u.wants_imatrix and not u.has_imatrix]
    if not wanting:
        raise ConvertError(f"--imatrix: preset {preset} has no tensor of the types an imatrix weights "
                           f"({', '.join(IMATRIX_TYPES)}); drop --imatrix or use ds4-q4 / ds4-q2")
    if len(missing) == len(wanting):
        raise ConvertError(f"{imatrix.path}: no imatrix entry matches a tensor of this model "
                           f"(e.g. {wanting[0]!r}; the file has e.g. {next(iter(imatrix.entries))!r})")
    if missing:
        import warnings

        warnings.warn(f"{imatrix.path}: no entry for {len(missing)} of {len(wanting)} tensors "
                      f"(e.g. {missing[0]!r}); those are quantized without an imatrix")


def imatrix_metadata(imatrix: Imatrix, units: list[GGUFUnit]) -> dict[str, tuple[Any, GGUFValueType]]:
    """The keys llama-quantize records about the imatrix it used."""
    meta = {
        "quantize.imatrix.file": (str(imatrix.path.name), GGUFValueType.STRING),
        "quantize.imatrix.entries_count": (sum(u.has_imatrix for u in units), GGUFValueType.INT32),
        "quantize.imatrix.chunks_count": (int(imatrix.chunk_count), GGUFValueType.INT32),
    }
    if imatrix.datasets:
        meta["quantize.imatrix.dataset"] = (str(imatrix.datasets[-1]), GGUFValueType.STRING)
    return meta


def mtp_gguf_path(output: Path) -> Path:
    """Where the MTP block of ``output`` goes: ``<stem>-MTP.gguf`` beside it (``load`` finds it)."""
    return output.with_name(f"{output.stem}-MTP.gguf")


def gguf_config(ckpt: HFCheckpoint, opts: Options) -> dict[str, Any]:
    """The HF config the GGUF metadata is written from (K experts, no MTP block in the file)."""
    config = dict(ckpt.config)
    if opts.experts_per_token is not None:
        config["num_experts_per_tok"] = opts.experts_per_token
    config["num_nextn_predict_layers"] = 0
    return config


def tokenizer_fields(source: Path, vocab_size: int | None = None) -> dict[str, Any] | None:
    path = source / "tokenizer.json"
    if not path.is_file():
        import warnings

        warnings.warn(f"{source}: no tokenizer.json, so the GGUF carries no tokenizer "
                      "(ds4 and llama.cpp need one; ds4mlx falls back to the published V4 tokenizer)")
        return None
    from ..tokenizer import gguf_tokenizer_fields

    fields = gguf_tokenizer_fields(path)
    if vocab_size is not None and len(fields["tokenizer.ggml.tokens"]) > vocab_size:
        raise ConvertError(f"{path}: the tokenizer has {len(fields['tokenizer.ggml.tokens'])} tokens but config.json's "
                           f"vocab_size is {vocab_size}: ids {vocab_size} and up would have no embedding")
    return fields


# --------------------------------------------------------------------------- writing


@dataclass
class OutputFile:
    """One GGUF of a conversion: where it is written, its plan, tokenizer and extra metadata."""

    path: Path
    units: list[GGUFUnit]
    tokenizer: dict[str, Any] | None = None
    metadata: dict[str, tuple[Any, GGUFValueType]] | None = None
    label: str = ""  # the progress bar's


def write_stream(path: Path, config: dict[str, Any], units: list[GGUFUnit], tokenizer: dict[str, Any] | None,
                 bar: Progress, jobs: int = 1,
                 extra_metadata: dict[str, tuple[Any, GGUFValueType]] | None = None) -> None:
    """Write the GGUF from the plan, each tensor's bytes as they are produced (by ``jobs``
    threads or worker processes, in plan order), checked against the disk as it is written."""
    write_files([OutputFile(path, units, tokenizer, extra_metadata)], config, jobs, bars=[bar], verify=False)


def write_files(files: list[OutputFile], config: dict[str, Any], jobs: int = 1, *, progress: bool = False,
                bars: list[Progress] | None = None, verify: bool = True) -> None:
    """Write ``files`` one after the other from one stream of encode jobs. A file's last steps
    (waiting for its last pieces to reach the disk and be read back, fsync, the table checks)
    run on a thread while the next file is written: done in line they idled the cores for
    0.5-1 s per file on a busy disk. With ``verify``, each file's tensor table is checked too."""
    import threading

    items = [item for f in files for u in f.units for item in u.items]
    _warm_up(items)
    encoded = run_items(items, jobs)  # (a list: its jobs' bytes are read ahead by it)
    staging = StagingPool()  # the next file's writer takes the staging buffers of the one before
    finishing: list[tuple[threading.Thread, list[BaseException]]] = []

    def finish(written, f: OutputFile, errors: list[BaseException]) -> None:
        try:
            try:
                written.finish()
            except GGUFError as e:
                raise ConvertError(str(e)) from None
            if verify:
                verify_gguf(f.path, f.units)
        except BaseException as e:  # raised by the writing thread once joined
            errors.append(e)

    try:
        for i, f in enumerate(files):
            entries = [TensorEntry(name, qtype, tuple(shape), u.nbytes)
                       for u in f.units for name, qtype, shape in u.tensors]
            bar = bars[i] if bars is not None else Progress(sum(u.nbytes for u in f.units), 0, f.label, progress)
            data = (bar.track(islice(encoded, len(u.items))) for u in f.units for _ in u.tensors)
            try:
                written = begin_gguf(f.path, config, entries, data, tokenizer=f.tokenizer, extra_metadata=f.metadata,
                                     staging=staging)
            except GGUFError as e:
                raise ConvertError(str(e)) from None
            finally:
                if bars is None:
                    bar.close()
            errors: list[BaseException] = []
            if i + 1 < len(files):
                t = threading.Thread(target=finish, args=(written, f, errors), name="gguf-finish", daemon=True)
                t.start()
                finishing.append((t, errors))
            else:
                finish(written, f, errors)
                finishing.append((None, errors))
    finally:
        encoded.close()  # stops the workers now, also on errors
        _POOL.clear()  # the read buffers go with the conversion
        for t, _ in finishing:
            if t is not None:
                t.join()
    for _, errors in finishing:
        if errors:
            raise errors[0]


def verify_gguf(path: Path, units: list[Unit]) -> None:
    """Re-read the file's tensor table: every tensor with the planned type and shape (its bytes
    were checked against the disk while writing, ``stream_gguf``)."""
    from ..io.gguf_file import open_gguf

    with open_gguf(path) as g:
        planned = {name: (qtype, shape) for u in units for name, qtype, shape in u.tensors}
        if set(g.tensors) != set(planned):
            raise ConvertError(f"{path}: verification failed: the tensor list does not match the plan")
        for name, (qtype, shape) in planned.items():
            info = g.info(name)
            if info.type_name != qtype or info.shape != tuple(shape):
                raise ConvertError(f"{path}: verification failed: {name} is {info.type_name} {info.shape}, "
                                   f"planned {qtype} {tuple(shape)}")


def convert_gguf(ckpt: HFCheckpoint, source: str, output: Path, opts: Options, *, progress: bool,
                 jobs: int = 1, imatrix: Imatrix | None = None) -> Path:
    """Write ``output`` and, when the source has an MTP block and ``include_mtp``, ds4's
    separate MTP file beside it (``mtp_gguf_path``); both appear only once both are verified."""
    if output.suffix != ".gguf":
        raise ConvertError(f"{output}: a GGUF output path must end in .gguf")
    files = [(output, gguf_plan(ckpt, opts, imatrix), tokenizer_fields(ckpt.path, ckpt.config.get("vocab_size")))]
    if opts.include_mtp and ckpt.has_mtp:
        files.append((mtp_gguf_path(output), gguf_plan(ckpt, opts, imatrix, mtp=True), None))
    owned = []  # (partial, lock) of each output
    try:
        for out, _, _ in files:
            owned.append(check_output(ckpt.path, out, resume=False, is_dir=False))
        partials = [partial for partial, _ in owned]
        config = gguf_config(ckpt, opts)
        check_free_space(output.parent, sum(u.nbytes for _, units, _ in files for u in units))
        try:
            write_files([OutputFile(partial, units, tokenizer,
                                    imatrix_metadata(imatrix, units) if imatrix is not None else None,
                                    f"convert → {out.name}")
                         for (out, units, tokenizer), partial in zip(files, partials)],
                        config, jobs, progress=progress)
        except BaseException as exc:
            for partial in partials:
                partial.unlink(missing_ok=True)
            if isinstance(exc, OSError) and (err := disk_full_error(exc, partials[0])):
                raise err from exc
            raise
        for (out, _, _), partial in zip(files, partials):
            publish(partial, out)
        return output
    finally:
        for _, lock in owned:
            lock.release()

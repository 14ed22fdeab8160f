"""``ds4mlx convert``: official (or 4Expert) safetensors -> an MLX directory or a GGUF file.

The pipeline streams one logical weight at a time:

1. **plan** — ``open_hf_checkpoint`` validates the source from its headers; every logical weight
   (a dense tensor, or one projection of all routed experts) becomes a ``Unit`` that knows its
   output tensors (names, dtypes, shapes) before any byte is read;
2. **stream** — each unit reads its source tensors with plain file reads (no long-lived memory
   map, so resident memory stays bounded by the largest unit), transforms them, and hands byte
   chunks to the writer; experts are read, transformed and written expert by expert;
3. **verify** — MLX output: every byte as handed to the disk is compared with the converter's
   own chunk (one ``memcmp`` on the writer's thread), and each shard's header and size are read
   back from the disk; ``verify_disk`` instead re-reads every shard from disk while it is written
   against each tensor's CRC-32; GGUF output: each piece read back from disk as it is written and
   compared with the bytes handed to the disk (``io/direct.py``); the result is then opened
   with the matching reader;
4. **publish** — output lives under ``OUTPUT.partial`` until the final rename, so an interrupted
   run never leaves something that looks complete. MLX output is written shard by shard with a
   journal, so ``resume=True`` continues after the last finished shard.

MLX output (``io/mlx_dir.py``) is lossless by default: FP4 experts as ``mxfp4`` and FP8 dense
weights as ``mxfp8`` with the original bytes (``quant/mx.py``), the rest as stored. GGUF output
uses the ``deepseek4`` tensor names of ds4 and llama.cpp with a preset type table
(``convert/gguf.py``).

Modules: ``options`` (options, errors), ``plan`` (source tensors, logical weights, units),
``output`` (path checks, disk space, progress), ``mlx`` (MLX directories), ``gguf`` (presets,
the plan of encode jobs, the files), ``gguf_jobs`` (the jobs and the threads that run them),
``gguf_writer`` (the streaming GGUF writer).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..io.hf import open_hf_checkpoint
from .mlx import DEFAULT_SHARD_BYTES, convert_mlx
from .options import ConvertError, Options, OutputExistsError, check_options
from .output import gc_paused
from .plan import resolve_source

__all__ = ["convert", "ConvertError", "OutputExistsError"]


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
    imatrix: str | os.PathLike | None = None,
    verify_disk: bool = False,
) -> Path:
    """Convert an official-format checkpoint (directory or Hugging Face repo id).

    ``to="mlx"``: a directory that ``ds4mlx.load`` reads; lossless unless ``expert_bits``
    (routed experts as affine 2–8 bits, ``group_size``) or ``dense_bits`` (FP8 projections,
    i.e. attention and shared experts, as affine) ask for less. ``to="gguf"``: one ``.gguf``
    file in the ``deepseek4`` layout, types from ``preset`` (``ds4-q4``, ``ds4-q2``, ``mxfp4``).
    ``experts_per_token=K`` writes the K-expert variant (hash tables cut to K columns).
    ``jobs``: GGUF quantization threads (default ``os.cpu_count()``; 1 quantizes in this
    thread); the file is byte-identical whatever the count. Without a C compiler the numpy
    quantizers run on as many spawned worker processes instead, so a script calling this
    needs the usual ``if __name__ == "__main__":`` guard.
    ``imatrix``: a llama.cpp importance matrix (GGUF or legacy ``.dat``) weighting the Q4_K,
    Q2_K and IQ2_XXS quantization error, per expert where it has per-expert entries.
    ``verify_disk``: MLX output re-read from disk to be checked (past the page cache, a third
    more disk traffic) rather than checked as handed to the disk. Returns the output path.
    """
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ConvertError(f"--jobs must be a positive integer, got {jobs!r}")
    src = resolve_source(source)
    output = Path(output).expanduser()
    with gc_paused():
        ckpt = open_hf_checkpoint(src)
    try:
        opts = Options(to, preset, experts_per_token, expert_bits, dense_bits, group_size, include_mtp)
        check_options(ckpt, opts)
        if to == "mlx":
            if imatrix is not None:
                raise ConvertError("--imatrix weights GGUF quantization; MLX output does not use one")
            return convert_mlx(ckpt, str(source), output, opts, resume=resume, progress=progress,
                               max_shard_bytes=max_shard_bytes, verify="disk" if verify_disk else "written")
        if verify_disk:
            raise ConvertError("--verify-disk checks MLX output; a GGUF is re-read by its own verification")
        if resume:
            raise ConvertError("--resume continues MLX conversions only; a GGUF is written in one pass")
        from .gguf import convert_gguf

        im = None
        if imatrix is not None:
            from ..io.imatrix import ImatrixError, read_imatrix

            try:
                im = read_imatrix(imatrix)
            except ImatrixError as e:
                raise ConvertError(str(e)) from None
        return convert_gguf(ckpt, str(source), output, opts, progress=progress, jobs=jobs or os.cpu_count() or 1,
                            imatrix=im)
    finally:
        ckpt.close()

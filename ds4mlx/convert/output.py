"""The output side of a conversion: path checks, disk space, progress."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .options import ConvertError, OutputExistsError

PARTIAL_SUFFIX = ".partial"


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


def publish(partial: Path, output: Path) -> Path:
    """Move the finished ``partial`` into place (replacing the empty directory ``check_output``
    allowed there) in one rename, so ``output`` is never half-written."""
    if output.is_dir():
        output.rmdir()
    os.replace(partial, output)
    return output


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

"""Decode state files in mlx-lm's prompt-cache format.

A file is what ``mlx_lm.models.cache.save_prompt_cache`` writes: safetensors whose tensors are
``tree_flatten([c.state for c in cache])`` and whose metadata is ``tree_flatten([metadata,
class names, scalar markers])``. mlx-lm's own ``load_prompt_cache`` rebuilds each entry through
``globals()[class name]`` of its module, so it cannot know ``LayerCache``; ``load_prompt_cache``
here reads the same layout with our classes. Writes go to a temporary file renamed into place,
so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .state import LayerCache

CLASSES = {"LayerCache": LayerCache}
FORMAT = "ds4mlx-prompt-cache/2"  # bump when LayerCache.state changes meaning (2: the MTP drafter held)
_HEADER_MAX = 64 << 20  # a safetensors header longer than this is not one of ours


class PromptCacheError(ValueError):
    """A prompt-cache file that cannot be used (unreadable, damaged, foreign); the message says why."""


def state_digest(cache: list[LayerCache]) -> str:
    """SHA-256 over every array of the state (dtype, shape and bytes), in order."""
    h = hashlib.sha256()
    for key, value in tree_flatten([c.state for c in cache]):
        if isinstance(value, mx.array):
            # state arrays may be views of the decode buffers (state.py): hash their row-major bytes
            raw = value if value.size == 0 else mx.contiguous(value).view(mx.uint8)
            mx.eval(raw)
            h.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
            h.update(memoryview(raw) if value.size else b"")
        else:
            h.update(f"{key}={value!r};".encode())
    return h.hexdigest()


def save_prompt_cache(file_name: str | os.PathLike, cache: list[Any], metadata: Optional[dict[str, str]] = None) -> None:
    """Write ``cache`` (a list of ``LayerCache``) and string ``metadata`` to ``file_name``
    atomically, adding ``format`` and the state's ``digest`` to the metadata."""
    from mlx_lm.models.cache import save_prompt_cache as mlx_save

    path = Path(file_name)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a prompt-cache file name must end with .safetensors")
    mx.eval([c.state for c in cache])
    meta = {**(metadata or {}), "format": FORMAT, "digest": state_digest(cache)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        mlx_save(tmp, cache, meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(file_name: str | os.PathLike) -> dict[str, str]:
    """The metadata a prompt-cache file was saved with, reading only its header."""
    path = Path(file_name)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise PromptCacheError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _HEADER_MAX:
                raise PromptCacheError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, PromptCacheError):
            raise
        raise PromptCacheError(f"{path}: unreadable safetensors header ({e})") from None
    flat = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(flat, dict):
        raise PromptCacheError(f"{path}: no prompt-cache metadata in the header")
    return {k[2:]: v for k, v in flat.items() if k.startswith("0.")}


def load_prompt_cache(file_name: str | os.PathLike, return_metadata: bool = False):
    """Read a file written by ``save_prompt_cache``; the state's digest is checked, so a damaged
    file raises ``PromptCacheError`` instead of giving a wrong state."""
    path = Path(file_name)
    try:
        arrays, flat = mx.load(str(path), return_metadata=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise PromptCacheError(f"{path}: unreadable prompt-cache file ({e})") from None
    try:
        metadata, classes, scalars = tree_unflatten(list(flat.items()))
        for key, kind in scalars[1:]:
            if kind == "scalar":
                arrays[key] = arrays[key].item()
            elif kind == "none":
                arrays[key] = None
            elif kind == "string":
                arrays[key] = "".join(chr(i) for i in arrays[key].tolist())
            else:
                raise PromptCacheError(f"{path}: unknown scalar kind {kind!r} for {key}")
        states = tree_unflatten(list(arrays.items()))
        if isinstance(classes, str):
            classes = [classes]
        if len(classes) != len(states):
            raise PromptCacheError(f"{path}: {len(classes)} cache classes for {len(states)} states")
        unknown = sorted(set(classes) - set(CLASSES))
        if unknown:
            raise PromptCacheError(f"{path}: cache class {unknown[0]!r} is not a ds4mlx decode state")
        cache = [CLASSES[c].from_state(list(s)) for c, s in zip(classes, states)]
    except PromptCacheError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise PromptCacheError(f"{path}: malformed prompt-cache file ({type(e).__name__}: {e})") from None
    if metadata.get("format") != FORMAT:
        raise PromptCacheError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}")
    if metadata.get("digest") != state_digest(cache):
        raise PromptCacheError(f"{path}: the state does not match its digest (damaged file)")
    return (cache, metadata) if return_metadata else cache

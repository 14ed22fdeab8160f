"""Models named on the Hugging Face Hub, fetched through the huggingface_hub cache.

* ``snapshot(repo_id)``: a checkpoint repository (config, safetensors, tokenizer) as a local
  snapshot directory.
* ``gguf_file(repo_id, filename)``: one GGUF of a repository that holds several (ds4's
  ``antirez/deepseek-v4-gguf``), named as llama.cpp's ``--hf-repo``/``--hf-file`` or as
  ``REPO:FILE`` (``split_gguf_ref``). huggingface_hub shows its own progress bar while it
  downloads; the cache is tried first, so a file already there works offline.
"""

from __future__ import annotations

import re
from pathlib import Path

SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(FileNotFoundError):
    """The model could not be found locally or downloaded; the message names it."""


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and ".." not in text


def split_gguf_ref(text: str) -> tuple[str, str] | None:
    """``"owner/name:file.gguf"`` -> ``("owner/name", "file.gguf")``; None for anything else."""
    repo, sep, filename = str(text).partition(":")
    if not sep or not filename.endswith(".gguf") or not is_repo_id(repo):
        return None
    return repo, filename


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise ModelNotFoundError("huggingface_hub is not installed (pip install huggingface_hub)") from None
    return huggingface_hub


def _cached_first(fetch, what: str):
    """``fetch(local_files_only=...)`` from the cache, else from the network; errors name ``what``."""
    from huggingface_hub import errors

    try:
        return fetch(local_files_only=True)
    except Exception:
        pass  # not cached (or incomplete): try the network
    try:
        return fetch(local_files_only=False)
    except errors.LocalEntryNotFoundError as e:  # (an EntryNotFoundError too) no network
        raise ModelNotFoundError(
            f"{what}: not in the huggingface_hub cache, and the Hugging Face Hub cannot be reached ({e}). "
            "Offline? Download it first or pass a local path.") from None
    except errors.RepositoryNotFoundError:
        raise ModelNotFoundError(f"{what}: no such repository on the Hugging Face Hub (or it is private)") from None
    except (errors.EntryNotFoundError, errors.RemoteEntryNotFoundError):
        raise ModelNotFoundError(f"{what}: no such file in the repository") from None
    except Exception as e:
        raise ModelNotFoundError(
            f"{what}: not a local path, and downloading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {e}). Offline? Download it first or pass a local path.") from None


def snapshot(repo_id: str) -> Path:
    """A checkpoint repository -> its local snapshot directory (cache first, then the network)."""
    if not is_repo_id(repo_id):
        raise ModelNotFoundError(f"{repo_id}: no such file or directory, and not a Hugging Face repo id")
    hub = _hub()
    return Path(_cached_first(
        lambda **kw: hub.snapshot_download(repo_id, allow_patterns=SNAPSHOT_PATTERNS, **kw), repo_id))


def gguf_file(repo_id: str, filename: str) -> Path:
    """One GGUF of a Hub repository -> its path in the huggingface_hub cache."""
    if not is_repo_id(repo_id):
        raise ModelNotFoundError(f"{repo_id}: not a Hugging Face repo id (expected owner/name)")
    if not filename.endswith(".gguf"):
        raise ModelNotFoundError(f"{filename}: --gguf-file names a .gguf file")
    hub = _hub()
    return Path(_cached_first(lambda **kw: hub.hf_hub_download(repo_id, filename, **kw),
                              f"{repo_id}: {filename}"))

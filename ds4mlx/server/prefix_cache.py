"""Prefix cache: decode-state snapshots keyed by the tokens they hold.

A request resumes from the snapshot of the longest prefix of its tokens and prefills only the
rest. The state cannot be trimmed back (the compressors' rolling windows and rows only move
forward), so reuse needs a snapshot taken exactly at a shared point: the engine takes them at
message boundaries and at the end of each request. Snapshots sit in an LRU bounded in bytes;
with a directory they are also written there (atomically, tagged with the model's fingerprint
and the format version, digest-checked on load), so they survive a restart. mlx-lm's server
keeps a trie of trimmable KV caches; that design needs trimming, which this state lacks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..prompt_cache import FORMAT, PromptCacheError, load_prompt_cache, read_metadata, save_prompt_cache
from ..state import LayerCache, cache_nbytes, snapshot

log = logging.getLogger("ds4mlx.server")


def model_fingerprint(model) -> str:
    """Identifies the weights and settings a state belongs to: the config, dtype, routing and
    rounding switches, and the shape, dtype and leading values of every parameter."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    h = hashlib.sha256()
    h.update(json.dumps(getattr(model.config, "__dict__", str(model.config)), sort_keys=True, default=str).encode())
    h.update(f"{model.dtype}|{getattr(model, 'experts_per_token', None)}|{getattr(model, 'qat_rounding', None)}".encode())
    for name, p in tree_flatten(model.parameters()):
        head = p.reshape(-1)[:16]
        if head.dtype == mx.bfloat16:
            head = head.astype(mx.float32)
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)}:".encode())
        h.update(memoryview(head))
    return h.hexdigest()[:32]


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    nbytes: int
    state: Optional[list[LayerCache]] = None  # None: only on disk
    path: Optional[Path] = None
    disk_bytes: int = 0
    used: float = field(default_factory=time.time)


class StateFiles:
    """How snapshots reach the disk: the prompt-cache files (a model split over mlx.launch gives
    its own, which keep each rank's layers in that rank's file)."""

    save_state = staticmethod(save_prompt_cache)
    load_state = staticmethod(load_prompt_cache)

    @staticmethod
    def delete_state(path: Path) -> None:
        path.unlink(missing_ok=True)


class PrefixCache:
    """Snapshots in memory (``max_bytes``) and, with ``directory``, on disk (``max_disk_bytes``)."""

    def __init__(self, max_bytes: int, *, directory: Optional[str | os.PathLike] = None,
                 max_disk_bytes: int = 0, fingerprint: str = "", layout: Optional[list[int]] = None,
                 files: Any = StateFiles) -> None:
        self.files = files
        self.max_bytes = max_bytes
        self.layout = layout  # compression ratio of each layer: a loaded state must match
        self.max_disk_bytes = max_disk_bytes
        self.fingerprint = fingerprint
        self.directory = None if directory is None else Path(directory)
        self._entries: "OrderedDict[tuple[int, ...], _Entry]" = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self._unwritten: list[_Entry] = []
        self.hits = self.misses = self.loaded_from_disk = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._scan()

    # ------------------------------------------------------------------ lookup / store
    def lookup(self, ids: list[int]) -> tuple[int, Optional[list[LayerCache]]]:
        """``(n, state)``: a private copy of the state after the longest cached proper prefix
        ``ids[:n]`` (``(0, None)`` when none). At least one token is left to prefill, since
        the next token's logits are not stored."""
        with self._lock:
            found = [e for e in self._entries.values()
                     if len(e.tokens) < len(ids) and tuple(ids[: len(e.tokens)]) == e.tokens]
        for entry in sorted(found, key=lambda e: -len(e.tokens)):
            state = entry.state if entry.state is not None else self._load(entry)
            if state is None:
                continue
            with self._lock:
                entry.used = time.time()
                if entry.tokens in self._entries:
                    self._entries.move_to_end(entry.tokens)
            self.hits += 1
            return len(entry.tokens), snapshot(state)
        self.misses += 1
        return 0, None

    def store(self, tokens: list[int], state: list[LayerCache]) -> None:
        """Keep a snapshot of ``state``, which holds exactly ``tokens``."""
        key = tuple(tokens)
        if not key or (int(state[0].offset) != len(key)):
            return
        with self._lock:
            if key in self._entries and self._entries[key].state is not None:
                self._entries.move_to_end(key)
                return
        snap = snapshot(state)
        entry = _Entry(key, cache_nbytes(snap), state=snap)
        if self.directory is not None:
            self._unwritten.append(entry)  # written by ``flush``, after the answer has gone out
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            self._evict()

    def flush(self) -> None:
        """Write the snapshots stored since the last call to the directory."""
        pending, self._unwritten = self._unwritten, []
        for entry in pending:
            if entry.state is not None and self._entries.get(entry.tokens) is entry:
                self._write(entry)
        with self._lock:
            self._evict()

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.state is not None)

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ bounds
    def _evict(self) -> None:
        mem = sum(e.nbytes for e in self._entries.values() if e.state is not None)
        for e in list(self._entries.values()):
            if mem <= self.max_bytes:
                break
            if e.state is not None:
                mem -= e.nbytes
                e.state = None
            if e.path is None:
                del self._entries[e.tokens]
        if self.directory is None:
            return
        disk = sum(e.disk_bytes for e in self._entries.values() if e.path is not None)
        for e in sorted(self._entries.values(), key=lambda e: e.used):
            if disk <= self.max_disk_bytes:
                break
            if e.path is not None:
                disk -= e.disk_bytes
                self.files.delete_state(e.path)
                e.path = None
                if e.state is None:
                    del self._entries[e.tokens]

    # ------------------------------------------------------------------ disk
    def _file_for(self, tokens: tuple[int, ...]) -> Path:
        h = hashlib.sha256(f"{self.fingerprint}:{FORMAT}:{json.dumps(tokens)}".encode()).hexdigest()[:40]
        return self.directory / f"{h}.safetensors"

    def _write(self, entry: _Entry) -> None:
        path = self._file_for(entry.tokens)
        meta = {"fingerprint": self.fingerprint, "tokens": json.dumps(list(entry.tokens))}
        try:
            self.files.save_state(path, entry.state, meta)
        except OSError as e:
            log.warning("prefix cache: could not write %s (%s); kept in memory only", path, e)
            return
        entry.path, entry.disk_bytes = path, path.stat().st_size

    def _check_meta(self, path: Path, meta: dict) -> tuple[int, ...]:
        if meta.get("format") != FORMAT:
            raise PromptCacheError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("fingerprint") != self.fingerprint:
            raise PromptCacheError(f"{path}: written for another model (fingerprint {meta.get('fingerprint')!r})")
        try:
            tokens = json.loads(meta["tokens"])
            if not (isinstance(tokens, list) and tokens and all(type(t) is int for t in tokens)):
                raise ValueError("not a list of token ids")
        except (KeyError, ValueError) as e:
            raise PromptCacheError(f"{path}: bad token list in the metadata ({e})") from None
        return tuple(tokens)

    def _scan(self) -> None:
        found = []
        for path in self.directory.glob("*.safetensors"):
            if path.name.startswith("."):
                continue  # a temporary file of an interrupted write
            try:
                tokens = self._check_meta(path, read_metadata(path))
                stat = path.stat()
            except (PromptCacheError, OSError) as e:
                log.warning("prefix cache: skipping %s", e)
                continue
            found.append(_Entry(tokens, 0, path=path, disk_bytes=stat.st_size, used=stat.st_mtime))
        for e in sorted(found, key=lambda e: e.used):
            self._entries[e.tokens] = e
        if found:
            log.info("prefix cache: %d snapshots on disk in %s", len(found), self.directory)
        with self._lock:
            self._evict()

    def _load(self, entry: _Entry) -> Optional[list[LayerCache]]:
        try:
            state, meta = self.files.load_state(entry.path, return_metadata=True)
            if self._check_meta(entry.path, meta) != entry.tokens:
                raise PromptCacheError(f"{entry.path}: token list changed since the directory was read")
            if self.layout is not None and [c.ratio for c in state] != list(self.layout):
                raise PromptCacheError(f"{entry.path}: layer layout {[c.ratio for c in state]} is not this model's")
            if any(int(c.offset) != len(entry.tokens) for c in state[:1]):
                raise PromptCacheError(f"{entry.path}: state offset does not match its {len(entry.tokens)} tokens")
        except (PromptCacheError, OSError) as e:
            log.warning("prefix cache: skipping %s", e)
            with self._lock:
                self._entries.pop(entry.tokens, None)
            return None
        os.utime(entry.path)  # recency for the next start's LRU order
        self.loaded_from_disk += 1
        with self._lock:
            entry.state, entry.nbytes = state, cache_nbytes(state)
            self._evict()
        return state

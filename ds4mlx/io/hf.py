"""Official-format checkpoint directories (sharded safetensors + index) -> tensors for the model.

``open_hf_checkpoint`` checks everything that can be checked from headers alone — config,
index, shards, names, dtypes and shapes against the config — before any weight byte is read.
``HFCheckpoint.load_weights`` then reads one tensor at a time from the memory maps and returns
per internal parameter path either a float ``mx.array`` (BF16/F16/F32 as stored; the loader
casts) or the packed arrays of an exact MLX ``mxfp8``/``mxfp4`` view, with a ``WeightFormat``
per quantised module. Routed experts are stacked per layer and projection. FP8/FP4 weights are
never dequantised.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import check_hf_values
from ..names import EXPERT_WEIGHT, TensorSpec, UnknownTensorName, hf_to_internal, official_layout, scale_name
from ..quant.codecs import MX_GROUP
from ..quant.formats import FLOAT, MXFP4, MXFP8, WeightFormat
from ..quant.mx import fp4_to_mxfp4, fp8_to_mxfp8, official_shapes, stack_fp4_to_mxfp4
from .checks import check_expert_ids, hash_table_fits
from .json_file import read_json_object, read_weight_map
from .safetensors import FLOAT_DTYPES, INT_DTYPES, SafetensorsFile, open_shards

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """An official-format directory is inconsistent; the message names the file, tensor or key."""


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a directory, checked to be DeepSeek V4."""
    p = Path(path) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no config.json in the model directory")
    config = read_json_object(p, CheckpointError, "the configuration")
    if config.get("model_type") != "deepseek_v4":
        raise CheckpointError(
            f"{p}: model_type is {config.get('model_type')!r}, expected 'deepseek_v4' (DeepSeek V4 Flash)"
        )
    check_hf_values(config, str(p))  # before the layout is derived from the values
    return config


@dataclass
class Entry:
    """One logical weight: its stored tensor(s) and how it will be held."""

    name: str  # official weight name
    shard: str
    fmt: WeightFormat
    scale_shard: str | None = None


@dataclass
class HFCheckpoint:
    path: Path
    config: dict[str, Any]
    weight_map: dict[str, str]  # official name -> shard file name
    entries: dict[str, Entry]  # official weight name -> entry (scales folded in)
    has_mtp: bool
    _files: dict[str, SafetensorsFile] = field(default_factory=dict, repr=False)

    def file(self, shard: str) -> SafetensorsFile:
        return self._files[shard]

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    # ---------------------------------------------------------------- reading
    def _np(self, name: str) -> np.ndarray:
        return self._files[self.weight_map[name]].tensor_np(name)

    def _mx(self, name: str):
        return self._files[self.weight_map[name]].tensor_mx(name)

    def _release(self, entries: list[Entry]) -> None:
        """Drop the mapped pages of weights (and scales) already copied out (see
        ``SafetensorsFile.release``): the load's peak memory stays the model's, not file + model."""
        for e in entries:
            for n in [e.name] if e.fmt == FLOAT else [e.name, scale_name(e.name)]:
                self._files[self.weight_map[n]].release(n)

    def _packed(self, entry: Entry, weight: np.ndarray, scale: np.ndarray):
        if entry.fmt == MXFP8:
            return fp8_to_mxfp8(weight, scale, entry.name)
        return fp4_to_mxfp4(weight, scale, entry.name)

    def _nbytes(self, entry: Entry) -> int:
        """Stored bytes of a weight and its scale."""
        names = [entry.name] if entry.fmt == FLOAT else [entry.name, scale_name(entry.name)]
        return sum(self._files[self.weight_map[n]].info(n).nbytes for n in names)

    def load_weights(self, *, include_mtp: bool = True, progress: Callable[[int, int], None] | None = None,
                     keep: Callable[[str], bool] | None = None) -> tuple[dict[str, Any], dict[str, WeightFormat]]:
        """``({internal path: mx.array}, {module path: WeightFormat})``, one tensor read at a time;
        ``progress(bytes read, bytes to read)`` after each weight (each layer's experts at once).
        ``keep(name)``: read only the weights it accepts (one pipeline stage's share)."""
        import mlx.core as mx

        weights: dict[str, Any] = {}
        formats: dict[str, WeightFormat] = {}
        experts: dict[tuple[str, str], list[Entry]] = defaultdict(list)
        entries = {n: e for n, e in self.entries.items()
                   if (include_mtp or not n.startswith("mtp.")) and (keep is None or keep(n))}
        total = sum(self._nbytes(e) for e in entries.values()) if progress else 0
        done = 0

        def advance(group) -> None:
            nonlocal done
            if progress is not None:
                done += sum(self._nbytes(e) for e in group)
                progress(done, total)

        for name, entry in entries.items():
            m = EXPERT_WEIGHT.match(name)
            if m:
                experts[(m.group(1), m.group(3))].append(entry)
                continue
            path = hf_to_internal(name).path
            if entry.fmt == FLOAT:
                array = self._mx(name)
                if name.endswith(".tid2eid"):
                    check_expert_ids(array, int(self.config["n_routed_experts"]),
                                     f"{self.path / self.weight_map[name]}: {name}", CheckpointError)
                weights[path] = array
            else:
                module = path[: -len(".weight")]
                w, s = self._packed(entry, self._np(name), self._np(scale_name(name)))
                weights[path], weights[module + ".scales"] = w, s
                formats[module] = entry.fmt
                mx.eval(w, s)  # copied out of the map, so its pages can go
            self._release([entry])
            advance([entry])
        for (prefix, proj), group in experts.items():
            module = f"{prefix}.{proj}"
            group.sort(key=lambda e: int(EXPERT_WEIGHT.match(e.name).group(2)))
            fmt = group[0].fmt
            if fmt == MXFP4:
                w, s = stack_fp4_to_mxfp4(
                    [self._np(e.name) for e in group], [self._np(scale_name(e.name)) for e in group], module
                )
            elif fmt == MXFP8:
                pairs = [fp8_to_mxfp8(self._np(e.name), self._np(scale_name(e.name)), e.name) for e in group]
                w, s = mx.stack([p[0] for p in pairs]), mx.stack([p[1] for p in pairs])
                del pairs
            else:
                w, s = mx.stack([self._mx(e.name) for e in group]), None
            weights[module + ".weight"] = w
            if s is not None:
                weights[module + ".scales"] = s
                formats[module] = fmt
            mx.eval(w if s is None else (w, s))  # materialise now, so the per-expert sources can go
            self._release(group)
            advance(group)
        return weights, formats



def _read_index(path: Path) -> dict[str, str]:
    index = path / INDEX_FILE
    if index.is_file():
        return read_weight_map(index, CheckpointError)
    single = path / SINGLE_FILE
    if single.is_file():
        return {name: SINGLE_FILE for name in SafetensorsFile(single).keys()}
    raise FileNotFoundError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")


def _classify(spec: TensorSpec, files, weight_map, path: Path, seen: dict) -> Entry:
    """Check one expected weight's dtype/shape (and scale) and choose how it is held. The
    checks depend only on the spec's storage and shape and the stored dtypes and shapes:
    ``seen`` keeps the format of each combination already checked (a checkpoint's experts,
    tens of thousands of tensors, share a handful), so each is checked once."""
    name = spec.name
    shard = weight_map[name]
    info = files[shard].info(name)
    scale, scale_shard, scale_info = None, None, None
    if spec.storage in ("fp8", "fp4") and name.endswith(".weight"):
        scale = scale_name(name)
        scale_shard = weight_map.get(scale)
        if scale_shard is not None:
            scale_info = files[scale_shard].info(scale)
    key = (spec.storage, spec.shape, info.dtype, info.shape,
           None if scale_info is None else (scale_info.dtype, scale_info.shape))
    fmt = seen.get(key)
    if fmt is None:
        fmt = seen[key] = _check_stored(spec, info, scale, scale_info, weight_map, path, shard)
    return Entry(name, shard, fmt, scale_shard) if fmt in (MXFP8, MXFP4) else Entry(name, shard, fmt)


def _check_stored(spec: TensorSpec, info, scale: str | None, scale_info, weight_map, path: Path,
                  shard: str) -> WeightFormat:
    """``_classify``'s checks: the format a weight is held in, or a ``CheckpointError``."""
    name = spec.name

    def where() -> str:  # only on an error: a path join per tensor adds up (tens of thousands)
        return f"{path / shard}: {name}"

    def expect(shape, found, what=name):
        if tuple(found) != tuple(shape):
            raise CheckpointError(f"{path / weight_map[what]}: {what} has shape {tuple(found)}, expected {tuple(shape)}")

    if scale_info is not None:
        if scale_info.dtype != "F8_E8M0":
            raise CheckpointError(f"{path / weight_map[scale]}: {scale} has dtype {scale_info.dtype}, expected F8_E8M0")
        out_dim, in_dim = spec.shape
        if info.dtype == "F8_E4M3":
            expect(spec.shape, info.shape)
            expect(official_shapes("fp8", spec.shape)[1], scale_info.shape, scale)
            if in_dim % MX_GROUP:
                raise CheckpointError(f"{where()}: input dimension {in_dim} is not a multiple of {MX_GROUP}")
            return MXFP8
        if info.dtype in ("I8", "U8"):
            stored_shape, scale_shape = official_shapes("fp4", spec.shape)
            expect(stored_shape, info.shape)
            expect(scale_shape, scale_info.shape, scale)
            return MXFP4
        raise CheckpointError(f"{where()}: dtype {info.dtype} with a .scale tensor; expected F8_E4M3 or I8")
    if spec.storage == "i64":
        if info.dtype not in INT_DTYPES:
            raise CheckpointError(f"{where()}: dtype {info.dtype}, expected one of {INT_DTYPES}")
        vocab, k = spec.shape
        if not hash_table_fits(info.shape, vocab, k):
            raise CheckpointError(
                f"{where()}: shape {info.shape}, expected ({vocab}, ≥{k}) "
                f"(a row of num_experts_per_tok={k} expert ids per token)"
            )
        return FLOAT
    if info.dtype not in FLOAT_DTYPES:
        hint = " (a quantised weight without its .scale tensor?)" if spec.storage in ("fp8", "fp4") else ""
        raise CheckpointError(f"{where()}: dtype {info.dtype}, expected one of {FLOAT_DTYPES}{hint}")
    expect(spec.shape, info.shape)
    return FLOAT


def open_hf_checkpoint(path: str | Path) -> HFCheckpoint:
    """Open and validate an official-format directory from its headers."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    config = read_config(path)
    weight_map = _read_index(path)

    files = open_shards(path, weight_map)
    for name, shard in weight_map.items():
        if name not in files[shard]:
            raise CheckpointError(f"{path / shard}: the index lists tensor {name!r} in this shard, but it is not there")

    try:
        layout = official_layout(config)
    except Exception:  # a config it cannot lay out: the names are checked first, and it raises after
        layout = None
    # the layout's names (and their scales) are official names: only the others need the check
    known = set() if layout is None else layout.keys() | {s.scale_name for s in layout.values() if s.scale_name}
    for name in weight_map:
        if name in known:
            continue
        try:
            hf_to_internal(name)
        except UnknownTensorName as e:
            raise CheckpointError(f"{path / weight_map[name]}: {e}") from None

    if layout is None:
        layout = official_layout(config)
    has_mtp = any(n.startswith("mtp.") for n in weight_map)
    if not has_mtp:  # converted without the MTP block: load the main model only
        layout = {n: s for n, s in layout.items() if not n.startswith("mtp.")}
    expected = set(layout)
    expected |= {s.scale_name for s in layout.values() if s.scale_name and s.scale_name in weight_map}
    missing = [n for n in layout if n not in weight_map]
    if missing:
        raise CheckpointError(
            f"{path}: tensor {missing[0]!r} is missing from the checkpoint"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unexpected = sorted(set(weight_map) - expected)
    if unexpected:
        raise CheckpointError(
            f"{path / weight_map[unexpected[0]]}: tensor {unexpected[0]!r} does not belong to a model with this "
            f"config.json" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )

    seen: dict = {}
    entries = {n: _classify(spec, files, weight_map, path, seen) for n, spec in layout.items()}
    _check_expert_formats(entries, path)
    return HFCheckpoint(path, config, weight_map, entries, has_mtp, files)


def _check_expert_formats(entries: dict[str, Entry], path: Path) -> None:
    seen: dict[tuple[str, str], Entry] = {}
    for name, entry in entries.items():
        m = EXPERT_WEIGHT.match(name)
        if not m:
            continue
        first = seen.setdefault((m.group(1), m.group(3)), entry)
        if first.fmt != entry.fmt:
            raise CheckpointError(
                f"{path / entry.shard}: {name} is stored as {entry.fmt}, but {first.name} as {first.fmt}; "
                "experts of one projection must share a format"
            )

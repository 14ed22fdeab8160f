"""Record (or compare) the tiny models' float32 logits across every source and kernel path.

    python scripts/record_logits.py record /tmp/arch_before.npz --files /tmp/arch_files
    python scripts/record_logits.py compare /tmp/arch_before.npz --files /tmp/arch_files

``record`` builds the tiny checkpoints (top-6 with MTP, and its 4Expert variant), writes every
derived model into ``--files`` (GGUF: F32, mixed block types, ds4 q2-style, upstream llama.cpp
style, and the ``mxfp4`` / ``ds4-q4`` / ``ds4-q2`` conversion presets; the MLX directory from
``convert``), and saves the logits of each (official dir with QAT rounding on and off, top-6 and
top-4) on the ``ops`` and ``emulate`` kernel paths: a 12-token prefill, then one decode step.

``compare`` loads the same stored files with the current code, and also rebuilds them into a
fresh folder to check that the writers still produce the same bytes; it exits non-zero on any
difference and names it. A refactor must leave both bit-identical.

Each kernel path runs in its own process (the backend is chosen once per process).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TOKENS = [5, 17, 900, 3, 42, 42, 7, 1000, 64, 11, 300, 2]
BACKENDS = ("ops", "emulate")


# --------------------------------------------------------------------------- files
def _gguf_recipes():
    from gguf import GGMLQuantizationType as T

    def f32(path, value):
        return T.I32 if value.dtype.kind in "iu" else T.F32

    def mixed(path, value):  # every block type somewhere, as tests/test_gguf_io.py
        if value.dtype.kind in "iu":
            return T.I32
        if ".ffn.experts." in path:
            layer, proj = int(path.split(".")[1]), path.split(".")[-2]
            table = [T.Q4_K, T.IQ2_XXS, T.Q2_K, T.MXFP4, T.Q8_0, T.F16]
            return table[(layer + "w1w3w2".index(proj) // 2) % len(table)]
        if path.endswith("attn.wq_a.weight") or path.endswith("shared_experts.w1.weight"):
            return T.Q4_K if path.startswith("layers.1") else T.Q8_0
        if path.endswith(("wq_b.weight", "wkv.weight", "wo_a.weight", "wo_b.weight",
                          "shared_experts.w2.weight")) or path == "head.weight":
            return T.Q8_0
        if path == "embed.weight" or path.endswith("hc_attn_fn"):
            return T.Q8_0
        if path.endswith("compressor.wkv.weight"):
            return T.BF16
        return T.F16 if value.ndim >= 2 else T.F32

    def q2(path, value):  # ds4's q2 file: IQ2_XXS gate/up, Q2_K down
        if value.dtype.kind in "iu":
            return T.I32
        if ".ffn.experts." in path:
            return T.Q2_K if path.endswith("w2.weight") else T.IQ2_XXS
        if path == "head.weight" or path.endswith(("wq_a.weight", "wq_b.weight", "wo_b.weight")):
            return T.Q8_0
        return T.F16 if value.ndim >= 2 else T.F32

    def upstream(path, value):  # a stock llama.cpp conversion: MXFP4 experts, Q8_0/BF16
        if value.dtype.kind in "iu":
            return T.I32
        if ".ffn.experts." in path:
            return T.MXFP4
        if path.endswith(("wq_a.weight", "wq_b.weight", "wkv.weight", "wo_a.weight",
                          "wo_b.weight")) or ".shared_experts." in path:
            return T.BF16 if path.startswith("layers.3.") else T.Q8_0
        if path.endswith("ffn.gate.weight") or value.ndim == 1:
            return T.F32
        return T.BF16

    return {"f32": f32, "mixed": mixed, "q2": q2, "upstream": upstream}


def _float_weights(model) -> dict[str, np.ndarray]:
    """Every parameter of the (unquantized-source) model as float32 values, packed ones dequantized."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    out, packed = {}, set()
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, QuantizedSwitchLinear)):
            packed.add(path)
            out[path + ".weight"] = np.array(mx.dequantize(
                module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                bits=module.bits, mode=module.mode, dtype=mx.float32))
    for path, value in tree_flatten(model.parameters()):
        if path.rpartition(".")[0] not in packed:
            out[path] = np.array(value)
    return out


def build_files(out: Path) -> dict[str, Path]:
    """Every model this script measures, written under ``out``; name -> path."""
    import mlx.core as mx

    import ds4mlx
    from ds4mlx.convert import convert
    from ds4mlx.names import internal_to_gguf
    from ds4mlx.synthetic import make_4expert, write_tiny_checkpoint

    try:
        from ds4mlx.io.gguf import write_gguf
    except ImportError:  # the writer's home after the restructuring
        from ds4mlx.convert.gguf_writer import write_gguf

    out.mkdir(parents=True, exist_ok=True)
    files = {"official": write_tiny_checkpoint(out / "tiny", seed=0)}
    files["official-4expert"] = make_4expert(files["official"], out / "tiny-4expert", k=4)
    config = json.loads((files["official"] / "config.json").read_text())
    model, _ = ds4mlx.load(files["official"], qat_rounding=False, dtype=mx.float32, mtp=False)
    weights = _float_weights(model)
    del model
    for name, recipe in _gguf_recipes().items():
        tensors = {}
        for path, value in weights.items():
            qtype = recipe(path, value)
            tensors[internal_to_gguf(path)] = (value.astype(np.int32) if value.dtype.kind in "iu" else value, qtype)
        files[f"gguf-{name}"] = write_gguf(out / f"{name}.gguf", config, tensors)
    for preset in ("mxfp4", "ds4-q4", "ds4-q2"):
        files[f"convert-{preset}"] = convert(files["official"], out / f"convert-{preset}.gguf", to="gguf",
                                             preset=preset, progress=False)
    files["convert-mlx"] = convert(files["official"], out / "mlx", progress=False, max_shard_bytes=3 << 20)
    files["convert-mlx-affine"] = convert(files["official"], out / "mlx-q4", expert_bits=4, group_size=32,
                                          progress=False)
    return files


def tree_hash(path: Path, base: Path) -> str:
    """Hash of a file or folder's bytes, with the build folder's path (recorded as
    ``converted_from`` in MLX configs) written as ``<base>``."""
    h = hashlib.sha256()
    for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        if f.name.startswith(".") or f.suffix == ".lock":
            continue
        h.update(f.name.encode())
        h.update(f.read_bytes().replace(str(base).encode(), b"<base>"))
    return h.hexdigest()


# --------------------------------------------------------------------------- logits (one backend)
def _cases(files: dict[str, str]):
    """(key, path, load kwargs) of every measured model."""
    for name, path in files.items():
        ks = (None, 4) if name != "official-4expert" else (None,)
        qats = (True, False) if name.startswith("official") else (True,)
        for k in ks:
            for qat in qats:
                key = f"{name}/k={k or 'file'}/qat={int(qat)}"
                yield key, path, {"experts_per_token": k, "qat_rounding": qat}


def logits_for(files: dict[str, str]) -> dict[str, np.ndarray]:
    import mlx.core as mx

    import ds4mlx

    out = {}
    toks = mx.array([TOKENS])
    for key, path, kw in _cases(files):
        model, _ = ds4mlx.load(path, dtype=mx.float32, **kw)
        out[key + "/prefill"] = np.array(model(toks))
        cache = model.make_cache()
        model(toks[:, :-1], cache=cache)
        out[key + "/decode"] = np.array(model(toks[:, -1:], cache=cache))
        del model
    return out


def _child(files_json: str, npz: str) -> None:
    np.savez(npz, **logits_for(json.loads(files_json)))


def run_backends(files: dict[str, Path]) -> dict[str, np.ndarray]:
    names = {k: str(v) for k, v in files.items()}
    out = {}
    for backend in BACKENDS:
        with tempfile.TemporaryDirectory() as tmp:
            npz = os.path.join(tmp, "l.npz")
            env = {**os.environ, "DS4MLX_KERNELS": backend}
            subprocess.run([sys.executable, __file__, "_child", json.dumps(names), npz], env=env, check=True)
            with np.load(npz) as data:
                out.update({f"{backend}/{k}": data[k] for k in data.files})
    return out


# --------------------------------------------------------------------------- main
def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("record", "compare"))
    ap.add_argument("npz", type=Path, help="the recorded logits (written by record, read by compare)")
    ap.add_argument("--files", type=Path, required=True, help="folder of the recorded model files")
    args = ap.parse_args()
    if args.mode == "record":
        files = build_files(args.files)
        hashes = {k: tree_hash(p, args.files) for k, p in files.items()}
        (args.files / "manifest.json").write_text(json.dumps(
            {"files": {k: str(p) for k, p in files.items()}, "hashes": hashes}, indent=1))
        logits = run_backends(files)
        np.savez(args.npz, **logits)
        print(f"recorded {len(logits)} logit arrays of {len(files)} models to {args.npz}")
        return 0

    manifest = json.loads((args.files / "manifest.json").read_text())
    files = {k: Path(p) for k, p in manifest["files"].items()}
    bad = []
    with tempfile.TemporaryDirectory() as tmp:
        fresh = build_files(Path(tmp) / "fresh")
        for k, p in fresh.items():
            if tree_hash(p, Path(tmp) / "fresh") != manifest["hashes"][k]:
                bad.append(f"file {k}: rebuilt bytes differ from the recorded ones")
    logits = run_backends(files)
    with np.load(args.npz) as before:
        missing = sorted(set(before.files) ^ set(logits))
        bad += [f"{k}: only on one side" for k in missing]
        same = 0
        for k in sorted(set(before.files) & set(logits)):
            a, b = before[k], logits[k]
            if a.shape != b.shape or a.tobytes() != b.tobytes():
                diff = float(np.abs(a - b).max()) if a.shape == b.shape else float("nan")
                bad.append(f"{k}: logits differ (max |diff| {diff:.3g})")
            else:
                same += 1
    print(f"{same} of {len(logits)} logit arrays bit-identical; {len(files)} model files rebuilt")
    for line in bad:
        print("DIFF", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

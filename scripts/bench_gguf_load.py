#!/usr/bin/env python3
"""Benchmark ``load_gguf`` on a multi-GB synthetic DeepSeek V4 GGUF with Flash-sized experts.

    python scripts/bench_gguf_load.py [--layers 2] [--experts q2|q4] [--workdir DIR] [--keep]

The file has Flash's routed-expert tensors (256 experts, 4096 hidden, 2048 expert width: q2 =
IQ2_XXS gate/up 528 MiB + Q2_K down 672 MiB per layer, q4 = Q4_K 1152 MiB each) and small
everything else (1024 vocab, 2 heads). Expert bytes are random blocks with sane fp16 scales,
tiled from a few distinct experts so that writing is quick. The load runs in a child process;
the report gives load time and the child's peak resident memory (``ru_maxrss``) against the file
size (target: peak RSS / file size ≤ 1.15), next to the RSS of a child that only imports.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gguf import GGMLQuantizationType as T  # noqa: E402

from ds4mlx.convert.gguf_writer import write_gguf  # noqa: E402
from ds4mlx.names import internal_to_gguf  # noqa: E402
from ds4mlx.quant import gguf as fmts  # noqa: E402
from ds4mlx.synthetic import tiny_config  # noqa: E402

F16_OFFSETS = {"IQ2_XXS": [0], "Q2_K": [80, 82], "Q4_K": [0, 2]}


def bench_config(layers: int) -> dict:
    return tiny_config(num_layers=layers, compress_ratios=[0] * layers, vocab_size=1024,
                       hidden_size=4096, num_attention_heads=2, head_dim=128, q_lora_rank=128,
                       o_groups=2, o_lora_rank=128, n_routed_experts=256, moe_intermediate_size=2048,
                       num_hash_layers=1, mtp=False)


def expert_blocks(name: str, experts: int, out_dim: int, in_dim: int, rng, distinct: int = 4) -> np.ndarray:
    """Random valid blocks ``[experts, out, row_bytes]`` (a tiled view of ``distinct`` experts)."""
    fmt = fmts.get(name)
    row = in_dim // fmt.BLOCK_SIZE * fmt.BLOCK_BYTES
    few = rng.integers(0, 256, size=(distinct, out_dim, row // fmt.BLOCK_BYTES, fmt.BLOCK_BYTES),
                       dtype=np.uint8)
    for off in F16_OFFSETS[name]:
        few[..., off:off + 2] = np.float16(1e-3).reshape(1).view(np.uint8)
    few = few.reshape(distinct, out_dim, row)
    return np.broadcast_to(few[None], (experts // distinct, distinct, out_dim, row)).reshape(
        experts, out_dim, row) if experts % distinct == 0 else few[np.arange(experts) % distinct]


def write_file(path: Path, layers: int, experts: str) -> None:
    from ds4mlx.config import ModelConfig
    from ds4mlx.model.transformer import Model
    from mlx.utils import tree_flatten

    config = bench_config(layers)
    rng = np.random.default_rng(0)
    model = Model(ModelConfig.from_hf(config))  # shapes only (parameters stay lazy)
    e, h, f = config["n_routed_experts"], config["hidden_size"], config["moe_intermediate_size"]
    types = {"q2": {"w1": "IQ2_XXS", "w3": "IQ2_XXS", "w2": "Q2_K"},
             "q4": {"w1": "Q4_K", "w3": "Q4_K", "w2": "Q4_K"}}[experts]
    tensors = {}
    for param, value in tree_flatten(model.parameters()):
        name = internal_to_gguf(param)
        if ".ffn.experts." in param:
            proj = param.split(".")[-2]
            out_dim, in_dim = (h, f) if proj == "w2" else (f, h)
            kind = types[proj]
            tensors[name] = (expert_blocks(kind, e, out_dim, in_dim, rng), T[kind])
        elif param.endswith(".tid2eid"):
            tensors[name] = (rng.integers(0, e, size=value.shape).astype(np.int32), T.I32)
        else:
            values = (0.02 * rng.standard_normal(value.shape)).astype(np.float32)
            quantizable = value.ndim == 2 and value.shape[-1] % 32 == 0 and "hc_" not in param
            tensors[name] = (values, T.Q8_0 if quantizable else (T.F16 if value.ndim == 2 else T.F32))
    write_gguf(path, config, tensors, name="bench")


def child_load(path: str) -> None:
    import mlx.core as mx

    from ds4mlx.loader import load_gguf

    start = time.perf_counter()
    model, _ = load_gguf(path, dtype=mx.float32)
    seconds = time.perf_counter() - start
    blk = model.layers[0].ffn.experts
    print(json.dumps({"seconds": seconds, "peak_rss": _peak_rss(),
                      "experts": type(blk.w1).__name__ + "/" + blk.w1.type_name}))


def child_baseline() -> None:
    import mlx.core as mx  # noqa: F401

    import ds4mlx.io.gguf  # noqa: F401
    import ds4mlx.model.transformer  # noqa: F401

    print(json.dumps({"peak_rss": _peak_rss()}))


def _peak_rss() -> int:
    """This process's peak resident memory in bytes. Linux keeps ``ru_maxrss`` across exec (a
    child would inherit the writer's peak), so there the per-address-space VmHWM is used."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _run(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", choices=["q2", "q4"], default="q2")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the GGUF file")
    ap.add_argument("--child-load", help=argparse.SUPPRESS)
    ap.add_argument("--child-baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_load:
        return child_load(args.child_load)
    if args.child_baseline:
        return child_baseline()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ds4mlx-gguf-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"bench-{args.experts}-{args.layers}L.gguf"
    try:
        if not path.exists():
            start = time.perf_counter()
            write_file(path, args.layers, args.experts)
            print(f"wrote {path} in {time.perf_counter() - start:.1f} s")
        size = path.stat().st_size
        base = _run("--child-baseline")
        res = _run("--child-load", str(path))
        ratio = res["peak_rss"] / size
        report = {
            "file_gb": size / 1e9, "load_s": res["seconds"], "load_gb_per_s": size / 1e9 / res["seconds"],
            "peak_rss_gb": res["peak_rss"] / 1e9, "import_rss_gb": base["peak_rss"] / 1e9,
            "peak_rss_over_file": ratio, "target": 1.15, "experts": res["experts"],
        }
        print(json.dumps(report, indent=2))
        if ratio > 1.15:
            print("peak RSS / file size above the 1.15 target", file=sys.stderr)
    finally:
        if not args.keep and path.exists():
            path.unlink()


if __name__ == "__main__":
    main()

"""Batched decoding: aggregate tokens/s for 1, 2, 4, 8 sequences, and bytes read per step.

1. Throughput on a tiny model (CPU, float32 by default): each sequence gets a prompt of its own
   length, then every round times ``--steps`` decode steps of each batch size in turn
   (interleaved, so machine load hits them alike); the median round is reported, with the
   aggregate speed relative to one sequence (one-at-a-time serving decodes at the 1-sequence
   speed whatever the number of requests).
2. Bytes read per decode step at DeepSeek V4 Flash shapes, batch 1 vs 8, from the per-layer
   itemisation of ``scripts/decode_profile.py`` (weights each parameter the layer reads, the
   decode state the fused path reads): a batch step reads the dense weights and the head once,
   each routed expert that any of its tokens chose once (the expert-sorted gather), and each
   sequence's own state. Distinct experts per step are those of ``B`` tokens drawing ``k`` of
   256 uniformly (expected value); without the sort every (token, expert) pair reads its expert.

The last line is one JSON object.

Usage: python scripts/bench_batch.py [--sizes 1 2 4 8] [--steps 16] [--rounds 3] [--context 4096]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ds4mlx import load  # noqa: E402
from ds4mlx.state import LayerCache  # noqa: E402
from ds4mlx.synthetic import write_tiny_checkpoint  # noqa: E402


def batch_state(model, prompts: list[list[int]]) -> list:
    """Each prompt prefilled alone, then merged into one batch state (as mlx-lm's generator does)."""
    per_seq = []
    for p in prompts:
        cache = model.make_cache()
        mx.eval(model(mx.array([p]), cache))
        per_seq.append(cache)
    if len(prompts) == 1:
        return per_seq[0]
    return [LayerCache.merge([c[i] for c in per_seq]) for i in range(len(per_seq[0]))]


def time_steps(model, cache, b: int, steps: int) -> float:
    tokens = mx.full((b, 1), 7, dtype=mx.int32)
    mx.eval(model(tokens, cache))  # warm-up step
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = model(tokens, cache)
        tokens = mx.argmax(logits[:, -1:], axis=-1).astype(mx.int32)
        mx.eval(tokens)
    return time.perf_counter() - t0


def throughput(args) -> dict[int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
        model, _ = load(ckpt, dtype=getattr(mx, args.dtype))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 1024, size=int(n)).tolist() for n in rng.integers(8, 64, size=max(args.sizes))]
    rounds: dict[int, list[float]] = {b: [] for b in args.sizes}
    for _ in range(args.rounds):
        for b in args.sizes:
            cache = batch_state(model, prompts[:b])
            rounds[b].append(b * args.steps / time_steps(model, cache, b, args.steps))
    return {b: statistics.median(v) for b, v in rounds.items()}


def flash_bytes(args) -> dict:
    import decode_profile as dp

    dtype = mx.bfloat16
    config = dp.flash_config(args.experts, args.top_k)
    kinds = dp.default_compress_ratios(dp.FLASH_LAYERS, 0)
    per_kind = {r: kinds.count(r) for r in (0, 4, 128)}
    gate_fmt, down_fmt = dp.RECIPES[args.format]
    d, f = config.hidden_size, config.moe_intermediate_size
    one_expert = 2 * dp.expert_bytes(gate_fmt, f, d) + dp.expert_bytes(down_fmt, d, f)
    head = sum(dp.head_bytes(config, args.format, "file", dtype))  # as a real file holds it
    fused = {"attention", "indexer"}
    layers = {}
    for layer, ratio in enumerate((0, 4, 128)):
        blk = dp.build_layer(config, layer, args.format, dtype, seed=layer)
        weights, _, casts = dp.weight_bytes(blk, config, args.format, args.top_k, dtype)
        layers[ratio] = dict(dense=weights + casts - args.top_k * one_expert,
                             state=dp.state_bytes(config, ratio, args.context, dtype.size, fused)["path"])
        del blk
    e, k = dp.FLASH_EXPERTS, args.top_k
    out = {}
    for b in (1, 8):
        distinct = e * (1 - (1 - k / e) ** b)
        dense = sum(per_kind[r] * layers[r]["dense"] for r in per_kind) + head
        experts = sum(per_kind.values()) * distinct * one_expert
        unsorted = sum(per_kind.values()) * b * k * one_expert
        state = b * sum(per_kind[r] * layers[r]["state"] for r in per_kind)
        total = dense + experts + state
        out[b] = dict(dense=dense, experts=experts, state=state, total=total, per_token=total / b,
                      distinct_experts=distinct, unsorted_total=dense + unsorted + state)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--context", type=int, default=4096, help="tokens each Flash sequence holds")
    parser.add_argument("--format", default="q2", choices=["q2", "q4", "mxfp4"])
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--experts", type=int, default=8, help="experts built per Flash layer")
    parser.add_argument("--no-flash", action="store_true", help="skip the Flash-shape bytes")
    args = parser.parse_args()

    tps = throughput(args)
    print(f"Tiny model, {args.dtype}, {args.steps} decode steps x {args.rounds} interleaved rounds (median):")
    for b, v in tps.items():
        print(f"  {b} sequences: {v:8.1f} tokens/s aggregate, x{v / tps[args.sizes[0]]:.2f}")
    result = {"tokens_per_s": {str(b): round(v, 2) for b, v in tps.items()},
              "ratio_to_1": {str(b): round(v / tps[args.sizes[0]], 3) for b, v in tps.items()}}
    if not args.no_flash:
        fb = flash_bytes(args)
        gib = 2.0**30
        print(f"Flash shapes ({args.format} experts, top-{args.top_k}, {args.context} tokens per "
              "sequence), bytes read per decode step:")
        for b, r in fb.items():
            print(f"  batch {b}: {r['total'] / gib:6.2f} GiB per step ({r['per_token'] / gib:5.2f} per token): "
                  f"dense+head {r['dense'] / gib:5.2f}, experts {r['experts'] / gib:5.2f} "
                  f"({r['distinct_experts']:.1f} distinct per layer), state {r['state'] / gib:5.3f}; "
                  f"without the expert sort {r['unsorted_total'] / gib:6.2f}")
        result["flash_bytes_per_step"] = {str(b): int(r["total"]) for b, r in fb.items()}
        result["flash_bytes_per_token"] = {str(b): int(r["per_token"]) for b, r in fb.items()}
        result["flash_per_token_8_over_1"] = round(fb[8]["per_token"] / fb[1]["per_token"], 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

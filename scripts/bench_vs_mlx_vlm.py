"""ds4mlx against mlx-vlm's DeepSeek V4 model on the same tiny official-format checkpoint.

Both load the checkpoint ``ds4mlx.synthetic.write_tiny_checkpoint`` writes (FP8 projections,
FP4 experts, as the published Flash) and run them with float32 activations, top-6 experts:
mlx-vlm as MLX mxfp8 / mxfp4 quantized matmuls; ds4mlx the experts so too, but on the CPU the
FP8 projections on an exact float32 copy of their weights (``ops.CpuCopy``, within
``ops.CPU_COPY_BUDGET``: MLX's CPU mxfp8 matmul decodes every code in scalar code). Per repetition each side prefills the same
``--prompt`` random tokens in one call and then decodes ``--steps`` greedy tokens one at a
time; the sides alternate within every repetition (interleaved, so load on the machine hits
both alike) and the best time of each is kept. Printed: tokens/s of each side and the ratios
ds4mlx / mlx-vlm for prefill and decode, by wall clock and by the process's CPU time (steadier
on a shared machine).

mlx-vlm (tested with 0.7.10) reads the official layout only into the per-module quantization
its own converter writes, so the copy of the checkpoint given to it gets that
``quantization`` entry in its config.json (mlx-vlm's ``make_quantization_config``).

Usage: python scripts/bench_vs_mlx_vlm.py [--prompt 256] [--steps 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds4mlx.loader import load  # noqa: E402
from ds4mlx.synthetic import write_tiny_checkpoint  # noqa: E402


def load_mlx_vlm(src: Path, dst: Path):
    """mlx-vlm's language model on a copy of ``src`` with mlx-vlm's quantization entry."""
    import mlx_vlm.utils as vlm_utils
    from mlx_vlm.models.deepseek_v4.language import make_quantization_config

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    module, _ = vlm_utils.get_model_and_args(config)
    skeleton = module.Model(module.ModelConfig.from_dict(config))
    per_module = make_quantization_config(skeleton.language_model)
    config["quantization"] = {k if k in ("group_size", "bits", "mode") else f"language_model.{k}": v
                              for k, v in per_module.items()}
    (dst / "config.json").write_text(json.dumps(config))
    model = vlm_utils.load_model(dst)
    model.set_dtype(mx.float32)  # floating parameters only; packed weights and scales stay
    return model.language_model


def logits_of(out) -> mx.array:
    return getattr(out, "logits", out)


def run(model, cache, prompt: mx.array, steps: int) -> tuple[float, float, float, float, list[int]]:
    """(prefill s, decode s, prefill CPU s, decode CPU s, greedy tokens) of one prompt."""
    t0, c0 = time.perf_counter(), time.process_time()
    token = mx.argmax(logits_of(model(prompt, cache=cache))[:, -1], axis=-1)
    mx.eval(token)
    t1, c1 = time.perf_counter(), time.process_time()
    tokens = []
    for _ in range(steps):
        token = mx.argmax(logits_of(model(token[:, None], cache=cache))[:, -1], axis=-1)
        mx.eval(token)
        tokens.append(int(token.item()))
    return t1 - t0, time.perf_counter() - t1, c1 - c0, time.process_time() - c1, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=6)
    args = parser.parse_args()
    try:
        import mlx_vlm
    except ImportError:
        sys.exit("bench_vs_mlx_vlm: mlx-vlm is not installed (pip install mlx-vlm==0.7.10)")
    mx.set_default_device(mx.cpu)

    with tempfile.TemporaryDirectory() as tmp:
        src = write_tiny_checkpoint(Path(tmp) / "tiny", experts_per_token=args.top_k)
        ours, _ = load(str(src), experts_per_token=args.top_k, dtype=mx.float32)
        theirs = load_mlx_vlm(src, Path(tmp) / "tiny-mlx-vlm")
        vocab = json.loads((src / "config.json").read_text())["vocab_size"]
        prompt = mx.array(np.random.default_rng(0).integers(0, vocab, (1, args.prompt)))
        sides = {"ds4mlx": (ours, ours.make_cache), "mlx-vlm": (theirs, theirs.make_cache)}
        best = {name: [float("inf")] * 4 for name in sides}
        run(ours, ours.make_cache(), prompt[:, :8], 2)  # first-call compilation, both sides
        run(theirs, theirs.make_cache(), prompt[:, :8], 2)
        for rep in range(args.repeat):
            for name, (model, make_cache) in sides.items():
                times = run(model, make_cache(), prompt, args.steps)[:4]
                best[name] = [min(b, t) for b, t in zip(best[name], times)]
                pre, dec, cpre, cdec = times
                print(f"rep {rep} {name:8s} prefill {args.prompt / pre:8.1f} t/s  "
                      f"decode {args.steps / dec:7.1f} t/s  (CPU s: prefill {cpre:.2f}, decode "
                      f"{cdec:.2f})", flush=True)
    print(f"mlx-vlm {mlx_vlm.__version__}, CPU, float32, top-{args.top_k}, "
          f"{args.prompt}-token prompt, {args.steps} greedy steps, best of {args.repeat}")
    for name, (pre, dec, cpre, cdec) in best.items():
        print(f"  {name:8s} prefill {args.prompt / pre:8.1f} t/s  decode {args.steps / dec:7.1f} t/s  "
              f"(CPU s: prefill {cpre:.2f}, decode {cdec:.2f})")
    ratios = [best["mlx-vlm"][i] / best["ds4mlx"][i] for i in range(4)]
    print(json.dumps({key: round(r, 3) for key, r in zip(
        ("prefill_ratio", "decode_ratio", "prefill_cpu_ratio", "decode_cpu_ratio"), ratios)}))


if __name__ == "__main__":
    main()

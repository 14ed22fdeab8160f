"""Weight bytes and dispatches per decode token of a Flash-shaped layer: Metal path vs ops path.

For the routed experts of one MoE layer (D=4096, F=2048, 256 experts, one token, k experts) and
the hyper-connection pre step (4 streams of 4096), this builds the lazy MLX graph of each path at
the real shapes through ds4mlx/kernels.py and counts, without evaluating anything:

* dispatches: MLX primitives that run a GPU kernel (views such as reshape, slice, broadcast and
  transpose excluded) plus, on the Metal path, the custom kernels launched;
* weight bytes: what the Metal kernels read (each selected expert's packed rows once), and on
  the ops path the same packed bytes plus, for GGUF blocks, the float32 copies the twins
  dequantize into, written once and read once (a lower bound: the dequantizers' own
  intermediates are not counted; the mxfp4 twin is ``gather_qmm`` on the packed bytes).

Usage: python scripts/kernel_traffic.py [--k 6 4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds4mlx import kernels  # noqa: E402
from ds4mlx import ops as hyper  # noqa: E402
from decode_profile import VIEWS, Recorder, expert_bytes  # noqa: E402  (this folder)

D, F, E, HC, LAYERS = 4096, 2048, 256, 4, 43
RECIPES = {  # name: (gate/up format, down format); "MXFP4" here is MLX's mxfp4 layout
    "q2 (IQ2_XXS gate/up, Q2_K down)": ("IQ2_XXS", "Q2_K"),
    "q4 (Q4_K)": ("Q4_K", "Q4_K"),
    "mxfp4 (official FP4 / GGUF MXFP4)": ("MXFP4", "MXFP4"),
}
_NODE = re.compile(r'\{ (\d+) \[label ="([^"]+)"')


def graph_nodes(*arrays: mx.array) -> dict[str, str]:
    """{node id: primitive} of the graph that produces ``arrays``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "g.dot")
        mx.export_to_dot(path, *arrays)
        return dict(_NODE.findall(Path(path).read_text()))


def experts(fmt: str, rows: int, k_in: int):
    """Lazy placeholder experts [E, rows, ·] (never evaluated, never allocated)."""
    if fmt == "MXFP4":
        return (mx.zeros((E, rows, k_in // 8), dtype=mx.uint32),
                mx.zeros((E, rows, k_in // 32), dtype=mx.uint8))
    return mx.zeros((E, rows, expert_bytes(fmt, 1, k_in)), dtype=mx.uint8)


def leaves(w) -> list[mx.array]:
    return list(w) if isinstance(w, tuple) else [w]


@contextlib.contextmanager
def on_metal():
    """The Metal path with its launches recorded instead of run (``decode_profile.Recorder``),
    the first-use check off: the recorder's placeholder outputs would fail it and switch every
    kernel off for the process (the counts then were the ops path's)."""
    recorder = Recorder()
    saved = kernels.dispatch.run, kernels.dispatch.backend, os.environ.get("DS4MLX_KERNEL_CHECK")
    kernels.dispatch.run, kernels.dispatch.backend = recorder, lambda: "metal"
    os.environ["DS4MLX_KERNEL_CHECK"] = "off"
    try:
        yield recorder
    finally:
        kernels.dispatch.run, kernels.dispatch.backend, check = saved
        if check is None:
            os.environ.pop("DS4MLX_KERNEL_CHECK", None)
        else:
            os.environ["DS4MLX_KERNEL_CHECK"] = check


def count(outputs: list[mx.array], base: list[mx.array]) -> int:
    known = graph_nodes(*base)
    nodes = graph_nodes(*outputs)
    return sum(1 for i, prim in nodes.items() if i not in known and prim.split()[0] not in VIEWS)


def moe_layer(gate_fmt: str, down_fmt: str, k: int) -> dict[str, float]:
    w1, w3 = experts(gate_fmt, F, D), experts(gate_fmt, F, D)
    w2 = experts(down_fmt, D, F)
    x = mx.array(np.zeros((1, D), np.float32))
    idx = mx.array(np.arange(k, dtype=np.uint32)[None])
    rw = mx.array(np.ones((1, k), np.float32))
    base = [x, idx, rw, *leaves(w1), *leaves(w3), *leaves(w2)]

    mid = kernels.moe_gate_up_ops(x, w1, w3, gate_fmt, idx, 10.0)
    y_ops = kernels.moe_down_ops(mid, w2, down_fmt, idx, rw)
    ops_dispatch = count([y_ops], base)

    with on_metal() as recorder:
        mid = kernels.moe_gate_up(x, w1, w3, gate_fmt, idx, 10.0)
        y_metal = kernels.moe_down(mid, w2, down_fmt, idx, rw)
    metal_dispatch = len(recorder.launches) + count([y_metal, *recorder.inputs], base)

    packed = k * (2 * expert_bytes(gate_fmt, F, D) + expert_bytes(down_fmt, D, F))
    # the GGUF twins dequantize the selected experts; mxfp4's twin is gather_qmm on packed bytes
    dequant = 0 if gate_fmt == "MXFP4" else k * 3 * F * D * 4
    return {"packed": packed, "ops_bytes": packed + 2 * dequant, "metal": metal_dispatch,
            "ops": ops_dispatch}


def hc_pre() -> tuple[int, int]:
    h = mx.array(np.zeros((1, HC, D), np.float32))
    mix = 2 * HC + HC * HC
    fn = mx.array(np.zeros((mix, HC * D), np.float32))
    base_ = mx.array(np.zeros(mix, np.float32))
    scale = mx.array(np.ones(3, np.float32))
    ops = hyper.hc_pre(h, fn, base_, scale, iters=20, eps=1e-6, norm_eps=1e-6)
    ops_dispatch = count(list(ops), [h, fn, base_, scale])
    with on_metal() as recorder:
        out = kernels.hc_pre(h, fn, base_, scale, iters=20, eps=1e-6, norm_eps=1e-6)
    metal_dispatch = len(recorder.launches) + count([*out, *recorder.inputs], [h, fn, base_, scale])
    return metal_dispatch, ops_dispatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[6, 4], help="experts per token")
    args = parser.parse_args()
    mib = 2**20
    print(f"Routed experts of one Flash-shaped MoE layer (D={D}, F={F}, {E} experts), "
          "one decode token:")
    print(f"{'experts':36} {'k':>2} {'weight MiB read':>16} {'ops: + f32 copies':>18} "
          f"{'dispatches metal':>17} {'ops':>5}")
    for name, (gate_fmt, down_fmt) in RECIPES.items():
        for k in args.k:
            r = moe_layer(gate_fmt, down_fmt, k)
            print(f"{name:36} {k:>2} {r['packed'] / mib:>16.1f} {r['ops_bytes'] / mib:>18.1f} "
                  f"{r['metal']:>17} {r['ops']:>5}")
    metal_hc, ops_hc = hc_pre()
    print(f"\nHC pre (4 streams of {D}, 20 Sinkhorn rounds), one token: "
          f"{metal_hc} dispatch(es) on the Metal path, {ops_hc} on the ops path; "
          f"x {2 * LAYERS} calls per token = {2 * LAYERS * metal_hc} vs {2 * LAYERS * ops_hc}.")


if __name__ == "__main__":
    main()

"""model/merged.py: projections of one input in as few matmuls as their formats allow, counted
on the GPU's graph (``ops.on_cpu`` off: no CPU copies), the outputs against each module alone."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from kernel_paths import graph_primitives

from ds4mlx import ops
from ds4mlx.layers import apply_formats
from ds4mlx.model.merged import MergedLinear
from ds4mlx.quant.formats import FLOAT, MXFP8, WeightFormat, affine


def _modules(formats: list[WeightFormat], in_dim: int = 128, rows=(64, 32, 16)) -> list[nn.Module]:
    """Projections of ``in_dim`` inputs in ``formats`` (random weights, quantized as stored)."""
    rng = np.random.default_rng(0)
    out = []
    for fmt, r in zip(formats, rows):
        w = mx.array(rng.standard_normal((r, in_dim), dtype=np.float32) / np.sqrt(in_dim))
        lin = nn.Linear(in_dim, r, bias=False)
        lin.weight = w
        if fmt.kind != "float":
            leaves = mx.quantize(w, group_size=fmt.group_size, bits=fmt.bits, mode=fmt.kind)
            lin = apply_formats({"m": lin}, {"m": fmt})["m"]
            for k, v in zip(("weight", "scales", "biases"), leaves):
                lin[k] = v
        mx.eval(lin.parameters())
        out.append(lin)
    return out


@pytest.mark.parametrize("qfmt", [MXFP8, affine(8, 32)])
def test_a_run_of_like_projections_shares_one_matmul(qfmt, monkeypatch):
    """A file's x -> wq_a | wkv | indexer weights: the two quantized ones in one product, the
    float one apart; a prefix of the parts reads only the run's."""
    mods = _modules([qfmt, qfmt, FLOAT])
    x = mx.random.normal((1, 1, 128), key=mx.random.key(1))
    alone = [np.asarray(m(x)) for m in mods]
    merged = MergedLinear(mods)
    assert not merged.merged and [(a, b) for a, b, _ in merged.runs] == [(0, 2)]
    monkeypatch.setattr(ops, "on_cpu", lambda: False)
    for parts, launches in ((1, ["QuantizedMatmul"]), (2, ["QuantizedMatmul"]),
                            (3, ["Matmul", "QuantizedMatmul"])):
        outs = merged(x, parts=parts)
        assert sorted(graph_primitives(*outs)) == launches, parts
        for got, ref in zip(outs, alone[:parts], strict=True):
            np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
    # the run's modules read views of its merged weight; a reload makes the merge stale
    assert merged.current()
    mods[1].weight = mx.array(mods[1].weight)
    assert not merged.current()


def test_unlike_neighbours_do_not_merge():
    mods = _modules([MXFP8, FLOAT, MXFP8])
    merged = MergedLinear(mods)
    assert not merged.merged and merged.runs == []
    x = mx.random.normal((1, 1, 128), key=mx.random.key(2))
    for got, m in zip(merged(x), mods, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(m(x)), rtol=1e-6)

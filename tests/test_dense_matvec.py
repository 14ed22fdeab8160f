"""A decoded token's dense projections in one launch of ``gguf_matvec`` (kernels/matvec.py
``dense_matvec``): MLX affine 8-bit / mxfp8 and float rows, two unlike parts, the grouped form,
written in the activation dtype; against the ops twin and numpy, and wired into the model (a
tiny ds4-q4 GGUF and a tiny official checkpoint decode with it, logits as on the ops path)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from ds4mlx import kernels
from ds4mlx.kernels import emu as kernel_emu
from kernel_paths import graph_primitives, path, record_launches  # noqa: F401 (path: fixture)
from test_moe_shared_fold import mlx_part, numpy_rows, tiny_gguf  # noqa: F401 (fixture)

K = 96  # three 32-wide pieces


def float_part(dtype: mx.Dtype, rows: int, seed: int) -> kernels.SharedWeight:
    w = np.random.default_rng(seed).standard_normal((rows, K)).astype(np.float32) * 0.05
    return kernels.SharedWeight(mx.array(w).astype(dtype), str(dtype).rsplit(".", 1)[-1])


def part_for(recipe: str, rows: int, seed: int) -> kernels.SharedWeight:
    if recipe in ("float32", "float16", "bfloat16"):
        return float_part(getattr(mx, recipe), rows, seed)
    return mlx_part(recipe, rows, K, seed)


def numpy_part(part: kernels.SharedWeight) -> np.ndarray:
    if part.scales is None:
        return np.asarray(part.weight.astype(mx.float32))
    return numpy_rows(part)


def _check(x: mx.array, w: kernels.DenseWeights, ref: np.ndarray, monkeypatch) -> None:
    launches = record_launches(monkeypatch)
    assert kernels.dense_matvec_serves(x, w)
    got = kernels.dense_matvec(x, w)
    twin = kernels.dense_matvec_ops(x, w)
    mx.eval(got, twin)
    assert launches == ["gguf_matvec"]
    assert got.dtype == x.dtype and got.shape == twin.shape == ref.shape
    g, t = np.asarray(got.astype(mx.float32)), np.asarray(twin.astype(mx.float32))
    tol = 1e-5 if x.dtype == mx.float32 else 1e-2  # one rounding of the output (bf16: 2^-8)
    scale = np.abs(ref).max()
    assert np.abs(g - t).max() <= tol * scale
    assert np.abs(g - ref).max() <= max(tol, 1e-5) * scale * (1 if x.dtype == mx.float32 else 2)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("recipe", ["affine8-f16-q8", "affine8-f32-any", "affine8-bf16-any",
                                    "mxfp8", "float16", "bfloat16", "float32"])
@pytest.mark.parametrize("n", [1, 8])
def test_one_part_in_each_layout(path, recipe, dtype, n, monkeypatch):
    part = part_for(recipe, 20, 1)
    x = mx.array(np.random.default_rng(2).standard_normal((n, K)).astype(np.float32)).astype(dtype)
    ref = np.asarray(x.astype(mx.float32)) @ numpy_part(part).T
    _check(x, kernels.DenseWeights([part]), ref, monkeypatch)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("first,second", [("affine8-f16-q8", "float16"),
                                          ("affine8-f16-q8", "bfloat16"),
                                          ("mxfp8", "bfloat16"), ("float32", "affine8-f32-any")])
def test_two_unlike_parts_in_one_launch(path, first, second, dtype, monkeypatch):
    a, b = part_for(first, 24, 3), part_for(second, 13, 4)  # second part: rows off the tile
    x = mx.array(np.random.default_rng(5).standard_normal((3, K)).astype(np.float32)).astype(dtype)
    xf = np.asarray(x.astype(mx.float32))
    ref = np.concatenate([xf @ numpy_part(a).T, xf @ numpy_part(b).T], axis=-1)
    _check(x, kernels.DenseWeights([a, b]), ref, monkeypatch)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("recipe", ["affine8-f16-q8", "mxfp8"])
def test_grouped_rows_read_their_group(path, recipe, dtype, monkeypatch):
    groups, r = 3, 8
    part = part_for(recipe, groups * r, 6)
    x = np.random.default_rng(7).standard_normal((2, groups, K)).astype(np.float32)
    x = mx.array(x).astype(dtype)
    w = numpy_part(part).reshape(groups, r, K)
    ref = np.einsum("ngk,grk->ngr", np.asarray(x.astype(mx.float32)), w)
    _check(x, kernels.DenseWeights([part], groups), ref, monkeypatch)


def test_what_the_kernel_does_not_take_is_declined(path):
    x = mx.zeros((1, K))
    a, b = part_for("affine8-f16-q8", 22, 1), part_for("float32", 8, 2)
    assert not kernels.dense_matvec_serves(x, kernels.DenseWeights([a, b]))  # 22 rows: not 4k
    assert not kernels.dense_matvec_serves(x, kernels.DenseWeights([b, b, b]))  # three parts
    assert not kernels.dense_matvec_serves(mx.zeros((9, K)), kernels.DenseWeights([b]))  # 9 rows
    assert not kernels.dense_matvec_serves(mx.zeros((1, 2, K)), kernels.DenseWeights([a], 2))
    with pytest.raises(kernels.KernelInputError, match="multiples of 4"):
        kernels.matvec.gguf_matvec(x, *kernels.DenseWeights([a, b]).packed)


def test_quantized_linear_goes_to_the_kernel_only_where_mlx_would_cast(path, monkeypatch):
    """Affine 8-bit g32 with float16 scales under float32 / bfloat16 x: the kernel (no AsType
    left in the graph); under float16 x, and mxfp8: MLX's product (one launch already)."""
    from ds4mlx.layers import QuantizedLinear, apply_formats
    from ds4mlx.quant.formats import WeightFormat

    part = mlx_part("affine8-f16-q8", 16, K, 8)
    lin = apply_formats({"p": nn.Linear(K, 16, bias=False)},
                        {"p": WeightFormat("affine", group_size=32, bits=8)})["p"]
    assert isinstance(lin, QuantizedLinear)
    lin.weight, lin.scales, lin.biases = part.weight, part.scales, part.biases
    for dtype, kernel in ((mx.float32, True), (mx.bfloat16, True), (mx.float16, False)):
        launches = record_launches(monkeypatch)
        x = mx.ones((1, 1, K), dtype=dtype)
        y = lin(x)
        assert y.dtype == dtype and y.shape == (1, 1, 16)
        assert (launches == ["gguf_matvec"]) == kernel
        if kernel:  # no cast of x, scales or biases: the kernel reads them as held
            assert "AsType" not in graph_primitives(y)
        mx.eval(y)
        ref = np.ones((1, K), np.float32) @ numpy_rows(part).T
        tol = 1e-5 if dtype == mx.float32 else 1e-2
        assert np.abs(np.asarray(y.astype(mx.float32))[0] - ref).max() <= tol * np.abs(ref).max()


# ----------------------------------------------------------------------------- whole models
PREFILL = 24  # past the tiny config's index_topk (4) compressed rows: ratio-4 layers index


def _decode_run(model, tokens: mx.array, backend: str) -> tuple[np.ndarray, list[str]]:
    """Logits of a prefill of PREFILL tokens and 1-token steps, with the steps' launches."""
    kernels.set_backend(backend)
    try:
        cache = model.make_cache()
        outs = [model(tokens[:, :PREFILL], cache=cache)]
        mx.eval(outs)
        with pytest.MonkeyPatch.context() as mp:
            launches = record_launches(mp)
            for i in range(PREFILL, tokens.shape[1]):
                outs.append(model(tokens[:, i:i + 1], cache=cache))
                mx.eval(outs[-1])
    finally:
        kernels.set_backend()
    return np.concatenate([np.asarray(o) for o in outs], axis=1), launches


def _check_decode(model, dtype, per_step: int) -> None:
    """The decode steps' launches, and their logits: float32 as on the ops path; bfloat16 as
    the emulated path with dense_matvec switched off (MLX's products: the kernels' other
    differences from the ops path compound in bfloat16 over the layers, a few % of the
    logits, with or without this kernel)."""
    tokens = mx.array(np.random.default_rng(6).integers(2, 1000, (1, PREFILL + 3)))
    got, launches = _decode_run(model, tokens, "emulate")
    steps = tokens.shape[1] - PREFILL
    assert launches.count("gguf_matvec") == per_step * steps
    if dtype == mx.float32:
        ref, _ = _decode_run(model, tokens, "ops")
        tol = 1e-5
    else:
        kernels.disable(kernels.DENSE_MATVEC, "the reference")
        try:
            ref, others = _decode_run(model, tokens, "emulate")
        finally:
            kernels.enable(kernels.DENSE_MATVEC)
        assert "gguf_matvec" not in others
        tol = 2e-2
    got, ref = got[:, PREFILL:], ref[:, PREFILL:]
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    if dtype == mx.float32:
        assert np.array_equal(got.argmax(-1), ref.argmax(-1))


def _products(model) -> int:
    """gguf_matvec launches a decode step should make (every ratio-4 layer indexing): per layer
    the attention's input product ([wq_a | wkv], with the indexer's weights_proj beside it at
    ratio 4), its q product ([wq_b | indexer.wq_b]), grouped wo_a and wo_b, each where it is
    affine (scales not in x's dtype: float16 from a GGUF's Q8_0) or of two unlike parts; the
    head likewise."""
    from ds4mlx.layers import QuantizedLinear

    def affine(m) -> bool:
        return isinstance(m, QuantizedLinear) and m.mode == "affine"

    n = 0
    for blk in model.layers:
        a = blk.attn
        idx = getattr(a, "indexer", None)
        for mains, extra in (([a.wq_a, a.wkv], idx and idx.weights_proj), ([a.wq_b], idx and idx.wq_b)):
            unlike = extra is not None and type(extra) is not type(mains[0])
            n += int(affine(mains[0]) or unlike)
        n += int(affine(a.wo_a)) + int(affine(a.wo_b))
    return n + int(affine(model.head))


@pytest.mark.skipif(kernel_emu.compiler() is None, reason="no C++ compiler for the emulator")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_ds4_gguf_decodes_its_q8_0_projections_in_the_kernel(tiny_gguf, dtype):
    from ds4mlx.loader import load_gguf

    model, _ = load_gguf(tiny_gguf, dtype=dtype, qat_rounding=False)
    per_step = _products(model)
    assert per_step >= 4 * len(model.layers) + 1  # every attention projection and the head
    _check_decode(model, dtype, per_step)


@pytest.mark.skipif(kernel_emu.compiler() is None, reason="no C++ compiler for the emulator")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_official_checkpoint_decodes_unlike_merges_in_the_kernel(tiny_ckpt, dtype):
    import ds4mlx

    model, _ = ds4mlx.load(tiny_ckpt, qat_rounding=False, dtype=dtype)
    _check_decode(model, dtype, _products(model))

"""scripts/decode_profile.py: the layers it builds are in the formats real files load into, and
its report keeps its keys and bounds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from ds4mlx.io.hf import read_config

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def profile_module():
    spec = importlib.util.spec_from_file_location("decode_profile", SCRIPTS / "decode_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _held_format(m: nn.Module) -> tuple:
    """How a loaded model holds a projection: (mode, bits, group size) or 'float'."""
    if isinstance(m, nn.QuantizedLinear):
        return (m.mode, m.bits, m.group_size)
    assert type(m) is nn.Linear, type(m)
    return "float"


def _tag(fmt) -> tuple | str:
    return "float" if fmt.kind == "float" else (fmt.kind, fmt.bits, fmt.group_size)


@pytest.mark.parametrize("source,recipes", [("official", ["mxfp4"]), ("gguf", ["q4", "q2"])])
def test_file_formats_are_what_the_loader_makes_of_real_files(seams_sources, source, recipes):
    """The seams checkpoint (layers of ratio 0, 4, 128) as an official directory and as a
    ds4-q4 GGUF, loaded by ds4mlx: every dense projection of every layer is held as
    ``file_formats`` says (q2 files share q4's dense types: names.DS4_GGUF_TYPES), and the
    head as ``head_format`` says."""
    from ds4mlx import loader

    prof = profile_module()
    path = seams_sources[source]
    hf = read_config(seams_sources["official"])
    if source == "gguf":
        model, _ = loader.load_gguf(path, dtype=mx.float32)
    else:
        model = loader.load_dir(path, dtype=mx.float32)
    for recipe in recipes:
        for i, blk in enumerate(model.layers):
            want = {p: _tag(f) for p, f in prof.file_formats(hf, i, recipe).items()}
            held = {p: _held_format(m) for p, m in blk.named_modules()
                    if isinstance(m, nn.Linear | nn.QuantizedLinear) and ".experts." not in p
                    and not p.startswith("ffn.gate")}
            assert {p: held[p] for p in want} == want, (recipe, i)
            assert all(f == "float" for p, f in held.items() if p not in want), (recipe, i, held)
        assert _held_format(model.head) == _tag(prof.head_format(recipe))


@pytest.mark.slow
@pytest.mark.xdist_group("flash_width")  # Flash-width layers: with the others (test_fused_decode)
def test_build_layer_holds_the_file_formats():
    """A Flash-width layer as the profile builds it: each dense projection in its file format
    (GGUF: affine 8-bit with float16 scales and biases; official: mxfp8), or all float with
    ``dense='bf16'``; built at a small expert count."""
    prof = profile_module()
    hf = prof.flash_hf(2, 1)
    config = prof.flash_config(2, 1)
    for recipe, mode in (("q4", "affine"), ("mxfp4", "mxfp8")):
        blk = prof.build_layer(config, 0, recipe, mx.bfloat16, seed=0, hf=hf)
        for p in prof.file_formats(hf, 0, recipe):
            m = prof._module(blk, p)
            assert isinstance(m, nn.QuantizedLinear) and m.mode == mode, (recipe, p)
            if mode == "affine":
                assert m.scales.dtype == m.biases.dtype == mx.float16
                assert mx.array_equal(m.biases, m.scales * -128).item()
        # no casts: affine (float16 scales under bfloat16) goes to the decode kernel, which
        # reads them as held; mxfp8's E8M0 scales are never cast
        assert prof.decode_kernel_takes(blk.attn.wq_b.mode, 8, 32, blk.attn.wq_b.scales.dtype,
                                        mx.bfloat16) == (mode == "affine")
        assert prof.scale_cast_bytes(blk.attn.wq_b, mx.bfloat16) == 0
    blk = prof.build_layer(config, 0, "q4", mx.bfloat16, seed=0, dense="bf16")
    assert type(blk.attn.wq_b) is nn.Linear and blk.attn.wq_b.weight.dtype == mx.bfloat16


def _report(argv: list[str], capsys) -> dict:
    prof = profile_module()
    old = sys.argv
    sys.argv = ["decode_profile.py", *argv]
    try:
        prof.main()
    finally:
        sys.argv = old
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


KEYS = {"launches_per_layer_max", "launches_per_layer_max_at", "launches_per_layer_max_by_format",
        "launches_per_layer_max_before",
        "ops_launches_per_layer_max", "bytes_over_min_2k", "bytes_over_min_32k",
        "bytes_128k_over_2k", "tokens_per_s_m3_ultra", "tokens_per_s_m3_max",
        "tokens_per_s_m3_ultra_before", "launch_us", "dense", "gb_per_token"}


@pytest.mark.slow
@pytest.mark.xdist_group("flash_width")  # Flash-width layers: with the others (test_fused_decode)
@pytest.mark.parametrize("fmt", ["mxfp4", "q2"])
def test_report_keys_and_launch_bounds(fmt, capsys):
    """Every layer kind at 32k, Metal path counted (no ops path, no timing), dense projections
    as real files load them: at most 12 launches a layer (issue 11's target), no scale casts,
    bytes within 10 % of the minimum. Official (mxfp4: mxfp8 dense, the shared expert folded
    into the MoE kernels, the indexer's BF16 head weights in wq_a | wkv's launch) and ds4 GGUF
    (q2: Q8_0 dense as affine 8-bit with float16 scales, read by the decode kernel as held).
    One format per test."""
    r = _report(["--formats", fmt, "--contexts", "32768", "--no-ops", "--no-time"], capsys)
    assert set(r) == KEYS and r["dense"] == "file"
    assert r["launches_per_layer_max_by_format"] == {fmt: r["launches_per_layer_max"]}
    assert r["launches_per_layer_max"] <= 12, r
    assert r["gb_per_token"][fmt]["scale_casts"] == 0
    assert r["bytes_over_min_32k"] <= 1.1, r

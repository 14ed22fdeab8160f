"""``ds4mlx selftest``: every kernel variant a model would dispatch, against its ops twin, here.

The variants come from the checkpoint's headers alone (``info.read_tensors``, no weights read):
the layout of the routed experts and of any dense projection kept as GGUF blocks, at the
activation dtype of this machine (``loader.default_dtype``), and the fused kernels every
DeepSeek V4 model dispatches at its config's dims (``hc_pre``, decode ``attention``,
``rope_rows`` at each row width, the ``indexer`` where a layer compresses by 4, the ``router``
where a layer is not hash-routed). Each runs the
cases of :mod:`ds4mlx.kernels.check` (the same ones the first-use check runs) on the Metal GPU,
or under the CPU emulator where there is none. Passes are recorded, so the first-use check of
later runs skips them. A ``grid_sync`` probe that does not compile (macOS 14: no Metal 3.2) is
reported as not available, not as a failure: the kernels keep their one-threadgroup forms; one
that compiles and disagrees fails.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

import mlx.core as mx

from . import kernels
from .kernels import check
from .kernels.source import HC_CHUNK
from .model.rope import rows_ops

# Official and MLX-directory labels of MLX mxfp4 experts (info.py); GGUF MXFP4 loads as such too.
_MX_PAIR_LABELS = ("FP4 E2M1, E8M0 /32", "mxfp4 (E2M1, E8M0 /32)", "MXFP4")
# GGUF types that stay native blocks once loaded (Q8_0 becomes MLX affine 8-bit: io/gguf.py).
_NATIVE_GGUF = tuple(f for f in kernels.KERNEL_FORMATS if f not in ("Q8_0", "MXFP4"))
# Tensors the loader never keeps as projections: dequantized or float when quantized.
_NOT_PROJECTIONS = ("embedding", "router", "hyper-connections", "norms", "MTP block")
# Where the grid-synchronised probe does not compile: what it needs, and what serves instead.
GRID_NEEDS = ("the multi-threadgroup forms need macOS 15 (Metal 3.2's atomic_thread_fence); "
              "the kernels keep their one-threadgroup forms")


def model_specs(source: str) -> list[check.Spec]:
    """The variants ``source`` dispatches on this machine (routed experts, GGUF dense, the
    fused kernels)."""
    from .info import checked_config, read_tensors, resolve_model
    from .loader import default_dtype

    path = resolve_model(source)
    config_dict, tensors, fmt = read_tensors(path)
    config = checked_config(config_dict, path, fmt)
    variants: list[str] = []
    for t in tensors:
        if t.kind in _NOT_PROJECTIONS:
            continue
        if t.kind == "routed experts" and t.fmt in _MX_PAIR_LABELS:
            name = check.MLX_PAIR
        elif t.fmt in _NATIVE_GGUF:
            name = t.fmt
        else:
            continue
        if name not in variants:
            variants.append(name)
    dims = dict(experts_per_token=config.num_experts_per_tok, n_experts=config.n_routed_experts,
                hc_mult=config.hc_mult)
    dtype = default_dtype()
    specs = [check.Spec(v, dtype, **dims) for v in variants]
    fused = _fused_specs(config, dtype, dims)
    # shared_down serves a dense (unquantized) shared-expert down projection only
    dense = {"bfloat16", "float16", "float32", "bf16", "f16", "f32"}
    if any(t.name.endswith("shared_experts.w2.weight") and str(t.fmt).lower() in dense
           for t in tensors):
        fused.append(check.Spec(kernels.SHARED_DOWN, dtype))
    if _dense_matvec_asked(config, tensors, dtype):
        fused.append(check.Spec(kernels.DENSE_MATVEC, dtype))
    return specs + fused


def _dense_matvec_asked(config, tensors, dtype: mx.Dtype) -> bool:
    """Whether decode products go to ``dense_matvec`` (layers.decode_kernel_takes, model/merged.py):
    a dense projection in affine 8 bits (GGUF Q8_0: float16 scales) under another activation
    dtype, or a ratio-4 layer whose projections of one input mix formats (an official file's
    FP8 attention beside the indexer's BF16 head weights)."""
    dense = [t for t in tensors if t.kind not in _NOT_PROJECTIONS and t.kind != "routed experts"]
    affine = any(t.fmt == "Q8_0" or str(t.fmt).startswith("affine 8-bit /32") for t in dense)
    indexed = any(config.ratio(i) == 4 for i in range(config.num_hidden_layers))
    return (affine and dtype != mx.float16) or (indexed and len({t.fmt for t in dense}) > 1)


def _fused_specs(config, dtype: mx.Dtype, dims: dict) -> list[check.Spec]:
    """The fused kernels' variants, with the dims each entry point asks its check with."""
    main = range(config.num_hidden_layers)
    indexed = any(config.ratio(i) == 4 for i in main)
    spec = check.Spec
    rd = config.qk_rope_head_dim
    out = [spec(kernels.HC_PRE, mx.float32, **dims),  # HC streams are float32
           spec(kernels.ATTENTION, dtype, head_dim=config.head_dim),  # KV rows in dtype
           spec(kernels.ATTENTION, dtype, head_dim=config.head_dim, rope_dims=rd),  # q RoPE in
           spec(kernels.ROPE_ROWS, dtype, head_dim=config.head_dim, rope_dims=rd,
                q_rank=config.q_lora_rank)]  # kv rows with the q_norm
    widths = [config.head_dim] + ([config.index_head_dim] if indexed else [])
    out += [spec(kernels.ROPE_ROWS, dtype, head_dim=w, rope_dims=rd)
            for w in dict.fromkeys(widths)]
    if indexed:
        out += [spec(kernels.INDEXER, dtype, index_heads=config.index_n_heads,
                     index_head_dim=config.index_head_dim),
                spec(kernels.INDEXER, mx.float32, index_topk=config.index_topk),
                spec(kernels.INDEXER, dtype, index_head_dim=config.index_head_dim,
                     rope_dims=rd),  # the queries (kernel index_q)
                spec(kernels.INDEXER, dtype, index_heads=config.index_n_heads,
                     index_head_dim=config.index_head_dim, rope_dims=rd)]  # both in one launch
    grid = config.hc_mult * config.hidden_size > HC_CHUNK  # hc_pre at decode asks for its grid form
    if indexed or grid:
        out.append(spec(kernels.GRID_SYNC))  # whether the grid forms may serve
    if grid:
        out.append(spec(kernels.HC_PRE, mx.float32, grid=1, **dims))
    if indexed:  # queries, scores and top-k in one launch (no cases without the grid form)
        out.append(spec(kernels.INDEXER, dtype, index_heads=config.index_n_heads,
                        index_head_dim=config.index_head_dim, index_topk=config.index_topk,
                        rope_dims=rd))
    if any(not config.is_hash_layer(i) for i in main) or config.num_nextn_predict_layers:
        out.append(spec(kernels.ROUTER, mx.float32, n_experts=config.n_routed_experts,
                        experts_per_token=config.num_experts_per_tok,
                        renormalize=int(config.norm_topk_prob)))
    return out


def kernel_backend() -> str:
    """The kernels to test: ``DS4MLX_KERNELS`` when it names metal or emulate, else the GPU
    when Metal is there, else the emulator."""
    wanted = os.environ.get("DS4MLX_KERNELS", "").strip().lower()
    if wanted in ("metal", "emulate"):
        return wanted
    return "metal" if mx.metal.is_available() else "emulate"


def run_selftest(source: str, out: TextIO | None = None) -> bool:
    """Check every variant of ``source``, print one row per kernel call; True when all pass."""
    out = sys.stdout if out is None else out
    specs = model_specs(source)
    backend = kernel_backend()
    if backend == "emulate":
        from .kernels import emu

        if emu.compiler() is None:
            raise OSError("no Metal GPU and no C++ compiler for the kernel emulator (install g++)")
    kernels.set_backend(backend)
    check.install_twin(kernels.ROPE_ROWS, rows_ops)  # as importing the model does
    where = "CPU emulator"
    if backend == "metal":
        where = f"Metal GPU ({mx.device_info().get('device_name', 'unknown')}, MLX {mx.__version__})"
    print(f"ds4mlx selftest: {source} on the {where} ({len(specs)} variants)", file=out)
    print(f"{'kernel':<26} {'format':<10} {'dtype':<9} {'inputs':<30} {'max rel err':>11} "
          f"{'time':>8}", file=out)
    start, failed, total, no_grid = time.perf_counter(), [], 0, False
    for spec in specs:
        if no_grid and spec.grid:  # its grid form cannot be built here either
            print(f"{spec.label()}: not checked, {kernels.GRID_SYNC} is not available", file=out)
            continue
        if spec.dims_text():
            print(f"{spec.label()}:", file=out)
        results = check.run_spec(spec)
        bad = [r for r in results if not r.ok]
        # the probe not compiling is a platform limit (no Metal 3.2), not a fault
        missing = spec.variant == kernels.GRID_SYNC and bad and all(r.compile_failed for r in bad)
        for r in results:
            err = f"{r.rel_error:.2e}" if r.error is None else "-"
            if r.ok:
                status = ""
            elif missing:
                status = f"  not available: {GRID_NEEDS} ({r.error})"
            else:
                status = "  FAIL " + (r.error or f"(tolerance {r.tolerance:g})")
            total += not missing
            print(f"{r.kernel:<26} {spec.variant:<10} {check.dtype_name(spec.dtype):<9} "
                  f"{r.inputs:<30} {err:>11} {r.seconds:>7.3f}s{status}", file=out, flush=True)
        if missing:
            no_grid = True
        else:
            failed += bad
        if not bad:
            check.record(spec, results)
    seconds = time.perf_counter() - start
    if failed:
        print(f"{len(failed)} of {total} kernel checks FAILED in {seconds:.1f} s; the first-use "
              "check would switch those variants off (the ops path serves them)", file=out)
        return False
    print(f"all {total} kernel checks passed in {seconds:.1f} s", file=out)
    if no_grid:
        print(f"{kernels.GRID_SYNC} is not available on this machine: {GRID_NEEDS}", file=out)
    return True

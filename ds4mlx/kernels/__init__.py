"""Metal kernels (``metal/*.metal`` through ``mx.fast.metal_kernel``), each beside its MLX-ops twin.

- :mod:`.dispatch`: which path serves a call (``metal``, ``ops`` or ``emulate``, from
  ``DS4MLX_KERNELS`` and the default device; variants switched off by hand or by the first-use
  check of :mod:`.check`) and the one launch site.
- :mod:`.source`: the Metal sources with the constants they share with Python defined in.
- :mod:`.moe`: dequantization and the routed-expert kernels.
- :mod:`.shared`: the shared expert as the decode MoE kernels take it (folded in).
- :mod:`.experts`: the call sites of the expert modules (which kernels serve a layer's experts).
- :mod:`.matvec`: products of one weight: the dense GGUF projection (``GGUFLinear``'s call
  site), a decoded token's dense projections in MLX modes / float rows (``dense_matvec``: one
  or two unlike parts, grouped) and ``shared_down``.
- :mod:`.hyper`: the fused hyper-connection pre.
- :mod:`.attention`: decode attention, the Lightning Indexer, RMS + RoPE + FP8 rows.
- :mod:`.router`: MoE router selection.
- :mod:`.grid`: the probe of the grid-synchronised (multi-threadgroup, one launch) form.
- :mod:`.emu`: the CPU emulator that runs the Metal sources on Linux.

This package is the one place that decides whether a kernel serves a call; the model's modules
call the entry points re-exported here.
"""

from __future__ import annotations

from .dispatch import (ATTENTION, BACKENDS, GRID_SYNC, HC_PRE, INDEXER, KERNEL_FORMATS,
                       NAMED_VARIANTS, ROPE_ROWS, ROUTER, SHARED_DOWN, DENSE_MATVEC, KernelInputError, backend,
                       disable, disabled, enable, enabled, serves, set_backend)
from .hyper import hc_pre, hc_pre_ops
from .matvec import (DenseWeights, dense_matvec, dense_matvec_ops, dense_matvec_serves, dense_path,
                     gguf_matmul,
                     matmul_ops, shared_down, shared_down_ops, shared_down_serves)
from .router import Route
from .moe import (Packed, QuantWeight, dequantize, dequantize_ops, gather_qmm_native,
                  gather_qmm_native_ops, moe_down, moe_down_ops, moe_gate_up, moe_gate_up_ops,
                  moe_gate_up_routed, moe_gate_up_routed_ops, switch_matmul_ops, unpack_weight,
                  variant_name)
from .shared import Shared, SharedWeight
from .experts import gguf_switch_matmul, moe_experts, moe_experts_shared
from . import check  # installs the first-use check in dispatch

__all__ = [
    "check",
    "ATTENTION", "BACKENDS", "GRID_SYNC", "HC_PRE", "INDEXER", "KERNEL_FORMATS", "NAMED_VARIANTS",
    "ROPE_ROWS",
    "ROUTER", "SHARED_DOWN", "DENSE_MATVEC", "DenseWeights", "dense_matvec", "dense_matvec_ops",
    "dense_matvec_serves", "dense_path", "KernelInputError", "Packed", "QuantWeight", "Shared", "SharedWeight", "backend", "dequantize",
    "dequantize_ops", "disable", "disabled", "enable", "enabled", "gather_qmm_native",
    "gather_qmm_native_ops", "gguf_matmul", "gguf_switch_matmul", "hc_pre", "hc_pre_ops",
    "matmul_ops", "moe_down", "moe_down_ops", "moe_experts", "moe_experts_shared", "moe_gate_up", "moe_gate_up_ops",
    "moe_gate_up_routed", "moe_gate_up_routed_ops", "Route",
    "serves", "set_backend", "shared_down", "shared_down_ops", "shared_down_serves",
    "switch_matmul_ops", "unpack_weight", "variant_name",
]

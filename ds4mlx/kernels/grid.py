"""The probe of the grid-synchronised form (``metal/grid.metal``, pattern in ``metal/grid.h``)
beside its twin: :func:`grid_sum`, row sums by several threadgroups of one launch, the last one
to finish adding the chunks' sums in chunk order. The check of the ``GRID_SYNC`` variant runs it
(kernels/check_cases.py), so a Mac without Metal 3.2 (no ``atomic_thread_fence``) sends every
kernel to its one-threadgroup form (:func:`ds4mlx.kernels.dispatch.grid_sync`).
"""

from __future__ import annotations

import mlx.core as mx

from . import dispatch
from .dispatch import KernelInputError

GRID_CHUNK = 64  # elements per threadgroup of the probe: a few threadgroups per row at check sizes


def grid_sum_ops(x: mx.array) -> mx.array:
    """Twin of :func:`grid_sum`: the row sums in float32."""
    return mx.sum(x.astype(mx.float32), axis=-1)


def grid_sum(x: mx.array) -> mx.array:
    """Row sums of ``x [N, K]`` float32 -> ``[N]``, as the kernel computes them (the ops twin
    on the ops backend). The caller decides whether the form may serve (``grid_sync``)."""
    if x.ndim != 2 or x.dtype != mx.float32:
        raise KernelInputError(f"grid_sum: x must be [N, K] float32, got {x.dtype} "
                               f"{tuple(x.shape)}")
    if dispatch.backend() == "ops":
        return grid_sum_ops(x)
    n, k = x.shape
    groups = dispatch.ceil_div(k, GRID_CHUNK)
    out, _ = dispatch.run("grid.metal", "grid_sum",
                          {"x": x, "counter": dispatch.counter("grid_sum", n)},
                          {"out": ((n,), mx.float32), "part": ((n, groups), mx.uint32)},
                          grid=(32 * groups, n, 1), threadgroup=(32, 1, 1),
                          template=[("K", k), ("CHUNK", GRID_CHUNK)])
    return out

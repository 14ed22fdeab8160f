"""The kernel paths a kernel test runs on: the CPU emulator here, Metal on a Mac (``-m mac``)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from ds4mlx import kernels
from ds4mlx.kernels import emu as kernel_emu

PATHS = [
    pytest.param("emulate", marks=pytest.mark.skipif(kernel_emu.compiler() is None,
                                                     reason="no C++ compiler for the emulator")),
    pytest.param("metal", marks=[pytest.mark.mac, pytest.mark.skipif(
        not mx.metal.is_available(), reason="needs a Metal GPU")]),
]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("DS4MLX_KERNELS", request.param)
    kernels.set_backend()
    return request.param


def record_launches(monkeypatch) -> list[str]:
    """The names of the kernels launched from now on (through the one launch site), in order;
    the launches still run."""
    names: list[str] = []
    run = kernels.dispatch.run

    def counted(*args, **kwargs):
        names.append(args[1])
        return run(*args, **kwargs)

    monkeypatch.setattr(kernels.dispatch, "run", counted)
    return names


# Primitives that run no kernel (views); what decode_profile.py leaves out of a launch count.
VIEWS = {"Broadcast", "Reshape", "Squeeze", "ExpandDims", "Transpose", "Slice", "AsStrided",
         "View", "StopGradient", "Depends", "Flatten", "Unflatten"}


def graph_primitives(*arrays: mx.array) -> list[str]:
    """The primitives that run a kernel in the lazy graph of ``arrays`` (evaluated arrays are
    leaves; views left out), one per node: the MLX launches evaluating them would make."""
    import os
    import re
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "g.dot")
        mx.export_to_dot(path, *arrays)
        with open(path) as f:
            prims = re.findall(r'\{ \d+ \[label ="([^"]+)"', f.read())
    return [p.split()[0] for p in prims if p.split()[0] not in VIEWS]

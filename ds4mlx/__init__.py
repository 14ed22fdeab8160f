"""ds4mlx: DeepSeek V4 Flash on Apple Silicon with MLX.

Importing the package stays light: heavy modules load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load": ("ds4mlx.loader", "load"),
    "ModelConfig": ("ds4mlx.config", "ModelConfig"),
    "encode_messages": ("ds4mlx.encoding", "encode_messages"),
    "parse_completion": ("ds4mlx.encoding", "parse_completion"),
    "save_prompt_cache": ("ds4mlx.prompt_cache", "save_prompt_cache"),
    "load_prompt_cache": ("ds4mlx.prompt_cache", "load_prompt_cache"),
}

# Eager, because the submodule ds4mlx.generate has the function's name: once anything imports
# the submodule, the package attribute would be the module and ds4mlx.generate(...) would fail.
# It only imports mlx.core/mlx.nn (a few ms).
from .generate import batch_generate, generate, stream_generate  # noqa: E402

__all__ = list(_LAZY) + ["batch_generate", "generate", "stream_generate"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ds4mlx' has no attribute {name!r}")

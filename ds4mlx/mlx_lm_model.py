"""DeepSeek V4 Flash as an mlx-lm model module, for MLX directories written by ``ds4mlx convert``.

mlx-lm's ``load_model`` imports the Python file a config names in ``"model_file"`` (only with
``trust_remote_code``) and takes its ``Model`` and ``ModelArgs``. A converted directory holds a
two-line ``ds4mlx_model.py`` that re-exports the classes below, so ``mlx_lm generate``,
``mlx_lm server`` and the apps built on ``mlx_lm.load`` run the directory with ds4mlx's model.

mlx-lm then does the rest as for its own models: it builds ``Model`` in float, ``sanitize``
casts the stored floats to the dtype each parameter has here (ds4mlx keeps some in float32) and
drops the MTP block (mlx-lm decodes without it), ``nn.quantize`` swaps in the packed modules the
config's ``"quantization"`` lists (the same ``QuantizedLinear`` / ``QuantizedSwitchLinear``
modes that ``ds4mlx.layers.apply_formats`` builds), and it loads the weights strictly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ModelConfig
from .mlx_lm_files import CHAT_TEMPLATE, CHAT_TEMPLATE_FILE, MODEL_FILE, MODEL_FILE_TEXT, write_model_file  # noqa: F401
from .model.transformer import Model as _DS4Model


@dataclass
class ModelArgs:
    """The whole config.json: ``ds4mlx.config.ModelConfig`` reads and checks it."""

    config: dict[str, Any]

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "ModelArgs":
        return cls(dict(params))


class Model(_DS4Model):
    """ds4mlx's model in mlx-lm's model protocol (``__call__(tokens, cache)``, ``make_cache``)."""

    def __init__(self, args: ModelArgs):
        from .loader import default_dtype

        config = ModelConfig.from_hf(args.config, source="config.json")
        super().__init__(replace(config, num_nextn_predict_layers=0), dtype=default_dtype())

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        params = dict(tree_flatten(self.parameters()))
        out = {}
        for path, array in weights.items():
            if path.startswith("mtp."):
                continue
            target = params.get(path)
            if target is not None and array.dtype != target.dtype and _kind(array) == _kind(target):
                array = array.astype(target.dtype)  # packed codes (ints where the float model has floats) stay
            if target is not None and path.endswith(".tid2eid") and array.shape[1] > target.shape[1]:
                array = array[:, : target.shape[1]]  # a wider hash table than the routed top-k
            out[path] = array
        return out


def _kind(array: mx.array) -> str:
    return "float" if mx.issubdtype(array.dtype, mx.floating) else "int"

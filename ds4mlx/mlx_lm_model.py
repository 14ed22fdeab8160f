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
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ModelConfig
from .encoding import ASSISTANT, EOS, REASONING_EFFORT_MAX, THINK_END, THINK_START, USER
from .model.transformer import Model as _DS4Model

MODEL_FILE = "ds4mlx_model.py"
MODEL_FILE_TEXT = '''"""mlx-lm entry point of this directory (config.json "model_file"): DeepSeek V4 Flash from the
installed ds4mlx package. Load with mlx_lm's --trust-remote-code / trust_remote_code=True."""

from ds4mlx.mlx_lm_model import Model, ModelArgs  # noqa: F401
'''


# DeepSeek V4 ships its chat format as Python (encoding_dsv4.py), not as a template, so mlx-lm
# would send bare text. This Jinja version covers plain conversations (system, user, assistant
# with reasoning_content; enable_thinking, reasoning_effort="max") exactly as
# ds4mlx.encoding renders them; tools and the other roles raise, pointing to ds4mlx's own server.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE = (
    "{%- set thinking = enable_thinking is not defined or enable_thinking -%}"
    "{%- if tools is defined and tools -%}"
    "{{ raise_exception('tool use needs ds4mlx (this template renders plain conversations)') }}"
    "{%- endif -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- if thinking and reasoning_effort is defined and reasoning_effort == 'max' -%}"
    "{{- " + repr(REASONING_EFFORT_MAX) + " -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{{- m.content or '' -}}"
    "{%- elif m.role == 'user' -%}{{- '" + USER + "' + (m.content or '') -}}"
    "{%- if (loop.last and add_generation_prompt) or (not loop.last and messages[loop.index0 + 1].role == 'assistant') -%}"
    "{{- '" + ASSISTANT + "' + ('" + THINK_START + "' if thinking and loop.index0 >= ns.last_user else '"
    + THINK_END + "') -}}"
    "{%- endif -%}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- if thinking and loop.index0 > ns.last_user -%}{{- (m.reasoning_content or '') + '" + THINK_END + "' -}}"
    "{%- endif -%}"
    "{{- (m.content or '') + '" + EOS + "' -}}"
    "{%- else -%}{{ raise_exception('role ' + m.role + ' needs ds4mlx (this template renders plain conversations)') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


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


def write_model_file(directory: str | Path) -> str:
    """Write ``ds4mlx_model.py`` and ``chat_template.jinja`` (which transformers' tokenizer, and so
    mlx-lm, picks up) into a converted directory; returns the ``"model_file"`` value."""
    (Path(directory) / MODEL_FILE).write_text(MODEL_FILE_TEXT)
    (Path(directory) / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE)
    return MODEL_FILE

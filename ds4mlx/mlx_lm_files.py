"""The files that make a converted MLX directory open in mlx-lm's tools: ``ds4mlx_model.py``
(config.json ``"model_file"``, re-exporting ``ds4mlx.mlx_lm_model``) and a Jinja chat template.

Kept apart from ``mlx_lm_model`` so a conversion writes them without importing the model (and
through it mlx-lm and transformers: seconds of start-up).
"""

from __future__ import annotations

from pathlib import Path

from .encoding import ASSISTANT, EOS, REASONING_EFFORT_MAX, THINK_END, THINK_START, USER

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


def write_model_file(directory: str | Path) -> str:
    """Write ``ds4mlx_model.py`` and ``chat_template.jinja`` (which transformers' tokenizer, and so
    mlx-lm, picks up) into a converted directory; returns the ``"model_file"`` value."""
    (Path(directory) / MODEL_FILE).write_text(MODEL_FILE_TEXT)
    (Path(directory) / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE)
    return MODEL_FILE

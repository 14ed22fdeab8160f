"""DeepSeek V4 chat encoding (messages -> prompt text) and completion parsing.

Follows the rules of DeepSeek's official ``encoding/encoding_dsv4.py`` so prompts are
byte-identical to what the hosted model sees: BOS, system text (+ tools as DSML), ``<｜User｜>``
turns, ``<｜Assistant｜>`` + ``<think>``/``</think>``, earlier reasoning dropped, tool results as
``<tool_result>`` blocks, and the "Max" reasoning-effort preamble. Messages use the OpenAI shape
(the official encoder's input), so scripts written for it carry over.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from typing import Any, Optional

# Special strings (each one token in the V4 vocabulary).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}
# The strings ds4 treats as atomic when tokenizing a rendered prompt.
PROTOCOL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML)

TOOL_CALLS_START = f"<{DSML}tool_calls>"
TOOL_CALLS_END = f"</{DSML}tool_calls>"
_INVOKE_END = f"</{DSML}invoke>"
_PARAM_END = f"</{DSML}parameter>"

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)
REASONING_EFFORTS = (None, "high", "max")  # "high" renders exactly like None
THINKING_MODES = ("thinking", "chat")

TOOLS_TEMPLATE = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

{{tool_schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""
RESPONSE_FORMAT_TEMPLATE = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"
)


class DSMLError(ValueError):
    """A completion's DSML tool-call block (or its framing) is malformed."""


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------- rendering pieces


def render_tools(tools: list[dict]) -> str:
    """The tools section appended to a system/developer message (OpenAI ``tools`` list)."""
    schemas = [_json(t["function"] if "function" in t else t) for t in tools]
    return TOOLS_TEMPLATE.replace("{tool_schemas}", "\n".join(schemas))


def _tool_arguments(call: dict) -> tuple[str, dict]:
    fn = call.get("function", call)
    name, raw = fn.get("name"), fn.get("arguments", "{}")
    if isinstance(raw, dict):  # tolerated: some clients send an object, not a JSON string
        return name, raw
    try:
        args = json.loads(raw)
    except (TypeError, ValueError):
        return name, {"arguments": raw}  # official fallback for non-JSON arguments
    if not isinstance(args, dict):
        raise ValueError(f"tool call {name!r}: arguments must be a JSON object, got {raw!r}")
    return name, args


def render_tool_calls(tool_calls: list[dict]) -> str:
    """The DSML block for OpenAI-style tool calls: strings raw, other values as JSON."""
    invokes = []
    for call in tool_calls:
        name, args = _tool_arguments(call)
        params = [
            f'<{DSML}parameter name="{key}" string="{"true" if isinstance(v, str) else "false"}">'
            f"{v if isinstance(v, str) else _json(v)}{_PARAM_END}"
            for key, v in args.items()
        ]
        invokes.append(f'<{DSML}invoke name="{name}">\n' + "\n".join(params) + f"\n{_INVOKE_END}")
    return f"{TOOL_CALLS_START}\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_END}"


def _text(content: Any) -> str:
    """Message content as text: a string, or OpenAI content parts joined like content blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif part.get("type") == "text":
                parts.append(part.get("text", ""))
            else:
                parts.append(f"[Unsupported {part.get('type')}]")
        return "\n\n".join(parts)
    raise ValueError(f"message content must be a string or a list of parts, got {type(content)}")


# ---------------------------------------------------------------------------- preprocessing


def _merge_tool_messages(messages: list[dict]) -> list[dict]:
    """Fold ``tool`` messages (and consecutive user messages) into user content blocks."""
    merged: list[dict] = []
    for msg in messages:
        msg = copy.deepcopy(msg)
        role = msg.get("role")
        prev = merged[-1] if merged else {}
        open_user = prev.get("role") == "user" and "content_blocks" in prev
        if role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": msg.get("tool_call_id", ""),
                "content": msg.get("content", ""),
            }
            if open_user:
                prev["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": _text(msg.get("content"))}
            if open_user and prev.get("task") is None:
                prev["content_blocks"].append(block)
            else:
                new = {"role": "user", "content": block["text"], "content_blocks": [block]}
                new.update({k: msg[k] for k in ("task", "wo_eos", "mask") if k in msg})
                merged.append(new)
        else:
            merged.append(msg)
    return merged


def _sort_tool_results(messages: list[dict]) -> list[dict]:
    """Reorder each user turn's tool results to the order of the preceding tool calls."""
    order: dict[str, int] = {}
    for msg in messages:
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            order = {}
            for i, call in enumerate(msg["tool_calls"]):
                call_id = call.get("id") or call.get("function", {}).get("id", "")
                if call_id:
                    order[call_id] = i
        elif msg.get("role") == "user" and msg.get("content_blocks"):
            results = [b for b in msg["content_blocks"] if b.get("type") == "tool_result"]
            if len(results) > 1 and order:
                ranked = iter(sorted(results, key=lambda b: order.get(b.get("tool_use_id", ""), 0)))
                msg["content_blocks"] = [
                    next(ranked) if b.get("type") == "tool_result" else b
                    for b in msg["content_blocks"]
                ]
    return messages


def _last_user_index(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") in ("user", "developer"):
            return i
    return -1


_KEPT_ROLES = ("user", "system", "tool", "latest_reminder", "direct_search_results")


def _drop_thinking(messages: list[dict]) -> list[dict]:
    """Before the last user turn: assistants lose their reasoning, developer messages go."""
    last_user = _last_user_index(messages)
    kept = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if i >= last_user or role in _KEPT_ROLES:
            kept.append(msg)
        elif role == "assistant":
            kept.append({k: v for k, v in msg.items() if k != "reasoning_content"})
    return kept


# ---------------------------------------------------------------------------- one message


def _render_user(msg: dict) -> str:
    blocks = msg.get("content_blocks")
    if not blocks:
        return USER + _text(msg.get("content"))
    parts = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            parts.append(_text(block.get("text")))
        elif kind == "tool_result":
            parts.append(f"<tool_result>{_text(block.get('content'))}</tool_result>")
        else:
            parts.append(f"[Unsupported {kind}]")
    return USER + "\n\n".join(parts)


def _with_extras(text: str, msg: dict) -> str:
    if msg.get("tools"):
        text += "\n\n" + render_tools(msg["tools"])
    if msg.get("response_format"):
        text += "\n\n" + RESPONSE_FORMAT_TEMPLATE.format(schema=_json(msg["response_format"]))
    return text


def _render_message(
    index: int, messages: list[dict], thinking: bool, drop_thinking: bool, effort: Optional[str]
) -> str:
    msg = messages[index]
    role = msg.get("role")
    last_user = _last_user_index(messages)
    out = REASONING_EFFORT_MAX if index == 0 and thinking and effort == "max" else ""

    if role == "system":
        out += _with_extras(_text(msg.get("content")), msg)
    elif role == "developer":
        if not msg.get("content"):
            raise ValueError(f"message {index}: a developer message needs content")
        out += _with_extras(USER + _text(msg["content"]), msg)
    elif role == "user":
        out += _render_user(msg)
    elif role == "latest_reminder":
        out += LATEST_REMINDER + _text(msg.get("content"))
    elif role == "assistant":
        tool_calls = msg.get("tool_calls")
        calls = "\n\n" + render_tool_calls(tool_calls) if tool_calls else ""
        reasoning = ""
        after_task = index > 0 and messages[index - 1].get("task") is not None
        if thinking and not after_task and (not drop_thinking or index > last_user):
            reasoning = _text(msg.get("reasoning_content")) + THINK_END
        out += reasoning + _text(msg.get("content")) + calls
        if not msg.get("wo_eos", False):
            out += EOS
    else:
        raise ValueError(f"message {index}: unknown role {role!r}")

    # The assistant prefix follows a user turn that ends the list or precedes the reply.
    if index + 1 < len(messages) and messages[index + 1].get("role") not in (
        "assistant",
        "latest_reminder",
    ):
        return out
    task = msg.get("task")
    if task is not None:
        if task not in TASK_TOKENS:
            raise ValueError(f"message {index}: unknown task {task!r}, one of {list(TASK_TOKENS)}")
        if task == "action":
            out += ASSISTANT + (THINK_START if thinking else THINK_END)
        out += TASK_TOKENS[task]
    elif role in ("user", "developer"):
        opens_thinking = thinking and (not drop_thinking or index >= last_user)
        out += ASSISTANT + (THINK_START if opens_thinking else THINK_END)
    return out


# ---------------------------------------------------------------------------- public API


def _attach_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Request-level ``tools`` go on the first system message (a new empty one if none)."""
    messages = list(messages)
    if messages and messages[0].get("role") == "system":
        messages[0] = {**messages[0], "tools": tools}
    else:
        messages.insert(0, {"role": "system", "content": "", "tools": tools})
    return messages


def encode_messages(
    messages: list[dict],
    thinking_mode: str = "thinking",
    reasoning_effort: Optional[str] = None,
    *,
    tools: Optional[list[dict]] = None,
    context: Optional[list[dict]] = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
) -> str:
    """Render OpenAI-style messages as the DeepSeek V4 prompt text.

    ``thinking_mode``: "thinking" (prompt ends with ``<think>``) or "chat" (``</think>``).
    ``reasoning_effort``: None, "high" (same prompt) or "max" (thinking mode: the Max preamble).
    ``tools``: OpenAI tool list for the request; attached to the first system message (tools
    may also sit on a system/developer message as ``"tools"``, as the official encoder takes them).
    ``context``: earlier messages already in the model's cache; only ``messages`` are rendered.
    Earlier reasoning is dropped (``drop_thinking``) unless some message carries tools.
    """
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(
            f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}"
        )
    if tools:
        messages = _attach_tools(messages, tools)
    context = context or []
    ctx = _merge_tool_messages(context)
    msgs = _merge_tool_messages(messages)
    full = _sort_tool_results(ctx + msgs)

    thinking = thinking_mode == "thinking"
    if any(m.get("tools") for m in full):
        drop_thinking = False  # tool use keeps every turn's reasoning
    if thinking and drop_thinking:
        full = _drop_thinking(full)
        start = len(_drop_thinking(ctx))
    else:
        start = len(ctx)

    prompt = BOS if add_default_bos_token and not context else ""
    for i in range(start, len(full)):
        prompt += _render_message(i, full, thinking, drop_thinking, reasoning_effort)
    return prompt


_INVOKE_OPEN = re.compile(rf'\s*<{DSML}invoke name="([^"\n]*)">')
_INVOKE_CLOSE = re.compile(rf"\s*{re.escape(_INVOKE_END)}")
_PARAM_OPEN = re.compile(rf'\s*<{DSML}parameter name="([^"\n]*)" string="(true|false)">')


def parse_tool_calls(block: str, *, strict: bool = False) -> list[dict]:
    """Parse the inside of a ``<｜DSML｜tool_calls>`` block: ``[{"name", "arguments": dict}]``.

    Read in order like the official parser, so a value may hold any text but its own closing
    tag. ``string="true"`` values are verbatim, others JSON; a non-JSON ``string="false"`` value
    is kept as a string unless ``strict``. Raises ``DSMLError`` on malformed markup.
    """
    calls, pos = [], 0
    while block[pos:].strip():
        invoke = _INVOKE_OPEN.match(block, pos)
        if not invoke:
            raise DSMLError(f"expected <{DSML}invoke name=...> at {block[pos:pos + 60]!r}")
        name, pos, args = invoke.group(1), invoke.end(), {}
        while not (close := _INVOKE_CLOSE.match(block, pos)):
            param = _PARAM_OPEN.match(block, pos)
            if not param:
                raise DSMLError(f"invoke {name!r}: expected a parameter at {block[pos:pos + 60]!r}")
            key, is_string = param.groups()
            end = block.find(_PARAM_END, param.end())
            if end < 0:
                raise DSMLError(f"invoke {name!r}: parameter {key!r} is not closed")
            value, pos = block[param.end() : end], end + len(_PARAM_END)
            if key in args:
                raise DSMLError(f"invoke {name!r}: duplicate parameter {key!r}")
            if is_string == "true":
                args[key] = value
                continue
            try:
                args[key] = json.loads(value)
            except ValueError:
                if strict:
                    raise DSMLError(f"invoke {name!r}: parameter {key!r} is not JSON: {value!r}")
                args[key] = value
        pos = close.end()
        calls.append({"name": name, "arguments": args})
    if not calls:
        raise DSMLError("tool_calls block without any invoke")
    return calls


def mlx_tool_parser(text: str, tools: Any = None) -> list[dict]:
    """mlx-lm tool-parser hook: the text between the tool-call markers -> calls (dict args)."""
    return parse_tool_calls(text)


def _openai_calls(calls: list[dict]) -> list[dict]:
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": c["name"], "arguments": _json(c["arguments"])},
        }
        for c in calls
    ]


def _split_tool_calls(text: str, strict: bool) -> tuple[str, list[dict]]:
    """Content and parsed tool calls; a malformed block stays in the content unless strict."""
    start = text.find(TOOL_CALLS_START)
    if start < 0:
        return text, []
    content = text[:start]
    try:
        if strict and not content.endswith("\n\n"):
            raise DSMLError("tool_calls block must follow a blank line")
        end = text.find(TOOL_CALLS_END, start)
        if end < 0:
            raise DSMLError("tool_calls block is not closed")
        calls = parse_tool_calls(text[start + len(TOOL_CALLS_START) : end], strict=strict)
        trailing = text[end + len(TOOL_CALLS_END) :].strip()
    except DSMLError:
        if strict:
            raise
        return text, []
    content = content.removesuffix("\n\n")
    if trailing:  # text after the block: an error for the official parser; kept here
        if strict:
            raise DSMLError(f"unexpected text after the tool calls: {trailing!r}")
        content = f"{content}\n\n{trailing}" if content else trailing
    return content, calls


def parse_completion(text: str, thinking_mode: str = "thinking", *, strict: bool = False) -> dict:
    """Parse generated text (after the prompt) into an assistant message.

    Returns ``{"role": "assistant", "reasoning_content", "content", "tool_calls"}`` with
    OpenAI-style tool calls (``arguments`` a JSON string). The text may end at the EOS string
    or without it. By default malformed output never raises: an unclosed reasoning becomes all
    reasoning, a malformed DSML block stays in ``content``. ``strict=True`` raises ``DSMLError``
    where the official parser would reject the text.
    """
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    eos = text.find(EOS)
    if eos >= 0:
        if strict and text[eos + len(EOS) :]:
            raise DSMLError(f"unexpected text after EOS: {text[eos + len(EOS):]!r}")
        text = text[:eos]
    elif strict:
        raise DSMLError("missing EOS")

    reasoning = ""
    if thinking_mode == "thinking":
        if not strict and text.startswith(THINK_START):
            text = text[len(THINK_START) :]  # tolerate a caller that kept the prompt's <think>
        end = text.find(THINK_END)
        if end < 0:
            if strict:
                raise DSMLError("missing </think>")
            return {"role": "assistant", "reasoning_content": text, "content": "", "tool_calls": []}
        reasoning, text = text[:end], text[end + len(THINK_END) :]

    content, calls = _split_tool_calls(text, strict)
    if strict:
        for token in (BOS, EOS, THINK_START, THINK_END, DSML):
            if token in content or token in reasoning:
                raise DSMLError(f"unexpected special token {token!r} in the completion")
    return {
        "role": "assistant",
        "reasoning_content": reasoning,
        "content": content,
        "tool_calls": _openai_calls(calls),
    }


def apply_chat_template(
    messages: list[dict],
    tools: Optional[list[dict]] = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    enable_thinking: bool = True,
    reasoning_effort: Optional[str] = None,
    **_: Any,
) -> str:
    """HF/mlx-lm style entry point (used as ``TokenizerWrapper``'s chat template)."""
    if add_generation_prompt and continue_final_message:
        raise ValueError("only one of add_generation_prompt and continue_final_message may be set")
    thinking_mode = "thinking" if enable_thinking else "chat"
    prompt = encode_messages(messages, thinking_mode, reasoning_effort, tools=tools)
    if not add_generation_prompt and messages and messages[-1].get("role") in ("user", "tool"):
        prompt = prompt.removesuffix(ASSISTANT + THINK_START).removesuffix(ASSISTANT + THINK_END)
    if continue_final_message and messages and messages[-1].get("role") == "assistant":
        prompt = prompt.removesuffix(EOS)
    return prompt

"""Anthropic route: ``POST /v1/messages``.

Anthropic messages become the OpenAI-shaped messages the V4 encoder takes (``system`` ->
a system message, ``tool_result`` blocks -> tool messages, ``thinking``/``tool_use`` blocks ->
``reasoning_content``/``tool_calls``); the completion comes back as ``thinking``, ``text`` and
``tool_use`` blocks. Thinking is off unless the request enables it, as in Anthropic's API.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..generate import DEFAULT_MIN_P, check_text
from . import params
from .common import chat_job, event_stream, job_events, read_json, run_job, sse
from .channels import ChannelSplitter, parse_answer
from .engine import Engine, Result
from .openai_routes import forced_tool_text
from .params import APIError


def _text_of(value: Any, where: str) -> str:
    """A string, or the texts of an array of text blocks joined by blank lines."""
    if isinstance(value, str):
        return check_text(value, where)
    if not isinstance(value, list):
        raise APIError(f"'{where}' must be a string or an array of text blocks", where)
    texts = []
    for j, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise APIError(f"'{where}[{j}]' must be a text block", f"{where}[{j}]")
        texts.append(check_text(block["text"], f"{where}[{j}].text"))
    return "\n\n".join(texts)


def _user_messages(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"role": "user", "content": check_text(content, where)}]
    if not isinstance(content, list) or not content:
        raise APIError(f"'{where}' must be a string or a non-empty array of content blocks", where)
    out = []
    for j, block in enumerate(content):
        at = f"{where}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            out.append({"role": "user", "content": _text_of([block], where)})
        elif kind == "tool_result":
            tool_id = params.get(block, "tool_use_id", str, required=True, where=f"{at}.")
            result = block.get("content", "")
            out.append({"role": "tool", "tool_call_id": tool_id,
                        "content": _text_of(result, f"{at}.content") if result else ""})
        else:
            raise APIError(f"'{at}.type' must be text or tool_result in a user message, got {kind!r}", f"{at}.type")
    return out


def _assistant_message(content: Any, where: str) -> dict:
    if isinstance(content, str):
        return {"role": "assistant", "content": check_text(content, where)}
    if not isinstance(content, list):
        raise APIError(f"'{where}' must be a string or an array of content blocks", where)
    texts, thinking, calls = [], [], []
    for j, block in enumerate(content):
        at = f"{where}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_text_of([block], where))
        elif kind == "thinking":
            thinking.append(params.get(block, "thinking", str, default="", where=f"{at}."))
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            calls.append({"id": params.get(block, "id", str, required=True, where=f"{at}."), "type": "function",
                          "function": {"name": params.get(block, "name", str, required=True, where=f"{at}."),
                                       "arguments": json.dumps(params.get(block, "input", dict, default={},
                                                                          where=f"{at}."), ensure_ascii=False)}})
        else:
            raise APIError(f"'{at}.type' must be text, thinking or tool_use in an assistant message, got {kind!r}",
                           f"{at}.type")
    msg = {"role": "assistant", "content": "\n\n".join(texts), "reasoning_content": "\n\n".join(thinking)}
    if calls:
        msg["tool_calls"] = calls
    return msg


def convert_messages(body: dict) -> list[dict]:
    messages = params.messages(body, ("user", "assistant"))
    out = []
    system = body.get("system")
    if system is not None and system != "":
        out.append({"role": "system", "content": _text_of(system, "system")})
    for where, role, m in messages:
        if "content" not in m:
            raise APIError(f"missing required field '{where}.content'", f"{where}.content")
        if role == "user":
            out += _user_messages(m["content"], f"{where}.content")
        else:
            out.append(_assistant_message(m["content"], f"{where}.content"))
    where, role, _ = messages[-1]
    if role != "user":
        raise APIError("the last message must have role user (continuing an assistant turn is not supported)",
                       f"{where}.role")
    return out


def convert_tools(body: dict) -> tuple[Optional[list[dict]], str]:
    tools = params.get(body, "tools", list)
    converted, names = [], []
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict):
            raise APIError(f"'tools[{i}]' must be an object", f"tools[{i}]")
        name = params.get(t, "name", str, required=True, where=f"tools[{i}].")
        fn = {"name": name, "description": params.get(t, "description", str, default="", where=f"tools[{i}].")}
        fn["parameters"] = params.get(t, "input_schema", dict, default={"type": "object"}, where=f"tools[{i}].")
        converted.append({"type": "function", "function": fn})
        names.append(name)
    choice = params.get(body, "tool_choice", dict)
    kind = None if choice is None else choice.get("type")
    if kind not in (None, "auto", "any", "tool", "none"):
        raise APIError(f"'tool_choice.type' must be auto, any, tool or none, got {kind!r}", "tool_choice.type")
    if kind == "none":
        return None, ""
    if kind in ("any", "tool") and not converted:
        raise APIError("'tool_choice' needs 'tools'", "tool_choice")
    if kind == "tool":
        name = choice.get("name")
        if name not in names:
            raise APIError(f"'tool_choice.name' {name!r} is not in 'tools'", "tool_choice.name")
        return converted, forced_tool_text(name)
    return converted or None, forced_tool_text(None) if kind == "any" else ""


def thinking_mode(body: dict) -> tuple[str, Optional[int]]:
    """``(mode, reasoning budget in tokens)``; the budget ends reasoning with a forced ``</think>``."""
    thinking = params.get(body, "thinking", dict)
    if thinking is None:
        return "chat", None
    kind = thinking.get("type")
    if kind not in ("enabled", "adaptive", "disabled"):
        raise APIError(f"'thinking.type' must be enabled or disabled, got {kind!r}", "thinking.type")
    budget = params.integer(thinking, "budget_tokens", None, 1, where="thinking.") if kind == "enabled" else None
    return ("chat", None) if kind == "disabled" else ("thinking", budget)


def _stop_reason(result: Result, calls: list) -> str:
    if calls:
        return "tool_use"
    return {"length": "max_tokens", "stop_sequence": "stop_sequence"}.get(result.finish_reason, "end_turn")


def _usage(result: Result) -> dict:
    return {"input_tokens": result.prompt_tokens - result.cached_tokens, "output_tokens": result.completion_tokens,
            "cache_read_input_tokens": result.cached_tokens, "cache_creation_input_tokens": 0}


def _tool_uses(message: dict) -> list[dict]:
    return [{"type": "tool_use", "id": "toolu_" + c["id"].removeprefix("call_"), "name": c["function"]["name"],
             "input": json.loads(c["function"]["arguments"])} for c in message["tool_calls"]]


def messages(engine: Engine, model_id: str):
    async def handler(request: Request):
        body = await read_json(request)
        model = params.get(body, "model", str, required=True)
        max_tokens = params.integer(body, "max_tokens", None, 1)
        if max_tokens is None:
            raise APIError("missing required field 'max_tokens'", "max_tokens")
        msgs = convert_messages(body)
        tools, forced = convert_tools(body)
        one_call = params.get(params.get(body, "tool_choice", dict) or {}, "disable_parallel_tool_use", bool,
                              default=False, where="tool_choice.")
        mode, budget = thinking_mode(body)
        settings = dict(max_tokens=max_tokens, temp=params.number(body, "temperature", 1.0, 0.0, 1.0),
                        top_p=params.number(body, "top_p", 1.0, 0.0, 1.0), top_k=params.integer(body, "top_k", 0, 0),
                        min_p=DEFAULT_MIN_P, stop=params.stop_list(body, "stop_sequences"))
        stream = params.get(body, "stream", bool, default=False)
        job = chat_job(engine, msgs, mode, tools=tools, forced=forced, think_budget=budget, **settings)
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        shell = {"id": mid, "type": "message", "role": "assistant", "model": model or model_id}

        if not stream:
            result = await run_job(engine, job, request)
            message = parse_answer(result.text, mode == "thinking", 1 if one_call else None)
            blocks = []
            if message["reasoning_content"]:
                blocks.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
            if message["content"]:
                blocks.append({"type": "text", "text": message["content"]})
            blocks += _tool_uses(message)
            if not blocks:
                blocks.append({"type": "text", "text": ""})
            return JSONResponse({**shell, "content": blocks, "stop_reason": _stop_reason(result, message["tool_calls"]),
                                 "stop_sequence": result.stop_sequence, "usage": _usage(result)})

        async def events():
            splitter, index, open_kind = ChannelSplitter(mode == "thinking", 1 if one_call else None), -1, None

            def start(kind: str):
                nonlocal index, open_kind
                out = []
                if open_kind is not None:
                    out.append(sse({"type": "content_block_stop", "index": index}, "content_block_stop"))
                index, open_kind = index + 1, kind
                block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {
                    "type": "text", "text": ""}
                out.append(sse({"type": "content_block_start", "index": index, "content_block": block},
                               "content_block_start"))
                return out

            def deltas(dr: str, dc: str):
                out = []
                for kind, part in (("thinking", dr), ("text", dc)):  # a thinking_delta, then a text_delta
                    if part:
                        if open_kind != kind:
                            out += start(kind)
                        out.append(sse({"type": "content_block_delta", "index": index,
                                        "delta": {"type": f"{kind}_delta", kind: part}}, "content_block_delta"))
                return out

            try:
                async for kind, value in job_events(engine, job):
                    if kind == "start":
                        usage = {"input_tokens": len(job.ids) - value, "output_tokens": 0,
                                 "cache_read_input_tokens": value, "cache_creation_input_tokens": 0}
                        yield sse({"type": "message_start", "message": {
                            **shell, "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}},
                            "message_start")
                        yield sse({"type": "ping"}, "ping")
                    elif kind == "text":
                        for e in deltas(*splitter.feed(value)):
                            yield e
                    elif kind == "done":
                        result = value
                        dr, dc, message = splitter.finish()
                        for e in deltas(dr, dc):
                            yield e
            except APIError as e:
                yield sse({"type": "error", "error": {"type": e.kind, "message": e.message}}, "error")
                return
            uses = _tool_uses(message)
            if open_kind is None and not uses:
                for e in start("text"):
                    yield e
            if open_kind is not None:
                yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
            for use in uses:
                index += 1
                yield sse({"type": "content_block_start", "index": index,
                           "content_block": {**use, "input": {}}}, "content_block_start")
                yield sse({"type": "content_block_delta", "index": index, "delta": {
                    "type": "input_json_delta", "partial_json": json.dumps(use["input"], ensure_ascii=False)}},
                    "content_block_delta")
                yield sse({"type": "content_block_stop", "index": index}, "content_block_stop")
            yield sse({"type": "message_delta", "delta": {"stop_reason": _stop_reason(result, uses),
                                                          "stop_sequence": result.stop_sequence},
                       "usage": {"output_tokens": result.completion_tokens}}, "message_delta")
            yield sse({"type": "message_stop"}, "message_stop")

        return event_stream(events())

    return handler

"""OpenAI routes: ``POST /v1/chat/completions`` and ``POST /v1/completions``.

Chat messages are rendered with the official V4 encoding (tools as DSML in the system prompt),
the completion is parsed back with ``parse_completion``: reasoning as ``reasoning_content``
(DeepSeek's API field), DSML tool calls as ``tool_calls``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse

from .. import encoding
from ..generate import DEFAULT_MIN_P, check_text
from . import params
from .common import chat_job, check_prompt, event_stream, job_events, read_json, run_job, sse
from .channels import ChannelSplitter, finish_reason_openai, parse_answer
from .engine import Engine, Job, Result, tokenize_with_boundaries
from .params import APIError

ROLES = ("system", "developer", "user", "assistant", "tool")
_MESSAGE_KEYS = ("role", "content", "tool_calls", "reasoning_content", "tool_call_id")
EFFORTS = {"none": None, "minimal": "high", "low": "high", "medium": "high", "high": "high", "max": "max",
           "xhigh": "max"}


def _check_content(value: Any, where: str, required: bool) -> None:
    if value is None:
        if required:
            raise APIError(f"'{where}' is required", where)
        return
    if isinstance(value, str):
        check_text(value, where)
        return
    if not isinstance(value, list):
        raise APIError(f"'{where}' must be a string or an array of content parts", where)
    for j, part in enumerate(value):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise APIError(f"'{where}[{j}]' must be a content part object with a 'type'", f"{where}[{j}]")
        if part["type"] != "text":
            raise APIError(f"'{where}[{j}].type' {part['type']!r} is not supported by ds4mlx serve (text parts "
                           "only: the model reads no images, audio or files)", f"{where}[{j}].type")
        if not isinstance(part.get("text"), str):
            raise APIError(f"'{where}[{j}].text' must be a string", f"{where}[{j}].text")


def check_messages(body: dict) -> list[dict]:
    out = []
    for where, role, m in params.messages(body, ROLES):
        _check_content(m.get("content"), f"{where}.content", required=role != "assistant")
        if role == "assistant":
            calls = params.get(m, "tool_calls", list, default=[], where=f"{where}.")
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise APIError(f"'{where}.tool_calls[{j}].function.name' must be a string",
                                   f"{where}.tool_calls[{j}].function.name")
                if not isinstance(fn.get("arguments", "{}"), (str, dict)):
                    raise APIError(f"'{where}.tool_calls[{j}].function.arguments' must be a JSON string",
                                   f"{where}.tool_calls[{j}].function.arguments")
            params.get(m, "reasoning_content", str, where=f"{where}.")
        out.append({k: m[k] for k in _MESSAGE_KEYS if m.get(k) is not None})
    return out


def thinking_settings(body: dict) -> tuple[str, Optional[str]]:
    """``(thinking_mode, reasoning_effort)`` from ``reasoning_effort``, DeepSeek's ``thinking``
    object or ``chat_template_kwargs.enable_thinking``; thinking is on by default."""
    mode, effort = "thinking", None
    thinking = params.get(body, "thinking", dict)
    if thinking is not None:
        kind = thinking.get("type")
        if kind not in ("enabled", "disabled"):
            raise APIError(f"'thinking.type' must be enabled or disabled, got {kind!r}", "thinking.type")
        mode = "thinking" if kind == "enabled" else "chat"
    kwargs = params.get(body, "chat_template_kwargs", dict)
    if kwargs is not None:
        for key in ("enable_thinking", "thinking"):
            on = params.get(kwargs, key, bool, where="chat_template_kwargs.")
            if on is not None:
                mode = "thinking" if on else "chat"
    value = params.get(body, "reasoning_effort", str)
    if value is not None:
        if value not in EFFORTS:
            raise APIError(f"'reasoning_effort' must be one of {', '.join(EFFORTS)}, got {value!r}",
                           "reasoning_effort")
        effort = EFFORTS[value]
        mode = "chat" if value == "none" else "thinking"
    return mode, (effort if mode == "thinking" else None)


def forced_tool_text(name: Optional[str]) -> str:
    """The answer's forced opening for ``tool_choice`` "required" (any tool) or a named tool."""
    text = "\n\n" + encoding.TOOL_CALLS_START + "\n"
    return text + (f'<{encoding.DSML}invoke name="{name}">\n' if name else "")


def check_tools(body: dict) -> tuple[Optional[list[dict]], str]:
    """``(tools to render, forced answer opening)`` from ``tools`` and ``tool_choice``."""
    tools = params.get(body, "tools", list)
    names = []
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise APIError(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{...}}}}", f"tools[{i}]")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(f"'tools[{i}].function.name' must be a non-empty string", f"tools[{i}].function.name")
        names.append(fn["name"])
    choice = body.get("tool_choice")
    if choice is None or choice == "auto":
        return tools or None, ""
    if choice == "none":
        return None, ""
    if not tools:
        raise APIError("'tool_choice' needs 'tools'", "tool_choice")
    if choice == "required":
        return tools, forced_tool_text(None)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise APIError("'tool_choice' must be none, auto, required or {\"type\": \"function\", "
                       "\"function\": {\"name\": ...}}", "tool_choice")
    if name not in names:
        raise APIError(f"'tool_choice.function.name' {name!r} is not in 'tools'", "tool_choice.function.name")
    return tools, forced_tool_text(name)


def with_response_format(body: dict, messages: list[dict]) -> list[dict]:
    """``response_format`` goes on the first system message, as the official encoder takes it."""
    fmt = params.get(body, "response_format", dict)
    kind = None if fmt is None else fmt.get("type")
    if kind in (None, "text"):
        return messages
    if kind == "json_object":
        schema = {"type": "json_object"}
    elif kind == "json_schema" and isinstance(fmt.get("json_schema"), dict):
        schema = fmt["json_schema"]
    else:
        raise APIError("'response_format.type' must be text, json_object or json_schema (with a "
                       f"'json_schema' object), got {kind!r}", "response_format.type")
    if messages[0]["role"] == "system":
        return [{**messages[0], "response_format": schema}] + messages[1:]
    return [{"role": "system", "content": "", "response_format": schema}] + messages


def sampling(body: dict, engine: Engine) -> dict:
    n = params.integer(body, "n", 1, 1)
    if n != 1:
        raise APIError("'n' must be 1 (one choice per request)", "n")
    params.refuse(body, ("logprobs", "top_logprobs"), "no log probabilities are returned")
    params.refuse(body, ("logit_bias", "presence_penalty", "frequency_penalty"), "sampling takes temperature, "
                  "top_p, top_k, min_p and seed")
    max_tokens = params.integer(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = params.integer(body, "max_tokens", None, 1)
    return dict(
        max_tokens=max_tokens or engine.default_max_tokens,
        temp=params.number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=params.number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=params.integer(body, "top_k", 0, 0),
        min_p=params.number(body, "min_p", DEFAULT_MIN_P, 0.0, 1.0),
        seed=params.seed(body),
        stop=params.stop_list(body, "stop"),
    )


def usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = params.get(body, "stream", bool, default=False)
    options = params.get(body, "stream_options", dict, default={})
    return stream, bool(params.get(options, "include_usage", bool, default=False, where="stream_options."))


def chat_completions(engine: Engine, model_id: str):
    async def handler(request: Request):
        body = await read_json(request)
        params.get(body, "model", str)
        messages = with_response_format(body, check_messages(body))
        mode, effort = thinking_settings(body)
        tools, forced = check_tools(body)
        one_call = params.get(body, "parallel_tool_calls", bool, default=True) is False
        params.refuse(body, ("audio",), "text output only")
        params.refuse(body, ("modalities",), "text output only", allowed=(None, ["text"]))
        settings = sampling(body, engine)
        stream, include_usage = _stream_flags(body)
        job = chat_job(engine, messages, mode, effort=effort, tools=tools, forced=forced, **settings)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        if not stream:
            result = await run_job(engine, job, request)
            message = parse_answer(result.text, mode == "thinking", 1 if one_call else None)
            out = {"role": "assistant", "content": message["content"] or (None if message["tool_calls"] else ""),
                   "reasoning_content": message["reasoning_content"] or None}
            if message["tool_calls"]:
                out["tool_calls"] = message["tool_calls"]
            return JSONResponse({
                "id": rid, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "message": out, "logprobs": None,
                             "finish_reason": finish_reason_openai(result.finish_reason, message)}],
                "usage": usage(result),
            })

        def chunk(delta: dict, finish: Optional[str] = None) -> dict:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        async def events():
            splitter = ChannelSplitter(mode == "thinking", 1 if one_call else None)
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for kind, value in job_events(engine, job):
                    if kind == "text":
                        dr, dc = splitter.feed(value)
                    elif kind == "done":
                        result = value
                        dr, dc, message = splitter.finish()
                    else:
                        continue
                    if dr:
                        yield chunk({"reasoning_content": dr})
                    if dc:
                        yield chunk({"content": dc})
            except APIError as e:
                yield sse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}})
                return
            calls = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
            if calls:
                yield chunk({"tool_calls": calls})
            yield chunk({}, finish_reason_openai(result.finish_reason, message))
            if include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                           "choices": [], "usage": usage(result)})
            yield sse("[DONE]")

        return event_stream(events())

    return handler


def completion_ids(engine: Engine, body: dict) -> tuple[list[int], list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        check_text(prompt, "prompt")
        text = prompt if prompt.startswith(encoding.BOS) else encoding.BOS + prompt
        return tokenize_with_boundaries(engine.tokenizer, text)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = engine.model.config.vocab_size
        for i, t in enumerate(prompt):
            if not 0 <= t < vocab:
                raise APIError(f"'prompt[{i}]' = {t} is outside the vocabulary (0..{vocab - 1})", f"prompt[{i}]")
        return list(prompt), []
    if prompt is None:
        raise APIError("missing required field 'prompt'", "prompt")
    raise APIError("'prompt' must be a string or an array of token ids (one prompt per request)", "prompt")


def completions(engine: Engine, model_id: str):
    async def handler(request: Request):
        body = await read_json(request)
        params.get(body, "model", str)
        ids, bounds = completion_ids(engine, body)
        check_prompt(engine, ids, "prompt")
        if body.get("max_tokens") is None:
            body = {**body, "max_tokens": 16}  # OpenAI's default for this endpoint
        params.refuse(body, ("echo", "suffix"), "the completion is the generated text only")
        params.refuse(body, ("best_of",), "one generation per request", allowed=(None, 1))
        settings = sampling(body, engine)
        stream, include_usage = _stream_flags(body)
        job = Job(ids, bounds, **settings)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def payload(text: str, finish: Optional[str]) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        def finish(result: Result) -> str:
            return "length" if result.finish_reason == "length" else "stop"

        if not stream:
            result = await run_job(engine, job, request)
            return JSONResponse({**payload(result.text, finish(result)), "usage": usage(result)})

        async def events():
            try:
                async for kind, value in job_events(engine, job):
                    if kind == "text":
                        yield sse(payload(value, None))
                    elif kind == "done":
                        result = value
            except APIError as e:
                yield sse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}})
                return
            yield sse(payload("", finish(result)))
            if include_usage:
                yield sse({**payload("", None), "choices": [], "usage": usage(result)})
            yield sse("[DONE]")

        return event_stream(events())

    return handler

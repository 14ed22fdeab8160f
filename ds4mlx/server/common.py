"""What the two APIs' routes share: request bodies, prompt checks, jobs on the engine, error bodies, SSE events."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Optional

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse

from .. import encoding
from ..generate import ContextLengthError, PromptError
from .engine import Engine, Job, Result, tokenize_with_boundaries
from .params import APIError

log = logging.getLogger("ds4mlx.server")

# On a shutdown signal sse-starlette cancels every open stream at its next poll of uvicorn's exit
# flag (every 0.5 s), wherever the generator is: with a decode step slower than that the final
# chunk and [DONE] were cut off. The engine already cancels each job within a token (stop_jobs),
# so a stream gets this long to end by itself; below ``serve``'s graceful timeout, which is
# ``STREAM_GRACE_S + 1``.
STREAM_GRACE_S = 4.0


def is_anthropic(request: Request) -> bool:
    return request.url.path.startswith("/v1/messages")


def error_response(request: Request, e: APIError) -> JSONResponse:
    if is_anthropic(request):
        kind = {404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large"}.get(e.status, e.kind)
        body = {"type": "error", "error": {"type": "api_error" if e.status >= 500 else kind, "message": e.message}}
    else:
        body = {"error": {"message": e.message, "type": "server_error" if e.status >= 500 else e.kind,
                          "param": e.param, "code": None}}
    return JSONResponse(body, status_code=e.status)


async def read_json(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON ({e})", None) from None
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object", None)
    return body


def check_prompt(engine: Engine, ids: list[int], param: str) -> None:
    if not ids:
        raise APIError("the prompt is empty", param)
    if engine.ctx is not None and len(ids) >= engine.ctx:
        raise APIError(f"the prompt has {len(ids)} tokens, more than the context limit of {engine.ctx} tokens "
                       "allows (server --ctx)", param)


def chat_job(engine: Engine, messages: list[dict], mode: str, *, effort: Optional[str] = None,
             tools: Optional[list[dict]] = None, forced: str = "", **settings: Any) -> Job:
    """A chat request's job: ``messages`` rendered in ``mode`` (a failure names ``messages``),
    tokenized with their reuse points and checked against the context; ``forced``: text the
    answer must start with (a forced tool call); ``settings``: the rest of the Job's fields."""
    try:
        text = encoding.encode_messages(messages, mode, effort, tools=tools)
    except ValueError as e:
        raise APIError(f"messages: {e}", "messages") from None
    ids, bounds = tokenize_with_boundaries(engine.tokenizer, text)
    check_prompt(engine, ids, "messages")
    force_ids = list(engine.tokenizer.encode(forced, add_special_tokens=False)) if forced else []
    return Job(ids, bounds, thinking=mode == "thinking", force_content=force_ids, **settings)


def _as_api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, (ContextLengthError, PromptError, ValueError)):
        return APIError(str(e), None)
    return APIError(f"internal error: {type(e).__name__}: {e}", None, status=500, kind="server_error")


async def run_job(engine: Engine, job: Job, request: Request) -> Result:
    """Run ``job`` to the end (non-streaming); a client that goes away cancels it."""
    queue = engine.submit(job)
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel.set()
                continue
            if kind == "done":
                return value
            if kind == "error":
                raise _as_api_error(value)
    finally:
        job.cancel.set()  # a no-op once the job has finished


async def job_events(engine: Engine, job: Job) -> AsyncIterator[tuple[str, Any]]:
    """The job's events; closing this iterator (the client left) cancels the job."""
    queue = engine.submit(job)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "error":
                raise _as_api_error(value)
            yield kind, value
            if kind == "done":
                return
    finally:
        job.cancel.set()


def sse(data: Any, event: Optional[str] = None) -> dict:
    """One server-sent event for sse-starlette (``data`` as compact JSON)."""
    out = {"data": data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))}
    if event is not None:
        out["event"] = event
    return out


def event_stream(events: AsyncIterator[dict]) -> EventSourceResponse:
    """The SSE response of a streamed request; at shutdown its job's end events still go out."""
    return EventSourceResponse(events, ping=15, shutdown_grace_period=STREAM_GRACE_S)

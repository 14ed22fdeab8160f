"""The ASGI application: Starlette routes over one ``Engine``, errors in each API's own format."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..generate import ContextLengthError, PromptError
from .engine import Engine, Job, Result
from .params import APIError

log = logging.getLogger("ds4mlx.server")


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


def create_app(engine: Engine, model_id: str) -> Starlette:
    """The server: OpenAI (``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``) and
    Anthropic (``/v1/messages``) routes."""
    from . import anthropic_routes, openai_routes

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": int(started), "owned_by": "ds4mlx"}]})

    async def health(request: Request) -> JSONResponse:
        cache = engine.prefix_cache
        return JSONResponse({"status": "ok", "jobs_done": engine.jobs_done,
                             "prefix_cache": None if cache is None else
                             {"entries": len(cache), "bytes": cache.nbytes, "hits": cache.hits,
                              "misses": cache.misses, "loaded_from_disk": cache.loaded_from_disk}})

    async def on_api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(request, e)

    async def on_http_error(request: Request, e: HTTPException) -> JSONResponse:
        return error_response(request, APIError(str(e.detail), None, status=e.status_code,
                                                kind="not_found_error" if e.status_code == 404 else "invalid_request_error"))

    async def on_crash(request: Request, e: Exception) -> JSONResponse:
        if not isinstance(e, ValueError):
            log.exception("request failed")
        return error_response(request, _as_api_error(e))

    started = time.time()
    app = Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/v1/chat/completions", openai_routes.chat_completions(engine, model_id), methods=["POST"]),
            Route("/v1/completions", openai_routes.completions(engine, model_id), methods=["POST"]),
            Route("/v1/messages", anthropic_routes.messages(engine, model_id), methods=["POST"]),
        ],
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_crash},
    )
    app.state.engine = engine
    return app


def sse(data: Any, event: Optional[str] = None) -> dict:
    """One server-sent event for sse-starlette (``data`` as compact JSON)."""
    out = {"data": data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))}
    if event is not None:
        out["event"] = event
    return out

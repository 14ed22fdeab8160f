"""The ASGI application: Starlette routes over one ``Engine``, errors in each API's own format."""

from __future__ import annotations

import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .common import _as_api_error, error_response, log
from .engine import Engine
from .params import APIError


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

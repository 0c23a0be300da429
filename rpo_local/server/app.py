"""The ASGI app: the routes, the error handlers and the lifespan that starts and stops the
worker and the scheduler. Guards (Host, token) wrap every route; the daemon does the work."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from rpo_local import errors
from rpo_local.errors import InputError, NotFound, ReadOnlyDatabase, RpoError, UpstreamError
from rpo_local.server.daemon import Daemon
from rpo_local.server.guard import Guard
from rpo_local.server.request import ApiError, error_response, header_value, parse, profile_header, read_json, truthy
from rpo_local.server.schema import ChatRequest, FeedbackRequest
from rpo_local.server.sse import completion_id, stream

log = logging.getLogger(__package__)  # one logger for the daemon: rpo_local.server


def create_app(daemon: Daemon) -> ASGIApp:
    """The ASGI app for `daemon`, behind the Host and token guard."""

    async def chat_completions(request: Request) -> Response:
        req: ChatRequest = parse(ChatRequest, await read_json(request, daemon.max_body_bytes))
        daemon.admit()
        detail = req.rpo_trajectory or truthy(request.headers.get("x-rpo-trajectory"))
        profile, model_named_profile = await run_in_threadpool(daemon.select_profile, req.model, profile_header(request))
        daemon.count("requests")
        upstream_model = None if model_named_profile else req.model
        messages = [m.forwarded() for m in req.messages]
        try:
            reply = await run_in_threadpool(lambda: daemon.upstream.chat(messages, model=upstream_model, **req.params()))
        except UpstreamError as exc:
            daemon.count("upstream_errors")
            return error_response(exc.status_code, exc.message, "upstream_error", f"upstream_{exc.status_code}")
        model = req.model or f"rpo:{profile}"
        if req.stream:
            return StreamingResponse(
                stream(daemon, profile, reply, model, detail), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-RPO-Profile": header_value(profile)},
            )
        outcome = await daemon.personalize(profile, reply.text)
        info = await run_in_threadpool(daemon.rpo_info, profile, outcome, detail=detail, generic=reply.text)
        body = {
            "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.text}, "finish_reason": "stop"}],
            "usage": _usage(reply.usage), "rpo": info,
        }
        return JSONResponse(body, headers=_rpo_headers(info))

    async def models(request: Request) -> Response:
        rows = await run_in_threadpool(daemon.store.list_profiles)
        data = [{"id": f"rpo:{r['name']}", "object": "model", "created": 0, "owned_by": "rpo-local"} for r in rows]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def status(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(daemon.status))

    async def feedback(request: Request) -> Response:
        body: FeedbackRequest = parse(FeedbackRequest, await read_json(request, daemon.max_body_bytes))
        fid = await run_in_threadpool(daemon.store.add_feedback, body.interaction_id, body.verdict,
                                      body.edited_text)
        if daemon.scheduler is not None:
            daemon.scheduler.wake()
        return JSONResponse({"feedback_id": fid, "interaction_id": body.interaction_id, "verdict": body.verdict})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        daemon.worker.start()
        if daemon.scheduler is not None:
            daemon.scheduler.start()
        if daemon.backfill is not None:
            daemon.backfill.start()
        try:
            yield
        finally:
            if daemon.backfill is not None:
                await run_in_threadpool(daemon.backfill.stop)
            if daemon.scheduler is not None:
                await run_in_threadpool(daemon.scheduler.stop)
            await run_in_threadpool(daemon.worker.stop)
            if hasattr(daemon.upstream, "close"):
                daemon.upstream.close()

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def rpo_error(request: Request, exc: Exception) -> Response:
        status = (404 if isinstance(exc, NotFound) else 400 if isinstance(exc, InputError)
                  else 503 if isinstance(exc, ReadOnlyDatabase) else 500)
        return error_response(status, errors.describe_error(exc), "invalid_request_error" if status < 500 else "server_error")

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {errors.describe_error(exc)}", "server_error")

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/v1/rpo/status", status, methods=["GET"]),
            Route("/v1/rpo/feedback", feedback, methods=["POST"]),
        ],
        exception_handlers={ApiError: api_error, RpoError: rpo_error, Exception: internal_error},
        lifespan=lifespan,
    )
    return Guard(InFlight(app, daemon), daemon.allowed_hosts, daemon.api_key)  # type: ignore[return-value]


class InFlight:
    """ASGI middleware counting the chat completions being answered, streamed ones until their
    last event or the client leaving (the ASGI call returns only then, whatever happened)."""

    def __init__(self, app: ASGIApp, daemon: Daemon) -> None:
        self.app, self.daemon = app, daemon

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await self.app(scope, receive, send)
            return
        self.daemon.in_flight += 1  # the event loop's thread only: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.daemon.in_flight -= 1


def _usage(usage: dict) -> dict:
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _rpo_headers(info: dict) -> dict[str, str]:
    headers = {"X-RPO-Personalized": "true" if info["personalized"] else "false",
               "X-RPO-Profile": header_value(info["profile"])}
    if info.get("adapter"):
        headers["X-RPO-Adapter"] = header_value(info["adapter"])
    if info.get("interaction_id") is not None:
        headers["X-RPO-Interaction-Id"] = str(info["interaction_id"])
    return headers

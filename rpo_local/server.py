"""`rpo serve`: an OpenAI-compatible personalizing proxy on localhost.

A client that speaks the OpenAI API points its base URL at `http://127.0.0.1:PORT/v1`. For each
chat completion the daemon asks the upstream (a cloud endpoint, or offline the local base model)
for the generic reply, rewrites it in the profile's style with the reflection model, records the
interaction and answers. The user's reply is never lost: past the time budget, or when the
rewrite fails, the generic reply is returned and the reason recorded.

One reflection engine stays loaded; a single worker thread runs rewrites in arrival order, so
llama.cpp can reuse the KV cache of the prompt prefix consecutive rewrites share.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import queue
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from rpo_local import __version__, names
from rpo_local.adapters import builtin_name, resolve_adapter
from rpo_local.errors import ConfigError, InputError, NotFound, ReadOnlyDatabase, RpoError, UpstreamError
from rpo_local.server_schema import ChatRequest, FeedbackRequest, describe
from rpo_local.store import Store

if TYPE_CHECKING:
    from rpo_local.config import Config
    from rpo_local.embed import Backfill
    from rpo_local.engine import Engine
    from rpo_local.reflect import RewriteResult
    from rpo_local.scheduler import TrainScheduler
    from rpo_local.upstream import Upstream

DEFAULT_PORT = 8765
MAX_BODY_BYTES = 1_000_000
PIECE_GRACE_S = 10.0  # a piece started within the time budget may take this much longer
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
TextSink = Callable[[str], None]


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class RewriteCancelled(Exception):
    """The request stopped waiting (time budget, client gone): stop generating."""


class _CancellableEngine:
    """The reflection engine, aborting between tokens once the request stopped waiting."""

    def __init__(self, engine: Engine, cancelled: threading.Event) -> None:
        self._engine = engine
        self._cancelled = cancelled

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def stream(self, prompt: str, **kwargs: Any):
        gen = self._engine.stream(prompt, **kwargs)
        try:
            for piece in gen:
                if self._cancelled.is_set():
                    raise RewriteCancelled
                yield piece
        finally:
            gen.close()  # releases the engine lock now, not whenever the generator is collected


@dataclass
class Job:
    run: Callable[[], Any]
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()
        self.future.cancel()


class ReflectionWorker:
    """One thread that owns the reflection engine: rewrites and adapter switches, in order.

    It reads the database through its own connection (`store`): one SQLite connection must not
    be used by several threads at once.
    """

    def __init__(self, store: Store, engine: Engine, config: Config) -> None:
        self.store, self.engine, self.config = store, engine, config
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.stats = {"done": 0, "failed": 0, "cancelled": 0, "adapter_switches": 0}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rpo-reflection", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def pending(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
                self.stats["cancelled"] += 1
                continue
            try:
                job.future.set_result(job.run())
                self.stats["done"] += 1
            except RewriteCancelled:
                self.stats["cancelled"] += 1
                job.future.set_exception(RewriteCancelled())
            except BaseException as exc:  # reported to the waiting request, never fatal here
                self.stats["failed"] += 1
                job.future.set_exception(exc)

    def submit(self, run: Callable[[], Any]) -> Job:
        job = Job(run)
        self._queue.put(job)
        return job

    def submit_rewrite(
        self, profile: str, generic: str, on_text: TextSink | None = None, deadline: float | None = None
    ) -> Job:
        """Queue a rewrite; past `deadline` (time.monotonic) its remaining pieces keep their text."""
        from rpo_local.reflect import Reflector

        job = Job(lambda: None)

        def run() -> RewriteResult:
            self.ensure_adapter(profile)
            reflector = Reflector(self.store, _CancellableEngine(self.engine, job.cancelled), self.config)
            return reflector.rewrite(generic, profile, log=False, on_text=on_text, source="serve", deadline=deadline)

        job.run = run
        self._queue.put(job)
        return job

    def ensure_adapter(self, profile: str) -> None:
        """Give the engine the profile's active adapter (no base-model reload)."""
        want = resolve_adapter(self.store, profile)
        with self.engine.lock:
            have = self.engine.adapter_path
            if (Path(want) if want else None) != (Path(have) if have else None):
                self.engine.set_adapter(want)
                self.stats["adapter_switches"] += 1

    def switch_adapter(self, profile: str) -> None:
        """Queue a switch to the profile's (new) adapter: it happens between two requests."""
        self.submit(lambda: self.ensure_adapter(profile))


@dataclass
class Outcome:
    text: str
    personalized: bool
    reason: str | None
    result: RewriteResult | None = None
    interaction_id: int | None = None


class Daemon:
    """Everything a request needs: store, upstream, the worker, the scheduler, the limits.

    Request handlers share `store` (under `db_lock`); the worker and the scheduler open their
    own connections to the same database file.
    """

    def __init__(
        self,
        *,
        store: Store,
        engine: Engine,
        upstream: Upstream,
        config: Config,
        api_key: str | None = None,
        allowed_hosts: tuple[str, ...] = (),
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.store, self.engine, self.upstream, self.config = store, engine, upstream, config
        self.api_key = api_key or None
        self.allowed_hosts = LOOPBACK_NAMES | {h.lower().strip("[]") for h in allowed_hosts}
        self.max_body_bytes = max_body_bytes
        self.db_lock = threading.RLock()
        self.worker = ReflectionWorker(Store.open(store.path) if store.path else store, engine, config)
        self.scheduler: TrainScheduler | None = None  # set by `rpo serve` unless --no-train
        self.backfill: Backfill | None = None  # set by `rpo serve` for dense/hybrid retrieval
        self.started = time.time()
        self.counts = {"requests": 0, "personalized": 0, "generic": 0, "upstream_errors": 0}
        self._count_lock = threading.Lock()
        store.ensure_profile(config.profile)  # a fresh install serves the default profile

    # -- profiles and adapters ------------------------------------------------------------------

    def select_profile(self, model: str | None, header: str | None) -> tuple[str, bool]:
        """The profile a request is for, and whether `model` named it (then it is not an upstream model)."""
        with self.db_lock:
            known = {p["name"] for p in self.store.list_profiles()}
        if header and header.strip():
            name, from_model = header.strip(), False
        elif model and model.startswith("rpo:"):
            name, from_model = model[4:], True
        elif model and model in known:
            return model, True
        else:
            return self.config.profile, False
        if reason := names.problem(name):
            raise ApiError(400, f"invalid profile name {name!r}: {reason} ({names.RULE})", code="invalid_profile")
        if name not in known:
            raise ApiError(404, f"unknown profile {name!r}; known: {', '.join(sorted(known))}", code="profile_not_found")
        return name, from_model

    def adapter_label(self, path: str | Path | None) -> str | None:
        if not path:
            return None
        if builtin := builtin_name(path):
            return builtin
        with self.db_lock:
            row = self.store.adapter_by_path(path)
        return row["name"] if row else Path(path).name

    # -- personalization ------------------------------------------------------------------------

    @property
    def budget_s(self) -> float:
        return self.config.rewrite_timeout_s

    async def personalize(self, profile: str, generic: str) -> Outcome:
        """Rewrite `generic` within the time budget; the generic reply whenever that fails."""
        if not generic.strip():
            return await self.finish(profile, generic, None, "the upstream reply is empty")
        # Pieces not started within the budget keep their generic text; the piece in progress
        # may finish (PIECE_GRACE_S), past which the whole generic reply is returned.
        job = self.worker.submit_rewrite(profile, generic, deadline=time.monotonic() + self.budget_s)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(job.future), timeout=self.budget_s + PIECE_GRACE_S)
        except (TimeoutError, asyncio.CancelledError) as exc:
            job.cancel()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return await self.finish(profile, generic, None, f"the rewrite exceeded the time budget ({self.budget_s:g} s)")
        except Exception as exc:
            logging.getLogger(__name__).error("rewrite failed (profile %r)", profile, exc_info=exc)
            return await self.finish(profile, generic, None, f"the rewrite failed: {_describe(exc)}")
        return await self.finish(profile, generic, result, None)

    async def finish(self, profile: str, generic: str, result: RewriteResult | None, reason: str | None,
                     text: str | None = None) -> Outcome:
        return await run_in_threadpool(self.record, profile, generic, result, reason, text)

    def record(self, profile: str, generic: str, result: RewriteResult | None, reason: str | None,
               text: str | None = None) -> Outcome:
        """Record the interaction as the client received it (`text` overrides what was sent)."""
        if result is not None and reason is None:
            sent = result.rewrite if text is None else text
            outcome = Outcome(sent, not result.fallback, result.fallback_reason, result)
        else:
            outcome = Outcome(generic if text is None else text, False, reason, result)
        fields: dict[str, Any] = {
            "source": "serve", "input": generic, "rewrite": outcome.text, "fallback": not outcome.personalized,
            "fallback_reason": outcome.reason, "model": getattr(self.engine.model_path, "name", None),
            "adapter": str(self.engine.adapter_path) if self.engine.adapter_path else None,
        }
        if result is not None:
            fields.update(
                trajectory=result.trajectory, model=result.model, adapter=result.adapter,
                retrieved_ids=[r["id"] for r in result.retrieved], latency_ms=round(result.total_s * 1000, 1),
                prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
            )
        with self.db_lock:
            outcome.interaction_id = self.store.record_interaction(profile, **fields)
        self.count("personalized" if outcome.personalized else "generic")
        return outcome

    def locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the shared store, one thread at a time."""
        with self.db_lock:
            return fn(*args)

    def count(self, key: str) -> None:
        with self._count_lock:
            self.counts[key] += 1

    def rpo_info(self, profile: str, outcome: Outcome, *, detail: bool, generic: str) -> dict:
        adapter = outcome.result.adapter if outcome.result else (self.engine.adapter_path or None)
        info: dict[str, Any] = {
            "personalized": outcome.personalized, "profile": profile, "adapter": self.adapter_label(adapter),
            "interaction_id": outcome.interaction_id, "fallback_reason": outcome.reason,
        }
        if detail:
            info["generic"] = generic
            info["trajectory"] = outcome.result.trajectory if outcome.result else None
        return info

    def status(self) -> dict:
        return {
            "status": "ok", "version": __version__, "uptime_s": round(time.time() - self.started, 1),
            "profile": self.config.profile, "engine": self.engine.describe(),
            "adapter": self.adapter_label(self.engine.adapter_path),
            "upstream": getattr(self.upstream, "name", None), "time_budget_s": self.budget_s,
            "queue": {"pending": self.worker.pending(), **self.worker.stats},
            "requests": dict(self.counts),
            "training": self.scheduler.status() if self.scheduler else None,
        }


def _describe(exc: BaseException) -> str:
    return exc.message if isinstance(exc, RpoError) else f"{type(exc).__name__}: {exc}"


# -- request parsing --------------------------------------------------------------------------

async def read_json(request: Request, limit: int) -> Any:
    """The JSON body, refusing more than `limit` bytes (413) before reading it all."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def parse(model: type[Any], body: Any) -> Any:
    """`body` as the pydantic `model`, or a 400 naming the first problem."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        message, param = describe(exc)
        raise ApiError(400, message, code="invalid_request", param=param) from None


def profile_header(request: Request) -> str | None:
    """X-RPO-Profile as the client sent it: UTF-8 bytes, or percent-encoded as rpo's own
    response headers carry it (a valid name never contains '%')."""
    value = request.headers.get("x-rpo-profile")
    if value is None:
        return None
    try:
        value = value.encode("latin-1").decode("utf-8")  # the server decoded the bytes as latin-1
        return unquote(value, errors="strict") if "%" in value else value
    except UnicodeError:
        raise ApiError(400, "the X-RPO-Profile header is not valid UTF-8", code="invalid_profile") from None


# -- the app ----------------------------------------------------------------------------------

def _completion_id() -> str:
    return f"chatcmpl-rpo-{uuid.uuid4().hex[:24]}"


def _rpo_headers(info: dict) -> dict[str, str]:
    headers = {"X-RPO-Personalized": "true" if info["personalized"] else "false", "X-RPO-Profile": _header(info["profile"])}
    if info.get("adapter"):
        headers["X-RPO-Adapter"] = _header(info["adapter"])
    if info.get("interaction_id") is not None:
        headers["X-RPO-Interaction-Id"] = str(info["interaction_id"])
    return headers


def _header(value: str) -> str:
    """A name as a header value: percent-encoded outside letters, digits and `-_.~`, so neither
    a newline nor a non-ASCII letter ever reaches the raw header (valid ASCII names read as they are)."""
    return quote(value, safe="-_.")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def create_app(daemon: Daemon) -> ASGIApp:
    """The ASGI app. Guards (Host, token) wrap every route; `daemon` does the work."""

    async def chat_completions(request: Request) -> Response:
        req: ChatRequest = parse(ChatRequest, await read_json(request, daemon.max_body_bytes))
        detail = req.rpo_trajectory or _truthy(request.headers.get("x-rpo-trajectory"))
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
                _stream(daemon, profile, reply, model, detail), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-RPO-Profile": _header(profile)},
            )
        outcome = await daemon.personalize(profile, reply.text)
        info = await run_in_threadpool(daemon.rpo_info, profile, outcome, detail=detail, generic=reply.text)
        body = {
            "id": _completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.text}, "finish_reason": "stop"}],
            "usage": _usage(reply.usage), "rpo": info,
        }
        return JSONResponse(body, headers=_rpo_headers(info))

    async def models(request: Request) -> Response:
        rows = await run_in_threadpool(daemon.locked, daemon.store.list_profiles)
        data = [{"id": f"rpo:{r['name']}", "object": "model", "created": 0, "owned_by": "rpo-local"} for r in rows]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def status(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(daemon.status))

    async def feedback(request: Request) -> Response:
        body: FeedbackRequest = parse(FeedbackRequest, await read_json(request, daemon.max_body_bytes))
        fid = await run_in_threadpool(daemon.locked, daemon.store.add_feedback, body.interaction_id, body.verdict,
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
            if daemon.worker.store is not daemon.store:
                daemon.worker.store.close()
            if hasattr(daemon.upstream, "close"):
                daemon.upstream.close()

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.message, exc.kind, exc.code, exc.param)

    async def rpo_error(request: Request, exc: Exception) -> Response:
        status = (404 if isinstance(exc, NotFound) else 400 if isinstance(exc, InputError)
                  else 503 if isinstance(exc, ReadOnlyDatabase) else 500)
        return error_response(status, _describe(exc), "invalid_request_error" if status < 500 else "server_error")

    async def internal_error(request: Request, exc: Exception) -> Response:
        logging.getLogger(__name__).error("internal error on %s", request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {_describe(exc)}", "server_error")

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
    return _Guard(app, daemon)  # type: ignore[return-value]


def _usage(usage: dict) -> dict:
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream(daemon: Daemon, profile: str, reply: Any, model: str, detail: bool) -> AsyncIterator[str]:
    """Server-sent events: the reply piece by piece as it is rewritten, then the rpo fields, then [DONE].

    The time budget runs until text is sent; pieces not started within it keep their generic text.
    """
    cid, created = _completion_id(), int(time.time())
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    generic: str = reply.text
    if not generic.strip():
        outcome = await daemon.finish(profile, generic, None, "the upstream reply is empty")
        yield chunk({}, "stop", rpo=daemon.rpo_info(profile, outcome, detail=detail, generic=generic))
        yield "data: [DONE]\n\n"
        return
    job = daemon.worker.submit_rewrite(
        profile, generic, on_text=lambda t: loop.call_soon_threadsafe(events.put_nowait, ("text", t)),
        deadline=time.monotonic() + daemon.budget_s,
    )
    job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, ("done", "")))
    sent: list[str] = []
    reason: str | None = None
    finished = False
    deadline = loop.time() + daemon.budget_s
    try:
        while True:
            timeout = None if sent else max(0.0, deadline - loop.time())
            try:
                kind, text = await asyncio.wait_for(events.get(), timeout)
            except TimeoutError:
                job.cancel()
                reason = f"the rewrite exceeded the time budget ({daemon.budget_s:g} s)"
                break
            if kind == "done":
                break
            sent.append(text)
            yield chunk({"content": text})
        result = None
        if reason is None:
            exc = job.future.exception() if not job.future.cancelled() else RewriteCancelled()
            if exc is not None:
                reason = f"the rewrite failed: {_describe(exc)}"
            else:
                result = job.future.result()
        if reason is not None:
            # Never lose the reply: whatever was cut short, the generic reply follows in full.
            tail = ("\n\n" if sent else "") + generic.strip()
            sent.append(tail)
            yield chunk({"content": tail})
        outcome = await daemon.finish(profile, generic, result, reason, "".join(sent))
        finished = True
        info = await run_in_threadpool(daemon.rpo_info, profile, outcome, detail=detail, generic=generic)
        yield chunk({}, "stop", rpo=info)
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away mid-stream: stop generating, keep the record
            job.cancel()
            daemon.record(profile, generic, None, "the client disconnected", "".join(sent) or None)


class _Guard:
    """ASGI middleware: Host header must be a loopback name (DNS rebinding), bearer token."""

    def __init__(self, app: Starlette, daemon: Daemon) -> None:
        self.app, self.daemon = app, daemon

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            problem = self._check(scope["path"], headers)
            if problem is not None:
                await problem(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, path: str, headers: dict[str, str]) -> Response | None:
        host = host_name(headers.get("host", ""))
        if host not in self.daemon.allowed_hosts:
            return error_response(403, f"Host {headers.get('host', '')!r} is not allowed; use 127.0.0.1 or localhost",
                                   "permission_error", "forbidden_host")
        key = self.daemon.api_key
        if key and path != "/health":
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return error_response(401, "missing or wrong API key (Authorization: Bearer $RPO_API_KEY)",
                                      "authentication_error", "invalid_api_key")
        return None


_HOST = re.compile(r"(?:\[(?P<ip6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9.-]+))(?::[0-9]{1,5})?")


def host_name(value: str) -> str:
    """The host of a Host header: `[::1]:8765` → `::1`, `LocalHost.:80` → `localhost`; "" for
    anything that is not exactly host[:port] (`localhost:80@evil.com`, a bare IPv6, spaces)."""
    match = _HOST.fullmatch(value.strip().lower())
    if match is None:
        return ""
    return match["ip6"] or match["name"].rstrip(".")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before uvicorn starts so a busy port is a clear error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port") from None
    sock.set_inheritable(False)
    return sock


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless explicitly allowed, and warn when it is."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise ConfigError(f"refusing to listen on {host}: not a loopback address (pass --allow-remote to do it anyway)")
    print(f"rpo: WARNING: listening on {host}: other machines can reach this daemon; "
          "set RPO_API_KEY to require a token", file=sys.stderr, flush=True)


def _uvicorn_server(app: Any, *, log_level: str = "warning", use_colors: bool = False):
    import uvicorn

    config = uvicorn.Config(app, lifespan="on", log_level=log_level, access_log=False, use_colors=use_colors,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def run(app: Any, sock: socket.socket, *, use_colors: bool = False) -> None:
    """Serve on `sock` until Ctrl-C (uvicorn finishes the requests in flight, then the lifespan stops)."""
    _uvicorn_server(app, use_colors=use_colors).run(sockets=[sock])


class BackgroundServer:
    """The real server on a loopback port in a thread (tests and the benchmark)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = _uvicorn_server(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

"""`rpo serve`: an OpenAI-compatible personalizing proxy on localhost.

A client that speaks the OpenAI API points its base URL at `http://127.0.0.1:PORT/v1`. For each
chat completion the daemon asks the upstream (a cloud endpoint, or offline the local base model)
for the generic reply, rewrites it in the profile's style with the reflection model, records the
interaction and answers. The user's reply is never lost: past the time budget, or when the
rewrite fails, the generic reply is returned and the reason recorded.

One module per responsibility:

| module | what it owns |
|---|---|
| `schema` | the request bodies (pydantic models) and their readable 400 messages |
| `request` | reading a request (size limit, JSON, profile header); the OpenAI-style error |
| `guard` | the Host (loopback names) and bearer-token check in front of every route |
| `worker` | the one thread that owns the reflection engine: rewrites and adapter switches, in order |
| `daemon` | the daemon's state; personalize within the time budget and record the interaction |
| `sse` | streamed completions (server-sent events) |
| `app` | the Starlette app: routes, error handlers, lifespan |
| `listen` | the listening socket, uvicorn, and the server in a thread for tests |
"""

from rpo_local.reflect import RewriteCancelled
from rpo_local.server.app import create_app
from rpo_local.server.daemon import MAX_BODY_BYTES, PIECE_GRACE_S, Daemon, Outcome
from rpo_local.server.guard import LOOPBACK_NAMES, Guard, host_name
from rpo_local.server.listen import DEFAULT_PORT, BackgroundServer, bind, check_host, is_loopback, run
from rpo_local.server.request import ApiError, error_response, parse, profile_header, read_json
from rpo_local.server.schema import ChatRequest, FeedbackRequest, Message
from rpo_local.server.worker import Job, QueueFull, ReflectionWorker, TextSink

__all__ = [
    "DEFAULT_PORT", "LOOPBACK_NAMES", "MAX_BODY_BYTES", "PIECE_GRACE_S", "ApiError", "BackgroundServer",
    "ChatRequest", "Daemon", "FeedbackRequest", "Guard", "Job", "Message", "Outcome", "QueueFull", "ReflectionWorker",
    "RewriteCancelled", "TextSink", "bind", "check_host", "create_app", "error_response",
    "host_name", "is_loopback", "parse", "profile_header", "read_json", "run",
]

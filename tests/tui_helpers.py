"""Shared pieces of the TUI tests: a fake upstream, a loopback OpenAI-compatible server, and
building the app around a pipeline with fixed sample data."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rpo_local.config import Config
from rpo_local.errors import UpstreamError
from rpo_local.upstream import UpstreamReply

SAMPLE_ITEMS = [
    "honestly the best ramen in town is the tiny place near the station lol",
    "cant make it tonight, drowning in tax forms. rain check?",
    "my cat knocked the plant over AGAIN. three times this week",
    "ok hot take: pineapple on pizza is fine, fight me",
]


def generic_answer(question: str) -> str:
    return f"Thank You For Your Question. Regarding {question.rstrip('?.!')}, The Answer Is Yes."


class FakeUpstream:
    """Answers every conversation with a fixed-shape, capitalised reply to its last message."""

    name = "fake-upstream"

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[list[dict]] = []

    def chat(self, messages, *, model=None, **params) -> UpstreamReply:
        self.calls.append(list(messages))
        if self.fail:
            raise UpstreamError("upstream http://127.0.0.1:9 unreachable: connection refused", 502)
        return UpstreamReply(generic_answer(messages[-1]["content"]), "fake")


def seed(store, profile: str = "alice") -> None:
    store.add_items(profile, [{"text": t, "kind": "chat", "source": "sample"} for t in SAMPLE_ITEMS])


def make_app(store, engine, *, upstream=None, profile: str = "alice", **kwargs):
    from rpo_local.reflect import Reflector
    from rpo_local.tui.app import ChatApp
    from rpo_local.tui.pipeline import ChatPipeline

    config = Config()
    pipeline = ChatPipeline(
        store, config, profile, upstream=upstream or FakeUpstream(), reflector=Reflector(store, engine, config)
    )
    return ChatApp(pipeline, cursor_blink=False, **kwargs)


async def settle(app, pilot) -> None:
    """Wait for every worker, then for the UI to process what they sent."""
    await app.workers.wait_for_complete()
    await pilot.pause()
    await pilot.pause()


async def send(app, pilot, text: str) -> None:
    from textual.widgets import TextArea

    app.screen.query_one("#prompt", TextArea).text = text
    await pilot.press("ctrl+j")
    await settle(app, pilot)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        reply = {
            "model": "loopback",
            "choices": [{"message": {"role": "assistant", "content": generic_answer(body["messages"][-1]["content"])}}],
            "usage": {},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def loopback_upstream() -> Iterator[tuple[str, list[dict]]]:
    """A real OpenAI-compatible HTTP server on 127.0.0.1; yields (base URL, received bodies)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", server.requests
    finally:
        server.shutdown()
        server.server_close()

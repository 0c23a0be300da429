"""One definition each: the adapter's display name, the interaction row, the one-line error.

Each test swaps the one definition and checks that every caller follows: a second copy
anywhere (the CLI, the TUI, the daemon) would keep its own answer and fail here."""

from __future__ import annotations

import asyncio
import json

import pytest
from fake_upstream import FakeUpstream as HttpUpstream
from fakes import FakeEngine
from tui_helpers import FakeUpstream, make_app, seed, send

from rpo_local import adapters, errors, reflect
from rpo_local.config import Config, load_config
from rpo_local.reflect import Reflector
from rpo_local.server import BackgroundServer, Daemon, create_app
from rpo_local.tui.pipeline import ChatPipeline
from rpo_local.upstream import OpenAIUpstream


@pytest.fixture
def daemon(store, fake_engine):
    return Daemon(store=store, engine=fake_engine, upstream=OpenAIUpstream("http://127.0.0.1:9"), config=load_config())


def test_one_store_in_the_daemon(store, daemon):
    # The handlers and the worker share the daemon's Store (a connection per thread, writes
    # serialized by the Store itself), not one connection each behind a lock of the daemon's.
    assert daemon.worker.store is store


def test_one_adapter_display_name(cli, store, fake_engine, daemon, monkeypatch):
    store.ensure_profile("alice")
    monkeypatch.setattr(adapters, "adapter_label", lambda store, path: "THE-ONE-LABEL")
    assert json.loads(cli("adapters", "list", "-p", "alice", "--json").stdout)["active"] == "THE-ONE-LABEL"
    assert ChatPipeline(store, Config(), "alice", upstream=FakeUpstream()).adapter_name() == "THE-ONE-LABEL"
    assert daemon.status()["adapter"] == "THE-ONE-LABEL"


def test_one_interaction_row(store, fake_engine, daemon, monkeypatch):
    store.add_items("alice", [{"text": "lol ok"}])
    built = reflect.interaction_row

    def marked(source, generic, result, **kwargs):
        return built(source, generic, result, **kwargs) | {"fallback_reason": f"row for {source}"}

    monkeypatch.setattr(reflect, "interaction_row", marked)
    iid = Reflector(store, fake_engine, Config()).rewrite("The Dog barks.", "alice").interaction_id
    assert store.get_interaction(iid)["fallback_reason"] == "row for api"
    outcome = daemon.record("alice", "The Dog barks.", None, "the upstream reply is empty")
    assert store.get_interaction(outcome.interaction_id)["fallback_reason"] == "row for serve"
    assert outcome.reason == "row for serve", "the daemon answers with the row it recorded"


def test_one_error_line(store, monkeypatch):
    monkeypatch.setattr(errors, "describe_error", lambda exc: f"ONE-LINE {type(exc).__name__}")

    def broken(prompt: str) -> str:
        raise RuntimeError("llama.cpp exploded")

    # the daemon: a failing rewrite, plain and streamed
    store.add_items("alice", [{"text": "lol ok"}])
    with HttpUpstream() as up:
        d = Daemon(store=store, engine=FakeEngine(broken), upstream=OpenAIUpstream(up.url), config=load_config())
        with BackgroundServer(create_app(d)) as server:
            import httpx

            body = {"model": "rpo:alice", "messages": [{"role": "user", "content": "hi"}]}
            plain = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).json()
            streamed = httpx.post(server.url + "/v1/chat/completions", json=body | {"stream": True}, timeout=30)
    assert plain["rpo"]["fallback_reason"] == "the rewrite failed: ONE-LINE RuntimeError"
    last = json.loads([line for line in streamed.text.splitlines() if line.startswith("data: {")][-1][6:])
    assert last["rpo"]["fallback_reason"] == "the rewrite failed: ONE-LINE RuntimeError"

    # the TUI: the upstream is down
    seed(store)
    app = make_app(store, FakeEngine(), upstream=FakeUpstream(fail=True))

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await send(app, pilot, "Anyone there?")
            assert any("ONE-LINE" in n.message for n in app._notifications)

    asyncio.run(scenario())

"""A bug behind a fallback is logged with its traceback; what the user sees stays short."""

from __future__ import annotations

import logging
import time

import httpx
import pytest
from fake_upstream import FakeUpstream
from fakes import FakeEngine

from rpo_local.config import load_config
from rpo_local.errors import InputError
from rpo_local.scheduler import TrainScheduler
from rpo_local.server import BackgroundServer, Daemon, create_app
from rpo_local.upstream import OpenAIUpstream


def broken(prompt: str) -> str:
    raise RuntimeError("llama.cpp exploded")


def test_a_failing_rewrite_is_logged_with_its_traceback(store, caplog):
    store.add_items("alice", [{"text": "lol ok"}])
    with FakeUpstream() as up:
        daemon = Daemon(store=store, engine=FakeEngine(broken), upstream=OpenAIUpstream(up.url), config=load_config())
        with BackgroundServer(create_app(daemon)) as server, caplog.at_level(logging.ERROR):
            r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
                "model": "rpo:alice", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == up.reply
    (record,) = [r for r in caplog.records if r.name == "rpo_local.server"]
    assert "alice" in record.getMessage() and record.exc_info and record.exc_info[0] is RuntimeError
    assert "Traceback" in caplog.text and "llama.cpp exploded" in caplog.text


def test_a_failing_streamed_rewrite_and_adapter_switch_are_logged_once_each(store, caplog, tmp_path):
    store.add_items("alice", [{"text": "lol ok"}])
    with FakeUpstream() as up:
        daemon = Daemon(store=store, engine=FakeEngine(broken), upstream=OpenAIUpstream(up.url), config=load_config())
        with BackgroundServer(create_app(daemon)) as server, caplog.at_level(logging.ERROR):
            r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
                "model": "rpo:alice", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and up.reply in r.text
            assert "the rewrite failed: RuntimeError: llama.cpp exploded" in r.text  # one line for the user

            def bad_adapter(path, scale=1.0):
                raise OSError(f"cannot read {path}")

            daemon.worker.ensure_adapter = lambda profile: bad_adapter(tmp_path / "gone.gguf")
            daemon.worker.switch_adapter("alice")  # what the scheduler does after a run: nobody waits on it
            deadline = time.monotonic() + 10
            while daemon.worker.stats["failed"] < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
    records = [r for r in caplog.records if r.name == "rpo_local.server"]
    assert [r.getMessage() for r in records] == [
        "the rewrite for profile 'alice' failed", "the adapter switch for profile 'alice' failed"]
    assert [r.exc_info[0] for r in records] == [RuntimeError, OSError]


def test_a_scheduler_bug_is_logged_and_the_scheduler_keeps_watching(store, caplog, monkeypatch):
    calls: list[int] = []

    def buggy() -> list:
        calls.append(1)
        raise KeyError("profiles")

    sched = TrainScheduler(store, load_config(), check_s=0.05, persist=False)
    monkeypatch.setattr(store, "list_profiles", buggy)
    with caplog.at_level(logging.ERROR):
        sched.start()
        deadline = time.monotonic() + 20
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        sched.stop()
    assert len(calls) >= 2, "the loop went on after the bug"
    records = [r for r in caplog.records if r.name == "rpo_local.scheduler"]
    assert records and records[0].exc_info and records[0].exc_info[0] is KeyError


def test_a_training_bug_keeps_its_traceback_in_the_run_record(store, monkeypatch):
    from rpo_local.training import pipeline, sft

    store.add_items("ann", [{"text": f"ok so number {i} is done lol, ttyl {i}"} for i in range(12)])

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug in training")

    monkeypatch.setattr(sft, "train", bug)
    with pytest.raises(ZeroDivisionError):
        pipeline.run_sft(store, "ann", cfg=sft.SFTConfig(), engine=FakeEngine(lambda p: "A plain version."),
                         progress=False)
    (run,) = store.list_train_runs("ann")
    assert run["status"] == "failed" and run["error"].startswith("Traceback")
    assert "ZeroDivisionError: a bug in training" in run["error"] and "in bug" in run["error"]
    assert run["summary"]["reason"] == "ZeroDivisionError: a bug in training"


def test_an_expected_failure_stays_one_line(store, monkeypatch):
    from rpo_local.training import pipeline, sft

    store.add_items("ann", [{"text": f"ok so number {i} is done lol, ttyl {i}"} for i in range(12)])

    def refuse(*args, **kwargs):
        raise InputError("not enough memory for this rank")

    monkeypatch.setattr(sft, "train", refuse)
    out = pipeline.run_sft(store, "ann", cfg=sft.SFTConfig(), engine=FakeEngine(lambda p: "A plain version."),
                           progress=False)
    assert out.status == "failed" and store.list_train_runs("ann")[0]["error"] == "not enough memory for this rank"

"""The periodic fine-tuning scheduler, with a small fake `rpo train auto` (a real child process
that registers and activates an adapter in the real database), and the daemon's hot swap."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fake_upstream import FakeUpstream

from rpo_local.config import load_config
from rpo_local.scheduler import TrainScheduler, parse_report, read_state
from rpo_local.server import BackgroundServer, Daemon, create_app
from rpo_local.store import Store
from rpo_local.upstream import OpenAIUpstream

# Records its run in train_runs as the real pipeline does (Store API), without the model.
FAKE_TRAIN = '''
import json, os, sys, time
from rpo_local.store import Store
profile, mode = sys.argv[1], os.environ.get("FAKE_TRAIN_MODE", "activate")
time.sleep(float(os.environ.get("FAKE_TRAIN_SLEEP", "0")))
print("training...", file=sys.stderr)
if mode == "fail":
    sys.exit(2)
figures = {"nice": os.nice(0) if hasattr(os, "nice") else None}
adapter, adapter_id = None, None
with Store.open() as store:
    run = store.start_train_run(profile, "sft", store.material_marks(profile))
    if mode == "activate":
        # counts this profile's own adapters: built-in ones may be registered for a real base
        n = sum(a["name"].startswith(profile + "-auto-") for a in store.list_adapters())
        adapter = f"{profile}-auto-{n + 1}"
        path = os.environ.get("FAKE_TRAIN_ADAPTER") or os.path.join(os.environ["RPO_HOME"], adapter + ".lora.gguf")
        if not os.path.exists(path):
            open(path, "wb").close()
        adapter_id = store.register_adapter(adapter, path, profile=profile)
        store.set_active_adapter(profile, adapter_id)
    status = "activated" if mode == "activate" else "rejected"
    store.finish_train_run(run, status, adapter_id=adapter_id)
print(json.dumps({"status": status, "adapter": adapter, "reason": "better on held-out items", "figures": figures},
                 indent=2))
'''


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    monkeypatch.setenv("FAKE_TRAIN_MODE", "activate")
    return lambda profile: [sys.executable, str(script), profile]


def make(store: Store, command, *, min_items: int = 8, hours: float = 24.0, **kw) -> TrainScheduler:
    config = load_config()
    config.train_min_new_items, config.train_interval_hours = min_items, hours
    return TrainScheduler(store, config, command=command, **kw)


def run_to_end(sched: TrainScheduler, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sched._proc is not None:
        assert time.monotonic() < deadline, "the training run did not finish"
        time.sleep(0.05)
        sched.tick()


def test_parse_report():
    assert parse_report('{"status": "skipped"}') == {"status": "skipped"}
    assert parse_report('noise\n{\n  "status": "activated",\n  "figures": {"a": 1}\n}\n')["figures"] == {"a": 1}
    assert parse_report("no json at all") is None and parse_report('{"status": ') is None


def test_runs_when_enough_material_then_respects_the_interval(store, fake_train):
    switched: list[str] = []
    sched = make(store, fake_train, switch=switched.append)
    store.add_items("alice", [{"text": f"text {i}"} for i in range(7)])
    sched.tick()
    assert sched._proc is None and sched.status()["profiles"]["alice"]["new_material"] == 7
    store.add_item("alice", "the eighth")
    sched.tick()
    assert sched._proc is not None, "8 new items reach the threshold"
    assert sched.status()["running"]["profile"] == "alice"
    run_to_end(sched)
    last = sched.status()["profiles"]["alice"]["last_run"]
    assert last["status"] == "activated" and last["adapter"] == "alice-auto-1" and switched == ["alice"]
    if last["figures"]["nice"] is not None:
        assert last["figures"]["nice"] >= 10, "the run is low priority"
    assert "training..." in Path(last["log"]).read_text()
    assert store.active_adapter("alice")["name"] == "alice-auto-1"

    store.add_items("alice", [{"text": f"more {i}"} for i in range(5)])
    sched.tick()
    info = sched.status()["profiles"]["alice"]
    assert sched._proc is None and info["new_material"] == 5 and not info["interval_ok"]
    assert info["next_run_earliest"] > last["started_at"]
    # A restarted daemon remembers both the watermark and the last run.
    again = make(store, fake_train)
    assert again.status()["profiles"]["alice"]["new_material"] == 5
    again.tick()
    assert again._proc is None
    assert read_state()["profiles"]["alice"]["last_run"]["status"] == "activated"


def test_rejected_feedback_counts_and_a_short_interval_allows_another_run(store, fake_train, monkeypatch):
    sched = make(store, fake_train, min_items=2, hours=0.0)
    store.add_items("alice", [{"text": t} for t in "abcdefgh"])
    sched.tick()
    run_to_end(sched)
    monkeypatch.setenv("FAKE_TRAIN_MODE", "reject")
    iid = store.record_interaction("alice", input="x", rewrite="y")
    store.add_feedback(iid, "rejected")
    store.add_item("alice", "one more")
    assert sched.status()["profiles"]["alice"]["new_material"] == 2
    sched.tick()
    run_to_end(sched)
    last = sched.status()["profiles"]["alice"]["last_run"]
    assert last["status"] == "rejected" and store.active_adapter("alice")["name"] == "alice-auto-1"


def test_a_failed_run_keeps_the_material(store, fake_train, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_MODE", "fail")
    switched: list[str] = []
    sched = make(store, fake_train, switch=switched.append)
    store.add_items("alice", [{"text": t} for t in "abcdefgh"])
    sched.tick()
    run_to_end(sched)
    info = sched.status()["profiles"]["alice"]
    assert info["last_run"]["status"] == "failed" and "exit code 2" in info["last_run"]["reason"]
    assert info["new_material"] == 8 and switched == []
    # The run died before recording itself: the scheduler recorded it, so the interval applies.
    (run,) = store.list_train_runs("alice")
    assert run["status"] == "failed" and "exit code 2" in run["error"] and not info["interval_ok"]
    sched.tick()
    assert sched._proc is None


def test_a_run_made_outside_the_daemon_covers_its_material(store, fake_train):
    """`rpo train sft` from cron or the TUI records what it trained on: the daemon counts from there."""
    store.add_items("bob", [{"text": t} for t in "abcdefghij"])
    run = store.start_train_run("bob", "sft", store.material_marks("bob"))
    store.finish_train_run(run, "rejected")
    store.add_items("bob", [{"text": "k"}])
    sched = make(store, fake_train, hours=0.0)
    assert sched.status()["profiles"]["bob"]["new_material"] == 1
    sched.tick()
    assert sched._proc is None


def test_stop_terminates_a_running_training(store, fake_train, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_SLEEP", "60")
    sched = make(store, fake_train, check_s=0.05)
    store.add_items("alice", [{"text": t} for t in "abcdefgh"])
    sched.start()
    deadline = time.monotonic() + 10
    while sched._proc is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc = sched._proc
    assert proc is not None and sched.status()["enabled"]
    sched.stop()
    assert proc.poll() is not None, "the child was terminated"


def test_daemon_hot_swaps_the_adapter_while_requests_continue(store, fake_engine, fake_train, monkeypatch):
    """The scheduler trains in a child process while requests keep being answered; when the run
    activates an adapter, the engine switches to it between requests (same engine object)."""
    import openai

    monkeypatch.setenv("FAKE_TRAIN_SLEEP", "1")
    store.add_items("alice", [{"text": t} for t in ("lol ok", "ttyl", "sounds good", "k", "brb", "omg", "yes", "no")])
    with FakeUpstream() as up:
        config = load_config()
        config.train_min_new_items = 8
        daemon = Daemon(store=store, engine=fake_engine, upstream=OpenAIUpstream(up.url), config=config)
        daemon.scheduler = TrainScheduler(
            store, config, switch=daemon.worker.switch_adapter, command=fake_train, check_s=0.1
        )
        with BackgroundServer(create_app(daemon)) as server:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
            answered, stop = [], threading.Event()

            def keep_asking() -> None:
                while not stop.is_set():
                    raw = c.chat.completions.with_raw_response.create(
                        model="rpo:alice", messages=[{"role": "user", "content": "hi"}])
                    answered.append((raw.status_code, raw.headers.get("x-rpo-adapter")))

            asker = threading.Thread(target=keep_asking)
            asker.start()
            deadline = time.monotonic() + 60
            # The next request may switch before the scheduler collects the run: wait for both.
            while time.monotonic() < deadline and (
                fake_engine.adapter_path is None or not daemon.scheduler.status()["profiles"]["alice"]["last_run"]
            ):
                time.sleep(0.05)
            time.sleep(0.3)
            stop.set()
            asker.join()
            status = httpx.get(server.url + "/v1/rpo/status").json()
    assert fake_engine.adapter_path is not None and fake_engine.adapter_path.name == "alice-auto-1.lora.gguf"
    assert status["training"]["profiles"]["alice"]["last_run"]["status"] == "activated"
    assert status["adapter"] == "alice-auto-1" and status["queue"]["adapter_switches"] >= 1
    assert all(code == 200 for code, _ in answered) and len(answered) > 5
    assert answered[0][1] != "alice-auto-1" and answered[-1][1] == "alice-auto-1", "requests continued across the swap"
    assert store.counts()["interactions"] == len(answered)


def test_a_command_that_cannot_run_is_a_failed_run(store, tmp_path):
    sched = make(store, lambda p: [str(tmp_path / "no-such-program")])
    store.add_items("Zoë_b", [{"text": t} for t in "abcdefgh"])  # a name that is no plain file name
    sched.tick()
    run_to_end(sched)
    last = sched.status()["profiles"]["Zoë_b"]["last_run"]
    assert last["status"] == "failed" and ("cannot start" in last["reason"] or "exit code 127" in last["reason"])
    assert not sched.status()["profiles"]["Zoë_b"]["interval_ok"]


def test_background_runs_leave_half_the_cores_to_serving(monkeypatch):
    from rpo_local.config import load_config
    from rpo_local.scheduler import background_threads, low_priority

    cmd, extra = low_priority(["rpo", "train", "auto"])
    assert cmd[-3:] == ["rpo", "train", "auto"]
    assert extra["env"]["RPO_N_THREADS"] == str(background_threads())
    assert 1 <= background_threads() <= max(1, (os.cpu_count() or 2) // 2)
    monkeypatch.setenv("RPO_N_THREADS", extra["env"]["RPO_N_THREADS"])
    assert load_config().n_threads == background_threads()  # what the child's engine and torch use

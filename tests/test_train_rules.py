"""When training runs and who may run it: one rule for `rpo train auto` and the daemon, one run
per profile at a time (a lock held across processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rpo_local.config import load_config
from rpo_local.scheduler import TrainScheduler

ROOT = Path(__file__).resolve().parents[1]
OLD = "2020-01-01T00:00:00+00:00"  # history imported today can be dated years back


@pytest.fixture
def fake_training(monkeypatch):
    """The training step itself (model, torch) replaced: the rule, the lock, the train_runs
    records and the CLI stay real. Returns the profiles trained."""
    from rpo_local.training import pipeline

    trained: list[str] = []

    def train(store, profile, *args, **kwargs):
        trained.append(profile)
        return pipeline.Outcome("rejected", None, "trained (fake); the current adapter stays")

    monkeypatch.setattr(pipeline, "_run", train)
    handler = signal.getsignal(signal.SIGTERM)
    yield trained
    signal.signal(signal.SIGTERM, handler)  # `rpo train` turns SIGTERM into Ctrl-C


def test_train_auto_and_the_daemon_apply_one_rule(cli, store, fake_training, monkeypatch):
    """Wherever the daemon would start a run, `rpo train auto` trains (never "skipped"), and
    where it would not, train auto skips: imported old texts and rejected rewrites count for both."""
    monkeypatch.setenv("RPO_TRAIN_MIN_NEW_ITEMS", "3")
    monkeypatch.setenv("RPO_TRAIN_INTERVAL_HOURS", "0")
    daemon = TrainScheduler(store, load_config(), persist=False)

    def both() -> tuple[bool, str]:
        due = daemon.profile_status("ann")["due"]
        r = cli("train", "auto", "--profile", "ann", "--json")
        assert r.code == 0, r
        return due, json.loads(r.stdout)["status"]

    store.add_items("ann", [{"text": f"an old mail, number {i}", "created_at": OLD} for i in range(10)])
    assert both() == (True, "rejected") and fake_training == ["ann"]
    assert both() == (False, "skipped"), "the run covered everything there was"
    store.add_items("ann", [{"text": f"another old mail, {i}", "created_at": OLD} for i in range(3)])
    assert both() == (True, "rejected"), "texts imported after the run are new, whatever their date"
    for i in range(3):
        store.add_feedback(store.record_interaction("ann", input=f"reply {i}", rewrite=f"rewrite {i}"), "rejected")
    assert both() == (True, "rejected"), "rejected rewrites are new material for train auto too"
    store.add_items("ann", [{"text": "one"}, {"text": "two"}])
    assert both() == (False, "skipped")
    assert fake_training == ["ann"] * 3
    runs = store.list_train_runs("ann")
    assert [r["status"] for r in runs] == ["rejected"] * 3 and runs[0]["item_mark"] == 13


def test_the_interval_and_the_minimum_history_hold_for_both(cli, store, fake_training, monkeypatch):
    monkeypatch.setenv("RPO_TRAIN_MIN_NEW_ITEMS", "3")
    daemon = TrainScheduler(store, load_config(), persist=False)
    store.add_items("ann", [{"text": t} for t in ("one", "two", "three")])
    r = cli("train", "auto", "--profile", "ann", "--json")
    assert json.loads(r.stdout)["status"] == "skipped" and "at least 8" in json.loads(r.stdout)["reason"]
    assert not daemon.profile_status("ann")["due"], "a run would only fail: too few texts to train on"
    store.add_items("ann", [{"text": f"text {i}"} for i in range(8)])
    assert json.loads(cli("train", "auto", "--profile", "ann", "--json").stdout)["status"] == "rejected"
    store.add_items("ann", [{"text": f"later {i}"} for i in range(5)])
    status = daemon.profile_status("ann")
    assert status["new_material"] == 5 and not status["interval_ok"] and not status["due"]
    doc = json.loads(cli("train", "auto", "--profile", "ann", "--json").stdout)
    assert doc["status"] == "skipped" and "interval 24.0 h" in doc["reason"]


# A training run that holds the lock: the real pipeline with the fake engine, stopped inside
# the training step until the test lets it go.
HOLDER = """
import pathlib, sys, time
sys.path.insert(0, sys.argv[1])
from fakes import FakeEngine
from rpo_local.errors import InputError
from rpo_local.store import Store
from rpo_local.training import pipeline, sft
signals = pathlib.Path(sys.argv[2])

def hold(model_path, examples, run_dir, *args, **kwargs):
    (signals / "training").write_text(str(run_dir))
    while not (signals / "go").exists():
        time.sleep(0.05)
    raise InputError("stopped before training (the test needs no torch)")

sft.train = hold
with Store.open() as store:
    out = pipeline.run_sft(store, "ann", cfg=sft.SFTConfig(), engine=FakeEngine(lambda p: "A plain version."),
                           progress=False)
print(out.status, out.reason)
"""


def start_holder(signals: Path) -> subprocess.Popen:
    signals.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT / "tests"), str(signals)],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (signals / "training").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the first run never reached training"
        time.sleep(0.05)
    return proc


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "RPO_N_THREADS": "1"}


def rpo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rpo_local", *args], env=child_env(), capture_output=True,
                          text=True, timeout=120)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_run_of_the_same_profile_is_refused_and_touches_nothing(store, tmp_path):
    from rpo_local import paths

    store.add_items("ann", [{"text": f"ok so number {i} is done lol, ttyl {i}"} for i in range(12)])
    store.add_items("bob", [{"text": f"bob's text {i}"} for i in range(3)])
    holder = start_holder(tmp_path / "signals")
    try:
        before = snapshot(paths.runs_dir())
        assert any(name.startswith("paraphrases-") for name in before) and any("train.jsonl" in n for n in before)
        for verb in ("sft", "auto"):
            r = rpo("train", verb, "--profile", "ann", "--json")
            assert r.returncode == 13, r.stderr
            assert r.stdout == "" and "being trained by another process" in r.stderr and "Traceback" not in r.stderr
        assert snapshot(paths.runs_dir()) == before, "the refused runs wrote nothing"
        assert [r["status"] for r in store.list_train_runs("ann")] == ["running"]
        r = rpo("train", "sft", "--profile", "bob", "--json")  # another profile is not held up by the lock
        assert r.returncode == 3 and json.loads(r.stdout)["status"] == "failed" and "at least 8" in r.stdout
    finally:
        (tmp_path / "signals" / "go").write_text("")
        out, err = holder.communicate(timeout=60)
    assert holder.returncode == 0 and out.startswith("failed stopped before training"), err
    assert [r["status"] for r in store.list_train_runs("ann")] == ["failed"]


def test_a_killed_run_leaves_the_lock_free(store, tmp_path):
    store.add_items("ann", [{"text": f"ok so number {i} is done lol, ttyl {i}"} for i in range(12)])
    holder = start_holder(tmp_path / "signals")
    holder.kill()  # kill -9 while it holds the lock
    holder.communicate(timeout=30)
    probe = "from rpo_local.training.pipeline import training_lock\nwith training_lock('ann'): print('got it')"
    r = subprocess.run([sys.executable, "-c", probe], env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "got it", r.stderr

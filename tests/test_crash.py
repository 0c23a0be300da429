"""Nothing lost under kill -9, and nothing needs the network: real `rpo` processes, a real
SQLite file, a real daemon process on loopback (with the fake reflection engine: the model is
irrelevant to what is checked), killed with SIGKILL at chosen moments."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """The test's environment (its RPO_HOME: read at call time), running this checkout."""
    assert "RPO_HOME" in os.environ
    return {**os.environ, "NO_COLOR": "1", "PYTHONPATH": str(ROOT)}


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("pragma integrity_check").fetchone()[0]
    finally:
        conn.close()


def count(db: Path, sql: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def test_kill_9_during_import_imports_all_or_nothing(rpo_home, tmp_path):
    """Killed while the import's transaction is being written (its WAL file growing): nothing
    of it is in the database, which is intact; the rerun imports everything."""
    from rpo_local.store import Store

    n = 20000
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": f"message number {i}, see u later"}) + "\n" for i in range(n)))
    with Store.open() as store:  # schema and profile in place; closing removes the WAL file
        store.ensure_profile("ann")
    db = rpo_home / "data" / "rpo.db"
    wal = db.with_name(db.name + "-wal")
    cmd = [sys.executable, "-m", "rpo_local", "history", "import", str(big), "--profile", "ann"]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while proc.poll() is None and not (wal.exists() and wal.stat().st_size > 256_000):
        assert time.monotonic() < deadline, "the import never started writing"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "killed mid-import, not after it finished"
    assert integrity(db) == "ok"
    assert count(db, "select count(*) from items") == 0, "an interrupted import leaves nothing half-done"
    r = subprocess.run(cmd, env=child_env(), capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert count(db, "select count(*) from items") == n and integrity(db) == "ok"


SERVE = '''
import sys, threading, time
sys.path.insert(0, sys.argv[3])
from fakes import FakeEngine
from rpo_local.config import load_config
from rpo_local.server import BackgroundServer, Daemon, create_app
from rpo_local.store import Store
from rpo_local.upstream import OpenAIUpstream

store = Store.open()
daemon = Daemon(store=store, engine=FakeEngine(), upstream=OpenAIUpstream(sys.argv[1]), config=load_config())
ids = [a["id"] for a in store.list_adapters()]

def activate():  # adapter activations keep happening while requests are served
    other = Store.open(store.path)
    n = 0
    while True:
        other.set_active_adapter("default", ids[n % 2])
        daemon.worker.switch_adapter("default")
        n += 1
        time.sleep(0.01)

with BackgroundServer(create_app(daemon)) as server:
    threading.Thread(target=activate, daemon=True).start()
    open(sys.argv[2], "w").write(server.url)
    while True:
        time.sleep(1)
'''


def test_kill_9_while_serving_and_activating_loses_no_answered_reply(rpo_home, tmp_path):
    from rpo_local.store import Store

    with Store.open() as store:
        store.add_items("default", [{"text": t} for t in ("lol ok", "ttyl!!", "sounds good tbh")])
        adapters = []
        for name in ("a1", "a2"):
            path = tmp_path / f"{name}.lora.gguf"
            path.write_bytes(b"fake")
            adapters.append(store.register_adapter(name, path, profile="default"))
        store.set_active_adapter("default", adapters[0])
    script, url_file = tmp_path / "serve.py", tmp_path / "url"
    script.write_text(SERVE)
    answered: list[int] = []
    with FakeUpstream() as up:
        proc = subprocess.Popen([sys.executable, str(script), up.url, str(url_file), str(ROOT / "tests")], env=child_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not url_file.exists() or not url_file.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
                time.sleep(0.1)
            url, stop = url_file.read_text(), threading.Event()

            def ask() -> None:
                with httpx.Client(timeout=10) as c:
                    while not stop.is_set():
                        try:
                            r = c.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
                        except httpx.TransportError:
                            return  # the daemon is gone
                        assert r.status_code == 200, r.text
                        answered.append(r.json()["rpo"]["interaction_id"])

            askers = [threading.Thread(target=ask) for _ in range(6)]
            for t in askers:
                t.start()
            while len(answered) < 30 and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)  # mid-traffic, mid-activation
            proc.wait(10)
            stop.set()
            for t in askers:
                t.join(15)
        finally:
            if proc.poll() is None:
                proc.kill()
    db = rpo_home / "data" / "rpo.db"
    assert len(answered) >= 30 and integrity(db) == "ok"
    with Store.open(db) as store:
        recorded = {r["id"] for r in store.db.query("select id from interactions")}
        assert set(answered) <= recorded, "every reply a client received is in the database"
        active = store.active_adapter("default")
        assert active is not None and active["id"] in adapters and Path(active["path"]).is_file()


@pytest.mark.model
def test_everything_works_with_no_network(rpo_home):
    """In a network namespace with only a loopback interface: history, rewrite with the embedded
    model, doctor. Nothing tries to reach the network (model hubs, telemetry)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode:
        pytest.skip("cannot create a network namespace here (unshare -n)")

    def rpo(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
        return subprocess.run(["unshare", "-n", sys.executable, "-m", "rpo_local", *args], input=stdin,
                              capture_output=True, env=child_env(), timeout=300)

    r = rpo("history", "add", "--profile", "sam", "ugh so tired lol", "gonna crash early 2nite")
    assert r.returncode == 0, r.stderr
    r = rpo("rewrite", "--profile", "sam", stdin=b"I am very tired and I will go to bed early tonight.")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = rpo("doctor", "--profile", "sam", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["problems"] == [], r.stderr

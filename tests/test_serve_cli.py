"""`rpo serve` on the command line: refusals before any model loads, and the real daemon as a
separate process (embedded model, real SQLite file, loopback HTTP), stopped with Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from fake_upstream import FakeUpstream

from rpo_local.store import Store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_non_loopback_host_needs_allow_remote(cli):
    result = cli("serve", "--host", "10.9.8.7", "--no-train")
    assert result.code == 9 and "--allow-remote" in result.stderr and result.stdout == ""


def test_busy_port_is_a_clear_error(cli):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        result = cli("serve", "--port", str(s.getsockname()[1]), "--no-train")
    assert result.code == 9 and "cannot listen" in result.stderr


def test_help_names_the_time_limits_and_their_settings(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = " ".join(cli("serve", "--help").stdout.split())  # however the help is wrapped
    assert "--upstream-timeout" in out and "upstream_timeout_s; default 120" in out
    assert "--timeout" in out and "rewrite_timeout_s; default 30" in out
    assert "--max-queued" in out and "max_queued_requests; default 32" in out


def test_help_does_not_import_heavy_modules():
    code = "import sys; from rpo_local.cli import app; print(sorted(m for m in ('llama_cpp', 'torch', 'starlette', 'uvicorn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.model
def test_daemon_process_serves_records_and_stops_on_ctrl_c(rpo_home):
    with Store.open() as store:
        store.add_items("default", [{"text": "ok cool, see u at 5", "kind": "chat"}])
    port = free_port()
    with FakeUpstream() as up:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rpo_local", "serve", "--port", str(port), "--upstream", up.url, "--no-train"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"},
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "no start"
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
            reply = c.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content.strip()
            iid = reply.rpo["interaction_id"]
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130), err
    assert out == "", "nothing on stdout: the daemon has no result"
    assert f"127.0.0.1:{port}/v1" in err
    with Store.open() as store:
        assert store.get_interaction(iid)["source"] == "serve"

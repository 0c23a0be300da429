"""The whole loop for real: the daemon serves with the embedded model while its scheduler runs the
real `rpo train auto` in a low-priority child process, then hot-swaps the new adapter into the
same loaded model. Slow (a real training run, ~5 min on a busy 2-core CPU): marked `model` and `train`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time

import openai
import pytest
from fake_upstream import FakeUpstream

from rpo_local.config import load_config
from rpo_local.scheduler import TrainScheduler, train_command
from rpo_local.server import BackgroundServer, Daemon, create_app
from rpo_local.training.due import MIN_ITEMS
from rpo_local.upstream import OpenAIUpstream

pytestmark = [pytest.mark.model, pytest.mark.train]


def _train_auto_available() -> bool:
    if importlib.util.find_spec("rpo_local.cli.train") is None or importlib.util.find_spec("rpo_local.lora_runtime") is None:
        return False
    import typer

    from rpo_local.cli import app

    return "train" in typer.main.get_command(app).commands


@pytest.mark.skipif(not _train_auto_available(), reason="`rpo train auto` / lora_runtime not available yet")
def test_scheduler_trains_for_real_and_hot_swaps_while_serving(store, lamp7, model_path, monkeypatch):
    from rpo_local.engine import LlamaEngine

    with lamp7.open(encoding="utf-8") as fh:
        user = json.loads(fh.readline())
    store.add_items("alice", [{"text": p["text"], "kind": "post"} for p in user["profile"]])
    engine = LlamaEngine(model_path, n_ctx=2048)  # its own: the session engine keeps no adapter
    llm = engine.llm
    with FakeUpstream(reply=user["input"].split(": ", 1)[-1]) as up:
        # Through the environment, so the training process sees the same thresholds.
        monkeypatch.setenv("RPO_TRAIN_MIN_NEW_ITEMS", "8")
        monkeypatch.setenv("RPO_TRAIN_INTERVAL_HOURS", "0")
        monkeypatch.setenv("RPO_REWRITE_TIMEOUT_S", "120")
        config = load_config()
        daemon = Daemon(store=store, engine=engine, upstream=OpenAIUpstream(up.url), config=config)
        daemon.scheduler = TrainScheduler(
            store, config, switch=daemon.worker.switch_adapter,
            command=train_command, check_s=0.5,
        )
        with BackgroundServer(create_app(daemon)) as server:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
            codes, stop = [], threading.Event()

            def keep_asking() -> None:
                while not stop.is_set():
                    raw = c.chat.completions.with_raw_response.create(
                        model="rpo:alice", messages=[{"role": "user", "content": "tweet?"}])
                    codes.append(raw.status_code)
                    time.sleep(3.0)  # leaves the CPU mostly to the training run, as real traffic does

            asker = threading.Thread(target=keep_asking)
            asker.start()
            deadline = time.monotonic() + 1500
            while not daemon.scheduler.status()["profiles"]["alice"]["last_run"]:
                assert time.monotonic() < deadline, "the training run did not finish in time"
                time.sleep(1.0)
            last = daemon.scheduler.status()["profiles"]["alice"]["last_run"]
            after = c.chat.completions.with_raw_response.create(
                model="rpo:alice", messages=[{"role": "user", "content": "tweet?"}])
            stop.set()
            asker.join()
    assert last["status"] in {"activated", "rejected"}, last
    assert codes and all(code == 200 for code in codes), "serving went on during training"
    if last["status"] == "activated":
        active = store.active_adapter("alice")
        assert active["name"] == last["adapter"] and str(engine.adapter_path) == active["path"]
        assert after.headers["x-rpo-adapter"] == active["name"]
        assert engine.llm is llm, "the base model was not reloaded"


@pytest.mark.skipif(importlib.util.find_spec("rpo_local.lora_runtime") is None, reason="lora_runtime not available yet")
def test_real_engine_hot_swaps_a_real_adapter_while_serving(store, tmp_path, model_path, monkeypatch):
    """A real GGUF LoRA (random weights, exported like a trained one) activated by a training
    process; the loaded llama.cpp model switches to it between requests, never reloading."""
    import torch
    from test_scheduler import FAKE_TRAIN

    from rpo_local.engine import LlamaEngine
    from rpo_local.training import export, sft

    torch.manual_seed(0)
    cfg = sft.SFTConfig(rank=4, alpha=8.0, dropout=0.0)
    base, _ = sft.load_base(model_path)
    lora = export.export_gguf(sft.add_lora(base, cfg), tmp_path / "rand.lora.gguf")
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    monkeypatch.setenv("FAKE_TRAIN_ADAPTER", str(lora))
    monkeypatch.setenv("FAKE_TRAIN_SLEEP", "2")
    texts = ("lol ok", "ttyl!!", "sounds good tbh", "nah im good", "omg yes", "brb", "k thx", "same lol")
    assert len(texts) >= MIN_ITEMS, "a profile with fewer texts is never due"
    store.add_items("alice", [{"text": t, "kind": "chat"} for t in texts])
    engine = LlamaEngine(model_path, n_ctx=2048)
    llm = engine.llm
    with FakeUpstream() as up:
        config = load_config()
        config.train_min_new_items, config.rewrite_timeout_s = 3, 120.0
        daemon = Daemon(store=store, engine=engine, upstream=OpenAIUpstream(up.url), config=config)
        daemon.scheduler = TrainScheduler(
            store, config, switch=daemon.worker.switch_adapter,
            command=lambda p: [sys.executable, str(script), p], check_s=0.2,
        )
        with BackgroundServer(create_app(daemon)) as server:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
            seen: list[tuple[int, str | None]] = []
            deadline = time.monotonic() + 300
            while engine.adapter_path != lora or len(seen) < 2 or seen[-1][1] != "alice-auto-1":
                assert time.monotonic() < deadline, "no swap"
                raw = c.chat.completions.with_raw_response.create(
                    model="rpo:alice", messages=[{"role": "user", "content": "hi"}], max_tokens=16)
                seen.append((raw.status_code, raw.headers.get("x-rpo-adapter")))
    assert all(code == 200 for code, _ in seen) and seen[0][1] != "alice-auto-1"
    assert seen[-1][1] == "alice-auto-1" and engine.adapter_path == lora
    assert engine.llm is llm, "the base model was not reloaded"
    assert store.counts()["interactions"] == len(seen)

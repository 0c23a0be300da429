"""Where the models run (rpo_local.devices): the gpu_layers and device rules, and what a CPU-only
build of llama.cpp does when a GPU is asked for. The GPU itself is exercised in test_gpu.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rpo_local import devices
from rpo_local.errors import GpuError, InputError


def test_gpu_layers_setting_accepts_words_and_block_counts_only():
    assert [devices.check_gpu_layers(v) for v in ("auto", " ALL ", "none", "12")] == ["auto", "all", "none", "12"]
    for bad in ("-1", "lots", "1.5", ""):
        with pytest.raises(ValueError):
            devices.check_gpu_layers(bad)


@pytest.mark.parametrize(("setting", "gpu_build", "expected"), [
    ("auto", True, -1), ("auto", False, 0), ("all", True, -1), ("12", True, 12), ("none", True, 0),
    ("0", False, 0), ("none", False, 0),
])
def test_offload_layers(setting, gpu_build, expected):
    notes: list[str] = []
    assert devices.offload_layers(setting, gpu_build=gpu_build, cpu_fallback=False, note=notes.append) == expected
    assert notes == []


@pytest.mark.parametrize("setting", ["all", "8"])
def test_a_gpu_asked_of_a_cpu_build_is_an_error_unless_the_cpu_is_allowed(setting):
    with pytest.raises(GpuError) as caught:
        devices.offload_layers(setting, gpu_build=False, cpu_fallback=False, note=print)
    assert "offloads to no GPU" in caught.value.message and "cpu_fallback" in caught.value.message
    notes: list[str] = []
    assert devices.offload_layers(setting, gpu_build=False, cpu_fallback=True, note=notes.append) == 0
    assert len(notes) == 1 and "running on the CPU" in notes[0]


def test_a_failed_gpu_load_is_an_error_or_a_note():
    with pytest.raises(GpuError, match="on the GPU \\(CUDA\\).*too little GPU memory.*cpu_fallback"):
        devices.load_failed(ValueError("Failed to load model from file"), "CUDA", False, print)
    notes: list[str] = []
    devices.load_failed(ValueError("Failed to load model from file"), "CUDA", True, notes.append)
    assert "running on the CPU" in notes[0]


def test_offloaded_layers_are_read_from_llama_cpp_log():
    assert devices.offloaded("load_tensors: offloaded 31/31 layers to GPU\n") == (31, 31)
    assert devices.offloaded("load_tensors: offloaded 7/29 layers to GPU") == (7, 29)
    assert devices.offloaded("llama_kv_cache: size = 5.62 MiB") is None


def test_the_log_callback_keeps_what_a_load_offloaded():
    """The line llama.cpp logs at load time, through the callback the engine installs (a GPU
    build sends it; here it is sent by hand)."""
    from rpo_local import engine

    engine.quiet_llama_logs()
    engine._last_offload = None
    engine._LOG_CALLBACK(2, b"load_tensors: offloaded 7/29 layers to GPU\n", None)
    engine._LOG_CALLBACK(2, b"llama_context: n_ctx = 512\n", None)
    assert engine._last_offload == (7, 29)


def test_training_device(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert devices.torch_device("auto") == "cpu"
    assert devices.torch_device("cpu") == "cpu"
    with pytest.raises(GpuError, match="sees no CUDA GPU"):
        devices.torch_device("cuda")
    with pytest.raises(GpuError, match="MPS"):
        devices.torch_device("mps")
    notes: list[str] = []
    assert devices.torch_device("cuda", cpu_fallback=True, note=notes.append) == "cpu" and notes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.torch_device("auto") == "cuda"
    assert devices.torch_device("cuda") == "cuda"
    with pytest.raises(InputError):
        devices.check_device("tpu", "--device")


def test_out_of_memory_is_told_apart_from_other_errors():
    error = devices.out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), "cuda")
    assert isinstance(error, GpuError) and "--batch-size" in error.message and "more" not in error.message
    assert devices.out_of_memory(RuntimeError("shape mismatch"), "cuda") is None


def test_config_keys_are_checked(cli):
    assert cli("config", "set", "gpu_layers", "lots").code == 9
    assert cli("config", "set", "device", "tpu").code == 9
    assert cli("config", "set", "gpu_layers", "12").code == 0
    assert cli("config", "set", "device", "cuda").code == 0
    from rpo_local.config import load_config

    config = load_config()
    assert (config.gpu_layers, config.device, config.cpu_fallback) == ("12", "cuda", False)


def test_the_daemon_trains_on_the_device_it_is_told(store, cli):
    from rpo_local.config import Config
    from rpo_local.scheduler import TrainScheduler

    scheduler = TrainScheduler(store, Config(device="cuda"), persist=False)
    command = scheduler.command("ann")
    assert command[command.index("--device") + 1] == "cuda"
    bad = cli("serve", "--train-device", "tpu", "--port", "0")
    assert bad.code == InputError.exit_code and "--train-device must be one of" in bad.stderr


def test_running_out_of_gpu_memory_while_training_is_exit_14(monkeypatch, tmp_path):
    from rpo_local.training import pipeline, sft

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sft, "train", oom)
    with pytest.raises(GpuError, match="ran out of memory on cuda"):
        pipeline._fit(tmp_path / "m.gguf", [], tmp_path, sft.SFTConfig(device="cuda"), None, False)
    monkeypatch.setattr(sft, "train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        pipeline._fit(tmp_path / "m.gguf", [], tmp_path, sft.SFTConfig(device="cuda"), None, False)


def rpo(*args: str, stdin: bytes = b"", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rpo_local", *args], input=stdin, capture_output=True,
                          timeout=300, env={**os.environ, "NO_COLOR": "1", **env})


def _cpu_build() -> bool:
    import llama_cpp

    return not llama_cpp.llama_supports_gpu_offload()


@pytest.mark.model
@pytest.mark.skipif(not _cpu_build(), reason="the refusal is for a llama.cpp build without a GPU backend")
def test_a_cpu_build_refuses_gpu_layers_and_keeps_the_text_then_falls_back_when_allowed(rpo_home):
    """The real model, a CPU-only llama.cpp: gpu_layers = all is exit 14 with the reason, nothing
    on stdout; with cpu_fallback the rewrite runs on the CPU after one note."""
    assert rpo("history", "add", "--profile", "sam", "nah lol", "ok sounds good tbh").returncode == 0
    text = b"Thank you for the update. I will look at it tomorrow.\n"
    refused = rpo("rewrite", "--profile", "sam", stdin=text, RPO_GPU_LAYERS="all")
    assert refused.returncode == GpuError.exit_code == 14, refused.stderr
    assert refused.stdout == b"" and b"offloads to no GPU" in refused.stderr
    activating = rpo("adapters", "activate", "builtin-lamp7", "--profile", "sam", RPO_GPU_LAYERS="2")
    assert activating.returncode == 14  # verified on the layers the runtime would use
    allowed = rpo("rewrite", "--profile", "sam", stdin=text, RPO_GPU_LAYERS="all", RPO_CPU_FALLBACK="1")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip() and b"running on the CPU (cpu_fallback)" in allowed.stderr


@pytest.mark.model
def test_doctor_shows_the_devices_and_the_layers_a_load_offloads(rpo_home):
    report = json.loads(rpo("doctor", "--json").stdout)
    gpu = report["gpu"]
    assert gpu["gpu_layers"] == "auto" and gpu["training_device"] == "auto"
    assert any(d["type"] == "cpu" and d["memory_total"] > 0 for d in gpu["devices"])
    if _cpu_build():
        assert gpu["runs_on"] == "CPU" and gpu["offloaded_layers"] == "0 (CPU)"
        refused = rpo("doctor", "--json", RPO_GPU_LAYERS="all")
        assert refused.returncode == 1
        assert any("offloads to no GPU" in p for p in json.loads(refused.stdout)["problems"])
    else:
        on, total = (int(n) for n in gpu["offloaded_layers"].split("/"))
        assert on == total > 0 and gpu["runs_on"] != "CPU"


@pytest.mark.train
def test_train_on_a_missing_gpu_is_a_failed_run_exit_14_before_any_work(cli, monkeypatch):
    import torch

    import rpo_local.engine as engine_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(engine_mod, "open_engine", lambda *a, **k: pytest.fail("no model may load"))
    assert cli("history", "add", "--profile", "ann", "nah lol").code == 0
    r = cli("train", "sft", "--profile", "ann", "--device", "cuda", "--json")
    assert r.code == 14 and "sees no CUDA GPU" in r.stderr + r.stdout
    assert json.loads(r.stdout)["status"] == "failed"
    runs = json.loads(cli("train", "runs", "--profile", "ann", "--json").stdout)
    assert runs[0]["status"] == "failed" and "CUDA" in runs[0]["error"]
    assert cli("train", "sft", "--profile", "ann", "--device", "tpu").code == InputError.exit_code

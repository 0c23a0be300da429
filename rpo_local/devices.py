"""Where the models run: llama.cpp's GPU offload (CUDA, Metal) and torch's training device.

One rule each, shared by every caller. `offload_layers` turns the `gpu_layers` setting into
llama.cpp's `n_gpu_layers`; `torch_device` turns `device` into a torch device. A GPU asked for
and missing (a CPU-only build, no driver, torch without CUDA) is a `GpuError`, or a note and
the CPU where `cpu_fallback` allows it. llama_cpp and torch are imported only when called.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from pathlib import Path

from rpo_local.errors import GpuError, InputError

# Or a number: llama.cpp's n_gpu_layers, the output layer and then blocks from the top.
GPU_LAYERS_WORDS = ("auto", "all", "none")
DEVICES = ("auto", "cpu", "cuda", "mps")
DEVICE_TYPES = ("cpu", "gpu", "igpu", "accel", "meta")  # ggml's enum ggml_backend_dev_type, in order
FALLBACK_HINT = "set cpu_fallback = true to run on the CPU instead"
Note = Callable[[str], None]


def check_gpu_layers(value: str) -> str:
    """The setting, normalised; ValueError for anything but auto, all, none or a layer count."""
    value = str(value).strip().lower()
    if value in GPU_LAYERS_WORDS or value.isdigit():
        return value
    raise ValueError(f"expected {', '.join(GPU_LAYERS_WORDS)} or a number of layers, got {value!r}")


def check_device(value: str | None, flag: str) -> str | None:
    """A training device named on the command line (`flag`), or None for the configured one."""
    if value is not None and value not in DEVICES:
        raise InputError(f"{flag} must be one of {', '.join(DEVICES)}, got {value!r}")
    return value


def offload_layers(setting: str, *, gpu_build: bool, cpu_fallback: bool, note: Note) -> int:
    """llama.cpp's n_gpu_layers for the `gpu_layers` setting on a build with (or without) a GPU
    backend: auto offloads every layer where it can and none where it cannot; all or N on a
    CPU-only build is an error unless the CPU is allowed."""
    setting = check_gpu_layers(setting)
    if setting in ("none", "0"):
        return 0
    if setting == "auto":
        return -1 if gpu_build else 0
    if not gpu_build:
        reason = (f"gpu_layers = {setting}, but this llama.cpp offloads to no GPU: a CPU-only build (rebuild it "
                  "with `make install-cuda`, README: GPUs), or a GPU build that finds no device or driver "
                  "(`rpo doctor` lists the devices); or set gpu_layers = none")
        return _cpu_or_raise(reason, cpu_fallback, note)
    return -1 if setting == "all" else int(setting)


def _cpu_or_raise(reason: str, cpu_fallback: bool, note: Note) -> int:
    if not cpu_fallback:
        raise GpuError(f"{reason}; or {FALLBACK_HINT}")
    note(f"{reason}; running on the CPU (cpu_fallback)")
    return 0


def load_failed(exc: BaseException, backend: str, cpu_fallback: bool, note: Note) -> None:
    """A model that failed to load with layers offloaded: a GpuError, or a note before the
    caller retries on the CPU."""
    reason = (f"llama.cpp could not load the model on the GPU ({backend}): {exc} (its log above says why: "
              "often too little GPU memory; fewer gpu_layers need less)")
    _cpu_or_raise(reason, cpu_fallback, note)


_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


def offloaded(log_text: str) -> tuple[int, int] | None:
    """(layers on the GPU, layers in all) from llama.cpp's load log; None where it says nothing
    (a CPU-only build)."""
    found = _OFFLOADED.search(log_text)
    return (int(found[1]), int(found[2])) if found else None


def llama_devices() -> list[dict]:
    """The devices this llama.cpp build can run on (ggml's device registry): name,
    description, type and memory. Empty where the registry cannot be read (an older build)."""
    import llama_cpp

    try:
        registry, base = _registry(Path(llama_cpp.__file__).parent / "lib")
    except (OSError, AttributeError):
        return []
    out = []
    for i in range(registry.ggml_backend_dev_count()):
        dev = registry.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        kind = base.ggml_backend_dev_type(dev)
        out.append({
            "name": base.ggml_backend_dev_name(dev).decode(errors="replace"),
            "description": base.ggml_backend_dev_description(dev).decode(errors="replace"),
            "type": DEVICE_TYPES[kind] if 0 <= kind < len(DEVICE_TYPES) else str(kind),
            "memory_free": free.value, "memory_total": total.value,
        })
    return out


def _registry(lib: Path) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """ggml's registry and base libraries with the device functions' signatures set."""
    registry, base = _library(lib, "ggml"), _library(lib, "ggml-base")
    registry.ggml_backend_dev_count.restype = ctypes.c_size_t
    registry.ggml_backend_dev_get.restype = ctypes.c_void_p
    registry.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(base, name).restype = ctypes.c_char_p
        getattr(base, name).argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_type.restype = ctypes.c_int
    base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    size_p = ctypes.POINTER(ctypes.c_size_t)
    base.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, size_p, size_p]
    base.ggml_backend_dev_memory.restype = None
    return registry, base


def _library(folder: Path, stem: str) -> ctypes.CDLL:
    """A ggml library that llama_cpp has already loaded (libggml.so, libggml.dylib, ggml.dll)."""
    for name in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        if (folder / name).exists():
            return ctypes.CDLL(str(folder / name))
    raise OSError(f"no {stem} library in {folder}")


def out_of_memory(exc: RuntimeError, device: str) -> GpuError | None:
    """torch's out-of-memory error (CUDA or MPS) as a GpuError; None for any other error."""
    if "out of memory" not in str(exc).lower():
        return None
    first = str(exc).strip().splitlines()[0]
    return GpuError(f"training ran out of memory on {device} ({first}); lower --batch-size, "
                    "or train with --device cpu")


def torch_device(requested: str, *, cpu_fallback: bool = False, note: Note = lambda _m: None) -> str:
    """The torch device for training: auto is CUDA, then Apple's MPS, then the CPU, whichever
    torch sees first; cuda or mps that torch cannot see is a GpuError (or the CPU, if allowed)."""
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if requested == "cuda" and not cuda:
        built = torch.version.cuda or "none: a CPU-only wheel"
        reason = (f"device cuda: torch {torch.__version__} sees no CUDA GPU (its CUDA: {built}; "
                  "README: GPUs says which torch to install), or use --device cpu")
        _cpu_or_raise(reason, cpu_fallback, note)
        return "cpu"
    if requested == "mps" and not mps:
        reason = f"device mps: torch {torch.__version__} sees no Apple GPU (MPS needs macOS on Apple silicon)"
        _cpu_or_raise(reason, cpu_fallback, note)
        return "cpu"
    return requested

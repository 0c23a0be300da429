"""LoRA adapters in llama.cpp: load a GGUF adapter for a loaded model, switch it on a context.

`engine.LlamaEngine.set_adapter` loads each file once (`load_adapter`) and keeps the handle,
so switching between adapters (or to none) is `apply_adapter`: the base model is never
reloaded. A bad file raises ModelError; llama.cpp reports failures as a NULL handle or a
non-zero status, never by aborting.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rpo_local.errors import ModelError
from rpo_local.models import check_gguf


def load_adapter(llm: Any, path: Path) -> Any:
    """Load the GGUF LoRA adapter at `path` for `llm`'s model; return its handle."""
    import llama_cpp

    path = Path(path)
    try:
        check_gguf(path)
    except ModelError as exc:
        raise ModelError(f"adapter: {exc.message}") from None
    handle = llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode("utf-8"))
    if not handle:
        raise ModelError(
            f"llama.cpp cannot load adapter {path}: not a LoRA adapter for this base model "
            "(wrong architecture, tensor names or shapes, or a damaged file)"
        )
    return handle


def adapter_meta(handle: Any, key: str) -> str | None:
    """A string value of the adapter's GGUF metadata (None when absent)."""
    import llama_cpp

    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_adapter_meta_val_str(handle, key.encode("utf-8"), buf, len(buf))
    return buf.value.decode("utf-8", errors="replace") if n >= 0 else None


def apply_adapter(llm: Any, handle: Any | None, scale: float = 1.0) -> None:
    """Make `handle` (None: no adapter) the only adapter of `llm`'s context."""
    import llama_cpp

    if handle is None:
        status = llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None)
    else:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
        scales = (ctypes.c_float * 1)(scale)
        status = llama_cpp.llama_set_adapters_lora(llm.ctx, adapters, 1, scales)
    if status:
        raise ModelError(f"llama.cpp refused to set the adapter (status {status})")


def free_adapter(handle: Any) -> None:
    """Release an adapter that no context uses any more (llama.cpp frees the rest with the model)."""
    import llama_cpp

    llama_cpp.llama_adapter_lora_free(handle)


def verify_adapter(model_path: Path, adapter_path: Path, *, gpu_layers: str = "auto", cpu_fallback: bool = False,
                   note: Callable[[str], None] = lambda _m: None) -> None:
    """Check that llama.cpp loads `adapter_path` for the base at `model_path` and can run with it,
    on the backend and layers the runtime uses (`gpu_layers`, as configured).

    Uses a small throwaway instance (the base file is memory-mapped, so this costs little)."""
    from rpo_local.engine import LlamaEngine

    engine = LlamaEngine(Path(model_path), n_ctx=64, speculative=False, gpu_layers=gpu_layers,
                         cpu_fallback=cpu_fallback, note=note)
    try:
        handle = load_adapter(engine.llm, adapter_path)
        apply_adapter(engine.llm, handle, 1.0)
        engine.llm.eval(engine.llm.tokenize(b"Hello", add_bos=False))
    finally:
        engine.llm.close()

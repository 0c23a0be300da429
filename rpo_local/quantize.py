"""Re-quantizing a reflection model with llama.cpp's own quantizer (`llama_model_quantize`).

llama-cpp-python binds the quantizer, so no separate llama.cpp binary is needed. The result is
written to a temporary file beside its destination, loaded once by llama.cpp, and only then
renamed into place: a failed or interrupted quantize leaves nothing behind.

A 2-4 bit source is refused unless asked for: its rounding error is already baked into the
weights, and quantizing again adds a second one while nothing lost comes back.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rpo_local.errors import InputError, ModelError
from rpo_local.models import check_gguf, gguf_metadata

# The types offered (llama_cpp.LLAMA_FTYPE_MOSTLY_<type>), best fidelity first.
TYPES = ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
         "Q3_K_M", "Q2_K")
# general.file_type values (llama.cpp's llama_ftype) of unquantized files, and of 2-4 bit ones.
UNQUANTIZED = {0: "F32", 1: "F16", 32: "BF16"}
LOW_BIT = {2: "Q4_0", 3: "Q4_1", 10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M"}


def file_type(path: Path) -> int | None:
    """The GGUF's general.file_type (llama_ftype), None when it records none."""
    value = gguf_metadata(path).get("general.file_type")
    return int(value) if isinstance(value, int) else None


def check_source(path: Path, allow_requantize: bool = False) -> None:
    """Refuse a 2-4 bit source unless `allow_requantize`, saying why."""
    ftype = file_type(path)
    if ftype in LOW_BIT and not allow_requantize:
        raise InputError(
            f"{path.name} is already {LOW_BIT[ftype]}: quantizing it again adds a second rounding error and "
            "recovers nothing; start from an F16/BF16/F32 GGUF of the model, or pass --allow-requantize"
        )


def quantize_model(src: Path, dst: Path, qtype: str, *, allow_requantize: bool = False, threads: int = 0) -> Path:
    """Write `src` quantized to `qtype` at `dst` (atomically, only once llama.cpp loads it)."""
    if qtype not in TYPES:
        raise InputError(f"unknown quantization type {qtype!r}; use one of {', '.join(TYPES)}")
    check_gguf(src)
    check_source(src, allow_requantize)
    if dst.exists():
        raise InputError(f"{dst} exists; it is never overwritten (give another --out or --name)")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads or os.cpu_count() or 1
    params.allow_requantize = file_type(src) not in UNQUANTIZED  # llama.cpp refuses quantized tensors otherwise
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
            raise ModelError(f"llama.cpp could not quantize {src.name} to {qtype}")
        _check_loads(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _check_loads(path: Path) -> None:
    import llama_cpp

    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_gpu_layers=0, verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"the quantized file does not load in llama.cpp: {exc}") from None
    llm.close()

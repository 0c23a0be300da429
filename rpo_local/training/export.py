"""A peft LoRA as a llama.cpp GGUF adapter, and back.

The adapter stays separate from the quantized base (merging into Q4_1 and re-quantizing lost
most of the learned change in a trial). llama.cpp's converter permutes the rows of the Q and
K projections of llama-architecture models only (`LlamaModel.modify_tensors`; Qwen2 and
Gemma 3 keep the Hugging Face layout), and transformers un-permutes them when it loads a llama
GGUF; so for llama `lora_b` of q/k must be permuted the same way on export (and un-permuted on
import) — without it, llama.cpp's logits drift far from torch's. The adapter's GGUF
architecture must be the base's: llama.cpp refuses an adapter of another architecture.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rpo_local.errors import ModelError
from rpo_local.fsutil import atomic_write_bytes

# peft module name suffix -> llama.cpp tensor name
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# transformers model_type -> llama.cpp architecture
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3", "gemma3_text": "gemma3"}
PERMUTED_ARCHS = {"llama"}  # where llama.cpp's converter permutes the Q/K rows
_MODULE = re.compile(r"layers\.(\d+)\.(self_attn\.\w+|mlp\.\w+)\.lora_([AB])\.(?:default\.)?weight$")


def permute_rows(w: Any, n_head: int) -> Any:
    """llama.cpp's Q/K row permutation (convert_hf_to_gguf `LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: Any, n_head: int) -> Any:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(config: Any, proj: str) -> int:
    return config.num_key_value_heads if proj.endswith("k_proj") else config.num_attention_heads


def gguf_arch(config: Any) -> str:
    """The llama.cpp architecture of a transformers model config."""
    try:
        return GGUF_ARCHS[config.model_type]
    except KeyError:
        raise ModelError(f"no LoRA export for {config.model_type!r} models; known: {', '.join(GGUF_ARCHS)}") from None


def _permuted(config: Any, proj: str) -> bool:
    return gguf_arch(config) in PERMUTED_ARCHS and proj in ("self_attn.q_proj", "self_attn.k_proj")


def lora_tensors(model: Any) -> dict[str, Any]:
    """llama.cpp tensor name -> float32 numpy array, for every LoRA matrix of `model`."""
    config = model.get_base_model().config
    out = {}
    for name, param in model.named_parameters():
        match = _MODULE.search(name)
        if not match:
            continue
        layer, proj, which = match.groups()
        w = param.detach().float().cpu().numpy()
        if which == "B" and _permuted(config, proj):
            w = permute_rows(w, _heads(config, proj))
        out[f"blk.{layer}.{GGUF_NAMES[proj]}.weight.lora_{which.lower()}"] = w
    if not out:
        raise ModelError("the model has no LoRA weights to export")
    return out


def export_gguf(model: Any, path: Path, *, dtype: str = "f16", meta: dict | None = None) -> Path:
    """Write `model`'s LoRA (with its own alpha) to `path` as a llama.cpp adapter (atomically)."""
    import numpy as np
    from gguf import GGUFWriter

    alpha = model.peft_config["default"].lora_alpha
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.writing")
    writer = GGUFWriter(str(tmp), arch=gguf_arch(model.get_base_model().config))
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    writer.add_name(path.stem)
    for key, value in (meta or {}).items():
        writer.add_string(f"rpo.{key}", str(value))
    np_type = np.float16 if dtype == "f16" else np.float32
    for name, w in lora_tensors(model).items():
        writer.add_tensor(name, w.astype(np_type))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        atomic_write_bytes(path, tmp.read_bytes())
        path.chmod(0o644)  # mkstemp made it private; an adapter (or a package asset) is not secret
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_gguf_lora(path: Path) -> tuple[float, dict[str, Any]]:
    """(alpha, tensor name -> numpy array) of a GGUF LoRA adapter."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read adapter {path}: {exc}") from None
    alpha_field = reader.get_field("adapter.lora.alpha")
    if alpha_field is None:
        raise ModelError(f"{path} is not a LoRA adapter (no adapter.lora.alpha)")
    alpha = float(alpha_field.parts[alpha_field.data[0]][0])
    # GGUFReader gives tensors in ggml order, which as numpy is already (rows, cols).
    return alpha, {t.name: t.data.astype("float32").reshape(tuple(reversed(t.shape.tolist())))
                   for t in reader.tensors}


def adapter_layout(path: Path) -> tuple[float, int, list[int], tuple[str, ...]]:
    """(alpha, rank, blocks, peft target modules) of a GGUF LoRA adapter: what a LoRA must look
    like to continue training from it."""
    alpha, tensors = read_gguf_lora(path)
    module_of = {gguf: peft.split(".")[-1] for peft, gguf in GGUF_NAMES.items()}
    blocks, targets, ranks = set(), set(), set()
    for name, w in tensors.items():
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight\.lora_a", name)
        if match and match.group(2) in module_of:
            blocks.add(int(match.group(1)))
            targets.add(module_of[match.group(2)])
            ranks.add(w.shape[0])
    if len(ranks) != 1:
        raise ModelError(f"{path} is not a LoRA adapter with one rank")
    order = [m.split(".")[-1] for m in GGUF_NAMES]
    return alpha, ranks.pop(), sorted(blocks), tuple(m for m in order if m in targets)


def load_gguf_lora(model: Any, path: Path) -> None:
    """Initialise `model`'s LoRA (same rank and targets) from a GGUF adapter."""
    import torch

    _, tensors = read_gguf_lora(path)
    config = model.get_base_model().config
    params = dict(model.named_parameters())
    loaded = 0
    with torch.no_grad():
        for name, param in params.items():
            match = _MODULE.search(name)
            if not match:
                continue
            layer, proj, which = match.groups()
            key = f"blk.{layer}.{GGUF_NAMES[proj]}.weight.lora_{which.lower()}"
            if key not in tensors:
                continue
            w = tensors[key]
            if which == "B" and _permuted(config, proj):
                w = unpermute_rows(w, _heads(config, proj))
            if tuple(w.shape) != tuple(param.shape):
                raise ModelError(f"{path}: {key} has shape {w.shape}, the LoRA expects {tuple(param.shape)}")
            param.copy_(torch.from_numpy(w.copy()))
            loaded += 1
    if not loaded:
        raise ModelError(f"{path} has none of this LoRA's tensors")

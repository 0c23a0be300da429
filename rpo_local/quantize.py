"""Re-quantizing a reflection model with llama.cpp's own quantizer (`llama_model_quantize`), and
merging a LoRA adapter into its base as one GGUF.

llama-cpp-python binds the quantizer, so no separate llama.cpp binary is needed. The result is
written to a temporary file beside its destination, loaded once by llama.cpp, and only then
renamed into place: a failed or interrupted quantize leaves nothing behind.

A 2-4 bit source is refused unless asked for: its rounding error is already baked into the
weights, and quantizing again adds a second one while nothing lost comes back.

A merge adds the adapter's scale * (B @ A) to each weight it adapts (dequantized with the `gguf`
package), writes the sum in F32 beside the base's other tensors (copied as they are, metadata
too), and quantizes that with llama.cpp's quantizer. How much of the adapter's effect survives
the chosen type is measured on the logits (`Survival`): a 4-bit merge can lose most of it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rpo_local.errors import InputError, ModelError
from rpo_local.models import SOURCE_KEY, check_gguf, gguf_metadata, sha256

if TYPE_CHECKING:
    import numpy as np

# The types offered (llama_cpp.LLAMA_FTYPE_MOSTLY_<type>, ALL_F32 for F32), best fidelity first.
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1",
         "Q4_0", "Q3_K_M", "Q2_K")
# general.file_type values (llama.cpp's llama_ftype) of unquantized files, and of 2-4 bit ones.
UNQUANTIZED = {0: "F32", 1: "F16", 32: "BF16"}
LOW_BIT = {2: "Q4_0", 3: "Q4_1", 10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M"}
SURVIVAL_WARN = 0.5  # below this, most of the adapter's effect is lost in the merged file


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


def _check_target(qtype: str, dst: Path) -> None:
    if qtype not in TYPES:
        raise InputError(f"unknown quantization type {qtype!r}; use one of {', '.join(TYPES)}")
    if dst.exists():
        raise InputError(f"{dst} exists; it is never overwritten (give another --out or --name)")


def _temp_beside(dst: Path, tag: str) -> Path:
    """An empty temporary file in `dst`'s folder (the final rename stays on one file system)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=f".{tag}")
    os.close(fd)
    return Path(name)


def quantize_model(src: Path, dst: Path, qtype: str, *, allow_requantize: bool = False, threads: int = 0) -> Path:
    """Write `src` quantized to `qtype` at `dst` (atomically, only once llama.cpp loads it)."""
    _check_target(qtype, dst)
    check_gguf(src)
    check_source(src, allow_requantize)
    tmp, stamped = _temp_beside(dst, "part"), _temp_beside(dst, "stamped")
    try:
        _quantize(src, tmp, qtype, threads)
        # The copy keeps the adapters of its source: it records the file it came from.
        source = gguf_metadata(src).get(SOURCE_KEY) or sha256(src)
        _rewrite(tmp, stamped, {}, {SOURCE_KEY: str(source)})
        _load(stamped).close()
        os.replace(stamped, dst)
    finally:
        tmp.unlink(missing_ok=True)
        stamped.unlink(missing_ok=True)
    return dst


def _quantize(src: Path, out: Path, qtype: str, threads: int) -> None:
    import llama_cpp

    from rpo_local.engine import quiet_llama_logs

    quiet_llama_logs()  # else a line per tensor on stderr
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if qtype == "F32" else f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads or os.cpu_count() or 1
    # llama.cpp refuses quantized input tensors otherwise (check_source has decided already).
    params.allow_requantize = file_type(src) not in UNQUANTIZED
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) != 0:
        raise ModelError(f"llama.cpp could not quantize {src.name} to {qtype}")


def _load(path: Path, **kwargs: Any) -> Any:
    import llama_cpp

    from rpo_local.engine import default_threads, quiet_llama_logs

    quiet_llama_logs()
    try:
        return llama_cpp.Llama(model_path=str(path), n_gpu_layers=0, n_threads=default_threads(), verbose=False,
                               **{"n_ctx": 64, **kwargs})
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{path.name} does not load in llama.cpp: {exc}") from None


# -- merging a LoRA adapter into its base ------------------------------------------------------

def lora_scale(alpha: float, rank: int) -> float:
    """The factor llama.cpp multiplies B @ A by (llama_adapter_lora_weight::get_scale, at the
    adapter scale 1.0 the runtime uses): alpha / rank, or 1 where the adapter records alpha 0."""
    return alpha / rank if alpha else 1.0


def lora_deltas(adapter: Path) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Base tensor name -> (A, B, scale) of each weight the GGUF adapter changes; the change is
    scale * B @ A in the base GGUF's own layout (for llama the export already permuted B's Q/K
    rows as the base's converter permuted W's, and a row permutation commutes with the sum)."""
    from rpo_local.training.export import read_gguf_lora

    alpha, tensors = read_gguf_lora(adapter)
    out = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        target = name.removesuffix(".lora_a")
        b = tensors.get(f"{target}.lora_b")
        if b is None or b.shape[1] != a.shape[0]:
            raise ModelError(f"{adapter.name}: {target} has no matching lora_b")
        out[target] = (a, b, lora_scale(alpha, a.shape[0]))
    if len(out) * 2 != len(tensors):
        raise ModelError(f"{adapter.name}: tensors other than lora_a/lora_b pairs; not a LoRA this merge knows")
    return out


def write_merged(base: Path, adapter: Path, out: Path, meta: dict[str, str]) -> int:
    """Write `base` with the adapter's change added to each weight it adapts (in F32) to `out`,
    every other tensor and all metadata copied as they are, `meta` (strings) set on top. Returns
    the number of tensors changed. Uses the `gguf` package's reader, writer and dequantizer."""
    deltas = lora_deltas(adapter)
    _rewrite(base, out, deltas, meta, adapter.name)
    return len(deltas)


def _rewrite(base: Path, out: Path, deltas: dict, meta: dict[str, str], adapter_name: str = "") -> None:
    """`base` copied to `out` with `deltas` added to their weights (in F32) and `meta` set."""
    from gguf import GGUFReader, GGUFWriter, Keys

    try:
        reader = GGUFReader(str(base))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {base}: {exc}") from None
    tensors = {t.name: t for t in reader.tensors}
    for name, (a, b, _) in deltas.items():
        if name not in tensors:
            raise ModelError(f"{adapter_name} adapts {name}, which {base.name} does not have")
        shape = tuple(reversed(tensors[name].shape.tolist()))  # ggml order -> numpy (rows, cols)
        if shape != (b.shape[0], a.shape[1]):
            raise ModelError(f"{adapter_name}: {name} is {b.shape[0]}x{a.shape[1]}, {base.name} has "
                             f"{shape[0]}x{shape[-1]}")

    arch = reader.get_field(Keys.General.ARCHITECTURE)
    if arch is None:
        raise ModelError(f"{base.name} records no architecture: not a model GGUF")
    writer = GGUFWriter(str(out), arch=str(arch.contents()), endianess=reader.endianess)
    try:
        _copy_merged(reader, writer, deltas, meta)
    finally:
        writer.close()


def _copy_merged(reader: Any, writer: Any, deltas: dict, meta: dict[str, str]) -> None:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFValueType, Keys
    from gguf.quants import dequantize

    alignment = reader.get_field(Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():
        # The writer adds the architecture and GGUF.* (virtual fields of the reader) itself.
        # A merged file takes no adapters: the lineage of its base is not copied, only `meta`'s.
        if (field.name in (Keys.General.ARCHITECTURE, SOURCE_KEY) or field.name.startswith("GGUF.")
                or field.name in meta):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
    for key, value in meta.items():
        writer.add_string(key, value)
    f32 = np.dtype(np.float32)
    for t in reader.tensors:
        if t.name in deltas:
            n = int(t.n_elements)
            writer.add_tensor_info(t.name, tuple(reversed(t.shape.tolist())), f32, n * 4, GGMLQuantizationType.F32)
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:  # one tensor in memory at a time
        if t.name in deltas:
            a, b, scale = deltas[t.name]
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            writer.write_tensor_data(w + np.float32(scale) * (b @ a))
        else:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)


@dataclass
class Survival:
    """How much of an adapter's effect on the logits a merged file keeps.

    On `PROBES` (the reflection prompt for a few built-in texts), the next-token logits at the
    last `LAST_POSITIONS` positions of each are computed three ways: B, the base alone; A, the
    base with the adapter applied at run time by llama.cpp (what rpo runs); M, the merged file.
    Each position's logits are centred (softmax ignores a shift). With Frobenius norms over all
    positions and probes:

    - `survival` = 1 - ||M - A|| / ||A - B||: 1 when the merged file computes what the base with
      its adapter computes, 0 when it is as far from that as the base alone is (the adapter's
      effect all lost), below 0 when further still (quantization noise larger than the effect);
    - `kept` = <M - B, A - B> / ||A - B||^2: the regression coefficient of the merged file's
      change on the adapter's, the share of the effect kept in its own direction, noise aside.

    Both are None when the adapter changes no logits on the probes.
    """

    survival: float | None
    kept: float | None
    positions: int

    def to_dict(self) -> dict:
        return asdict(self)


# (generic reply, the user's own texts): written for this check, not taken from any data set.
PROBES = (
    ("Thank you for your message. I will review the document and send you my comments by Friday.",
     ("running late again, the traffic is insane today", "finally finished that book. the ending tho!!",
      "coffee first, emails later. maybe.")),
    ("The meeting has been moved to 3 pm tomorrow. Please let me know if this time does not work for you.",
     ("ugh mondays... need a nap already", "who else is watching the game tonight?? lets gooo")),
)
LAST_POSITIONS = 32  # where the reply is about to be written; all 49k-151k logits of each
PROBE_CTX = 512  # the probes take ~160 tokens; llama-cpp-python keeps logits for all of them


def survival(base: Path, adapter: Path, merged: Path) -> Survival:
    """Measure how much of `adapter`'s effect on `base` the `merged` file keeps (see `Survival`);
    loading `merged` in llama.cpp is also the check that it loads."""
    import numpy as np

    from rpo_local import lora_runtime, prompts

    fmt = str(gguf_metadata(adapter).get("rpo.trajectory") or prompts.DEFAULT_FORMAT)
    llm = _load(base, n_ctx=PROBE_CTX, n_batch=PROBE_CTX, logits_all=True)
    try:
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelError(f"{base.name} has no chat template: rpo needs an instruct (chat) model")
        token_lists = [llm.tokenize(prompts.reflection_prompt(template, generic, items, fmt).encode("utf-8"),
                                    add_bos=True, special=True) for generic, items in PROBES]
        plain = np.concatenate([_logits(llm, tokens) for tokens in token_lists])
        lora_runtime.apply_adapter(llm, lora_runtime.load_adapter(llm, adapter), 1.0)
        adapted = np.concatenate([_logits(llm, tokens) for tokens in token_lists])
    finally:
        llm.close()
    llm = _load(merged, n_ctx=PROBE_CTX, n_batch=PROBE_CTX, logits_all=True)
    try:
        merged_logits = np.concatenate([_logits(llm, tokens) for tokens in token_lists])
    finally:
        llm.close()
    effect = adapted - plain
    size = float(np.linalg.norm(effect))
    if size == 0.0:
        return Survival(None, None, len(plain))
    return Survival(survival=1.0 - float(np.linalg.norm(merged_logits - adapted)) / size,
                    kept=float(np.vdot(merged_logits - plain, effect)) / size**2, positions=len(plain))


def _logits(llm: Any, tokens: list[int]) -> np.ndarray:
    """Centred logits at the last LAST_POSITIONS positions of `tokens`, decoded as one batch."""
    llm.reset()
    llm.eval(tokens)
    scores = llm.scores[len(tokens) - LAST_POSITIONS:len(tokens)].astype("float64")
    return scores - scores.mean(axis=1, keepdims=True)


def merge_adapter(base: Path, adapter: Path, dst: Path, qtype: str, *, adapter_name: str | None = None,
                  base_sha256: str | None = None, threads: int = 0) -> Survival:
    """Merge `adapter` into `base`, quantize to `qtype`, write it at `dst` (atomically, only once
    llama.cpp loads it) and return how much of the adapter's effect survives.

    `base_sha256`: the base the adapter was trained on (default: what its GGUF records); an
    adapter for another base is refused (AdapterMismatch). The intermediate F32 file and the
    quantized one are temporary files beside `dst`, both removed whatever happens."""
    from rpo_local.adapters import check_base
    from rpo_local.extras import require

    require("quantize", "rpo quantize merge")  # its reader, writer and dequantizer
    _check_target(qtype, dst)
    check_gguf(base)
    check_gguf(adapter)
    recorded = gguf_metadata(adapter).get("rpo.base_sha256")
    check_base(adapter_name or adapter.name, base_sha256 or (str(recorded) if recorded else None), base)
    merged, out = _temp_beside(dst, "merging"), _temp_beside(dst, "part")
    try:
        base_meta = gguf_metadata(base)
        write_merged(base, adapter, merged, {
            "general.name": f"{base_meta.get('general.name') or base.stem} + {adapter_name or adapter.stem}",
            "rpo.merged_adapter": adapter_name or adapter.name,
            **{k: str(v) for k, v in gguf_metadata(adapter).items() if k == "rpo.trajectory"},
        })
        _quantize(merged, out, qtype, threads)
        merged.unlink()  # its disk space back before the three models are loaded
        report = survival(base, adapter, out)
        os.replace(out, dst)
    finally:
        merged.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    return report

"""`rpo quantize`: re-quantize a reflection model, or merge an adapter into it, with llama.cpp's quantizer,
and register the result."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rpo_local.cli._common import JsonOpt, note, open_store, print_json

if TYPE_CHECKING:
    from rpo_local.store import Store

app = typer.Typer(help="Re-quantize GGUF models, or merge an adapter into one, with llama.cpp's quantizer.", no_args_is_help=True)


@app.command("model")
def model(
    ref: Annotated[str, typer.Argument(metavar="NAME", help="A registered model's name, the embedded one's, or a GGUF path")],
    qtype: Annotated[str, typer.Option("--type", help="Q8_0, Q6_K, Q5_K_M, Q4_K_M, F16, ... (rpo_local.quantize.TYPES)")] = "Q8_0",
    name: Annotated[str | None, typer.Option("--name", help="Register it as [default: NAME-TYPE]")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The file to write [default: in `rpo paths` models]")] = None,
    allow_requantize: Annotated[bool, typer.Option("--allow-requantize", help="Quantize a 2-4 bit file again anyway")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a re-quantized copy of a model and register it (only once llama.cpp loads it);
    the path goes to stdout. `rpo models use NAME` then runs it."""
    from rpo_local.models import describe_model, resolve_model_path
    from rpo_local.quantize import quantize_model

    with open_store() as store:
        src = resolve_model_path(ref, store)
        name, dst = _destination(store, ref, src, qtype.lower(), name, out)
        note(f"quantizing {src.name} to {qtype} (llama.cpp)")
        quantize_model(src, dst, qtype, allow_requantize=allow_requantize)
        info = describe_model(dst)
        store.register_model(name, info)
    if json_out:
        print_json({"name": name, **info})
    else:
        print(dst)
        note(f"registered {name!r} ({info['bytes'] / 1e6:.0f} MB); `rpo models use {name}` to run it")


@app.command("merge")
def merge(
    adapter: Annotated[str, typer.Option("--adapter", help="A shipped adapter's name, a registered one's, or a GGUF path")],
    qtype: Annotated[str, typer.Option("--type", help="Q8_0, F16, F32, Q4_K_M, ... (rpo_local.quantize.TYPES)")] = "Q8_0",
    model: Annotated[str | None, typer.Option("--model", help="The adapter's base [default: the reflection model]")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Register it as [default: MODEL-ADAPTER-TYPE]")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The file to write [default: in `rpo paths` models]")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Merge a LoRA adapter into its base as one GGUF of --type (for another llama.cpp runtime) and
    register it once llama.cpp loads it; the path goes to stdout. Reports on stderr how much of the
    adapter's effect on the logits survives the type, and warns when most is lost."""
    import time

    from rpo_local.adapters import BUILTINS, adapter_from_ref, adapter_label
    from rpo_local.config import load_config
    from rpo_local.errors import InputError
    from rpo_local.models import EMBEDDED_NAME, describe_model, resolve_model_path
    from rpo_local.quantize import SURVIVAL_WARN, merge_adapter

    with open_store() as store:
        ref = model or load_config().model or EMBEDDED_NAME
        src = resolve_model_path(ref, store)
        adapter_path = adapter_from_ref(adapter, store)
        if adapter_path is None:
            raise InputError("--adapter none: there is nothing to merge")
        label = adapter_label(store, adapter_path) or adapter_path.name
        suffix = f"{label.removesuffix('.gguf').removesuffix('.lora')}-{qtype.lower()}"
        name, dst = _destination(store, ref, src, suffix, name, out)
        row = store.adapter_by_path(adapter_path)
        trained_for = BUILTINS[label][1] if label in BUILTINS else (row or {}).get("base_sha256")
        note(f"merging {label} into {src.name} and quantizing to {qtype} (llama.cpp)")
        start = time.perf_counter()
        report = merge_adapter(src, adapter_path, dst, qtype, adapter_name=label, base_sha256=trained_for)
        seconds = time.perf_counter() - start
        info = describe_model(dst)
        store.register_model(name, info)
    if report.survival is None:
        note("the adapter changes no logits on the probes: nothing to lose")
    else:
        note(f"{report.survival:.0%} of the adapter's logit change survives {qtype} "
             f"(kept in its direction: {report.kept:.0%}; {report.positions} positions)")
        if report.survival < SURVIVAL_WARN:
            note(f"warning: most of {label}'s effect is lost in {qtype}; merge to Q8_0 or F16, or run the "
                 "base with the adapter kept separate")
    if json_out:
        print_json({"name": name, **info, "type": qtype, "adapter": label, "base": str(src),
                    **report.to_dict(), "seconds": round(seconds, 1)})
    else:
        print(dst)
        note(f"registered {name!r} ({info['bytes'] / 1e6:.0f} MB, {seconds:.0f} s); `rpo models use {name}` runs it")


def _destination(store: Store, ref: str, src: Path, suffix: str, name: str | None, out: Path | None) -> tuple[str, Path]:
    """The new model's name (default: the source's name, then `suffix`) and file; a name that
    would leave the models folder or is taken is refused."""
    from rpo_local import paths
    from rpo_local.errors import InputError
    from rpo_local.models import check_model_name, looks_like_path

    base = src.name.removesuffix(".gguf").lower() if looks_like_path(ref) else ref
    name = name or f"{base}-{suffix}"
    check_model_name(name)  # it also names the file: no '/' or '..'
    if store.has_model(name):
        raise InputError(f"a model named {name!r} exists; choose another with --name")
    return name, out or paths.models_dir() / f"{name}.gguf"

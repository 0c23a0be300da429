"""`rpo quantize`: re-quantize a reflection model with llama.cpp's quantizer and register it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rpo_local.cli._common import JsonOpt, note, open_store, print_json

app = typer.Typer(help="Re-quantize GGUF models with llama.cpp's quantizer.", no_args_is_help=True)


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
    from rpo_local import paths
    from rpo_local.errors import InputError
    from rpo_local.models import check_model_name, describe_model, looks_like_path, resolve_model_path
    from rpo_local.quantize import quantize_model

    with open_store() as store:
        src = resolve_model_path(ref, store)
        base = src.name.removesuffix(".gguf").lower() if looks_like_path(ref) else ref
        name = name or f"{base}-{qtype.lower()}"
        check_model_name(name)  # it also names the file: no '/' or '..'
        if store.has_model(name):
            raise InputError(f"a model named {name!r} exists; choose another with --name")
        dst = out or paths.models_dir() / f"{name}.gguf"
        note(f"quantizing {src.name} to {qtype} (llama.cpp)")
        quantize_model(src, dst, qtype, allow_requantize=allow_requantize)
        info = describe_model(dst)
        store.register_model(name, info)
    if json_out:
        print_json({"name": name, **info})
    else:
        print(dst)
        note(f"registered {name!r} ({info['bytes'] / 1e6:.0f} MB); `rpo models use {name}` to run it")

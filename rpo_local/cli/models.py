"""`rpo models`: the GGUF models rpo can run, as the reflection model or the offline upstream."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rpo_local.cli._common import JsonOpt, note, open_store, print_json

if TYPE_CHECKING:
    from rpo_local.store import Store

app = typer.Typer(help="Register, list, choose and remove GGUF models.", no_args_is_help=True)

ROLES = {"reflect": "model", "upstream": "upstream_local_model"}  # role -> config key


def _entries(store: Store) -> list[dict]:
    from rpo_local.config import load_config
    from rpo_local.models import EMBEDDED_NAME, embedded_model_path

    config = load_config()
    rows = [{"name": EMBEDDED_NAME, "path": str(embedded_model_path()), "embedded": True}]
    rows += [{**r, "embedded": False} for r in store.list_models()]
    reflect = config.model or EMBEDDED_NAME
    upstream = config.upstream_local_model or reflect
    for row in rows:
        row["roles"] = [role for role, ref in (("reflect", reflect), ("upstream", upstream))
                        if ref in (row["name"], row["path"])]
        row["exists"] = Path(row["path"]).is_file()
    return rows


@app.command("list")
def list_(json_out: JsonOpt = False) -> None:
    """The embedded model and the registered ones, with the role each plays."""
    with open_store() as store:
        rows = _entries(store)
    if json_out:
        print_json(rows)
        return
    for row in rows:
        size = f"{row['bytes'] / 1e6:.0f} MB" if row.get("bytes") else ""
        print("\t".join([row["name"], ",".join(row["roles"]) or "-", row.get("arch") or "", size,
                         row["path"] + ("" if row["exists"] else " (missing)")]))


@app.command("add")
def add(
    path: Annotated[Path, typer.Argument(help="A GGUF chat model (llama, qwen2, gemma3, ...)")],
    name: Annotated[str | None, typer.Option("--name", help="Name to use it by [default: the file name]")] = None,
    sha256: Annotated[str | None, typer.Option("--sha256", help="Refuse the file unless it has this checksum")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Register a GGUF model: its checksum, architecture and chat template are read first."""
    from rpo_local.errors import ModelError
    from rpo_local.models import check_model_name, describe_model

    name = name or path.name.removesuffix(".gguf").lower()
    check_model_name(name)
    info = describe_model(path.expanduser())
    if sha256 and info["sha256"] != sha256.lower():
        raise ModelError(f"{path}: sha256 is {info['sha256']}, expected {sha256}")
    with open_store() as store:
        store.register_model(name, info)
    if json_out:
        print_json({"name": name, **info})
    else:
        note(f"registered {name!r} ({info['arch']}, {info['bytes'] / 1e6:.0f} MB); `rpo models use {name}` to run it")


@app.command("use")
def use(
    name: Annotated[str, typer.Argument(help="A registered model's name (or the embedded one's)")],
    role: Annotated[str, typer.Option("--as", help="reflect: the rewriting model; upstream: the offline base model")] = "reflect",
) -> None:
    """Choose the reflection model, or the offline upstream (`--as upstream`)."""
    from rpo_local.adapters import builtin_for
    from rpo_local.config import set_value
    from rpo_local.errors import InputError
    from rpo_local.models import EMBEDDED_NAME, resolve_model_path

    if role not in ROLES:
        raise InputError(f"--as {role!r}: use one of {', '.join(ROLES)}")
    with open_store() as store:
        path = resolve_model_path(name, store)
    set_value(ROLES[role], "" if name == EMBEDDED_NAME else name)
    note(f"{role} model: {name} ({path})")
    if role == "reflect" and builtin_for(path) is None:
        note("no shipped adapter fits this model: profiles without their own run it bare (`rpo train sft`)")


@app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="A registered model's name")]) -> None:
    """Unregister a model that no role uses (the file stays where it is)."""
    from rpo_local.errors import InputError

    with open_store() as store:
        entry = next((r for r in _entries(store) if r["name"] == name), None)
        if entry is not None and entry["embedded"]:
            raise InputError("the embedded model cannot be removed")
        if entry is not None and entry["roles"]:
            raise InputError(f"model {name!r} is in use as {', '.join(entry['roles'])}; `rpo models use` another first")
        row = store.remove_model(name)
    note(f"removed model {row['name']!r} (file kept: {row['path']})")

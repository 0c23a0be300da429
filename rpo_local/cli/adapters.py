"""`rpo adapters`: the versioned LoRA adapters a profile can run with."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rpo_local.cli._common import JsonOpt, ProfileOpt, note, open_store, print_json, profile_name

if TYPE_CHECKING:
    from rpo_local.store import Store

app = typer.Typer(help="List, activate, roll back and remove LoRA adapters.", no_args_is_help=True)


def _builtin_entries() -> list[dict]:
    """The shipped adapters for the configured reflection model."""
    from rpo_local.adapters import builtins_for

    return [{"id": None, "name": name, "path": str(path), "profile": None, "builtin": True}
            for name, path in builtins_for()]


@app.command("list")
def list_(profile: ProfileOpt = None, json_out: JsonOpt = False) -> None:
    """Adapters usable by the profile (general ones and its own); * marks the one in use.
    Adapters are not per profile: a profile with no history yet lists the general ones."""
    name = profile_name(profile)
    from rpo_local.adapters import adapter_in_use

    with open_store() as store:
        rows = store.list_adapters(name)
        active = adapter_in_use(store, name)
    registered = {r["name"] for r in rows}  # a builtin used once is registered: listed with the others
    entries = [b for b in _builtin_entries() if b["name"] not in registered] + [
        {**r, "builtin": False, "exists": Path(r["path"]).is_file()} for r in rows
    ]
    for e in entries:
        e["active"] = e["name"] == active
    if json_out:
        print_json({"profile": name, "active": active, "adapters": entries})
        return
    if not entries:
        note("no adapters yet: `rpo train sft` makes one")
    for e in entries:
        r1 = ((e.get("eval") or {}).get("heldout_after") or {}).get("rouge1")
        print("\t".join([
            "*" if e["active"] else " ", e["name"], e.get("created_at") or "builtin",
            f"R1={r1}" if r1 is not None else "", e["path"],
        ]))
    if active is None:
        note(f"profile {name!r} runs the bare base model")


@app.command("activate")
def activate(
    adapter: Annotated[str, typer.Argument(help="Adapter name or id, or 'none' for the bare base model")],
    profile: ProfileOpt = None,
) -> None:
    """Make ADAPTER the profile's adapter (verified to load in llama.cpp first)."""
    from rpo_local import lora_runtime
    from rpo_local.adapters import BUILTINS, check_base
    from rpo_local.config import load_config
    from rpo_local.models import resolve_model_path

    name = profile_name(profile)
    with open_store() as store:
        store.get_profile(name)
        if adapter == "none":
            store.set_active_adapter(name, None)
            note(f"profile {name!r} now runs the bare base model")
            return
        row = _builtin_row(store, adapter) if adapter in BUILTINS else store.get_adapter(adapter)
        config = load_config()
        model = resolve_model_path(config.model or None, store)
        check_base(row["name"], row.get("base_sha256") or _recorded_base(Path(row["path"])), model)
        lora_runtime.verify_adapter(model, Path(row["path"]), gpu_layers=config.gpu_layers,
                                    cpu_fallback=config.cpu_fallback, note=note)
        store.set_active_adapter(name, row["id"])
    note(f"profile {name!r} now uses adapter {row['name']!r}")


def _recorded_base(path: Path) -> str | None:
    from rpo_local.models import gguf_metadata

    base = gguf_metadata(path).get("rpo.base_sha256") if path.is_file() else None
    return str(base) if base else None


def _builtin_row(store: Store, name: str) -> dict:
    """A shipped adapter as a registry row (registered on first explicit use, so that
    activations and rollbacks can refer to it)."""
    from rpo_local.adapters import BUILTINS, asset_path
    from rpo_local.errors import NotFound

    try:
        return store.get_adapter(name)
    except NotFound:
        file, base = BUILTINS[name]
        if not asset_path(file).is_file():
            raise NotFound(f"this installation ships no {name!r} adapter") from None
        store.register_adapter(name, asset_path(file), base_sha256=base, train_summary={"builtin": True})
        return store.get_adapter(name)


@app.command("rollback")
def rollback(profile: ProfileOpt = None) -> None:
    """Undo the profile's last activation: the adapter before it is active again."""
    from rpo_local.adapters import adapter_in_use

    name = profile_name(profile)
    with open_store() as store:
        store.get_profile(name)
        store.rollback_adapter(name)
        now_using = adapter_in_use(store, name)
    note(f"profile {name!r} now uses " + (f"adapter {now_using!r}" if now_using else "the bare base model"))


@app.command("remove")
def remove(
    adapter: Annotated[str, typer.Argument(help="Adapter name or id")],
    keep_file: Annotated[bool, typer.Option("--keep-file", help="Unregister only; leave the file")] = False,
) -> None:
    """Unregister an adapter that no profile uses and delete its file (if rpo made it)."""
    from rpo_local import paths

    with open_store() as store:
        row = store.remove_adapter(adapter)
    path = Path(row["path"])
    if not keep_file and path.parent.resolve() == paths.adapters_dir().resolve():
        path.unlink(missing_ok=True)
    note(f"removed adapter {row['name']!r}")

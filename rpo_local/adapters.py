"""Which LoRA adapter a profile uses: its own activation, else the general adapter shipped
with the package (when present), else none."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from rpo_local.errors import ModelError

if TYPE_CHECKING:
    from rpo_local.store import Store

BUILTIN_NAME = "builtin-lamp7"
BUILTIN_FILE = "reflect-lamp7.lora.gguf"


def builtin_adapter_path() -> Path | None:
    path = Path(str(resources.files("rpo_local").joinpath("assets", BUILTIN_FILE)))
    return path if path.is_file() else None


def resolve_adapter(store: Store | None, profile: str) -> Path | None:
    """The adapter file `profile` should run with (None: the bare base model)."""
    if store is not None:
        activation = store.active_activation(profile)
        if activation is not None:
            if activation["adapter_id"] is None:
                return None
            return Path(store.get_adapter(activation["adapter_id"])["path"])
    return builtin_adapter_path()


def adapter_from_ref(ref: str, store: Store | None = None) -> Path | None:
    """An adapter named on the command line: 'none', a GGUF file, or a registered name/id."""
    if ref == "none":
        return None
    path = Path(ref).expanduser()
    if path.suffix == ".gguf" or path.exists():
        if not path.is_file():
            raise ModelError(f"adapter file not found: {path}")
        return path
    if store is not None:
        return Path(store.get_adapter(ref)["path"])
    from rpo_local.store import Store

    with Store.open() as opened:
        return Path(opened.get_adapter(ref)["path"])

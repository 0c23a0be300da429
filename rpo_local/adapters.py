"""Which LoRA adapter a profile uses: its own activation, else the general adapter shipped
with the package (when present), else none."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

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

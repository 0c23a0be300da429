"""Which LoRA adapter a profile uses: its own activation, else the general adapter shipped
with the package for the reflection model in use (when there is one), else none.

An adapter only works on the base model it was trained on: each records that model's sha256
(`rpo.base_sha256` in its GGUF, `base_sha256` in the registry), and activation refuses one
trained for another base."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rpo_local.errors import AdapterMismatch, ModelError

if TYPE_CHECKING:
    from rpo_local.config import Config
    from rpo_local.store import Store

_SMOLLM2 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # SmolLM2-135M Q4_1
_QWEN15 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"  # Qwen2.5-Coder-1.5B-Instruct Q4_K_M
# Shipped adapters: name -> (file in rpo_local/assets, sha256 of the base GGUF it was trained on).
# The first one for a base is its default; the others are activated by name.
BUILTINS = {
    "builtin-lamp7": ("reflect-lamp7.lora.gguf", _SMOLLM2),  # full trajectory
    "builtin-lamp7-answer": ("reflect-lamp7-answer.lora.gguf", _SMOLLM2),  # answer only: 3x fewer tokens
    "builtin-lamp7-qwen1.5b": ("reflect-lamp7-qwen1.5b.lora.gguf", _QWEN15),  # answer only (model card)
}
BUILTIN_NAME = "builtin-lamp7"  # the embedded model's
# Runtime settings a config value of None ("auto") takes: the ones chosen for a shipped adapter on
# the tuning users (946-1045), else these.
DEFAULT_SETTINGS = {"min_content_kept": 0.8, "piece_words": 0}
BUILTIN_SETTINGS: dict[str, dict] = {
    # Trained on whole tweets: given whole ones; it rarely drops content, so a low gate (train/sweep_gate.py).
    # Trained with BM25 contexts, it lost 0.008 ROUGE-1 with dense ones on the tuning users (README).
    "builtin-lamp7-qwen1.5b": {"min_content_kept": 0.1, "piece_words": 60, "retriever": "bm25"},
}


def asset_path(file: str) -> Path:
    return Path(str(resources.files("rpo_local").joinpath("assets", file)))


def configured_model_path() -> Path:
    from rpo_local.config import load_config
    from rpo_local.models import resolve_model_path

    return resolve_model_path(load_config().model or None)


def builtins_for(model_path: Path | None = None) -> list[tuple[str, Path]]:
    """(name, file) of each shipped adapter for `model_path` (default: the configured
    reflection model), its default first."""
    from rpo_local.models import base_digests

    model_path = model_path or configured_model_path()
    if not Path(model_path).is_file():  # a fake engine's model, or a file gone since
        return []
    digests = base_digests(model_path)
    return [(name, asset_path(file)) for name, (file, base) in BUILTINS.items()
            if base in digests and asset_path(file).is_file()]


def builtin_for(model_path: Path | None = None) -> tuple[str, Path] | None:
    """The default shipped adapter for `model_path`, or None when none was trained for it."""
    found = builtins_for(model_path)
    return found[0] if found else None


def builtin_adapter_path(model_path: Path | None = None) -> Path | None:
    found = builtin_for(model_path)
    return found[1] if found else None


def builtin_name(path: str | Path | None) -> str | None:
    """The shipped adapter's name if `path` is one (as given: relative, absolute or via a link)."""
    if not path:
        return None
    where = Path(path).resolve()
    for name, (file, _) in BUILTINS.items():
        if where == asset_path(file).resolve():
            return name
    return None


def setting(config: Config, key: str, adapter_path: str | Path | None) -> Any:
    """`config`'s value of `key`, or where it is None ("auto") the adapter's own (see BUILTIN_SETTINGS)."""
    value = getattr(config, key)
    if value is not None:
        return value
    return BUILTIN_SETTINGS.get(builtin_name(adapter_path) or "", {}).get(key, DEFAULT_SETTINGS[key])


def retriever(config: Config, adapter_path: str | Path | None) -> str:
    """`config.retriever`; where it is auto, the shipped adapter's own choice if it has one."""
    if config.retriever != "auto":
        return config.retriever
    return BUILTIN_SETTINGS.get(builtin_name(adapter_path) or "", {}).get("retriever", "auto")


def adapter_label(store: Store | None, path: str | Path | None) -> str | None:
    """The name an adapter file is shown by: the shipped adapter's, else the registered one, else
    the file's name. None: no adapter (the bare base model)."""
    if not path:
        return None
    if builtin := builtin_name(path):
        return builtin
    row = store.adapter_by_path(path) if store is not None else None
    return row["name"] if row else Path(path).name


def adapter_in_use(store: Store | None, profile: str, model_path: Path | None = None) -> str | None:
    """The name of the adapter `profile` runs with now (None: the bare base model)."""
    return adapter_label(store, resolve_adapter(store, profile, model_path))


def resolve_adapter(store: Store | None, profile: str, model_path: Path | None = None) -> Path | None:
    """The adapter file `profile` should run with (None: the bare base model)."""
    if store is not None:
        activation = store.active_activation(profile)
        if activation is not None:
            if activation["adapter_id"] is None:
                return None
            return Path(store.get_adapter(activation["adapter_id"])["path"])
    return builtin_adapter_path(model_path)


def check_base(adapter_name: str, base_sha256: str | None, model_path: Path) -> None:
    """Refuse an adapter trained for another base model than `model_path` (or than the file
    `model_path` was re-quantized from)."""
    from rpo_local.models import base_digests, sha256

    if base_sha256 and base_sha256 not in base_digests(model_path):
        raise AdapterMismatch(
            f"adapter {adapter_name!r} was trained for another base model (sha256 {base_sha256[:12]}…), "
            f"not {model_path.name} ({sha256(model_path)[:12]}…); `rpo models use` its base, or train one "
            "for this model with `rpo train sft`"
        )


def adapter_from_ref(ref: str, store: Store | None = None) -> Path | None:
    """An adapter named on the command line: 'none', a GGUF file, a shipped adapter's name, or a
    registered name/id."""
    if ref == "none":
        return None
    if ref in BUILTINS:
        return asset_path(BUILTINS[ref][0])
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

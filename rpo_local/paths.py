"""Every filesystem location rpo-local uses, in one place.

`RPO_HOME` puts everything (data, config, cache) under one directory: tests and demos use it
to stay out of the user's real profile.
"""

from __future__ import annotations

import os
from pathlib import Path

APP = "rpo-local"


def _home() -> Path | None:
    value = os.environ.get("RPO_HOME")
    return Path(value).expanduser() if value else None


def data_dir() -> Path:
    if home := _home():
        return home / "data"
    from platformdirs import user_data_path

    return user_data_path(APP, appauthor=False)


def config_dir() -> Path:
    if home := _home():
        return home / "config"
    from platformdirs import user_config_path

    return user_config_path(APP, appauthor=False)


def cache_dir() -> Path:
    if home := _home():
        return home / "cache"
    from platformdirs import user_cache_path

    return user_cache_path(APP, appauthor=False)


def db_path() -> Path:
    return data_dir() / "rpo.db"


def config_path() -> Path:
    return config_dir() / "config.toml"


def adapters_dir() -> Path:
    return data_dir() / "adapters"


def styles_dir() -> Path:
    """Per-profile style vectors (llama.cpp control vectors, `rpo style build`)."""
    return data_dir() / "styles"


def models_dir() -> Path:
    """Models rpo made itself (`rpo quantize model`)."""
    return data_dir() / "models"


def runs_dir() -> Path:
    """Training runs: datasets, checkpoints and logs."""
    return data_dir() / "runs"


def embed_dir() -> Path:
    """Embedding models exported to ONNX (rebuilt from their package when missing)."""
    return cache_dir() / "embed"


def torch_models_dir() -> Path:
    """Reflection models converted from GGUF for torch (training), one folder per GGUF sha256."""
    return cache_dir() / "torch"


def all_paths() -> dict[str, Path]:
    return {
        "data": data_dir(),
        "config": config_path(),
        "database": db_path(),
        "adapters": adapters_dir(),
        "styles": styles_dir(),
        "models": models_dir(),
        "runs": runs_dir(),
        "cache": cache_dir(),
        "embed": embed_dir(),
        "torch": torch_models_dir(),
    }


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path

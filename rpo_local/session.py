"""Assembling the pipeline for one profile: store, engine with the right adapter, reflector.

The CLI, the TUI, the daemon and library users (`rpo_local.open_reflector`) all go through
here, so they resolve models and adapters the same way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from rpo_local.adapters import adapter_from_ref, resolve_adapter
from rpo_local.config import Config, load_config

if TYPE_CHECKING:
    from rpo_local.reflect import Reflector
    from rpo_local.store import Store


def adapter_for(store: Store, profile: str, adapter: str | None) -> Path | None:
    """An explicit choice ('none', a registered name/id, or a file), else the profile's own."""
    if adapter is None:
        return resolve_adapter(store, profile)
    return adapter_from_ref(adapter, store)


def open_reflector(
    config: Config | None = None,
    *,
    profile: str | None = None,
    model: str | Path | None = None,
    adapter: str | None = None,
    store: Store | None = None,
    style: bool | None = None,
) -> Reflector:
    """A ready Reflector for `profile` (default: the configured one), running the adapter that
    profile uses, exactly as `rpo rewrite` does; its rewrites are for `profile` unless told
    otherwise. The profile must exist (checked before the model loads). `style`: steer with the
    profile's style vector (None: as configured; True and none built is a NotFound)."""
    from rpo_local import engine as engine_mod
    from rpo_local.reflect import Reflector
    from rpo_local.store import Store

    config = config or load_config()
    profile = config.profile if profile is None else profile
    config = dataclasses.replace(config, profile=profile)
    store = store or Store.open()
    store.get_profile(profile)
    adapter_path = adapter_for(store, profile, adapter)
    eng = engine_mod.open_engine(config, model=model, adapter=adapter_path)
    if config.style if style is None else style:
        from rpo_local.style import apply_profile_style

        apply_profile_style(eng, config, profile, required=bool(style))
    return Reflector(store, eng, config)

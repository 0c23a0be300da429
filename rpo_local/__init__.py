"""rpo-local: an offline, private personalization layer for LLM replies.

A black-box base model writes a generic reply; a small GGUF reflection model rewrites it in
the user's style from the most relevant items of their own history (Reflective
Personalization Optimization, Hao et al. 2025).

The Python API is the product; the CLI, the TUI and the daemon are thin layers on top::

    from rpo_local import open_reflector
    reflector = open_reflector(profile="me")  # the model with the profile's adapter, as `rpo rewrite` runs it
    result = reflector.rewrite("Generic reply ...")

`Reflector(store, engine)` is the lower level: it runs whatever adapter `engine` carries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Lazy re-exports keep `import rpo_local` cheap (no llama_cpp, no sqlite-utils scan).
_EXPORTS = {
    "Store": "rpo_local.store",
    "Config": "rpo_local.config",
    "load_config": "rpo_local.config",
    "Reflector": "rpo_local.reflect",
    "RewriteResult": "rpo_local.reflect",
    "open_engine": "rpo_local.engine",
    "open_reflector": "rpo_local.session",
    "retrieve": "rpo_local.retrieve",
}

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports on first use
    from rpo_local.config import Config as Config
    from rpo_local.config import load_config as load_config
    from rpo_local.engine import open_engine as open_engine
    from rpo_local.reflect import Reflector as Reflector
    from rpo_local.reflect import RewriteResult as RewriteResult
    from rpo_local.retrieve import retrieve as retrieve
    from rpo_local.session import open_reflector as open_reflector
    from rpo_local.store import Store as Store


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)


__all__ = [*_EXPORTS, "__version__"]

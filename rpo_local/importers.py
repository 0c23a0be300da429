"""Reading a user's existing writing into history items.

Formats: plain text / Markdown (one item per file, or per blank-line paragraph), JSONL (one
object per line with `text`), and the `logs.db` of Simon Willison's `llm` CLI (the prompts
are the user's own writing).
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from rpo_local.errors import InputError

SQLITE_MAGIC = b"SQLite format 3\x00"
FORMATS = ("auto", "text", "jsonl", "llm")


def detect_format(path: Path) -> str:
    with path.open("rb") as fh:
        head = fh.read(16)
    if head == SQLITE_MAGIC:
        return "llm"
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    return "text"


def read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data:
        raise InputError(f"{path}: looks like a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start})") from None


def iter_text(path: Path, *, split: str = "paragraph", kind: str = "note") -> Iterator[dict]:
    text = read_text_file(path)
    parts = [text] if split == "file" else re.split(r"\n\s*\n", text)
    for part in parts:
        if part.strip():
            yield {"text": part.strip(), "kind": kind, "source": str(path)}


def iter_jsonl(path: Path, *, kind: str = "note") -> Iterator[dict]:
    for lineno, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        text = obj.get("text", obj.get("content")) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise InputError(f"{path}:{lineno}: expected an object with a string 'text' field")
        yield {
            "text": text,
            "kind": obj.get("kind") or kind,
            "source": obj.get("source") or str(path),
            "created_at": obj.get("created_at"),
        }


def iter_llm_logs(path: Path) -> Iterator[dict]:
    """The user's prompts from an `llm` logs.db (table `responses`)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        rows = conn.execute(
            "select prompt, datetime_utc, model from responses where prompt is not null "
            "and trim(prompt) != '' order by datetime_utc"
        ).fetchall()
        conn.close()
    except sqlite3.DatabaseError as exc:
        raise InputError(f"{path}: not an llm logs.db ({exc})") from None
    for prompt, when, model in rows:
        yield {"text": prompt, "kind": "chat", "source": f"llm:{model}", "created_at": when}


def iter_items(path: Path, *, fmt: str = "auto", split: str = "paragraph", kind: str = "note") -> Iterator[dict]:
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give the files in it (e.g. {path}/*.md)")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "llm":
        return iter_llm_logs(path)
    if fmt == "jsonl":
        return iter_jsonl(path, kind=kind)
    return iter_text(path, split=split, kind=kind)

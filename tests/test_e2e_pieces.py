"""End to end with the real model: a whole chat reply (paragraphs, a numbered list, a code block,
a URL) rewritten piece by piece by `rpo rewrite` for the demo persona. Assertions are on
properties, never on exact model text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

pytestmark = pytest.mark.model

DEMO = Path(__file__).resolve().parents[1] / "demo"


def rpo(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rpo_local", *args], input=stdin, capture_output=True,
                          timeout=1800, env={**os.environ, "NO_COLOR": "1"})


def blocks(text: str) -> list[tuple]:
    tokens = MarkdownIt("commonmark").parse(text)
    return [(t.type, t.markup, t.info, t.content if t.type == "fence" else "") for t in tokens]


def test_a_multi_paragraph_reply_is_rewritten_piece_by_piece(rpo_home):
    assert rpo("history", "import", "--profile", "alex", str(DEMO / "persona-alex.txt"), "--kind", "chat").returncode == 0
    reply = (DEMO / "generic-reply-long.md").read_text()
    r = rpo("rewrite", "--profile", "alex", "--json", stdin=reply.encode())
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    out, pieces = doc["rewrite"], doc["pieces"]
    # Everything outside the pieces is the input's, byte for byte; each piece is in its place.
    rebuilt, pos = [], 0
    for p in pieces:
        assert reply[p["start"]:p["end"]] == p["input"]
        rebuilt += [reply[pos:p["start"]], p["output"]]
        pos = p["end"]
    assert out == "".join(rebuilt) + reply[pos:]
    assert blocks(out) == blocks(reply)  # same list, numbering, code block
    assert "https://docs.example.com/deploy" in out and "docker build --no-cache -t app:latest ." in out
    assert len(pieces) >= 5 and all(p["rewritten"] or p["reason"] for p in pieces)
    assert any(p["rewritten"] for p in pieces), [p["reason"] for p in pieces]
    assert all(p["output"] == p["input"] for p in pieces if not p["rewritten"])
    assert isinstance(doc["trajectory"], list) and len(doc["trajectory"]) == len(pieces)
    logged = json.loads(rpo("log", "--profile", "alex", "--json").stdout)
    assert logged[0]["rewrite"] == out and logged[0]["input"] == reply

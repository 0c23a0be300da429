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


def test_retrieval_once_per_reply_lets_llama_cpp_reuse_the_pieces_shared_prompt(store, real_engine):
    from rpo_local import prompts
    from rpo_local.config import Config
    from rpo_local.reflect import Reflector

    persona = [p.strip() for p in (DEMO / "persona-alex.txt").read_text().split("\n\n") if p.strip()]
    store.add_items("alex", [{"text": t} for t in persona])
    # Each sentence's words find another of alex's posts first.
    reply = "The meeting could have been an email. My laptop fan is very loud today. I will get tacos after the fix."

    def reused(scope: str) -> tuple[int, list]:
        real_engine.llm.reset()
        before = real_engine.decode_stats.reused
        result = Reflector(store, real_engine, Config(retrieval_scope=scope, trajectory_tokens=24)).rewrite(
            reply, "alex", log=False)
        return real_engine.decode_stats.reused - before, result.pieces

    by_piece, pieces = reused("piece")
    assert len(pieces) == 3 and len({p.retrieved_ids[0] for p in pieces}) == 3
    by_reply, pieces = reused("reply")
    assert len({tuple(p.retrieved_ids) for p in pieces}) == 1
    items = [it["text"] for it in store.get_items(pieces[0].retrieved_ids)]
    prompt = prompts.reflection_prompt(real_engine.chat_template(), pieces[0].input, items)
    history = real_engine.count_tokens(prompt[prompt.index("The user's writing:"): prompt.index("Generic reply:")])
    # Pieces 2 and 3 read only their own text: the history (with the system prompt) comes from the cache.
    assert by_reply - by_piece >= history, (by_reply, by_piece, history)

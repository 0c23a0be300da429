"""BM25 retrieval over FTS5 with recency fallback."""

from __future__ import annotations

from rpo_local.retrieve import retrieve
from rpo_local.text import content_words, fts_or_query


def test_content_words_drop_stopwords_and_duplicates():
    assert content_words("The cat and THE other cat's dog, I think!") == ["cat", "cat's", "dog", "think"]
    assert fts_or_query("the and of") == ""


def test_bm25_ranks_matching_items_first(store):
    store.add_items(
        "ann",
        [
            {"text": "my dog ate my homework again", "created_at": "2020-01-01"},
            {"text": "pizza night with friends", "created_at": "2020-01-02"},
            {"text": "walked the dog in the rain, dog was soaked", "created_at": "2020-01-03"},
            {"text": "new phone finally arrived", "created_at": "2020-01-04"},
        ],
    )
    hits = retrieve(store, "ann", "Your dog needs a walk after the rain.", k=2)
    assert [h["text"] for h in hits] == ["walked the dog in the rain, dog was soaked", "my dog ate my homework again"]


def test_recency_fills_when_nothing_matches(store):
    store.add_items(
        "ann",
        [{"text": f"item {i}", "created_at": f"2020-01-0{i}"} for i in range(1, 6)],
    )
    hits = retrieve(store, "ann", "quantum chromodynamics", k=3)
    assert [h["text"] for h in hits] == ["item 5", "item 4", "item 3"]


def test_partial_matches_are_topped_up_by_recency_without_duplicates(store):
    store.add_items("ann", [{"text": "coffee time", "created_at": "2020-01-01"},
                            {"text": "late again", "created_at": "2020-01-05"},
                            {"text": "sunny", "created_at": "2020-01-03"}])
    hits = retrieve(store, "ann", "more coffee please", k=3)
    assert [h["text"] for h in hits] == ["coffee time", "late again", "sunny"]


def test_k_zero_and_punctuation_only_query(store):
    store.add_item("ann", "hello")
    assert retrieve(store, "ann", "hello", k=0) == []
    assert [h["text"] for h in retrieve(store, "ann", '"*) OR NEAR(', k=2)] == ["hello"]


def test_one_leaf_module_defines_words():
    """The store needs no retrieval code (no import cycle), and no module keeps its own word regex."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    import rpo_local
    from rpo_local import text

    tree = ast.parse(Path(text.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.startswith("rpo_local")], "text.py is a leaf"
    probe = "import sys, rpo_local.store; print(sorted(m for m in sys.modules if m == 'rpo_local.retrieve'))"
    package = Path(rpo_local.__file__).parent
    env = {**os.environ, "PYTHONPATH": str(package.parent)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[]"
    copies = [p.name for p in package.rglob("*.py") if p != Path(text.__file__) and text.WORD.pattern in p.read_text()]
    assert copies == []


def test_a_large_history_leaves_out_its_commonest_query_words(store, monkeypatch):
    from rpo_local import retrieve as retrieve_mod

    monkeypatch.setattr(retrieve_mod, "BM25_ROWS", 3)  # a large history, in small
    store.add_items("ann", [{"text": f"coffee again {i}", "created_at": f"2020-01-0{i}"} for i in range(1, 6)]
                    + [{"text": "tea with lemon", "created_at": "2019-01-01"}])
    hits = retrieve(store, "ann", "coffee with lemon", k=2)  # "coffee" (5 items) is left out
    assert hits[0]["text"] == "tea with lemon" and hits[0]["score"] is not None and hits[1]["score"] is None
    assert all(h["score"] is not None for h in retrieve(store, "ann", "coffee", k=2))  # the rarest stays

"""Retrieval: the profile items most relevant to the text being rewritten.

BM25 over the FTS5 index, with a query built from the text's content words (as LaMP's BM25
retriever does); recency breaks ties and fills in when nothing matches. The queries
themselves are the store's (`Store.bm25_items`, `Store.recent_items`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rpo_local.text import fts_or_query

if TYPE_CHECKING:
    from rpo_local.store import Store


def retrieve(store: Store, profile: str, text: str, k: int = 4) -> list[dict]:
    """Top-`k` items of `profile` for `text`: BM25 first, then the most recent items."""
    if k <= 0:
        return []
    pid = store.get_profile(profile).id
    query = fts_or_query(text)
    hits = store.bm25_items(pid, query, k) if query else []
    if len(hits) < k:
        hits += store.recent_items(pid, k - len(hits), exclude=[h["id"] for h in hits])
    return hits

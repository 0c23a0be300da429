"""Retrieval: the profile items most relevant to the text being rewritten.

Three retrievers (config key `retriever`):
- `bm25`: BM25 over the FTS5 index, with a query built from the text's content words (as
  LaMP's BM25 retriever does).
- `dense`: cosine similarity of all-MiniLM-L6-v2 embeddings (rpo_local.embed), so items written
  in other words than the text are found too. The profile's vectors are one numpy matrix held
  in memory (reloaded when the store's embeddings change); a matrix product over 100k items
  takes a few milliseconds, so no vector index or SQLite extension is needed.
- `hybrid`: reciprocal-rank fusion of the two rankings.

Recency breaks ties and fills in when nothing matches. A history without embeddings (the
[retrieval] extra not installed, the model not exported, items not embedded yet) retrieves with
BM25 and says so once per process on stderr. The SQL is the store's.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rpo_local.errors import InputError
from rpo_local.text import fts_or_query

if TYPE_CHECKING:
    import numpy as np

    from rpo_local.store import Store

RETRIEVERS = ("bm25", "dense", "hybrid")
RRF_K = 60  # the usual reciprocal-rank-fusion constant (Cormack et al. 2009)
CANDIDATES = 50  # per ranking fused by hybrid (at least 10 x k)


def retrieve(store: Store, profile: str, text: str, k: int = 4, retriever: str = "bm25") -> list[dict]:
    """Top-`k` items of `profile` for `text` by `retriever`, then the most recent items."""
    if retriever not in RETRIEVERS:
        raise InputError(f"unknown retriever {retriever!r}; use one of {', '.join(RETRIEVERS)}")
    if k <= 0:
        return []
    pid = store.get_profile(profile).id
    index = _dense_index(store, pid, profile) if retriever != "bm25" else None
    if index is None:
        hits = _bm25(store, pid, text, k)
    elif retriever == "dense":
        hits = _by_ids(store, index.search(text, k))
    else:
        n = max(CANDIDATES, 10 * k)
        hits = _by_ids(store, _fuse([[h["id"] for h in _bm25(store, pid, text, n)], index.search(text, n)], k))
    if len(hits) < k:
        hits += store.recent_items(pid, k - len(hits), exclude=[h["id"] for h in hits])
    return hits


def _bm25(store: Store, pid: int, text: str, limit: int) -> list[dict]:
    query = fts_or_query(text)
    return store.bm25_items(pid, query, limit) if query else []


def _fuse(rankings: list[list[int]], k: int) -> list[int]:
    """Reciprocal-rank fusion: each ranking adds 1 / (RRF_K + rank) to an item's score."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item_id in enumerate(ranking, start=1):
            scores[item_id] = scores.get(item_id, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(scores, key=lambda i: (-scores[i], -i))[:k]


def _by_ids(store: Store, ids: list[int]) -> list[dict]:
    return [{**item, "score": None} for item in store.get_items(ids)]


@dataclass
class DenseIndex:
    """The vectors of one profile's items from one model, as a matrix (one row per item)."""

    stamp: tuple[int, int]
    ids: np.ndarray
    matrix: np.ndarray
    embedder: Any

    def search(self, text: str, n: int) -> list[int]:
        """Ids of the `n` items most similar to `text`, best first (ties: the newer item)."""
        return self.top(self.embedder.encode([text])[0], n)

    def top(self, query: np.ndarray, n: int) -> list[int]:
        import numpy as np

        scores = self.matrix @ query
        best = np.arange(len(scores))
        if n < len(scores):  # the top n, and whatever ties with the n-th (the tie-break decides)
            best = np.flatnonzero(scores >= scores[np.argpartition(-scores, n - 1)[n - 1]])
        best = best[np.lexsort((-self.ids[best], -scores[best]))][:n]
        return [int(i) for i in self.ids[best]]


_indexes: weakref.WeakKeyDictionary[Store, dict[int, DenseIndex]] = weakref.WeakKeyDictionary()
_said: set[str] = set()


def _dense_index(store: Store, pid: int, profile: str) -> DenseIndex | None:
    """The profile's index, loaded (or reloaded after a change) from the store; None, said once
    on stderr, when there is nothing to search with."""
    from rpo_local import embed

    if reason := embed.problem():
        _say_once(f"{reason}; retrieving with BM25")
        return None
    embedder = embed.get_embedder()
    cached = _indexes.setdefault(store, {})
    stamp = store.embedding_stamp()
    index = cached.get(pid)
    if index is None or index.stamp != stamp or index.embedder is not embedder:
        index = cached[pid] = _load(store, pid, embedder, stamp)
        if missing := store.count_embedding_todo(pid, embedder.model_id):
            what = "has no embeddings yet" if not len(index.ids) else f"has {missing} item(s) without an embedding"
            _say_once(f"profile {profile!r} {what} (`rpo history embed --profile {profile}`)"
                      + ("; retrieving with BM25" if not len(index.ids) else ""))
    return index if len(index.ids) else None


def _load(store: Store, pid: int, embedder: Any, stamp: tuple[int, int]) -> DenseIndex:
    import numpy as np

    from rpo_local.embed import DIM

    rows = store.embeddings(pid, embedder.model_id)
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), DIM)
    return DenseIndex(stamp, ids, matrix, embedder)


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(f"rpo: {message}", file=sys.stderr, flush=True)

"""Retrieval: the profile items most relevant to the text being rewritten.

Retrievers (config key `retriever`):
- `auto` (the default): `dense` where it can run (the [retrieval] extra installed, the model
  exported, the profile embedded), else `bm25`, without a note: dense found better context for the
  shipped adapter on the tuning users (README "Retrieval"). An adapter that reads BM25 contexts
  better says so (`adapters.retriever`), and auto is then `bm25`.
- `bm25`: BM25 over the FTS5 index, with a query built from the text's content words (as
  LaMP's BM25 retriever does), the commonest left out in a large history.
- `dense`: cosine similarity of all-MiniLM-L6-v2 embeddings (rpo_local.embed), so items written
  in other words than the text are found too. The profile's vectors are one numpy matrix held
  in memory (reloaded when the store's embeddings change), searched exactly below APPROX_FROM
  items; above it, a process that keeps searching builds an HNSW graph (usearch) in the
  background and then ranks the graph's candidates exactly.
- `hybrid`: reciprocal-rank fusion of the two rankings.

Recency breaks ties and fills in when nothing matches. With `dense` or `hybrid` asked for, a
history without embeddings (the [retrieval] extra not installed, the model not exported, items
not embedded yet) retrieves with BM25 and says so once per process on stderr. The SQL is the store's.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rpo_local.errors import InputError
from rpo_local.text import content_words, fts_or_query

if TYPE_CHECKING:
    import numpy as np

    from rpo_local.store import Store

RETRIEVERS = ("auto", "bm25", "dense", "hybrid")
RRF_K = 60  # the usual reciprocal-rank-fusion constant (Cormack et al. 2009)
CANDIDATES = 50  # per ranking fused by hybrid (at least 10 x k)
# Dense search is exact below APPROX_FROM items (~1-3 ms at 10-20k); above it an HNSW graph
# (built once BUILD_AFTER searches showed a long-lived process) yields ANN_CANDIDATES, ranked
# exactly. ANN_EF: usearch's expansion_search, set for recall (see README "Retrieval").
APPROX_FROM = 20_000
BUILD_AFTER = 3
ANN_CANDIDATES = 64
ANN_EF = 256
BM25_ROWS = 2000  # matching rows that bm25() scores, about (see _bm25)


def retrieve(store: Store, profile: str, text: str, k: int = 4, retriever: str = "bm25") -> list[dict]:
    """Top-`k` items of `profile` for `text` by `retriever`, then the most recent items."""
    if retriever not in RETRIEVERS:
        raise InputError(f"unknown retriever {retriever!r}; use one of {', '.join(RETRIEVERS)}")
    if k <= 0:
        return []
    pid = store.get_profile(profile).id
    index = _dense_index(store, pid, profile, quiet=retriever == "auto") if retriever != "bm25" else None
    if index is None:
        hits = _bm25(store, pid, text, k)
    elif retriever == "hybrid":
        n = max(CANDIDATES, 10 * k)
        hits = _by_ids(store, _fuse([[h["id"] for h in _bm25(store, pid, text, n)], index.search(text, n)], k))
    else:
        hits = _by_ids(store, index.search(text, k))
    if len(hits) < k:
        hits += store.recent_items(pid, k - len(hits), exclude=[h["id"] for h in hits])
    return hits


def resolved(retriever: str) -> str:
    """The retriever `auto` stands for on this machine (eval reports the one it used)."""
    if retriever != "auto":
        return retriever
    from rpo_local import embed

    return "dense" if embed.problem() is None else "bm25"


def _bm25(store: Store, pid: int, text: str, limit: int) -> list[dict]:
    """BM25 over the text's content words, leaving out the commonest once the words' matches
    pass BM25_ROWS (bm25() costs ~1 us per matching row, and a common word adds little to a
    score: its IDF is low); the rarest word is always kept."""
    words = content_words(text)
    if not words:
        return []
    counts = store.term_counts([fts_or_query(w) for w in words], BM25_ROWS)
    kept, rows = set(), 0
    for count, word in sorted(zip(counts, words, strict=True)):
        if kept and rows + count > BM25_ROWS:
            break
        kept.add(word)
        rows += count
    return store.bm25_items(pid, fts_or_query(" ".join(w for w in words if w in kept)), limit)


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
    """The vectors of one profile's items from one model, as a matrix (one row per item, by item
    id), searched exactly; from APPROX_FROM items on, through an HNSW graph (usearch) as well."""

    stamp: tuple[int, int]
    ids: np.ndarray
    matrix: np.ndarray
    embedder: Any
    graph: Any = None  # usearch.index.Index keyed by item id, once built
    searches: int = 0
    building: bool = False

    def search(self, text: str, n: int) -> list[int]:
        """Ids of the `n` items most similar to `text`, best first (ties: the newer item)."""
        return self.top(_query_vector(self.embedder, self.embedder.model_id, text), n)

    def top(self, query: np.ndarray, n: int) -> list[int]:
        import numpy as np

        if self.graph is not None:  # the graph's candidates, ranked by their exact scores
            keys = self.graph.search(query, max(n, ANN_CANDIDATES)).keys
            rows = np.searchsorted(self.ids, keys.astype(np.int64))
            return self._ranked(rows, self.matrix[rows] @ query, n)
        if len(self.ids) >= APPROX_FROM and not self.building:
            self.searches += 1
            if self.searches >= BUILD_AFTER:  # a long-lived process: build in the background
                self.building = True
                threading.Thread(target=self.build, daemon=True, name="rpo-hnsw").start()
        scores = self.matrix @ query
        rows = np.arange(len(scores))
        if n < len(scores):  # the top n, and whatever ties with the n-th (the tie-break decides)
            rows = np.flatnonzero(scores >= scores[np.argpartition(-scores, n - 1)[n - 1]])
        return self._ranked(rows, scores[rows], n)

    def _ranked(self, rows: np.ndarray, scores: np.ndarray, n: int) -> list[int]:
        import numpy as np

        order = np.lexsort((-self.ids[rows], -scores))[:n]
        return [int(i) for i in self.ids[rows[order]]]

    def build(self) -> None:
        """Build the HNSW graph of every vector (minutes at 100k items on 2 cores: searches stay
        exact meanwhile)."""
        import onnxruntime  # noqa: F401  first: importing it after usearch 2.26 crashes (SIGSEGV)
        from usearch.index import Index

        graph = Index(ndim=self.matrix.shape[1], metric="ip", dtype="f16",
                      connectivity=16, expansion_add=64, expansion_search=ANN_EF)
        graph.add(self.ids, self.matrix, threads=1)
        self.graph = graph

    def take_graph(self, old: DenseIndex) -> None:
        """Reuse `old`'s graph after a reload: add the new items' vectors and remove the
        forgotten ones, unless a kept item's vector changed or too much is new (then the graph
        is rebuilt in the background as for a fresh index)."""
        import numpy as np

        kept = np.isin(old.ids, self.ids)
        new = ~np.isin(self.ids, old.ids)
        if (old.graph is None or new.sum() > max(1000, len(self.ids) // 10)
                or not np.array_equal(old.matrix[kept], self.matrix[np.isin(self.ids, old.ids)])):
            return
        if not kept.all():
            old.graph.remove(old.ids[~kept])
        if new.any():
            old.graph.add(self.ids[new], self.matrix[new], threads=1)
        self.graph, old.graph = old.graph, None


_indexes: weakref.WeakKeyDictionary[Store, dict[int, DenseIndex]] = weakref.WeakKeyDictionary()
_said: set[str] = set()


def _dense_index(store: Store, pid: int, profile: str, quiet: bool = False) -> DenseIndex | None:
    """The profile's index, loaded (or reloaded after a change) from the store; None, said once
    on stderr unless `quiet`, when there is nothing to search with."""
    from rpo_local import embed

    say = (lambda _message: None) if quiet else _say_once
    if reason := embed.problem():
        say(f"{reason}; retrieving with BM25")
        return None
    embedder = embed.get_embedder()
    cached = _indexes.setdefault(store, {})
    stamp = store.embedding_stamp()
    index = cached.get(pid)
    if index is None or index.stamp != stamp or index.embedder is not embedder:
        old, index = index, _load(store, pid, embedder, stamp)
        if old is not None and old.embedder is embedder and len(index.ids) >= APPROX_FROM:
            index.take_graph(old)
        cached[pid] = index
        if missing := store.count_embedding_todo(pid, embedder.model_id):
            what = "has no embeddings yet" if not len(index.ids) else f"has {missing} item(s) without an embedding"
            say(f"profile {profile!r} {what} (`rpo history embed --profile {profile}`)"
                + ("; retrieving with BM25" if not len(index.ids) else ""))
    return index if len(index.ids) else None


def _load(store: Store, pid: int, embedder: Any, stamp: tuple[int, int]) -> DenseIndex:
    import numpy as np

    from rpo_local.embed import DIM

    rows = store.embeddings(pid, embedder.model_id)
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), DIM)
    return DenseIndex(stamp, ids, matrix, embedder)


@functools.lru_cache(maxsize=64)
def _query_vector(embedder: Any, model_id: str, text: str) -> np.ndarray:
    """The vector of a text being rewritten, kept for the next retrieval of the same text
    (retries, or dense and hybrid on one text); `model_id` keys it as the vectors do."""
    return embedder.encode_query(text)


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(f"rpo: {message}", file=sys.stderr, flush=True)

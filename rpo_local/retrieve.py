"""Retrieval: the profile items most relevant to the text being rewritten.

BM25 over the FTS5 index, with a query built from the text's content words (as LaMP's BM25
retriever does); recency breaks ties and fills in when nothing matches.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rpo_local.store import Store

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)
MAX_QUERY_TERMS = 48

# A compact English stopword list (function words carry no topic for BM25).
STOPWORDS = frozenset(
    """a about above after again against all am an and any are aren't as at be because been
    before being below between both but by can can't cannot could couldn't did didn't do does
    doesn't doing don't down during each few for from further had hadn't has hasn't have
    haven't having he he'd he'll he's her here here's hers herself him himself his how how's i
    i'd i'll i'm i've if in into is isn't it it's its itself let's me more most mustn't my myself
    no nor not of off on once only or other ought our ours ourselves out over own same shan't
    she she'd she'll she's should shouldn't so some such than that that's the their theirs them
    themselves then there there's these they they'd they'll they're they've this those through
    to too under until up very was wasn't we we'd we'll we're we've were weren't what what's
    when when's where where's which while who who's whom why why's will with won't would
    wouldn't you you'd you'll you're you've your yours yourself yourselves also just really
    paraphrase following tweet without explanation""".split()
)


def content_words(text: str) -> list[str]:
    """Lower-cased content words of `text`, first occurrence order, no duplicates."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(text.lower()):
        if word not in STOPWORDS and len(word) > 1 and word not in seen:
            seen[word] = None
    return list(seen)[:MAX_QUERY_TERMS]


def content_kept(text: str, source: str) -> float:
    """Share of `source`'s content words that `text` keeps (1.0 when `source` has none)."""
    wanted = content_words(source)
    if not wanted:
        return 1.0
    have = set(content_words(text))
    return sum(w in have for w in wanted) / len(wanted)


def _quote(term: str) -> str:
    return '"' + term.replace('"', '""') + '"'


def fts_or_query(text: str) -> str:
    """An FTS5 query matching any content word of `text` (BM25 ranks the matches)."""
    return " OR ".join(_quote(w) for w in content_words(text))


def fts_phrase_query(text: str) -> str:
    """An FTS5 query for interactive search: every word must match, the last as a prefix."""
    words = _WORD.findall(text.lower())
    if not words:
        return ""
    terms = [_quote(w) for w in words[:-1]] + [_quote(words[-1]) + "*"]
    return " AND ".join(terms)


def retrieve(store: Store, profile: str, text: str, k: int = 4) -> list[dict]:
    """Top-`k` items of `profile` for `text`: BM25 first, then the most recent items."""
    if k <= 0:
        return []
    pid = store.get_profile(profile).id
    query = fts_or_query(text)
    hits: list[dict] = []
    if query:
        hits = list(
            store.db.query(
                "select items.id, items.text, items.kind, items.created_at, bm25(items_fts) as score "
                "from items_fts join items on items.id = items_fts.rowid "
                "where items_fts match ? and items.profile_id = ? "
                "order by score, items.created_at desc, items.id desc limit ?",
                [query, pid, k],
            )
        )
    if len(hits) < k:
        have = [h["id"] for h in hits] or [-1]
        marks = ",".join("?" * len(have))
        hits += list(
            store.db.query(
                "select id, text, kind, created_at, null as score from items "
                f"where profile_id = ? and id not in ({marks}) "
                "order by created_at desc, id desc limit ?",
                [pid, *have, k - len(hits)],
            )
        )
    return hits

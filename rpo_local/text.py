"""Words of a text, as retrieval, the rewrite gate and the training data all count them.

A leaf module (nothing of rpo_local imported), so the store, retrieval, reflection and the
training data share one definition of a word.
"""

from __future__ import annotations

import re

# Letters and digits, with one inner apostrophe ("don't" is one word); "_" separates words.
WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)
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


def words(text: str) -> list[str]:
    """The words of `text` in order, case kept."""
    return WORD.findall(text)


def word_set(text: str) -> set[str]:
    """The lower-cased words of `text` (stopwords included)."""
    return set(words(text.lower()))


def content_words(text: str) -> list[str]:
    """Lower-cased content words of `text`, first occurrence order, no duplicates."""
    seen: dict[str, None] = {}
    for word in words(text.lower()):
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
    found = words(text.lower())
    if not found:
        return ""
    terms = [_quote(w) for w in found[:-1]] + [_quote(found[-1]) + "*"]
    return " AND ".join(terms)

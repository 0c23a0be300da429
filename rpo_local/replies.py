"""The multi-sentence replies task (`rpo eval --replies`): LaMP-7 users, whole replies.

LaMP-7 pairs one neutral text with one tweet. A chat reply has several sentences, so for each
user this task joins LaMP's neutral input and the neutral versions of 2-3 of the user's own
profile tweets into one generic reply; the target joins LaMP's gold tweet and those tweets, in
the same order; the user's history is the rest of the profile (the chosen tweets are taken out
of it, and LaMP's gold is never in it). The neutral versions come from the product's own
neutral-paraphrase path (`prompts.neutral_paraphrase_messages`, the bare base model, greedy:
`training.dataset.paraphrase`), which sees only the tweet, never the user's other writing.

Why it is fair: the generic reply is what `copy` returns, so every method starts from the same
text; no target is retrievable as context; which tweets are used depends only on the tweets
and their paraphrases (the first eligible ones in profile order: 6-30 words, no link, and a
paraphrase that differs from the tweet and keeps enough of it — the filter the training data's
back-translation uses), never on a rewrite or a score; the number of tweets (2-3) is fixed per
user by a hash of the user id. Evaluation users are LaMP's first 100 (0-99), as for the tweet
task; settings are chosen on users 946-1045.

Paraphrases are cached in the cache directory (`rpo paths`), keyed by tweet and model, so a
rerun (or another adapter) reuses them and the task stays the same.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rpo_local import lamp, paths
from rpo_local.store import digest

if TYPE_CHECKING:
    from rpo_local.engine import Engine

TASK = "LaMP_7_replies"
MIN_TWEETS, MAX_TWEETS = 2, 3  # with LaMP's own pair: 3-4 texts, ~40-80 words a reply
MIN_WORDS, MAX_WORDS = 6, 30
CANDIDATES = 5  # profile tweets paraphrased per user at most (the base model is slow on a CPU)
_LINK = re.compile(r"https?://|www\.", re.IGNORECASE)

Progress = Callable[[int, int], None]


def cache_path(engine: Engine) -> Path:
    return paths.cache_dir() / f"lamp7-replies-paraphrases-{Path(engine.model_path).stem}.jsonl"


def tweet_count(user_id: str | int) -> int:
    """How many of the user's tweets join the reply: 2-3, fixed by the user id."""
    h = int(hashlib.sha1(str(user_id).encode()).hexdigest(), 16)
    return MIN_TWEETS + h % (MAX_TWEETS - MIN_TWEETS + 1)


def eligible(tweet: str) -> bool:
    return MIN_WORDS <= len(tweet.split()) <= MAX_WORDS and not _LINK.search(tweet)


def usable(paraphrase: str, tweet: str) -> bool:
    """A paraphrase that is not the tweet itself and keeps enough of it (back-translation's filter)."""
    from rpo_local.training.dataset import MIN_TARGET_KEPT, is_rewrite

    same = " ".join(paraphrase.lower().split()) == " ".join(tweet.lower().split())
    return bool(paraphrase.strip()) and not same and is_rewrite(paraphrase, tweet, MIN_TARGET_KEPT)


def sentence(text: str) -> str:
    """`text` on one line, ending like a sentence (so that the joined reply reads as one)."""
    text = " ".join(text.split())
    return text if text[-1:] in ".!?…" else text + "."


def build(
    data: lamp.LampData, engine: Engine, *, offset: int = 0, limit: int | None = None,
    cache: Path | None = None, on_progress: Progress | None = None,
) -> lamp.LampData:
    """The replies task for the selected users of a LaMP-7 file (users without enough usable
    tweets are left out: the returned users say which were used)."""
    from rpo_local.errors import InputError
    from rpo_local.training import backtranslate, dataset

    if data.task != "LaMP_7":
        raise InputError(f"--replies builds on LaMP-7 tweets; {data.source} holds {data.task}")
    cache = cache or cache_path(engine)
    texts, known = _read_cache(cache)
    users = lamp.select(data.users, offset=offset, limit=limit)
    before = engine.adapter_path
    engine.set_adapter(None)  # paraphrases come from the bare base model, as in training
    out: list[lamp.LampUser] = []
    try:
        for n, user in enumerate(users, 1):
            want = tweet_count(user.id)
            chosen: list[tuple[int, str, str]] = []
            for idx, entry in _candidates(user.profile):
                key = digest(entry)
                if key not in known:
                    known[key] = dataset.paraphrase(engine, entry)
                    texts[key] = entry
                    backtranslate.write_paraphrases(cache, list(texts.values()), [known[k] for k in texts])
                if usable(known[key], entry):
                    chosen.append((idx, entry, known[key]))
                if len(chosen) == want:
                    break
            if len(chosen) == want:
                out.append(_user(user, chosen))
            if on_progress:
                on_progress(n, len(users))
    finally:
        engine.set_adapter(before)
    end = offset + len(users) - 1
    return lamp.LampData(TASK, out, f"{data.source} (replies from users {offset}-{end})")


def _read_cache(cache: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Tweets and their paraphrases by digest (backtranslate's file format); empty if none yet."""
    from rpo_local.training.backtranslate import read_pairs

    pairs = read_pairs(cache) if cache.is_file() else {}
    return {k: t for k, (t, _) in pairs.items()}, {k: p for k, (_, p) in pairs.items()}


def _candidates(profile: Sequence[dict]) -> list[tuple[int, str]]:
    found = [(i, p["text"].strip()) for i, p in enumerate(profile) if eligible(str(p.get("text") or "").strip())]
    return found[:CANDIDATES]


def _user(user: lamp.LampUser, chosen: list[tuple[int, str, str]]) -> lamp.LampUser:
    neutral = lamp.query_text("LaMP_7", user.input)
    used = {i for i, _, _ in chosen}
    used_texts = {digest(t) for _, t, _ in chosen}
    generic = " ".join(sentence(t) for t in [neutral, *(p for _, _, p in chosen)])
    target = " ".join(" ".join(t.split()) for t in [user.output, *(t for _, t, _ in chosen)])
    history = [p for i, p in enumerate(user.profile)
               if i not in used and digest(str(p.get("text") or "")) not in used_texts]
    return lamp.LampUser(user.id, generic, history, target, user.where)

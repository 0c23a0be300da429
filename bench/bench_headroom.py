"""How much ROUGE-1 can word edits of the neutral text gain on LaMP-7? Prints one JSON line.

Issue 4 asks the shipped adapter for copy-input + 0.03 ROUGE-1. This measures, without any
model, what dropping words of the neutral text can gain, so the adapter's figures can be read
against it:

- `oracle_drop`: keep only the neutral words that occur in the user's tweet (gold known).
- `learned_drop`: drop the words that users' tweets leave out, learned on training users
  100-945 (seen in >= 3 neutral texts, missing from > 75% of their tweets). The gain comes
  with broken sentences ("Thank you for the lovely dinner, it was a wonderful evening." ->
  "you for the dinner, it was a evening."); `gate_refused`: the share the runtime's content
  gate refuses.
- `fluent_drop`: the same, restricted to greetings and sentence adverbs whose removal keeps a
  sentence grammatical ("also", "really", "unfortunately", ...).

Scored on the evaluation users (0-99) and on users 946-1045. Texts are read from
../shared/data/lamp7/ at run time and never printed.
Run: .venv/bin/python bench/bench_headroom.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from rpo_local import adapters
from rpo_local.config import Config
from rpo_local.evaluate import rouge
from rpo_local.reflect import keeps_content
from rpo_local.text import word_set
from rpo_local.training.dataset import EVAL_USERS, lamp_generic, read_lamp

ROOT = Path(__file__).resolve().parents[1]
FLUENT = frozenset(
    """also really currently however unfortunately actually just very quite truly definitely extremely
    hey hi hello dear well indeed simply totally absolutely certainly still though anyway anyways
    finally now so too particularly especially incredibly slightly somewhat rather perhaps probably
    basically honestly seriously literally greatly deeply highly sincerely""".split()
)


def learn_drop(pairs: Sequence[tuple[str, str]], min_seen: int = 3, min_absent: float = 0.75) -> frozenset[str]:
    seen: Counter[str] = Counter()
    absent: Counter[str] = Counter()
    for neutral, tweet in pairs:
        mine = word_set(tweet)
        for w in word_set(neutral):
            seen[w] += 1
            absent[w] += w not in mine
    return frozenset(w for w, n in seen.items() if n >= min_seen and absent[w] / n > min_absent)


def drop_words(text: str, drop: Callable[[str], bool]) -> str:
    kept = [t for t in text.split() if not (word_set(t) and all(map(drop, word_set(t))))]
    return " ".join(kept) or text


def oracle_drop(neutral: str, gold: str) -> str:
    """The neutral text without the words the user's tweet lacks (the gold known)."""
    mine = word_set(gold)
    return drop_words(neutral, lambda w: w not in mine)


def gain(rows: Sequence[dict], edit: Callable[[str, str], str], min_kept: float) -> dict:
    deltas, refused = [], 0
    for row in rows:
        neutral, gold = lamp_generic(row["input"]), row["output"]
        edited = edit(neutral, gold)
        refused += not keeps_content(edited, neutral, min_kept)
        deltas.append(rouge(edited, gold)[0] - rouge(neutral, gold)[0])
    return {"rouge1_gain": round(statistics.mean(deltas), 4), "gate_refused": round(refused / len(rows), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lamp", type=Path, default=ROOT.parent / "shared" / "data" / "lamp7" / "dev.jsonl")
    args = ap.parse_args()
    rows = read_lamp(args.lamp)
    train, val, evaluation = rows[EVAL_USERS:946], rows[946:], rows[:EVAL_USERS]
    drop = learn_drop([(lamp_generic(r["input"]), r["output"]) for r in train])
    fluent = drop & FLUENT
    edits = {
        "oracle_drop": oracle_drop,
        "learned_drop": lambda n, g: drop_words(n, drop.__contains__),
        "fluent_drop": lambda n, g: drop_words(n, fluent.__contains__),
    }
    min_kept = adapters.setting(Config(), "min_content_kept", None)  # the embedded model's gate
    out: dict = {"learned_words": len(drop), "fluent_words": sorted(fluent), "gate": min_kept}
    for name, subset in (("eval_users_0_99", evaluation), ("users_946_1045", val)):
        copy = statistics.mean(rouge(lamp_generic(r["input"]), r["output"])[0] for r in subset)
        out[name] = {"copy_rouge1": round(copy, 4), **{k: gain(subset, f, min_kept) for k, f in edits.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

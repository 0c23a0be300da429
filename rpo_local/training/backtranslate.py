"""Back-translation: SFT examples from every item of a user's history, not only LaMP's one pair.

A history item y has no generic version. The untrained base model writes poor ones (it copies or
answers instead of paraphrasing), so a *neutralizer* LoRA is first fine-tuned the other way
round, on LaMP pairs (the user's text -> LaMP's neutral text), with the product's own neutral
paraphrase prompt. Its paraphrases of history items then read like the generic texts the
reflection model meets at inference, and each becomes a (g, context, y) example. Generation is
batched in torch (a GPU paraphrases ~16k tweets in about a minute); `dataset.paraphrase` is the
one-at-a-time llama.cpp path of a laptop. torch is imported only in here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rpo_local import prompts
from rpo_local.fsutil import atomic_write_text
from rpo_local.retrieve import retrieve
from rpo_local.store import Store, digest
from rpo_local.training.dataset import (
    MIN_TARGET_KEPT,
    Example,
    clean_paraphrase,
    is_rewrite,
    lamp_generic,
    make_example,
)


def neutralizer_examples(rows: Sequence[dict], template: str) -> list[Example]:
    """LaMP pairs reversed: the prompt holds the user's text, the completion LaMP's neutral one.
    Pairs that are not rewrites of each other (see `is_rewrite`) would teach it to invent."""
    out = []
    for row in rows:
        user_text, neutral = row["output"].strip(), lamp_generic(row["input"])
        if not is_rewrite(neutral, user_text):
            continue
        prompt = prompts.render_chat(template, prompts.neutral_paraphrase_messages(user_text))
        out.append(Example(str(row["id"]), user_text, neutral, [], prompt, neutral + prompts.end_of_turn(template)))
    return out


def paraphrase_batch(
    model: Any, tok: Any, template: str, texts: Sequence[str], *, batch_size: int = 256,
    max_new_tokens: int = 64, progress: bool = True,
) -> list[str]:
    """Greedy neutral paraphrases of `texts` by `model` (a neutralizer), batched in torch."""
    from rpo_local.training.generate import generate

    batch = [prompts.render_chat(template, prompts.neutral_paraphrase_messages(t)) for t in texts]
    out = generate(model, tok, batch, prompts.end_of_turn(template), max_new_tokens=max_new_tokens, batch_size=batch_size,
                   progress=progress, desc="paraphrase")
    return [clean_paraphrase(o[0], t) for o, t in zip(out, texts, strict=True)]


def profile_texts(rows: Sequence[dict], per_user: int) -> list[str]:
    """The first `per_user` non-empty history items of each row, in order."""
    return [t for row in rows for t in _items(row)[:per_user]]


def _items(row: dict) -> list[str]:
    return [p["text"].strip() for p in row["profile"] if p.get("text", "").strip()]


def augmented_examples(
    rows: Sequence[dict], paraphrases: dict[str, str], store: Store, template: str, *,
    per_user: int, k: int = 4, profile_prefix: str = "lamp-", min_kept: float = MIN_TARGET_KEPT,
    fmt: str = prompts.DEFAULT_FORMAT,
) -> list[Example]:
    """One example per history item y with a paraphrase g (keyed by `digest(y)`): the context is
    retrieved for g from the user's other items. Paraphrases that copy y, or keep too little of
    it (the neutralizer invented), are left out."""
    examples = []
    for row in rows:
        name = f"{profile_prefix}{row['id']}"
        items = _items(row)
        store.add_items(name, [{"text": t, "kind": "tweet"} for t in items])
        for target in items[:per_user]:
            generic = paraphrases.get(digest(target))
            if not generic or _norm(generic) == _norm(target) or not is_rewrite(generic, target, min_kept):
                continue
            key = digest(target)
            hits = retrieve(store, name, generic, k + 1)
            context = [h["text"] for h in hits if digest(h["text"]) != key][:k]
            examples.append(make_example(template, name, generic, target, context, fmt))
    return examples


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def write_paraphrases(path: Path, texts: Sequence[str], paraphrases: Sequence[str]) -> Path:
    lines = (json.dumps({"digest": digest(t), "text": t, "paraphrase": p}, ensure_ascii=False)
             for t, p in zip(texts, paraphrases, strict=True))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def read_paraphrases(path: Path) -> dict[str, str]:
    rows = (json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip())
    return {r["digest"]: r["paraphrase"] for r in rows}

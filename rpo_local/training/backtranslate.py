"""Back-translation: SFT examples from every item of a user's history, not only LaMP's one pair.

A history item y has no generic version. The untrained base model writes poor ones (it copies or
answers instead of paraphrasing), so a *neutralizer* LoRA is first fine-tuned the other way
round, on LaMP pairs (the user's text -> LaMP's neutral text), with the product's own neutral
paraphrase prompt. Its paraphrases of history items then read like the generic texts the
reflection model meets at inference, and each becomes a (g, context, y) example. Generation is
batched in torch (a GPU paraphrases ~16k tweets in about a minute). On a CPU, training the
neutralizer of a 1.5B model takes hours, and an instruct model of that size paraphrases well
zero-shot: `paraphrase_with_engine` asks the bare base model in llama.cpp instead, one text at a
time. torch is imported only in the neutralizer's path.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from rpo_local.engine import Engine


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


def paraphrase_with_engine(
    engine: Engine, texts: Sequence[str], cache: Path, *, progress: bool = True,
) -> dict[str, str]:
    """Paraphrases of `texts` by digest, by `engine`'s model with the product's neutral-paraphrase
    prompt (`dataset.paraphrase`). The cache is rewritten after each new one, so an interrupted
    run resumes where it stopped."""
    from tqdm import tqdm

    from rpo_local.training.dataset import paraphrase

    done = read_pairs(cache) if cache.is_file() else {}
    missing = list({digest(t): t for t in texts if digest(t) not in done}.values())
    for text in tqdm(missing, desc="paraphrase", file=sys.stderr, disable=not progress):
        done[digest(text)] = (text, paraphrase(engine, text))
        write_paraphrases(cache, [t for t, _ in done.values()], [p for _, p in done.values()])
    return {key: p for key, (_, p) in done.items()}


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
    retrieved for g from the user's other items. Paraphrases that copy y, or of whose content y
    keeps too little (the paraphraser invented), are left out."""
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
    return {key: p for key, (_, p) in read_pairs(path).items()}


def read_pairs(path: Path) -> dict[str, tuple[str, str]]:
    """The cache by digest: (text, paraphrase)."""
    rows = (json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip())
    return {r["digest"]: (r["text"], r["paraphrase"]) for r in rows}

"""SFT examples: structured rewriting trajectories built from a user's own writing.

For a target text y the user wrote, the generic version g is LaMP's neutral input where one
exists, else the base model's own neutral paraphrase of y. The context is the profile's other
items retrieved for g by the product's retrieval code (y is never among them). The analysis
and plan are derived from measurable features (length, casing, punctuation, emoji and
emoticons, slang, the user's frequent words), so no teacher model is needed and the target is
exactly the format `prompts.parse_trajectory` reads. Prompts come from `rpo_local.prompts`:
training and inference share one definition.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rpo_local import prompts
from rpo_local.errors import InputError
from rpo_local.fsutil import atomic_write_text
from rpo_local.retrieve import retrieve
from rpo_local.store import digest
from rpo_local.text import content_kept, content_words, word_set, words

if TYPE_CHECKING:
    from rpo_local.engine import Engine
    from rpo_local.store import Store

EVAL_USERS = 100  # LaMP users 0-99 are `rpo eval`'s: neither their outputs nor profiles are trained on
LAMP_INPUT_PREFIX = re.compile(r"^\s*Paraphrase the following tweet without any explanation before or after it:\s*")
# Pairs where the user's text keeps less than 40% of the generic text's content words are not
# rewrites of it (the user wrote something else); training on them taught the small model to
# drop the reply and write any post. 0.4 keeps 59% of LaMP-7's training users. (The runtime's
# gate, `min_content_kept`, is stricter: it is set per adapter, see train/calibrate_gate.py.)
MIN_TARGET_KEPT = 0.4
# Caps keep the analysis inside the runtime's trajectory budget (config.trajectory_tokens).
SECTION_MAX_CHARS = 110

EMOJI = re.compile("[\U0001F300-\U0001FAFF\u2600-\u27BF\u2B50\u2764]")
EMOTICON = re.compile(r"(?:(?<!\w)[:;=8xX][-'^]?[)(\]\[DPpOo/\\|*3]+(?!\w)|<3+|\^_?\^|\bxD+\b)")
SLANG = frozenset(
    """lol lmao lmfao rofl omg omfg u ur r ya yeah yea yep nope im dont cant wont didnt isnt
    gonna wanna gotta kinda sorta dunno thx thanx pls plz btw idk tbh imo imho ugh aww awww
    hehe haha hahaha xo xoxo k kk ok okay nite tonite luv cuz coz bc b4 wat wut sooo soo
    2day 2morrow tmrw tomoro bday ppl msg gf bf bestie yay woo woohoo meh hmm ah oh""".split()
)
_TOKEN = re.compile(r"\S+")


# -- measurable features ----------------------------------------------------------------------

@dataclass
class Features:
    words: float = 0.0  # mean words per text
    lower: float = 0.0  # share of texts with no capital letter
    caps_words: float = 0.0  # share of texts with an ALL-CAPS word
    end_period: float = 0.0  # share ending in "."
    repeat_punct: float = 0.0  # "!!", "??", "?!"
    ellipsis: float = 0.0
    emoji: float = 0.0  # share of texts with an emoji or an emoticon
    mention: float = 0.0  # @someone
    slang: list[str] = field(default_factory=list)  # most used slang/abbreviations
    frequent: list[str] = field(default_factory=list)  # the user's most used content words


def _has_caps_word(text: str) -> bool:
    return any(len(w) >= 2 and w.isupper() and w.isalpha() for w in words(text))


def _slang_of(text: str) -> list[str]:
    lowered = [w.lower() for w in words(text)]
    return [w for w in lowered if w in SLANG or re.fullmatch(r"(?:ha){2,}h?|(?:he){2,}|o{2,}h+|a{2,}h+", w)]


def _marks(text: str) -> list[str]:
    return EMOJI.findall(text) + EMOTICON.findall(text)


def features(texts: Sequence[str]) -> Features:
    """Aggregate style features of `texts` (shares are in [0, 1])."""
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        return Features()
    n = len(texts)
    slang = Counter(w for t in texts for w in set(_slang_of(t)))
    frequent = Counter(w for t in texts for w in set(content_words(t)) if w not in SLANG and not w.isdigit())
    return Features(
        words=sum(len(_TOKEN.findall(t)) for t in texts) / n,
        lower=sum(not any(c.isupper() for c in t) for t in texts) / n,
        caps_words=sum(_has_caps_word(t) for t in texts) / n,
        end_period=sum(t.endswith(".") and not t.endswith("..") for t in texts) / n,
        repeat_punct=sum(bool(re.search(r"[!?]{2,}", t)) for t in texts) / n,
        ellipsis=sum(".." in t or "…" in t for t in texts) / n,
        emoji=sum(bool(_marks(t)) for t in texts) / n,
        mention=sum(bool(re.search(r"(?<!\w)@\w", t)) for t in texts) / n,
        slang=[w for w, c in slang.most_common(3)],
        frequent=[w for w, c in frequent.most_common(3) if c >= 2],
    )


def _fit(parts: Iterable[str], limit: int = SECTION_MAX_CHARS) -> str:
    """Join `parts` with '; ' while they fit in `limit` characters."""
    out = ""
    for part in parts:
        candidate = f"{out}; {part}" if out else part
        if len(candidate) > limit:
            break
        out = candidate
    return out


def describe_style(items: Sequence[str]) -> str:
    """<style>: what the retrieved items show about the user's writing."""
    if not items:
        return "no history yet"
    f = features(items)
    parts = [f"short, ~{round(f.words)} words" if f.words < 20 else f"long, ~{round(f.words)} words"]
    if f.lower >= 0.5:
        parts.append("mostly lowercase")
    elif f.caps_words >= 0.34:
        parts.append("ALL-CAPS words")
    if f.slang:
        parts.append("slang: " + ", ".join(f.slang))
    if f.emoji >= 0.25:
        parts.append("emoticons/emoji")
    if f.repeat_punct >= 0.25:
        parts.append("!! or ??")
    if f.ellipsis >= 0.25:
        parts.append("uses ...")
    if f.end_period < 0.3:
        parts.append("rarely ends with a period")
    if f.mention >= 0.5:
        parts.append("@mentions")
    if f.frequent:
        parts.append("often: " + ", ".join(f.frequent))
    return _fit(parts)


def describe_diff(generic: str, target: str) -> str:
    """<diff>: how the generic text differs from what the user wrote."""
    g, y = features([generic]), features([target])
    parts = []
    if g.words > y.words * 1.3:
        parts.append(f"generic is longer ({round(g.words)} vs ~{round(y.words)} words)")
    elif g.words * 1.3 < y.words:
        parts.append(f"generic is shorter ({round(g.words)} vs ~{round(y.words)} words)")
    if y.lower and not g.lower:
        parts.append("generic is capitalised")
    if g.slang != y.slang and y.slang:
        parts.append("generic has no slang")
    if y.emoji and not g.emoji:
        parts.append("generic has no emoticons")
    if g.end_period and not y.end_period:
        parts.append("generic ends with a period")
    if word_set(generic) != word_set(target):
        parts.append("generic is formal, plain wording")
    return _fit(parts) or "generic already reads like the user"


def plan_edits(generic: str, target: str, items: Sequence[str] = ()) -> str:
    """<edits>: the edits that turn the generic text into the user's wording.

    Words to use are only those the user's retrieved writing shows: a plan naming words seen
    nowhere in the prompt can't be made at inference, and training on it taught the model to
    invent them."""
    g, y = features([generic]), features([target])
    gw, yw = word_set(generic), word_set(target)
    known = set().union(*map(word_set, items)) if items else set()
    parts = []
    if g.words > y.words * 1.3:
        parts.append(f"shorten to ~{round(y.words)} words")
    elif g.words * 1.3 < y.words:
        parts.append(f"expand to ~{round(y.words)} words")
    if y.lower and not g.lower:
        parts.append("lowercase")
    added = [w for w in dict.fromkeys(words(target.lower())) if w not in gw and w in known]
    dropped = [w for w in dict.fromkeys(words(generic.lower())) if w not in yw]
    if added:
        parts.append("use " + ", ".join(added[:3]))
    if dropped:
        parts.append("drop " + ", ".join(dropped[:3]))
    marks = [m for m in dict.fromkeys(_marks(target)) if m not in generic]
    if marks:
        parts.append("add " + " ".join(marks[:2]))
    if re.search(r"[!?]{2,}", target) and not re.search(r"[!?]{2,}", generic):
        parts.append("add !!")
    if g.end_period and not y.end_period:
        parts.append("no final period")
    return _fit(parts) or "keep it as is"


_HANDLE_OR_URL = re.compile(r"(?<!\w)@\w+[:,]?|https?://\S+|www\.\S+")


def attainable(target: str, generic: str, items: Sequence[str] = ()) -> str:
    """`target` without the @handles and links that neither the generic text nor the user's
    retrieved writing contains: no rewrite can know them, so learning them is learning to
    invent them."""
    seen = " ".join([generic, *items]).lower()

    def keep(match: re.Match) -> str:
        return match.group(0) if match.group(0).rstrip(":,").lower() in seen else ""

    return " ".join(_HANDLE_OR_URL.sub(keep, target).split()) or target.strip()


def trajectory(generic: str, target: str, items: Sequence[str], fmt: str = prompts.DEFAULT_FORMAT) -> str:
    """The assistant turn in format `fmt` that teaches rewriting g into y."""
    target = attainable(target, generic, items)
    return prompts.format_trajectory(
        describe_style(items), describe_diff(generic, target), plan_edits(generic, target, items), target, fmt
    )


# -- examples ---------------------------------------------------------------------------------

@dataclass
class Example:
    user: str
    generic: str
    target: str
    context: list[str]
    prompt: str  # the exact text the reflection model continues (ends with the assistant prefix)
    completion: str  # what it should generate after the prompt, end of turn included
    fmt: str = prompts.DEFAULT_FORMAT  # the trajectory format of prompt and completion

    def to_dict(self) -> dict:
        return asdict(self)


def make_example(
    template: str, user: str, generic: str, target: str, context: Sequence[str], fmt: str = prompts.DEFAULT_FORMAT
) -> Example:
    target_digest = digest(target)
    context = [c for c in context if digest(c) != target_digest]
    prompt = prompts.reflection_prompt(template, generic, context, fmt)
    turn = trajectory(generic, target, context, fmt)
    return Example(user, generic.strip(), target.strip(), list(context), prompt,
                   completion(template, turn, fmt), fmt)


def completion(template: str, turn: str, fmt: str) -> str:
    """A training completion: `turn` after the prefix the prompt ends with, then the end of turn."""
    return turn[len(prompts.assistant_prefix(fmt)):] + prompts.end_of_turn(template)


def lamp_generic(lamp_input: str) -> str:
    """The neutral text inside a LaMP-7 input ("Paraphrase the following tweet ...: <text>")."""
    return LAMP_INPUT_PREFIX.sub("", lamp_input).strip()


def read_lamp(path: Path, *, skip: int = 0, limit: int | None = None) -> list[dict]:
    """LaMP rows of `path`, skipping the first `skip` users (the evaluation users)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")  # not splitlines(): tweets hold U+2028
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    rows = []
    for n, line in enumerate(lines[skip:], start=skip + 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row["input"], row["output"], row["profile"]  # the shape checked: KeyError, TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{path}:{n}: not a LaMP row with input/output/profile") from None
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return rows


def is_rewrite(generic: str, target: str, min_kept: float = MIN_TARGET_KEPT) -> bool:
    """Is `target` recognisably a rewrite of `generic` (keeps enough of its content)?"""
    return content_kept(target, generic) >= min_kept


def lamp_examples(
    rows: Sequence[dict], store: Store, template: str, *, k: int = 4, profile_prefix: str = "lamp-",
    min_kept: float = MIN_TARGET_KEPT, fmt: str = prompts.DEFAULT_FORMAT,
) -> list[Example]:
    """One example per LaMP user whose gold output is a rewrite of its input (see `is_rewrite`):
    g = its neutral input, y = its gold output, context retrieved from its profile (loaded into
    `store` as profile `profile_prefix + id`)."""
    examples = []
    for row in rows:
        name = f"{profile_prefix}{row['id']}"
        target = row["output"].strip()
        if not is_rewrite(lamp_generic(row["input"]), target, min_kept):
            continue
        items = [{"text": p["text"], "kind": "tweet"} for p in row["profile"] if p.get("text", "").strip()]
        store.add_items(name, [i for i in items if digest(i["text"]) != digest(target)])
        generic = lamp_generic(row["input"])
        context = [it["text"] for it in retrieve(store, name, generic, k + 1)
                   if digest(it["text"]) != digest(target)][:k]
        examples.append(make_example(template, str(row["id"]), generic, target, context, fmt))
    return examples


def paraphrase(engine: Engine, text: str, *, max_tokens: int | None = None) -> str:
    """The base model's neutral paraphrase of `text` (the generic version of a user's text)."""
    if max_tokens is None:  # a paraphrase runs about as long as its text; more is the model answering
        max_tokens = 2 * engine.count_tokens(text) + 8
    prompt = prompts.render_chat(engine.chat_template(), prompts.neutral_paraphrase_messages(text))
    out = "".join(engine.stream(prompt, max_tokens=max_tokens, stop=[], temperature=0.0))
    return clean_paraphrase(out, text)


def clean_paraphrase(out: str, source: str) -> str:
    """A model's paraphrase without surrounding quotes; the source itself if it wrote nothing."""
    return out.strip().strip('"').strip() or source.strip()


def profile_targets(store: Store, profile: str, *, limit: int = 2000) -> list[dict]:
    """The profile's own texts, oldest first: history items, kept/edited rewrites included. A
    text of several pieces (an edited chat reply, a long note) gives one target per piece, as
    the reflection model rewrites them (`rpo_local.segment`)."""
    from rpo_local import segment

    items = sorted(store.list_items(profile, limit=limit), key=lambda it: (it["created_at"], it["id"]))
    out = []
    for item in items:
        pieces = segment.prose(item["text"])
        out += [{**item, "text": p} for p in pieces] if len(pieces) > 1 else [item]
    return out


def profile_examples(
    store: Store,
    profile: str,
    engine: Engine,
    targets: Sequence[dict],
    *,
    k: int = 4,
    cache: dict[str, str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    fmt: str = prompts.DEFAULT_FORMAT,
) -> list[Example]:
    """Examples for `targets` (items of `profile`): g is the base model's paraphrase (cached by
    digest in `cache`), the context is retrieved from the profile without the target itself."""
    cache = cache if cache is not None else {}
    template = engine.chat_template()
    examples = []
    for n, item in enumerate(targets):
        target = item["text"].strip()
        key = digest(target)
        if key not in cache:
            cache[key] = paraphrase(engine, target)
        generic = cache[key]
        hits = retrieve(store, profile, generic, k + 1)
        context = [h["text"] for h in hits if h["id"] != item["id"] and digest(h["text"]) != key][:k]
        examples.append(make_example(template, profile, generic, target, context, fmt))
        if on_progress:
            on_progress(n + 1, len(targets))
    return examples


def write_jsonl(path: Path, examples: Iterable[Example]) -> Path:
    atomic_write_text(path, "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in examples))
    return path


def read_jsonl(path: Path) -> list[Example]:
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), start=1):
        if line.strip():
            try:
                out.append(Example(**json.loads(line)))
            except (json.JSONDecodeError, TypeError):
                raise InputError(f"{path}:{n}: not a training example") from None
    return out


def gguf_chat_template(model_path: Path) -> str:
    """The chat template stored in a GGUF file (read without loading the model)."""
    from gguf import GGUFReader

    field_ = GGUFReader(str(model_path)).get_field("tokenizer.chat_template")
    if field_ is None:
        raise InputError(f"{model_path.name} has no chat template in its metadata")
    return bytes(field_.parts[field_.data[0]]).decode("utf-8")

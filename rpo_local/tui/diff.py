"""Word-level diff between the generic and the personalized reply.

Deletions read `[-old-]` and insertions `{+new+}` (as `git diff --word-diff`), so the diff
stays readable without colour (NO_COLOR); colour and strike-through come on top.
"""

from __future__ import annotations

import difflib
import re

from rich.text import Text

_TOKEN = re.compile(r"\s+|[^\s]+")

Op = tuple[str, str]  # ("equal" | "delete" | "insert", text)


def word_diff(old: str, new: str) -> list[Op]:
    """The edit from `old` to `new` word by word; whitespace runs are kept as tokens."""
    a, b = _TOKEN.findall(old), _TOKEN.findall(new)
    ops: list[Op] = []
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            ops.append(("equal", "".join(a[i1:i2])))
            continue
        if tag in ("delete", "replace"):
            ops.append(("delete", "".join(a[i1:i2])))
        if tag in ("insert", "replace"):
            ops.append(("insert", "".join(b[j1:j2])))
    return ops


def diff_text(old: str, new: str) -> Text:
    """A rich Text of the word diff, markers included."""
    out = Text()
    for op, chunk in word_diff(old, new):
        if op == "equal":
            out.append(chunk)
            continue
        lead = chunk[: len(chunk) - len(chunk.lstrip())]
        body = chunk.strip()
        trail = chunk[len(lead) + len(body):]
        out.append(lead)
        if body:
            if op == "delete":
                out.append(f"[-{body}-]", style="strike red")
            else:
                out.append(f"{{+{body}+}}", style="bold green")
        out.append(trail)
    return out


def change_ratio(old: str, new: str) -> float:
    """Share of words changed (0: identical, 1: nothing kept)."""
    a, b = old.split(), new.split()
    if not a and not b:
        return 0.0
    return 1.0 - difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()

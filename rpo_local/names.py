"""Profile names: which are valid, and the one way a name becomes part of a file name.

A name reaches file paths (training runs, logs, adapters), HTTP headers and log lines, so the
rule is narrow: 1-64 letters or digits of any script (with their accents), plus `-`, `_` and
`.`, starting with a letter or digit, never containing `..`. No separators, spaces, control or
format characters, newlines.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from rpo_local.errors import InputError

MAX_LENGTH = 64
PUNCTUATION = "-_."
RULE = f"1-{MAX_LENGTH} letters or digits, '-', '_' or '.', starting with a letter or digit"
_PLAIN = re.compile(r"[a-z0-9][a-z0-9_.-]*")  # used as a file name unchanged


def problem(name: object) -> str | None:
    """Why `name` is not a valid profile name (None: it is valid)."""
    if not isinstance(name, str) or not name:
        return "a profile name must not be empty"
    if len(name) > MAX_LENGTH:
        return f"a profile name has at most {MAX_LENGTH} characters"
    bad = next((c for c in name if not (c.isalnum() or c in PUNCTUATION or _mark(c))), None)
    if bad is not None:
        return f"a profile name may not contain {bad!r}"
    if not name[0].isalnum():
        return "a profile name must start with a letter or digit"
    if ".." in name:
        return "a profile name may not contain '..'"
    return None


def _mark(c: str) -> bool:
    """A combining accent: "Zoé" typed decomposed (e + U+0301) is a name too."""
    return unicodedata.category(c).startswith("M")


def check_profile(name: object) -> str:
    """`name` itself when valid, else InputError saying the rule."""
    reason = problem(name)
    if reason is not None:
        raise InputError(f"invalid profile name {name!r}: {reason} ({RULE})")
    return str(name)  # a str: problem() refuses anything else


def file_stem(name: str) -> str:
    """`name` as one file-name component that cannot leave its directory, whatever `name` is.

    Lower-case ASCII names are used as they are. Anything else is reduced to ASCII and given a
    short hash of the exact name, so `Ann`/`ann` or two non-Latin names never share a file
    (case-insensitive and normalising file systems included).
    """
    if _PLAIN.fullmatch(name) and ".." not in name and len(name) <= MAX_LENGTH:
        return name
    ascii_ = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_).strip("_")[:40] or "profile"
    return f"{slug}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"

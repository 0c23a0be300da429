"""A markdown reply split into the pieces the reflection model rewrites, and the rest, verbatim.

The reflection model is trained on short texts (tweets), so a chat reply is rewritten piece by
piece: sentences (or a few short ones together) of paragraphs, list items and headings. All the
rest is kept byte for byte: code fences, indented code, tables, HTML, list markers and numbering,
heading and block-quote markers, blank lines, whitespace. `"".join(s.text for s in split(t)) == t`
always holds: segments are consecutive slices of the source.

Inside a piece, spans the model must not change are listed (`Segment.protected`): inline code,
links, URLs, e-mail addresses, emphasis, inline HTML and numbers must come back exactly, names in
any casing (a user who writes in lowercase still keeps the name). `refusal` checks a rewrite.

Block structure comes from markdown-it-py (installed with rich): CommonMark's rules for lists,
lazy continuation lines, fences, indented code, setext headings and HTML blocks are many, and its
tokens give each paragraph's source lines, so every piece is located in the exact source (a line
that cannot be located keeps its whole paragraph verbatim). Its inline tokens carry no source
offsets, so sentences and protected spans inside a paragraph are found with the regexes below.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import pairwise

from rpo_local.text import content_words

# A piece needs a content word outside its protected spans, other than these, to be worth a
# rewrite: "Ok.", "Thanks!" or a bare link have nothing a style rewrite can change, and a small
# model answers such input with an old post of the user's.
ACKNOWLEDGEMENTS = frozenset(
    "ok okay yes yeah yep no nope sure fine great cool alright thanks thank thx hi hello hey bye please"
    .split()
)
# One sentence per piece: the 135M model given two sentences often rewrites only the first, and
# the content gate then refuses the whole piece (the demo reply: both two-sentence pieces
# refused, every one-sentence piece rewritten; bench/bench_pieces.py's `paragraph` variant joins
# short sentences up to 30 words). Sentences over MAX_WORDS are cut at clause or word boundaries
# so that every piece fits the model's context.
PIECE_WORDS = 0
MAX_WORDS = 60


@dataclass(frozen=True)
class Segment:
    text: str  # the exact source slice
    prose: bool = False  # a piece for the model
    plain: str = ""  # what the model is given: line breaks and their container prefixes as spaces
    protected: tuple[tuple[str, str], ...] = field(default=())  # (kind, text) spans to keep


_NEWLINE = re.compile(r"\r\n|\r|\n")  # markdown-it's own line breaks

# Spans inside a paragraph that a rewrite must keep, leftmost first (an alternation tries its
# branches in order at each position, so a code span wins over the emphasis inside it).
_PROTECTED = re.compile(
    r"(?P<code>(?P<ticks>`+).+?(?P=ticks)(?!`))"
    r"|(?P<link>!?\[[^\[\]\n]*\](?:\([^()\s]*(?:\s+(?:\"[^\"]*\"|'[^']*'))?\)|\[[^\[\]\n]*\])?)"
    r"|(?P<html><(?:[a-zA-Z][\w+.-]*:[^\s<>]*|[\w.+-]+@[\w.-]+|/?[a-zA-Z][\w-]*(?:\s[^<>]*)?/?)>)"
    r"|(?P<url>(?:https?://|www\.)[^\s<>()\[\]`]*[^\s<>()\[\]`.,;:!?'\"*_~])"
    r"|(?P<email>(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+)"
    r"|(?P<emphasis>\*\*(?=\S).+?(?<=\S)\*\*|(?<!\w)__(?=\S).+?(?<=\S)__(?!\w)|~~(?=\S).+?(?<=\S)~~"
    r"|\*(?=[^\s*]).*?(?<=[^\s*])\*|(?<!\w)_(?=[^\s_]).*?(?<=[^\s_])_(?!\w))"
    r"|(?P<number>(?<![\d.,])\d+(?:[.,:/-]\d+)*%?)",
    re.S,
)
# Words with a capital letter; the first word of a sentence only counts when it is not plain
# Titlecase ("GitHub", "API" are names wherever they stand, "The" is not).
_CAPITALISED = re.compile(r"(?<![\w'’])[^\W\d_][\w'’-]*")
_NOT_NAMES = frozenset({"i", "i'm", "i've", "i'll", "i'd", "i’m", "i’ve", "i’ll", "i’d"})
_SENTENCE_END = re.compile(r"[.!?…]+[\"'’”)\]]*(?=\s)")
_ABBREVIATIONS = frozenset(
    "e.g i.e etc vs mr mrs ms dr prof st jr sr inc ltd co no fig approx cf al ca esp".split()
)
_CLAUSE = re.compile(r"[,;:–—]\s")  # where an over-long sentence is cut first
# A line that starts a markdown block (heading, list item, quote, fence, rule, table row).
_BLOCK_START = re.compile(r"\s*(?:#{1,6}(?:\s|$)|[-+*](?:\s|$)|\d{1,9}[.)](?:\s|$)|>|```|~~~|\||={3,}|-{3,})")
_MARKUP = "`*[]"  # characters whose count a rewrite must not change (it would open or close markup)


@lru_cache(maxsize=1)
def _parser():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable(["table", "strikethrough"])


def split(text: str, *, piece_words: int = PIECE_WORDS, max_words: int = MAX_WORDS) -> list[Segment]:
    """`text` as consecutive segments: prose pieces to rewrite and verbatim text between them."""
    out: list[Segment] = []
    pos = 0
    for spans in _prose_regions(text):
        for start, end, plain, protected in _pieces(text, spans, piece_words, max_words):
            if start > pos:
                out.append(Segment(text[pos:start]))
            out.append(Segment(text[start:end], True, plain, protected))
            pos = end
    if pos < len(text):
        out.append(Segment(text[pos:]))
    return _merge_verbatim(out)


def prose(text: str) -> list[str]:
    """The texts of `text`'s pieces, as the model is given them."""
    return [s.plain for s in split(text) if s.prose]


def _merge_verbatim(segments: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for seg in segments:
        if out and not seg.prose and not out[-1].prose:
            out[-1] = Segment(out[-1].text + seg.text)
        else:
            out.append(seg)
    return out


# -- block structure ----------------------------------------------------------------------------

def _lines(text: str) -> list[tuple[int, int]]:
    """(start, end) of each line, line break excluded."""
    spans, start = [], 0
    for m in _NEWLINE.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return spans


def _prose_regions(text: str) -> list[list[tuple[int, int]]]:
    """For each paragraph and heading: the source span of each of its content lines."""
    lines = _lines(text)
    tokens = _parser().parse(text)
    regions = []
    for i, tok in enumerate(tokens):
        if tok.type != "inline" or tok.map is None or tokens[i - 1].type not in ("paragraph_open", "heading_open"):
            continue  # table cells stay verbatim: a rewrite there could break the table
        spans = []
        for j, content in enumerate(tok.content.split("\n")):
            want = content.strip()
            row = tok.map[0] + j
            if not want:
                continue
            start, end = lines[row] if row < len(lines) else (0, 0)
            at = text.rfind(want, start, end)
            if at < 0:  # not found as it is in the source (e.g. a NUL markdown-it replaced)
                spans = []
                break
            spans.append((at, at + len(want)))
        if spans:
            regions.append(spans)
    return regions


# -- pieces inside a paragraph --------------------------------------------------------------------

def _pieces(
    text: str, spans: list[tuple[int, int]], piece_words: int, max_words: int
) -> Iterator[tuple[int, int, str, tuple[tuple[str, str], ...]]]:
    """(start, end, plain, protected) of each piece of one paragraph, source offsets."""
    parts = [text[a:b] for a, b in spans]
    flat = "\n".join(parts)  # the paragraph without its container prefixes
    offsets, at = [], 0
    for part in parts:
        offsets.append(at)
        at += len(part) + 1

    def source(i: int) -> int:  # flat offset of a non-space character -> source offset
        k = max(n for n, off in enumerate(offsets) if off <= i)
        return spans[k][0] + i - offsets[k]

    guarded = [(m.start(), m.end(), m.lastgroup) for m in _PROTECTED.finditer(flat)]
    for start, end in _group(_sentences(flat, guarded), flat, piece_words, max_words, guarded):
        inner = [(a, b, kind) for a, b, kind in guarded if a >= start and b <= end]
        plain = _one_line(flat[start:end])
        rest = _without(flat, start, end, inner)
        protected = tuple((kind, _one_line(flat[a:b])) for a, b, kind in inner) + tuple(("name", n) for n in _names(rest))
        if not set(content_words(rest)) - ACKNOWLEDGEMENTS:
            continue  # nothing a rewrite could change: stays verbatim
        yield source(start), source(end - 1) + 1, plain, protected


def _one_line(text: str) -> str:
    """A paragraph's line breaks (and the indentation around them) as single spaces."""
    return re.sub(r"[ \t]*\n[ \t]*", " ", text)


def _inside(i: int, guarded: list[tuple[int, int, str]]) -> bool:
    return any(a < i < b for a, b, _ in guarded)


def _sentences(flat: str, guarded: list[tuple[int, int, str]]) -> list[tuple[int, int]]:
    """(start, end) of each sentence of `flat`, surrounding whitespace excluded."""
    cuts = [0]
    for m in _SENTENCE_END.finditer(flat):
        if _inside(m.start(), guarded) or _abbreviation(flat, m.start()):
            continue
        cuts.append(m.end())
    cuts.append(len(flat))
    out = []
    for a, b in pairwise(cuts):
        chunk = flat[a:b]
        lead = len(chunk) - len(chunk.lstrip())
        if chunk.strip():
            out.append((a + lead, a + len(chunk.rstrip())))
    return out


def _abbreviation(flat: str, dot: int) -> bool:
    """Is the '.' at `dot` the end of an abbreviation or an initial ("e.g.", "J.")?"""
    if flat[dot] != ".":
        return False
    word = re.search(r"[\w.]*$", flat[:dot]).group(0).lower()
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def _group(
    sentences: list[tuple[int, int]], flat: str, piece_words: int, max_words: int,
    guarded: list[tuple[int, int, str]],
) -> list[tuple[int, int]]:
    """Short neighbouring sentences joined up to `piece_words`; long ones cut to `max_words`."""
    out: list[tuple[int, int]] = []
    for start, end in (p for s in sentences for p in _cut(flat, *s, max_words, guarded)):
        if out and _words(flat, out[-1][0], end) <= piece_words:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def _words(flat: str, start: int, end: int) -> int:
    return len(flat[start:end].split())


def _cut(flat: str, start: int, end: int, max_words: int, guarded: list[tuple[int, int, str]]) -> list[tuple[int, int]]:
    """A sentence over `max_words` cut at a clause boundary near its middle, else between words."""
    if _words(flat, start, end) <= max_words:
        return [(start, end)]
    middle = (start + end) // 2
    cuts = [m.end() for m in _CLAUSE.finditer(flat, start, end) if not _inside(m.end() - 1, guarded)]
    cuts = cuts or [start + m.end() for m in re.finditer(r"\s+", flat[start:end]) if not _inside(start + m.start(), guarded)]
    cuts = [c for c in cuts if start < c < end]
    if not cuts:
        return [(start, end)]
    cut = min(cuts, key=lambda c: abs(c - middle))
    left_end = start + len(flat[start:cut].rstrip())
    return _cut(flat, start, left_end, max_words, guarded) + _cut(flat, cut, end, max_words, guarded)


def _without(flat: str, start: int, end: int, inner: list[tuple[int, int, str]]) -> str:
    """The piece's text with its protected spans blanked out."""
    chars = list(flat[start:end])
    for a, b, _ in inner:
        chars[a - start : b - start] = " " * (b - a)
    return "".join(chars)


def _names(text: str) -> list[str]:
    """Capitalised words of a piece (protected spans already blanked), first word excepted when
    it is plain Titlecase, each once."""
    names: dict[str, None] = {}
    for n, m in enumerate(_CAPITALISED.finditer(text)):
        word = re.sub(r"['’]s$", "", m.group(0)).rstrip("-'’")
        caps = sum(c.isupper() for c in word)
        if not caps or word.lower() in _NOT_NAMES:
            continue
        sentence_start = n == 0 or re.search(r"[.!?:…]\s*$", text[: m.start()]) is not None
        if sentence_start and caps == 1 and word[0].isupper():
            continue
        names.setdefault(word, None)
    return list(names)


# -- checking a rewrite ---------------------------------------------------------------------------

def refusal(piece: Segment, rewrite: str) -> str | None:
    """Why `rewrite` may not replace `piece` (None: it may)."""
    words = _PROTECTED.sub(lambda m: " " if m.lastgroup != "emphasis" else m.group(0), rewrite)
    for kind, span in piece.protected:
        if kind == "name":
            if not re.search(rf"(?<!\w){re.escape(span)}(?!\w)", words, re.I):
                return f"the rewrite dropped the name {span!r}"
        elif kind == "number":
            if not re.search(rf"(?<![\d.,]){re.escape(span)}(?![\d])", rewrite):
                return f"the rewrite dropped or changed the number {span!r}"
        elif rewrite.count(span) < piece.plain.count(span):
            return f"the rewrite dropped or changed {span!r}"
    for ch in _MARKUP:
        if rewrite.count(ch) != piece.plain.count(ch):
            return f"the rewrite changed the markdown markup ({ch!r})"
    if _BLOCK_START.match(rewrite) and not _BLOCK_START.match(piece.plain):
        return "the rewrite would start a new markdown block"
    return None

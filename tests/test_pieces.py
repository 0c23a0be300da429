"""Whole replies rewritten piece by piece (issue 16) and nothing lost (issue 15, items 2-3):
the segmenter, the Reflector with the fake engine, and `rpo rewrite`."""

from __future__ import annotations

import json
import random

import pytest
from fakes import FakeEngine, generic_of, lowercasing_responder
from markdown_it import MarkdownIt

from rpo_local import segment
from rpo_local.config import Config
from rpo_local.reflect import Reflector

REPLY = """Thanks for asking! Here is how to set it up. It takes about 5 minutes.

1. Install Python 3.11 from https://www.python.org/downloads/ first.
2. Create a virtual environment with `python -m venv .venv` and activate it.
3. Run the tests.

```sh
pip install -e .
pytest -q
```

If anything fails, write to Alex at alex@example.com and include the error message.
"""


def suffixing(suffix: str = " lol"):
    """A reflection model that keeps the piece and adds `suffix` (every check passes)."""

    def respond(prompt: str) -> str:
        if prompt.endswith("<answer>"):
            return generic_of(prompt) + suffix + "</answer>"
        return "casual</style>\n<diff>formal</diff>\n<edits>add lol</edits>\n<answer>"

    return respond


def failing(prompt: str) -> str:
    return "no idea</style><diff>x</diff><edits>x</edits>"  # the turn ends without an <answer>


@pytest.fixture
def ann(store):
    store.add_items("ann", [{"text": "ok u got ur email"}, {"text": "pizza w/ the crew tonight"}])
    return store


def rewrite(store, responder, text, **kw):
    engine = FakeEngine(responder)
    chunks: list[str] = []
    result = Reflector(store, engine, Config()).rewrite(text, "ann", on_text=chunks.append, **kw)
    assert "".join(chunks) == result.rewrite  # what is streamed is exactly the result
    return result, engine, chunks


def rebuilt(text: str, pieces) -> str:
    """`text` with each piece's output put in its place: what the rewrite must be."""
    out, pos = [], 0
    for p in pieces:
        assert text[p.start:p.end] == p.input and p.start >= pos
        out += [text[pos:p.start], p.output]
        pos = p.end
    return "".join(out) + text[pos:]


# -- the segmenter ------------------------------------------------------------------------------

def test_pieces_and_verbatim_parts_of_a_reply():
    segs = segment.split(REPLY)
    assert "".join(s.text for s in segs) == REPLY
    pieces = [s.plain for s in segs if s.prose]
    assert pieces == [
        "Thanks for asking!", "Here is how to set it up.", "It takes about 5 minutes.",
        "Install Python 3.11 from https://www.python.org/downloads/ first.",
        "Create a virtual environment with `python -m venv .venv` and activate it.",
        "Run the tests.",
        "If anything fails, write to Alex at alex@example.com and include the error message.",
    ]
    verbatim = "".join(s.text for s in segs if not s.prose)
    assert "```sh\npip install -e .\npytest -q\n```" in verbatim and "\n2. " in verbatim
    protected = {text: kind for s in segs for kind, text in s.protected}
    assert protected == {
        "5": "number", "3.11": "number", "https://www.python.org/downloads/": "url", "Python": "name",
        "`python -m venv .venv`": "code", "Alex": "name", "alex@example.com": "email",
    }


def test_short_sentences_go_together_where_asked():
    pieces = segment.prose("Thanks for asking! Here is how to set it up. " + "Word " * 40 + "end.")
    assert len(pieces) == 3
    grouped = segment.split("Thanks for asking! Here is how to set it up. " + "Word " * 40 + "end.", piece_words=30)
    assert [s.plain for s in grouped if s.prose][0] == "Thanks for asking! Here is how to set it up."


def test_sentences_split_but_not_at_abbreviations_and_long_ones_are_cut():
    text = "We met Dr. Smith, e.g. at noon. " + " ".join(["This sentence goes on and on"] * 12) + "."
    pieces = segment.prose(text)
    assert pieces[0].startswith("We met Dr. Smith, e.g. at noon.")
    assert all(len(p.split()) <= segment.MAX_WORDS for p in pieces) and len(pieces) > 2
    assert " ".join(pieces).split() == text.split()


def test_wrapped_lines_quotes_and_headings_are_pieces_without_their_markers():
    text = "## Setting up the database\n\n> The server keeps its data\n> in one file per user.\n"
    segs = segment.split(text)
    assert [s.plain for s in segs if s.prose] == [
        "Setting up the database", "The server keeps its data in one file per user."]
    assert [s.text for s in segs if not s.prose] == ["## ", "\n\n> ", "\n"]


@pytest.mark.parametrize(
    "text",
    ['"\n', "Ok.", "Thanks!\n", "`code` https://x.org", "| a | b |\n|---|---|\n| c d e | f |\n", "\x01\x02\n", "12:30 -- 4/5"],
)
def test_text_with_nothing_to_rewrite_has_no_pieces(text):
    segs = segment.split(text)
    assert not any(s.prose for s in segs) and "".join(s.text for s in segs) == text


@pytest.mark.parametrize(
    ("rewrite", "reason"),
    [
        ("install python 3.11 from https://www.python.org/downloads/ first lol", None),
        ("install python 3.12 from https://www.python.org/downloads/ first", "number '3.11'"),
        ("install python 3.11 from the python site first", "'https://www.python.org/downloads/'"),
        ("install it 3.11 from https://www.python.org/downloads/ first", "name 'Python'"),
        ("- install Python 3.11 from https://www.python.org/downloads/", "new markdown block"),
        ("install **Python** 3.11 from https://www.python.org/downloads/", "markup"),
    ],
)
def test_a_rewrite_must_keep_every_protected_span(rewrite, reason):
    piece = next(s for s in segment.split(REPLY) if s.prose and "3.11" in s.plain)
    got = segment.refusal(piece, rewrite)
    assert got is None if reason is None else reason in got


# -- nothing lost: generated markdown replies ---------------------------------------------------

WORDS = "the server keeps data in one file per user and reads it when asked to run again later".split()


def _sentence(rng: random.Random) -> str:
    words = rng.sample(WORDS, rng.randint(3, 9))
    extras = ["`rpo serve`", "https://example.org/a_b?x=1", "[the docs](https://docs.example.org)",
              "**bold words**", "*emphasis*", "42", "2026-12-02", "Alice", "bob@example.com", "<br>"]
    if rng.random() < 0.5:
        words.insert(rng.randrange(len(words) + 1), rng.choice(extras))
    return " ".join(words).capitalize() + rng.choice([".", "!", "?", ".", ":"])


def _paragraph(rng: random.Random, indent: str = "") -> str:
    sentences = [_sentence(rng) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.3:  # wrapped lines
        return ("\n" + indent).join(sentences)
    return " ".join(sentences)


def _list(rng: random.Random, depth: int = 0) -> str:
    ordered = rng.random() < 0.5
    marker = rng.choice(["-", "*", "+"])
    pad = "   " * depth if ordered else "  " * depth
    lines = []
    for i in range(rng.randint(1, 5)):
        lead = f"{i + 1}{rng.choice('.)')} " if ordered else f"{marker} "
        lines.append(pad + lead + _paragraph(rng, pad + " " * len(lead)))
        if depth < 2 and rng.random() < 0.25:
            lines.append(_list(rng, depth + 1).rstrip("\n"))
    return "\n".join(lines)


def _block(rng: random.Random) -> str:
    kind = rng.choice(["p", "p", "list", "heading", "fence", "indented", "table", "quote", "setext", "html"])
    if kind == "p":
        return _paragraph(rng)
    if kind == "list":
        return _list(rng)
    if kind == "heading":
        return "#" * rng.randint(1, 4) + " " + _sentence(rng).rstrip(".!?:") + rng.choice(["", " ##"])
    if kind == "fence":
        fence = rng.choice(["```", "~~~"])
        return f"{fence}{rng.choice(['', 'python', 'sh'])}\nx = 1  # Keep this code.\n\n    print(x)\n{fence}"
    if kind == "indented":
        return "    Indented code stays as it is.\n      even deeper"
    if kind == "table":
        return "| Name | What it does |\n|---|:--:|\n| rpo serve | Runs the daemon on a port. |\n| rpo chat | Opens the chat. |"
    if kind == "quote":
        return "> " + _paragraph(rng, "> ")
    if kind == "setext":
        return _sentence(rng) + "\n" + rng.choice(["===", "---"])
    return "<details>\n<summary>More</summary>\nSome hidden text here.\n</details>"


def generated_replies(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        blocks = [_block(rng) for _ in range(rng.randint(1, 6))]
        text = "".join(b + "\n" * rng.randint(1, 3) for b in blocks)
        text = rng.choice(["", " ", "\n"]) + text + rng.choice(["", "\n", "  \n\n"])
        if rng.random() < 0.2:
            text = text.replace("\n", "\r\n")
        if rng.random() < 0.2:
            text = text.rstrip("\n")
        out.append(text)
    return out


def structure(text: str) -> list[tuple]:
    """The block structure markdown-it sees, code and tables with their text."""
    md = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    tokens = md.parse(text)
    out = []
    for i, t in enumerate(tokens):
        in_cell = i and tokens[i - 1].type in ("th_open", "td_open")
        keep = t.type in ("fence", "code_block", "html_block") or in_cell
        out.append((t.type, t.tag, t.markup, t.info, t.content if keep else ""))
    return out


REPLIES = generated_replies(300)


def test_generated_replies_split_into_slices_of_themselves():
    for text in REPLIES:
        assert "".join(s.text for s in segment.split(text)) == text


def test_with_every_piece_failing_the_output_is_the_input_byte_for_byte(ann):
    for text in REPLIES[:120]:
        result, _, _ = rewrite(ann, failing, text, log=False)
        assert result.rewrite == text, text
        assert result.fallback and all(not p.rewritten and p.reason for p in result.pieces)


def test_rewritten_replies_keep_everything_outside_their_pieces(ann):
    """Every piece rewritten (or refused): the rest of the reply is the input's, the markdown
    structure is the same, and every code span, link, URL and e-mail address is kept."""
    rewritten = 0
    for text in REPLIES:
        result, _, _ = rewrite(ann, suffixing(), text, log=False)
        assert result.rewrite == rebuilt(text, result.pieces), text
        assert structure(result.rewrite) == structure(text), text
        for kind, span in (p for s in segment.split(text) if s.prose for p in s.protected):
            if kind != "name":
                assert span in result.rewrite
        rewritten += sum(p.rewritten for p in result.pieces)
        assert all(p.output == p.input for p in result.pieces if not p.rewritten)
    assert rewritten > 500


def test_a_piece_the_model_fails_on_keeps_its_text_and_the_others_are_rewritten(ann):
    def responder(prompt: str) -> str:
        return failing(prompt) if "Run the tests" in prompt else lowercasing_responder(prompt)

    result, _, chunks = rewrite(ann, responder, REPLY)
    assert [p.rewritten for p in result.pieces] == [True] * 5 + [False, True]
    assert "3. Run the tests.\n" in result.rewrite and "2. create a virtual environment" in result.rewrite
    assert result.pieces[5].reason == "no <answer> section" and not result.fallback
    assert result.fallback_reason == "1/7 pieces kept as they were: no <answer> section"
    assert "```sh\npip install -e .\npytest -q\n```\n\n" in result.rewrite
    assert [t["rewritten"] for t in result.trajectory] == [True] * 5 + [False, True]
    doc = json.loads(json.dumps(result.to_dict()))
    assert [p["reason"] for p in doc["pieces"]][5] == "no <answer> section"
    # Streamed in order, verbatim parts at once: " " and "1. " went out before the next piece's prompt.
    assert chunks[:7] == [result.pieces[0].output, " ", result.pieces[1].output, " ", result.pieces[2].output,
                          "\n\n1. ", result.pieces[3].output]


def test_piece_words_joins_short_sentences_into_one_piece_for_the_reflector(ann):
    text = "The build failed again. Restart the runner now. Check the disk quota."
    engine = FakeEngine(lowercasing_responder)
    result = Reflector(ann, engine, Config(piece_words=40)).rewrite(text, "ann")
    assert len(result.pieces) == 1 and result.rewrite.startswith(text.lower())
    assert len(Reflector(ann, engine, Config()).rewrite(text, "ann").pieces) == 3


def test_the_adapter_in_use_sets_piece_words_and_the_gate_unless_configured(ann, monkeypatch):
    from rpo_local import adapters

    text = "The build failed again. Restart the runner now. Check the disk quota."
    monkeypatch.setitem(adapters.BUILTIN_SETTINGS, "builtin-lamp7-answer", {"min_content_kept": 0.1, "piece_words": 40})
    engine = FakeEngine(lambda prompt: "build failed lol</answer>" if prompt.endswith("<answer>") else "x</style><answer>")
    engine.adapter_path = adapters.asset_path(adapters.BUILTINS["builtin-lamp7-answer"][0])
    result = Reflector(ann, engine, Config()).rewrite(text, "ann")
    assert len(result.pieces) == 1 and result.rewrite.startswith("build failed lol")  # its gate 0.1 lets it through
    result = Reflector(ann, engine, Config(min_content_kept=0.8, piece_words=0)).rewrite(text, "ann")
    assert len(result.pieces) == 3  # configured values win: three pieces, the 0.8 gate refuses the two it guts
    assert [p.rewritten for p in result.pieces] == [True, False, False]


def test_pieces_stream_as_they_are_done(ann):
    seen: list[tuple[int, str]] = []
    engine = FakeEngine(lowercasing_responder)
    Reflector(ann, engine, Config()).rewrite(REPLY, "ann", on_text=lambda t: seen.append((len(engine.prompts), t)))
    # Two prompts (analysis, answer) per piece: each piece is out before the next one starts.
    piece_times = [calls for calls, text in seen if text.strip() and not text.startswith(("\n", "`"))]
    assert piece_times == [2, 4, 6, 8, 10, 12, 14]


def test_a_rewrite_that_alters_a_url_is_refused_for_that_piece_only(ann):
    def responder(prompt: str) -> str:
        if prompt.endswith("<answer>"):
            return generic_of(prompt).replace("/downloads/", "/download/").lower() + "</answer>"
        return lowercasing_responder(prompt)

    result, _, _ = rewrite(ann, responder, REPLY)
    url_piece = result.pieces[3]
    assert not url_piece.rewritten and "https://www.python.org/downloads/" in url_piece.reason
    assert "https://www.python.org/downloads/" in result.rewrite
    assert sum(p.rewritten for p in result.pieces) == 6


def test_an_answer_copied_from_the_history_is_refused(ann):
    def responder(prompt: str) -> str:
        return "pizza w/ the crew tonight</answer>" if prompt.endswith("<answer>") else "x</style><answer>"

    loose = Config(min_content_kept=0.0)  # the content gate would catch it too: test the copy check
    result = Reflector(ann, FakeEngine(responder), loose).rewrite("Dinner with the team tonight.", "ann")
    assert result.rewrite == "Dinner with the team tonight." and result.fallback
    assert result.fallback_reason == "the answer is a history item copied verbatim"


@pytest.mark.parametrize("text", ['"\n', "Ok.", "Ok.\n", "  Thanks!  \n\n"])
def test_input_with_no_content_words_comes_back_unchanged_without_the_model(ann, text):
    result, engine, _ = rewrite(ann, lowercasing_responder, text)
    assert result.rewrite == text and result.fallback and engine.prompts == []
    assert result.fallback_reason.startswith("nothing to rewrite") and result.pieces == []


def test_a_long_list_comes_back_byte_for_byte_when_nothing_is_rewritten(ann):
    text = "  Here is the list you asked for:\n\n" + "".join(
        f"{i}. Item number {i} is about the {WORDS[i % len(WORDS)]} step.\n" for i in range(1, 41)) + "\n\n\n"
    result, _, _ = rewrite(ann, failing, text, log=False)
    assert result.rewrite == text and len(result.pieces) == 41
    result, _, _ = rewrite(ann, lowercasing_responder, text, log=False)
    assert result.rewrite.count("\n") == text.count("\n") and result.rewrite.startswith("  here is the list")
    assert result.rewrite.endswith("40. item number 40 is about the " + WORDS[40 % len(WORDS)] + " step.\n\n\n\n")


def test_a_long_input_keeps_its_last_sentence(ann):
    sentences = [f"Sentence {i} explains the {WORDS[i % len(WORDS)]} part of the plan in detail." for i in range(1200)]
    text = "\n\n".join(" ".join(sentences[i:i + 8]) for i in range(0, 1200, 8))  # ~60 KB, 150 paragraphs
    assert len(text) > 55_000
    result, _, _ = rewrite(ann, failing, text, log=False)
    assert result.rewrite == text
    result, _, _ = rewrite(ann, lowercasing_responder, text, log=False)
    assert result.rewrite == text.lower() and result.rewrite.endswith(sentences[-1].lower())


# -- the command line -------------------------------------------------------------------------

@pytest.fixture
def cli_ann(cli):
    assert cli("history", "add", "--profile", "ann", "ok u got ur email", "nah im good thx").code == 0
    return cli


@pytest.mark.parametrize("stdin", [b'"\n', b"Ok.\n", b"Thanks!\n\n"])
def test_rpo_rewrite_returns_text_without_content_words_unchanged(cli_ann, use_fake_engine, stdin):
    r = cli_ann("rewrite", "--profile", "ann", stdin=stdin)
    assert r.code == 0 and r.stdout == stdin.decode() and use_fake_engine.prompts == []


def test_rpo_rewrite_prints_pieces_in_place_and_lists_them_in_json(cli_ann, use_fake_engine):
    r = cli_ann("rewrite", "--profile", "ann", stdin=REPLY.encode())
    assert r.code == 0 and r.stdout == REPLY.lower()
    doc = json.loads(cli_ann("rewrite", "--profile", "ann", "--json", stdin=REPLY.encode()).stdout)
    assert [p["rewritten"] for p in doc["pieces"]] == [True] * 7
    assert doc["rewrite"] == REPLY.lower() and doc["pieces"][3]["input"].startswith("Install Python")


def test_pieces_not_started_by_the_deadline_keep_their_text(ann):
    import time

    engine = FakeEngine(lowercasing_responder)
    calls = {"n": 0}

    def slow(prompt: str) -> str:
        calls["n"] += 1
        time.sleep(0.2)
        return lowercasing_responder(prompt)

    engine.responder = slow
    result = Reflector(ann, engine, Config()).rewrite(REPLY, "ann", deadline=time.monotonic() + 0.5)
    done = [p.rewritten for p in result.pieces]
    assert done[0] and not done[-1] and result.pieces[-1].reason.startswith("the time budget ran out")
    assert result.rewrite == rebuilt(REPLY, result.pieces) and calls["n"] < 10


def test_an_edited_long_reply_becomes_training_targets_piece_by_piece(ann):
    from rpo_local.training.dataset import profile_targets

    result = Reflector(ann, FakeEngine(lowercasing_responder), Config()).rewrite(REPLY, "ann")
    ann.add_feedback(result.interaction_id, "edited", REPLY.replace("Thanks for asking!", "thx for asking!!"))
    targets = [t["text"] for t in profile_targets(ann, "ann")]
    assert "thx for asking!!" in targets and "It takes about 5 minutes." in targets
    assert "Run the tests." in targets and not any("```" in t or "pip install" in t for t in targets)


def test_the_trajectory_view_lists_the_pieces(ann):
    from rpo_local.tui.pipeline import Turn
    from rpo_local.tui.widgets import details_text

    def responder(prompt: str) -> str:
        return failing(prompt) if "Run the tests" in prompt else lowercasing_responder(prompt)

    result, _, _ = rewrite(ann, responder, REPLY)
    text = details_text(Turn(1, REPLY, result.rewrite, trajectory=result.trajectory))
    assert "piece 1/7 (rewritten): Thanks for asking!" in text
    assert "piece 6/7 (kept as it was): Run the tests." in text and "problem: no <answer> section" in text


def test_rpo_rewrite_gives_back_a_long_list_byte_for_byte_when_nothing_is_rewritten(cli_ann, use_fake_engine):
    use_fake_engine.responder = failing
    text = "   Indented intro line with some words.\n\n" + "".join(
        f"- point {i}: the {WORDS[i % len(WORDS)]} part\n" for i in range(40)) + "\n\n"
    r = cli_ann("rewrite", "--profile", "ann", "-t", stdin=text.encode())
    assert r.code == 0 and r.stdout == text
    assert "piece 41/41 (kept as it was): point 39: the" in r.stderr and "keeping the generic text" in r.stderr


def test_retrieval_once_per_reply_gives_every_piece_the_same_history(store):
    from rpo_local.retrieve import retrieve

    store.add_items("ann", [{"text": "the build broke again, pinned the dep"}, {"text": "pizza w/ the crew tonight"},
                            {"text": "meeting moved to 3pm, whatever"}, {"text": "my cat knocked the plant over lol"},
                            {"text": "new phone who dis"}, {"text": "ugh mondays"}])
    text = "The build failed overnight.\n\n- The meeting is at three.\n\n```\necho pizza w crew tonight\n```\n\nMy cat is fine."
    engine = FakeEngine(lowercasing_responder)
    by_piece = Reflector(store, engine, Config(k=1, retrieval_scope="piece")).rewrite(text, "ann")
    ids = [p.retrieved_ids for p in by_piece.pieces]
    assert len(ids) == 3 and len({tuple(i) for i in ids}) == 3  # each piece found its own item
    engine.prompts.clear()
    by_reply = Reflector(store, engine, Config(k=3, retrieval_scope="reply")).rewrite(text, "ann")
    ids = [p.retrieved_ids for p in by_reply.pieces]
    assert ids[0] == ids[1] == ids[2]
    # One search, by the words of every piece (not the code block), each item a match, not a filler.
    whole = retrieve(store, "ann", "The build failed overnight. The meeting is at three. My cat is fine.", 3)
    assert ids[0] == [it["id"] for it in whole] and all(it["score"] is not None for it in by_reply.retrieved)
    assert by_reply.rewrite == text.replace("The", "the").replace("My", "my")
    # The pieces' prompts are the same up to the piece itself: llama.cpp reuses that prefix.
    heads = {p[: p.index("Generic reply:")] for p in engine.prompts if p.endswith("<style>")}
    assert len(heads) == 1


def test_past_the_deadline_nothing_is_retrieved_for_the_reply(ann):
    import time

    result = Reflector(ann, FakeEngine(lowercasing_responder), Config(retrieval_scope="reply")).rewrite(
        REPLY, "ann", deadline=time.monotonic() - 1)
    assert not any(p.rewritten for p in result.pieces) and result.retrieved == []
    assert result.rewrite == REPLY

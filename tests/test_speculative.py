"""Speculative greedy decoding: the drafter, the stop-string text layer, and (real model) that
drafting from the generic reply gives exactly what plain greedy decoding gives."""

from __future__ import annotations

import json

import pytest
from fakes import FakeEngine

from rpo_local.config import Config
from rpo_local.reflect import Reflector
from rpo_local.speculative import Drafter, StopText

# -- the drafter ------------------------------------------------------------------------------


def test_drafter_starts_with_the_source_and_follows_the_output():
    d = Drafter([1, 2, 3, 4, 5, 6, 7, 8], max_draft=3)
    assert d.propose([], 10) == [1, 2, 3]
    assert d.propose([1, 2], 10) == [3, 4, 5]
    assert d.propose([9, 9, 5], 10) == [6, 7, 8]  # resynchronised after an edit
    assert d.propose([1, 2, 3, 4, 5, 6, 7, 8], 10) == []  # the source is used up
    assert d.propose([42], 10) == [] and d.propose([], 0) == []
    assert d.propose([1], 2) == [2, 3]


def test_drafter_prefers_the_longest_tail_and_the_current_alignment():
    # Source "a b X a b Y 14": "X a b" is followed by Y; a lone "b" occurs twice, and the
    # proposal continues the alignment of the previous one rather than going back to the first.
    a, b, x, y = 10, 11, 12, 13
    d = Drafter([a, b, x, a, b, y, 14], max_draft=2)
    assert d.propose([a, b], 5) == [x, a]
    assert d.propose([a, b, x, a, b], 5) == [y, 14]
    assert d.propose([99, b], 5) == [y, 14]
    assert Drafter([a, b, x, a, b, y, 14], max_draft=2).propose([99, b], 5) == [x, a]


# -- text layer ---------------------------------------------------------------------------------


def feed_all(stops: list[str], pieces: list[bytes]) -> tuple[list[str], bool]:
    text = StopText(stops)
    out = []
    for p in pieces:
        out.append(text.feed(p))
        if text.stopped:
            return out, True
    out.append(text.flush())
    return out, False


def test_stop_string_split_over_tokens_is_cut_and_never_printed():
    out, stopped = feed_all(["</answer>"], [b"Hi", b" there", b"</", b"ans", b"wer>", b"more"])
    assert stopped and "".join(out) == "Hi there" and out[2] == out[3] == ""


def test_a_held_back_partial_stop_is_released_when_it_is_not_one():
    out, stopped = feed_all(["</"], [b"a <", b"3 b"])
    assert not stopped and out == ["a ", "<3 b", ""]


def test_multibyte_characters_split_over_tokens_come_out_whole():
    smile = "é😀".encode()
    out, _ = feed_all([], [b"caf", smile[:1], smile[1:3], smile[3:], b"!"])
    assert "".join(out) == "café😀!" and all("\ufffd" not in p for p in out)


def test_the_earliest_stop_wins():
    out, stopped = feed_all(["<b>", "<a>"], [b"x<a>y<b>"])
    assert stopped and out == ["x"]


# -- the reflector passes the generic reply as the draft of its answer -----------------------


def test_the_answer_phase_drafts_from_the_generic_reply(store):
    store.add_items("ann", [{"text": "dog walk in the rain lol"}])
    engine = FakeEngine()
    r = Reflector(store, engine, Config()).rewrite("The Dog needs a walk.", "ann", log=False)
    assert r.rewrite == "the dog needs a walk."
    assert engine.drafts == [None, "The Dog needs a walk."]


# -- the real model: speculative == plain greedy, token for token ----------------------------

ANALYSIS = "short, casual</style>\n<diff>generic is formal</diff>\n<edits>use lowercase; drop the final period</edits>\n<answer>"


def lamp7_texts(path, first: int = 946, n: int = 30) -> list[tuple[str, list[str]]]:
    """Neutral LaMP-7 texts of tuning users (946-1045) with four of their tweets as history."""
    from rpo_local import lamp

    lines = path.read_text(encoding="utf-8").split("\n")[first : first + n]
    rows = [json.loads(line) for line in lines if line.strip()]
    return [(lamp.query_text("LaMP_7", r["input"]), [p["text"] for p in r["profile"][:4]]) for r in rows]


@pytest.mark.model
@pytest.mark.parametrize("with_adapter", [True, False], ids=["adapter", "base"])
def test_speculative_answer_equals_plain_greedy_decoding(real_engine, lamp7, with_adapter):
    """The answer phase of 30 rewrites, drafted from the generic reply, against llama-cpp-python's
    own greedy completion of the same prompt: the same tokens, and drafts were really accepted."""
    from rpo_local import prompts
    from rpo_local.adapters import builtin_adapter_path

    engine = real_engine
    if not engine.batch_invariant:
        pytest.skip("this llama.cpp build computes batches differently from single tokens (LLAMAFILE)")
    engine.set_adapter(builtin_adapter_path() if with_adapter else None)
    template = engine.chat_template()
    before = (engine.decode_stats.drafted, engine.decode_stats.accepted)
    try:
        for generic, items in lamp7_texts(lamp7):
            prompt = prompts.reflection_prompt(template, generic, items) + ANALYSIS
            budget = max(48, 2 * engine.count_tokens(generic) + 32)
            plain = engine.llm.create_completion(prompt, max_tokens=budget, temperature=0.0, stop=prompts.ANSWER_STOPS)
            spec = "".join(engine.stream(prompt, max_tokens=budget, stop=prompts.ANSWER_STOPS, draft=generic))
            assert spec == plain["choices"][0]["text"], generic
    finally:
        engine.set_adapter(None)
    drafted = engine.decode_stats.drafted - before[0]
    accepted = engine.decode_stats.accepted - before[1]
    assert drafted > 0
    if with_adapter:  # the adapter copies the reply it rewrites; the bare model often answers it
        assert accepted > 0.3 * drafted

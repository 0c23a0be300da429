"""Reflector with the fake engine: retrieval into the prompt, streaming, fallback, chunking."""

from __future__ import annotations

import threading

import pytest
from fakes import FakeEngine, generic_of

from rpo_local.config import Config
from rpo_local.errors import ProfileNotFound
from rpo_local.reflect import Reflector, RewriteCancelled


@pytest.fixture
def ann(store):
    store.add_items("ann", [{"text": "dog walk in the rain lol"}, {"text": "pizza w/ the crew"}])
    return store


def test_rewrite_streams_records_and_uses_retrieved_items(ann, fake_engine):
    pieces: list[str] = []
    r = Reflector(ann, fake_engine, Config()).rewrite("The Dog needs a walk.", "ann", on_text=pieces.append)
    assert r.rewrite == "the dog needs a walk." == "".join(pieces)
    assert not r.fallback and r.trajectory["style"] == "writes in lowercase"
    assert "- dog walk in the rain lol" in fake_engine.prompts[0]
    row = ann.get_interaction(r.interaction_id)
    assert row["rewrite"] == r.rewrite and row["retrieved_ids"] == [x["id"] for x in r.retrieved]
    assert row["fallback"] == 0 and row["model"] == "fake-model.gguf"


def test_a_set_cancel_event_stops_generation_between_tokens_and_frees_the_engine(ann, fake_engine):
    cancelled = threading.Event()
    generated: list[str] = []

    def cancel_after_first(text: str) -> None:
        generated.append(text)
        cancelled.set()  # set after the first piece: the second stops at its first token

    reflector = Reflector(ann, fake_engine, Config(), cancelled=cancelled)
    with pytest.raises(RewriteCancelled):
        reflector.rewrite("The Dog needs a walk. The Cat sleeps.", "ann", on_text=cancel_after_first, log=False)
    assert "".join(generated).strip() == "the dog needs a walk."  # the second piece was never finished
    assert len(fake_engine.prompts) == 3  # both phases of the first piece, then one token of the second
    acquired: list[bool] = []

    def take_and_give_back() -> None:
        acquired.append(fake_engine.lock.acquire(timeout=1))
        if acquired[-1]:
            fake_engine.lock.release()

    other = threading.Thread(target=take_and_give_back)
    other.start()
    other.join(2)
    assert acquired == [True], "the engine's lock was released"


def test_no_answer_falls_back_to_generic_and_says_so(ann):
    engine = FakeEngine(lambda p: "I like turtles.")  # ends its turn with no <answer>
    notes, pieces = [], []
    r = Reflector(ann, engine, Config()).rewrite("Keep This Text.", "ann", on_text=pieces.append, on_note=notes.append)
    assert r.fallback and r.rewrite == "Keep This Text." == "".join(pieces)
    assert r.fallback_reason == "no <answer> section" and "keeping the generic text" in notes[0]
    assert ann.get_interaction(r.interaction_id)["fallback"] == 1


def test_analysis_out_of_budget_still_gets_an_answer(ann):
    def responder(prompt: str) -> str:
        return "hi ok done</answer>" if prompt.endswith("<answer>") else "blah " * 500

    r = Reflector(ann, FakeEngine(responder), Config(trajectory_tokens=10)).rewrite("Done here.", "ann")
    assert r.rewrite == "hi ok done" and not r.fallback


def test_truncated_answer_without_streaming_falls_back(ann):
    def responder(prompt: str) -> str:
        return " ".join(f"w{i}" for i in range(1000)) if prompt.endswith("<answer>") else "x</style><answer>"

    r = Reflector(ann, FakeEngine(responder), Config()).rewrite("Short reply.", "ann")
    assert r.fallback and r.rewrite == "Short reply." and "cut off" in r.fallback_reason


def test_looping_analysis_and_answer_are_cut_streamed_and_not_alike(ann):
    """A model stuck in a loop: the analysis stops early, the answer keeps the text before the
    loop, and streaming prints exactly what is kept, the same as without streaming."""

    def responder(prompt: str) -> str:
        if prompt.endswith("<answer>"):
            return "gonna be late, sorry!! " + "@bob; @bob; " * 200
        return "short; " + "@mentions; rarely ends with a period; " * 50

    engine = FakeEngine(responder)
    pieces: list[str] = []
    streamed = Reflector(ann, engine, Config()).rewrite("I will be late.", "ann", on_text=pieces.append)
    assert engine.prompts[1].count("rarely ends with a period") < 4  # analysis cut at the loop
    # What is kept of the loop is at most one LOOP_TAIL (20 characters) of it.
    assert "".join(pieces) == streamed.rewrite and len(streamed.rewrite) < len("gonna be late, sorry!! ") + 25
    assert streamed.rewrite.startswith("gonna be late, sorry!!") and not streamed.fallback
    plain = Reflector(ann, FakeEngine(responder), Config()).rewrite("I will be late.", "ann")
    assert plain.rewrite == streamed.rewrite


def test_unknown_profile_fails_before_generation(store, fake_engine):
    with pytest.raises(ProfileNotFound):
        Reflector(store, fake_engine, Config()).rewrite("x", "ghost")
    assert fake_engine.prompts == []


def test_long_input_is_rewritten_piece_by_piece_and_nothing_lost(ann):
    engine = FakeEngine(lambda p: (generic_of(p).upper() + "</answer>") if p.endswith("<answer>") else "s</style><answer>", n_ctx=512)
    paragraphs = [f"Paragraph {i} " + "word " * 60 for i in range(6)]
    text = "\n\n".join(paragraphs)
    notes: list[str] = []
    r = Reflector(ann, engine, Config()).rewrite(text, "ann", on_note=notes.append)
    assert "pieces" in notes[0] and isinstance(r.trajectory, list) and len(r.trajectory) == len(r.pieces) > 6
    assert r.rewrite == text.upper()  # every word and every line break of the input made it through


def test_no_log_records_nothing(ann, fake_engine):
    r = Reflector(ann, fake_engine, Config()).rewrite("Hello.", "ann", log=False)
    assert r.interaction_id is None and ann.counts()["interactions"] == 0


def test_answer_that_drops_the_content_falls_back_and_prints_nothing_of_it(ann):
    """The model answers with an old post of the user's instead of rewriting the reply."""

    def responder(prompt: str) -> str:
        return "pizza w/ the crew tonight, so good lol</answer>" if prompt.endswith("<answer>") else "x</style><answer>"

    pieces: list[str] = []
    r = Reflector(ann, FakeEngine(responder), Config()).rewrite(
        "The quarterly budget review moved to Thursday afternoon.", "ann", on_text=pieces.append
    )
    assert r.fallback and r.fallback_reason == "answer drops the reply's content"
    assert "".join(pieces) == r.rewrite == "The quarterly budget review moved to Thursday afternoon."


@pytest.mark.parametrize(("minimum", "kept"), [(0.2, True), (0.4, True), (0.6, False)])
def test_how_much_content_a_rewrite_must_keep_is_configured(ann, minimum, kept):
    """The answer keeps 2 of the 5 content words (budget, thursday: 0.4) of the generic reply."""

    def responder(prompt: str) -> str:
        return "budget thing is thursday lol</answer>" if prompt.endswith("<answer>") else "x</style><answer>"

    pieces: list[str] = []
    generic = "The quarterly budget review moved to Thursday."
    r = Reflector(ann, FakeEngine(responder), Config(min_content_kept=minimum)).rewrite(
        generic, "ann", on_text=pieces.append)
    assert r.rewrite == ("budget thing is thursday lol" if kept else generic) == "".join(pieces)
    assert r.fallback is not kept


def test_a_long_repeated_sentence_is_cut_before_it_is_printed(ann):
    sentence = "i'm sooo tired today but still got loads of work b4 the weekend. "

    def responder(prompt: str) -> str:
        return sentence * 6 if prompt.endswith("<answer>") else "x</style><answer>"

    pieces: list[str] = []
    generic = "I am very tired today, but I still have a lot of work to finish before the weekend."
    loose = Config(min_content_kept=0.4)  # the rewrite drops "finish": this tests the loop cut, not the gate
    r = Reflector(ann, FakeEngine(responder), loose).rewrite(generic, "ann", on_text=pieces.append)
    assert "".join(pieces) == r.rewrite
    assert r.rewrite.count("weekend") == 1 and r.rewrite.startswith(sentence.strip()[:40])


@pytest.mark.parametrize("fmt", ["full", "answer"])
def test_the_prompt_tokens_are_counted_in_every_format(ann, fake_engine, fmt):
    r = Reflector(ann, fake_engine, Config(trajectory=fmt)).rewrite("The Dog needs a walk.", "ann", log=False)
    assert not r.fallback
    assert r.prompt_tokens == fake_engine.count_tokens(fake_engine.prompts[0]) > 0

"""The one definition of the reflection prompt, the trajectory format and its parser."""

from __future__ import annotations

import pytest
from fakes import SMOLLM2_TEMPLATE

from rpo_local import prompts


def test_chat_template_uses_the_system_role():
    text = prompts.render_chat(SMOLLM2_TEMPLATE, prompts.reflection_messages("Hello there.", ["yo"]))
    assert text.startswith("<|im_start|>system\n" + prompts.REFLECT_SYSTEMS["full"] + "<|im_end|>")
    assert "SmolLM" not in text  # the template's default system prompt is replaced, not added
    assert text.endswith("<|im_start|>assistant\n")


def test_template_default_system_when_none_given():
    text = prompts.render_chat(SMOLLM2_TEMPLATE, [{"role": "user", "content": "hi"}])
    assert "SmolLM" in text


def test_reflection_prompt_holds_items_and_generic_and_primes_style():
    p = prompts.reflection_prompt(SMOLLM2_TEMPLATE, "The meeting is at noon.", ["lol ok", "see u there"])
    assert "- lol ok\n- see u there" in p and "Generic reply:\nThe meeting is at noon." in p
    assert p.endswith("<|im_start|>assistant\n" + prompts.assistant_prefix())


def test_long_items_are_clipped():
    p = prompts.reflection_user_message("x", ["word " * 500])
    assert len(p) < 400 and "…" in p


def test_format_then_parse_roundtrip():
    raw = prompts.format_trajectory("lowercase, emoticons", "generic is formal", "lowercase; add :)", "see u at noon :)")
    assert raw.startswith(prompts.assistant_prefix())
    traj = prompts.parse_trajectory(raw)
    assert (traj.style, traj.diff, traj.edits, traj.answer) == (
        "lowercase, emoticons", "generic is formal", "lowercase; add :)", "see u at noon :)")
    assert traj.problem is None


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("<style>casual</style><diff>x</diff>", "no <answer> section"),
        ("<style>casual</style><answer>   </answer>", "empty answer"),
        ("<style>casual<answer>...</answer>", "answer has no words"),
        ("", "no <answer> section"),
    ],
)
def test_parser_is_strict_about_the_answer(raw, problem):
    traj = prompts.parse_trajectory(raw)
    assert traj.answer is None and traj.problem == problem


def test_parser_is_tolerant_of_everything_else():
    traj = prompts.parse_trajectory("<style>chatty <diff>missing closers <answer>hey you <3")
    assert traj.answer == "hey you <3" and traj.style == "chatty" and traj.diff == "missing closers"
    # Unclosed answer cut by the token limit is refused.
    assert prompts.parse_trajectory("<style>a<answer>hey you", truncated=True).answer is None
    # A stray section after the answer ends it.
    assert prompts.parse_trajectory("<answer>hi there<style>again").answer == "hi there"


def test_answer_streamer_matches_parser_and_keeps_heart_emoticons():
    chunks = [" hey", " there <", "3 you", "  ", "</an", "swer>", "junk"]
    s = prompts.AnswerStreamer()
    streamed = "".join(s.feed(c) for c in chunks)
    parsed = prompts.parse_trajectory("<answer>" + "".join(chunks)).answer
    streamed += s.finish(parsed)
    assert streamed == parsed == "hey there <3 you"


def test_answer_streamer_lag_holds_back_text_until_finish():
    s = prompts.AnswerStreamer(lag=10)
    out = s.feed("abcdefghijklmnopqrstuvwxyz")
    assert out == "abcdefghijklmnop" and s.emitted == 16
    assert s.finish("abcdefghijklmnopqrs") == "qrs"  # the kept answer may be shorter than generated


def test_loop_cut_keeps_one_copy_and_ignores_copied_repetition():
    text = "short; @mentions; ends with a period; @mentions; ends with a period; @mentions; ends with a period; @mentions;"
    cut = prompts.loop_cut(text)
    assert cut is not None and text[:cut].count("ends with a period") == 1
    assert prompts.loop_cut("a perfectly normal sentence without any repetition at all, really") is None
    table = "| a | b |\n| - | - |\n" + "| x | y |\n" * 6
    assert prompts.loop_cut(table, source=table) is None  # the generic text repeats too


def test_lamp_context_prompt_task7():
    p = prompts.lamp_context_prompt("LaMP_7", "Paraphrase the following tweet without any explanation before or after it: hi", [{"text": "a"}, {"text": "b"}])
    assert p.startswith('"a", and "b" are written by a person.')
    with pytest.raises(ValueError):
        prompts.lamp_context_prompt("LaMP_1", "q", [])


@pytest.mark.parametrize("fmt", prompts.FORMATS)
def test_every_format_round_trips_through_the_parser(fmt):
    raw = prompts.format_trajectory("lowercase", "generic is formal", "lowercase", "see u at noon", fmt)
    assert raw.startswith(prompts.assistant_prefix(fmt))
    traj = prompts.parse_trajectory(raw)
    assert traj.answer == "see u at noon" and traj.problem is None
    assert traj.style == ("" if fmt == "answer" else "lowercase")
    assert (traj.diff != "") == (fmt == "full")
    prompt = prompts.reflection_prompt(SMOLLM2_TEMPLATE, "See you at noon.", ["lol"], fmt)
    assert prompt.endswith(prompts.assistant_prefix(fmt)) and prompts.REFLECT_SYSTEMS[fmt] in prompt


def test_shorter_formats_say_less():
    lengths = [len(prompts.format_trajectory("a b c", "d e f", "g h i", "x", fmt)) for fmt in prompts.FORMATS]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) == 3
    with pytest.raises(ValueError):
        prompts.assistant_prefix("verbose")


QWEN_LIKE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_LIKE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
              "{{ m.content }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
LLAMA3_LIKE = ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
               "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.mark.parametrize(("template", "eot"), [
    (SMOLLM2_TEMPLATE, "<|im_end|>"), (QWEN_LIKE, "<|im_end|>"), (GEMMA_LIKE, "<end_of_turn>"),
    (LLAMA3_LIKE, "<|eot_id|>"),
])
def test_end_of_turn_comes_from_the_models_template(template, eot):
    assert prompts.end_of_turn(template) == eot

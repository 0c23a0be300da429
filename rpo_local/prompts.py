"""Every prompt rpo-local sends to a model, defined once and shared by inference and training.

The reflection prompt asks for a structured rewriting trajectory of short tagged sections::

    <style>what the user's writing shows</style>
    <diff>how the generic reply differs from it</diff>
    <edits>the edits to make</edits>
    <answer>the rewritten reply</answer>

Two shorter formats say the same with fewer generated tokens: `compact` keeps only the style
note before the answer, `answer` is the answer alone. An adapter records the format it was
trained on (GGUF key `rpo.trajectory`); the runtime prompts in that format.

The assistant turn starts with `assistant_prefix(fmt)` (decoding is primed with it), so
training targets and inference outputs have exactly the same shape. The parser is strict
about the answer and tolerant of everything else.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache

SECTIONS = ("style", "diff", "edits")
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
FORMATS = ("full", "compact", "answer")  # trajectory formats, longest first
DEFAULT_FORMAT = "full"  # what an adapter that records none (and the bare model) is prompted with
# Anything that closes or opens a section ends the answer (a stray tag is never output). The end
# of the turn needs no stop string: llama.cpp ends generation at the model's own end-of-turn token.
ANSWER_STOPS = [ANSWER_CLOSE, "</", "<style>", "<diff>", "<edits>", ANSWER_OPEN]
ITEM_MAX_CHARS = 280

_TASK = "You rewrite a generic reply so that it reads as if the user wrote it, keeping its meaning. "
REFLECT_SYSTEMS = {
    "full": _TASK + (
        "First note the user's style, how the reply differs, and the edits to make; then give the "
        "rewrite. Use exactly this format:\n"
        "<style>...</style>\n<diff>...</diff>\n<edits>...</edits>\n<answer>...</answer>"
    ),
    "compact": _TASK + (
        "First note the user's style in a few words; then give the rewrite. Use exactly this "
        "format:\n<style>...</style>\n<answer>...</answer>"
    ),
    "answer": _TASK + "Give only the rewrite, in this format: <answer>...</answer>",
}

GENERIC_SYSTEM = "You are a helpful assistant. Answer clearly and concisely."

NEUTRAL_PARAPHRASE = (
    "Paraphrase the following text in plain, neutral, standard English, without any "
    "explanation before or after it: {text}"
)


def clip(text: str, limit: int = ITEM_MAX_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def reflection_user_message(generic: str, items: Sequence[str]) -> str:
    history = "\n".join(f"- {clip(t)}" for t in items) if items else "- (no history yet)"
    return f"The user's writing:\n{history}\n\nGeneric reply:\n{generic.strip()}"


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown trajectory format {fmt!r}; known: {', '.join(FORMATS)}")
    return fmt


def assistant_prefix(fmt: str = DEFAULT_FORMAT) -> str:
    """What the assistant turn starts with (decoding is primed with it)."""
    return ANSWER_OPEN if check_format(fmt) == "answer" else "<style>"


def reflection_messages(generic: str, items: Sequence[str], fmt: str = DEFAULT_FORMAT) -> list[dict]:
    return [
        {"role": "system", "content": REFLECT_SYSTEMS[check_format(fmt)]},
        {"role": "user", "content": reflection_user_message(generic, items)},
    ]


def format_trajectory(style: str, diff: str, edits: str, answer: str, fmt: str = DEFAULT_FORMAT) -> str:
    """The assistant's whole turn in format `fmt` (starting with `assistant_prefix(fmt)`)."""
    parts = {"full": [("style", style), ("diff", diff), ("edits", edits)],
             "compact": [("style", style)], "answer": []}[check_format(fmt)]
    head = "".join(f"<{name}>{text.strip()}</{name}>\n" for name, text in parts)
    return f"{head}{ANSWER_OPEN}{answer.strip()}{ANSWER_CLOSE}"


def generic_messages(question: str, system: str = GENERIC_SYSTEM) -> list[dict]:
    """The non-personalized base-model prompt (offline upstream and the `base` eval method)."""
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def neutral_paraphrase_messages(text: str) -> list[dict]:
    """Ask the base model for a neutral version of the user's own text (training data)."""
    return generic_messages(NEUTRAL_PARAPHRASE.format(text=text.strip()))


# -- LaMP's per-task prompts with retrieved profile items (the `context` baseline) -------------

def lamp_context_prompt(task: str, question: str, items: Sequence[dict]) -> str:
    """LaMP's profile-augmented prompt format (Salemi et al. 2023, Table 5) for tasks 4, 5, 7."""
    task = task.replace("LaMP_", "").replace("LaMP-", "")
    if task == "4":
        ctx = ", and ".join(f'"{clip(i.get("title", ""))}" is the title for "{clip(i.get("text", ""))}"' for i in items)
        return f"{ctx}. {question}" if items else question  # LaMP-4 has no "Following the given patterns"
    elif task == "5":
        ctx = ", and ".join(f'"{clip(i.get("title", ""))}" is a title for "{clip(i.get("abstract", ""))}"' for i in items)
    elif task == "7":
        ctx = ", and ".join(f'"{clip(i.get("text", ""))}"' for i in items)
        return f"{ctx} are written by a person. Following the given patterns {question}" if items else question
    else:
        raise ValueError(f"LaMP task {task!r} is not a generation task this harness supports")
    return f"{ctx}. Following the given patterns {question}" if items else question


# -- chat templates ---------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def _raise(message: str) -> None:
    raise ValueError(message)


def render_chat(template: str, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
    """Render `messages` with the model's own Jinja chat template (as transformers does)."""
    return _compile(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token="", eos_token=""
    )


def reflection_prompt(template: str, generic: str, items: Sequence[str], fmt: str = DEFAULT_FORMAT) -> str:
    """The exact text the reflection model continues (ends with `assistant_prefix(fmt)`)."""
    return render_chat(template, reflection_messages(generic, items, fmt)) + assistant_prefix(fmt)


_PROBE = "\x00rpo-probe\x00"


@lru_cache(maxsize=8)
def end_of_turn(template: str) -> str:
    """The text the model's chat template puts after an assistant message ("<|im_end|>",
    "<end_of_turn>", "<|eot_id|>"): what a training target ends with."""
    text = render_chat(template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
                       add_generation_prompt=False)
    tail = text[text.index(_PROBE) + len(_PROBE):].strip()
    if not tail:
        raise ValueError("the chat template ends an assistant turn with nothing")
    return tail.split()[0]


# -- parsing ----------------------------------------------------------------------------------

@dataclass
class Trajectory:
    style: str = ""
    diff: str = ""
    edits: str = ""
    answer: str | None = None
    problem: str | None = None  # why there is no usable answer
    raw: str = field(default="", repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "raw"}


_TAG = re.compile(r"</?(?:style|diff|edits|answer)>")


def _section(text: str, name: str) -> str:
    match = re.search(rf"<{name}>(.*?)(?=</{name}>|<(?:style|diff|edits|answer)>|$)", text, re.S)
    return match.group(1).strip() if match else ""


def parse_trajectory(raw: str, *, truncated: bool = False) -> Trajectory:
    """Parse a trajectory (which starts with `assistant_prefix`).

    `truncated` says generation stopped at its token limit inside the answer: the answer is
    then incomplete and is refused.
    """
    traj = Trajectory(raw=raw, **{name: _section(raw, name) for name in SECTIONS})
    start = raw.find(ANSWER_OPEN)
    if start < 0:
        traj.problem = "no <answer> section"
        return traj
    body = raw[start + len(ANSWER_OPEN) :]
    end = _TAG.search(body)
    if end is None and truncated:
        traj.problem = "answer cut off at the token limit"
        return traj
    answer = (body[: end.start()] if end else body).strip()
    if not answer:
        traj.problem = "empty answer"
        return traj
    if not any(ch.isalnum() for ch in answer):
        traj.problem = "answer has no words"
        return traj
    traj.answer = answer
    return traj


LOOP_TAIL, LOOP_TIMES = 20, 3


def loop_cut(text: str, source: str = "", times: int = LOOP_TIMES) -> int | None:
    """Where `text` starts repeating itself, or None.

    Small models fall into loops ("; @mentions; @mentions; ..."). When the last LOOP_TAIL
    characters occur `times` times, and more often than in `source` (a rewrite may copy
    the repetitions of the text it rewrites), the text is cut where the second occurrence
    starts: one copy of the repeated unit is kept.
    """
    if len(text) < LOOP_TAIL * times:
        return None
    tail = text[-LOOP_TAIL:]
    count = text.count(tail)
    if count < times or count <= source.lower().count(tail.lower()):
        return None
    return text.find(tail, text.find(tail) + LOOP_TAIL)


class AnswerStreamer:
    """Turns streamed answer-phase text into text safe to print as it arrives.

    It holds back a tail that could be the start of a stop tag (so `<3` is printed once the
    next character shows it is not a tag), trailing whitespace, and the last `lag` characters,
    so that a loop found later (see `loop_cut`) can still be dropped before it is printed, and
    everything until `gate` accepts the answer so far (the reflector's content check, which
    only gets easier to pass as the answer grows). What it prints in total is exactly the
    answer the reflector keeps.
    """

    def __init__(self, lag: int = 0, gate: Callable[[str], bool] | None = None) -> None:
        self.lag = lag
        self.gate = gate  # nothing is printed before the answer so far passes it
        self._open = gate is None
        self.raw = ""
        self.emitted = 0
        self.done = False  # a stop tag was seen

    @property
    def answer(self) -> str:
        """The answer so far: leading space dropped, cut at the first stop tag."""
        text = self.raw.lstrip()
        for stop in ANSWER_STOPS:
            idx = text.find(stop)
            if idx >= 0:
                self.done = True
                text = text[:idx]
        return text

    def feed(self, chunk: str) -> str:
        self.raw += chunk
        text = self.answer
        if not self._open:
            self._open = self.gate(text)
            if not self._open:
                return ""
        safe = text[: len(text) - _partial_stop_suffix(text)].rstrip()
        end = max(self.emitted, len(safe) - (0 if self.done else self.lag))
        out, self.emitted = safe[self.emitted : end], end
        return out

    def finish(self, final: str) -> str:
        """The rest of `final` (the answer kept) not yet printed."""
        out = final[self.emitted :] if final.startswith(self.answer[: self.emitted]) else ""
        self.emitted = max(self.emitted, len(final))
        return out


def _partial_stop_suffix(text: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in ANSWER_STOPS:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                best = max(best, n)
                break
    return best

"""A fake engine for fast unit tests: scripted continuations, real stop/length semantics.

It never replaces the real model in the end-to-end tests (tests/test_e2e_*.py).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from rpo_local.engine import Completion

# SmolLM2-135M-Instruct's chat template, as stored in its GGUF metadata.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Responder = Callable[[str], str]


def generic_of(prompt: str) -> str:
    """The generic reply inside a reflection prompt."""
    match = re.search(r"Generic reply:\n(.*?)<\|im_end\|>", prompt, re.DOTALL)
    return match.group(1).strip() if match else ""


def lowercasing_responder(prompt: str) -> str:
    """A well-behaved reflection model: analysis, then the generic text lower-cased."""
    if prompt.endswith("<answer>"):
        return generic_of(prompt).lower() + "</answer>"
    return "writes in lowercase</style>\n<diff>generic is capitalised</diff>\n<edits>lowercase it</edits>\n<answer>"


class FakeEngine:
    def __init__(self, responder: Responder = lowercasing_responder, n_ctx: int = 2048) -> None:
        self.responder = responder
        self.n_ctx = n_ctx
        self.model_path = Path("fake-model.gguf")
        self.adapter_path: Path | None = None
        self.style = None  # the style vector set with set_style, and how
        self.style_scale, self.style_layers = 1.0, (1, 10_000)
        self.lock = threading.RLock()
        self.prompts: list[str] = []
        self.drafts: list[str | None] = []  # the `draft` of each stream call

    def chat_template(self) -> str:
        return SMOLLM2_TEMPLATE

    def count_tokens(self, text: str) -> int:
        return len(text) // 4 + 1

    def stream(
        self,
        prompt: str,
        *,
        max_tokens: int,
        stop: list[str],
        temperature: float = 0.0,
        seed: int = 0,
        result: Completion | None = None,
        draft: str | None = None,
    ) -> Iterator[str]:
        result = result if result is not None else Completion()
        self.prompts.append(prompt)
        self.drafts.append(draft)
        text = self.responder(prompt)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
        result.prompt_tokens = self.count_tokens(prompt)
        pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
        for n, piece in enumerate(pieces):
            if n >= max_tokens:
                result.finish_reason = "length"
                return
            result.completion_tokens += 1
            result.text += piece
            yield piece
        result.finish_reason = "stop"

    def set_adapter(self, path: Path | None, scale: float = 1.0) -> None:
        self.adapter_path = path

    def set_style(self, vector: object, scale: float = 1.0, layers: tuple[int, int] = (1, 10_000)) -> None:
        self.style, self.style_scale, self.style_layers = vector, scale, layers

    def describe(self) -> dict:
        return {"backend": "fake", "model": str(self.model_path), "adapter": None}

"""Reflection: rewrite a generic reply in the user's style (the RPO post-hoc rewrite).

For each rewrite: retrieve the profile's most relevant items, prompt the reflection model for
a structured trajectory, parse it, and keep the generic reply whenever the model gives no
usable answer. Generation runs in two phases sharing one KV cache: the analysis sections up
to `<answer>`, then the answer, which is streamed as it is generated.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from rpo_local import prompts
from rpo_local.config import Config, load_config
from rpo_local.engine import Completion
from rpo_local.retrieve import content_kept, retrieve

if TYPE_CHECKING:
    from rpo_local.engine import Engine
    from rpo_local.store import Store

TextSink = Callable[[str], None]
PHASE1_STOPS = ["<|im_end|>"]  # `<answer>` is watched for in the stream instead
# Streamed answers trail generation by this many characters, so a loop caught by
# `prompts.loop_cut` is dropped before it is printed (about 15 tokens, ~0.15 s).
STREAM_LAG = 64


@dataclass
class ChunkResult:
    input: str
    output: str
    trajectory: dict
    fallback: bool
    reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_s: float = 0.0
    gen_s: float = 0.0


@dataclass
class RewriteResult:
    profile: str
    input: str
    rewrite: str  # always usable: the generic text wherever the model gave no answer
    fallback: bool  # True when no part of the rewrite came from the model
    fallback_reason: str | None
    trajectory: dict | list[dict]
    retrieved: list[dict]
    model: str
    adapter: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_s: float = 0.0
    gen_s: float = 0.0
    total_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    interaction_id: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Reflector:
    def __init__(self, store: Store | None, engine: Engine, config: Config | None = None) -> None:
        self.store = store
        self.engine = engine
        self.config = config or load_config()

    # -- public API -----------------------------------------------------------------------------

    def rewrite(
        self,
        generic: str,
        profile: str | None = None,
        *,
        k: int | None = None,
        log: bool = True,
        on_text: TextSink | None = None,
        on_note: TextSink | None = None,
        source: str = "api",
    ) -> RewriteResult:
        """Rewrite `generic` for `profile`. `on_text` receives the rewrite as it is produced."""
        profile = profile or self.config.profile
        k = self.config.k if k is None else k
        start = time.perf_counter()
        notes: list[str] = []

        def note(msg: str) -> None:
            notes.append(msg)
            if on_note:
                on_note(msg)

        if self.store is not None:
            self.store.get_profile(profile)  # unknown profile: fail before any model work
        pieces = self._split(generic)
        if len(pieces) > 1:
            note(f"input is longer than the model's context allows; rewriting it in {len(pieces)} chunks")
        chunks: list[ChunkResult] = []
        retrieved: dict[int, dict] = {}
        with self.engine.lock:
            for i, (piece, sep) in enumerate(pieces):
                items = retrieve(self.store, profile, piece, k) if self.store is not None and k else []
                for item in items:
                    retrieved.setdefault(item["id"], item)
                chunk = self._rewrite_chunk(piece, [it["text"] for it in items], on_text, note)
                chunks.append(chunk)
                if on_text and sep and i < len(pieces) - 1:
                    on_text(sep)
        result = self._combine(profile, generic, pieces, chunks, list(retrieved.values()), notes)
        result.total_s = time.perf_counter() - start
        if log and self.store is not None:
            result.interaction_id = self.store.record_interaction(
                profile,
                source=source,
                input=generic,
                rewrite=result.rewrite,
                trajectory=result.trajectory,
                fallback=result.fallback,
                fallback_reason=result.fallback_reason,
                model=result.model,
                adapter=result.adapter,
                retrieved_ids=[it["id"] for it in result.retrieved],
                latency_ms=round(result.total_s * 1000, 1),
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
            )
        return result

    def rewrite_with_items(self, generic: str, items: list[str]) -> ChunkResult:
        """Rewrite a short text with the given context items: no retrieval, nothing recorded
        (held-out evaluation, where the target must not be retrieved as its own context)."""
        with self.engine.lock:
            return self._rewrite_chunk(generic, items, None, lambda _msg: None)

    # -- one chunk ------------------------------------------------------------------------------

    def _fit_items(self, generic: str, items: list[str]) -> tuple[str, list[str]]:
        """The prompt with as many retrieved items as the context leaves room for."""
        template = self.engine.chat_template()
        budget = self.engine.n_ctx - self.config.trajectory_tokens - self._answer_budget(generic)
        while True:
            prompt = prompts.reflection_prompt(template, generic, items)
            if not items or self.engine.count_tokens(prompt) <= budget:
                return prompt, items
            items = items[:-1]

    def _answer_budget(self, generic: str) -> int:
        return max(48, 2 * self.engine.count_tokens(generic) + 32)

    def _rewrite_chunk(
        self, generic: str, items: list[str], on_text: TextSink | None, note: TextSink
    ) -> ChunkResult:
        prompt, _ = self._fit_items(generic, items)
        analysis, text = self._analyse(prompt)
        raw = prompts.ASSISTANT_PREFIX + text
        if analysis.finish_reason == "stop":  # end of turn with no answer at all
            return self._fallback(generic, prompts.parse_trajectory(raw), analysis, None, on_text, note)
        if analysis.finish_reason != "answer":
            raw += "\n"  # out of budget or looping: close the analysis so the model still answers
        raw += prompts.ANSWER_OPEN
        answer, streamer, looped = self._answer(prompt + raw[len(prompts.ASSISTANT_PREFIX):], generic, on_text)
        if looped is not None:
            body, truncated = streamer.answer[:looped], False
        else:
            body, truncated = streamer.answer, answer.finish_reason == "length" and not streamer.done
        traj = prompts.parse_trajectory(raw + body + ("" if truncated else prompts.ANSWER_CLOSE), truncated=truncated)
        if traj.answer is not None and not keeps_content(traj.answer, generic, self.config.min_content_kept):
            traj.answer, traj.problem = None, "answer drops the reply's content"
        if traj.answer is None and on_text and streamer.emitted:
            # Printed already (a cut-off past the streaming lag): what the reader saw is the rewrite.
            note(f"the rewrite was cut off at {answer.completion_tokens} tokens")
            traj.answer, traj.problem = streamer.answer[: streamer.emitted].rstrip(), None
        if traj.answer is None:
            return self._fallback(generic, traj, analysis, answer, on_text, note)
        rest = streamer.finish(traj.answer)
        if rest and on_text:
            on_text(rest)
        return ChunkResult(
            generic, traj.answer, traj.to_dict(), False, None,
            analysis.prompt_tokens,
            analysis.completion_tokens + answer.completion_tokens,
            analysis.prompt_s + answer.prompt_s, analysis.gen_s + answer.gen_s,
        )

    def _analyse(self, prompt: str) -> tuple[Completion, str]:
        """Phase 1: the style/diff/edits sections, up to `<answer>` (finish_reason "answer"),
        the end of the turn ("stop"), the budget ("length") or a loop ("loop")."""
        cfg = self.config
        analysis = Completion()
        text = ""
        for piece in self.engine.stream(
            prompt, max_tokens=cfg.trajectory_tokens, stop=PHASE1_STOPS,
            temperature=cfg.temperature, seed=cfg.seed, result=analysis,
        ):
            text += piece
            if prompts.ANSWER_OPEN in text:
                text = text[: text.index(prompts.ANSWER_OPEN)]
                analysis.finish_reason = "answer"
                break
            cut = prompts.loop_cut(text)
            if cut is not None:
                text = text[:cut]
                analysis.finish_reason = "loop"
                break
        return analysis, text

    def _answer(
        self, prompt: str, generic: str, on_text: TextSink | None
    ) -> tuple[Completion, prompts.AnswerStreamer, int | None]:
        """Phase 2: the answer, streamed to `on_text`; stops early at a stop tag or a loop."""
        cfg = self.config
        answer = Completion()
        streamer = prompts.AnswerStreamer(
            lag=STREAM_LAG if on_text else 0,
            gate=lambda text: keeps_content(text, generic, cfg.min_content_kept),
        )
        looped = None
        for piece in self.engine.stream(
            prompt, max_tokens=self._answer_budget(generic), stop=prompts.ANSWER_STOPS,
            temperature=cfg.temperature, seed=cfg.seed, result=answer, draft=generic,
        ):
            out = streamer.feed(piece)
            if out and on_text:
                on_text(out)
            if streamer.done:
                break
            # A short answer has no business repeating itself: two copies are a loop, caught
            # while the second copy is still within the streaming lag.
            looped = prompts.loop_cut(streamer.answer, generic, times=2)
            if looped is not None:
                if on_text:
                    looped = max(looped, streamer.emitted)  # never keep less than was printed
                break
        return answer, streamer, looped

    def _fallback(
        self,
        generic: str,
        traj: prompts.Trajectory,
        analysis: Completion,
        answer: Completion | None,
        on_text: TextSink | None,
        note: TextSink,
    ) -> ChunkResult:
        note(f"no usable rewrite ({traj.problem}); keeping the generic text")
        if on_text:
            on_text(generic.strip())
        answer = answer or Completion()
        return ChunkResult(
            generic, generic.strip(), traj.to_dict(), True, traj.problem,
            analysis.prompt_tokens, analysis.completion_tokens + answer.completion_tokens,
            analysis.prompt_s + answer.prompt_s, analysis.gen_s + answer.gen_s,
        )

    # -- long inputs ----------------------------------------------------------------------------

    def _split(self, text: str) -> list[tuple[str, str]]:
        """Split `text` into (piece, separator) chunks that each fit the context with room to spare."""
        text = text.strip()
        limit = max(64, (self.engine.n_ctx - self.config.trajectory_tokens - 400) // 3)
        if self.engine.count_tokens(text) <= limit:
            return [(text, "")]
        out: list[tuple[str, str]] = []
        for unit, sep in _units(text):
            if out and self.engine.count_tokens(out[-1][0] + out[-1][1] + unit) <= limit:
                prev, prev_sep = out[-1]
                out[-1] = (prev + prev_sep + unit, sep)
            else:
                out.append((unit, sep))
        return out

    def _combine(
        self, profile: str, generic: str, pieces: list, chunks: list[ChunkResult],
        retrieved: list[dict], notes: list[str],
    ) -> RewriteResult:
        text = "".join(c.output + (sep if i < len(chunks) - 1 else "") for i, (c, (_, sep)) in enumerate(zip(chunks, pieces)))
        failed = [c for c in chunks if c.fallback]
        reason = None
        if failed:
            reason = failed[0].reason if len(chunks) == 1 else f"{len(failed)}/{len(chunks)} chunks: {failed[0].reason}"
        adapter = getattr(self.engine, "adapter_path", None)
        return RewriteResult(
            profile=profile,
            input=generic,
            rewrite=text,
            fallback=len(failed) == len(chunks),
            fallback_reason=reason,
            trajectory=chunks[0].trajectory if len(chunks) == 1 else [c.trajectory for c in chunks],
            retrieved=[{"id": r["id"], "text": r["text"], "score": r.get("score")} for r in retrieved],
            model=self.engine.model_path.name,
            adapter=str(adapter) if adapter else None,
            prompt_tokens=sum(c.prompt_tokens for c in chunks),
            completion_tokens=sum(c.completion_tokens for c in chunks),
            prompt_s=sum(c.prompt_s for c in chunks),
            gen_s=sum(c.gen_s for c in chunks),
            notes=notes,
        )


def keeps_content(answer: str, generic: str, minimum: float) -> bool:
    """Does `answer` keep at least `minimum` of `generic`'s content words (a rewrite of it)?

    A small reflection model sometimes answers with one of the user's old posts, or invents
    content, instead of rewriting the reply.
    """
    return content_kept(answer, generic) >= minimum


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _units(text: str) -> list[tuple[str, str]]:
    """Paragraphs, then sentences, then words: the largest units a long text splits into."""
    units: list[tuple[str, str]] = []
    for para in re.split(r"\n\s*\n", text):
        sentences = _SENTENCE.split(para.strip())
        for j, sentence in enumerate(sentences):
            words = sentence.split(" ")
            for w_i in range(0, len(words), 200):
                last_word_chunk = w_i + 200 >= len(words)
                sep = " " if not last_word_chunk else (" " if j < len(sentences) - 1 else "\n\n")
                units.append((" ".join(words[w_i:w_i + 200]), sep))
    return units


def print_note(msg: str) -> None:
    print(f"rpo: {msg}", file=sys.stderr, flush=True)

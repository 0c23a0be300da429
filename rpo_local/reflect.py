"""Reflection: rewrite a generic reply in the user's style (the RPO post-hoc rewrite).

A reply is split into pieces (`rpo_local.segment`: sentences of its paragraphs, list items and
headings; code, tables, markup and whitespace stay verbatim). For each piece, in order: retrieve
the profile's most relevant items, prompt the reflection model for a structured trajectory, parse
it, check the answer, and keep the piece's generic text whenever the model gives no usable answer.
Generation runs in two phases sharing one KV cache: the analysis sections up to `<answer>`, then
the answer. Each piece is passed to `on_text` once it is done, verbatim text at once.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from rpo_local import adapters, prompts, segment
from rpo_local.config import Config, load_config
from rpo_local.engine import Completion
from rpo_local.retrieve import retrieve
from rpo_local.text import content_kept

if TYPE_CHECKING:
    from pathlib import Path

    from rpo_local.engine import Engine
    from rpo_local.store import Store

TextSink = Callable[[str], None]
NOTHING_TO_REWRITE = "nothing to rewrite (no sentence with words a rewrite could change)"
TIME_BUDGET = "the time budget ran out before this piece"


class RewriteCancelled(Exception):
    """The caller stopped waiting (`cancelled` was set): generation stopped between two tokens."""


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


def _counts(analysis: Completion, answer: Completion) -> tuple[int, int, float, float]:
    """A chunk's prompt and completion tokens and times. The prompt is the analysis phase's, or
    the answer's where the format has no analysis phase (the answer's prompt repeats the analysis)."""
    return (
        analysis.prompt_tokens or answer.prompt_tokens,
        analysis.completion_tokens + answer.completion_tokens,
        analysis.prompt_s + answer.prompt_s,
        analysis.gen_s + answer.gen_s,
    )


@dataclass
class PieceResult:
    """One piece of a reply: where it is in the input, and what replaced it."""

    start: int
    end: int
    input: str  # the exact text of the input at start:end
    output: str  # the rewrite, or `input` unchanged
    rewritten: bool
    reason: str | None  # why it was not rewritten
    retrieved_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_s: float = 0.0
    gen_s: float = 0.0
    latency_s: float = 0.0


@dataclass
class RewriteResult:
    profile: str
    input: str
    rewrite: str  # always usable: the input byte for byte wherever no rewrite was accepted
    fallback: bool  # True when no part of the rewrite came from the model
    fallback_reason: str | None
    trajectory: dict | list[dict]  # one piece: its trajectory; else one per piece
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
    pieces: list[PieceResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Reflector:
    def __init__(self, store: Store | None, engine: Engine, config: Config | None = None, *,
                 cancelled: threading.Event | None = None) -> None:
        """`cancelled`: once set, the rewrite in progress raises RewriteCancelled at the next token."""
        self.store = store
        self.engine = engine
        self.config = config or load_config()
        self.cancelled = cancelled

    @property
    def gate(self) -> float:
        """The content gate: configured, or the adapter's own (adapters.setting)."""
        return adapters.setting(self.config, "min_content_kept", getattr(self.engine, "adapter_path", None))

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
        deadline: float | None = None,
    ) -> RewriteResult:
        """Rewrite `generic` for `profile`, piece by piece. `on_text` receives the result in order
        as it is produced, one call per segment of `pieces_of(generic, ...)`: verbatim text at
        once, each piece when it is done. Pieces not started by `deadline` (time.monotonic) keep
        their generic text."""
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
        segments = pieces_of(generic, self.config, getattr(self.engine, "adapter_path", None))
        total = sum(s.prose for s in segments)
        if total > 1:
            note(f"rewriting {total} pieces in order")
        pieces: list[PieceResult] = []
        trajectories: list[dict] = []
        out: list[str] = []
        pos = 0
        # Retrieval once, by all the reply's prose, or by each piece's own words.
        whole = " ".join(s.plain for s in segments if s.prose) if self.config.retrieval_scope == "reply" else None
        found: dict[str, list[dict]] = {}  # the items by query: one retrieval per distinct query
        with self.engine.lock:
            for seg in segments:
                text = seg.text
                if seg.prose:
                    piece, traj = self._next_piece(seg, pos, profile, k, deadline, found, whole or seg.plain)
                    if piece.reason:
                        where = f"piece {len(pieces) + 1}/{total}: " if total > 1 else ""
                        note(f"{where}no usable rewrite ({piece.reason}); keeping the generic text")
                    pieces.append(piece)
                    trajectories.append(traj)
                    text = piece.output
                out.append(text)
                if on_text:
                    on_text(text)
                pos += len(seg.text)
        retrieved: dict[int, dict] = {}  # every item used, first found first
        for item in (it for items in found.values() for it in items):
            retrieved.setdefault(item["id"], item)
        result = self._combine(profile, generic, "".join(out), pieces, trajectories, list(retrieved.values()), notes)
        result.total_s = time.perf_counter() - start
        if log and self.store is not None:
            result.interaction_id = self.store.record_interaction(profile, **interaction_row(source, generic, result))
        return result

    def rewrite_with_items(self, generic: str, items: list[str], *, fmt: str | None = None) -> ChunkResult:
        """Rewrite a short text with the given context items: no retrieval, nothing recorded
        (held-out evaluation, where the target must not be retrieved as its own context)."""
        with self.engine.lock:
            return self._rewrite_chunk(generic, items, fmt)

    def trajectory_format(self) -> str:
        """The configured trajectory format; "auto": the one the adapter was trained on."""
        if self.config.trajectory != "auto":
            return self.config.trajectory
        recorded = getattr(self.engine, "adapter_format", None)
        return recorded if recorded in prompts.FORMATS else prompts.DEFAULT_FORMAT

    def _stops(self, stops: list[str]) -> list[str]:
        """`stops` and the model's end of turn (llama.cpp stops there too; fakes and other
        runtimes may not)."""
        return [*stops, prompts.end_of_turn(self.engine.chat_template())]

    # -- one piece ------------------------------------------------------------------------------

    def _next_piece(
        self, seg: segment.Segment, pos: int, profile: str, k: int, deadline: float | None,
        found: dict[str, list[dict]], query: str,
    ) -> tuple[PieceResult, dict]:
        """The next piece: the items for `query` (retrieved unless `found` has them), then its
        rewrite. Nothing is retrieved for a piece past the deadline."""
        if deadline is not None and time.monotonic() > deadline:
            piece = PieceResult(pos, pos + len(seg.text), seg.text, seg.text, False, TIME_BUDGET)
            return piece, {"piece": seg.plain, "rewritten": False, "problem": TIME_BUDGET}
        if query not in found:
            how = adapters.retriever(self.config, getattr(self.engine, "adapter_path", None))
            found[query] = retrieve(self.store, profile, query, k, how) if self.store is not None and k else []
        return self._rewrite_piece(seg, pos, found[query], profile)

    def _rewrite_piece(
        self, seg: segment.Segment, pos: int, items: list[dict], profile: str
    ) -> tuple[PieceResult, dict]:
        """Rewrite one piece; its generic text stays wherever the answer is refused."""
        begin = time.perf_counter()
        piece = PieceResult(pos, pos + len(seg.text), seg.text, seg.text, False, None,
                            [it["id"] for it in items])
        texts = [it["text"] for it in items]
        if not self._fits(seg.plain):
            piece.reason = "the piece is too long for the model's context"
            return piece, {"piece": seg.plain, "rewritten": False, "problem": piece.reason}
        chunk = self._rewrite_chunk(seg.plain, texts)
        answer = " ".join(chunk.output.split())
        reason = chunk.reason if chunk.fallback else (
            segment.refusal(seg, answer) or self._copied_history(answer, seg.plain, texts, profile)
        )
        if reason is None and answer != seg.plain:
            piece.output, piece.rewritten = answer, True
        elif reason is None:
            reason = "the rewrite is the generic text"
        piece.reason = reason
        piece.prompt_tokens, piece.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        piece.prompt_s, piece.gen_s = chunk.prompt_s, chunk.gen_s
        piece.latency_s = time.perf_counter() - begin
        traj = {**chunk.trajectory, "piece": seg.plain, "rewritten": piece.rewritten, "problem": reason}
        return piece, traj

    def _fits(self, text: str) -> bool:
        prompt = prompts.reflection_prompt(self.engine.chat_template(), text, [], self.trajectory_format())
        need = self.engine.count_tokens(prompt) + self.config.trajectory_tokens + self._answer_budget(text)
        return need <= self.engine.n_ctx

    def _copied_history(self, answer: str, generic: str, items: list[str], profile: str) -> str | None:
        """An answer that is one of the user's history items, word for word, is not a rewrite."""
        norm = " ".join(answer.lower().split())
        if norm == " ".join(generic.lower().split()):
            return None
        copied = any(norm == " ".join(t.lower().split()) for t in items)
        if not copied and self.store is not None:
            copied = self.store.has_item_text(profile, answer)
        return "the answer is a history item copied verbatim" if copied else None

    # -- one model call -------------------------------------------------------------------------

    def _fit_items(self, generic: str, items: list[str], fmt: str) -> tuple[str, list[str]]:
        """The prompt with as many retrieved items as the context leaves room for."""
        template = self.engine.chat_template()
        budget = self.engine.n_ctx - self.config.trajectory_tokens - self._answer_budget(generic)
        while True:
            prompt = prompts.reflection_prompt(template, generic, items, fmt)
            if not items or self.engine.count_tokens(prompt) <= budget:
                return prompt, items
            items = items[:-1]

    def _answer_budget(self, generic: str) -> int:
        return max(48, 2 * self.engine.count_tokens(generic) + 32)

    def _rewrite_chunk(self, generic: str, items: list[str], fmt: str | None = None) -> ChunkResult:
        fmt = fmt or self.trajectory_format()
        prompt, _ = self._fit_items(generic, items, fmt)
        prefix = prompts.assistant_prefix(fmt)
        if fmt == "answer":  # the prompt already opens the answer: no analysis phase
            analysis, raw = Completion(finish_reason="answer"), ""
        else:
            analysis, text = self._analyse(prompt)
            raw = prefix + text
            if analysis.finish_reason == "stop":  # end of turn with no answer at all
                return self._fallback(generic, prompts.parse_trajectory(raw), analysis, None)
            if analysis.finish_reason != "answer":
                raw += "\n"  # out of budget or looping: close the analysis so the model still answers
        raw += prompts.ANSWER_OPEN
        answer, streamer, looped = self._answer(prompt + raw[len(prefix):], generic)
        if looped is not None:
            body, truncated = streamer.answer[:looped], False
        else:
            body, truncated = streamer.answer, answer.finish_reason == "length" and not streamer.done
        traj = prompts.parse_trajectory(raw + body + ("" if truncated else prompts.ANSWER_CLOSE), truncated=truncated)
        if traj.answer is not None and not keeps_content(traj.answer, generic, self.gate):
            traj.answer, traj.problem = None, "answer drops the reply's content"
        if traj.answer is None:
            return self._fallback(generic, traj, analysis, answer)
        return ChunkResult(generic, traj.answer, traj.to_dict(), False, None, *_counts(analysis, answer))

    def _generate(self, prompt: str, *, max_tokens: int, stop: list[str], temperature: float, seed: int,
                  result: Completion, draft: str | None = None) -> Iterator[str]:
        """The engine's stream, stopping between tokens once `cancelled` is set."""
        gen = self.engine.stream(prompt, max_tokens=max_tokens, stop=stop, temperature=temperature, seed=seed,
                                 result=result, draft=draft)
        try:
            for piece in gen:
                if self.cancelled is not None and self.cancelled.is_set():
                    raise RewriteCancelled
                yield piece
        finally:
            gen.close()  # releases the engine's lock now, not whenever the generator is collected

    def _analyse(self, prompt: str) -> tuple[Completion, str]:
        """Phase 1: the style/diff/edits sections, up to `<answer>` (finish_reason "answer"),
        the end of the turn ("stop"), the budget ("length") or a loop ("loop")."""
        cfg = self.config
        analysis = Completion()
        text = ""
        for piece in self._generate(
            prompt, max_tokens=cfg.trajectory_tokens, stop=self._stops([]),
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

    def _answer(self, prompt: str, generic: str) -> tuple[Completion, prompts.AnswerStreamer, int | None]:
        """Phase 2: the answer; stops early at a stop tag or a loop."""
        cfg = self.config
        answer = Completion()
        streamer = prompts.AnswerStreamer()
        looped = None
        for piece in self._generate(
            prompt, max_tokens=self._answer_budget(generic), stop=self._stops(prompts.ANSWER_STOPS),
            temperature=cfg.temperature, seed=cfg.seed, result=answer, draft=generic,
        ):
            streamer.feed(piece)
            if streamer.done:
                break
            # A short answer has no business repeating itself: two copies are a loop.
            looped = prompts.loop_cut(streamer.answer, generic, times=2)
            if looped is not None:
                break
        return answer, streamer, looped

    def _fallback(
        self, generic: str, traj: prompts.Trajectory, analysis: Completion, answer: Completion | None
    ) -> ChunkResult:
        return ChunkResult(generic, generic.strip(), traj.to_dict(), True, traj.problem,
                           *_counts(analysis, answer or Completion()))

    # -- the whole reply ------------------------------------------------------------------------

    def _combine(
        self, profile: str, generic: str, text: str, pieces: list[PieceResult], trajectories: list[dict],
        retrieved: list[dict], notes: list[str],
    ) -> RewriteResult:
        kept = [p for p in pieces if not p.rewritten]
        if not pieces:
            reason = NOTHING_TO_REWRITE
        elif not kept:
            reason = None
        elif len(pieces) == 1:
            reason = kept[0].reason
        else:
            reason = f"{len(kept)}/{len(pieces)} pieces kept as they were: {kept[0].reason}"
        adapter = getattr(self.engine, "adapter_path", None)
        trajectory: dict | list[dict] = trajectories[0] if len(trajectories) == 1 else trajectories
        return RewriteResult(
            profile=profile,
            input=generic,
            rewrite=text,
            fallback=len(kept) == len(pieces),
            fallback_reason=reason,
            trajectory=trajectory if pieces else {"problem": reason},
            retrieved=[{"id": r["id"], "text": r["text"], "score": r.get("score")} for r in retrieved],
            model=self.engine.model_path.name,
            adapter=str(adapter) if adapter else None,
            prompt_tokens=sum(p.prompt_tokens for p in pieces),
            completion_tokens=sum(p.completion_tokens for p in pieces),
            prompt_s=sum(p.prompt_s for p in pieces),
            gen_s=sum(p.gen_s for p in pieces),
            notes=notes,
            pieces=pieces,
        )

def interaction_row(source: str, generic: str, result: RewriteResult | None, *, sent: str | None = None,
                    reason: str | None = None, engine: Engine | None = None) -> dict:
    """The fields of `Store.record_interaction` for a reply as the user got it: `sent` (default:
    the rewrite, or the generic reply when there is none or `reason` says why it was not used)."""
    if result is not None and reason is None:
        text, fallback, why = result.rewrite if sent is None else sent, result.fallback, result.fallback_reason
    else:
        text, fallback, why = generic if sent is None else sent, True, reason
    row: dict = {"source": source, "input": generic, "rewrite": text, "fallback": fallback, "fallback_reason": why}
    if result is not None:
        row.update(
            trajectory=result.trajectory, model=result.model, adapter=result.adapter,
            retrieved_ids=[it["id"] for it in result.retrieved], latency_ms=round(result.total_s * 1000, 1),
            prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
        )
    elif engine is not None:  # no rewrite: the model and adapter that would have written it
        row.update(model=getattr(engine.model_path, "name", None),
                   adapter=str(engine.adapter_path) if engine.adapter_path else None)
    return row


def pieces_of(generic: str, config: Config, adapter_path: str | Path | None) -> list[segment.Segment]:
    """The segments a reply is rewritten in (the reflector and the daemon's stream agree on them)."""
    return segment.split(generic, piece_words=adapters.setting(config, "piece_words", adapter_path))


def keeps_content(answer: str, generic: str, minimum: float) -> bool:
    """Does `answer` keep at least `minimum` of `generic`'s content words (a rewrite of it)?

    A small reflection model sometimes answers with one of the user's old posts, or invents
    content, instead of rewriting the reply.
    """
    return content_kept(answer, generic) >= minimum


def print_note(msg: str) -> None:
    print(f"rpo: {msg}", file=sys.stderr, flush=True)

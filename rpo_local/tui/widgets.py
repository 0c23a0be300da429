"""The conversation's widgets: a user message and an assistant turn (personalized reply,
generic view, word diff, trajectory panel, feedback)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Button, Collapsible, Label, Static
from textual.widgets.collapsible import CollapsibleTitle

from rpo_local.tui.diff import change_ratio, diff_text
from rpo_local.tui.pipeline import Turn

VERDICT_LABELS = {"accepted": "✓ accepted", "edited": "✎ edited", "rejected": "✗ rejected"}


class UserMessage(Static):
    def __init__(self, text: str) -> None:
        super().__init__(text, markup=False, classes="user-message")
        self.border_title = "you"


class AssistantTurn(Vertical, can_focus=True):
    """One assistant reply; streams in, then offers views and feedback."""

    BINDINGS = [
        Binding("g", "toggle_generic", "Generic"),
        Binding("d", "toggle_diff", "Diff"),
        Binding("t", "toggle_details", "Trajectory"),
        Binding("a", "feedback('accepted')", "Accept"),
        Binding("e", "edit", "Edit"),
        Binding("r", "feedback('rejected')", "Reject"),
    ]

    view: reactive[str] = reactive("reply", init=False)  # the reply as sent, "generic" or "diff"

    class Feedback(Message):
        """The user rated this turn (`verdict`), or asked to edit it (`verdict` 'edit')."""

        def __init__(self, turn: AssistantTurn, verdict: str) -> None:
            super().__init__()
            self.turn = turn
            self.verdict = verdict

    def __init__(self, turn: Turn | None = None, *, generic: str = "") -> None:
        super().__init__(classes="assistant-turn")
        self.turn = turn
        self.generic = turn.generic if turn else generic
        self.streamed = turn.rewrite if turn else ""
        self.shown = self.streamed  # the body's plain text, whatever the view
        self.border_title = "assistant"

    def compose(self) -> ComposeResult:
        yield Static(self.streamed, markup=False, classes="body")
        with Collapsible(title="Trajectory & retrieved items", collapsed=True, classes="details"):
            yield Static("", markup=False, classes="details-body")
        with Horizontal(classes="actions"):
            for label, name, variant in (
                ("Accept", "accept", "success"), ("Edit", "edit", "primary"),
                ("Reject", "reject", "error"), ("Generic", "generic", "default"),
                ("Diff", "diff", "default"),
            ):
                button = Button(label, name=name, variant=variant, compact=True, classes=f"btn-{name}")
                button.can_focus = False  # keyboard users have the turn's own keys
                yield button
            yield Label("", classes="verdict")

    def on_mount(self) -> None:
        self.query_one(CollapsibleTitle).can_focus = False
        self._refresh()

    # -- streaming --------------------------------------------------------------------------------

    def append(self, text: str) -> None:
        self.streamed += text
        if self.view == "reply":
            self.shown = self.streamed
            self.query_one(".body", Static).update(self.streamed)

    def set_status(self, status: str) -> None:
        self.border_subtitle = status

    def finish(self, turn: Turn) -> None:
        self.turn = turn
        self.generic = turn.generic
        self.streamed = turn.rewrite
        self._refresh()

    # -- views ------------------------------------------------------------------------------------

    def watch_view(self) -> None:
        self._refresh()

    def action_toggle_generic(self) -> None:
        self.view = "reply" if self.view == "generic" else "generic"

    def action_toggle_diff(self) -> None:
        self.view = "reply" if self.view == "diff" else "diff"

    def action_toggle_details(self) -> None:
        details = self.query_one(Collapsible)
        details.collapsed = not details.collapsed

    def action_feedback(self, verdict: str) -> None:
        if self.turn is not None and self.turn.verdict is None:
            self.post_message(self.Feedback(self, verdict))

    def action_edit(self) -> None:
        if self.turn is not None:
            self.post_message(self.Feedback(self, "edit"))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        actions = {
            "accept": lambda: self.action_feedback("accepted"),
            "edit": self.action_edit,
            "reject": lambda: self.action_feedback("rejected"),
            "generic": self.action_toggle_generic,
            "diff": self.action_toggle_diff,
        }
        actions[event.button.name or ""]()

    def _refresh(self) -> None:
        body = self.query_one(".body", Static)
        if self.view == "diff":
            diff = diff_text(self.generic, self.streamed)
            self.shown = diff.plain
            body.update(diff)
        else:
            self.shown = self.generic if self.view == "generic" else self.streamed
            body.update(self.shown)
        turn = self.turn
        kind, detail = outcome(turn) if turn is not None else (None, None)
        title = kind if self.view == "reply" else self.view  # no outcome yet while it streams
        self.border_title = f"assistant · {title}" if title else "assistant"
        rated = turn is not None and turn.verdict is not None
        for name in ("accept", "reject"):
            self.query_one(f".btn-{name}", Button).disabled = turn is None or rated
        for name in ("edit", "generic", "diff"):
            self.query_one(f".btn-{name}", Button).disabled = turn is None
        if turn is None:
            return
        self.query_one(".verdict", Label).update(VERDICT_LABELS.get(turn.verdict or "", ""))
        self.set_status(f"{kind}: {detail}")
        self.query_one(".details-body", Static).update(details_text(turn))


def outcome(turn: Turn) -> tuple[str, str]:
    """What became of the reply, and why: the header and the footer both say this one outcome."""
    if turn.fallback:
        return "generic kept", turn.fallback_reason or "no rewrite"
    changed = f"{change_ratio(turn.generic, turn.rewrite):.0%} of words changed"
    return "personalized", changed + (f"; {turn.fallback_reason}" if turn.fallback_reason else "")


def details_text(turn: Turn) -> str:
    """The trajectory sections and the retrieved profile items, as plain text."""
    lines: list[str] = []
    parts = turn.trajectory if isinstance(turn.trajectory, list) else [turn.trajectory or {}]
    for n, part in enumerate(parts, 1):
        if len(parts) > 1:
            state = "rewritten" if part.get("rewritten") else "kept as it was"
            piece = " ".join(str(part.get("piece", "")).split())
            lines.append(f"piece {n}/{len(parts)} ({state}): {piece[:80]}{'…' if len(piece) > 80 else ''}")
        for key in ("style", "diff", "edits", "problem"):
            if part.get(key):
                lines.append(f"{key:>7}: {' '.join(str(part[key]).split())}")
    if not lines:
        lines.append("(no trajectory recorded)")
    lines.append(f"retrieved {len(turn.retrieved)} item(s):")
    for item in turn.retrieved:
        text = " ".join(item["text"].split())
        lines.append(f"  #{item['id']} {text[:200]}{'…' if len(text) > 200 else ''}")
    return "\n".join(lines)

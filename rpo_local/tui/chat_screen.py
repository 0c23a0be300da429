"""The chat screen: the conversation, the message editor, and the exchange worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static, TextArea

from rpo_local import errors
from rpo_local.errors import RpoError
from rpo_local.reflect import RewriteCancelled
from rpo_local.tui.modals import EditScreen, PickScreen, text_area
from rpo_local.tui.pipeline import Turn
from rpo_local.tui.widgets import AssistantTurn, UserMessage


class Stopped(Exception):
    """Raised from the streaming callback to abandon a reply the user stopped."""


class Coalescer:
    """Batches streamed chunks so the UI repaints at most every `interval` seconds: the model
    thread then never waits on a repaint per token, however fast it generates."""

    def __init__(self, emit: Callable[[str], None], interval: float = 1 / 30) -> None:
        self.emit = emit
        self.interval = interval
        self.pending: list[str] = []
        self.last = 0.0

    def feed(self, chunk: str) -> None:
        self.pending.append(chunk)
        if time.monotonic() - self.last >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            text, self.pending = "".join(self.pending), []
            self.last = time.monotonic()
            self.emit(text)


class ChatScreen(Screen):
    BINDINGS = [
        Binding("ctrl+j", "send", "Send", priority=True),
        Binding("ctrl+n", "new_conversation", "New"),
        Binding("ctrl+o", "open_conversation", "Open"),
        Binding("ctrl+l", "focus_last_turn", "Last reply", show=False),
        Binding("escape", "stop", "Stop", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.busy = False
        self.stop_requested = threading.Event()

    @property
    def pipeline(self):
        return self.app.pipeline  # type: ignore[attr-defined]

    def compose(self) -> ComposeResult:
        yield Header()
        yield VerticalScroll(id="conversation")
        prompt = text_area(id="prompt", placeholder="Type a message; ctrl+j sends it")
        prompt.border_title = "message"
        yield prompt
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.app.chat_screen = self  # type: ignore[attr-defined]
        self.app.apply_blink(self)  # type: ignore[attr-defined]
        self.show_conversation()
        self.query_one("#prompt", TextArea).focus()

    # -- showing the conversation ---------------------------------------------------------------

    def show_conversation(self) -> None:
        box = self.query_one("#conversation", VerticalScroll)
        box.remove_children()
        widgets = []
        for entry in self.pipeline.turns():
            widgets.append(AssistantTurn(entry) if isinstance(entry, Turn) else UserMessage(entry["content"]))
        if not widgets:
            widgets.append(
                Static(
                    f"New conversation as profile {self.pipeline.profile!r}. Each reply is written by "
                    f"the upstream ({self.pipeline.upstream_name()}) and rewritten in your style. "
                    "Tab reaches a reply (g generic, d diff, a/e/r feedback); F1 lists keys, "
                    "ctrl+p commands.",
                    classes="hint", markup=False,
                )
            )
        box.mount_all(widgets)
        box.scroll_end(animate=False)
        self.app.refresh_titles()  # type: ignore[attr-defined]

    def action_focus_last_turn(self) -> None:
        turns = self.query(AssistantTurn)
        if turns:
            turns.last().focus()

    # -- sending ----------------------------------------------------------------------------------

    def action_send(self) -> None:
        prompt = self.query_one("#prompt", TextArea)
        text = prompt.text.strip()
        if not text:
            self.notify("type a message first", severity="warning")
            return
        if self.busy:
            self.notify("still working on the previous reply", severity="warning")
            return
        box = self.query_one("#conversation", VerticalScroll)
        box.query(".hint").remove()
        widget = AssistantTurn(generic="")
        box.mount_all([UserMessage(text), widget])
        widget.set_status("asking the upstream…")
        box.scroll_end(animate=False)
        prompt.clear()
        self.busy = True
        self.stop_requested.clear()
        self.exchange(text, widget)

    def action_stop(self) -> None:
        if self.busy:
            self.stop_requested.set()

    @work(thread=True, exclusive=True, group="exchange", exit_on_error=False)
    def exchange(self, text: str, widget: AssistantTurn) -> None:
        """Upstream reply, then the rewrite streamed token by token into `widget`."""
        call = self.app.call_from_thread
        stored = False
        try:
            self.pipeline.add_user_message(text)
            stored = True
            generic = self.pipeline.generic_reply()
            call(self._personalizing, widget, generic)
            stream = Coalescer(lambda text: call(self._stream, widget, text))
            turn = self.pipeline.personalize(generic, on_text=lambda chunk: self._sink(stream, chunk),
                                             cancelled=self.stop_requested)  # Esc stops at the next token
            stream.flush()
            call(self._finished, widget, turn)
        except (Stopped, RewriteCancelled):
            call(self._failed, widget, text, stored, "stopped: the reply was not kept", "warning")
        except Exception as exc:
            call(self._failed, widget, text, stored, errors.describe_error(exc))

    def _sink(self, stream: Coalescer, chunk: str) -> None:
        """Worker side of streaming: raising here ends the model's generation loop."""
        if self.stop_requested.is_set():
            raise Stopped
        stream.feed(chunk)

    def _personalizing(self, widget: AssistantTurn, generic: str) -> None:
        widget.generic = generic
        widget.set_status("personalizing…")

    def _stream(self, widget: AssistantTurn, chunk: str) -> None:
        widget.append(chunk)
        self.query_one("#conversation", VerticalScroll).scroll_end(animate=False)

    def _finished(self, widget: AssistantTurn, turn: Turn) -> None:
        self.busy = False
        widget.finish(turn)
        self.query_one("#conversation", VerticalScroll).scroll_end(animate=False)
        self.app.refresh_titles()  # type: ignore[attr-defined]

    def _failed(self, widget: AssistantTurn, text: str, stored: bool, message: str, severity: str = "error") -> None:
        self.busy = False
        widget.remove()
        if not stored:  # nothing was saved: give the text back rather than lose it
            self.query_one("#prompt", TextArea).text = text
        self.notify(message, title="no reply", severity=severity, timeout=8)  # type: ignore[arg-type]

    # -- feedback ---------------------------------------------------------------------------------

    def on_assistant_turn_feedback(self, message: AssistantTurn.Feedback) -> None:
        widget = message.turn
        if message.verdict == "edit":
            def saved(text: str | None) -> None:
                if text is not None:
                    self.save_feedback(widget, "edited", text)

            self.app.push_screen(EditScreen(widget.streamed), saved)
        else:
            self.save_feedback(widget, message.verdict)

    def save_feedback(self, widget: AssistantTurn, verdict: str, text: str | None = None) -> None:
        try:
            self.pipeline.feedback(widget.turn, verdict, text)
        except RpoError as exc:
            self.notify(exc.message, severity="error")
            return
        widget.finish(widget.turn)
        self.notify(f"feedback saved: {verdict}", timeout=3)

    # -- conversations ----------------------------------------------------------------------------

    def action_new_conversation(self) -> None:
        if self.busy:
            self.notify("wait for the reply to finish", severity="warning")
            return
        self.pipeline.new_conversation()
        self.show_conversation()
        self.query_one("#prompt", TextArea).focus()

    def action_open_conversation(self) -> None:
        rows = self.pipeline.store.list_conversations(self.pipeline.profile)
        options = [(str(r["id"]), f"{r['title'] or '(untitled)'}  ·  {r['messages']} messages") for r in rows]
        self.app.push_screen(PickScreen(f"Conversations of {self.pipeline.profile}", options), self.open_conversation)

    def open_conversation(self, conversation_id: str | None) -> None:
        if conversation_id is None:
            return
        if self.busy:
            self.notify("wait for the reply to finish", severity="warning")
            return
        try:
            self.pipeline.resume(int(conversation_id))
        except RpoError as exc:
            self.notify(exc.message, severity="error")
            return
        self.show_conversation()

"""Small dialogs: edit a reply, add a history item, pick from a list, confirm."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Select, TextArea
from textual.widgets.option_list import Option

from rpo_local.store import KINDS


def text_area(text: str = "", **kwargs) -> TextArea:
    """A prose editor: soft wrap, no line numbers, no syntax highlighting."""
    return TextArea(text, soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)


class _TextDialog(ModalScreen):
    """A dialog around a text editor: ctrl+s saves a non-empty text, escape cancels (None)."""

    BINDINGS = [Binding("ctrl+s", "save", "Save", priority=True), Binding("escape", "cancel", "Cancel")]
    EMPTY_HINT = "the text is empty; press escape to cancel"

    def on_mount(self) -> None:
        self.app.apply_blink(self)  # type: ignore[attr-defined]
        self.query_one(TextArea).focus()

    def result(self, text: str) -> object:
        return text

    def action_save(self) -> None:
        text = self.query_one(TextArea).text.strip()
        if not text:
            self.notify(self.EMPTY_HINT, severity="warning")
            return
        self.dismiss(self.result(text))

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()


class EditScreen(_TextDialog):
    """Edit a reply; dismisses with the new text (None: cancelled)."""

    def __init__(self, text: str, title: str = "Edit the reply (it becomes feedback and history)") -> None:
        super().__init__()
        self.text = text
        self.title_text = title

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield text_area(self.text, id="editor")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save ^s", variant="primary", id="save", compact=True)
                yield Button("Cancel esc", id="cancel", compact=True)


class AddItemScreen(_TextDialog):
    """Add one history item; dismisses with {"text", "kind"} (None: cancelled)."""

    EMPTY_HINT = "write the text first, or press escape"

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Add to history: something you wrote", classes="dialog-title")
            yield text_area(id="editor")
            with Horizontal(classes="dialog-buttons"):
                yield Select([(k, k) for k in KINDS], value="note", allow_blank=False, id="kind", compact=True)
                yield Button("Save ^s", variant="primary", id="save", compact=True)
                yield Button("Cancel esc", id="cancel", compact=True)

    def result(self, text: str) -> dict:
        return {"text": text, "kind": self.query_one(Select).value}


class PickScreen(ModalScreen[str | None]):
    """Choose one option (dismisses with its id); with `new_label`, a typed new name also works."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, options: list[tuple[str, str]], *, new_label: str | None = None) -> None:
        super().__init__()
        self.title_text = title
        self.options = options
        self.new_label = new_label

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            if self.options:
                yield OptionList(*[Option(label, id=oid) for oid, label in self.options], id="choices")
            else:
                yield Label("(nothing here yet)", classes="empty")
            if self.new_label:
                yield Input(placeholder=self.new_label, id="new-name")

    def on_mount(self) -> None:
        self.app.apply_blink(self)  # type: ignore[attr-defined]
        target = self.query("#choices") or self.query("#new-name")
        if target:
            target.first().focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.dismiss(event.value.strip())

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog confirm"):
            yield Label(self.question, classes="dialog-title")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Yes (y)", variant="error", id="yes", compact=True)
                yield Button("No (n)", id="no", compact=True)

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

"""`rpo chat`: the Textual app. Three modes (chat, history, adapters) over one ChatPipeline.

Model work runs in thread workers that stream back with `call_from_thread`, so the UI never
waits on the model; every failure ends as a notification, never as a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Input, TextArea

from rpo_local import errors
from rpo_local.errors import RpoError
from rpo_local.tui.adapters_screen import AdaptersScreen
from rpo_local.tui.chat_screen import ChatScreen
from rpo_local.tui.history_screen import HistoryScreen
from rpo_local.tui.modals import PickScreen
from rpo_local.tui.pipeline import ChatPipeline
from rpo_local.tui.training import train_command


class ChatApp(App):
    CSS_PATH = "chat.tcss"
    TITLE = "rpo chat"
    MODES = {"chat": ChatScreen, "history": HistoryScreen, "adapters": AdaptersScreen}
    DEFAULT_MODE = "chat"
    BINDINGS = [
        Binding("f2", "switch_mode('chat')", "Chat"),
        Binding("f3", "switch_mode('history')", "History"),
        Binding("f4", "switch_mode('adapters')", "Adapters"),
        Binding("f5", "switch_profile", "Profile"),
        Binding("f1", "toggle_keys", "Keys", show=False),
    ]

    def __init__(
        self,
        pipeline: ChatPipeline,
        *,
        cursor_blink: bool = True,
        train_command: Callable[[str], list[str]] = train_command,
    ) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.cursor_blink = cursor_blink
        self.train_command = train_command
        self.chat_screen: ChatScreen | None = None  # set by the chat screen when it mounts

    def on_mount(self) -> None:
        self.refresh_titles()
        self.load_models()

    def apply_blink(self, screen: Screen) -> None:
        """Honour `cursor_blink` (off in snapshot tests) in a screen's editors."""
        if self.cursor_blink:
            return
        for widget in [*screen.query(Input), *screen.query(TextArea)]:
            widget.cursor_blink = False

    def refresh_titles(self) -> None:
        pipeline = self.pipeline
        try:
            adapter = pipeline.adapter_name()
        except Exception as exc:
            adapter = f"? ({errors.describe_error(exc)})"
        self.sub_title = f"{pipeline.profile} · adapter {adapter} · upstream {pipeline.upstream_name()}"

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def load_models(self) -> None:
        """Open the upstream and the reflection model in the background, so the first reply is quick."""
        try:
            self.pipeline.ensure_ready()
        except Exception as exc:
            self.call_from_thread(
                self.notify, errors.describe_error(exc), title="model not loaded", severity="error", timeout=10
            )
            return
        self.call_from_thread(self.refresh_titles)

    @work(thread=True, exclusive=True, group="adapter", exit_on_error=False)
    def apply_adapter(self) -> None:
        """Load the profile's adapter into the running model (reading a LoRA takes a moment)."""
        try:
            self.pipeline.apply_adapter()
        except Exception as exc:
            self.call_from_thread(self.notify, f"adapter not applied: {errors.describe_error(exc)}", severity="error")
            return
        self.call_from_thread(self.refresh_titles)

    def action_toggle_keys(self) -> None:
        if self.screen.query("HelpPanel"):
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    # -- profiles ---------------------------------------------------------------------------------

    def action_switch_profile(self) -> None:
        profiles = self.pipeline.store.list_profiles()
        options = [(p["name"], f"{p['name']}  ·  {p['items']} items") for p in profiles]
        self.push_screen(
            PickScreen("Switch profile", options, new_label="…or type a new profile name and press enter"),
            self.switch_profile,
        )

    def switch_profile(self, name: str | None) -> None:
        if name is None or name == self.pipeline.profile:
            return
        chat = self.chat_screen
        if chat is not None and chat.busy:
            self.notify("wait for the reply to finish", severity="warning")
            return
        try:
            self.pipeline.switch_profile(name)
        except RpoError as exc:
            self.notify(exc.message, severity="error")
            return
        self.notify(f"profile: {self.pipeline.profile}", timeout=3)
        self.apply_adapter()
        if chat is not None:
            chat.show_conversation()
        if isinstance(self.screen, (HistoryScreen, AdaptersScreen)):
            self.screen.reload()
        self.refresh_titles()


    # -- command palette --------------------------------------------------------------------------

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        chat = lambda action: lambda: self._in_chat(action)  # noqa: E731
        yield SystemCommand("New conversation", "Start a new conversation", chat("new_conversation"))
        yield SystemCommand("Open conversation", "Resume a saved conversation", chat("open_conversation"))
        yield SystemCommand("Switch profile", "Chat as another profile (or create one)", self.action_switch_profile)
        yield SystemCommand("History", "Browse and search the profile's writing", lambda: self.switch_mode("history"))
        yield SystemCommand("Adapters", "List, activate and roll back adapters", lambda: self.switch_mode("adapters"))
        yield SystemCommand("Fine-tune", "Start a fine-tuning run for this profile", self._start_training)

    def _in_chat(self, action: str) -> None:
        async def run() -> None:
            await self.switch_mode("chat")
            await self.screen.run_action(action)

        self.call_later(run)

    def _start_training(self) -> None:
        async def run() -> None:
            await self.switch_mode("adapters")
            await self.screen.run_action("train")

        self.call_later(run)

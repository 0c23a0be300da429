"""The adapters screen: the profile's adapters with their figures, activate/rollback, and a
fine-tuning run with its progress bar and loss shown live."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, ProgressBar, Sparkline, Static

from rpo_local.errors import RpoError
from rpo_local.tui.training import TrainProcess, format_eta


def figures(adapter: dict) -> str:
    """A few numbers from the adapter's evaluation (else its training summary)."""
    source = adapter.get("eval") or adapter.get("train_summary") or {}
    nums = [(k, v) for k, v in source.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in nums[:3]) or "-"


class AdaptersScreen(Screen):
    BINDINGS = [
        Binding("a", "activate", "Activate"),
        Binding("n", "use_none", "No adapter"),
        Binding("b", "rollback", "Rollback"),
        Binding("t", "train", "Fine-tune"),
        Binding("c", "cancel_training", "Cancel run", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.training: TrainProcess | None = None
        self.losses: list[float] = []

    @property
    def pipeline(self):
        return self.app.pipeline  # type: ignore[attr-defined]

    def compose(self) -> ComposeResult:
        yield Header()
        table: DataTable = DataTable(id="adapters", cursor_type="row", zebra_stripes=True)
        for label, key, width in (("", "on", 1), ("#", "id", 3), ("name", "name", 22), ("scope", "scope", 8),
                                  ("created", "created", 10), ("figures", "figures", None)):
            table.add_column(label, key=key, width=width)
        yield table
        yield Static("", id="active", markup=False)
        with Vertical(id="training") as panel:
            panel.border_title = "fine-tuning"
            yield Label("No run yet: press t to fine-tune on this profile's history and feedback.",
                        id="train-status", markup=False)
            yield ProgressBar(total=None, show_eta=False, id="train-progress", classes="run-only")
            yield Sparkline([], id="loss", classes="run-only")
        yield Footer(compact=True)

    def on_screen_resume(self) -> None:
        self.reload()
        self.query_one("#adapters", DataTable).focus()

    def on_unmount(self) -> None:
        if self.training is not None:
            self.training.cancel()

    def reload(self) -> None:
        store, profile = self.pipeline.store, self.pipeline.profile
        try:
            adapters = store.list_adapters(profile)
            active = store.active_adapter(profile)
        except RpoError as exc:
            self.notify(exc.message, severity="error")
            return
        table = self.query_one("#adapters", DataTable)
        table.clear()
        for a in adapters:
            on = "●" if active and active["id"] == a["id"] else ""
            scope = "profile" if a["profile_id"] else "general"
            table.add_row(on, str(a["id"]), a["name"], scope, a["created_at"][:10], figures(a), key=str(a["id"]))
        table.border_title = f"adapters for {profile}"
        hint = "" if adapters else "  (none trained yet: press t)"
        style = self.pipeline.style_name()
        style_note = f"  style vector: {style}" if style else ""
        self.query_one("#active", Static).update(f"in use: {self.pipeline.adapter_name()}{hint}{style_note}")

    def selected_id(self) -> int | None:
        table = self.query_one("#adapters", DataTable)
        if not table.row_count:
            return None
        return int(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    # -- activation -------------------------------------------------------------------------------

    def action_activate(self) -> None:
        adapter_id = self.selected_id()
        if adapter_id is None:
            self.notify("no adapter to activate yet: fine-tune one with t", severity="warning")
            return
        self._change(lambda: self.pipeline.store.set_active_adapter(self.pipeline.profile, adapter_id))

    def action_use_none(self) -> None:
        self._change(lambda: self.pipeline.store.set_active_adapter(self.pipeline.profile, None))

    def action_rollback(self) -> None:
        self._change(lambda: self.pipeline.store.rollback_adapter(self.pipeline.profile))

    def _change(self, change) -> None:
        try:
            change()
        except RpoError as exc:
            self.notify(exc.message, severity="error")
            return
        self.reload()
        self.app.apply_adapter()  # type: ignore[attr-defined]

    # -- fine-tuning ------------------------------------------------------------------------------

    def action_train(self) -> None:
        if self.training is not None:
            self.notify("a fine-tuning run is already going (c cancels it)", severity="warning")
            return
        command = self.app.train_command(self.pipeline.profile)  # type: ignore[attr-defined]
        self.training = TrainProcess(command)
        self.losses = []
        self.query_one("#train-progress", ProgressBar).update(total=None, progress=0)
        self.query_one("#loss", Sparkline).data = []
        self.query_one("#training").add_class("running")
        self.query_one("#train-status", Label).update(f"starting fine-tuning for {self.pipeline.profile}…")
        self.train(self.training)

    def action_cancel_training(self) -> None:
        if self.training is None:
            return
        self.training.cancel()
        self.notify("cancelling the fine-tuning run", timeout=3)

    @work(thread=True, group="train", exit_on_error=False)
    def train(self, process: TrainProcess) -> None:
        call = self.app.call_from_thread
        try:
            code = process.run(lambda event: call(self.on_train_event, event))
        except OSError as exc:
            code = -1
            process.tail.append(f"cannot start: {exc}")
        call(self.train_finished, process, code)

    def on_train_event(self, event: dict) -> None:
        status = self.query_one("#train-status", Label)
        if event["event"] == "step":
            self.query_one("#train-progress", ProgressBar).update(total=event.get("total"), progress=event.get("step", 0))
            if isinstance(event.get("loss"), (int, float)):
                self.losses.append(float(event["loss"]))
                self.query_one("#loss", Sparkline).data = list(self.losses)
            status.update(
                f"step {event.get('step')}/{event.get('total')}  loss {event.get('loss', float('nan')):.4f}  "
                f"eta {format_eta(event.get('eta_s'))}"
            )
        elif event["event"] == "done":
            bar = self.query_one("#train-progress", ProgressBar)
            bar.update(total=bar.total or 1, progress=bar.total or 1)
            status.update("fine-tuning finished; registering the adapter…")
        elif event["event"] == "log":
            status.update(event["message"][:200])

    def train_finished(self, process: TrainProcess, code: int) -> None:
        self.training = None
        status = self.query_one("#train-status", Label)
        if process.cancelled:
            status.update("fine-tuning cancelled")
        elif code == 0:
            loss = f", final loss {self.losses[-1]:.4f}" if self.losses else ""
            status.update(f"fine-tuning done{loss}")
            self.notify("fine-tuning done", timeout=4)
            self.reload()
            self.app.apply_adapter()  # type: ignore[attr-defined]
        else:
            message = process.failure(code)
            status.update(message)
            self.notify(message, title="fine-tuning failed", severity="error", timeout=10)

"""The history screen: browse and full-text search the profile's writing; add and forget items."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static

from rpo_local.errors import RpoError
from rpo_local.tui.modals import AddItemScreen, ConfirmScreen

LIST_LIMIT = 500


def one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


class HistoryScreen(Screen):
    BINDINGS = [
        Binding("ctrl+f", "focus_search", "Search"),
        Binding("ctrl+n", "add_item", "Add item"),
        Binding("delete", "forget_item", "Forget"),
    ]

    @property
    def pipeline(self):
        return self.app.pipeline  # type: ignore[attr-defined]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="Search history (every word must match)", id="search")
        table: DataTable = DataTable(id="items", cursor_type="row", zebra_stripes=True)
        table.add_column("#", key="id", width=5)
        table.add_column("kind", key="kind", width=7)
        table.add_column("text", key="text")
        yield table
        yield Static("", id="preview", markup=False)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.app.apply_blink(self)  # type: ignore[attr-defined]

    def on_screen_resume(self) -> None:
        self.reload()
        self.query_one("#items", DataTable).focus()

    def reload(self) -> None:
        query = self.query_one("#search", Input).value.strip()
        store, profile = self.pipeline.store, self.pipeline.profile
        try:
            rows = store.search_items(profile, query, limit=LIST_LIMIT) if query else store.list_items(
                profile, limit=LIST_LIMIT
            )
            total = store.count_items(profile)
        except RpoError as exc:
            self.notify(exc.message, severity="error")
            return
        table = self.query_one("#items", DataTable)
        table.clear()
        width = max(20, self.size.width - 20)
        for row in rows:
            table.add_row(str(row["id"]), row["kind"], one_line(row["text"], width), key=str(row["id"]))
        shown = f"{len(rows)} match(es) for {query!r}" if query else f"{total} item(s)"
        table.border_title = f"history of {profile}: {shown}"
        self._preview()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "search":
            self.reload()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one("#items", DataTable).focus()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._preview()

    def selected_id(self) -> int | None:
        table = self.query_one("#items", DataTable)
        if not table.row_count:
            return None
        return int(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    def _preview(self) -> None:
        item_id = self.selected_id()
        preview = self.query_one("#preview", Static)
        if item_id is None:
            preview.update("no items: ctrl+n adds one")
            return
        item = self.pipeline.store.get_item(item_id)
        origin = f" · from {item['source']}" if item["source"] else ""
        preview.update(f"#{item['id']} {item['kind']}{origin}\n{item['text']}")

    def action_focus_search(self) -> None:
        self.query_one("#search", Input).focus()

    def action_add_item(self) -> None:
        def added(data: dict | None) -> None:
            if data is None:
                return
            try:
                item_id = self.pipeline.store.add_item(self.pipeline.profile, data["text"], kind=data["kind"], source="chat")
            except RpoError as exc:
                self.notify(exc.message, severity="error")
                return
            self.notify("added to history" if item_id else "already in history", timeout=3)
            self.reload()

        self.app.push_screen(AddItemScreen(), added)

    def action_forget_item(self) -> None:
        item_id = self.selected_id()
        if item_id is None:
            return

        def confirmed(yes: bool | None) -> None:
            if not yes:
                return
            try:
                self.pipeline.store.forget_item(item_id)
            except RpoError as exc:
                self.notify(exc.message, severity="error")
                return
            self.notify(f"forgot item #{item_id}", timeout=3)
            self.reload()

        self.app.push_screen(ConfirmScreen(f"Forget item #{item_id} for good?"), confirmed)

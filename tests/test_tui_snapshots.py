"""Snapshots of `rpo chat`'s screens (pytest-textual-snapshot), one class per screen/feature.

Deterministic: a fresh database per test with fixed sample data, fixed dates where a screen
shows one, fake upstream and engine, no cursor blink, 80x24 unless a test says otherwise.
Update with `pytest tests/test_tui_snapshots.py --snapshot-update` and look at the SVGs.
"""

from __future__ import annotations

import pytest
from tui_helpers import FakeUpstream, make_app, seed, send


@pytest.fixture(autouse=True)
def no_builtin_adapter(monkeypatch):
    """The screens must not depend on whether the package ships a general adapter."""
    monkeypatch.setattr("rpo_local.adapters.builtins_for", lambda model_path=None: [])


@pytest.fixture
def app(store, fake_engine):
    seed(store)
    return make_app(store, fake_engine)


async def focus_reply(pilot) -> None:
    from rpo_local.tui.widgets import AssistantTurn

    await send(pilot.app, pilot, "Is the ramen near the station any good?")
    pilot.app.screen.query(AssistantTurn).last().focus()
    await pilot.pause()


class TestChatScreen:
    def test_new_conversation(self, snap_compare, app):
        assert snap_compare(app)

    def test_personalized_reply(self, snap_compare, app):
        assert snap_compare(app, run_before=focus_reply)

    def test_generic_view(self, snap_compare, app):
        assert snap_compare(app, run_before=focus_reply, press=["g"])

    def test_word_diff(self, snap_compare, app):
        assert snap_compare(app, run_before=focus_reply, press=["d"])

    def test_trajectory_panel(self, snap_compare, app):
        assert snap_compare(app, run_before=focus_reply, press=["t"], terminal_size=(100, 30))

    def test_generic_kept(self, snap_compare, store):
        """The model gives no usable answer: header and footer both say the generic reply was kept."""
        from fakes import FakeEngine

        seed(store)
        app = make_app(store, FakeEngine(lambda prompt: "writes in lowercase</style>"))
        assert snap_compare(app, run_before=focus_reply)


class TestFeedback:
    def test_edit_dialog(self, snap_compare, app):
        assert snap_compare(app, run_before=focus_reply, press=["e"])

    def test_accepted(self, snap_compare, app):
        async def accept(pilot) -> None:
            await focus_reply(pilot)
            await pilot.press("a")
            await pilot.pause()
            pilot.app.clear_notifications()

        assert snap_compare(app, run_before=accept)


class TestHistoryScreen:
    def test_list(self, snap_compare, app):
        assert snap_compare(app, press=["f3"])

    def test_search(self, snap_compare, app):
        assert snap_compare(app, press=["f3", "ctrl+f", *"ramen"])

    def test_add_dialog(self, snap_compare, app):
        assert snap_compare(app, press=["f3", "ctrl+n", *"a new note"])

    def test_forget_confirmation(self, snap_compare, app):
        assert snap_compare(app, press=["f3", "delete"])


class TestAdaptersScreen:
    @pytest.fixture
    def adapters(self, store, tmp_path):
        first = store.register_adapter("alice-sft-1", tmp_path / "a1.gguf", profile="alice", eval={"rougeL": 0.312, "meteor": 0.2})
        store.register_adapter("general-lamp7", tmp_path / "g.gguf", train_summary={"steps": 300, "loss": 1.23})
        store.db.execute("update adapters set created_at = '2026-01-02T03:04:05+00:00'")
        store.set_active_adapter("alice", first)

    def test_list(self, snap_compare, app, adapters):
        assert snap_compare(app, press=["f4"])

    def test_training_live(self, snap_compare, app, adapters):
        async def train(pilot) -> None:
            await pilot.press("f4")
            screen = pilot.app.screen
            screen.query_one("#training").add_class("running")
            for step, loss in enumerate([2.4, 2.1, 1.7, 1.6, 1.2], 1):
                screen.on_train_event({"event": "step", "step": step, "total": 10, "loss": loss, "eta_s": 50 - 5 * step})
            await pilot.pause()

        assert snap_compare(app, run_before=train)


class TestPickers:
    def test_profiles(self, snap_compare, app, store):
        seed(store, "bob")
        assert snap_compare(app, press=["f5"])

    def test_conversations(self, snap_compare, app):
        async def two_chats(pilot) -> None:
            await send(pilot.app, pilot, "Is the ramen good?")
            await pilot.press("ctrl+n")
            await send(pilot.app, pilot, "What about pizza?")
            await pilot.press("ctrl+o")

        assert snap_compare(app, run_before=two_chats)


class TestErrors:
    def test_upstream_down(self, snap_compare, store, fake_engine):
        seed(store)
        app = make_app(store, fake_engine, upstream=FakeUpstream(fail=True))
        assert snap_compare(app, run_before=lambda pilot: send(pilot.app, pilot, "Anyone there?"))


class TestNoColor:
    def test_diff_without_colour(self, snap_compare, store, fake_engine, monkeypatch):
        monkeypatch.setenv("NO_COLOR", "1")
        seed(store)
        app = make_app(store, fake_engine)
        assert app.no_color
        assert snap_compare(app, run_before=focus_reply, press=["d"])

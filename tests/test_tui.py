"""`rpo chat`: the pipeline, the diff, the training progress reader, and the Textual app driven
by Pilot (fake upstream + fake engine), plus one end-to-end run on the real embedded model."""

from __future__ import annotations

import asyncio
import sys
import textwrap

import pytest
from tui_helpers import FakeUpstream, generic_answer, loopback_upstream, make_app, seed, send, settle

from rpo_local.config import Config
from rpo_local.errors import InputError
from rpo_local.tui.diff import change_ratio, diff_text, word_diff
from rpo_local.tui.training import TrainProcess, format_eta, parse_event


def run(scenario) -> None:
    asyncio.run(scenario())


# -- library pieces ----------------------------------------------------------------------------


def test_word_diff_rebuilds_both_sides():
    old, new = "Thank you for the report. I will read it today.", "thx for the report, will read it tonight"
    ops = word_diff(old, new)
    assert "".join(t for op, t in ops if op != "insert") == old
    assert "".join(t for op, t in ops if op != "delete") == new
    plain = diff_text(old, new).plain
    assert "[-today.-]" in plain and "{+tonight+}" in plain and "report" in plain
    assert word_diff("same words", "same words") == [("equal", "same words")]
    assert change_ratio("a b c", "a b c") == 0 and change_ratio("a b", "c d") == 1


def test_parse_event_and_eta():
    assert parse_event('{"event":"step","step":2,"total":5,"loss":1.5,"eta_s":3}')["loss"] == 1.5
    assert parse_event("Loading weights…") == {"event": "log", "message": "Loading weights…"}
    assert parse_event("[1, 2]")["event"] == "log"
    assert format_eta(75) == "1m15s" and format_eta(9.6) == "9s" and format_eta(None) == "?"


def test_train_process_reads_a_real_child_process():
    script = textwrap.dedent(
        """
        import json, sys
        print("warming up", file=sys.stderr)
        sys.stderr.write("sft: 10%|#   | 1/10\\r")  # a progress bar sharing the line
        for i in range(1, 4):
            print(json.dumps({"event": "step", "step": i, "total": 3, "loss": 2.0 / i, "eta_s": 3 - i}), file=sys.stderr)
        print(json.dumps({"event": "done", "adapter": "x"}), file=sys.stderr)
        print("the result on stdout is ignored")
        """
    )
    events: list[dict] = []
    proc = TrainProcess([sys.executable, "-c", script])
    assert proc.run(events.append) == 0
    assert [e["event"] for e in events] == ["log", "log", "step", "step", "step", "done"]
    failing = TrainProcess([sys.executable, "-c", "import sys; print('no data for profile', file=sys.stderr); sys.exit(5)"])
    code = failing.run(lambda e: None)
    assert code == 5 and "no data for profile" in failing.failure(code)


def test_pipeline_stores_the_exchange(store, fake_engine):
    from rpo_local.reflect import Reflector
    from rpo_local.tui.pipeline import ChatPipeline

    seed(store)
    upstream = FakeUpstream()
    pipe = ChatPipeline(store, Config(), "alice", upstream=upstream, reflector=Reflector(store, fake_engine, Config()))
    with pytest.raises(InputError):
        pipe.add_user_message("   ")
    streamed: list[str] = []
    turn = pipe.send("Is the ramen good?", on_text=streamed.append)
    assert "".join(streamed) == turn.rewrite == generic_answer("Is the ramen good?").lower()
    second = pipe.send("And the pizza?")
    # The upstream saw the conversation so far, ending with the new question.
    assert [m["role"] for m in upstream.calls[-1]] == ["system", "user", "assistant", "user"]
    assert upstream.calls[-1][2]["content"] == turn.rewrite
    pipe.feedback(second, "edited", "pizza is fine lol")
    rows = store.get_messages(pipe.conversation_id)
    assert [r["role"] for r in rows] == ["user", "assistant", "user", "assistant"]
    assert rows[3]["content"] == "pizza is fine lol" and rows[3]["verdict"] == "edited"
    assert rows[1]["generic"] == generic_answer("Is the ramen good?")
    assert store.get_interaction(rows[1]["interaction_id"])["source"] == "chat"
    assert store.list_conversations("alice")[0]["title"] == "Is the ramen good?"
    resumed = ChatPipeline(store, Config(), "alice", upstream=upstream, reflector=pipe.reflector)
    assert resumed.resume() == pipe.conversation_id
    turns = resumed.turns()
    first_piece = turns[1].trajectory[0]  # two sentences: one trajectory per piece
    assert turns[3].verdict == "edited" and turns[1].retrieved and first_piece["style"]


# -- the app, driven by Pilot -----------------------------------------------------------------


def test_send_toggle_edit_accept_and_store_agrees(store, fake_engine):
    from textual.widgets import TextArea

    from rpo_local.tui.modals import EditScreen
    from rpo_local.tui.widgets import AssistantTurn, UserMessage

    seed(store)
    app = make_app(store, fake_engine)

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await send(app, pilot, "Is the ramen good?")
            turn = app.screen.query_one(AssistantTurn)
            generic = generic_answer("Is the ramen good?")
            assert turn.shown == generic.lower()  # the personalized reply, not the generic one
            assert str(app.screen.query_one(UserMessage).render()) == "Is the ramen good?"
            assert app.screen.query_one("#prompt", TextArea).text == ""

            turn.focus()
            await pilot.press("g")
            assert turn.shown == generic and turn.view == "generic"
            await pilot.press("g")
            assert turn.shown == generic.lower()
            await pilot.press("d")
            assert "[-Thank-]{+thank+}" in turn.shown
            await pilot.press("d", "t")
            assert not turn.query_one("Collapsible").collapsed
            assert "writes in lowercase" in str(turn.query_one(".details-body").render())

            await pilot.press("e")
            assert isinstance(app.screen, EditScreen)
            app.screen.query_one(TextArea).text = "yes lol the ramen rules"
            await pilot.press("ctrl+s")
            await pilot.pause()
            assert turn.shown == "yes lol the ramen rules" and turn.turn.verdict == "edited"

            await send(app, pilot, "And the pizza?")
            second = app.screen.query(AssistantTurn).last()
            await pilot.click(second.query_one(".btn-accept"))
            await pilot.pause()
            assert second.turn.verdict == "accepted"
            assert second.query_one(".btn-accept").disabled
            shown = [t.streamed for t in app.screen.query(AssistantTurn)]

        conv = store.latest_conversation("alice")
        rows = store.get_messages(conv["id"])
        assert [r["content"] for r in rows if r["role"] == "assistant"] == shown
        assert [r["verdict"] for r in rows if r["role"] == "assistant"] == ["edited", "accepted"]
        items = [i["text"] for i in store.list_items("alice", kind="edit")]
        assert "yes lol the ramen rules" in items and shown[1] in items

    run(scenario)


@pytest.mark.parametrize(("answers", "kind"), [(True, "personalized"), (False, "generic kept")])
def test_header_and_footer_say_the_same_outcome(store, answers, kind):
    """A fallback reply is never titled "personalized" while its footer says "generic kept"."""
    from fakes import FakeEngine, lowercasing_responder

    from rpo_local.tui.widgets import AssistantTurn

    seed(store)
    no_answer = lambda prompt: "writes in lowercase</style>"  # noqa: E731 - the model never answers
    app = make_app(store, FakeEngine(lowercasing_responder if answers else no_answer))

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await send(app, pilot, "Is the ramen good?")
            turn = app.screen.query_one(AssistantTurn)
            assert turn.turn.fallback is not answers
            assert turn.border_title == f"assistant · {kind}" and turn.border_subtitle.startswith(f"{kind}: ")
            turn.focus()
            await pilot.press("g")
            assert turn.border_title == "assistant · generic" and turn.border_subtitle.startswith(f"{kind}: ")

    run(scenario)


def test_upstream_down_is_a_notification_not_a_crash(store, fake_engine):
    from rpo_local.tui.widgets import AssistantTurn

    seed(store)
    app = make_app(store, fake_engine, upstream=FakeUpstream(fail=True))

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await send(app, pilot, "Anyone there?")
            assert not app.screen.query(AssistantTurn)
            assert any("unreachable" in n.message and n.severity == "error" for n in app._notifications)
            assert app.is_running
            app.pipeline.upstream = FakeUpstream()  # the upstream comes back
            await send(app, pilot, "Now?")
            assert len(app.screen.query(AssistantTurn)) == 1

        rows = store.get_messages(store.latest_conversation("alice")["id"])
        assert [r["content"] for r in rows] == ["Anyone there?", "Now?", generic_answer("Now?").lower()]

    run(scenario)


def test_history_search_add_forget(store, fake_engine):
    from textual.widgets import DataTable, Input, TextArea

    seed(store)
    app = make_app(store, fake_engine)

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("f3")
            await pilot.pause()
            table = app.screen.query_one("#items", DataTable)
            assert table.row_count == len(store.list_items("alice"))
            await pilot.press("ctrl+f", *"pizz")
            await pilot.pause()
            assert app.screen.query_one("#search", Input).value == "pizz"
            ids = [int(k.value) for k in table.rows]
            assert ids == [r["id"] for r in store.search_items("alice", "pizz")] and len(ids) == 1
            assert "pineapple" in str(app.screen.query_one("#preview").render())

            await pilot.press("ctrl+n")
            await pilot.pause()
            app.screen.query_one(TextArea).text = "pizza night is sacred, no exceptions"
            await pilot.press("ctrl+s")
            await pilot.pause()
            assert table.row_count == 2  # the search still applies and finds the new item

            table.focus()
            table.move_cursor(row=[int(k.value) for k in table.rows].index(ids[0]))
            await pilot.press("delete")
            await pilot.pause()
            await pilot.press("y")
            await pilot.pause()
            assert table.row_count == 1

        texts = [i["text"] for i in store.list_items("alice")]
        assert "pizza night is sacred, no exceptions" in texts
        assert not any("pineapple" in t for t in texts)

    run(scenario)


def test_resume_switch_profile_and_palette(store, fake_engine):
    from rpo_local.tui.pipeline import ChatPipeline
    from rpo_local.tui.widgets import AssistantTurn

    seed(store)
    seed(store, "bob")
    first = make_app(store, fake_engine)

    async def chat_once() -> None:
        async with first.run_test(size=(80, 24)) as pilot:
            await send(first, pilot, "Is the ramen good?")
            first.screen.query_one(AssistantTurn).focus()
            await pilot.press("r")
            await pilot.pause()

    run(chat_once)
    app = make_app(store, fake_engine)
    assert isinstance(app.pipeline, ChatPipeline) and app.pipeline.resume() is not None

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            turns = app.screen.query(AssistantTurn)
            assert len(turns) == 1 and turns.first().turn.verdict == "rejected"
            assert turns.first().query_one(".btn-reject").disabled
            await pilot.press("f5")
            await pilot.pause()
            await pilot.press("down", "enter")  # profiles are listed by name: alice, bob
            await settle(app, pilot)
            assert app.pipeline.profile == "bob" and "bob" in app.sub_title
            assert not app.screen.query(AssistantTurn)  # a fresh conversation for bob
            await pilot.press("ctrl+p")
            await pilot.pause()
            await pilot.press(*"History", "enter")
            await pilot.pause()
            assert app.current_mode == "history"

    run(scenario)


def test_adapters_activate_rollback_and_live_training(store, fake_engine, tmp_path):
    from textual.widgets import DataTable, ProgressBar, Sparkline

    seed(store)
    a1 = store.register_adapter("alice-sft-1", tmp_path / "a1.gguf", profile="alice", eval={"rougeL": 0.31})
    store.register_adapter("alice-sft-2", tmp_path / "a2.gguf", profile="alice", eval={"rougeL": 0.35})
    script = textwrap.dedent(
        """
        import json, sys, time
        for i in range(1, 5):
            print(json.dumps({"event": "step", "step": i, "total": 4, "loss": 3.0 - i * 0.5, "eta_s": 4 - i}),
                  file=sys.stderr, flush=True)
            time.sleep(0.05)
        print(json.dumps({"event": "done"}), file=sys.stderr)
        """
    )
    app = make_app(store, fake_engine, train_command=lambda profile: [sys.executable, "-c", script])

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("f4")
            await pilot.pause()
            table = app.screen.query_one("#adapters", DataTable)
            assert table.row_count == 2
            await pilot.press("a")  # the cursor is on the first adapter
            await settle(app, pilot)
            assert store.active_adapter("alice")["id"] == a1
            assert fake_engine.adapter_path == tmp_path / "a1.gguf"
            assert "alice-sft-1" in app.sub_title
            await pilot.press("down", "a")
            await settle(app, pilot)
            await pilot.press("b")
            await settle(app, pilot)
            assert store.active_adapter("alice")["id"] == a1 and fake_engine.adapter_path == tmp_path / "a1.gguf"

            await pilot.press("t")
            await settle(app, pilot)
            bar = app.screen.query_one("#train-progress", ProgressBar)
            assert (bar.progress, bar.total) == (4, 4)
            assert list(app.screen.query_one("#loss", Sparkline).data) == [2.5, 2.0, 1.5, 1.0]
            assert "done" in str(app.screen.query_one("#train-status").render())

    run(scenario)


def test_training_failure_is_reported(store, fake_engine):
    seed(store)
    app = make_app(
        store, fake_engine,
        train_command=lambda p: [sys.executable, "-c", "import sys; print('Error: no feedback yet', file=sys.stderr); sys.exit(3)"],
    )

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("f4")
            await pilot.pause()
            await pilot.press("t")
            await settle(app, pilot)
            assert any("no feedback yet" in n.message for n in app._notifications)
            assert app.is_running

    run(scenario)


def test_chat_verb_refuses_a_pipe(rpo_home):
    from typer.testing import CliRunner

    from rpo_local.cli import app as cli_app

    result = CliRunner().invoke(cli_app, ["chat"], input="hello\n")
    assert result.exit_code != 0 and "interactive terminal" in str(result.exception or result.output)


# -- end to end: the real embedded model, a real HTTP upstream on loopback, a real SQLite file -----


@pytest.mark.model
def test_real_model_end_to_end(store, real_engine, monkeypatch):
    from rpo_local.reflect import Reflector
    from rpo_local.tui.app import ChatApp
    from rpo_local.tui.pipeline import ChatPipeline
    from rpo_local.tui.widgets import AssistantTurn

    seed(store)
    config = Config()
    chunks: list[str] = []
    original = AssistantTurn.append

    def spy(self, text: str) -> None:
        chunks.append(text)
        original(self, text)

    monkeypatch.setattr(AssistantTurn, "append", spy)
    with loopback_upstream() as (url, requests):
        pipeline = ChatPipeline(store, config, "alice", upstream_url=url, reflector=Reflector(store, real_engine, config))
        app = ChatApp(pipeline, cursor_blink=False)

        async def scenario() -> None:
            async with app.run_test(size=(80, 24)) as pilot:
                await settle(app, pilot)  # the background load opens the HTTP upstream
                await send(app, pilot, "Is the ramen near the station any good?")
                turn = app.screen.query_one(AssistantTurn)
                assert turn.turn is not None and turn.shown == turn.turn.rewrite
                turn.focus()
                await pilot.press("a")
                await pilot.pause()

        run(scenario)
    assert requests and requests[0]["messages"][-1]["content"] == "Is the ramen near the station any good?"
    rows = store.get_messages(store.latest_conversation("alice")["id"])
    assert rows[1]["generic"] == generic_answer("Is the ramen near the station any good?")
    assert rows[1]["verdict"] == "accepted"
    assert "".join(chunks).strip() == rows[1]["content"].strip()  # streamed == stored == shown
    interaction = store.get_interaction(rows[1]["interaction_id"])
    assert interaction["model"] == real_engine.model_path.name and interaction["source"] == "chat"
    if isinstance(interaction["trajectory"], list):
        assert len(chunks) >= len(interaction["trajectory"])  # it streamed piece by piece


def test_escape_stops_a_reply(store):
    import time

    from fakes import FakeEngine

    from rpo_local.tui.widgets import AssistantTurn

    class SlowEngine(FakeEngine):
        def stream(self, *args, **kwargs):
            for piece in super().stream(*args, **kwargs):
                time.sleep(0.01)
                yield piece

    seed(store)
    app = make_app(store, SlowEngine())

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            app.screen.query_one("#prompt").text = "Tell me everything " * 40
            await pilot.press("ctrl+j")
            await pilot.pause(0.5)
            assert app.screen.query(AssistantTurn) and app.screen.busy
            await pilot.press("escape")
            await settle(app, pilot)
            assert not app.screen.query(AssistantTurn) and not app.screen.busy
            assert any("stopped" in n.message for n in app._notifications)

    run(scenario)
    rows = store.get_messages(store.latest_conversation("alice")["id"])
    assert [r["role"] for r in rows] == ["user"] and store.counts()["interactions"] == 0


def test_escape_stops_inside_the_piece_being_generated(store):
    """Esc stops generation at the next token, not once the piece in progress is done."""
    import time

    from fakes import FakeEngine

    class SlowEngine(FakeEngine):
        yielded = 0

        def stream(self, *args, **kwargs):
            for piece in super().stream(*args, **kwargs):
                time.sleep(0.02)
                SlowEngine.yielded += 1
                yield piece

    seed(store)
    app = make_app(store, SlowEngine())
    at_escape = 0

    async def scenario() -> None:
        nonlocal at_escape
        async with app.run_test(size=(80, 24)) as pilot:
            # The reply's second piece is long: ~27 chunks of analysis and ~100 of answer.
            app.screen.query_one("#prompt").text = "the garden and the old stone wall behind the house " * 4
            await pilot.press("ctrl+j")
            await pilot.pause(1.5)  # inside the second piece
            assert app.screen.busy
            at_escape = SlowEngine.yielded
            await pilot.press("escape")
            await settle(app, pilot)
            assert not app.screen.busy and any("stopped" in n.message for n in app._notifications)

    run(scenario)
    assert SlowEngine.yielded - at_escape <= 3, (at_escape, SlowEngine.yielded)


def test_missing_model_is_a_notification(store, tmp_path):
    from rpo_local.tui.app import ChatApp
    from rpo_local.tui.pipeline import ChatPipeline

    seed(store)
    config = Config(model=str(tmp_path / "nowhere.gguf"))
    app = ChatApp(ChatPipeline(store, config, "alice", upstream=FakeUpstream()), cursor_blink=False)

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(app, pilot)  # the background load fails first
            await send(app, pilot, "Hello?")
            errors = [n for n in app._notifications if n.severity == "error"]
            assert len(errors) == 2 and all("nowhere.gguf" in n.message for n in errors)
            await pilot.press("f3")
            await pilot.pause()
            assert app.current_mode == "history" and app.is_running  # the rest still works

    run(scenario)

"""The SQLite store: migrations, profiles, history items with FTS, interactions, feedback, adapters."""

from __future__ import annotations

import json
import sqlite3

import pytest

from rpo_local.db import applied, connect
from rpo_local.errors import DatabaseError, InputError, NotFound, ProfileNotFound
from rpo_local.migrations import MIGRATIONS
from rpo_local.store import Store


def test_migrations_run_in_order_once(tmp_path):
    path = tmp_path / "x.db"
    db = connect(path)
    assert applied(db) == [name for name, _ in MIGRATIONS]
    db.conn.close()
    db = connect(path)  # re-opening applies nothing twice
    assert applied(db) == [name for name, _ in MIGRATIONS]
    assert db["items_fts"].exists()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "x.db"
    connect(path).execute("insert into _rpo_migrations values ('9999_future', 'now')")
    with pytest.raises(DatabaseError, match="newer rpo-local"):
        connect(path)


def test_not_a_database_is_refused(tmp_path):
    path = tmp_path / "x.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(DatabaseError):
        Store.open(path)


def test_add_list_dedup(store):
    ids = store.add_items("ann", [{"text": "hello world"}, {"text": "  hello world  "}, {"text": "second"}])
    assert len(ids) == 2
    assert store.add_item("ann", "hello world") is None
    assert [r["text"] for r in store.list_items("ann")] == ["second", "hello world"]
    assert store.count_items("ann") == 2


def test_profiles_are_separate(store):
    store.add_item("ann", "coffee every morning")
    store.add_item("bob", "tea in the afternoon")
    assert [r["text"] for r in store.search_items("ann", "tea")] == []
    assert [r["text"] for r in store.search_items("bob", "tea")] == ["tea in the afternoon"]
    assert {p["name"]: p["items"] for p in store.list_profiles()} == {"ann": 1, "bob": 1}


def test_unknown_profile(store):
    with pytest.raises(ProfileNotFound, match="nobody"):
        store.list_items("nobody")


def test_bad_kind_rejected_and_nothing_written(store):
    with pytest.raises(InputError):
        store.add_items("ann", [{"text": "ok"}, {"text": "bad", "kind": "spaceship"}])
    assert store.list_profiles() == []  # nothing written, not even the profile


def test_search_prefix_and_forget_removes_index_entry(store):
    item_id = store.add_item("ann", "the concert was amazing")
    store.add_item("ann", "rainy day again")
    assert [r["id"] for r in store.search_items("ann", "conc")] == [item_id]
    store.forget_item(item_id)
    assert store.search_items("ann", "concert") == []
    # The FTS index itself no longer holds the text (not just hidden by the join).
    rows = store.db.execute("select count(*) from items_fts where items_fts match 'concert'").fetchone()
    assert rows[0] == 0
    with pytest.raises(NotFound):
        store.get_item(item_id)


def test_interaction_and_feedback(store):
    store.add_item("ann", "hi")
    iid = store.record_interaction(
        "ann", input="Hello.", rewrite="heyy", trajectory={"style": "s"}, retrieved_ids=[1], fallback=False
    )
    row = store.get_interaction(iid)
    assert row["trajectory"] == {"style": "s"} and row["retrieved_ids"] == [1] and row["fallback"] == 0
    store.add_feedback(iid, "edited", "heyyy there")
    # The user's edit is their own writing: it becomes history.
    assert any(r["text"] == "heyyy there" for r in store.list_items("ann"))
    with pytest.raises(InputError):
        store.add_feedback(iid, "edited", "")
    with pytest.raises(InputError):
        store.add_feedback(iid, "loved-it")
    with pytest.raises(NotFound):
        store.add_feedback(999, "accepted")
    assert [f["verdict"] for f in store.list_feedback("ann")] == ["edited"]


def test_adapter_activation_and_rollback(store, tmp_path):
    store.ensure_profile("ann")
    a = store.register_adapter("a1", tmp_path / "a1.gguf", profile="ann")
    b = store.register_adapter("a2", tmp_path / "a2.gguf", profile="ann")
    assert store.active_adapter("ann") is None and store.active_activation("ann") is None
    store.set_active_adapter("ann", a)
    store.set_active_adapter("ann", b)
    assert store.active_adapter("ann")["name"] == "a2"
    with pytest.raises(InputError):
        store.remove_adapter("a2")  # active adapters are not removed
    assert store.rollback_adapter("ann")["name"] == "a1"
    store.remove_adapter("a2")
    assert [x["name"] for x in store.list_adapters("ann")] == ["a1"]
    store.set_active_adapter("ann", None)
    assert store.active_adapter("ann") is None and store.active_activation("ann") is not None


def test_concurrent_writers_lose_nothing(tmp_path):
    import threading

    path = tmp_path / "c.db"
    Store.open(path).ensure_profile("ann")

    def work(n: int) -> None:
        with Store.open(path) as s:
            for i in range(20):
                s.record_interaction("ann", input=f"{n}-{i}", rewrite="x")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conn = sqlite3.connect(path)
    assert conn.execute("select count(*) from interactions").fetchone()[0] == 100
    json.dumps(Store.open(path).counts())


def test_one_store_shared_by_many_threads(tmp_path):
    """The daemon shares a Store between request threads: mixed reads and writes must not clash."""
    import threading

    store = Store.open(tmp_path / "shared.db")
    store.add_item("ann", "seed item about coffee")
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(15):
                store.add_items("ann", [{"text": f"coffee note {n}-{i}"}])
                store.search_items("ann", "coffee")
                iid = store.record_interaction("ann", input=f"{n}-{i}", rewrite="x")
                store.add_feedback(iid, "rejected")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.counts()["items"] == 1 + 6 * 15 and store.counts()["feedback"] == 6 * 15
    store.close()


def test_train_runs_record_the_material_they_covered(store):
    store.add_items("ann", [{"text": "one"}, {"text": "two"}])
    assert store.new_material("ann", store.last_covered_marks("ann")) == 2 and store.list_train_runs("ghost") == []
    lamp = store.start_train_run("ann", "sft")  # on LaMP users: covers none of ann's texts
    store.finish_train_run(lamp, "activated")
    assert store.last_covered_marks("ann") is None
    run = store.start_train_run("ann", "rl", store.material_marks("ann"))
    store.add_item("ann", "three")  # arrives while the run trains
    store.finish_train_run(run, "rejected", summary={"status": "rejected"})
    assert store.new_material("ann", store.last_covered_marks("ann")) == 1
    failed = store.start_train_run("ann", "sft", store.material_marks("ann"))
    store.finish_train_run(failed, "failed", error="boom")
    assert store.new_material("ann", store.last_covered_marks("ann")) == 1, "a failed run keeps the material"
    assert [r["status"] for r in store.list_train_runs("ann")] == ["failed", "rejected", "activated"]
    assert store.list_train_runs("ann")[1]["summary"] == {"status": "rejected"}
    with pytest.raises(InputError):
        store.finish_train_run(run, "succeeded")


def test_runs_from_before_the_marks_cover_what_was_dated_before_them(tmp_path):
    path = tmp_path / "old.db"
    with Store.open(path) as s:
        s.add_items("ann", [{"text": "before", "created_at": "2020-01-01T00:00:00+00:00"}])
        s.finish_train_run(s.start_train_run("ann", "sft"), "activated")
        s.add_items("ann", [{"text": "after"}])
    conn = sqlite3.connect(path)  # the database as 0005 left it
    conn.execute("alter table train_runs drop column item_mark")
    conn.execute("alter table train_runs drop column feedback_mark")
    conn.execute("delete from _rpo_migrations where name = '0006_train_run_marks'")
    conn.commit()
    conn.close()
    with Store.open(path) as s:
        assert s.last_covered_marks("ann") == {"item_id": 1, "feedback_id": 0}
        assert s.new_material("ann", s.last_covered_marks("ann")) == 1


def test_retrieval_and_search_queries_belong_to_the_store(store):
    store.add_items("ann", [{"text": "walking the dog"}, {"text": "pizza night"}, {"text": "dog park"}])
    pid = store.get_profile("ann").id
    assert [h["text"] for h in store.bm25_items(pid, '"dog"', 5)] == ["dog park", "walking the dog"]
    assert [h["text"] for h in store.recent_items(pid, 5, exclude=[3])] == ["pizza night", "walking the dog"]
    assert store.adapter_by_path("/nowhere") is None

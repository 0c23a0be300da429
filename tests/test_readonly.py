"""A database this process cannot write: the reading verbs work, writing ones fail with their own
exit code (10), never "newer rpo-local, or not a database" (6).

The file (and in one case its folder) is made read-only for real. Tests run as root here, and
root ignores permission bits, so as root the immutable flag (`chattr +i`, which binds root too)
is used; as any other user, `chmod a-w`. Either way the kernel refuses the write and
`os.access` says so, which is how rpo decides to open the file read-only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rpo_local import paths
from rpo_local.errors import ReadOnlyDatabase
from rpo_local.store import Store

TEXTS = ["ok see u at 5 lol", "gonna be late, traffic is nuts", "nah that works for me tbh"]


def _read_only(targets: list[Path]) -> Iterator[None]:
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", *map(str, targets)],
                                                            capture_output=True).returncode:
            pytest.skip("running as root and `chattr +i` is not available here")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", *map(str, targets)], check=True)
        return
    modes = {t: t.stat().st_mode for t in targets}
    for t in targets:
        t.chmod(modes[t] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield
    finally:
        for t, mode in modes.items():
            t.chmod(mode)


@pytest.fixture
def seeded(rpo_home) -> Path:
    """A real database with a profile, history and one logged interaction; closed, so its
    -wal and -shm files are gone as after any normal run."""
    with Store.open() as store:
        store.add_items("ann", [{"text": t, "kind": "chat"} for t in TEXTS])
        store.record_interaction("ann", source="cli", input="Hello There.", rewrite="hello there", fallback=False)
    db = paths.db_path()
    assert not db.with_name(db.name + "-wal").exists()
    return db


@pytest.fixture(params=["file", "file-and-folder"])
def read_only_db(request, seeded) -> Iterator[Path]:
    targets = [seeded] if request.param == "file" else [seeded, seeded.parent]
    before = hashlib.sha256(seeded.read_bytes()).hexdigest()
    gen = _read_only(targets)
    next(gen)
    try:
        assert not os.access(seeded, os.W_OK), "the database really is read-only for this process"
        yield seeded
        assert hashlib.sha256(seeded.read_bytes()).hexdigest() == before, "the database is unchanged"
    finally:
        next(gen, None)


def test_reading_verbs_work(cli, read_only_db, use_fake_engine):
    r = cli("history", "list", "--profile", "ann", "--json")
    assert r.code == 0, r
    assert sorted(i["text"] for i in json.loads(r.stdout)) == sorted(TEXTS)
    r = cli("history", "search", "traffic", "--profile", "ann")
    assert r.code == 0 and "traffic is nuts" in r.stdout, r
    r = cli("log", "--profile", "ann", "--json")
    assert r.code == 0 and json.loads(r.stdout)[0]["rewrite"] == "hello there", r
    r = cli("profiles", "list")
    assert r.code == 0 and r.stdout.startswith("ann\t3 items"), r
    r = cli("rewrite", "--profile", "ann", "--no-log", "--no-stream", stdin=b"Good Morning.")
    assert r.code == 0 and r.stdout == "good morning.\n", r
    r = cli("doctor", "--profile", "ann", "--json")
    doc = json.loads(r.stdout)
    assert doc["database"]["read_only"] is True and doc["database"]["counts"]["items"] == 3
    assert not [p for p in doc["problems"] if "database" in p.lower() or "read-only" in p], doc["problems"]


def test_writing_verbs_say_read_only_with_exit_10(cli, read_only_db, use_fake_engine):
    for args, stdin in [
        (("history", "add", "--profile", "ann", "one more"), b""),
        (("history", "add", "--profile", "newbie", "hi"), b""),
        (("history", "forget", "1"), b""),
        (("feedback", "1", "accepted"), b""),
        (("rewrite", "--profile", "ann"), b"Good Morning."),
        (("serve", "--port", "0", "--no-train"), b""),  # it records every request: refused at start
    ]:
        r = cli(*args, stdin=stdin)
        assert r.code == ReadOnlyDatabase.exit_code == 10, (args, r)
        assert "read-only" in r.stderr and "newer rpo-local" not in r.stderr and r.stdout == "", (args, r)


def test_read_only_store_refuses_writes_before_touching_anything(read_only_db):
    with Store.open() as store:
        assert store.read_only
        assert store.count_items("ann") == 3 and store.active_activation("ann") is None
        with pytest.raises(ReadOnlyDatabase):
            store.add_item("ann", "another")
        with pytest.raises(ReadOnlyDatabase):
            store.record_interaction("ann", source="cli", input="a", rewrite="b")


def test_an_old_schema_that_cannot_be_migrated_read_only(cli, rpo_home):
    """Migrating would write: a read-only database from an older rpo-local says so (exit 10)."""
    db = paths.db_path()
    db.parent.mkdir(parents=True)
    with Store.open(db):
        pass
    conn = sqlite3.connect(db)
    conn.execute("delete from _rpo_migrations where name = '0004_train_runs'")
    conn.execute("drop table train_runs")
    conn.commit()
    conn.close()
    gen = _read_only([db])
    next(gen)
    try:
        r = cli("history", "list")
        assert r.code == 10 and "read-only" in r.stderr and "0004_train_runs" in r.stderr, r
    finally:
        next(gen, None)
    r = cli("history", "list")  # writable again: migrated, and it works
    assert r.code == 5, r  # no profile "default" yet: the database itself is fine


def test_not_a_database_is_still_exit_6(cli, rpo_home):
    db = paths.db_path()
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not sqlite at all" * 100)
    r = cli("history", "list")
    assert r.code == 6 and "read-only" not in r.stderr, r

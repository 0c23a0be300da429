"""Opening the SQLite database and bringing its schema up to date."""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import sqlite_utils

from rpo_local.errors import DatabaseError, ReadOnlyDatabase
from rpo_local.migrations import MIGRATIONS

MIGRATIONS_TABLE = "_rpo_migrations"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def is_read_only(path: Path | str) -> bool:
    """Whether this process cannot write the database at `path`: the file, or the folder its
    journal files (-wal, -shm) are created in, is not writable (permissions, read-only mount,
    immutable flag: `os.access` asks the kernel, so it is right for root as well)."""
    if str(path) == ":memory:":
        return False
    path = Path(path)
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if folder is None:
        return False
    if not path.exists():
        return not os.access(folder, os.W_OK | os.X_OK)
    return not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK)


def read_only_error(path: Path | str, detail: str = "") -> ReadOnlyDatabase:
    return ReadOnlyDatabase(
        f"{path}: the database is read-only{detail}; reading works (history list, log, doctor, "
        "rewrite --no-log), writing needs write access to the file and its folder"
    )


def connect(path: Path | str, *, read_only: bool = False) -> sqlite_utils.Database:
    """Open (creating if needed) and migrate the database at `path`.

    `read_only` opens it read-only and only checks that its schema is current (a migration
    would have to write)."""
    try:
        conn = _open(path, read_only)
        db = sqlite_utils.Database(conn)
        db.execute("PRAGMA foreign_keys = ON")
        if str(path) != ":memory:" and not read_only:
            db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA busy_timeout = 30000")
        if read_only:
            check_current(db, path)
        else:
            migrate(db)
    except sqlite3.OperationalError as exc:
        if "readonly" in str(exc):
            raise read_only_error(path) from None
        raise DatabaseError(f"{path}: cannot open the database ({exc})") from None
    except sqlite3.DatabaseError as exc:
        raise DatabaseError(f"{path}: cannot open the database ({exc})") from None
    return db


def _open(path: Path | str, read_only: bool) -> sqlite3.Connection:
    options = {"timeout": 30, "check_same_thread": False, "isolation_level": None}
    if not read_only:
        if str(path) != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseError(f"{path}: cannot create its folder ({exc.strerror})") from None
        return sqlite3.connect(str(path), **options)
    if not Path(path).is_file():
        raise read_only_error(path, " (its folder cannot be written, and it does not exist yet)")
    uri = Path(path).resolve().as_uri()
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, **options)
    try:
        conn.execute("PRAGMA schema_version")  # the file is only opened by a first statement
        return conn
    except sqlite3.OperationalError:
        # A WAL database needs its -shm file, which a read-only folder cannot get: read the
        # file as immutable (nothing can write it from here either).
        conn.close()
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, **options)


def check_current(db: sqlite_utils.Database, path: Path | str) -> None:
    """Refuse a schema this code cannot read without migrating it."""
    pending = _pending(db)
    if pending:
        raise read_only_error(path, f" and older than this rpo-local (migration {pending[0]!r} pending)")


def applied(db: sqlite_utils.Database) -> list[str]:
    if not db[MIGRATIONS_TABLE].exists():
        return []
    return [r["name"] for r in db.query(f"select name from {MIGRATIONS_TABLE} order by rowid")]


def _pending(db: sqlite_utils.Database) -> list[str]:
    """Migrations not applied yet; DatabaseError for a database from a newer rpo-local."""
    known = [name for name, _ in MIGRATIONS]
    done = applied(db)
    unknown = [name for name in done if name not in known]
    if unknown:
        raise DatabaseError(
            f"the database was written by a newer rpo-local (unknown migration {unknown[0]!r}); "
            "upgrade rpo-local to use it"
        )
    return [name for name in known if name not in done]


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply pending migrations in order; return the names applied now."""
    pending = _pending(db)
    for name, fn in MIGRATIONS:
        if name not in pending:
            continue
        with db.conn:  # one transaction per migration
            db.execute("BEGIN")
            if not db[MIGRATIONS_TABLE].exists():
                db[MIGRATIONS_TABLE].create({"name": str, "applied_at": str}, pk="name")
            fn(db)
            db[MIGRATIONS_TABLE].insert({"name": name, "applied_at": now()})
    return pending

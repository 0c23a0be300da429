"""Opening the SQLite database and bringing its schema up to date."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils

from rpo_local.errors import DatabaseError
from rpo_local.migrations import MIGRATIONS

MIGRATIONS_TABLE = "_rpo_migrations"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def connect(path: Path | str) -> sqlite_utils.Database:
    """Open (creating if needed) and migrate the database at `path`."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
        db = sqlite_utils.Database(conn)
        db.execute("PRAGMA foreign_keys = ON")
        if str(path) != ":memory:":
            db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA busy_timeout = 30000")
        migrate(db)
    except sqlite3.DatabaseError as exc:
        raise DatabaseError(f"{path}: cannot open the database ({exc})") from None
    return db


def applied(db: sqlite_utils.Database) -> list[str]:
    if not db[MIGRATIONS_TABLE].exists():
        return []
    return [r["name"] for r in db.query(f"select name from {MIGRATIONS_TABLE} order by rowid")]


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply pending migrations in order; return the names applied now."""
    known = [name for name, _ in MIGRATIONS]
    done = applied(db)
    unknown = [name for name in done if name not in known]
    if unknown:
        raise DatabaseError(
            f"the database was written by a newer rpo-local (unknown migration {unknown[0]!r}); "
            "upgrade rpo-local to use it"
        )
    ran = []
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        with db.conn:  # one transaction per migration
            db.execute("BEGIN")
            if not db[MIGRATIONS_TABLE].exists():
                db[MIGRATIONS_TABLE].create({"name": str, "applied_at": str}, pk="name")
            fn(db)
            db[MIGRATIONS_TABLE].insert({"name": name, "applied_at": now()})
        ran.append(name)
    return ran

"""The local history store: profiles, their writing, interactions, feedback and adapters.

One SQLite file (see `rpo_local.paths.db_path`), accessed through sqlite-utils. All methods
are safe to call from several threads of one process (a lock serialises writes), and every
multi-row change is one transaction.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from rpo_local import paths
from rpo_local.db import connect, is_read_only, now, read_only_error
from rpo_local.errors import InputError, NotFound, ProfileNotFound
from rpo_local.names import check_profile
from rpo_local.text import fts_phrase_query

KINDS = ("chat", "email", "tweet", "note", "post", "message", "review", "edit", "other")
VERDICTS = ("accepted", "edited", "rejected")
RUN_STATUSES = ("running", "activated", "rejected", "failed")
FINISHED = ("activated", "rejected")  # runs that trained on the material they found


@dataclass(frozen=True)
class Profile:
    id: int
    name: str


def digest(text: str) -> str:
    return hashlib.sha1(text.strip().encode("utf-8")).hexdigest()


class Store:
    """The database of one user's machine. Each thread gets its own SQLite connection (a
    connection is not safe to share); writes also take an in-process lock.

    A database this process cannot write is opened read-only: reading works, and every write
    raises ReadOnlyDatabase before touching anything. `durable=False` turns off syncing to
    disk (a throw-away database that is deleted right after use)."""

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = Path(path)
        self.durable = durable
        self.read_only = is_read_only(self.path)
        self._lock = threading.RLock()
        self._local = threading.local()
        self._connections: list[sqlite_utils.Database] = []
        self._history_writes = 0  # see embedding_stamp
        _ = self.db  # open and migrate now, so a bad database fails here

    @classmethod
    def open(cls, path: Path | str | None = None, *, durable: bool = True) -> Store:
        return cls(Path(path) if path is not None else paths.db_path(), durable=durable)

    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = connect(self.path, read_only=self.read_only)
            if not self.durable:
                db.execute("PRAGMA synchronous = OFF")
            with self._lock:
                self._connections.append(db)
        return db

    def close(self) -> None:
        with self._lock:
            for db in self._connections:
                db.conn.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_writable(self) -> None:
        """ReadOnlyDatabase unless this process can write the database."""
        if self.read_only:
            raise read_only_error(self.path)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """One write (under the lock); a database that turns out read-only is ReadOnlyDatabase."""
        self.check_writable()
        with self._lock:
            try:
                yield
            except sqlite3.OperationalError as exc:
                if "readonly" in str(exc):
                    raise read_only_error(self.path) from None
                raise

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.writing():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _one(self, sql: str, params: Iterable[Any] = ()) -> dict | None:
        rows = list(self.db.query(sql, list(params)))
        return rows[0] if rows else None

    # -- profiles -----------------------------------------------------------------------------

    def ensure_profile(self, name: str) -> Profile:
        """The profile `name`, created when new (a new name must be valid: rpo_local.names)."""
        with self._lock:
            row = self._one("select id, name from profiles where name = ?", [name])
            if row is not None:
                return Profile(row["id"], row["name"])
            check_profile(name)
            with self.writing():
                pid = self.db["profiles"].insert({"name": name, "created_at": now()}).last_pk
            return Profile(pid, name)

    def has_profile(self, name: str) -> bool:
        return self._one("select id from profiles where name = ?", [name]) is not None

    def get_profile(self, name: str) -> Profile:
        row = self._one("select id, name from profiles where name = ?", [name])
        if row is None:
            known = ", ".join(p["name"] for p in self.list_profiles()) or "none yet"
            raise ProfileNotFound(
                f"unknown profile {name!r} (known: {known}); add history with "
                f"`rpo history add --profile {name}` to create it"
            )
        return Profile(row["id"], row["name"])

    def list_profiles(self) -> list[dict]:
        return list(
            self.db.query(
                "select p.id, p.name, p.created_at, count(i.id) as items from profiles p "
                "left join items i on i.profile_id = p.id group by p.id order by p.name"
            )
        )

    # -- history items ------------------------------------------------------------------------

    def add_item(
        self,
        profile: str,
        text: str,
        *,
        kind: str = "note",
        source: str | None = None,
        created_at: str | None = None,
        meta: dict | None = None,
    ) -> int | None:
        """Add one item; return its id, or None when the profile already holds that text."""
        added = self.add_items(
            profile,
            [{"text": text, "kind": kind, "source": source, "created_at": created_at, "meta": meta}],
        )
        return added[0] if added else None

    def add_items(self, profile: str, items: Iterable[dict]) -> list[int]:
        """Add many items in one transaction; exact duplicates (per profile) are skipped."""
        items = list(items)
        bad = next((i["kind"] for i in items if (i.get("kind") or "note") not in KINDS), None)
        if bad is not None:  # before anything is written, the profile included
            raise InputError(f"unknown kind {bad!r}; use one of {', '.join(KINDS)}")
        pid = self.ensure_profile(profile).id
        ids: list[int] = []
        with self.transaction():
            for item in items:
                text = (item.get("text") or "").strip()
                if not text:
                    continue
                kind = item.get("kind") or "note"
                cur = self.db.execute(
                    "insert or ignore into items (profile_id, text, kind, source, created_at, "
                    "digest, meta) values (?, ?, ?, ?, ?, ?, ?)",
                    [
                        pid,
                        text,
                        kind,
                        item.get("source"),
                        item.get("created_at") or now(),
                        digest(text),
                        json.dumps(item["meta"]) if item.get("meta") else None,
                    ],
                )
                if cur.rowcount:
                    ids.append(cur.lastrowid)
            self._history_writes += 1
        return ids

    def has_item_text(self, profile: str, text: str) -> bool:
        """Does `profile` hold an item with exactly this text (surrounding whitespace aside)?"""
        pid = self.get_profile(profile).id
        row = self.db.execute("select 1 from items where profile_id = ? and digest = ?", [pid, digest(text)]).fetchone()
        return row is not None

    def list_items(
        self, profile: str, *, limit: int = 50, offset: int = 0, kind: str | None = None
    ) -> list[dict]:
        pid = self.get_profile(profile).id
        where, params = "profile_id = ?", [pid]
        if kind:
            where, params = where + " and kind = ?", params + [kind]
        return list(
            self.db.query(
                f"select id, text, kind, source, created_at from items where {where} "
                "order by created_at desc, id desc limit ? offset ?",
                params + [limit, offset],
            )
        )

    def count_items(self, profile: str) -> int:
        pid = self.get_profile(profile).id
        return self.db.execute("select count(*) from items where profile_id = ?", [pid]).fetchone()[0]

    def get_item(self, item_id: int) -> dict:
        row = self._one(
            "select i.id, p.name as profile, i.text, i.kind, i.source, i.created_at, i.meta "
            "from items i join profiles p on p.id = i.profile_id where i.id = ?",
            [item_id],
        )
        if row is None:
            raise NotFound(f"no history item with id {item_id}")
        return row

    def get_items(self, ids: Iterable[int]) -> list[dict]:
        ids = list(ids)
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = {
            r["id"]: r
            for r in self.db.query(
                f"select id, text, kind, source, created_at from items where id in ({marks})", ids
            )
        }
        return [rows[i] for i in ids if i in rows]

    def search_items(self, profile: str, query: str, *, limit: int = 20) -> list[dict]:
        """Full-text search as a person types it: every word must match (prefix allowed)."""
        fts = fts_phrase_query(query)
        if not fts:
            return []
        pid = self.get_profile(profile).id
        return list(
            self.db.query(
                "select items.id, items.text, items.kind, items.source, items.created_at, "
                "bm25(items_fts) as score from items_fts join items on items.id = items_fts.rowid "
                "where items_fts match ? and items.profile_id = ? order by score, items.id desc "
                "limit ?",
                [fts, pid, limit],
            )
        )

    def bm25_items(self, profile_id: int, fts_query: str, limit: int) -> list[dict]:
        """Items matching the FTS5 `fts_query`, best BM25 score first, then the newest."""
        return list(
            self.db.query(
                "select items.id, items.text, items.kind, items.created_at, bm25(items_fts) as score "
                "from items_fts join items on items.id = items_fts.rowid "
                "where items_fts match ? and items.profile_id = ? "
                "order by score, items.created_at desc, items.id desc limit ?",
                [fts_query, profile_id, limit],
            )
        )

    def term_counts(self, fts_terms: list[str], cap: int) -> list[int]:
        """How many items (of every profile, as BM25's document frequencies) match each FTS5 term,
        counted up to `cap` + 1 so that a common term costs no more than a rare one."""
        if not fts_terms:
            return []
        count = "(select count(*) from (select 1 from items_fts where items_fts match ? limit ?))"
        return list(self.db.execute("select " + ", ".join([count] * len(fts_terms)),
                                    [p for term in fts_terms for p in (term, cap + 1)]).fetchone())

    def recent_items(self, profile_id: int, limit: int, *, exclude: Iterable[int] = ()) -> list[dict]:
        """The newest items of a profile, leaving out the ids in `exclude` (score None)."""
        have = list(exclude) or [-1]
        marks = ",".join("?" * len(have))
        return list(
            self.db.query(
                "select id, text, kind, created_at, null as score from items "
                f"where profile_id = ? and id not in ({marks}) "
                "order by created_at desc, id desc limit ?",
                [profile_id, *have, limit],
            )
        )

    def forget_item(self, item_id: int) -> dict:
        """Delete an item for real: the row and (through the FTS triggers) its index entry."""
        item = self.get_item(item_id)
        with self.transaction():
            self.db.execute("delete from items where id = ?", [item_id])  # its embedding cascades
            self._history_writes += 1
        return item

    # -- embeddings (dense retrieval: rpo_local.embed) -------------------------------------------

    def count_embedding_todo(self, profile_id: int, model: str) -> int:
        """Items of a profile with no vector from `model` (none yet, or one from another model)."""
        return self.db.execute(
            "select count(*) from items i left join embeddings e on e.item_id = i.id and e.model = ? "
            "where i.profile_id = ? and e.item_id is null",
            [model, profile_id],
        ).fetchone()[0]

    def embedding_todo(self, profile_id: int, model: str, limit: int) -> list[dict]:
        return list(
            self.db.query(
                "select i.id, i.text from items i left join embeddings e on e.item_id = i.id and e.model = ? "
                "where i.profile_id = ? and e.item_id is null order by i.id limit ?",
                [model, profile_id, limit],
            )
        )

    def put_embeddings(self, model: str, rows: Iterable[tuple[int, bytes]]) -> None:
        """Store vectors (one transaction), replacing an item's vector from an earlier model;
        items forgotten meanwhile are skipped."""
        with self.transaction():
            for item_id, vector in rows:
                self.db.execute(
                    "insert or replace into embeddings (item_id, model, vector) "
                    "select id, ?, ? from items where id = ?",
                    [model, vector, item_id],
                )
            self._history_writes += 1

    def embeddings(self, profile_id: int, model: str) -> list[tuple[int, bytes]]:
        """(item id, vector) of every item of a profile embedded by `model`, by item id."""
        return self.db.execute(
            "select e.item_id, e.vector from embeddings e join items i on i.id = e.item_id "
            "where i.profile_id = ? and e.model = ? order by e.item_id",
            [profile_id, model],
        ).fetchall()

    def embedding_stamp(self) -> tuple[int, int]:
        """Changes when items or embeddings may have changed: writes through this Store, or any
        write by another connection (SQLite's data_version), so a cached matrix knows when to
        reload."""
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        return version, self._history_writes

    # -- interactions and feedback ------------------------------------------------------------

    def record_interaction(self, profile: str, **fields: Any) -> int:
        pid = self.ensure_profile(profile).id
        row = {"profile_id": pid, "created_at": now(), **fields}
        for key in ("trajectory", "retrieved_ids"):
            if key in row and not isinstance(row[key], str) and row[key] is not None:
                row[key] = json.dumps(row[key])
        if "fallback" in row:
            row["fallback"] = int(bool(row["fallback"]))
        with self.writing():
            return self.db["interactions"].insert(row).last_pk

    def get_interaction(self, interaction_id: int) -> dict:
        row = self._one(
            "select x.*, p.name as profile from interactions x join profiles p "
            "on p.id = x.profile_id where x.id = ?",
            [interaction_id],
        )
        if row is None:
            raise NotFound(f"no interaction with id {interaction_id}")
        for key in ("trajectory", "retrieved_ids"):
            if row.get(key):
                row[key] = json.loads(row[key])
        return row

    def list_interactions(self, profile: str, *, limit: int = 20) -> list[dict]:
        pid = self.get_profile(profile).id
        return list(
            self.db.query(
                "select id, created_at, source, input, rewrite, fallback, fallback_reason, "
                "adapter, latency_ms from interactions where profile_id = ? "
                "order by id desc limit ?",
                [pid, limit],
            )
        )

    def add_feedback(self, interaction_id: int, verdict: str, edited_text: str | None = None) -> int:
        """Record feedback; an edit is also kept as history, since it is the user's own words."""
        if verdict not in VERDICTS:
            raise InputError(f"verdict must be one of {', '.join(VERDICTS)}")
        if verdict == "edited" and not (edited_text or "").strip():
            raise InputError("an 'edited' verdict needs the edited text")
        interaction = self.get_interaction(interaction_id)
        with self.transaction():
            fid = self.db["feedback"].insert(
                {
                    "interaction_id": interaction_id,
                    "created_at": now(),
                    "verdict": verdict,
                    "edited_text": edited_text,
                }
            ).last_pk
            kept = edited_text if verdict == "edited" else interaction["rewrite"]
            if verdict in ("edited", "accepted") and kept and kept.strip():
                self.db.execute(
                    "insert or ignore into items (profile_id, text, kind, source, created_at, "
                    "digest) values (?, ?, 'edit', ?, ?, ?)",
                    [interaction["profile_id"], kept.strip(), f"feedback:{fid}", now(), digest(kept)],
                )
        return fid

    def list_feedback(self, profile: str, *, since: str | None = None) -> list[dict]:
        pid = self.get_profile(profile).id
        sql = (
            "select f.id, f.interaction_id, f.created_at, f.verdict, f.edited_text, x.input, "
            "x.rewrite from feedback f join interactions x on x.id = f.interaction_id "
            "where x.profile_id = ?"
        )
        params: list[Any] = [pid]
        if since:
            sql, params = sql + " and f.created_at > ?", params + [since]
        return list(self.db.query(sql + " order by f.id", params))

    # -- adapters -----------------------------------------------------------------------------

    def register_adapter(
        self,
        name: str,
        path: str | Path,
        *,
        profile: str | None = None,
        base_model: str | None = None,
        base_sha256: str | None = None,
        train_summary: dict | None = None,
        eval: dict | None = None,
    ) -> int:
        pid = self.ensure_profile(profile).id if profile else None
        with self.writing():
            return self.db["adapters"].insert(
                {
                    "name": name,
                    "profile_id": pid,
                    "path": str(path),
                    "base_model": base_model,
                    "base_sha256": base_sha256,
                    "created_at": now(),
                    "train_summary": json.dumps(train_summary) if train_summary else None,
                    "eval": json.dumps(eval) if eval else None,
                },
                replace=False,
            ).last_pk

    def get_adapter(self, ref: str | int) -> dict:
        col = "id" if isinstance(ref, int) or str(ref).isdigit() else "name"
        row = self._one(f"select * from adapters where {col} = ?", [ref])
        if row is None:
            raise NotFound(f"no adapter {ref!r}; see `rpo adapters list`")
        return _decode_adapter(row)

    def adapter_by_path(self, path: str | Path) -> dict | None:
        """The newest registered adapter whose file is `path` (None: not registered)."""
        row = self._one("select * from adapters where path = ? order by id desc limit 1", [str(path)])
        return _decode_adapter(row) if row else None

    def list_adapters(self, profile: str | None = None) -> list[dict]:
        """Every adapter, or those `profile` can use: the general ones and its own (a profile
        that does not exist yet has only the general ones; reading creates nothing)."""
        if profile is None:
            rows = self.db.query("select * from adapters order by id")
        else:
            rows = self.db.query(
                "select a.* from adapters a left join profiles p on p.id = a.profile_id "
                "where a.profile_id is null or p.name = ? order by a.id",
                [profile],
            )
        return [_decode_adapter(r) for r in rows]

    def set_active_adapter(self, profile: str, adapter_id: int | None) -> None:
        """Make `adapter_id` (None: no adapter) the profile's active adapter."""
        pid = self.ensure_profile(profile).id
        if adapter_id is not None:
            self.get_adapter(adapter_id)
        with self.writing():
            self.db["adapter_activations"].insert(
                {"profile_id": pid, "adapter_id": adapter_id, "activated_at": now(), "rolled_back": 0}
            )

    def active_activation(self, profile: str) -> dict | None:
        """The newest activation not rolled back; None when the profile never chose one (or
        does not exist: reading creates nothing)."""
        return self._one(
            "select a.* from adapter_activations a join profiles p on p.id = a.profile_id "
            "where p.name = ? and a.rolled_back = 0 order by a.id desc limit 1",
            [profile],
        )

    def active_adapter(self, profile: str) -> dict | None:
        row = self.active_activation(profile)
        if row is None or row["adapter_id"] is None:
            return None
        return self.get_adapter(row["adapter_id"])

    def rollback_adapter(self, profile: str) -> dict | None:
        """Undo the newest activation; return the adapter now active (None: none)."""
        row = self.active_activation(profile)
        if row is None:
            raise NotFound(f"profile {profile!r} has no adapter activation to roll back")
        with self.writing():
            self.db.execute("update adapter_activations set rolled_back = 1 where id = ?", [row["id"]])
        return self.active_adapter(profile)

    def remove_adapter(self, ref: str | int) -> dict:
        adapter = self.get_adapter(ref)
        in_use = self._one(
            "select a.profile_id from adapter_activations a where a.rolled_back = 0 and a.id in "
            "(select max(id) from adapter_activations where rolled_back = 0 group by profile_id) "
            "and a.adapter_id = ?",
            [adapter["id"]],
        )
        if in_use:
            raise InputError(f"adapter {adapter['name']!r} is active; activate another first")
        with self.transaction():
            self.db.execute("delete from adapter_activations where adapter_id = ?", [adapter["id"]])
            self.db.execute("delete from adapters where id = ?", [adapter["id"]])
        return adapter

    # -- training runs and the material they covered -----------------------------------------

    def material_marks(self, profile: str) -> dict[str, int]:
        """The newest item and feedback ids of `profile`: what a run starting now covers."""
        pid = self.get_profile(profile).id
        item = self.db.execute("select coalesce(max(id), 0) from items where profile_id = ?", [pid]).fetchone()[0]
        fb = self.db.execute(
            "select coalesce(max(f.id), 0) from feedback f join interactions x on x.id = f.interaction_id "
            "where x.profile_id = ?",
            [pid],
        ).fetchone()[0]
        return {"item_id": item, "feedback_id": fb}

    def new_material(self, profile: str, marks: dict[str, int] | None) -> int:
        """Items and rejected rewrites of `profile` newer than `marks` (None: all of them).
        Accepted and edited rewrites are counted as the history items they became."""
        pid = self.get_profile(profile).id
        item_mark, fb_mark = (marks["item_id"], marks["feedback_id"]) if marks else (0, 0)
        items = self.db.execute(
            "select count(*) from items where profile_id = ? and id > ?", [pid, item_mark]
        ).fetchone()[0]
        rejected = self.db.execute(
            "select count(*) from feedback f join interactions x on x.id = f.interaction_id "
            "where x.profile_id = ? and f.id > ? and f.verdict = 'rejected'",
            [pid, fb_mark],
        ).fetchone()[0]
        return items + rejected

    def start_train_run(self, profile: str, kind: str, marks: dict[str, int] | None = None) -> int:
        """Record a run as running; `marks` (see material_marks) is the material it trains on
        (None: not the profile's own, e.g. LaMP users)."""
        pid = self.ensure_profile(profile).id
        marks = marks or {}
        with self.writing():
            return self.db["train_runs"].insert({
                "profile_id": pid, "kind": kind, "status": "running", "started_at": now(),
                "item_mark": marks.get("item_id"), "feedback_mark": marks.get("feedback_id"),
            }).last_pk

    def finish_train_run(self, run_id: int, status: str, *, adapter_id: int | None = None,
                         summary: dict | None = None, error: str | None = None) -> None:
        if status not in RUN_STATUSES[1:]:
            raise InputError(f"a finished run's status is one of {', '.join(RUN_STATUSES[1:])}, not {status!r}")
        with self.writing():
            self.db["train_runs"].update(run_id, {
                "status": status, "finished_at": now(), "adapter_id": adapter_id,
                "summary": json.dumps(summary, default=str) if summary is not None else None, "error": error,
            })

    def list_train_runs(self, profile: str, *, limit: int = -1) -> list[dict]:
        """A profile's runs, newest first ([] for a profile that does not exist)."""
        rows = list(
            self.db.query(
                "select r.id, r.kind, r.status, r.started_at, r.finished_at, r.adapter_id, r.summary, r.error, "
                "r.item_mark, r.feedback_mark from train_runs r join profiles p on p.id = r.profile_id "
                "where p.name = ? order by r.id desc limit ?",
                [profile, limit],
            )
        )
        for row in rows:
            row["summary"] = json.loads(row["summary"]) if row["summary"] else None
        return rows

    def last_covered_marks(self, profile: str) -> dict[str, int] | None:
        """The material marks of the newest finished run on the profile's own texts."""
        row = self._one(
            "select r.item_mark, r.feedback_mark from train_runs r join profiles p on p.id = r.profile_id "
            f"where p.name = ? and r.status in ({','.join('?' * len(FINISHED))}) and r.item_mark is not null "
            "order by r.id desc limit 1",
            [profile, *FINISHED],
        )
        return {"item_id": row["item_mark"], "feedback_id": row["feedback_mark"] or 0} if row else None

    # -- models -------------------------------------------------------------------------------

    def has_model(self, name: str) -> bool:
        return self._one("select id from models where name = ?", [name]) is not None

    def register_model(self, name: str, info: dict) -> int:
        if self.has_model(name):
            raise InputError(f"a model named {name!r} is registered already; `rpo models remove` it first")
        with self._lock:
            return self.db["models"].insert({
                "name": name, "added_at": now(),
                **{k: info.get(k) for k in ("path", "sha256", "arch", "bytes", "label")},
            }).last_pk

    def get_model(self, name: str) -> dict:
        row = self._one("select * from models where name = ?", [name])
        if row is None:
            raise NotFound(f"no model {name!r}; see `rpo models list`")
        return row

    def list_models(self) -> list[dict]:
        return list(self.db.query("select * from models order by id"))

    def remove_model(self, name: str) -> dict:
        row = self.get_model(name)
        with self._lock:
            self.db.execute("delete from models where id = ?", [row["id"]])
        return row

    # -- summary ------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        tables = ["profiles", "items", "interactions", "feedback", "adapters", "conversations"]
        return {t: self.db[t].count for t in tables}

    # -- conversations (rpo chat) -------------------------------------------------------------

    def create_conversation(self, profile: str, title: str | None = None) -> int:
        pid = self.ensure_profile(profile).id
        stamp = now()
        with self.writing():
            return self.db["conversations"].insert(
                {"profile_id": pid, "title": title, "created_at": stamp, "updated_at": stamp}
            ).last_pk

    def get_conversation(self, conversation_id: int) -> dict:
        row = self._one(
            "select c.*, p.name as profile from conversations c join profiles p "
            "on p.id = c.profile_id where c.id = ?",
            [conversation_id],
        )
        if row is None:
            raise NotFound(f"no conversation with id {conversation_id}")
        return row

    def list_conversations(self, profile: str, *, limit: int = 50) -> list[dict]:
        """A profile's conversations, most recently used first, with their message counts."""
        pid = self.get_profile(profile).id
        return list(
            self.db.query(
                "select c.id, c.title, c.created_at, c.updated_at, count(m.id) as messages "
                "from conversations c left join messages m on m.conversation_id = c.id "
                "where c.profile_id = ? group by c.id order by c.updated_at desc, c.id desc limit ?",
                [pid, limit],
            )
        )

    def latest_conversation(self, profile: str) -> dict | None:
        rows = self.list_conversations(profile, limit=1)
        return rows[0] if rows else None

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        generic: str | None = None,
        interaction_id: int | None = None,
    ) -> int:
        """Append a message; the first user message also titles an untitled conversation."""
        if role not in ("user", "assistant", "system"):
            raise InputError(f"unknown message role {role!r}")
        conv = self.get_conversation(conversation_id)
        stamp = now()
        with self.transaction():
            mid = self.db["messages"].insert(
                {
                    "conversation_id": conversation_id,
                    "role": role,
                    "content": content,
                    "generic": generic,
                    "interaction_id": interaction_id,
                    "created_at": stamp,
                }
            ).last_pk
            title = conv["title"] or (" ".join(content.split())[:60] if role == "user" else None)
            self.db.execute(
                "update conversations set updated_at = ?, title = ? where id = ?",
                [stamp, title, conversation_id],
            )
        return mid

    def update_message(self, message_id: int, content: str) -> None:
        """Replace what a message shows (an assistant turn the user edited)."""
        with self.writing():
            cur = self.db.execute("update messages set content = ? where id = ?", [content, message_id])
        if not cur.rowcount:
            raise NotFound(f"no message with id {message_id}")

    def get_messages(self, conversation_id: int) -> list[dict]:
        """Messages in order; assistant turns carry their interaction's trajectory, retrieved
        item ids, fallback flag and the newest feedback verdict (None before any)."""
        self.get_conversation(conversation_id)
        rows = list(
            self.db.query(
                "select m.id, m.role, m.content, m.generic, m.interaction_id, m.created_at, "
                "x.trajectory, x.retrieved_ids, x.fallback, x.fallback_reason, "
                "(select f.verdict from feedback f where f.interaction_id = m.interaction_id "
                "order by f.id desc limit 1) as verdict "
                "from messages m left join interactions x on x.id = m.interaction_id "
                "where m.conversation_id = ? order by m.id",
                [conversation_id],
            )
        )
        for row in rows:
            for key in ("trajectory", "retrieved_ids"):
                row[key] = json.loads(row[key]) if row.get(key) else None
        return rows

    # -- end of conversations -----------------------------------------------------------------


def _decode_adapter(row: dict) -> dict:
    for key in ("train_summary", "eval"):
        if row.get(key):
            row[key] = json.loads(row[key])
    return row

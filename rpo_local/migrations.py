"""Ordered, named schema migrations.

Each migration runs once, in order, inside a transaction; its name is recorded in
`_rpo_migrations`. A database that has a migration this code does not know was written by a
newer rpo-local and is refused rather than silently misread.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils

Migration = tuple[str, Callable[[sqlite_utils.Database], None]]


def _0001_history(db: sqlite_utils.Database) -> None:
    db["profiles"].create(
        {"id": int, "name": str, "created_at": str}, pk="id", not_null={"name", "created_at"}
    )
    db["profiles"].create_index(["name"], unique=True)
    db["items"].create(
        {
            "id": int,
            "profile_id": int,
            "text": str,
            "kind": str,
            "source": str,
            "created_at": str,
            "digest": str,
            "meta": str,
        },
        pk="id",
        foreign_keys=[("profile_id", "profiles", "id")],
        not_null={"profile_id", "text", "kind", "created_at", "digest"},
    )
    db["items"].create_index(["profile_id", "digest"], unique=True)
    db["items"].create_index(["profile_id", "created_at"])
    # External-content FTS5 table kept in sync by triggers, so forget deletes for real.
    db["items"].enable_fts(["text"], create_triggers=True, tokenize="porter unicode61")
    db["interactions"].create(
        {
            "id": int,
            "profile_id": int,
            "created_at": str,
            "source": str,
            "input": str,
            "rewrite": str,
            "trajectory": str,
            "fallback": int,
            "fallback_reason": str,
            "model": str,
            "adapter": str,
            "retrieved_ids": str,
            "latency_ms": float,
            "prompt_tokens": int,
            "completion_tokens": int,
        },
        pk="id",
        foreign_keys=[("profile_id", "profiles", "id")],
        not_null={"profile_id", "created_at", "input", "rewrite"},
    )
    db["interactions"].create_index(["profile_id", "created_at"])
    db["feedback"].create(
        {"id": int, "interaction_id": int, "created_at": str, "verdict": str, "edited_text": str},
        pk="id",
        foreign_keys=[("interaction_id", "interactions", "id")],
        not_null={"interaction_id", "created_at", "verdict"},
    )


def _0002_adapters(db: sqlite_utils.Database) -> None:
    db["adapters"].create(
        {
            "id": int,
            "name": str,
            "profile_id": int,  # NULL: a general adapter usable by every profile
            "path": str,
            "base_model": str,
            "base_sha256": str,
            "created_at": str,
            "train_summary": str,
            "eval": str,
        },
        pk="id",
        not_null={"name", "path", "created_at"},
    )
    db["adapters"].create_index(["name"], unique=True)
    # Activation history per profile: the newest row not rolled back is the active adapter;
    # adapter_id NULL means "no adapter". Rollback marks the newest row rolled back.
    db["adapter_activations"].create(
        {"id": int, "profile_id": int, "adapter_id": int, "activated_at": str, "rolled_back": int},
        pk="id",
        not_null={"profile_id", "activated_at"},
        defaults={"rolled_back": 0},
    )
    db["adapter_activations"].create_index(["profile_id", "id"])


def _0003_conversations(db: sqlite_utils.Database) -> None:
    db["conversations"].create(
        {"id": int, "profile_id": int, "title": str, "created_at": str, "updated_at": str},
        pk="id",
        not_null={"profile_id", "created_at"},
    )
    db["messages"].create(
        {
            "id": int,
            "conversation_id": int,
            "role": str,
            "content": str,  # what the user saw: the personalized reply for the assistant
            "generic": str,  # the upstream's generic reply (assistant turns)
            "interaction_id": int,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("conversation_id", "conversations", "id")],
        not_null={"conversation_id", "role", "content", "created_at"},
    )
    db["messages"].create_index(["conversation_id", "id"])


def _0004_train_runs(db: sqlite_utils.Database) -> None:
    db["train_runs"].create(
        {
            "id": int,
            "profile_id": int,
            "kind": str,  # sft | rl
            "status": str,  # running | activated | rejected | failed
            "started_at": str,
            "finished_at": str,
            "adapter_id": int,
            "summary": str,
            "error": str,
        },
        pk="id",
        not_null={"profile_id", "kind", "status", "started_at"},
    )


def _0005_models(db: sqlite_utils.Database) -> None:
    # GGUF models registered with `rpo models add` (the embedded one needs no row).
    db["models"].create(
        {"id": int, "name": str, "path": str, "sha256": str, "arch": str, "bytes": int,
         "label": str, "added_at": str},
        pk="id",
        not_null={"name", "path", "sha256", "added_at"},
    )
    db["models"].create_index(["name"], unique=True)


def _0006_train_run_marks(db: sqlite_utils.Database) -> None:
    # The newest item and feedback ids a run trained on: what counts as new material is what
    # came after (rpo_local.training.due). Earlier runs get what the old rule counted as
    # covered: everything dated up to their start.
    db["train_runs"].add_column("item_mark", int)
    db["train_runs"].add_column("feedback_mark", int)
    db.execute(
        "update train_runs set "
        "item_mark = (select coalesce(max(i.id), 0) from items i where i.profile_id = train_runs.profile_id "
        "and i.created_at <= train_runs.started_at), "
        "feedback_mark = (select coalesce(max(f.id), 0) from feedback f join interactions x "
        "on x.id = f.interaction_id where x.profile_id = train_runs.profile_id "
        "and f.created_at <= train_runs.started_at) "
        "where status in ('activated', 'rejected')"
    )


def _0007_embeddings(db: sqlite_utils.Database) -> None:
    # One vector per item (float32, little-endian) from the model named in `model`; a vector from
    # another model is stale and recomputed. Deleting the item deletes its vector.
    db.execute(
        "create table embeddings (item_id integer primary key references items(id) on delete cascade, "
        "model text not null, vector blob not null)"
    )
    db.execute("create index embeddings_model on embeddings (model, item_id)")


MIGRATIONS: list[Migration] = [
    ("0001_history", _0001_history),
    ("0002_adapters", _0002_adapters),
    ("0003_conversations", _0003_conversations),
    ("0004_train_runs", _0004_train_runs),
    ("0005_models", _0005_models),
    ("0006_train_run_marks", _0006_train_run_marks),
    ("0007_embeddings", _0007_embeddings),
]

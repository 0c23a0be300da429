"""`rpo history ...` and `rpo profiles ...`: the user's own writing, kept locally."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rpo_local.store import Store

from rpo_local.cli._common import JsonOpt, ProfileOpt, note, open_store, print_json, profile_name, progress, read_input

app = typer.Typer(help="Add, import, browse, search and forget the user's writing.", no_args_is_help=True)
profiles_app = typer.Typer(help="Profiles (users or personas) in the database.", no_args_is_help=True)

KindOpt = Annotated[str, typer.Option("--kind", help="chat, email, tweet, note, post, message, review, other")]


@app.command("add")
def add(
    texts: Annotated[list[str] | None, typer.Argument(help="Text to add (each argument is one item)")] = None,
    files: Annotated[list[Path] | None, typer.Option("--file", "-f", help="A file to add as one item")] = None,
    profile: ProfileOpt = None,
    kind: KindOpt = "note",
    source: Annotated[str | None, typer.Option("--source", help="Where the text comes from")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Add items of the user's own writing: arguments, --file, or stdin (one item)."""
    from rpo_local.importers import read_text_file

    items = [{"text": t, "kind": kind, "source": source or "cli"} for t in texts or []]
    items += [{"text": read_text_file(f), "kind": kind, "source": source or str(f)} for f in files or []]
    if not items:
        items = [{"text": read_input(None, what="text to add"), "kind": kind, "source": source or "stdin"}]
    _add(items, profile, json_out)


def _add(items: list[dict], profile: str | None, json_out: bool) -> None:
    name = profile_name(profile)
    with open_store() as store:
        ids = store.add_items(name, items)
        if ids:
            _embed_new(store, name)
    skipped = len([i for i in items if i["text"].strip()]) - len(ids)
    note(f"added {len(ids)} item(s) to profile {name!r}" + (f", {skipped} already there" if skipped else ""))
    if json_out:
        print_json({"profile": name, "added": ids, "skipped": skipped})
    else:
        for item_id in ids:
            print(item_id)


def _embed_new(store: Store, profile: str) -> None:
    """Embed the profile's new items when dense retrieval can run here (the [retrieval] extra
    and an exported model); otherwise `rpo history embed` does it later."""
    from rpo_local import embed

    if embed.problem() is None:
        _embed(store, profile, quiet=False)


def _embed(store: Store, profile: str, quiet: bool) -> int:
    from rpo_local import embed

    embedder = embed.get_embedder()
    total = store.count_embedding_todo(store.get_profile(profile).id, embedder.model_id)
    if not total:
        return 0
    with progress(total, quiet, "embed", "items") as on_progress:
        return embed.embed_missing(store, profile, embedder, on_progress=on_progress)


@app.command("embed")
def embed_cmd(
    profile: ProfileOpt = None,
    all_profiles: Annotated[bool, typer.Option("--all", help="Every profile")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Compute the embeddings dense and hybrid retrieval search (`retriever` in the config).

    Exports the embedding model to ONNX first if needed (once; that needs the [retrieval-export]
    extra). Only items without a vector from the current model are embedded, so it is cheap to
    rerun; `history add` and `import` embed new items by themselves once the model is exported.
    """
    from rpo_local import embed
    from rpo_local.extras import require

    require("retrieval", "rpo history embed")
    folder = embed.model_dir()
    if embed.problem(folder) is not None and not quiet:
        note(f"exporting {embed.MODEL_NAME} to ONNX into {folder} (once)")
    embed.export(folder)
    with open_store() as store:
        store.check_writable()
        names = [p["name"] for p in store.list_profiles()] if all_profiles else [profile_name(profile)]
        done = {name: _embed(store, name, quiet) for name in names}
        embedder = embed.get_embedder()
    if not quiet:
        note(f"embedded {sum(done.values())} item(s) with {embedder.model_id} on {embedder.provider}")
    if json_out:
        print_json({"model": embedder.model_id, "provider": embedder.provider, "embedded": done})
    else:
        for name, count in done.items():
            print(f"{name}\t{count}")


@app.command("import")
def import_(
    paths: Annotated[list[Path], typer.Argument(help="Text/Markdown files, JSONL, or an llm logs.db")],
    profile: ProfileOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="auto, text, jsonl or llm")] = "auto",
    split: Annotated[str, typer.Option("--split", help="Text files: 'paragraph' or 'file' per item")] = "paragraph",
    kind: KindOpt = "note",
    json_out: JsonOpt = False,
) -> None:
    """Import existing writing in bulk (duplicates are skipped)."""
    from rpo_local.errors import InputError
    from rpo_local.importers import FORMATS, iter_items

    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}")
    if split not in ("paragraph", "file"):
        raise InputError("--split must be 'paragraph' or 'file'")
    items: list[dict] = []
    try:
        for path in paths:  # all parsed before any write: one bad file or line imports nothing
            found = list(iter_items(path, fmt=fmt, split=split, kind=kind))
            if not found:
                note(f"{path}: no text in it (empty, or blank lines only); nothing to import from it")
            items.extend(found)
        _add(items, profile, json_out)
    except InputError as exc:
        raise InputError(f"{exc.message}; nothing was imported") from None


@app.command("list")
def list_(
    profile: ProfileOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1)] = 20,
    offset: Annotated[int, typer.Option("--offset", min=0)] = 0,
    kind: Annotated[str | None, typer.Option("--kind")] = None,
    json_out: JsonOpt = False,
) -> None:
    """List the newest items of a profile."""
    with open_store() as store:
        rows = store.list_items(profile_name(profile), limit=limit, offset=offset, kind=kind)
    _print_items(rows, json_out)


@app.command("search")
def search(
    query: Annotated[str, typer.Argument(help="Words to find (the last one may be a prefix)")],
    profile: ProfileOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1)] = 20,
    json_out: JsonOpt = False,
) -> None:
    """Full-text search of a profile's history (BM25 ranked)."""
    with open_store() as store:
        rows = store.search_items(profile_name(profile), query, limit=limit)
    _print_items(rows, json_out)


@app.command("show")
def show(item_id: Annotated[int, typer.Argument(help="Item id")], json_out: JsonOpt = False) -> None:
    """Show one item in full."""
    with open_store() as store:
        item = store.get_item(item_id)
    if json_out:
        print_json(item)
    else:
        print(item["text"])
        note(f"#{item['id']} {item['kind']} in {item['profile']!r}, {item['created_at']}, from {item['source']}")


@app.command("forget")
def forget(
    item_ids: Annotated[list[int], typer.Argument(help="Item id(s) to delete for good")],
    json_out: JsonOpt = False,
) -> None:
    """Delete items for real: the row and its search-index entry."""
    with open_store() as store:
        for item_id in item_ids:
            store.get_item(item_id)  # all ids checked before anything is deleted
        gone = [store.forget_item(i)["id"] for i in item_ids]
    note(f"forgot {len(gone)} item(s)")
    if json_out:
        print_json({"forgotten": gone})


def _print_items(rows: list[dict], json_out: bool) -> None:
    if json_out:
        print_json(rows)
        return
    for row in rows:
        text = " ".join(row["text"].split())
        sys.stdout.write(f"{row['id']}\t{row['kind']}\t{text[:100] + ('…' if len(text) > 100 else '')}\n")


@profiles_app.command("list")
def profiles_list(json_out: JsonOpt = False) -> None:
    """List profiles with their item counts."""
    with open_store() as store:
        rows = store.list_profiles()
    if json_out:
        print_json(rows)
    else:
        for row in rows:
            print(f"{row['name']}\t{row['items']} items")

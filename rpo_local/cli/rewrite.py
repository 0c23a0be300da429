"""`rpo rewrite`: a Unix filter from a generic reply to the user's own style."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rpo_local.cli._common import JsonOpt, ProfileOpt, RetrieverOpt, note, print_json, read_input, with_retriever

if TYPE_CHECKING:
    from rpo_local.reflect import Reflector, RewriteResult


def rewrite(
    file: Annotated[Path | None, typer.Argument(help="File with the generic reply [default: stdin]")] = None,
    profile: ProfileOpt = None,
    k: Annotated[int | None, typer.Option("--k", "-k", min=0, help="Profile items to retrieve")] = None,
    retriever: RetrieverOpt = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="GGUF reflection model")] = None,
    adapter: Annotated[str | None, typer.Option("--adapter", help="Adapter name/id/path, or 'none'")] = None,
    style: Annotated[bool | None, typer.Option("--style/--no-style", help="Steer with the profile's style vector (`rpo style build`) [default: configured]")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the rewrite to FILE (atomically)")] = None,
    json_out: JsonOpt = False,
    show_trajectory: Annotated[bool, typer.Option("--show-trajectory", "-t", help="Print the trajectory on stderr")] = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print the rewrite as it is generated")] = True,
    log: Annotated[bool, typer.Option("--log/--no-log", help="Record the interaction in the database")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No notes on stderr")] = False,
) -> None:
    """Rewrite a generic reply (stdin or FILE) in the profile's style; only the rewrite goes to stdout.

    The reply is rewritten piece by piece (sentences, list items, headings); code, tables, markup
    and whitespace come back byte for byte, and so does every piece the model gives no usable
    rewrite for. A final newline is added only where the text has none.
    """
    from rpo_local.config import load_config
    from rpo_local.session import open_reflector
    from rpo_local.store import Store

    text = read_input(file, what="generic reply")
    config = with_retriever(load_config(), retriever)
    if k is not None:
        config.k = k
    store = Store.open()
    if log:
        store.check_writable()  # before the model loads; --no-log works on a read-only database
    reflector = open_reflector(config, profile=profile, model=model, adapter=adapter, store=store, style=style)
    profile = config.profile if profile is None else profile
    on_note = None if quiet else note
    if json_out:
        result = reflector.rewrite(text, profile, log=log, on_note=on_note, source="cli")
        if output:
            _write_file(output, result.rewrite)
        print_json(result.to_dict())
        return
    if output:
        result = _rewrite_to_file(reflector, text, profile, output, stream, log, on_note)
    else:
        sink = _stdout_sink if stream else None
        result = reflector.rewrite(text, profile, log=log, on_text=sink, on_note=on_note, source="cli")
        if not stream:
            sys.stdout.write(result.rewrite)
        sys.stdout.write(_final_newline(result.rewrite))
        sys.stdout.flush()
    if show_trajectory:
        _print_trajectory(result.trajectory)


def _stdout_sink(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _rewrite_to_file(reflector: Reflector, text: str, profile: str, output: Path, stream: bool, log: bool,
                     on_note: Callable[[str], None] | None) -> RewriteResult:
    """Stream into a temporary file beside OUTPUT, renamed over it only when complete."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:

            def sink(chunk: str) -> None:
                fh.write(chunk)
                fh.flush()

            result = reflector.rewrite(
                text, profile, log=log, on_text=sink if stream else None, on_note=on_note, source="cli"
            )
            if not stream:
                fh.write(result.rewrite)
            fh.write(_final_newline(result.rewrite))
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return result


def _write_file(path: Path, text: str) -> None:
    from rpo_local.fsutil import atomic_write_text

    atomic_write_text(path, text + _final_newline(text))


def _final_newline(text: str) -> str:
    """What ends the output: a text file's final newline, unless the text has one already."""
    return "" if text.endswith(("\n", "\r")) else "\n"


def _print_trajectory(trajectory: dict | list[dict]) -> None:
    parts = trajectory if isinstance(trajectory, list) else [trajectory]
    for n, part in enumerate(parts, 1):
        if len(parts) > 1:
            state = "rewritten" if part.get("rewritten") else "kept as it was"
            print(f"piece {n}/{len(parts)} ({state}): {part.get('piece', '')}", file=sys.stderr)
        for key in ("style", "diff", "edits", "answer", "problem"):
            if part.get(key):
                print(f"{key:>7}: {part[key]}", file=sys.stderr)

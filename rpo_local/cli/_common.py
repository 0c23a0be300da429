"""Shared pieces of the CLI: stderr messages, JSON output, reading input, opening the store."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rpo_local.errors import InputError

if TYPE_CHECKING:
    from rpo_local.config import Config
    from rpo_local.store import Store


def _valid_profile(value: str | None) -> str | None:
    """--profile as given, refused (exit 3) unless a valid name: "" never means the default."""
    from rpo_local.names import check_profile

    return None if value is None else check_profile(value)


ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile", "-p", callback=_valid_profile, help="Profile (user/persona) to use [default: configured]"
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document")]


def _valid_retriever(value: str | None) -> str | None:
    from rpo_local.retrieve import RETRIEVERS

    if value is not None and value not in RETRIEVERS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(RETRIEVERS)}")
    return value


RetrieverOpt = Annotated[
    str | None,
    typer.Option("--retriever", callback=_valid_retriever,
                 help="auto, bm25, dense or hybrid (dense and hybrid need `rpo history embed`; auto: dense where it can run) [default: configured]"),
]


def with_retriever(config: Config, retriever: str | None) -> Config:
    """`config` with --retriever applied when given."""
    if retriever is not None:
        config.retriever = retriever
    return config


def err(message: str) -> None:
    """A diagnostic line on stderr (never stdout)."""
    print(message, file=sys.stderr, flush=True)


def note(message: str) -> None:
    err(f"rpo: {message}")


def use_color() -> bool:
    return "NO_COLOR" not in os.environ and sys.stderr.isatty()


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")
    sys.stdout.flush()


def decode_input(data: bytes, origin: str) -> str:
    """Validate and decode user input: no binary, strict UTF-8, not empty."""
    if b"\x00" in data:
        raise InputError(f"{origin}: binary data (NUL bytes); rpo rewrites text only")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{origin}: not valid UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start})"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise InputError(f"{origin}: input is empty")
    control = next((i for i, ch in enumerate(text) if ch in _CONTROL), None)
    if control is not None:
        raise InputError(
            f"{origin}: control character U+{ord(text[control]):04X} at offset {control}; rpo rewrites text only"
        )
    return text


# C0 and C1 control characters other than tab, line feed, vertical tab, form feed, carriage return.
_CONTROL = frozenset(map(chr, [*range(0x09), *range(0x0E, 0x20), *range(0x7F, 0xA0)]))


def read_input(path: Path | None, *, what: str = "text") -> str:
    """Read from a file argument, or from stdin when it is piped; refuse a bare terminal."""
    if path is not None and str(path) != "-":
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from None
        return decode_input(data, str(path))
    if sys.stdin is None or sys.stdin.isatty():
        raise typer.BadParameter(f"no input: pipe the {what} in, or pass a file", param_hint="FILE")
    return decode_input(sys.stdin.buffer.read(), "stdin")


def open_store() -> Store:
    from rpo_local.store import Store  # here: the CLI starts without the store module

    return Store.open()


def profile_name(profile: str | None) -> str:
    """The profile a verb acts on: --profile when given, else the configured one."""
    from rpo_local.config import load_config

    return load_config().profile if profile is None else profile


@contextmanager
def progress(total: int, quiet: bool, label: str, unit: str) -> Iterator:
    """A progress bar with ETA on stderr (plain lines when stderr is not a terminal)."""
    if quiet:
        yield None
        return
    if not sys.stderr.isatty():
        start, step, first, shown = time.perf_counter(), max(1, total // 20), [], [-1]

        def line(done: int, total: int) -> None:
            now = time.perf_counter()
            if not first:  # the rate is measured from the first report (a resumed run starts past zero)
                first.extend((now, done))
            if done // step > shown[0] or done == total:  # each 5%, also when counting in batches
                shown[0] = done // step
                rate = (now - first[0]) / (done - first[1]) if done > first[1] else None
                eta = f", ETA {rate * (total - done):.0f}s" if rate is not None else ""
                note(f"{label} {done}/{total} {unit}, {now - start:.0f}s elapsed{eta}")

        yield line
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as bar:
        job = bar.add_task(label, total=total)
        yield lambda done, _total: bar.update(job, completed=done)

"""Shared pieces of the CLI: stderr messages, JSON output, reading input, opening the store."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rpo_local.errors import InputError

if TYPE_CHECKING:
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

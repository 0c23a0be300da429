"""Error types with the exit code each one maps to on the command line.

Every code is distinct so scripts can tell a bad input from a missing model.
"""

from __future__ import annotations


class RpoError(Exception):
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InputError(RpoError):
    """Empty, binary or undecodable input, or a bad argument value."""

    exit_code = 3


class ModelError(RpoError):
    """Missing, unreadable or corrupt model or adapter file."""

    exit_code = 4


class ProfileNotFound(RpoError):
    exit_code = 5


class DatabaseError(RpoError):
    """Database from a newer schema, or not a database at all."""

    exit_code = 6


class ReadOnlyDatabase(RpoError):
    """The database (or its folder) cannot be written; the verbs that only read still work."""

    exit_code = 10


class UpstreamError(RpoError):
    """The base model (cloud or local upstream) failed."""

    exit_code = 7

    def __init__(self, message: str, status_code: int = 502) -> None:
        super().__init__(message)
        self.status_code = status_code


class NotFound(RpoError):
    """An item, interaction or adapter id that does not exist."""

    exit_code = 8


class ConfigError(RpoError):
    exit_code = 9


class AdapterMismatch(RpoError):
    """An adapter trained for another base model than the one configured."""

    exit_code = 11


class MissingExtra(RpoError):
    """A verb needs an optional part of rpo-local that is not installed (e.g. `[train]`)."""

    exit_code = 12


class TrainingBusy(RpoError):
    """Another process is training the same profile (one run per profile at a time)."""

    exit_code = 13


class GpuError(RpoError):
    """The GPU asked for cannot be used: a build without its backend, no driver, too little
    memory; and falling back to the CPU was not allowed (`cpu_fallback`)."""

    exit_code = 14


EXIT_INTERRUPTED = 130


def describe_error(exc: BaseException) -> str:
    """One line for the user: an RpoError's own message, else the exception's type and text
    (the traceback goes to the log, not here)."""
    return exc.message if isinstance(exc, RpoError) else f"{type(exc).__name__}: {exc}"

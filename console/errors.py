"""Errors that reach the operator as one line.

Every failure an operator can fix (a config key, a DSN, a bucket, credentials, an id) is raised
as an ``AtcError`` whose message names the thing to fix. The CLI prints it as one line and exits
with ``exit_code``; the TUI shows it as a notification. Nothing else should reach the user as a
traceback.
"""

from __future__ import annotations


class AtcError(Exception):
    """An error with a one-line, operator-facing message."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # Keep it to one line whatever the cause text contains (server messages can be multi-line).
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(AtcError):
    """The configuration file or a setting in it is wrong."""


class DatabaseError(AtcError):
    """The database is unreachable, refused us, or a query failed."""


class StorageError(AtcError):
    """S3 is unreachable, the bucket is missing, or credentials are wrong."""


class BrokerError(AtcError):
    """The broker's HTTP API is unreachable or answered badly."""


class NotFound(AtcError):
    """An id given by the operator does not exist."""


class ReadOnlyError(AtcError):
    """A state-changing action was asked for while atc runs read-only."""


class Cancelled(AtcError):
    """A query was cancelled by the operator."""

    exit_code = 130

"""Database access with atc's session policy.

Every connection atc opens carries, from its very first statement (they are sent as startup
options, not SET commands that a failure could skip):

- ``application_name = atc/<operator>`` so other tools (and atc's own lock screen) can see us;
- ``statement_timeout``, ``lock_timeout`` and ``idle_in_transaction_session_timeout`` from config,
  so the console can never become one more lock holder in an incident;
- ``default_transaction_read_only = on`` in read-only mode.

Connections are autocommit by default: browsing never leaves a transaction open.
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from .config import Settings
from .errors import Cancelled, DatabaseError

_PASSWORD_IN_URI = re.compile(r"(://[^:/@]+:)([^@]*)(@)")
_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """A DSN fit for screens and logs: any password replaced by ***."""
    if not dsn:
        return "(libpq environment)"
    return _PASSWORD_KV.sub(r"\1***", _PASSWORD_IN_URI.sub(r"\1***\3", dsn))


def _pg_option(value: str) -> str:
    # libpq's options string splits on spaces; backslash-escape them.
    return str(value).replace("\\", "\\\\").replace(" ", "\\ ")


def session_options(settings: Settings, *, application_suffix: str = "") -> dict[str, Any]:
    """Keyword arguments for psycopg.connect that apply atc's session policy."""
    db = settings.database
    gucs = {
        "statement_timeout": db.statement_timeout,
        "lock_timeout": db.lock_timeout,
        "idle_in_transaction_session_timeout": db.idle_in_transaction_session_timeout,
    }
    if settings.read_only:
        gucs["default_transaction_read_only"] = "on"
    options = " ".join(f"-c {name}={_pg_option(value)}" for name, value in gucs.items())
    app = f"atc/{settings.operator_name}{application_suffix}"[:63]
    return {
        "application_name": app,
        "options": options,
        "connect_timeout": db.connect_timeout or None,
    }


def describe_target(dsn: str) -> str:
    """host:port/dbname of a DSN for one-line messages, without secrets."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn) if dsn else {}
    except psycopg.ProgrammingError:
        return redact_dsn(dsn)
    host = info.get("host") or "(default host)"
    port = info.get("port") or "5432"
    name = info.get("dbname") or "(default db)"
    return f"{host}:{port}/{name}"


def connect(
    settings: Settings,
    *,
    replica: bool = False,
    autocommit: bool = True,
    application_suffix: str = "",
) -> psycopg.Connection:
    """Open a connection with the session policy; failures become one-line DatabaseErrors."""
    dsn = settings.database.replica_dsn if replica and settings.database.replica_dsn else settings.database.dsn
    key = "database.replica_dsn" if replica and settings.database.replica_dsn else "database.dsn"
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise DatabaseError(f"{key} is not a valid connection string: {first_line(exc)}") from None
    try:
        conn = psycopg.connect(
            dsn,
            autocommit=autocommit,
            row_factory=dict_row,
            **session_options(settings, application_suffix=application_suffix),
        )
    except psycopg.OperationalError as exc:
        if settings.source == "(defaults)" and not dsn:
            from .config import default_config_path

            raise DatabaseError(
                f"no config file found (looked for {default_config_path()}) and the PG* environment points nowhere "
                f"that answers: pass --config PATH, set $ATC_CONFIG, or try `atc demo` ({first_line(exc)})"
            ) from None
        raise DatabaseError(
            f"cannot connect to the database at {describe_target(dsn)} (check {key} or PG* environment): {first_line(exc)}"
        ) from None
    return conn


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line
    return type(exc).__name__


def translate_error(exc: BaseException, what: str = "query") -> DatabaseError:
    """Turn a psycopg error into an operator-facing one-line error."""
    if isinstance(exc, psycopg.errors.QueryCanceled):
        text = first_line(exc)
        if "user request" in text:
            return Cancelled(f"{what} cancelled")
        return DatabaseError(f"{what} hit statement_timeout ({text}); raise database.statement_timeout or narrow it")
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return DatabaseError(f"{what} gave up waiting for a lock (lock_timeout): {first_line(exc)}")
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return DatabaseError(f"{what} refused: the session is read-only (read_only = true or a replica)")
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return DatabaseError(
            f"{what} failed: {first_line(exc)} — is this an AutoTest database, and has `atc db upgrade` been run?"
        )
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return DatabaseError(f"{what} refused: {first_line(exc)}")
    if isinstance(exc, psycopg.OperationalError):
        return DatabaseError(f"{what} failed, connection lost: {first_line(exc)}")
    return DatabaseError(f"{what} failed: {first_line(exc)}")


class Database:
    """One configured database target, handing out policy-carrying connections.

    Screens and commands call ``fetch`` for short reads. A long read can be cancelled from another
    thread with ``cancel()``: it sends a real cancel request, so the server-side query stops too.
    """

    def __init__(self, settings: Settings, *, replica: bool = False, application_suffix: str = "") -> None:
        self.settings = settings
        self.replica = replica
        self.application_suffix = application_suffix
        self._lock = threading.Lock()
        self._idle: list[psycopg.Connection] = []
        self._busy: set[psycopg.Connection] = set()

    # -- connections ---------------------------------------------------------------------------

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """Borrow a connection; broken ones are dropped, good ones reused."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None or conn.closed:
            conn = connect(self.settings, replica=self.replica, application_suffix=self.application_suffix)
        with self._lock:
            self._busy.add(conn)
        try:
            yield conn
        finally:
            with self._lock:
                self._busy.discard(conn)
                reusable = not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                if reusable and len(self._idle) < 4:
                    self._idle.append(conn)
                    conn = None
            if conn is not None and not conn.closed:
                conn.close()

    def cancel(self) -> None:
        """Cancel every query currently running through this Database (server side)."""
        with self._lock:
            busy = list(self._busy)
        for conn in busy:
            try:
                conn.cancel_safe(timeout=3)
            except Exception:
                pass

    def close(self) -> None:
        with self._lock:
            conns = self._idle + list(self._busy)
            self._idle.clear()
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass

    # -- queries -------------------------------------------------------------------------------

    def fetch(self, query: str | sql.Composable, params: Sequence[Any] | dict[str, Any] | None = None,
              *, what: str = "query") -> list[dict[str, Any]]:
        try:
            with self.connection() as conn:
                return conn.execute(query, params).fetchall()
        except psycopg.Error as exc:
            raise translate_error(exc, what) from None

    def fetch_one(self, query: str | sql.Composable, params: Sequence[Any] | dict[str, Any] | None = None,
                  *, what: str = "query") -> dict[str, Any] | None:
        rows = self.fetch(query, params, what=what)
        return rows[0] if rows else None

    def execute(self, query: str | sql.Composable, params: Sequence[Any] | dict[str, Any] | None = None,
                *, what: str = "statement") -> int:
        try:
            with self.connection() as conn:
                cur = conn.execute(query, params)
                return cur.rowcount
        except psycopg.Error as exc:
            raise translate_error(exc, what) from None

    def ping(self) -> dict[str, Any]:
        """Check the connection; returns server facts for the status line."""
        row = self.fetch_one(
            "SELECT current_database() AS database, current_user AS role, "
            "current_setting('server_version') AS server_version, "
            "current_setting('server_version_num')::int AS server_version_num, "
            "pg_is_in_recovery() AS in_recovery",
            what="connection check",
        )
        assert row is not None
        return row

    def describe(self) -> str:
        dsn = self.settings.database.replica_dsn if self.replica and self.settings.database.replica_dsn else self.settings.database.dsn
        return describe_target(dsn)


@dataclass(frozen=True)
class Page:
    """One keyset page of a list: rows plus the key to continue after, if there is more."""

    rows: list[dict[str, Any]]
    next_after: Any | None

    @property
    def has_more(self) -> bool:
        return self.next_after is not None

"""Cancel or terminate backends safely: re-check identity, report the real outcome, audit it.

Pids get reused, so a target is a pid *and* the ``backend_start`` seen when the operator chose it.
The re-check and the signal are one statement (``SIGNAL_CANCEL`` / ``SIGNAL_TERMINATE``): the
function runs only on the row whose pid and backend_start still match. Roles are not pre-checked:
the server decides, and a refusal is reported per pid as "permission denied".

Signals go through their own ``Database`` (application_name ``atc/<operator>/signal``), never the
poll's connection, so a stuck refresh cannot hold up a terminate (Dolphie does the same for kill).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable

import psycopg

from .audit import audited, require_writable
from .config import Settings
from .db import Database, first_line, translate_error
from .errors import AtcError
from .locks import decode_query
from .text import one_line

ACTIONS = ("cancel", "terminate")

# Current identity of the given pids. Reads pg_stat_activity only (no lock). backend_start is NULL
# for other roles' sessions unless we have pg_read_all_stats; then the pid cannot be re-verified.
LOOKUP_SESSIONS = """
SELECT a.pid, a.backend_start, a.usename AS user, a.datname AS database, a.application_name,
       host(a.client_addr) AS client_addr, a.state, a.backend_type,
       extract(epoch FROM now() - a.xact_start)::float8 AS xact_age,
       textsend(a.query) AS query_bytes, pg_encoding_to_char(d.encoding) AS query_encoding
FROM pg_stat_activity a LEFT JOIN pg_database d ON d.oid = a.datid
WHERE a.pid = ANY(%s::int[])
"""

# Re-check and signal in one statement: the function is evaluated only for the row whose
# backend_start still matches. Takes no lock.
SIGNAL_CANCEL = """
SELECT pid, pg_cancel_backend(pid) AS sent FROM pg_stat_activity
WHERE pid = %(pid)s AND backend_start IS NOT DISTINCT FROM %(backend_start)s AND pid <> pg_backend_pid()
"""
SIGNAL_TERMINATE = """
SELECT pid, pg_terminate_backend(pid) AS sent FROM pg_stat_activity
WHERE pid = %(pid)s AND backend_start IS NOT DISTINCT FROM %(backend_start)s AND pid <> pg_backend_pid()
"""
# Is that exact session still there? (after terminate, to report whether it exited)
STILL_THERE = """
SELECT count(*) AS n FROM pg_stat_activity WHERE pid = %(pid)s AND backend_start IS NOT DISTINCT FROM %(backend_start)s
"""
OWN_PID = "SELECT pg_backend_pid() AS pid"

SIGNALLED = "signalled"
ALREADY_GONE = "already gone"
PERMISSION_DENIED = "permission denied"
REFUSED = "refused"
FAILED = "failed"


def check_pids(pids: Iterable[int]) -> list[int]:
    """Pids typed by an operator, checked: a server process id is a positive integer. Raises an
    AtcError naming the first bad one (pid 0 in the lock view is a prepared transaction)."""
    checked = []
    for pid in pids:
        if int(pid) <= 0:
            raise AtcError(f"pid {pid} is not a server process id (pids are positive; a prepared transaction, "
                           f"shown as pid 0, is ended with COMMIT PREPARED or ROLLBACK PREPARED)")
        checked.append(int(pid))
    return checked


@dataclass(frozen=True)
class SignalTarget:
    """One session to signal, as the operator saw it."""

    pid: int
    backend_start: datetime | None
    user: str | None = None
    database: str | None = None
    application_name: str = ""
    state: str | None = None
    query: str = ""

    def describe(self) -> str:
        """One plain line for confirmation prompts and modals."""
        started = self.backend_start.isoformat(timespec="seconds") if self.backend_start else "start hidden"
        who = "/".join(x for x in (self.user or "?", self.database or "?") if x)
        app = f" {one_line(self.application_name, 30)}" if self.application_name else ""
        return f"pid {self.pid} ({who}{app}, {self.state or '?'}, since {started}): {one_line(self.query, 80)}"

    def audit_target(self) -> dict[str, Any]:
        return {"pid": self.pid, "backend_start": self.backend_start}


@dataclass
class SignalOutcome:
    pid: int
    backend_start: datetime | None
    outcome: str
    message: str = ""
    exited: bool | None = None   # terminate only: did the session disappear within the wait

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "backend_start": self.backend_start, "outcome": self.outcome,
                "message": self.message, "exited": self.exited}


@dataclass
class SignalReport:
    action: str
    outcomes: list[SignalOutcome] = field(default_factory=list)
    audit_id: int | None = None

    @property
    def summary(self) -> str:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.outcome] = counts.get(o.outcome, 0) + 1
        return ", ".join(f"{n} {what}" for what, n in counts.items()) or "nothing to do"

    @property
    def all_signalled(self) -> bool:
        return bool(self.outcomes) and all(o.outcome == SIGNALLED for o in self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "summary": self.summary, "audit_id": self.audit_id,
                "outcomes": [o.as_dict() for o in self.outcomes]}


class Signaller:
    """Owns the signalling connection (separate from any poll)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings, application_suffix="/signal")

    def close(self) -> None:
        self.db.close()

    def lookup(self, pids: Iterable[int]) -> list[SignalTarget]:
        """Targets for pids typed by an operator (CLI): their identity right now."""
        wanted = list(dict.fromkeys(check_pids(pids)))
        rows = self.db.fetch(LOOKUP_SESSIONS, (wanted,), what="session lookup")
        found = {r["pid"]: r for r in rows}
        targets = []
        for pid in wanted:
            r = found.get(pid)
            if r is None:
                targets.append(SignalTarget(pid=pid, backend_start=None, state="(no such session)"))
                continue
            targets.append(SignalTarget(
                pid=pid, backend_start=r["backend_start"], user=r["user"], database=r["database"],
                application_name=r["application_name"] or "", state=r["state"] or r["backend_type"],
                query=decode_query(r["query_bytes"], r["query_encoding"]),
            ))
        return targets

    def signal(self, action: str, targets: list[SignalTarget], *, reason: str,
               exit_wait: float = 2.0) -> SignalReport:
        """Cancel or terminate each target; one audit row with every pid's outcome."""
        if action not in ACTIONS:
            raise AtcError(f"unknown action {action!r} (use cancel or terminate)")
        require_writable(self.settings, action)
        if not reason.strip():
            raise AtcError(f"{action} needs a reason (--reason), recorded in the audit trail")
        if not targets:
            raise AtcError(f"{action}: no sessions given")
        # A pid-0 target (a prepared transaction picked on the lock screen) gets its own "refused"
        # outcome below, recorded in the audit row; a negative pid is never a session.
        check_pids(t.pid for t in targets if t.pid != 0)
        report = SignalReport(action=action)
        statement = SIGNAL_CANCEL if action == "cancel" else SIGNAL_TERMINATE
        with audited(self.db, self.settings, action, [t.audit_target() for t in targets], reason=reason) as entry:
            try:
                with self.db.connection() as conn:
                    own = conn.execute(OWN_PID).fetchone()["pid"]
                    for target in targets:
                        report.outcomes.append(_signal_one(conn, statement, target, own))
                    if action == "terminate" and exit_wait > 0:
                        _wait_for_exit(conn, report.outcomes, exit_wait)
            except psycopg.Error as exc:
                raise translate_error(exc, action) from None
            entry.outcome = "ok" if report.all_signalled else report.summary
            entry.details = {"outcomes": [o.as_dict() for o in report.outcomes]}
        return report


def _signal_one(conn: psycopg.Connection, statement: str, target: SignalTarget, own_pid: int) -> SignalOutcome:
    params = {"pid": target.pid, "backend_start": target.backend_start}
    if target.pid == own_pid:
        return SignalOutcome(target.pid, target.backend_start, REFUSED, "that is atc's own signalling session")
    if target.pid <= 0:
        return SignalOutcome(target.pid, target.backend_start, REFUSED,
                             "pid 0 is a prepared transaction: COMMIT PREPARED or ROLLBACK PREPARED it instead")
    try:
        row = conn.execute(statement, params).fetchone()
    except psycopg.errors.InsufficientPrivilege as exc:
        detail = exc.diag.message_detail
        message = first_line(exc) + (f" ({' '.join(detail.split())})" if detail else "")
        return SignalOutcome(target.pid, target.backend_start, PERMISSION_DENIED, message)
    except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable) as exc:
        return SignalOutcome(target.pid, target.backend_start, FAILED, first_line(exc))
    if row is None:
        now = conn.execute(LOOKUP_SESSIONS, ([target.pid],)).fetchone()
        message = "pid now belongs to a newer session; not signalled" if now else "the session has ended"
        return SignalOutcome(target.pid, target.backend_start, ALREADY_GONE, message)
    if not row["sent"]:
        # The server returns false (with a warning) when the process is no longer a backend.
        return SignalOutcome(target.pid, target.backend_start, ALREADY_GONE, "the process is no longer a backend")
    note = "" if target.backend_start is not None else "backend_start not visible to this role; pid not re-verified"
    return SignalOutcome(target.pid, target.backend_start, SIGNALLED, note)


def _wait_for_exit(conn: psycopg.Connection, outcomes: list[SignalOutcome], timeout: float) -> None:
    pending = [o for o in outcomes if o.outcome == SIGNALLED]
    deadline = time.monotonic() + timeout
    while pending:
        still = []
        for o in pending:
            n = conn.execute(STILL_THERE, {"pid": o.pid, "backend_start": o.backend_start}).fetchone()["n"]
            if n:
                still.append(o)
            else:
                o.exited = True
        pending = still
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for o in pending:
        o.exited = False


def signal_backends(settings: Settings, action: str, targets: list[SignalTarget], *, reason: str) -> SignalReport:
    """Convenience wrapper: a fresh Signaller for one action."""
    signaller = Signaller(settings)
    try:
        return signaller.signal(action, targets, reason=reason)
    finally:
        signaller.close()

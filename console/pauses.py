"""Pause and resume assignments: stop new AutoTest work from being dispatched for them.

A pause is an append-only row in ``atc.pause_event``; the current state of an assignment is its
latest event (paused, unless it has expired). Nothing here updates the application's
``"Assignment"`` row, so a pause commits in milliseconds even while other sessions hold
``FOR UPDATE`` locks on that assignment's rows (the outage case: exactly when you need it).

How a broker honours pauses (the reference simulator in ``console.broker_sim`` does this):

1. its claim statement checks ``CURRENT_PAUSES_CTE`` *inside* the same statement that picks and
   claims the job (``... NOT EXISTS (paused) ... FOR UPDATE SKIP LOCKED``), so no window exists
   between "is it paused?" and "claim it";
2. it takes the *shared* pause fence (``pg_advisory_xact_lock_shared(PAUSE_FENCE_KEY)``) right
   before that statement. ``pause_assignments`` takes the fence *exclusively* for the moment of its
   insert, so a claim whose snapshot predates the pause cannot commit after the pause is reported
   done. The fence wait is bounded (``FENCE_WAIT``): if a broker claim is stuck holding it, the pause
   still commits, unfenced, and says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterable, Sequence

import psycopg

from .audit import audited, require_writable
from .config import Settings
from .db import Database, translate_error
from .errors import AtcError, NotFound

# Advisory lock key shared by atc and brokers that honour pauses (see module docstring).
PAUSE_FENCE_KEY = 0x0A7C_0002
# How long a pause waits for in-flight broker claims before committing unfenced.
FENCE_WAIT = "250ms"

# The rule for "currently paused": the latest event of each assignment says paused and has not
# expired. A CTE body so claim statements, listings and starvation checks share one definition.
# Reads atc.pause_event only (index pause_event_latest); no locks, no application table.
# The one rule for "currently paused": the LATEST event of an assignment says paused and has not
# expired. ``{e}`` is the alias of an atc.pause_event row. Browse screens use it per row; the CTE
# below uses it for claims and detection.
PAUSE_ACTIVE_PREDICATE = "({e}.paused AND ({e}.expires_at IS NULL OR {e}.expires_at > now()))"

CURRENT_PAUSES_CTE = f"""
current_pause AS (
    SELECT latest.*
    FROM (
        SELECT DISTINCT ON (e.assignment_id)
               e.assignment_id, e.paused, e.operator, e.db_role, e.reason, e.at, e.expires_at
        FROM atc.pause_event e
        ORDER BY e.assignment_id, e.id DESC
    ) latest
    WHERE {PAUSE_ACTIVE_PREDICATE.format(e="latest")}
)
"""

# Currently paused assignments with who/when/why. Joins "Assignment" only for the name (a plain
# MVCC read: never waits on the row locks an outage is made of). No log column anywhere.
LIST_CURRENT_PAUSES = f"""
WITH {CURRENT_PAUSES_CTE}
SELECT p.assignment_id, a.name AS assignment_name, p.operator, p.db_role, p.reason, p.at AS paused_at,
       p.expires_at
FROM current_pause p
LEFT JOIN "Assignment" a ON a.id = p.assignment_id
WHERE (%(ids)s::int[] IS NULL OR p.assignment_id = ANY(%(ids)s))
ORDER BY p.at DESC
"""

# Full event history (newest first), for `atc pauses --history`. atc schema only.
LIST_PAUSE_EVENTS = """
SELECT e.id, e.assignment_id, e.paused, e.operator, e.db_role, e.reason, e.at, e.expires_at
FROM atc.pause_event e
WHERE (%(ids)s::int[] IS NULL OR e.assignment_id = ANY(%(ids)s))
ORDER BY e.id DESC
LIMIT %(limit)s
"""

# Existence check of the ids an operator typed. Plain read, no row lock, no log.
ASSIGNMENTS_BY_ID = 'SELECT id, name FROM "Assignment" WHERE id = ANY(%s)'

# Exclusive pause fence, waited for at most FENCE_WAIT (SET LOCAL: this transaction only).
TAKE_FENCE = "SELECT pg_advisory_xact_lock(%s)"

# Appends events; touches only atc.pause_event.
INSERT_PAUSE_EVENTS = """
INSERT INTO atc.pause_event (assignment_id, paused, operator, reason, expires_at)
SELECT unnest(%(ids)s::int[]), %(paused)s, %(operator)s, %(reason)s, %(expires_at)s::timestamptz
RETURNING id, assignment_id, paused, operator, db_role, reason, at, expires_at
"""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """'90s', '15m', '2h', '1d' (a bare number is seconds) -> timedelta; ValueError names the input."""
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a duration (use e.g. 90s, 15m, 2h, 1d)")
    seconds = float(m.group(1)) * _UNIT_SECONDS[(m.group(2) or "s").lower()]
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class PauseResult:
    action: str  # "pause" or "resume"
    events: list[dict[str, Any]]
    # Assignment ids whose state did not change (already paused / not paused); still recorded.
    unchanged: list[int]
    # False when a broker claim held the pause fence longer than FENCE_WAIT (see module doc).
    fenced: bool
    elapsed_ms: float

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "events": self.events, "unchanged": self.unchanged,
                "fenced": self.fenced, "elapsed_ms": round(self.elapsed_ms, 2)}


def _normalise_ids(ids: Iterable[int | str]) -> list[int]:
    out: list[int] = []
    for raw in ids:
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise AtcError(f"assignment id {raw!r} is not a number") from None
        if value <= 0:
            raise AtcError(f"assignment id {value} is not valid (ids are positive)")
        if value not in out:
            out.append(value)
    if not out:
        raise AtcError("name at least one assignment id")
    return out


def _check_assignments_exist(db: Database, ids: Sequence[int]) -> dict[int, str]:
    rows = db.fetch(ASSIGNMENTS_BY_ID, (list(ids),), what="assignment lookup")
    names = {r["id"]: r["name"] for r in rows}
    missing = [i for i in ids if i not in names]
    if missing:
        raise NotFound(f"no assignment with id {', '.join(map(str, missing))} (see `atc assignments`)")
    return names


def current_pauses(db: Database, ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Currently paused assignments with operator, time, reason and expiry."""
    return db.fetch(LIST_CURRENT_PAUSES, {"ids": list(ids) if ids else None}, what="pause listing")


def paused_map(db: Database, ids: Sequence[int] | None = None) -> dict[int, dict[str, Any]]:
    """assignment id -> its current pause (for marking rows as paused on any screen)."""
    return {row["assignment_id"]: row for row in current_pauses(db, ids)}


def pause_history(db: Database, ids: Sequence[int] | None = None, limit: int = 200) -> list[dict[str, Any]]:
    return db.fetch(LIST_PAUSE_EVENTS, {"ids": list(ids) if ids else None, "limit": limit}, what="pause history")


def _append_events(db: Database, settings: Settings, ids: list[int], *, paused: bool, reason: str,
                   expires_at: datetime | None) -> tuple[list[dict[str, Any]], bool]:
    """Insert the events in one short transaction, behind the pause fence when it can be had."""
    params = {"ids": ids, "paused": paused, "operator": settings.operator_name, "reason": reason,
              "expires_at": expires_at}
    try:
        with db.connection() as conn:
            fenced = True
            try:
                with conn.transaction():
                    conn.execute(f"SET LOCAL lock_timeout = '{FENCE_WAIT}'")
                    conn.execute(TAKE_FENCE, (PAUSE_FENCE_KEY,))
                    rows = conn.execute(INSERT_PAUSE_EVENTS, params).fetchall()
            except psycopg.errors.LockNotAvailable:
                # A broker claim is stuck holding the shared fence: do not wait behind it.
                fenced = False
                with conn.transaction():
                    rows = conn.execute(INSERT_PAUSE_EVENTS, params).fetchall()
            return rows, fenced
    except psycopg.Error as exc:
        raise translate_error(exc, "pause" if paused else "resume") from None


def pause_assignments(db: Database, settings: Settings, ids: Iterable[int | str], *, reason: str,
                      duration: timedelta | None = None) -> PauseResult:
    """Pause assignments (audited). Commits even while their rows are locked by others."""
    import time

    require_writable(settings, "pause")
    id_list = _normalise_ids(ids)
    reason = (reason or "").strip()
    if not reason:
        raise AtcError("a pause needs a reason (--reason TEXT); it is shown to everyone who sees the pause")
    with audited(db, settings, "pause", id_list, reason=reason) as entry:
        _check_assignments_exist(db, id_list)
        before = paused_map(db, id_list)
        started = time.perf_counter()
        expires_at = None
        if duration is not None:
            row = db.fetch_one("SELECT now() + %s::interval AS at", (duration,), what="pause expiry")
            expires_at = row["at"] if row else None
        rows, fenced = _append_events(db, settings, id_list, paused=True, reason=reason, expires_at=expires_at)
        elapsed = (time.perf_counter() - started) * 1000
        unchanged = [i for i in id_list if i in before]
        entry.details = {"expires_at": expires_at, "fenced": fenced, "already_paused": unchanged,
                         "event_ids": [r["id"] for r in rows]}
        if not fenced:
            entry.outcome = "ok (unfenced: a broker claim was in flight)"
    return PauseResult("pause", rows, unchanged, fenced, elapsed)


def resume_assignments(db: Database, settings: Settings, ids: Iterable[int | str], *,
                       reason: str = "") -> PauseResult:
    """Resume assignments (audited): appends a 'not paused' event for each."""
    import time

    require_writable(settings, "resume")
    id_list = _normalise_ids(ids)
    with audited(db, settings, "resume", id_list, reason=reason) as entry:
        _check_assignments_exist(db, id_list)
        before = paused_map(db, id_list)
        started = time.perf_counter()
        rows, fenced = _append_events(db, settings, id_list, paused=False, reason=reason, expires_at=None)
        elapsed = (time.perf_counter() - started) * 1000
        unchanged = [i for i in id_list if i not in before]
        entry.details = {"was_not_paused": unchanged, "event_ids": [r["id"] for r in rows]}
    return PauseResult("resume", rows, unchanged, fenced, elapsed)


def runners_of_assignments(client, ids: Sequence[int]) -> list[dict[str, Any]]:
    """Runners the broker says are working on a job of these assignments (for 'also stop runners')."""
    wanted = {int(i) for i in ids}
    jobs = {j["id"]: j for j in client.jobs()}
    out = []
    for runner in client.runners():
        job = jobs.get(runner.get("job_id"))
        if job is None or runner.get("state") not in ("assigned", "running"):
            continue
        if _assignment_of(job) in wanted:
            out.append({**runner, "assignment_id": _assignment_of(job)})
    return out


def _assignment_of(job: dict[str, Any]) -> int | None:
    try:
        return int((job.get("job_metadata") or {}).get("assignment_id"))
    except (TypeError, ValueError):
        return None


def stop_runners(db: Database, settings: Settings, client, runner_ids: Sequence[str], *,
                 reason: str) -> list[dict[str, Any]]:
    """Ask the broker to stop runners (audited); returns what the broker answered per runner."""
    require_writable(settings, "stop runners")
    results = []
    with audited(db, settings, "stop-runners", list(runner_ids), reason=reason) as entry:
        for rid in runner_ids:
            results.append(client.stop_runner(rid))
        entry.details = {"stopped": results}
    return results

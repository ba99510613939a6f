"""The audit trail: one append-only row per state-changing action.

Every action goes through ``audited()``, which records the outcome whether the action succeeds or
fails, so no code path can forget it. ``db_role`` and ``client_addr`` are filled in by the server
(column defaults), not by atc, so a config file cannot forge them. atc has no UPDATE or DELETE path
on ``atc.audit``.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

from psycopg.types.json import Jsonb

from .config import Settings
from .db import Database
from .errors import AtcError, ReadOnlyError

# Inserts only into atc.audit; takes no lock on application tables.
INSERT_AUDIT = """
INSERT INTO atc.audit (operator, action, targets, reason, outcome, details)
VALUES (%(operator)s, %(action)s, %(targets)s, %(reason)s, %(outcome)s, %(details)s)
RETURNING id, at, db_role, host(client_addr) AS client_addr
"""

# Newest first, keyset on id; filters are bound parameters (NULL means "any").
LIST_AUDIT = """
SELECT id, at, operator, db_role, host(client_addr) AS client_addr, action, targets, reason, outcome, details
FROM atc.audit
WHERE (%(before_id)s::bigint IS NULL OR id < %(before_id)s)
  AND (%(operator)s::text IS NULL OR operator = %(operator)s)
  AND (%(action)s::text IS NULL OR action = %(action)s)
  AND (%(target)s::text IS NULL OR targets::text ILIKE '%%' || %(target)s || '%%')
  AND (%(since)s::timestamptz IS NULL OR at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR at < %(until)s)
ORDER BY id DESC
LIMIT %(limit)s
"""


@dataclass
class AuditEntry:
    action: str
    targets: list[Any]
    reason: str = ""
    outcome: str = "ok"
    details: dict[str, Any] = field(default_factory=dict)


def record(db: Database, settings: Settings, action: str, targets: list[Any], *, reason: str = "",
           outcome: str = "ok", details: dict[str, Any] | None = None) -> dict[str, Any]:
    row = db.fetch_one(
        INSERT_AUDIT,
        {
            "operator": settings.operator_name,
            "action": action,
            "targets": Jsonb(_jsonable(targets)),
            "reason": reason,
            "outcome": outcome,
            "details": Jsonb(_jsonable(details or {})),
        },
        what="audit write",
    )
    return row or {}


def require_writable(settings: Settings, action: str) -> None:
    if settings.read_only:
        raise ReadOnlyError(f"{action} refused: atc runs read-only ({settings.read_only_because})")


@contextmanager
def audited(db: Database, settings: Settings, action: str, targets: list[Any], *,
            reason: str = "") -> Iterator[AuditEntry]:
    """Run an action and record its outcome; a failure is recorded and re-raised.

    The body may set ``entry.outcome`` and ``entry.details`` to describe partial results.
    """
    require_writable(settings, action)
    entry = AuditEntry(action=action, targets=list(targets), reason=reason)
    try:
        yield entry
    except BaseException as exc:
        message = exc.message if isinstance(exc, AtcError) else f"{type(exc).__name__}: {exc}"
        try:
            record(db, settings, action, entry.targets, reason=reason, outcome=f"failed: {message}"[:500],
                   details=entry.details)
        except AtcError:
            pass  # the original failure matters more than the audit write's
        raise
    record(db, settings, action, entry.targets, reason=reason, outcome=entry.outcome, details=entry.details)


def list_audit(db: Database, *, before_id: int | None = None, operator: str | None = None,
               action: str | None = None, target: str | None = None, since: datetime | None = None,
               until: datetime | None = None, limit: int = 100) -> list[dict[str, Any]]:
    return db.fetch(LIST_AUDIT, {
        "before_id": before_id, "operator": operator, "action": action, "target": target,
        "since": since, "until": until, "limit": limit,
    }, what="audit listing")


# Operators and actions present in the trail, for filter choices (atc.audit is small; no lock
# beyond reading it).
AUDIT_FACETS = """
SELECT 'operator' AS facet, operator AS value, count(*) AS n FROM atc.audit GROUP BY operator
UNION ALL
SELECT 'action', action, count(*) FROM atc.audit GROUP BY action
ORDER BY facet, n DESC
"""


def audit_facets(db: Database) -> dict[str, list[str]]:
    """{"operator": [...], "action": [...]}, most frequent first."""
    out: dict[str, list[str]] = {"operator": [], "action": []}
    for row in db.fetch(AUDIT_FACETS, what="audit facets"):
        out[row["facet"]].append(row["value"])
    return out


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str | None, *, now: datetime | None = None, what: str = "--since") -> datetime | None:
    """'15m', '2h', '3d' (that long ago) or an ISO date/time (local time if no zone) -> aware datetime."""
    if text is None or not str(text).strip():
        return None
    now = now or datetime.now(timezone.utc)
    m = _RELATIVE.match(str(text))
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()])
    try:
        value = datetime.fromisoformat(str(text).strip())
    except ValueError:
        raise AtcError(f"{what} {text!r} is not a time (use e.g. 15m, 2h, 3d, 2024-04-12 or 2024-04-12T09:30)") from None
    return value if value.tzinfo else value.astimezone()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def describe_targets(targets: Any) -> str:
    """Audit targets as one short line: ``pid 4711; assignment_id=9`` (CLI table and audit screen)."""
    if not isinstance(targets, list):
        return str(targets or "")
    parts = []
    for t in targets:
        if isinstance(t, dict) and "pid" in t:
            parts.append(f"pid {t['pid']}")
        elif isinstance(t, dict):
            parts.append(",".join(f"{k}={v}" for k, v in t.items()))
        else:
            parts.append(str(t))
    return "; ".join(parts)

"""Database health: what would have shortened the outage, read cheaply and safely.

- the three timeouts that stop a lock pile-up (statement_timeout, lock_timeout,
  idle_in_transaction_session_timeout), resolved per application role the way the server does:
  role-in-database setting > role setting > database setting > server config file > built-in;
- sessions by state, lock waiters, the longest transaction and the oldest idle-in-transaction one;
- deadlocks and rollbacks since the statistics were reset, and their rates;
- connections used vs max_connections;
- the biggest tables, heap vs TOAST vs indexes, each size read in its own short transaction under
  a 100 ms lock_timeout: ``pg_relation_size`` takes AccessShareLock, and this view must never queue
  behind an AccessExclusiveLock (a table it cannot measure shows the catalog estimate instead).

Works as a non-superuser: what the role cannot see (other roles' query text and state without
pg_read_all_stats, config files without pg_read_all_settings) is listed in ``limits`` for a banner.
Nothing here reads a table's rows, so no log body is ever read.
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from .db import Database, translate_error
from .locks import decode_query
from .text import one_line

TIMEOUT_SETTINGS = ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
SIZE_LOCK_TIMEOUT = "100ms"

# What this role may see. Catalog only, no lock.
PRIVILEGES = """
SELECT current_user AS role, current_database() AS database,
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser,
       pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') AS read_all_stats,
       pg_has_role(current_user, 'pg_read_all_settings', 'USAGE') AS read_all_settings,
       current_setting('server_version_num')::int AS server_version_num,
       current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int AS superuser_reserved_connections,
       current_setting('deadlock_timeout') AS deadlock_timeout,
       pg_postmaster_start_time() AS postmaster_start
"""

# Per-database and per-role settings (ALTER DATABASE/ROLE ... SET) for this database and for all
# databases. A shared catalog readable by every role; no lock.
DB_ROLE_SETTINGS = """
SELECT s.setdatabase <> 0 AS for_database, r.rolname AS role, unnest(s.setconfig) AS config
FROM pg_db_role_setting s
LEFT JOIN pg_roles r ON r.oid = s.setrole
WHERE s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
"""

# Server-wide values from postgresql.conf / postgresql.auto.conf (needs pg_read_all_settings).
# Our own session's values come from atc's startup options and say nothing about the server's.
FILE_SETTINGS = """
SELECT name, setting, sourcefile, sourceline FROM pg_file_settings
WHERE name = ANY(%s) AND applied AND error IS NULL
"""

BOOT_SETTINGS = "SELECT name, boot_val FROM pg_settings WHERE name = ANY(%s)"

# The application's roles: those connected to this database (other than atc's own sessions),
# plus the database owner. pg_stat_activity and catalogs only; no lock.
APPLICATION_ROLES = """
SELECT DISTINCT usename AS role FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend' AND usename IS NOT NULL
  AND application_name NOT LIKE 'atc/%%'
UNION
SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()
"""

# Sessions by state, waits and connection use, server-wide, in one pass over pg_stat_activity.
# Other roles' sessions show NULL backend_type and state without pg_read_all_stats; those with a
# database are counted as "(hidden)" client sessions.
SESSION_COUNTS = """
SELECT coalesce(state, CASE WHEN backend_type IS NULL THEN '(hidden)' ELSE '(none)' END) AS state,
       count(*) AS sessions,
       count(*) FILTER (WHERE wait_event_type = 'Lock') AS lock_waiters,
       count(*) FILTER (WHERE datname = current_database()) AS in_this_database
FROM pg_stat_activity
WHERE (backend_type = 'client backend' OR (backend_type IS NULL AND datname IS NOT NULL))
  AND pid <> pg_backend_pid()
GROUP BY 1 ORDER BY 2 DESC
"""

# The longest-running transactions and the oldest idle-in-transaction sessions (top 5 each).
OLD_TRANSACTIONS = """
(SELECT 'longest' AS kind, a.pid, a.usename AS user, a.datname AS database, a.application_name, a.state,
        host(a.client_addr) AS client_addr,
        extract(epoch FROM now() - a.xact_start)::float8 AS age,
        textsend(a.query) AS query_bytes, pg_encoding_to_char(d.encoding) AS query_encoding
 FROM pg_stat_activity a LEFT JOIN pg_database d ON d.oid = a.datid
 WHERE a.xact_start IS NOT NULL AND a.pid <> pg_backend_pid() AND a.backend_type = 'client backend'
 ORDER BY a.xact_start LIMIT 5)
UNION ALL
(SELECT 'idle_in_transaction', a.pid, a.usename, a.datname, a.application_name, a.state,
        host(a.client_addr), extract(epoch FROM now() - a.state_change)::float8,
        textsend(a.query), pg_encoding_to_char(d.encoding)
 FROM pg_stat_activity a LEFT JOIN pg_database d ON d.oid = a.datid
 WHERE a.state IN ('idle in transaction', 'idle in transaction (aborted)') AND a.pid <> pg_backend_pid()
 ORDER BY a.state_change LIMIT 5)
"""

# Transaction outcomes and deadlocks for this database since its statistics were reset.
DATABASE_STATS = """
SELECT xact_commit, xact_rollback, deadlocks, conflicts,
       stats_reset, coalesce(stats_reset, pg_postmaster_start_time()) AS counting_since,
       extract(epoch FROM now() - coalesce(stats_reset, pg_postmaster_start_time()))::float8 AS seconds
FROM pg_stat_database WHERE datname = current_database()
"""

# Candidate big tables from catalog estimates (relpages, no lock), biggest first.
TABLE_CANDIDATES = """
SELECT c.oid, n.nspname AS schema, c.relname AS name, c.reltoastrelid AS toast_oid,
       (c.relpages::bigint + coalesce(t.relpages, 0)) * current_setting('block_size')::bigint AS estimated_bytes,
       c.relpages::bigint * current_setting('block_size')::bigint AS estimated_heap,
       coalesce(t.relpages, 0)::bigint * current_setting('block_size')::bigint AS estimated_toast
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'
ORDER BY estimated_bytes DESC, c.oid
LIMIT %s
"""

# Exact sizes of one table: takes AccessShareLock on it (and its TOAST table and indexes), so it
# runs alone in a transaction with a short lock_timeout.
TABLE_SIZE = """
SELECT pg_relation_size(%(oid)s) AS heap,
       CASE WHEN %(toast)s::oid <> 0 THEN pg_total_relation_size(%(toast)s::oid) ELSE 0 END AS toast,
       pg_indexes_size(%(oid)s) AS indexes
"""

_ZERO = re.compile(r"^\s*0+(\.0+)?\s*(us|ms|s|min|h|d)?\s*$")


def is_off(value: str | None) -> bool:
    """A timeout value that disables the timeout ('0', '0ms', empty)."""
    return value is None or value == "" or bool(_ZERO.match(str(value)))


@dataclass
class TimeoutSetting:
    role: str
    name: str
    value: str
    source: str   # "role in database", "role", "database", "server config <file>", "built-in default"

    @property
    def off(self) -> bool:
        return is_off(self.value)


@dataclass
class TableSize:
    schema: str
    name: str
    heap: int
    toast: int
    indexes: int | None
    exact: bool
    note: str = ""

    @property
    def total(self) -> int:
        return self.heap + self.toast + (self.indexes or 0)


@dataclass
class HealthSnapshot:
    taken_at: float
    elapsed_ms: float
    role: str
    database: str
    server_version_num: int
    timeouts: list[TimeoutSetting]
    warnings: list[str]
    limits: list[str]
    sessions_by_state: list[dict[str, Any]]
    lock_waiters: int
    active: int
    connections: int
    max_connections: int
    superuser_reserved_connections: int
    longest_transactions: list[dict[str, Any]]
    idle_in_transaction: list[dict[str, Any]]
    xact_commit: int
    xact_rollback: int
    deadlocks: int
    counting_since: datetime | None
    counting_seconds: float
    tables: list[TableSize]
    deadlock_timeout: str = ""

    @property
    def deadlocks_per_hour(self) -> float:
        return self.deadlocks / self.counting_seconds * 3600 if self.counting_seconds > 0 else 0.0

    @property
    def rollbacks_per_minute(self) -> float:
        return self.xact_rollback / self.counting_seconds * 60 if self.counting_seconds > 0 else 0.0

    @property
    def rollback_ratio(self) -> float:
        total = self.xact_commit + self.xact_rollback
        return self.xact_rollback / total if total else 0.0

    @property
    def connection_use(self) -> float:
        usable = max(1, self.max_connections - self.superuser_reserved_connections)
        return self.connections / usable

    def as_dict(self) -> dict[str, Any]:
        return {
            "taken_at": datetime.fromtimestamp(self.taken_at).astimezone(),
            "elapsed_ms": round(self.elapsed_ms, 2),
            "role": self.role, "database": self.database, "server_version_num": self.server_version_num,
            "warnings": self.warnings, "limits": self.limits,
            "timeouts": [{"role": t.role, "name": t.name, "value": t.value, "source": t.source, "off": t.off}
                         for t in self.timeouts],
            "sessions_by_state": self.sessions_by_state,
            "lock_waiters": self.lock_waiters, "active": self.active,
            "connections": {"used": self.connections, "max": self.max_connections,
                            "superuser_reserved": self.superuser_reserved_connections,
                            "use": round(self.connection_use, 4)},
            "longest_transactions": self.longest_transactions,
            "idle_in_transaction": self.idle_in_transaction,
            "transactions": {"commit": self.xact_commit, "rollback": self.xact_rollback,
                             "rollback_ratio": round(self.rollback_ratio, 4),
                             "rollbacks_per_minute": round(self.rollbacks_per_minute, 4)},
            "deadlocks": {"total": self.deadlocks, "per_hour": round(self.deadlocks_per_hour, 4),
                          "deadlock_timeout": self.deadlock_timeout},
            "counting_since": self.counting_since,
            "tables": [{"schema": t.schema, "name": t.name, "heap_bytes": t.heap, "toast_bytes": t.toast,
                        "index_bytes": t.indexes, "exact": t.exact, "note": t.note} for t in self.tables],
        }


def resolve_timeouts(roles: list[str], db_role_rows: list[dict[str, Any]],
                     server: dict[str, tuple[str, str]]) -> list[TimeoutSetting]:
    """Effective value of each timeout for each role in this database, with where it comes from.

    ``db_role_rows``: rows of DB_ROLE_SETTINGS (for_database, role, config 'name=value').
    ``server``: name -> (value, source) for the server-wide level.
    Precedence is PostgreSQL's: role in this database > role > this database > server.
    """
    levels: dict[tuple[bool, str | None], dict[str, str]] = {}
    for row in db_role_rows:
        name, _, value = str(row["config"]).partition("=")
        levels.setdefault((bool(row["for_database"]), row["role"]), {})[name] = value
    out = []
    for role in roles:
        for name in TIMEOUT_SETTINGS:
            for key, source in (((True, role), "role in database"), ((False, role), "role"),
                                ((True, None), "database")):
                if name in levels.get(key, {}):
                    out.append(TimeoutSetting(role, name, levels[key][name], source))
                    break
            else:
                value, source = server.get(name, ("0", "built-in default"))
                out.append(TimeoutSetting(role, name, value, source))
    return out


def timeout_warnings(timeouts: list[TimeoutSetting], database: str) -> list[str]:
    warnings = []
    for t in timeouts:
        if t.off:
            warnings.append(f"{t.name} is not set for role {t.role} in database {database} "
                            f"(from {t.source}): a stuck session can hold its locks forever")
    return warnings


def take_health(db: Database, *, top_tables: int = 10) -> HealthSnapshot:
    started = time.perf_counter()
    limits: list[str] = []
    try:
        with db.connection() as conn:
            priv = conn.execute(PRIVILEGES).fetchone()
            db_role_rows = conn.execute(DB_ROLE_SETTINGS).fetchall()
            boot = {r["name"]: r["boot_val"] for r in conn.execute(BOOT_SETTINGS, (list(TIMEOUT_SETTINGS),))}
            server = {name: (boot.get(name) or "0", "built-in default") for name in TIMEOUT_SETTINGS}
            try:
                for r in conn.execute(FILE_SETTINGS, (list(TIMEOUT_SETTINGS),)):
                    server[r["name"]] = (r["setting"], f"server config {r['sourcefile']}:{r['sourceline']}")
            except psycopg.errors.InsufficientPrivilege:
                # pg_file_settings is superuser-only unless granted explicitly (pg_monitor is not enough).
                limits.append(f"role {priv['role']} cannot read pg_file_settings (superuser, or GRANT SELECT ON "
                              "pg_file_settings and EXECUTE ON pg_show_all_file_settings()): server-wide "
                              "timeouts assumed to be the built-in default")
            roles = sorted({r["role"] for r in conn.execute(APPLICATION_ROLES) if r["role"]})
            counts = conn.execute(SESSION_COUNTS).fetchall()
            old = conn.execute(OLD_TRANSACTIONS).fetchall()
            stats = conn.execute(DATABASE_STATS).fetchone() or {}
            candidates = conn.execute(TABLE_CANDIDATES, (max(top_tables * 3, top_tables),)).fetchall()
            tables = [_measure(conn, c) for c in candidates]
    except psycopg.Error as exc:
        raise translate_error(exc, "health check") from None
    if not priv["read_all_stats"]:
        hidden = sum(r["sessions"] for r in counts if r["state"] == "(hidden)")
        limits.append(f"role {priv['role']} cannot see other roles' query text, state or transaction ages "
                      f"(grant pg_read_all_stats or pg_monitor)" + (f"; {hidden} sessions hidden" if hidden else ""))
    locked = [t for t in tables if not t.exact]
    if locked:
        limits.append("sizes of " + ", ".join(f"{t.schema}.{t.name}" for t in locked[:5])
                      + " are catalog estimates: the tables were locked exclusively")
    tables.sort(key=lambda t: (-t.total, t.schema, t.name))
    timeouts = resolve_timeouts(roles, db_role_rows, server)
    warnings = timeout_warnings(timeouts, priv["database"])
    connections = sum(r["sessions"] for r in counts) + 1   # + this session
    snapshot = HealthSnapshot(
        taken_at=time.time(), elapsed_ms=0.0, role=priv["role"], database=priv["database"],
        server_version_num=priv["server_version_num"], timeouts=timeouts, warnings=warnings, limits=limits,
        sessions_by_state=[dict(r) for r in counts],
        lock_waiters=sum(r["lock_waiters"] for r in counts),
        active=sum(r["sessions"] for r in counts if r["state"] == "active"),   # not counting atc's own poll
        connections=connections, max_connections=priv["max_connections"],
        superuser_reserved_connections=priv["superuser_reserved_connections"],
        longest_transactions=[_session(r) for r in old if r["kind"] == "longest"],
        idle_in_transaction=[_session(r) for r in old if r["kind"] == "idle_in_transaction"],
        xact_commit=int(stats.get("xact_commit") or 0), xact_rollback=int(stats.get("xact_rollback") or 0),
        deadlocks=int(stats.get("deadlocks") or 0), counting_since=stats.get("counting_since"),
        counting_seconds=float(stats.get("seconds") or 0),
        # Tables that could not be measured are listed whatever their estimate: being locked
        # exclusively is news in itself.
        tables=tables[:top_tables] + [t for t in tables[top_tables:] if not t.exact],
        deadlock_timeout=priv["deadlock_timeout"],
    )
    if snapshot.connection_use >= 0.8:
        snapshot.warnings.append(f"{connections} of {priv['max_connections']} connections in use")
    if snapshot.idle_in_transaction and (snapshot.idle_in_transaction[0]["age"] or 0) > 60:
        s = snapshot.idle_in_transaction[0]
        snapshot.warnings.append(f"pid {s['pid']} ({s['user']}) has been idle in transaction for {s['age']:.0f}s")
    snapshot.elapsed_ms = (time.perf_counter() - started) * 1000
    return snapshot


def _session(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "pid": row["pid"], "user": row["user"], "database": row["database"],
        "application_name": row["application_name"], "state": row["state"], "client_addr": row["client_addr"],
        "age": row["age"], "query": one_line(decode_query(row["query_bytes"], row["query_encoding"]), 200),
    }


def _measure(conn: psycopg.Connection, candidate: dict[str, Any]) -> TableSize:
    """Exact sizes under a short lock_timeout; the catalog estimate when the table is locked."""
    try:
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(SIZE_LOCK_TIMEOUT)))
            row = conn.execute(TABLE_SIZE, {"oid": candidate["oid"], "toast": candidate["toast_oid"]}).fetchone()
        return TableSize(candidate["schema"], candidate["name"], int(row["heap"] or 0), int(row["toast"] or 0),
                         int(row["indexes"] or 0), exact=True)
    except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
        return TableSize(candidate["schema"], candidate["name"], int(candidate["estimated_heap"]),
                         int(candidate["estimated_toast"]), None, exact=False,
                         note="locked: catalog estimate")


# -- history for sparklines (pure) ------------------------------------------------------------------


@dataclass
class HealthSample:
    at: float
    waiting: int
    active: int
    deadlocks_total: int


@dataclass
class HealthHistory:
    """The last ``minutes`` of samples; deadlocks become per-interval deltas for a sparkline."""

    minutes: float = 10.0
    samples: deque = field(default_factory=deque)

    def add(self, snapshot: HealthSnapshot) -> None:
        self.add_sample(HealthSample(snapshot.taken_at, snapshot.lock_waiters, snapshot.active, snapshot.deadlocks))

    def add_sample(self, sample: HealthSample) -> None:
        self.samples.append(sample)
        horizon = sample.at - self.minutes * 60
        while self.samples and self.samples[0].at < horizon:
            self.samples.popleft()

    @property
    def waiting(self) -> list[int]:
        return [s.waiting for s in self.samples]

    @property
    def active(self) -> list[int]:
        return [s.active for s in self.samples]

    @property
    def deadlocks(self) -> list[int]:
        """New deadlocks per interval (a stats reset shows as 0, not a negative spike)."""
        values = [s.deadlocks_total for s in self.samples]
        return [max(0, b - a) for a, b in zip(values, values[1:])]

    def deadlocks_per_minute(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        span = self.samples[-1].at - self.samples[0].at
        return sum(self.deadlocks) / span * 60 if span > 0 else 0.0

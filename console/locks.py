"""Who blocks whom: a lock tree built from ``pg_blocking_pids``, plus what is locked.

One snapshot is two statements on one connection:

1. ``LOCK_SESSIONS``: the sessions involved in a lock wait (waiters and everyone they wait for,
   plus parallel workers of those), with ``pg_blocking_pids`` called only for sessions whose
   ``wait_event_type`` is ``Lock``. The tree is exactly that relation: a session's children are
   the sessions whose ``pg_blocking_pids`` contains it. pg_activity instead joins ``pg_locks`` to
   itself on the lock target and so names a holder whose mode does not conflict; we never do.
2. ``LOCK_DETAILS``: one pass over ``pg_locks`` that returns an aggregate of what is locked
   (relation, mode, granted/waiting counts, oldest wait start) and the individual locks on
   contended targets (so each waiter says what it waits for, and row waits say which row).

For row locks on the application's tables the primary key of the row is looked up by ctid
(``ROW_KEYS``), one TID scan per table under a 100 ms lock_timeout, so the lookup itself never
queues behind an AccessExclusiveLock.

Nothing here takes a row lock, and nothing reads a log body: the only table data read is the
primary-key columns of rows that are being waited on.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Iterator

import psycopg
from psycopg import sql

from .db import Database, translate_error
from .text import one_line

# Sessions involved in lock waits. Reads pg_stat_activity (a per-transaction snapshot, so the
# three references agree) and pg_blocking_pids, which holds the lock manager's partition locks
# briefly: it runs only for sessions actually waiting on a heavyweight lock. No table is read.
# The query text is fetched as raw bytes (textsend) with its database's encoding, because a
# session in a LATIN1 database reports bytes that are not valid UTF-8.
LOCK_SESSIONS = """
WITH waiting AS (
    SELECT pid, pg_blocking_pids(pid) AS blocked_by
    FROM pg_stat_activity
    WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()
), involved AS (
    SELECT pid FROM waiting
    UNION
    SELECT unnest(blocked_by) FROM waiting
), with_workers AS (
    SELECT pid FROM involved
    UNION
    SELECT w.pid FROM pg_stat_activity w WHERE w.leader_pid IN (SELECT pid FROM involved) AND w.pid <> w.leader_pid
)
SELECT a.pid, a.leader_pid, a.backend_type, a.backend_start, a.datname AS database, a.usename AS user,
       a.application_name, host(a.client_addr) AS client_addr, a.client_hostname, a.client_port,
       a.state, a.xact_start, a.state_change, a.query_start,
       extract(epoch FROM now() - a.xact_start)::float8 AS xact_age,
       extract(epoch FROM now() - a.state_change)::float8 AS state_age,
       a.wait_event_type, a.wait_event, a.backend_xid::text AS backend_xid,
       textsend(a.query) AS query_bytes, pg_encoding_to_char(d.encoding) AS query_encoding,
       coalesce(w.blocked_by, '{}'::int[]) AS blocked_by
FROM pg_stat_activity a
JOIN with_workers USING (pid)
LEFT JOIN waiting w USING (pid)
LEFT JOIN pg_database d ON d.oid = a.datid
"""

# What is locked, in one scan of pg_locks (materialised once, used twice): an aggregate per
# (lock type, relation, mode) and the individual locks on every contended target. Reads only the
# lock manager's view; relation names come from the catalog cache (regclass), which takes no lock.
# With ~20k locks the costly part is per-row work, so the exact lock tag (as text) is built only for
# rows that pass a cheap, hashable pre-filter against the few ungranted locks.
# {waitstart} is `waitstart` on PostgreSQL >= 14 and NULL before.
LOCK_DETAILS = """
WITH l AS MATERIALIZED (
    SELECT locktype, database, relation, page, tuple, virtualxid, transactionid,
           classid, objid, objsubid, virtualtransaction, pid, mode, granted, {waitstart} AS waitstart
    FROM pg_locks
), waits AS MATERIALIZED (
    SELECT * FROM l WHERE NOT granted
), near AS MATERIALIZED (
    SELECT l.*, (l.locktype, l.database, l.relation, l.page, l.tuple, l.virtualxid, l.transactionid,
                 l.classid, l.objid, l.objsubid)::text AS target
    FROM l
    WHERE (l.locktype, coalesce(l.relation, 0), coalesce(l.objid, 0), coalesce(l.transactionid::text, l.virtualxid, ''))
          IN (SELECT locktype, coalesce(relation, 0), coalesce(objid, 0), coalesce(transactionid::text, virtualxid, '')
              FROM waits)
       OR (l.locktype = 'tuple' AND l.pid IN (SELECT pid FROM waits))
), this_db AS (
    SELECT oid FROM pg_database WHERE datname = current_database()
)
SELECT
  (SELECT coalesce(json_agg(s ORDER BY s.waiting DESC, s.granted DESC), '[]'::json) FROM (
      SELECT g.locktype, g.mode,
             CASE WHEN g.database = (SELECT oid FROM this_db) THEN g.relation::regclass::text
                  ELSE g.relation::text END AS relation,
             (SELECT datname FROM pg_database WHERE oid = g.database) AS database,
             g.granted, g.waiting, g.oldest_wait_start
      FROM (SELECT locktype, mode, database, relation,
                   count(*) FILTER (WHERE granted) AS granted,
                   count(*) FILTER (WHERE NOT granted) AS waiting,
                   min(waitstart) AS oldest_wait_start
            FROM l WHERE locktype <> 'virtualxid'
            GROUP BY locktype, mode, database, relation) g
  ) s) AS summary,
  (SELECT coalesce(json_agg(d), '[]'::json) FROM (
      SELECT n.locktype, n.mode, n.granted, n.pid, n.virtualtransaction, n.target,
             n.database = (SELECT oid FROM this_db) AS in_current_db,
             n.relation AS relation_oid,
             CASE WHEN n.database = (SELECT oid FROM this_db) THEN n.relation::regclass::text
                  ELSE n.relation::text END AS relation,
             n.page, n.tuple, n.virtualxid, n.transactionid::text AS transactionid,
             n.classid, n.objid, n.objsubid, n.waitstart
      FROM near n
      WHERE n.target IN (SELECT (locktype, database, relation, page, tuple, virtualxid, transactionid,
                                 classid, objid, objsubid)::text FROM waits)
         OR (n.locktype = 'tuple' AND n.pid IN (SELECT pid FROM waits))
  ) d) AS details
"""

# Prepared transactions hold locks with no backend (pg_blocking_pids reports them as pid 0).
# Catalog view, no lock.
PREPARED_XACTS = """
SELECT transaction::text AS transaction, gid, prepared, owner, database,
       extract(epoch FROM now() - prepared)::float8 AS age
FROM pg_prepared_xacts
ORDER BY prepared
"""

# Primary-key columns of application tables (catalog only, no lock on the tables themselves).
PRIMARY_KEY_COLUMNS = """
SELECT c.oid AS relation_oid, n.nspname AS schema, c.relname AS name,
       array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum)) AS columns
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey::int2[])
WHERE i.indisprimary AND i.indrelid = ANY(%s::oid[])
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
GROUP BY c.oid, n.nspname, c.relname
"""

# Primary keys of the rows at the given ctids of one table: a TID scan that reads only the key
# columns (never a log body). It takes AccessShareLock on the table, so it runs under a short
# lock_timeout (ROW_KEY_LOCK_TIMEOUT) and is skipped when that expires.
ROW_KEYS = "SELECT ctid::text AS ctid, {columns} FROM {table} WHERE ctid = ANY(%s::tid[])"
ROW_KEY_LOCK_TIMEOUT = "100ms"

# Server version and whether this role sees other roles' waits (catalog functions, no lock).
SERVER_VERSION = """
SELECT current_setting('server_version_num')::int AS v, current_user AS role,
       pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') AS read_all_stats
"""

# Python codec names for PostgreSQL server encodings that differ from Python's spelling.
_PG_CODECS = {
    "SQL_ASCII": "latin-1", "LATIN1": "latin-1", "LATIN2": "iso8859-2", "LATIN9": "iso8859-15",
    "WIN1252": "cp1252", "WIN1251": "cp1251", "EUC_JP": "euc_jp", "SJIS": "shift_jis", "UTF8": "utf-8",
}


def decode_query(raw: bytes | memoryview | None, encoding: str | None) -> str:
    """Query text bytes -> str: UTF-8 if valid, else the session's database encoding, else
    UTF-8 with the odd bytes shown as escapes. Never raises."""
    if raw is None:
        return ""
    data = bytes(raw)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    name = _PG_CODECS.get((encoding or "").upper(), (encoding or "").lower())
    if name and name != "utf-8":
        try:
            codecs.lookup(name)
            return data.decode(name)
        except (LookupError, UnicodeDecodeError):
            pass
    return data.decode("utf-8", errors="backslashreplace")


# -- data ------------------------------------------------------------------------------------------


@dataclass
class WaitTarget:
    """What a waiting session waits for (its one ungranted lock), made readable."""

    locktype: str
    mode: str
    relation: str | None = None
    detail: str = ""          # "row (3,7)", "transaction 812", "advisory key 42", ...
    row_key: dict[str, Any] | None = None   # primary key of the row, when found
    wait_start: datetime | None = None
    target: str = ""          # the lock tag, to match holders

    def describe(self) -> str:
        parts = [self.mode, "on", self.detail or self.locktype]
        if self.relation and self.relation not in self.detail:
            parts.append(f"of {self.relation}")
        if self.row_key:
            parts.append("(" + ", ".join(f"{k}={v}" for k, v in self.row_key.items()) + ")")
        return " ".join(parts)


@dataclass
class LockSession:
    pid: int
    backend_start: datetime | None = None
    state: str | None = None
    xact_age: float | None = None
    state_age: float | None = None
    wait_event_type: str | None = None
    wait_event: str | None = None
    application_name: str = ""
    client: str = ""
    user: str | None = None
    database: str | None = None
    query: str = ""
    backend_type: str | None = None
    leader_pid: int | None = None
    blocked_by: tuple[int, ...] = ()
    waiting_for: WaitTarget | None = None
    holds: list[str] = field(default_factory=list)     # "ExclusiveLock on tuple (0,3) of job", for blockers
    rows: list[str] = field(default_factory=list)      # rows this session is known to block/wait on
    workers: list[int] = field(default_factory=list)   # parallel workers grouped under this leader
    prepared: list[dict[str, Any]] = field(default_factory=list)  # pid 0: the prepared transactions

    @property
    def is_prepared(self) -> bool:
        return self.pid == 0

    @property
    def query_line(self) -> str:
        return one_line(self.query, 200)

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid, "backend_start": self.backend_start, "state": self.state,
            "xact_age_s": self.xact_age, "state_age_s": self.state_age,
            "wait_event_type": self.wait_event_type, "wait_event": self.wait_event,
            "application_name": self.application_name, "client": self.client, "user": self.user,
            "database": self.database, "query": self.query, "backend_type": self.backend_type,
            "blocked_by": list(self.blocked_by),
            "waiting_for": None if self.waiting_for is None else {
                "locktype": self.waiting_for.locktype, "mode": self.waiting_for.mode,
                "relation": self.waiting_for.relation, "detail": self.waiting_for.detail,
                "row_key": self.waiting_for.row_key, "wait_start": self.waiting_for.wait_start,
                "description": self.waiting_for.describe(),
            },
            "holds": list(self.holds), "workers": list(self.workers),
            "prepared_transactions": list(self.prepared),
        }


@dataclass
class LockNode:
    session: LockSession
    children: list["LockNode"] = field(default_factory=list)
    # This pid already appears higher on the same path: a wait cycle (deadlock about to be broken).
    cycle: bool = False


@dataclass
class TreeRow:
    """One displayed line of the tree: ``key`` is the path of pids, stable across refreshes."""

    key: str
    depth: int
    session: LockSession
    cycle: bool = False
    parent_pid: int | None = None


@dataclass
class LockSnapshot:
    taken_at: float
    elapsed_ms: float
    server_version_num: int
    sessions: dict[int, LockSession]
    roots: list[LockNode]
    lock_summary: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)

    @property
    def waiting_count(self) -> int:
        return sum(1 for s in self.sessions.values() if s.blocked_by)

    @property
    def blocker_pids(self) -> list[int]:
        return [n.session.pid for n in self.roots]

    def edges(self) -> set[tuple[int, int]]:
        """(blocker, waiter) pairs shown by the tree (for comparing with pg_blocking_pids)."""
        found: set[tuple[int, int]] = set()

        def walk(node: LockNode) -> None:
            for child in node.children:
                found.add((node.session.pid, child.session.pid))
                walk(child)

        for root in self.roots:
            walk(root)
        return found

    def rows(self, limit: int | None = None, filter_text: str = "") -> tuple[list[TreeRow], int]:
        """The tree flattened depth-first, at most ``limit`` rows; returns (rows, how many more)."""
        return flatten(self.roots, limit=limit, filter_text=filter_text)

    def as_dict(self, limit: int | None = None) -> dict[str, Any]:
        rows, more = self.rows(limit)
        shown = {r.session.pid for r in rows}

        def node_dict(node: LockNode) -> dict[str, Any] | None:
            if node.session.pid not in shown:
                return None
            children = [c for c in (node_dict(ch) for ch in node.children) if c is not None]
            return {"pid": node.session.pid, "cycle": node.cycle, "waiters": children}

        return {
            "taken_at": datetime.fromtimestamp(self.taken_at).astimezone(),
            "elapsed_ms": round(self.elapsed_ms, 2),
            "server_version_num": self.server_version_num,
            "blockers": len(self.roots),
            "waiting": self.waiting_count,
            "tree": [d for d in (node_dict(r) for r in self.roots) if d is not None],
            "more": more,
            "sessions": {str(pid): s.as_dict() for pid, s in sorted(self.sessions.items()) if pid in shown},
            "locks": self.lock_summary,
            "warnings": self.warnings,
        }


# -- building the tree (pure; tested without a server as well as with one) -------------------------


def build_tree(sessions: dict[int, LockSession]) -> list[LockNode]:
    """Forest of blockers -> waiters from each session's ``blocked_by`` (pg_blocking_pids).

    A waiter appears under every session that blocks it, so the edges shown are exactly the
    pg_blocking_pids relation. Roots are sessions that block someone and wait for no one; a group
    of sessions that all wait on each other (a deadlock the detector has not broken yet) gets its
    lowest pid as root and the repeat marked as a cycle.
    """
    waiters_of: dict[int, list[int]] = {}
    for s in sessions.values():
        for blocker in s.blocked_by:
            waiters_of.setdefault(blocker, []).append(s.pid)
    for waiters in waiters_of.values():
        waiters.sort(key=lambda pid: (-(sessions[pid].xact_age or 0) if pid in sessions else 0, pid))

    def make(pid: int, path: frozenset[int]) -> LockNode:
        session = sessions.get(pid) or LockSession(pid=pid, state="(gone)")
        if pid in path:
            return LockNode(session, cycle=True)
        inner = path | {pid}
        return LockNode(session, [make(w, inner) for w in waiters_of.get(pid, [])])

    root_pids = [pid for pid in waiters_of if not (sessions.get(pid) and sessions[pid].blocked_by)]
    roots = [make(pid, frozenset()) for pid in root_pids]
    covered = {n.session.pid for n in _walk(roots)}
    # Cycles: waiters not reachable from a non-waiting root.
    for pid in sorted(p for p, s in sessions.items() if s.blocked_by and p not in covered):
        if pid in covered:
            continue
        node = make(pid, frozenset())
        roots.append(node)
        covered |= {n.session.pid for n in _walk([node])}
    roots.sort(key=lambda n: (-(n.session.xact_age or 0), n.session.pid))
    return roots


def _walk(nodes: Iterable[LockNode]) -> Iterator[LockNode]:
    for node in nodes:
        yield node
        if not node.cycle:
            yield from _walk(node.children)


def _matches(session: LockSession, needle: str) -> bool:
    hay = " ".join(str(x) for x in (
        session.pid, session.state, session.user, session.database, session.application_name,
        session.client, session.query, session.wait_event,
        session.waiting_for.describe() if session.waiting_for else "", " ".join(session.holds),
    ) if x)
    return needle in hay.lower()


def flatten(roots: list[LockNode], *, limit: int | None = None, filter_text: str = "") -> tuple[list[TreeRow], int]:
    """Depth-first rows; a filter keeps whole trees that contain a match anywhere."""
    needle = filter_text.strip().lower()
    rows: list[TreeRow] = []
    total = 0

    def emit(node: LockNode, depth: int, prefix: str, parent: int | None) -> None:
        nonlocal total
        key = f"{prefix}/{node.session.pid}" if prefix else str(node.session.pid)
        total += 1
        if limit is None or len(rows) < limit:
            rows.append(TreeRow(key=key, depth=depth, session=node.session, cycle=node.cycle, parent_pid=parent))
        if not node.cycle:
            for child in node.children:
                emit(child, depth + 1, key, node.session.pid)

    for root in roots:
        if needle and not any(_matches(n.session, needle) for n in _walk([root])):
            continue
        emit(root, 0, "", None)
    return rows, total - len(rows)


# -- taking a snapshot -----------------------------------------------------------------------------


def _session_from_row(row: dict[str, Any]) -> LockSession:
    client = row.get("client_addr") or ""
    if client and row.get("client_port") not in (None, -1):
        client = f"{client}:{row['client_port']}"
    elif not client and row.get("client_port") == -1:
        client = "local socket"
    return LockSession(
        pid=row["pid"], backend_start=row["backend_start"], state=row["state"], xact_age=row["xact_age"],
        state_age=row["state_age"], wait_event_type=row["wait_event_type"], wait_event=row["wait_event"],
        application_name=row["application_name"] or "", client=client, user=row["user"],
        database=row["database"], query=decode_query(row["query_bytes"], row["query_encoding"]),
        backend_type=row["backend_type"], leader_pid=row["leader_pid"],
        blocked_by=tuple(sorted(set(row["blocked_by"] or ()))),
    )


def _describe_lock(lock: dict[str, Any]) -> str:
    kind = lock["locktype"]
    if kind == "tuple":
        return f"row ({lock['page']},{lock['tuple']}) of {lock['relation']}"
    if kind == "transactionid":
        return f"transaction {lock['transactionid']}"
    if kind == "virtualxid":
        return f"virtual transaction {lock['virtualxid']}"
    if kind == "advisory":
        # Two int4 keys, or one int8 split in two (objsubid 1): show the int8 as the app used it.
        if lock.get("objsubid") == 1:
            key = (int(lock["classid"]) << 32) | int(lock["objid"])
            if key >= 1 << 63:
                key -= 1 << 64
            return f"advisory key {key}"
        return f"advisory key ({lock['classid']},{lock['objid']})"
    if kind == "relation":
        return f"table {lock['relation']}"
    if kind == "page":
        return f"page {lock['page']} of {lock['relation']}"
    if kind == "object":
        return f"object {lock['classid']}/{lock['objid']}"
    return kind


def _fold_workers(sessions: dict[int, LockSession]) -> None:
    """Parallel workers go under their leader: their waits become the leader's."""
    for pid, s in list(sessions.items()):
        leader = s.leader_pid
        if leader and leader != pid and leader in sessions:
            lead = sessions[leader]
            lead.workers.append(pid)
            if s.blocked_by:
                lead.blocked_by = tuple(sorted(set(lead.blocked_by) | set(s.blocked_by) - {leader}))
                if lead.wait_event_type != "Lock":
                    lead.wait_event_type, lead.wait_event = s.wait_event_type, f"{s.wait_event} (worker {pid})"
            del sessions[pid]
    for s in sessions.values():
        s.workers.sort()
    # Anyone else blocked "by" a worker is blocked by its leader (pg_blocking_pids already reports
    # leaders, but keep it robust to mixed versions).
    leader_of = {w: s.pid for s in sessions.values() for w in s.workers}
    for s in sessions.values():
        if any(b in leader_of for b in s.blocked_by):
            s.blocked_by = tuple(sorted({leader_of.get(b, b) for b in s.blocked_by} - {s.pid}))


def take_snapshot(db: Database) -> LockSnapshot:
    """One refresh of the lock view (two statements, plus row-key lookups when rows are waited on)."""
    started = time.perf_counter()
    try:
        with db.connection() as conn:
            info = conn.execute(SERVER_VERSION).fetchone()
            version = info["v"]
            rows = conn.execute(LOCK_SESSIONS).fetchall()
            sessions = {r["pid"]: _session_from_row(r) for r in rows}
            summary: list[dict[str, Any]] = []
            details: list[dict[str, Any]] = []
            prepared: list[dict[str, Any]] = []
            warnings: list[str] = []
            if not info["read_all_stats"]:
                warnings.append(f"role {info['role']} sees only its own sessions' waits and query text "
                                "(grant pg_read_all_stats or pg_monitor to see every blocker)")
            if sessions:
                query = LOCK_DETAILS.format(waitstart="waitstart" if version >= 140000 else "NULL::timestamptz")
                got = conn.execute(query).fetchone()
                summary, details = got["summary"], got["details"]
                if any(0 in s.blocked_by for s in sessions.values()):
                    prepared = conn.execute(PREPARED_XACTS).fetchall()
                _annotate_rows(conn, details, warnings)
    except psycopg.Error as exc:
        raise translate_error(exc, "lock snapshot") from None
    _fold_workers(sessions)
    _attach_locks(sessions, details, prepared)
    roots = build_tree(sessions)
    elapsed = (time.perf_counter() - started) * 1000
    return LockSnapshot(taken_at=time.time(), elapsed_ms=elapsed, server_version_num=version,
                        sessions=sessions, roots=roots, lock_summary=summary, warnings=warnings)


def _annotate_rows(conn: psycopg.Connection, details: list[dict[str, Any]], warnings: list[str]) -> None:
    """Find primary keys of waited-on rows (tuple locks in this database), cheaply and safely."""
    by_rel: dict[int, set[str]] = {}
    for lock in details:
        if lock["locktype"] == "tuple" and lock["in_current_db"] and lock["relation_oid"]:
            by_rel.setdefault(int(lock["relation_oid"]), set()).add(f"({lock['page']},{lock['tuple']})")
    if not by_rel:
        return
    keys: dict[tuple[int, str], dict[str, Any]] = {}
    tables = conn.execute(PRIMARY_KEY_COLUMNS, (list(by_rel),)).fetchall()
    for table in tables:
        columns = [c for c in table["columns"] if c != "log"]
        if not columns:
            continue
        query = sql.SQL(ROW_KEYS).format(
            columns=sql.SQL(", ").join(sql.Identifier(c) for c in columns),
            table=sql.Identifier(table["schema"], table["name"]),
        )
        try:
            with conn.transaction():
                conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(ROW_KEY_LOCK_TIMEOUT)))
                for row in conn.execute(query, (sorted(by_rel[table["relation_oid"]]),)).fetchall():
                    ctid = row.pop("ctid")
                    keys[(table["relation_oid"], ctid)] = row
        except psycopg.errors.LockNotAvailable:
            warnings.append(f"row keys of {table['schema']}.{table['name']} skipped: the table is locked exclusively")
        except psycopg.errors.QueryCanceled:
            warnings.append(f"row keys of {table['schema']}.{table['name']} skipped: statement_timeout")
        except psycopg.errors.InsufficientPrivilege:
            warnings.append(f"row keys of {table['schema']}.{table['name']} hidden: no SELECT privilege")
    for lock in details:
        if lock["locktype"] == "tuple" and lock["relation_oid"]:
            lock["row_key"] = keys.get((int(lock["relation_oid"]), f"({lock['page']},{lock['tuple']})"))


def _attach_locks(sessions: dict[int, LockSession], details: list[dict[str, Any]],
                  prepared: list[dict[str, Any]]) -> None:
    holders: dict[str, list[dict[str, Any]]] = {}
    for lock in details:
        if lock["granted"]:
            holders.setdefault(lock["target"], []).append(lock)
    tuple_of: dict[int, dict[str, Any]] = {}
    for lock in details:
        if lock["locktype"] == "tuple" and lock["pid"] is not None:
            tuple_of.setdefault(lock["pid"], lock)
    for lock in details:
        pid = lock["pid"]
        if lock["granted"] or pid not in sessions:
            continue
        session = sessions[pid]
        target = WaitTarget(locktype=lock["locktype"], mode=lock["mode"], relation=lock["relation"],
                            detail=_describe_lock(lock), target=lock["target"],
                            wait_start=_parse_ts(lock.get("waitstart")))
        row = tuple_of.get(pid)
        # A row wait: the tuple lock tells which row (held while waiting on the xid, or awaited).
        if row is not None:
            target.relation = row["relation"]
            target.row_key = row.get("row_key")
            if lock["locktype"] == "transactionid":
                target.detail = f"{_describe_lock(lock)} for row ({row['page']},{row['tuple']}) of {row['relation']}"
        session.waiting_for = target
        for holder in holders.get(lock["target"], []):
            hp = holder["pid"] if holder["pid"] is not None else 0
            if hp in session.blocked_by and hp in sessions:
                text = f"{holder['mode']} on {_describe_lock(holder)}"
                if text not in sessions[hp].holds:
                    sessions[hp].holds.append(text)
    blocked_by_prepared = [s for s in sessions.values() if 0 in s.blocked_by]
    if blocked_by_prepared and 0 not in sessions:
        # Which prepared transactions: those holding a lock on a target someone waits for.
        xids = {h["virtualtransaction"].split("/", 1)[1] for hs in holders.values() for h in hs
                if h["pid"] is None and str(h.get("virtualtransaction", "")).startswith("-1/")}
        chosen = [p for p in prepared if p["transaction"] in xids] or list(prepared)
        oldest = max((p["age"] or 0 for p in chosen), default=None)
        sessions[0] = LockSession(
            pid=0, state="prepared transaction", xact_age=oldest, state_age=oldest,
            user=", ".join(sorted({p["owner"] for p in chosen})) or None,
            database=", ".join(sorted({p["database"] for p in chosen})) or None,
            query="; ".join(f"PREPARE TRANSACTION {p['gid']!r}" for p in chosen) or "(prepared transaction)",
            prepared=[{"gid": p["gid"], "transaction": p["transaction"], "prepared": p["prepared"],
                       "owner": p["owner"], "database": p["database"]} for p in chosen],
        )


def _parse_ts(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def blocking_pairs(db: Database) -> set[tuple[int, int]]:
    """(blocker, waiter) pairs straight from pg_blocking_pids for every backend (for checks)."""
    rows = db.fetch(
        "SELECT pid, pg_blocking_pids(pid) AS b FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
        what="blocking pairs",
    )
    return {(b, r["pid"]) for r in rows for b in (r["b"] or [])}

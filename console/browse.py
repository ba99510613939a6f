"""Browsing: assignments → runs → results → step results, one keyset page at a time.

Every list is a named query below. Rules they all follow:

- **Locks**: plain SELECTs in autocommit sessions: ACCESS SHARE on the tables read, no row locks,
  nothing that waits on a row lock held by the application (MVCC readers never block on
  ``FOR UPDATE``). ``lock_timeout`` still bounds the ACCESS SHARE wait should someone run DDL.
- **No log bodies**: the ``log`` column is only touched through ``pg_column_size(log)`` (reads the
  size in the varlena/TOAST pointer header, never de-TOASTs) and ``log IS NOT NULL`` (the null
  bitmap). So a page costs the same whether the logs weigh bytes or gigabytes.
- **Keyset pagination, never OFFSET**: each sort option orders by ``(expression, id)``; a page key
  is ``[expression as text, id]`` (JSON-friendly, so the CLI can print and take it back).
  ``after`` continues forward, ``before`` fetches the page above (for the TUI's sliding window).
- **Filters are bound parameters**, and text search is literal (``strpos`` on lower case, no
  LIKE wildcards): a search for ``'; drop table x; --`` or ``50%_`` finds exactly that text.

Aggregates over millions of step results (total log bytes per assignment) are NOT computed by the
list query: they come from ``atc.assignment_stats``, a cache with a visible "as of", refreshed per
page in a second, cancellable query after the list has painted (``compute_assignment_log_bytes``
+ ``store_assignment_stats``). Counts of runs and results by state per assignment are live (they
scale with results, not step results or log weight, and use the (run, state) index only).
See docs/tui.md, "Decisions".
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .db import Database, Page, translate_error
from .errors import AtcError, Cancelled, NotFound
from .pauses import PAUSE_ACTIVE_PREDICATE

RESULT_STATES = ("not_started", "running", "passed", "failed", "timed_out", "skipped")
ASSIGNMENT_STATES = ("hidden", "open", "done")
# A log bigger than this many stored bytes is marked "big" in lists.
STATS_MAX_AGE_SECONDS = 600

# -- the pause rule (one place; the pause/broker code imports it) ------------------------------

# "Currently paused" is defined once, in console.pauses (the claim and detection use it too).

# The latest pause event of one assignment (alias ``pe``), for per-row lateral joins in pages.
_LATEST_PAUSE_LATERAL = """
LEFT JOIN LATERAL (
    SELECT ev.paused, ev.operator, ev.reason, ev.at, ev.expires_at
    FROM atc.pause_event ev WHERE ev.assignment_id = page.id ORDER BY ev.id DESC LIMIT 1
) pe ON true
"""
_PAUSED_COLUMNS = f"""
coalesce({PAUSE_ACTIVE_PREDICATE.format(e="pe")}, false) AS paused,
CASE WHEN {PAUSE_ACTIVE_PREDICATE.format(e="pe")} THEN pe.operator END AS paused_by,
CASE WHEN {PAUSE_ACTIVE_PREDICATE.format(e="pe")} THEN pe.at END AS paused_at,
CASE WHEN {PAUSE_ACTIVE_PREDICATE.format(e="pe")} THEN pe.reason END AS pause_reason,
CASE WHEN {PAUSE_ACTIVE_PREDICATE.format(e="pe")} THEN pe.expires_at END AS pause_expires_at
"""


# -- sorting --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SortOption:
    """One way to order a list: an SQL expression (never NULL) plus the row id as tie-break."""

    name: str
    expr: str
    cast: str
    descending: bool = False
    label: str = ""


def _sorts(*options: SortOption) -> dict[str, SortOption]:
    return {o.name: o for o in options}


ASSIGNMENT_SORTS = _sorts(
    SortOption("id", "a.id", "integer", label="id"),
    SortOption("name", "lower(a.name)", "text", label="name"),
    SortOption("deadline", "coalesce(a.deadline, 'infinity'::timestamptz)", "timestamptz", label="deadline"),
    SortOption("newest", "a.id", "integer", descending=True, label="newest first"),
)
RUN_SORTS = _sorts(
    SortOption("newest", "r.id", "integer", descending=True, label="newest first"),
    SortOption("oldest", "r.id", "integer", label="oldest first"),
    SortOption("started", "coalesce(r.started_date, '-infinity'::timestamptz)", "timestamptz", descending=True,
               label="started"),
)
RESULT_SORTS = _sorts(
    SortOption("id", "res.id", "integer", label="id"),
    SortOption("state", "res.state::text", "text", label="state"),
    SortOption("student", "lower(u.name)", "text", label="student"),
    SortOption("started", "coalesce(res.started_at, '-infinity'::timestamptz)", "timestamptz", descending=True,
               label="started"),
)
STEP_SORTS = _sorts(
    SortOption("order", "st.\"order\"", "integer", label="step order"),
    SortOption("state", "s.state::text", "text", label="state"),
    SortOption("size", "coalesce(m.size, pg_column_size(s.log), 0)", "bigint", descending=True, label="log size"),
    SortOption("id", "s.id", "integer", label="id"),
)
SORTS = {"assignments": ASSIGNMENT_SORTS, "runs": RUN_SORTS, "results": RESULT_SORTS, "steps": STEP_SORTS}


def sort_names(kind: str) -> list[str]:
    return list(SORTS[kind])


def _sort(kind: str, name: str | None) -> SortOption:
    options = SORTS[kind]
    if name is None:
        return next(iter(options.values()))
    if name not in options:
        raise AtcError(f"unknown sort {name!r} for {kind} (use one of: {', '.join(options)})")
    return options[name]


# -- named queries -------------------------------------------------------------------------------
# Each is a template: {keyset} is "true" or a row comparison on (sort expression, id) with bound
# values, {order} the ORDER BY built from a whitelisted SortOption. Nothing else is interpolated.

# Assignments page. ACCESS SHARE on "Assignment", "Course", "AutoTestRun", "AutoTestResult",
# atc.pause_event, atc.assignment_stats; no row locks. Never touches auto_test_step_result: the
# per-assignment log bytes come from the atc.assignment_stats cache (as_of shown).
ASSIGNMENTS_PAGE_SQL = """
WITH page AS (
    SELECT a.id, a.name, a.state::text AS state, a.deadline, a.auto_test_id, a."Course_id" AS course_id,
           c.name AS course, ({sort_expr})::text AS sort_key
    FROM "Assignment" a
    LEFT JOIN "Course" c ON c.id = a."Course_id"
    WHERE (%(state)s::text IS NULL OR a.state::text = %(state)s)
      AND (%(search)s::text IS NULL
           OR strpos(lower(a.name), lower(%(search)s)) > 0
           OR strpos(lower(c.name), lower(%(search)s)) > 0
           OR a.id::text = %(search)s)
      AND (NOT %(paused_only)s OR EXISTS (
            SELECT 1 FROM (SELECT ev.paused, ev.expires_at FROM atc.pause_event ev
                           WHERE ev.assignment_id = a.id ORDER BY ev.id DESC LIMIT 1) pe
            WHERE {paused_predicate}))
      AND {keyset}
    ORDER BY {order}
    LIMIT %(limit)s
)
SELECT page.id, page.name, page.state, page.deadline, page.course_id, page.course, page.auto_test_id,
       page.sort_key,
       coalesce(counts.runs, 0) AS runs,
       coalesce(counts.results_by_state, '{{}}'::jsonb) AS results_by_state,
       st.log_bytes_db, st.log_bytes_s3, st.step_results AS stats_step_results, st.computed_at AS stats_as_of,
       {paused_columns}
FROM page
LEFT JOIN LATERAL (
    SELECT (SELECT count(*) FROM "AutoTestRun" r WHERE r.auto_test_id = page.auto_test_id) AS runs,
           (SELECT jsonb_object_agg(x.state, x.n) FROM (
                SELECT res.state::text AS state, count(*) AS n
                FROM "AutoTestRun" r JOIN "AutoTestResult" res ON res.auto_test_run_id = r.id
                WHERE r.auto_test_id = page.auto_test_id
                GROUP BY res.state) x) AS results_by_state
) counts ON true
{latest_pause}
LEFT JOIN atc.assignment_stats st ON st.assignment_id = page.id
ORDER BY {outer_order}
"""

# One assignment (screen titles, CLI checks). ACCESS SHARE only; no log column.
ASSIGNMENT_SQL = """
SELECT a.id, a.name, a.state::text AS state, a.deadline, a.auto_test_id, c.name AS course
FROM "Assignment" a LEFT JOIN "Course" c ON c.id = a."Course_id"
WHERE a.id = %s
"""

# Runs of an assignment with result counts by state. ACCESS SHARE on "Assignment", "AutoTestRun",
# "AutoTestResult" (index on (auto_test_run_id, state)); no row locks; never reads step results.
RUNS_PAGE_SQL = """
WITH page AS (
    SELECT r.id, r.started_date, r.kill_date, r.job_id, r.job_number, r.runners_requested,
           r.batch_run_done, ({sort_expr})::text AS sort_key
    FROM "AutoTestRun" r
    WHERE r.auto_test_id = (SELECT auto_test_id FROM "Assignment" WHERE id = %(assignment_id)s)
      AND {keyset}
    ORDER BY {order}
    LIMIT %(limit)s
)
SELECT page.*, coalesce(counts.results_by_state, '{{}}'::jsonb) AS results_by_state
FROM page
LEFT JOIN LATERAL (
    SELECT jsonb_object_agg(x.state, x.n) AS results_by_state FROM (
        SELECT res.state::text AS state, count(*) AS n FROM "AutoTestResult" res
        WHERE res.auto_test_run_id = page.id GROUP BY res.state) x
) counts ON true
ORDER BY {outer_order}
"""

# One run with its assignment (titles, CLI checks). ACCESS SHARE only.
RUN_SQL = """
SELECT r.id, r.started_date, r.kill_date, r.job_id, r.auto_test_id,
       (SELECT a.id FROM "Assignment" a WHERE a.auto_test_id = r.auto_test_id ORDER BY a.id LIMIT 1) AS assignment_id,
       (SELECT a.name FROM "Assignment" a WHERE a.auto_test_id = r.auto_test_id ORDER BY a.id LIMIT 1) AS assignment_name
FROM "AutoTestRun" r WHERE r.id = %s
"""

# Results of a run, with steps by state and stored log bytes of that result's step results
# (a result has tens of steps: bounded work per row). ACCESS SHARE on "AutoTestResult", "Work",
# "User", auto_test_step_result, atc.moved_log; the log column only via pg_column_size.
RESULTS_PAGE_SQL = """
WITH page AS (
    SELECT res.id, res.state::text AS state, res.started_at, res.auto_test_runner_id AS runner_id,
           res.work_id, res.final_result, u.name AS student, u.username,
           ({sort_expr})::text AS sort_key
    FROM "AutoTestResult" res
    JOIN "Work" w ON w.id = res.work_id
    JOIN "User" u ON u.id = w."User_id"
    WHERE res.auto_test_run_id = %(run_id)s
      AND (%(state)s::text IS NULL OR res.state::text = %(state)s)
      AND (%(search)s::text IS NULL
           OR strpos(lower(u.name), lower(%(search)s)) > 0
           OR strpos(lower(u.username), lower(%(search)s)) > 0
           OR res.id::text = %(search)s)
      AND {keyset}
    ORDER BY {order}
    LIMIT %(limit)s
)
SELECT page.*, coalesce(steps.steps_by_state, '{{}}'::jsonb) AS steps_by_state,
       coalesce(steps.log_bytes_db, 0)::bigint AS log_bytes_db, coalesce(steps.log_bytes_s3, 0)::bigint AS log_bytes_s3
FROM page
LEFT JOIN LATERAL (
    SELECT jsonb_object_agg(x.state, x.n) AS steps_by_state, sum(x.db_bytes) AS log_bytes_db,
           sum(x.s3_bytes) AS log_bytes_s3
    FROM (SELECT s.state::text AS state, count(*) AS n, sum(pg_column_size(s.log)) AS db_bytes,
                 sum(m.size) AS s3_bytes
          FROM auto_test_step_result s
          LEFT JOIN atc.moved_log m ON m.step_result_id = s.id
          WHERE s.auto_test_result_id = page.id GROUP BY s.state) x
) steps ON true
ORDER BY {outer_order}
"""

# One result (titles, CLI checks). ACCESS SHARE only.
RESULT_SQL = """
SELECT res.id, res.state::text AS state, res.auto_test_run_id AS run_id, res.started_at, u.name AS student
FROM "AutoTestResult" res JOIN "Work" w ON w.id = res.work_id JOIN "User" u ON u.id = w."User_id"
WHERE res.id = %s
"""

# Step results of a result: where each log lives (db / s3 / none) and its size, never its body.
# Duration: the schema has no finish time; a finished step's last update ends it.
# ACCESS SHARE on auto_test_step_result, "AutoTestStep", atc.moved_log; no row locks.
STEPS_PAGE_SQL = """
SELECT s.id, st."order" AS step_order, st.name AS step_name, st.test_type::text AS step_type,
       s.state::text AS state, s.started_at,
       extract(epoch FROM CASE
           WHEN s.started_at IS NULL THEN NULL
           WHEN s.state IN ('passed', 'failed', 'timed_out') THEN s.updated_at - s.started_at
           WHEN s.state = 'running' THEN clock_timestamp() - s.started_at END)::float8 AS duration_s,
       CASE WHEN s.log IS NOT NULL THEN 'db' WHEN m.step_result_id IS NOT NULL THEN 's3' ELSE 'none' END AS log_where,
       pg_column_size(s.log) AS log_stored_bytes, m.size AS log_s3_bytes, m.key AS log_s3_key,
       ({sort_expr})::text AS sort_key
FROM auto_test_step_result s
JOIN "AutoTestStep" st ON st.id = s.auto_test_step_id
LEFT JOIN atc.moved_log m ON m.step_result_id = s.id
WHERE s.auto_test_result_id = %(result_id)s
  AND (%(state)s::text IS NULL OR s.state::text = %(state)s)
  AND (%(search)s::text IS NULL OR strpos(lower(st.name), lower(%(search)s)) > 0 OR s.id::text = %(search)s)
  AND {keyset}
ORDER BY {order}
LIMIT %(limit)s
"""

# Live log bytes for a handful of assignments (the page on screen): the second, cancellable
# query. Reads step-result heap tuples of those assignments for pg_column_size (TOAST pointers,
# never bodies) and atc.moved_log sizes. ACCESS SHARE only. Cost grows with step results, which
# is why it runs after the page paints and its answer is cached in atc.assignment_stats.
ASSIGNMENT_LOG_BYTES_SQL = """
SELECT a.id AS assignment_id, count(s.id) AS step_results,
       coalesce(sum(pg_column_size(s.log)), 0)::bigint AS log_bytes_db, coalesce(sum(m.size), 0)::bigint AS log_bytes_s3,
       clock_timestamp() AS computed_at
FROM "Assignment" a
JOIN "AutoTestRun" r ON r.auto_test_id = a.auto_test_id
JOIN "AutoTestResult" res ON res.auto_test_run_id = r.id
JOIN auto_test_step_result s ON s.auto_test_result_id = res.id
LEFT JOIN atc.moved_log m ON m.step_result_id = s.id
WHERE a.id = ANY(%(ids)s)
GROUP BY a.id
"""

# Writes only atc.assignment_stats (atc's own cache); row locks only on those cache rows.
STORE_ASSIGNMENT_STATS_SQL = """
INSERT INTO atc.assignment_stats (assignment_id, step_results, log_bytes_db, log_bytes_s3, computed_at)
SELECT (x->>'assignment_id')::int, (x->>'step_results')::bigint, (x->>'log_bytes_db')::bigint,
       (x->>'log_bytes_s3')::bigint, (x->>'computed_at')::timestamptz
FROM jsonb_array_elements(%(rows)s) x
ON CONFLICT (assignment_id) DO UPDATE SET step_results = EXCLUDED.step_results,
    log_bytes_db = EXCLUDED.log_bytes_db, log_bytes_s3 = EXCLUDED.log_bytes_s3, computed_at = EXCLUDED.computed_at
"""


# -- cancellation ---------------------------------------------------------------------------------


class QueryToken:
    """Cancels the one query it is attached to, server side (not every query of a Database).

    A screen hands a token to a list function running in a worker; Escape calls ``cancel()``,
    which sends PostgreSQL a cancel request for exactly that backend, so the query really stops.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self.cancelled = False

    def attach(self, conn: psycopg.Connection) -> None:
        with self._lock:
            self._conn = conn
            if self.cancelled:
                raise Cancelled("query cancelled")

    def detach(self) -> None:
        with self._lock:
            self._conn = None

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            conn = self._conn
        if conn is not None:
            try:
                conn.cancel_safe(timeout=3)
            except Exception:
                pass


def _fetch(db: Database, query: str | sql.Composable, params: dict[str, Any] | Sequence[Any], *, what: str,
           token: QueryToken | None = None) -> list[dict[str, Any]]:
    if token is None:
        return db.fetch(query, params, what=what)
    try:
        with db.connection() as conn:
            token.attach(conn)
            try:
                return conn.execute(query, params).fetchall()
            finally:
                token.detach()
    except psycopg.Error as exc:
        if token.cancelled:
            raise Cancelled(f"{what} cancelled") from None
        raise translate_error(exc, what) from None


# -- keyset machinery ----------------------------------------------------------------------------


def _key_params(key: Any) -> tuple[str, int]:
    """A page key is [sort value as text, id]; a bare id is accepted for the default sorts."""
    if isinstance(key, (list, tuple)) and len(key) == 2:
        return str(key[0]), int(key[1])
    if isinstance(key, int) or (isinstance(key, str) and key.lstrip("-").isdigit()):
        return str(int(key)), int(key)
    raise AtcError(f"page key {key!r} is not [value, id] or an id")


def row_key(row: dict[str, Any]) -> list[Any]:
    """The keyset key of a listed row (pass it back as ``after``/``before``)."""
    return [row["sort_key"], row["id"]]


def _compose(template: str, option: SortOption, id_expr: str, *, after: Any, before: Any,
             params: dict[str, Any], extra: dict[str, str] | None = None) -> tuple[sql.Composed, bool]:
    """Fill a page template; returns the query and whether rows come back reversed."""
    if after is not None and before is not None:
        raise AtcError("give either after or before, not both")
    backwards = before is not None
    key = after if after is not None else before
    descending = option.descending != backwards
    direction = sql.SQL("DESC" if descending else "ASC")
    order = sql.SQL("{expr} {d}, {id} {d}").format(expr=sql.SQL(option.expr), id=sql.SQL(id_expr), d=direction)
    outer_order = sql.SQL("page.sort_key_order {d}, page.id {d}").format(d=direction)
    if key is None:
        keyset = sql.SQL("true")
    else:
        value, ident = _key_params(key)
        params["key_value"] = value
        params["key_id"] = ident
        op = sql.SQL("<" if descending else ">")
        keyset = sql.SQL("({expr}, {id}) {op} (%(key_value)s::{cast}, %(key_id)s::integer)").format(
            expr=sql.SQL(option.expr), id=sql.SQL(id_expr), op=op, cast=sql.SQL(option.cast))
    parts = {
        "sort_expr": sql.SQL(option.expr), "keyset": keyset, "order": order,
        "outer_order": outer_order,
    }
    for name, text in (extra or {}).items():
        parts[name] = sql.SQL(text)
    return sql.SQL(template).format(**parts), backwards


def _page(rows: list[dict[str, Any]], limit: int, backwards: bool) -> Page:
    more = len(rows) > limit
    rows = rows[:limit]
    if backwards:
        rows.reverse()
        return Page(rows=rows, next_after=row_key(rows[0]) if more and rows else None)
    return Page(rows=rows, next_after=row_key(rows[-1]) if more and rows else None)


def _limit(limit: int) -> int:
    if limit < 1 or limit > 10_000:
        raise AtcError(f"--limit must be between 1 and 10000, not {limit}")
    return limit


def _text(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def _state(value: str | None, allowed: Sequence[str], what: str) -> str | None:
    value = _text(value)
    if value is not None and value not in allowed:
        raise AtcError(f"unknown {what} state {value!r} (use one of: {', '.join(allowed)})")
    return value


# -- list functions ------------------------------------------------------------------------------


def list_assignments(db: Database, *, state: str | None = None, search: str | None = None,
                     paused_only: bool = False, sort: str | None = None, after: Any = None,
                     before: Any = None, limit: int = 100, token: QueryToken | None = None) -> Page:
    """A page of assignments with run/result counts, pause mark and cached log bytes."""
    option = _sort("assignments", sort)
    state = _text(state)
    if state == "paused":
        state, paused_only = None, True
    state = _state(state, ASSIGNMENT_STATES + ("paused",), "assignment")
    limit = _limit(limit)
    params: dict[str, Any] = {"state": state, "search": _text(search), "paused_only": paused_only,
                              "limit": limit + 1}
    query, backwards = _compose(
        _with_order_column(ASSIGNMENTS_PAGE_SQL), option, "a.id", after=after, before=before, params=params,
        extra={"paused_columns": _PAUSED_COLUMNS, "latest_pause": _LATEST_PAUSE_LATERAL,
               "paused_predicate": PAUSE_ACTIVE_PREDICATE.format(e="pe")},
    )
    rows = _fetch(db, query, params, what="assignment list", token=token)
    return _page(_strip_order_column(rows), limit, backwards)


def list_runs(db: Database, assignment_id: int, *, sort: str | None = None, after: Any = None,
              before: Any = None, limit: int = 100, token: QueryToken | None = None) -> Page:
    """A page of runs of an assignment, each with its derived state and result counts."""
    option = _sort("runs", sort)
    limit = _limit(limit)
    params: dict[str, Any] = {"assignment_id": int(assignment_id), "limit": limit + 1}
    query, backwards = _compose(_with_order_column(RUNS_PAGE_SQL), option, "r.id", after=after, before=before,
                                params=params)
    rows = _strip_order_column(_fetch(db, query, params, what="run list", token=token))
    for row in rows:
        row["state"] = run_state(row)
    return _page(rows, limit, backwards)


def list_results(db: Database, run_id: int, *, state: str | None = None, search: str | None = None,
                 sort: str | None = None, after: Any = None, before: Any = None, limit: int = 100,
                 token: QueryToken | None = None) -> Page:
    """A page of results of a run: student, state, runner, steps by state, log bytes."""
    option = _sort("results", sort)
    limit = _limit(limit)
    params: dict[str, Any] = {"run_id": int(run_id), "state": _state(state, RESULT_STATES, "result"),
                              "search": _text(search), "limit": limit + 1}
    query, backwards = _compose(_with_order_column(RESULTS_PAGE_SQL), option, "res.id", after=after,
                                before=before, params=params)
    rows = _strip_order_column(_fetch(db, query, params, what="result list", token=token))
    return _page(rows, limit, backwards)


def list_steps(db: Database, result_id: int, *, state: str | None = None, search: str | None = None,
               sort: str | None = None, after: Any = None, before: Any = None, limit: int = 100,
               token: QueryToken | None = None) -> Page:
    """A page of step results of a result: where each log lives and its size, never its body."""
    option = _sort("steps", sort)
    limit = _limit(limit)
    params: dict[str, Any] = {"result_id": int(result_id), "state": _state(state, RESULT_STATES, "step"),
                              "search": _text(search), "limit": limit + 1}
    query, backwards = _compose(STEPS_PAGE_SQL, option, "s.id", after=after, before=before, params=params)
    rows = _fetch(db, query, params, what="step result list", token=token)
    for row in rows:
        row["log_bytes"] = row["log_s3_bytes"] if row["log_where"] == "s3" else row["log_stored_bytes"]
    return _page(rows, limit, backwards)


def _with_order_column(template: str) -> str:
    """Carry the typed sort expression out of the CTE so the outer ORDER BY sorts like the inner one
    (sort_key is text, and text order differs from integer/timestamp order)."""
    return template.replace("({sort_expr})::text AS sort_key", "({sort_expr})::text AS sort_key, ({sort_expr}) AS sort_key_order", 1)


def _strip_order_column(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        row.pop("sort_key_order", None)
    return rows


def run_state(row: dict[str, Any]) -> str:
    """A run has no state column; derive it from its results (and kill date)."""
    counts = row.get("results_by_state") or {}
    if row.get("kill_date") is not None:
        return "killed"
    if counts.get("running"):
        return "running"
    if not counts:
        return "empty"
    if counts.get("not_started"):
        return "not_started" if sum(counts.values()) == counts["not_started"] else "running"
    return "done"


# -- single rows (titles, NotFound) --------------------------------------------------------------


def get_assignment(db: Database, assignment_id: int, token: QueryToken | None = None) -> dict[str, Any]:
    rows = _fetch(db, ASSIGNMENT_SQL, (int(assignment_id),), what=f"assignment {assignment_id}", token=token)
    if not rows:
        raise NotFound(f"assignment {assignment_id} does not exist (check the id; `atc assignments` lists them)")
    return rows[0]


def get_run(db: Database, run_id: int, token: QueryToken | None = None) -> dict[str, Any]:
    rows = _fetch(db, RUN_SQL, (int(run_id),), what=f"run {run_id}", token=token)
    if not rows:
        raise NotFound(f"run {run_id} does not exist (check the id; `atc runs ASSIGNMENT_ID` lists them)")
    return rows[0]


def get_result(db: Database, result_id: int, token: QueryToken | None = None) -> dict[str, Any]:
    rows = _fetch(db, RESULT_SQL, (int(result_id),), what=f"result {result_id}", token=token)
    if not rows:
        raise NotFound(f"result {result_id} does not exist (check the id; `atc results RUN_ID` lists them)")
    return rows[0]


# -- the log-bytes cache -------------------------------------------------------------------------


def compute_assignment_log_bytes(db: Database, assignment_ids: Sequence[int],
                                 token: QueryToken | None = None) -> list[dict[str, Any]]:
    """Live stored log bytes (DB and S3) of the given assignments. Slow on huge assignments: run it
    in a worker with a token, after the list has painted."""
    ids = [int(i) for i in assignment_ids]
    if not ids:
        return []
    rows = _fetch(db, ASSIGNMENT_LOG_BYTES_SQL, {"ids": ids}, what="log bytes per assignment", token=token)
    found = {r["assignment_id"] for r in rows}
    as_of = rows[0]["computed_at"] if rows else datetime.now(timezone.utc)
    # Assignments without step results have zero bytes, not "unknown".
    for missing in sorted(set(ids) - found):
        rows.append({"assignment_id": missing, "step_results": 0, "log_bytes_db": 0, "log_bytes_s3": 0,
                     "computed_at": as_of})
    return rows


def store_assignment_stats(db: Database, rows: Sequence[dict[str, Any]]) -> None:
    """Cache computed log bytes in atc.assignment_stats (skipped by callers when read-only)."""
    payload = [
        {**{k: r[k] for k in ("assignment_id", "step_results", "log_bytes_db", "log_bytes_s3")},
         "computed_at": (r["computed_at"].isoformat() if r.get("computed_at") else None)}
        for r in rows
    ]
    payload = [p for p in payload if p["computed_at"]]
    if payload:
        db.execute(STORE_ASSIGNMENT_STATS_SQL, {"rows": Jsonb(payload)}, what="log bytes cache update")


def stale_assignment_ids(rows: Sequence[dict[str, Any]], max_age_seconds: float = STATS_MAX_AGE_SECONDS) -> list[int]:
    """Ids on a page whose cached log bytes are missing or older than ``max_age_seconds``."""
    now = datetime.now(timezone.utc)
    stale = []
    for row in rows:
        as_of = row.get("stats_as_of")
        if as_of is None or (now - as_of).total_seconds() > max_age_seconds:
            stale.append(row["id"])
    return stale


def apply_stats(rows: list[dict[str, Any]], stats: Sequence[dict[str, Any]]) -> None:
    """Merge computed log bytes into listed assignment rows (in place)."""
    by_id = {s["assignment_id"]: s for s in stats}
    for row in rows:
        s = by_id.get(row["id"])
        if s is not None:
            row["log_bytes_db"] = s["log_bytes_db"]
            row["log_bytes_s3"] = s["log_bytes_s3"]
            row["stats_step_results"] = s["step_results"]
            row["stats_as_of"] = s["computed_at"] or row.get("stats_as_of")

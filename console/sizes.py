"""Where the log bytes are: per table (heap / TOAST), per assignment and run, largest, histogram.

Never reads a log body. Every per-log figure is ``pg_column_size(log)``: the size the value takes
on disk (after compression), read from the inline varlena header or the TOAST pointer, without
de-TOASTing. Moved logs are counted from ``atc.moved_log.size`` (exact bytes in S3). Table sizes
come from the catalog (``pg_relation_size`` of the heap and of its TOAST relation), which takes
only ACCESS SHARE on each relation, under the session's lock_timeout.

A large ``auto_test_step_result`` (more rows than ``sample_above``, by the planner's estimate) is
read with ``TABLESAMPLE SYSTEM (p) REPEATABLE (seed)`` and the counts and bytes scaled by 100/p;
the report says so (``method``) and carries the time it was computed (``as_of``). The largest-logs
list is then the largest *in the sample* (it says so too); moved logs are always exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from psycopg import sql

from .db import Database
from .errors import DatabaseError

APP_TABLES = ("auto_test_step_result", "AutoTestResult", "AutoTestRun", "AutoTestStep", "Assignment", "Work",
              "job", "runner")

# Catalog sizes: ACCESS SHARE per relation (pg_relation_size opens it); never reads rows.
TABLE_SIZES = """
SELECT c.relname AS table_name, pg_relation_size(c.oid) AS heap_bytes,
       coalesce(pg_relation_size(NULLIF(c.reltoastrelid, 0)), 0) AS toast_bytes,
       pg_indexes_size(c.oid) AS index_bytes, pg_total_relation_size(c.oid) AS total_bytes,
       greatest(c.reltuples, 0)::bigint AS estimated_rows
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(current_schemas(false)) AND c.relkind IN ('r', 'p') AND c.relname = ANY(%s)
ORDER BY pg_total_relation_size(c.oid) DESC
"""
ESTIMATED_ROWS = """
SELECT greatest(reltuples, 0)::bigint AS n FROM pg_class WHERE oid = to_regclass('auto_test_step_result')
"""
# Exact: atc's own table.
MOVED_TOTALS = "SELECT count(*) AS logs, coalesce(sum(size), 0) AS bytes FROM atc.moved_log"
LARGEST_MOVED = """
SELECT m.step_result_id AS id, s.state::text AS state, m.size AS bytes, 's3' AS location
FROM atc.moved_log m LEFT JOIN auto_test_step_result s ON s.id = m.step_result_id
ORDER BY m.size DESC LIMIT %(top)s
"""
# The queries below read {src}: the step result table, whole or sampled. Only pg_column_size and
# the null bitmap of `log` are touched; no row locks.
INLINE_TOTALS = """
SELECT count(*) FILTER (WHERE s.log IS NOT NULL) AS logs,
       coalesce(sum(pg_column_size(s.log)), 0) AS bytes,
       count(*) AS rows
FROM {src}
"""
ABOVE_THRESHOLD = """
SELECT count(*) AS logs, coalesce(sum(pg_column_size(s.log)), 0) AS bytes,
       count(*) FILTER (WHERE s.state::text IN ('passed', 'failed', 'timed_out', 'skipped')) AS movable_logs,
       coalesce(sum(pg_column_size(s.log)) FILTER (WHERE s.state::text IN ('passed', 'failed', 'timed_out', 'skipped')), 0) AS movable_bytes
FROM {src}
WHERE s.log IS NOT NULL AND pg_column_size(s.log) >= %(threshold)s
"""
HISTOGRAM = """
SELECT b.bucket, count(*) AS logs, sum(x.sz) AS bytes
FROM (SELECT pg_column_size(s.log) AS sz FROM {src} WHERE s.log IS NOT NULL) x,
     LATERAL (SELECT CASE WHEN x.sz < 2 THEN 0 ELSE floor(ln(x.sz) / ln(2))::int END AS bucket) b
GROUP BY b.bucket ORDER BY b.bucket
"""
MOVED_HISTOGRAM = """
SELECT CASE WHEN size < 2 THEN 0 ELSE floor(ln(size) / ln(2))::int END AS bucket, count(*) AS logs, sum(size) AS bytes
FROM atc.moved_log GROUP BY 1 ORDER BY 1
"""
LARGEST_INLINE = """
SELECT s.id, s.state::text AS state, pg_column_size(s.log) AS bytes, 'db' AS location
FROM {src} WHERE s.log IS NOT NULL
ORDER BY pg_column_size(s.log) DESC LIMIT %(top)s
"""
BY_ASSIGNMENT = """
SELECT w."Assignment_id" AS assignment_id, a.name AS assignment,
       count(s.log) AS db_logs, coalesce(sum(pg_column_size(s.log)), 0) AS db_bytes,
       count(m.step_result_id) AS s3_logs, coalesce(sum(m.size), 0) AS s3_bytes
FROM {src}
JOIN "AutoTestResult" r ON r.id = s.auto_test_result_id
JOIN "Work" w ON w.id = r.work_id
JOIN "Assignment" a ON a.id = w."Assignment_id"
LEFT JOIN atc.moved_log m ON m.step_result_id = s.id
GROUP BY w."Assignment_id", a.name
ORDER BY coalesce(sum(pg_column_size(s.log)), 0) + coalesce(sum(m.size), 0) DESC
LIMIT %(top)s
"""
BY_RUN = """
SELECT r.auto_test_run_id AS run_id, w."Assignment_id" AS assignment_id,
       count(s.log) AS db_logs, coalesce(sum(pg_column_size(s.log)), 0) AS db_bytes,
       count(m.step_result_id) AS s3_logs, coalesce(sum(m.size), 0) AS s3_bytes
FROM {src}
JOIN "AutoTestResult" r ON r.id = s.auto_test_result_id
JOIN "Work" w ON w.id = r.work_id
LEFT JOIN atc.moved_log m ON m.step_result_id = s.id
GROUP BY r.auto_test_run_id, w."Assignment_id"
ORDER BY coalesce(sum(pg_column_size(s.log)), 0) + coalesce(sum(m.size), 0) DESC
LIMIT %(top)s
"""


@dataclass
class Source:
    """The whole step result table, or a repeatable sample of it with its scale factor."""

    percent: float = 100.0
    seed: int = 42

    @property
    def sampled(self) -> bool:
        return self.percent < 100.0

    @property
    def scale(self) -> float:
        return 100.0 / self.percent

    @property
    def label(self) -> str:
        return f"sampled {self.percent:.3g}% (TABLESAMPLE SYSTEM), scaled" if self.sampled else "exact"

    def clause(self) -> sql.Composable:
        if not self.sampled:
            return sql.SQL("auto_test_step_result s")
        return sql.SQL("auto_test_step_result s TABLESAMPLE SYSTEM ({}) REPEATABLE ({})").format(
            sql.Literal(self.percent), sql.Literal(self.seed))


def choose_source(db: Database, *, sample_above: int = 1_000_000, sample_rows: int = 200_000,
                  force_percent: float | None = None) -> Source:
    if force_percent is not None:
        return Source(percent=max(0.0001, min(100.0, force_percent)))
    row = db.fetch_one(ESTIMATED_ROWS, what="estimating the step result table")
    estimated = int(row["n"]) if row and row["n"] is not None else 0
    if estimated <= sample_above:
        return Source()
    return Source(percent=max(0.0001, min(100.0, 100.0 * sample_rows / estimated)))


def _q(template: str, source: Source) -> sql.Composed:
    return sql.SQL(template).format(src=source.clause())


@dataclass
class SizeReport:
    as_of: datetime
    method: str
    sample_percent: float
    tables: list[dict[str, Any]] = field(default_factory=list)
    db_logs: int = 0
    db_bytes: int = 0
    s3_logs: int = 0
    s3_bytes: int = 0
    threshold: int = 0
    above_threshold: dict[str, int] = field(default_factory=dict)
    histogram: list[dict[str, Any]] = field(default_factory=list)
    largest: list[dict[str, Any]] = field(default_factory=list)
    by_assignment: list[dict[str, Any]] = field(default_factory=list)
    by_run: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def s3_share(self) -> float:
        total = self.db_bytes + self.s3_bytes
        return self.s3_bytes / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["s3_share"] = round(self.s3_share, 4)
        return data


def _scaled(rows: list[dict[str, Any]], source: Source, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    if not source.sampled:
        return rows
    return [{**r, **{k: int(round(int(r[k] or 0) * source.scale)) for k in keys if k in r}} for r in rows]


def table_sizes(db: Database, tables: tuple[str, ...] = APP_TABLES) -> list[dict[str, Any]]:
    return db.fetch(TABLE_SIZES, (list(tables),), what="reading table sizes")


def above_threshold(db: Database, threshold: int, source: Source | None = None) -> dict[str, int]:
    source = source or choose_source(db)
    row = db.fetch_one(_q(ABOVE_THRESHOLD, source), {"threshold": int(threshold)}, what="counting logs above the threshold")
    assert row is not None
    return {k: int(round(int(row[k]) * source.scale)) for k in ("logs", "bytes", "movable_logs", "movable_bytes")}


def compute_sizes(db: Database, *, threshold: int = 1 << 20, top: int = 20, sample_above: int = 1_000_000,
                  sample_rows: int = 200_000, force_percent: float | None = None) -> SizeReport:
    """The whole report. Each query is bounded by the session's statement_timeout."""
    source = choose_source(db, sample_above=sample_above, sample_rows=sample_rows, force_percent=force_percent)
    now = db.fetch_one("SELECT now() AS now", what="clock")
    report = SizeReport(as_of=now["now"] if now else datetime.now(), method=source.label,
                        sample_percent=source.percent, threshold=int(threshold))
    try:
        report.tables = table_sizes(db)
    except DatabaseError as exc:
        report.notes.append(f"table sizes unavailable: {exc.message}")
    inline = db.fetch_one(_q(INLINE_TOTALS, source), what="totalling inline logs")
    assert inline is not None
    report.db_logs = int(round(int(inline["logs"]) * source.scale))
    report.db_bytes = int(round(int(inline["bytes"]) * source.scale))
    moved = db.fetch_one(MOVED_TOTALS, what="totalling moved logs")
    assert moved is not None
    report.s3_logs, report.s3_bytes = int(moved["logs"]), int(moved["bytes"])
    report.above_threshold = above_threshold(db, threshold, source)
    db_hist = {r["bucket"]: r for r in _scaled(db.fetch(_q(HISTOGRAM, source), what="log size histogram"),
                                                 source, ("logs", "bytes"))}
    s3_hist = {r["bucket"]: r for r in db.fetch(MOVED_HISTOGRAM, what="moved log size histogram")}
    for b in sorted(set(db_hist) | set(s3_hist)):
        report.histogram.append({
            "bucket": b, "from_bytes": 0 if b == 0 else 1 << b, "to_bytes": 1 << (b + 1),
            "db_logs": int(db_hist.get(b, {}).get("logs") or 0), "db_bytes": int(db_hist.get(b, {}).get("bytes") or 0),
            "s3_logs": int(s3_hist.get(b, {}).get("logs") or 0), "s3_bytes": int(s3_hist.get(b, {}).get("bytes") or 0),
        })
    largest = db.fetch(_q(LARGEST_INLINE, source), {"top": top}, what="largest logs")
    largest += db.fetch(LARGEST_MOVED, {"top": top}, what="largest moved logs")
    largest.sort(key=lambda r: -int(r["bytes"] or 0))
    report.largest = largest[:top]
    if source.sampled:
        report.notes.append("largest inline logs are the largest in the sample; moved logs are exact")
    report.by_assignment = _scaled(db.fetch(_q(BY_ASSIGNMENT, source), {"top": top}, what="sizes per assignment"),
                                   source, ("db_logs", "db_bytes", "s3_logs", "s3_bytes"))
    report.by_run = _scaled(db.fetch(_q(BY_RUN, source), {"top": top}, what="sizes per run"),
                            source, ("db_logs", "db_bytes", "s3_logs", "s3_bytes"))
    return report

"""Moving large step logs from PostgreSQL to S3 without losing a byte.

Per log (``move_one``), on one dedicated connection:

1. ``pg_try_advisory_lock(MOVE_LOCK_CLASS, id)`` (session level): only one atc process works on a
   log at a time (another shard host, a restore, the orphan cleaner). A log whose lock is taken is
   skipped ("busy"), never waited on. The lock dies with the connection, so a killed process
   leaves nothing behind.
2. In one REPEATABLE READ transaction: read the row's ``xmin``, state and stored size, then stream
   the log with ``COPY ... (FORMAT BINARY)`` (``logstore.stream_db_log``) into a spool (memory up
   to ``spool_memory``, then a temp file), computing size, SHA-256, MD5 and the grader summary
   (``logformat.summarize_log_stream``) on the way. Same snapshot, so ``xmin`` names exactly the
   tuple version whose bytes were read. No row lock is taken.
3. Upload to the deterministic key ``ObjectStore.log_key(id)``: one PUT with Content-MD5 up to
   ``multipart_threshold``, else a multipart upload through boto3's transfer manager from the
   spool file (parts are read from disk lazily, so memory stays bounded).
4. Verify by reading the object back: its size and SHA-256 must equal what was read from the DB.
5. One short READ COMMITTED transaction (``lock_timeout`` short): set ``log = NULL`` only if the
   row still has the same ``xmin`` (no UPDATE of any kind happened since the read), the same stored
   size and a finished state, locking that single row with ``SKIP LOCKED`` so a row held by the
   application is skipped, never waited on; then upsert the pointer. Commit.

Crash safety: the pointer write and ``log = NULL`` are one transaction, so after a crash at any
point a log is either inline (authoritative; any uploaded object is an orphan that a rerun
overwrites or ``atc orphans --delete`` removes) or moved (pointer + NULL: S3 authoritative, the
object verified before the commit). See docs/migration.md for the fault matrix.

Fault injection for the crash tests: ``ATC_FAULT=<point>`` makes the process SIGKILL itself when it
reaches ``<point>`` for the ``ATC_FAULT_SKIP+1``-th time. Inert unless the variable is set.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator

import psycopg
from psycopg.types.json import Jsonb

from .audit import audited, require_writable
from .config import Settings
from .db import Database, connect, first_line, translate_error
from .errors import AtcError, Cancelled, DatabaseError, NotFound, StorageError
from .logformat import summarize_log_stream
from .logstore import stream_db_log, stream_db_logs
from .storage import ObjectStore
from .text import visible

FINISHED_STATES = ("passed", "failed", "timed_out", "skipped")
# Small logs are latency-bound (a PUT, a verifying GET, a share of two batched statements): more
# logs in flight keep S3 and PostgreSQL busy; big logs are bandwidth-bound and need few.
DEFAULT_CONCURRENCY = 8
# pg_advisory_lock(int4, int4) class id for "an atc process is moving/restoring/cleaning log <id>".
MOVE_LOCK_CLASS = 0x0A7C0002

# -- SQL -----------------------------------------------------------------------------------------

# Keyset page of candidate logs in one shard, in id order, over the primary key. Reads only the
# null bitmap and pg_column_size (the inline header or TOAST pointer), never the body; no row locks.
CANDIDATES = """
SELECT s.id, s.state::text AS state, pg_column_size(s.log) AS stored_size
FROM auto_test_step_result s
WHERE s.id > %(after)s
  AND s.log IS NOT NULL
  AND pg_column_size(s.log) >= %(min_size)s
  AND s.id %% %(shard_count)s = %(shard_index)s
  AND (NOT %(finished_only)s OR s.state::text = ANY(%(finished)s))
  AND (%(assignments)s::int[] IS NULL OR EXISTS (
        SELECT 1 FROM "AutoTestResult" r JOIN "Work" w ON w.id = r.work_id
        WHERE r.id = s.auto_test_result_id AND w."Assignment_id" = ANY(%(assignments)s)))
ORDER BY s.id
LIMIT %(limit)s
"""

# Which of the assignment ids given to --assignment exist (primary key lookup; ACCESS SHARE only,
# no row locks, no log column): an unknown id is an operator error, not "0 logs to move".
ASSIGNMENTS_BY_ID = 'SELECT id FROM "Assignment" WHERE id = ANY(%s)'

# Session-level advisory lock on one log id (released explicitly, or when the connection ends).
TRY_LOCK_LOG = "SELECT pg_try_advisory_lock(%s, %s) AS got"
UNLOCK_LOG = "SELECT pg_advisory_unlock(%s, %s) AS released"

# Inside the REPEATABLE READ read transaction: the tuple version we are about to stream. No lock.
READ_META = """
SELECT xmin::text AS xmin, state::text AS state, pg_column_size(log) AS stored_size
FROM auto_test_step_result WHERE id = %s
"""

# The swap. Locks the single row only if nobody holds it (SKIP LOCKED: never waits) and only if
# it is the very tuple version we read (xmin) with the same stored size and a finished state.
SWAP_TO_POINTER = """
UPDATE auto_test_step_result SET log = NULL
WHERE id = (SELECT id FROM auto_test_step_result
            WHERE id = %(id)s AND xmin = %(xmin)s::xid AND log IS NOT NULL
              AND pg_column_size(log) = %(stored_size)s AND state::text = ANY(%(finished)s)
            FOR NO KEY UPDATE SKIP LOCKED)
RETURNING id
"""

# Why a swap did not happen (no lock): changed since read, or still the same (then it was locked).
WHY_NOT_SWAPPED = """
SELECT xmin::text AS xmin, state::text AS state, log IS NOT NULL AS inline,
       pg_column_size(log) AS stored_size
FROM auto_test_step_result WHERE id = %s
"""

# atc schema only. A stale pointer (left by a half-finished move the application undid) is replaced.
UPSERT_POINTER = """
INSERT INTO atc.moved_log (step_result_id, bucket, key, size, sha256, summary, moved_at, moved_by)
VALUES (%(id)s, %(bucket)s, %(key)s, %(size)s, %(sha256)s, %(summary)s, now(), %(operator)s)
ON CONFLICT (step_result_id) DO UPDATE
SET bucket = EXCLUDED.bucket, key = EXCLUDED.key, size = EXCLUDED.size, sha256 = EXCLUDED.sha256,
    summary = EXCLUDED.summary, moved_at = EXCLUDED.moved_at, moved_by = EXCLUDED.moved_by
"""

# -- batches of small logs (one statement for many ids) --

# Session-level advisory locks on many log ids at once; returns the ids we got (the others are
# held by another atc process: "busy"). No table is touched.
TRY_LOCK_LOGS = "SELECT id FROM unnest(%(ids)s::int[]) AS id WHERE pg_try_advisory_lock(%(cls)s::int, id)"
UNLOCK_LOGS = "SELECT count(*) FILTER (WHERE pg_advisory_unlock(%(cls)s::int, id)) AS released FROM unnest(%(ids)s::int[]) AS id"

# READ_META for a batch, inside the REPEATABLE READ read transaction. Null bitmap and TOAST
# pointer only (no body); no lock.
READ_META_MANY = """
SELECT id, xmin::text AS xmin, state::text AS state, pg_column_size(log) AS stored_size
FROM auto_test_step_result WHERE id = ANY(%(ids)s::int[])
"""

# SWAP_TO_POINTER and UPSERT_POINTER for a batch, as one statement in one short transaction:
# every row is guarded on its own (same xmin = the very tuple version we read, same stored size,
# finished) and locked with SKIP LOCKED (rows held by the application are skipped, never waited
# on); pointers are written only for the rows actually swapped. No body is read.
SWAP_MANY = """
WITH v AS (
    SELECT * FROM unnest(%(ids)s::int[], %(xmins)s::text[], %(stored)s::int[], %(keys)s::text[],
                         %(sizes)s::bigint[], %(shas)s::text[], %(summaries)s::text[])
           AS v(id, xmin, stored_size, key, size, sha256, summary)
), target AS (
    SELECT s.id FROM auto_test_step_result s JOIN v ON v.id = s.id
    WHERE s.xmin = v.xmin::xid AND s.log IS NOT NULL AND pg_column_size(s.log) = v.stored_size
      AND s.state::text = ANY(%(finished)s)
    FOR NO KEY UPDATE OF s SKIP LOCKED
), swapped AS (
    UPDATE auto_test_step_result s SET log = NULL FROM target WHERE s.id = target.id RETURNING s.id
), pointers AS (
    INSERT INTO atc.moved_log (step_result_id, bucket, key, size, sha256, summary, moved_at, moved_by)
    SELECT v.id, %(bucket)s, v.key, v.size, v.sha256, v.summary::jsonb, now(), %(operator)s
    FROM v JOIN swapped ON swapped.id = v.id
    ON CONFLICT (step_result_id) DO UPDATE
    SET bucket = EXCLUDED.bucket, key = EXCLUDED.key, size = EXCLUDED.size, sha256 = EXCLUDED.sha256,
        summary = EXCLUDED.summary, moved_at = EXCLUDED.moved_at, moved_by = EXCLUDED.moved_by
    RETURNING step_result_id
)
SELECT step_result_id AS id FROM pointers
"""

# WHY_NOT_SWAPPED for a batch (no lock, no body).
WHY_NOT_SWAPPED_MANY = """
SELECT id, xmin::text AS xmin, state::text AS state, log IS NOT NULL AS inline,
       pg_column_size(log) AS stored_size
FROM auto_test_step_result WHERE id = ANY(%(ids)s::int[])
"""

# Run coordination (atc schema only). Hosts starting the same run serialise on an xact lock.
RUN_LOCK = "SELECT pg_advisory_xact_lock(%s)"
RUN_LOCK_KEY = 0x0A7C_0003
FIND_OPEN_RUN = """
SELECT r.id FROM atc.migration_run r
WHERE r.finished_at IS NULL AND r.params = %(params)s
  AND NOT EXISTS (SELECT 1 FROM atc.migration_progress p
                  WHERE p.run_id = r.id AND p.shard = %(shard)s AND p.shard_count = %(shard_count)s
                    AND p.finished_at IS NOT NULL)
ORDER BY r.id DESC LIMIT 1
"""
CREATE_RUN = """
INSERT INTO atc.migration_run (operator, min_size, params) VALUES (%(operator)s, %(min_size)s, %(params)s)
RETURNING id
"""
JOIN_SHARD = """
INSERT INTO atc.migration_progress (run_id, shard, shard_count) VALUES (%(run)s, %(shard)s, %(shard_count)s)
ON CONFLICT (run_id, shard, shard_count) DO UPDATE SET updated_at = now()
RETURNING last_step_result_id, moved_logs, moved_bytes, skipped, failed
"""
SAVE_PROGRESS = """
UPDATE atc.migration_progress
SET last_step_result_id = GREATEST(last_step_result_id, %(watermark)s), moved_logs = %(moved_logs)s,
    moved_bytes = %(moved_bytes)s, skipped = %(skipped)s, failed = %(failed)s,
    last_error = %(last_error)s, updated_at = now(),
    finished_at = CASE WHEN %(finished)s THEN now() ELSE finished_at END
WHERE run_id = %(run)s AND shard = %(shard)s AND shard_count = %(shard_count)s
"""
# The run is finished when every shard 1..N has finished.
FINISH_RUN_IF_DONE = """
UPDATE atc.migration_run r SET finished_at = now()
WHERE r.id = %(run)s AND r.finished_at IS NULL
  AND (SELECT count(*) FROM atc.migration_progress p
       WHERE p.run_id = r.id AND p.shard_count = %(shard_count)s AND p.finished_at IS NOT NULL) >= %(shard_count)s
"""
LIST_RUNS = """
SELECT r.id, r.started_at, r.finished_at, r.operator, r.min_size, r.params,
       coalesce(sum(p.moved_logs), 0) AS moved_logs, coalesce(sum(p.moved_bytes), 0) AS moved_bytes,
       coalesce(sum(p.skipped), 0) AS skipped, coalesce(sum(p.failed), 0) AS failed,
       count(p.shard) AS shards_seen, count(p.finished_at) AS shards_finished
FROM atc.migration_run r LEFT JOIN atc.migration_progress p ON p.run_id = r.id
GROUP BY r.id ORDER BY r.id DESC LIMIT %(limit)s
"""

# -- fault injection (crash tests) ---------------------------------------------------------------

FAULT_POINTS = ("after_read", "during_upload", "after_upload", "after_verify", "before_commit",
                "after_commit")
_fault_lock = threading.Lock()
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process at a named point when ATC_FAULT names it (tests only; inert otherwise)."""
    wanted = os.environ.get("ATC_FAULT")
    if not wanted or wanted != name:
        return
    with _fault_lock:
        _fault_hits[name] = _fault_hits.get(name, 0) + 1
        if _fault_hits[name] > int(os.environ.get("ATC_FAULT_SKIP", "0") or 0):
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)  # pragma: no cover - the signal is not deliverable late


# -- options, plan, stats ------------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 1 <= K <= N."""
    try:
        k_text, n_text = str(text).split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise AtcError(f"--shard {text!r} is not K/N (e.g. 1/2)") from None
    if n < 1 or not 1 <= k <= n:
        raise AtcError(f"--shard {text!r}: K must be between 1 and N")
    return k, n


@dataclass(frozen=True)
class MigrationOptions:
    min_size: int
    assignment_ids: tuple[int, ...] = ()
    concurrency: int = DEFAULT_CONCURRENCY
    shard: int = 1
    shard_count: int = 1
    max_bytes: int | None = None
    reason: str = ""
    # Above this many bytes a log is uploaded in parts by boto3's transfer manager.
    multipart_threshold: int = 16 * 1024 * 1024
    multipart_chunksize: int = 16 * 1024 * 1024
    # Threads per multipart upload (on top of `concurrency` logs in flight).
    multipart_concurrency: int = 4
    # A log is spooled in memory up to this size, then to a temp file (bounded memory per worker:
    # at most concurrency x spool_memory for spools, 64 MiB at the default 8). In memory, a log up
    # to here is PUT as bytes: no temp file write and re-read, no "Expect: 100-continue" trip.
    spool_memory: int = 8 * 1024 * 1024
    spool_dir: str | None = None
    batch_size: int = 500
    # Logs stored at or below this size are read in batches (one statement for many ids) and
    # their swaps group-committed (one transaction for the logs verified meanwhile); 0 = never.
    small_log_max: int = 256 * 1024
    # At most this many small logs are read (and advisory-locked) per statement.
    read_batch: int = 64
    # After the main pass, logs that were locked, changed or failed are retried in sweeps.
    retry_sweeps: int = 3
    retry_delay: float = 0.5
    # Stop the run (resumable) after this many failures in a row: something systemic is wrong.
    max_consecutive_failures: int = 10
    swap_lock_timeout: str = "500ms"
    # Reading one big log (or writing it back) may legitimately take minutes; it holds no lock
    # that blocks the application (COPY takes ACCESS SHARE on the table, as any SELECT).
    body_statement_timeout: str = "30min"
    new_run: bool = False

    def __post_init__(self) -> None:
        if self.min_size < 0:
            raise AtcError("--min-size must not be negative")
        if self.concurrency < 1:
            raise AtcError("--concurrency must be at least 1")
        if not 1 <= self.shard <= self.shard_count:
            raise AtcError("--shard K/N: K must be between 1 and N")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise AtcError("--max-bytes must be positive")

    def run_params(self) -> dict[str, Any]:
        """What identifies a run: hosts with the same params join the same run."""
        return {
            "min_size": self.min_size,
            "assignments": sorted(self.assignment_ids) or None,
            "max_bytes": self.max_bytes,
            "shard_count": self.shard_count,
        }


def _query_params(opts: MigrationOptions, after: int, finished_only: bool, limit: int) -> dict[str, Any]:
    return {
        "after": after, "min_size": opts.min_size, "shard_count": opts.shard_count,
        "shard_index": opts.shard - 1, "finished_only": finished_only, "finished": list(FINISHED_STATES),
        "assignments": list(opts.assignment_ids) or None, "limit": limit,
    }


@dataclass
class Plan:
    """What a run would move: logs and stored bytes by state (from sizes only, no bodies)."""

    logs: int = 0
    stored_bytes: int = 0
    movable_logs: int = 0
    movable_bytes: int = 0
    by_state: dict[str, dict[str, int]] = field(default_factory=dict)
    largest: list[dict[str, Any]] = field(default_factory=list)
    capped_by_max_bytes: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_assignments(db: Database, assignment_ids: tuple[int, ...] | list[int]) -> None:
    """NotFound naming every --assignment id that does not exist (same rule as `atc pause`)."""
    if not assignment_ids:
        return
    rows = db.fetch(ASSIGNMENTS_BY_ID, (list(assignment_ids),), what="assignment lookup")
    known = {r["id"] for r in rows}
    missing = [i for i in assignment_ids if i not in known]
    if missing:
        raise NotFound(f"no assignment with id {', '.join(map(str, missing))} (check --assignment; "
                       "`atc assignments` lists them)")


def plan_migration(db: Database, opts: MigrationOptions, *, after: int = 0) -> Plan:
    """Dry run: walk the candidates of this shard (sizes only) and total them."""
    check_assignments(db, opts.assignment_ids)
    plan = Plan()
    cursor = after
    while True:
        rows = db.fetch(CANDIDATES, _query_params(opts, cursor, False, 5000), what="planning the migration")
        if not rows:
            break
        for row in rows:
            size = int(row["stored_size"] or 0)
            bucket = plan.by_state.setdefault(row["state"], {"logs": 0, "bytes": 0})
            bucket["logs"] += 1
            bucket["bytes"] += size
            plan.logs += 1
            plan.stored_bytes += size
            if row["state"] in FINISHED_STATES:
                if opts.max_bytes is not None and plan.movable_bytes + size > opts.max_bytes and plan.movable_logs:
                    plan.capped_by_max_bytes = True
                    continue
                plan.movable_logs += 1
                plan.movable_bytes += size
                plan.largest.append({"id": row["id"], "stored_size": size})
                if len(plan.largest) > 40:
                    plan.largest.sort(key=lambda r: -r["stored_size"])
                    del plan.largest[20:]
        cursor = rows[-1]["id"]
    plan.largest.sort(key=lambda r: -r["stored_size"])
    del plan.largest[20:]
    return plan


@dataclass
class MigrationStats:
    """Live counters, shared between worker threads, the progress writer and the UI.

    Two kinds of bytes, never mixed: *stored* bytes are ``pg_column_size`` (what the log takes in
    the database, compressed: the plan, the threshold and the progress bar count these); *uploaded*
    bytes are the raw log bytes written to S3 (``moved_bytes`` and the rate)."""

    run_id: int = 0
    shard: str = "1/1"
    planned_logs: int = 0
    planned_bytes: int = 0  # stored (pg_column_size, compressed) bytes of the planned logs
    moved_logs: int = 0
    moved_bytes: int = 0  # exact raw bytes uploaded to S3
    moved_stored_bytes: int = 0  # stored (compressed) bytes the moved logs freed in the database
    done_stored_bytes: int = 0  # stored bytes of logs dealt with (moved or not): drives the bar
    skipped: int = 0
    failed: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    last_error: str = ""
    started_at: float = field(default_factory=time.monotonic)
    state: str = "starting"  # starting, running, cancelling, finished, stopped, failed
    failures: list[dict[str, Any]] = field(default_factory=list)
    # Set by migrate_logs (not a dataclass field: not copied into snapshots): time spent paused
    # is left out of elapsed, rate and ETA, so they stand still while paused.
    control: "MigrationControl | None" = field(default=None, repr=False, compare=False)

    @property
    def paused(self) -> bool:
        return self.control is not None and self.control.paused and self.state in ("starting", "running")

    @property
    def elapsed(self) -> float:
        """Seconds the run has been working (time spent paused excluded)."""
        paused_for = self.control.paused_seconds() if self.control is not None else 0.0
        return max(1e-9, time.monotonic() - self.started_at - paused_for)

    @property
    def rate(self) -> float:
        """Raw bytes uploaded to S3 per working second."""
        return self.moved_bytes / self.elapsed

    @property
    def eta(self) -> float | None:
        """Working seconds left, from the stored bytes dealt with so far; None when unknown."""
        if not self.done_stored_bytes or self.planned_bytes <= self.done_stored_bytes:
            return None
        per_byte = self.elapsed / self.done_stored_bytes
        return (self.planned_bytes - self.done_stored_bytes) * per_byte

    def snapshot(self) -> dict[str, Any]:
        skip = ("started_at", "failures", "control")
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        data["skipped_reasons"] = dict(self.skipped_reasons)
        data.update(elapsed=round(self.elapsed, 3), rate_bytes_per_s=round(self.rate, 1),
                    eta_s=None if self.eta is None else round(self.eta, 1), paused=self.paused,
                    failures=list(self.failures[:50]))
        return data


class MigrationControl:
    """Pause / resume / cancel a running migration from another thread (the TUI)."""

    def __init__(self) -> None:
        self._running = threading.Event()
        self._running.set()
        self.cancelled = threading.Event()
        self._pause_lock = threading.Lock()
        self._paused_total = 0.0
        self._paused_since: float | None = None

    def pause(self) -> None:
        with self._pause_lock:
            if self._paused_since is None:
                self._paused_since = time.monotonic()
            self._running.clear()

    def resume(self) -> None:
        with self._pause_lock:
            if self._paused_since is not None:
                self._paused_total += time.monotonic() - self._paused_since
                self._paused_since = None
            self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def paused_seconds(self) -> float:
        """Total time paused so far, the current pause included."""
        with self._pause_lock:
            current = time.monotonic() - self._paused_since if self._paused_since is not None else 0.0
            return self._paused_total + current

    def cancel(self) -> None:
        self.cancelled.set()
        self.resume()

    def wait_if_paused(self) -> bool:
        """Block while paused; False once cancelled."""
        while not self._running.wait(0.2):
            if self.cancelled.is_set():
                return False
        return not self.cancelled.is_set()


# -- one log -------------------------------------------------------------------------------------


@dataclass
class MoveOutcome:
    step_result_id: int
    # moved, busy, locked, changed, running, gone, failed
    status: str
    stored_size: int = 0
    size: int = 0
    sha256: str = ""
    key: str = ""
    error: str = ""

    @property
    def skipped(self) -> bool:
        return self.status in ("busy", "locked", "changed", "running", "gone")


class _Spool:
    """Bytes in memory up to a limit, then in an (anonymous-ish) temp file: bounded memory."""

    def __init__(self, memory_limit: int, directory: str | None) -> None:
        self._limit = memory_limit
        self._dir = directory
        self._buf: io.BytesIO | None = io.BytesIO()
        self._file: Any = None
        self.size = 0

    def write(self, data: bytes) -> None:
        if self._buf is not None and self.size + len(data) > self._limit:
            self._file = tempfile.NamedTemporaryFile(prefix="atc-log-", dir=self._dir, delete=True)
            self._file.write(self._buf.getbuffer())
            self._buf = None
        (self._buf if self._buf is not None else self._file).write(data)
        self.size += len(data)

    @property
    def in_memory(self) -> bool:
        return self._buf is not None

    def getvalue(self) -> bytes:
        assert self._buf is not None
        return self._buf.getvalue()

    @property
    def path(self) -> str | None:
        if self._file is not None:
            self._file.flush()
            return self._file.name
        return None

    def reader(self) -> Any:
        if self._buf is not None:
            return io.BytesIO(self._buf.getbuffer())
        self._file.flush()
        return open(self._file.name, "rb")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._buf = None


class _FaultingReader:
    """A body wrapper that triggers the `during_upload` fault after half the bytes were sent."""

    def __init__(self, raw: Any, total: int) -> None:
        self._raw, self._half, self._sent, self._fired = raw, max(1, total // 2), 0, False

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._sent += len(data)
        if self._sent >= self._half and not self._fired:
            self._fired = True  # one hit per upload, so ATC_FAULT_SKIP counts logs
            fault_point("during_upload")
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def _is_fatal_s3(exc: BaseException) -> bool:
    """Errors that will fail every log alike: stop the run instead of failing them one by one."""
    from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError,
                                     NoCredentialsError, ConnectionClosedError)

    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, NoCredentialsError, ConnectionClosedError)):
        return True
    if isinstance(exc, ClientError):
        code = str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))
        return code in ("NoSuchBucket", "403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")
    return False


class FatalRunError(AtcError):
    """Stops the whole run (S3 or the database is gone); the run is resumable."""


def _sanitize_for_jsonb(value: Any) -> Any:
    """jsonb rejects NUL and lone surrogates that a json log may hold: show them as escapes."""
    if isinstance(value, str):
        return visible(value)
    if isinstance(value, dict):
        return {visible(k): _sanitize_for_jsonb(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_sanitize_for_jsonb(v) for v in value]
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    return value


class _ReadBack:
    """The verifying GET, cheaper: a presigned URL fetched over a kept-alive http.client connection
    (one per worker thread).

    botocore spends ~2.5 ms of CPU per get_object (event hooks, response parsing), urllib3 ~0.7
    ms, this path ~0.4 ms; that matters when the GET is half the S3 work of a 20 KB log. It still
    reads every byte back from the store. Anything but a plain 200 (an error status, a refused,
    reset or timed-out connection) returns None, and the caller repeats the GET through boto3 so
    that errors keep their usual one-line translation.
    """

    def __init__(self, store: ObjectStore, pool_size: int = 0) -> None:
        self.store = store
        self._timeout = max(store.settings.s3.connect_timeout, store.settings.s3.read_timeout)
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        self._base: str | None = None
        self._credentials: Any = None

    def _connection(self, scheme: str, host: str, port: int | None) -> Any:
        import http.client

        conn = getattr(self._local, "conn", None)
        if conn is None or (conn.host, conn.port) != (host, port or conn.default_port):
            if scheme == "https":
                import ssl

                conn = http.client.HTTPSConnection(host, port, timeout=self._timeout,
                                                   context=ssl.create_default_context())
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self._timeout)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _url(self, key: str) -> str:
        """A presigned GET URL. botocore's generate_presigned_url costs ~0.5 ms of CPU (client
        events); signing the same request with its S3SigV4QueryAuth directly ~0.07 ms. The URL
        layout (endpoint, addressing style) is learned once from the client itself."""
        from urllib.parse import quote

        from botocore.auth import S3SigV4QueryAuth
        from botocore.awsrequest import AWSRequest

        client = self.store.client
        if self._base is None:
            probe = client.generate_presigned_url("get_object", Params={"Bucket": self.store.bucket, "Key": key},
                                                  ExpiresIn=900).split("?", 1)[0]
            quoted = quote(key, safe="/~")
            credentials = getattr(getattr(client, "_request_signer", None), "_credentials", None)
            if not probe.endswith(quoted) or credentials is None:
                self._base = ""  # unknown layout: always ask the client
            else:
                self._base = probe[: -len(quoted)]
                self._credentials = credentials
        if not self._base:
            return client.generate_presigned_url("get_object", Params={"Bucket": self.store.bucket, "Key": key},
                                                 ExpiresIn=900)
        request = AWSRequest(method="GET", url=self._base + quote(key, safe="/~"))
        S3SigV4QueryAuth(self._credentials.get_frozen_credentials(), "s3", client.meta.region_name,
                         expires=900).add_auth(request)
        return request.url

    def read_back(self, key: str) -> tuple[int, str] | None:
        from urllib.parse import urlsplit

        conn = None
        try:
            with self._lock:
                url = self._url(key) if self._base is None else None
            if url is None:
                url = self._url(key)
            parts = urlsplit(url)
            conn = self._connection(parts.scheme, parts.hostname or "", parts.port)
            conn.request("GET", f"{parts.path}?{parts.query}")
            response = conn.getresponse()
            h = hashlib.sha256()
            n = 0
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                n += len(chunk)
            if response.status != 200 or response.getheader("Content-Encoding"):
                return None
            return n, h.hexdigest()
        except Exception:
            if conn is not None:
                conn.close()  # reconnects on the next request
            return None

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


class LogMover:
    """Moves single logs; one instance per worker thread (it owns one DB connection)."""

    def __init__(self, settings: Settings, store: ObjectStore, opts: MigrationOptions,
                 verifier: "_ReadBack | None" = None) -> None:
        self.settings = settings
        self.store = store
        self.opts = opts
        self.verifier = verifier
        self._conn: psycopg.Connection | None = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.settings, application_suffix="/migrate")
        return self._conn

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None

    def move(self, step_result_id: int) -> MoveOutcome:
        try:
            conn = self._connection()
            got = conn.execute(TRY_LOCK_LOG, (MOVE_LOCK_CLASS, step_result_id)).fetchone()["got"]
        except psycopg.Error as exc:
            self.close()
            raise FatalRunError(translate_error(exc, f"moving log {step_result_id}").message) from None
        if not got:
            return MoveOutcome(step_result_id, "busy")
        try:
            return self._move_locked(conn, step_result_id)
        except psycopg.Error as exc:
            # A lost connection also released our advisory lock; nothing was committed.
            self.close()
            if isinstance(exc, psycopg.OperationalError) or conn.broken:
                raise FatalRunError(translate_error(exc, f"moving log {step_result_id}").message) from None
            return MoveOutcome(step_result_id, "failed", error=translate_error(exc, f"moving log {step_result_id}").message)
        finally:
            if self._conn is not None and not self._conn.closed:
                try:
                    self._conn.execute(UNLOCK_LOG, (MOVE_LOCK_CLASS, step_result_id))
                except psycopg.Error:
                    self.close()

    def _move_locked(self, conn: psycopg.Connection, sid: int) -> MoveOutcome:
        opts = self.opts
        spool = _Spool(opts.spool_memory, opts.spool_dir)
        try:
            # 2. read: one snapshot for xmin and the bytes.
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            try:
                conn.execute("SELECT set_config('statement_timeout', %s, true)", (opts.body_statement_timeout,))
                meta = conn.execute(READ_META, (sid,)).fetchone()
                if meta is None or meta["stored_size"] is None:
                    conn.execute("ROLLBACK")
                    return MoveOutcome(sid, "gone")
                if meta["state"] not in FINISHED_STATES:
                    conn.execute("ROLLBACK")
                    return MoveOutcome(sid, "running", stored_size=meta["stored_size"])
                sha, md5 = hashlib.sha256(), hashlib.md5()
                md5_wanted = True

                def tee() -> Iterator[bytes]:
                    nonlocal md5_wanted
                    for chunk in stream_db_log(conn, sid):
                        sha.update(chunk)
                        if md5_wanted:
                            md5.update(chunk)
                        spool.write(chunk)
                        # Content-MD5 is sent only with a single PUT; a multipart log skips it.
                        md5_wanted = spool.size <= opts.multipart_threshold
                        yield chunk

                stream = tee()
                summary = summarize_log_stream(stream)
                for _ in stream:  # an unparsable log is still moved byte for byte
                    pass
                conn.execute("COMMIT")
            except BaseException:
                if not conn.closed and not conn.broken:
                    conn.execute("ROLLBACK")
                raise
            stored_size, xmin = meta["stored_size"], meta["xmin"]
            digest = sha.hexdigest()
            fault_point("after_read")

            # 3. upload to the deterministic key.
            key = self.store.log_key(sid)
            self._upload(spool, key, digest, md5.digest(), sid)
            fault_point("after_upload")

            # 4. verify by reading it back.
            self._verify(key, spool.size, digest)
            fault_point("after_verify")

            # 5. the swap.
            summary = _sanitize_for_jsonb(summary)
            summary.setdefault("bytes", spool.size)
            return self._swap(conn, sid, xmin, stored_size, key, spool.size, digest, summary)
        finally:
            spool.close()

    def _upload(self, spool: _Spool, key: str, sha256: str, md5: bytes, sid: int) -> None:
        client = self.store.client
        metadata = {"sha256": sha256, "step-result-id": str(sid)}
        try:
            if spool.size <= self.opts.multipart_threshold:
                body: Any
                if spool.in_memory and os.environ.get("ATC_FAULT") != "during_upload":
                    # Bytes, not a file: botocore sends "Expect: 100-continue" (one more round
                    # trip per PUT) for any file-like body. At most spool_memory bytes.
                    body = spool.getvalue()
                else:
                    body = spool.reader()
                    if os.environ.get("ATC_FAULT") == "during_upload":
                        body = _FaultingReader(body, spool.size)
                try:
                    client.put_object(Bucket=self.store.bucket, Key=key, Body=body, ContentLength=spool.size,
                                      ContentMD5=base64.b64encode(md5).decode("ascii"),
                                      ContentType="application/json", Metadata=metadata)
                finally:
                    if not isinstance(body, bytes):
                        body.close()
            else:
                self._multipart(spool.path, key, metadata)
        except Exception as exc:
            if _is_fatal_s3(exc):
                raise FatalRunError(self.store.translate(exc, f"uploading log {sid}", key).message) from None
            raise self.store.translate(exc, f"uploading log {sid}", key) from None

    def _multipart(self, path: str | None, key: str, metadata: dict[str, str]) -> None:
        from boto3.s3.transfer import TransferConfig
        from s3transfer.manager import TransferManager
        from s3transfer.subscribers import BaseSubscriber

        assert path is not None
        config = TransferConfig(multipart_threshold=self.opts.multipart_threshold,
                                multipart_chunksize=self.opts.multipart_chunksize,
                                max_concurrency=self.opts.multipart_concurrency, use_threads=True)
        subscribers = []
        if os.environ.get("ATC_FAULT") == "during_upload":
            chunk = self.opts.multipart_chunksize

            class _KillAfterFirstPart(BaseSubscriber):
                def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
                    self.sent = getattr(self, "sent", 0) + bytes_transferred
                    if self.sent >= chunk and not getattr(self, "fired", False):
                        self.fired = True  # after the first part went out, others in flight
                        fault_point("during_upload")

            subscribers.append(_KillAfterFirstPart())
        with TransferManager(self.store.client, config) as manager:
            future = manager.upload(path, self.store.bucket, key,
                                    extra_args={"Metadata": metadata, "ContentType": "application/json"},
                                    subscribers=subscribers)
            future.result()

    def _verify(self, key: str, size: int, sha256: str) -> None:
        if self.verifier is not None:
            got = self.verifier.read_back(key)
            if got is not None:
                n, digest = got
                if n != size or digest != sha256:
                    raise StorageError(f"verification failed for s3://{self.store.bucket}/{key}: read back {n} bytes "
                                       f"sha256 {digest[:12]}, expected {size} bytes {sha256[:12]}; the log stays in the database")
                return
        h = hashlib.sha256()
        n = 0
        try:
            r = self.store.client.get_object(Bucket=self.store.bucket, Key=key)
            body = r["Body"]
            while True:
                chunk = body.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                n += len(chunk)
        except Exception as exc:
            if _is_fatal_s3(exc):
                raise FatalRunError(self.store.translate(exc, "verifying an upload", key).message) from None
            raise self.store.translate(exc, "verifying an upload", key) from None
        if n != size or h.hexdigest() != sha256:
            raise StorageError(f"verification failed for s3://{self.store.bucket}/{key}: read back {n} bytes "
                               f"sha256 {h.hexdigest()[:12]}, expected {size} bytes {sha256[:12]}; the log stays in the database")

    def _swap(self, conn: psycopg.Connection, sid: int, xmin: str, stored_size: int, key: str, size: int,
              sha256: str, summary: dict[str, Any]) -> MoveOutcome:
        conn.execute("BEGIN")
        try:
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (self.opts.swap_lock_timeout,))
            swapped = conn.execute(SWAP_TO_POINTER, {"id": sid, "xmin": xmin, "stored_size": stored_size,
                                                     "finished": list(FINISHED_STATES)}).fetchone()
            if swapped is None:
                conn.execute("ROLLBACK")
                now = conn.execute(WHY_NOT_SWAPPED, (sid,)).fetchone()
                return _why_not(sid, now, xmin, stored_size, key)
            conn.execute(UPSERT_POINTER, {"id": sid, "bucket": self.store.bucket, "key": key, "size": size,
                                          "sha256": sha256, "summary": Jsonb(summary),
                                          "operator": self.settings.operator_name})
            fault_point("before_commit")
            conn.execute("COMMIT")
        except psycopg.errors.LockNotAvailable:
            conn.execute("ROLLBACK")
            return MoveOutcome(sid, "locked", stored_size=stored_size, key=key)
        except BaseException:
            if not conn.closed and not conn.broken:
                try:
                    conn.execute("ROLLBACK")
                except psycopg.Error:
                    pass
            raise
        fault_point("after_commit")
        return MoveOutcome(sid, "moved", stored_size=stored_size, size=size, sha256=sha256, key=key)


@dataclass
class _ReadLog:
    """A small log read in a batch, waiting for its worker (its advisory lock is held)."""

    sid: int
    xmin: str
    stored_size: int
    spool: _Spool
    sha256: str
    md5: bytes
    session: int  # the batcher connection that holds its advisory lock


@dataclass
class _SwapRequest:
    log: _ReadLog
    key: str
    summary: dict[str, Any]
    outcome: MoveOutcome | None = None
    error: BaseException | None = None


class SmallLogBatcher:
    """Small logs: advisory-lock and read many per statement, swap many per transaction.

    Workers still move one log each (upload, verify: one log in S3 flight per worker), but:

    - the first worker that needs a log not read yet reads it together with the next small logs
      the dispatcher handed out (up to ``read_batch``): one lock statement, one REPEATABLE READ
      transaction with one metadata query and one COPY for all of them; the others find theirs
      ready. Each log's advisory lock is held from this read until its swap committed or it
      failed, exactly as in ``LogMover``.
    - swaps are group-committed: a verified log joins the queue; whichever worker gets the
      commit lock swaps everything queued in one short transaction (``SWAP_MANY``: the guard and
      SKIP LOCKED per row), while the others wait for their outcome. With one worker every batch
      holds one log, so the order of events per log is the same as ``LogMover``'s.

    One connection, used by one thread at a time (reads and commits are short for small logs).
    """

    def __init__(self, settings: Settings, store: ObjectStore, opts: MigrationOptions,
                 verifier: _ReadBack | None) -> None:
        self.settings, self.store, self.opts, self.verifier = settings, store, opts, verifier
        self._conn: psycopg.Connection | None = None
        self._db_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._cond = threading.Condition()
        self._upcoming: list[int] = []          # handed out, not read yet (dispatch order)
        self._reading: set[int] = set()
        self._ready: dict[int, _ReadLog | MoveOutcome | BaseException] = {}
        self._queued: list[_SwapRequest] = []
        self._to_unlock: list[int] = []          # advisory locks to release at the next statement
        self._local = threading.local()
        self._session = 0  # which connection holds the advisory locks of the logs read

    # -- dispatcher side --

    def expect(self, sid: int) -> None:
        with self._cond:
            self._upcoming.append(sid)

    def end_pass(self) -> None:
        """Release the locks of logs read but never moved (cancel, stop) and pending unlocks."""
        with self._cond:
            leftovers = [sid for sid, item in self._ready.items() if isinstance(item, _ReadLog)]
            for item in self._ready.values():
                if isinstance(item, _ReadLog):
                    item.spool.close()
            self._ready.clear()
            self._upcoming.clear()
        self._release(leftovers)
        with self._db_lock:
            if self._conn is not None and not self._conn.closed and not self._conn.broken:
                try:
                    self._flush_unlocks(self._conn)
                except psycopg.Error:
                    self._close_locked()

    def close(self) -> None:
        with self._db_lock:
            self._close_locked()
        if self.verifier is not None:
            self.verifier.close()

    # -- worker side --

    def move(self, sid: int) -> MoveOutcome:
        item = self._take(sid)
        if isinstance(item, MoveOutcome):
            return item
        log = item
        try:
            fault_point("after_read")
            mover = self._mover()
            spool = log.spool
            summary = summarize_log_stream(_spool_chunks(spool))
            key = self.store.log_key(sid)
            mover._upload(spool, key, log.sha256, log.md5, sid)
            fault_point("after_upload")
            mover._verify(key, spool.size, log.sha256)
            fault_point("after_verify")
            summary = _sanitize_for_jsonb(summary)
            summary.setdefault("bytes", spool.size)
        except BaseException:
            self._release([sid])
            log.spool.close()
            raise
        log.spool.close()
        return self._swap(_SwapRequest(log, key, summary))

    def _mover(self) -> LogMover:
        m = getattr(self._local, "mover", None)
        if m is None:
            m = self._local.mover = LogMover(self.settings, self.store, self.opts, self.verifier)
        return m

    def _take(self, sid: int) -> _ReadLog | MoveOutcome:
        with self._cond:
            while sid in self._reading:
                self._cond.wait()
            if sid in self._ready:
                return self._unwrap(self._ready.pop(sid))
            try:
                at = self._upcoming.index(sid)
            except ValueError:
                at = -1
            batch = [sid]
            if at >= 0:
                batch += self._upcoming[at + 1:at + self.opts.read_batch]
                del self._upcoming[at:at + self.opts.read_batch]
            self._reading.update(batch)
        results: dict[int, _ReadLog | MoveOutcome | BaseException]
        try:
            results = self._read(batch)
        except BaseException as exc:
            results = {i: exc for i in batch}
        with self._cond:
            self._reading.difference_update(batch)
            mine = results.pop(sid)
            self._ready.update(results)
            self._cond.notify_all()
        return self._unwrap(mine)

    @staticmethod
    def _unwrap(item: _ReadLog | MoveOutcome | BaseException) -> _ReadLog | MoveOutcome:
        if isinstance(item, BaseException):
            raise item
        return item

    # -- the database side (one connection, one thread at a time) --

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.settings, application_suffix="/migrate")
            self._session += 1  # a new session holds none of the old one's advisory locks
            self._to_unlock.clear()
        return self._conn

    def _close_locked(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None
        self._to_unlock.clear()

    def _release(self, ids: list[int]) -> None:
        if ids:
            with self._db_lock:
                self._to_unlock.extend(ids)

    def _flush_unlocks(self, conn: psycopg.Connection) -> None:
        if self._to_unlock:
            ids, self._to_unlock = self._to_unlock, []
            conn.execute(UNLOCK_LOGS, {"cls": MOVE_LOCK_CLASS, "ids": ids})

    def _fatal_or_failed(self, exc: psycopg.Error, what: str, locked: Any = ()) -> AtcError:
        """Translate; a lost session (its advisory locks went with it) stops the run. Otherwise the
        session lives on (the transaction was rolled back) and the logs' locks are released."""
        broken = self._conn is None or self._conn.broken or self._conn.closed
        message = translate_error(exc, what).message
        if isinstance(exc, psycopg.OperationalError) or broken:
            self._close_locked()
            return FatalRunError(message)
        self._to_unlock.extend(locked)
        return AtcError(message)

    def _read(self, batch: list[int]) -> dict[int, _ReadLog | MoveOutcome]:
        """Lock, then read in one snapshot: 3 round trips for the whole batch (pipelined)."""
        opts = self.opts
        results: dict[int, _ReadLog | MoveOutcome] = {}
        got: set[int] = set()
        spools: dict[int, _Spool] = {}
        with self._db_lock:
            try:
                conn = self._connection()
                try:
                    with conn.pipeline() as pipeline:
                        self._flush_unlocks(conn)
                        locked = conn.execute(TRY_LOCK_LOGS, {"cls": MOVE_LOCK_CLASS, "ids": batch})
                        # The locks are taken before the snapshot (as in LogMover): a log moved
                        # by another process just before we got its lock is then seen as moved.
                        pipeline.sync()
                        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                        conn.execute("SELECT set_config('statement_timeout', %s, true)", (opts.body_statement_timeout,))
                        meta_cur = conn.execute(READ_META_MANY, {"ids": batch})
                    got = {r["id"] for r in locked.fetchall()}
                    metas = {r["id"]: r for r in meta_cur.fetchall()}
                    hashes: dict[int, tuple[Any, Any]] = {}
                    movable = []
                    for sid in batch:
                        meta = metas.get(sid)
                        if sid not in got:
                            results[sid] = MoveOutcome(sid, "busy")
                        elif meta is None or meta["stored_size"] is None:
                            results[sid] = MoveOutcome(sid, "gone")
                        elif meta["state"] not in FINISHED_STATES:
                            results[sid] = MoveOutcome(sid, "running", stored_size=meta["stored_size"])
                        else:
                            movable.append(sid)
                            spools[sid] = _Spool(opts.spool_memory, opts.spool_dir)
                            hashes[sid] = (hashlib.sha256(), hashlib.md5())
                    for sid, piece in stream_db_logs(conn, movable):
                        sha, md5 = hashes[sid]
                        sha.update(piece)
                        md5.update(piece)
                        spools[sid].write(piece)
                    conn.execute("COMMIT")
                except BaseException:
                    for spool in spools.values():
                        spool.close()
                    if not conn.closed and not conn.broken:
                        conn.execute("ROLLBACK")
                    raise
                for sid in movable:
                    meta = metas[sid]
                    sha, md5 = hashes[sid]
                    results[sid] = _ReadLog(sid, meta["xmin"], meta["stored_size"], spools[sid], sha.hexdigest(),
                                            md5.digest(), self._session)
                # Locked but not going to move: released with the next statement.
                self._to_unlock.extend(sid for sid, r in results.items()
                                       if isinstance(r, MoveOutcome) and r.status in ("gone", "running"))
                return results
            except psycopg.Error as exc:
                raise self._fatal_or_failed(exc, f"reading logs {batch[0]}..{batch[-1]}", got) from None

    def _swap(self, request: _SwapRequest) -> MoveOutcome:
        with self._cond:
            self._queued.append(request)
        with self._commit_lock:
            if request.outcome is None and request.error is None:
                with self._cond:
                    group, self._queued = self._queued, []
                try:
                    outcomes = self._commit(group)
                    for r in group:
                        r.outcome = outcomes[r.log.sid]
                except BaseException as exc:
                    for r in group:
                        r.error = exc
        if request.error is not None:
            raise request.error
        assert request.outcome is not None
        return request.outcome

    def _commit(self, group: list[_SwapRequest]) -> dict[int, MoveOutcome]:
        with self._db_lock:
            self._connection()
            # A log whose lock went with a lost session is not swapped: the orphan cleaner may
            # have taken its lock and deleted its object meanwhile. It stays inline; retried later.
            stale = [r for r in group if r.log.session != self._session]
        outcomes: dict[int, MoveOutcome] = {
            r.log.sid: MoveOutcome(r.log.sid, "failed", stored_size=r.log.stored_size, key=r.key,
                                   error=f"moving log {r.log.sid}: the database session holding its lock was lost")
            for r in stale}
        group = [r for r in group if r.log.sid not in outcomes]
        if group:
            outcomes.update(self._commit_locked(group))
        return outcomes

    def _commit_locked(self, group: list[_SwapRequest]) -> dict[int, MoveOutcome]:
        """One short transaction for the group: 2 round trips (pipelined), + 1 if some were not
        swapped. Advisory locks are released with the next statement, after the commit."""
        ids = [r.log.sid for r in group]
        params = {
            "ids": ids, "xmins": [r.log.xmin for r in group], "stored": [r.log.stored_size for r in group],
            "keys": [r.key for r in group], "sizes": [r.log.spool.size for r in group],
            "shas": [r.log.sha256 for r in group], "summaries": [json.dumps(r.summary) for r in group],
            "finished": list(FINISHED_STATES), "bucket": self.store.bucket, "operator": self.settings.operator_name,
        }
        outcomes: dict[int, MoveOutcome] = {}
        with self._db_lock:
            try:
                conn = self._connection()
                try:
                    with conn.pipeline() as pipeline:
                        if self._to_unlock:
                            self._flush_unlocks(conn)
                            pipeline.sync()
                        conn.execute("BEGIN")
                        conn.execute("SELECT set_config('lock_timeout', %s, true)", (self.opts.swap_lock_timeout,))
                        cur = conn.execute(SWAP_MANY, params)
                    swapped = {r["id"] for r in cur.fetchall()}
                    for sid in ids:
                        if sid in swapped:
                            fault_point("before_commit")
                    conn.execute("COMMIT")
                except psycopg.errors.LockNotAvailable:
                    conn.execute("ROLLBACK")
                    swapped = set()
                    outcomes = {r.log.sid: MoveOutcome(r.log.sid, "locked", stored_size=r.log.stored_size, key=r.key)
                                for r in group}
                except BaseException:
                    if not conn.closed and not conn.broken:
                        try:
                            conn.execute("ROLLBACK")
                        except psycopg.Error:
                            pass
                    raise
                self._to_unlock.extend(ids)
                for r in group:
                    if r.log.sid in swapped:
                        outcomes[r.log.sid] = MoveOutcome(r.log.sid, "moved", stored_size=r.log.stored_size,
                                                          size=r.log.spool.size, sha256=r.log.sha256, key=r.key)
                rest = [r for r in group if r.log.sid not in outcomes]
                if rest:
                    now = {row["id"]: row for row in conn.execute(WHY_NOT_SWAPPED_MANY,
                                                                  {"ids": [r.log.sid for r in rest]})}
                    for r in rest:
                        outcomes[r.log.sid] = _why_not(r.log.sid, now.get(r.log.sid), r.log.xmin,
                                                       r.log.stored_size, r.key)
            except psycopg.Error as exc:
                raise self._fatal_or_failed(exc, f"swapping logs {ids[0]}..{ids[-1]}", ids) from None
        for sid in ids:
            if outcomes[sid].status == "moved":
                fault_point("after_commit")
        return outcomes


def _why_not(sid: int, now: dict[str, Any] | None, xmin: str, stored_size: int, key: str) -> MoveOutcome:
    """Classify a log the swap did not take (read without locks after the rollback/commit)."""
    if now is None or not now["inline"]:
        return MoveOutcome(sid, "gone", stored_size=stored_size, key=key)
    if now["xmin"] != xmin or now["stored_size"] != stored_size:
        return MoveOutcome(sid, "changed", stored_size=stored_size, key=key)
    if now["state"] not in FINISHED_STATES:
        return MoveOutcome(sid, "running", stored_size=stored_size, key=key)
    return MoveOutcome(sid, "locked", stored_size=stored_size, key=key)


def _spool_chunks(spool: _Spool) -> Iterator[bytes]:
    reader = spool.reader()
    try:
        while True:
            chunk = reader.read(1 << 20)
            if not chunk:
                return
            yield chunk
    finally:
        reader.close()


# -- the run -------------------------------------------------------------------------------------


def _open_run(db: Database, settings: Settings, opts: MigrationOptions) -> tuple[int, int, dict[str, int]]:
    """Join the open run with the same params (another host's, or an interrupted one) or start one.

    Returns (run id, this shard's resume watermark, counters so far).
    """
    params = Jsonb(opts.run_params())
    try:
        with db.connection() as conn:
            with conn.transaction():
                conn.execute(RUN_LOCK, (RUN_LOCK_KEY,))
                row = None if opts.new_run else conn.execute(
                    FIND_OPEN_RUN, {"params": params, "shard": opts.shard, "shard_count": opts.shard_count}).fetchone()
                if row is None:
                    row = conn.execute(CREATE_RUN, {"operator": settings.operator_name, "min_size": opts.min_size,
                                                    "params": params}).fetchone()
                run_id = row["id"]
                prog = conn.execute(JOIN_SHARD, {"run": run_id, "shard": opts.shard,
                                                 "shard_count": opts.shard_count}).fetchone()
    except psycopg.Error as exc:
        raise translate_error(exc, "starting the migration run") from None
    counters = {k: int(prog[k]) for k in ("moved_logs", "moved_bytes", "skipped", "failed")}
    return run_id, int(prog["last_step_result_id"]), counters


class _Watermark:
    """Highest id such that every dispatched id at or below it is done (ids complete out of order)."""

    def __init__(self, start: int) -> None:
        self._lock = threading.Lock()
        self._in_flight: set[int] = set()
        self._dispatched_max = start

    def dispatch(self, sid: int) -> None:
        with self._lock:
            self._in_flight.add(sid)
            self._dispatched_max = max(self._dispatched_max, sid)

    def done(self, sid: int) -> None:
        with self._lock:
            self._in_flight.discard(sid)

    @property
    def value(self) -> int:
        with self._lock:
            return (min(self._in_flight) - 1) if self._in_flight else self._dispatched_max


def migrate_logs(settings: Settings, db: Database, store: ObjectStore, opts: MigrationOptions, *,
                 control: MigrationControl | None = None,
                 on_progress: Callable[[MigrationStats], None] | None = None,
                 on_outcome: Callable[[MoveOutcome], None] | None = None) -> MigrationStats:
    """Run (or resume) a migration of this shard; audited. Raises FatalRunError if S3/DB went away."""
    require_writable(settings, "migrate-logs")
    control = control or MigrationControl()
    check_assignments(db, opts.assignment_ids)
    store.check()
    run_id, watermark_start, counters = _open_run(db, settings, opts)
    stats = MigrationStats(run_id=run_id, shard=f"{opts.shard}/{opts.shard_count}", control=control)
    plan = plan_migration(db, opts, after=watermark_start)
    stats.planned_logs, stats.planned_bytes = plan.movable_logs, plan.movable_bytes
    targets = [{"run": run_id, "shard": stats.shard, "min_size": opts.min_size,
                "assignments": list(opts.assignment_ids)}]
    with audited(db, settings, "migrate-logs", targets, reason=opts.reason) as entry:
        try:
            _run(settings, db, store, opts, control, stats, watermark_start, counters, on_progress, on_outcome)
        finally:
            entry.details = stats.snapshot()
            entry.details["resumed_from_id"] = watermark_start
        if stats.state == "cancelled":
            entry.outcome = "cancelled (resumable)"
        elif stats.failed:
            entry.outcome = f"finished with {stats.failed} failed"
    return stats


def _run(settings: Settings, db: Database, store: ObjectStore, opts: MigrationOptions,
         control: MigrationControl, stats: MigrationStats, watermark_start: int, counters: dict[str, int],
         on_progress: Callable[[MigrationStats], None] | None,
         on_outcome: Callable[[MoveOutcome], None] | None) -> None:
    lock = threading.Lock()
    local = threading.local()
    movers: list[LogMover] = []
    watermark = _Watermark(watermark_start)
    consecutive_failures = 0
    fatal: list[BaseException] = []
    budget_used = 0
    last_saved = 0.0
    retry_needed = False

    verifier = _ReadBack(store, opts.concurrency + 2)
    batcher = SmallLogBatcher(settings, store, opts, verifier)

    def mover() -> LogMover:
        m = getattr(local, "mover", None)
        if m is None:
            m = local.mover = LogMover(settings, store, opts, verifier)
            with lock:
                movers.append(m)
        return m

    def work(sid: int, small: bool) -> MoveOutcome:
        if not control.wait_if_paused():
            return MoveOutcome(sid, "cancelled")
        try:
            return batcher.move(sid) if small else mover().move(sid)
        except FatalRunError:
            raise
        except AtcError as exc:
            return MoveOutcome(sid, "failed", error=exc.message)

    def save(finished: bool = False) -> None:
        nonlocal last_saved
        try:
            db.execute(SAVE_PROGRESS, {
                "watermark": watermark.value, "moved_logs": counters["moved_logs"] + stats.moved_logs,
                "moved_bytes": counters["moved_bytes"] + stats.moved_bytes,
                "skipped": counters["skipped"] + stats.skipped, "failed": counters["failed"] + stats.failed,
                "last_error": stats.last_error[:500], "finished": finished, "run": stats.run_id,
                "shard": opts.shard, "shard_count": opts.shard_count,
            }, what="saving migration progress")
            if finished:
                db.execute(FINISH_RUN_IF_DONE, {"run": stats.run_id, "shard_count": opts.shard_count},
                           what="finishing the migration run")
        except DatabaseError:
            if finished:
                raise
            # Progress is an optimisation for resuming; a missed save only means re-scanning.
        last_saved = time.monotonic()

    def record(outcome: MoveOutcome, stored_size: int) -> None:
        nonlocal consecutive_failures, retry_needed
        with lock:
            stats.done_stored_bytes += stored_size
            if outcome.status == "moved":
                stats.moved_logs += 1
                stats.moved_bytes += outcome.size
                stats.moved_stored_bytes += stored_size
                consecutive_failures = 0
            elif outcome.status == "failed":
                stats.failed += 1
                stats.last_error = outcome.error
                consecutive_failures += 1
                retry_needed = True
                if len(stats.failures) < 200:
                    stats.failures.append({"id": outcome.step_result_id, "error": outcome.error})
            elif outcome.status != "cancelled":
                stats.skipped += 1
                stats.skipped_reasons[outcome.status] = stats.skipped_reasons.get(outcome.status, 0) + 1
                if outcome.status in ("locked", "changed", "busy"):
                    retry_needed = True
        if on_outcome:
            on_outcome(outcome)

    def one_pass(after: int, finished_only: bool, track: bool) -> bool:
        """Dispatch every candidate after `after`; False if stopped (cancel, budget, fatal)."""
        nonlocal budget_used
        cursor = after
        in_flight: dict[Future, tuple[int, int]] = {}
        with ThreadPoolExecutor(max_workers=opts.concurrency, thread_name_prefix="atc-move") as pool:
            stopped = False
            while not stopped:
                rows = db.fetch(CANDIDATES, _query_params(opts, cursor, finished_only, opts.batch_size),
                                what="listing logs to move")
                if not rows:
                    break
                for row in rows:
                    cursor = row["id"]
                    size = int(row["stored_size"] or 0)
                    if control.cancelled.is_set() or fatal:
                        stopped = True
                        break
                    if opts.max_bytes is not None and budget_used + size > opts.max_bytes and budget_used:
                        stopped = True
                        break
                    if row["state"] not in FINISHED_STATES:
                        record(MoveOutcome(row["id"], "running", stored_size=size), size)
                        continue
                    budget_used += size
                    if track:
                        watermark.dispatch(row["id"])
                    small = size <= opts.small_log_max
                    if small:
                        batcher.expect(row["id"])
                    in_flight[pool.submit(work, row["id"], small)] = (row["id"], size)
                    # Bounded queue: at most 2 x concurrency logs handed out at once (small logs:
                    # enough to fill a read batch; they are at most small_log_max stored each).
                    limit = max(opts.concurrency * 2, opts.read_batch if small else 0)
                    while len(in_flight) >= limit:
                        _collect(in_flight, track, block=True)
                    _collect(in_flight, track, block=False)
                    if track and time.monotonic() - last_saved > 1.0:
                        save()
                    if on_progress:
                        on_progress(stats)
            while in_flight:
                _collect(in_flight, track, block=True)
        batcher.end_pass()
        return not stopped and not fatal and not control.cancelled.is_set()

    def _collect(in_flight: dict[Future, tuple[int, int]], track: bool, block: bool) -> None:
        if not in_flight:
            return
        done, _ = wait(list(in_flight), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for fut in done:
            sid, size = in_flight.pop(fut)
            try:
                outcome = fut.result()
            except FatalRunError as exc:
                if not fatal:
                    fatal.append(exc)
                outcome = MoveOutcome(sid, "cancelled", error=exc.message)
                stats.last_error = exc.message
                control.cancel()
            except Exception as exc:  # a bug must not lose the accounting of the others
                outcome = MoveOutcome(sid, "failed", error=f"{type(exc).__name__}: {first_line(exc)}")
            record(outcome, size if outcome.status != "cancelled" else 0)
            if track and outcome.status in ("moved", "running", "gone"):
                # Failed, locked, changed or busy logs pin the watermark below them, so a resumed
                # run scans them again (moved logs after them are no longer candidates).
                watermark.done(sid)
            if consecutive_failures >= opts.max_consecutive_failures and not fatal:
                fatal.append(FatalRunError(
                    f"stopped after {consecutive_failures} failures in a row; last: {stats.last_error}"))
                control.cancel()
        if on_progress:
            on_progress(stats)

    stats.state = "running"
    try:
        completed = one_pass(watermark_start, finished_only=False, track=True)
        sweeps = 0
        while completed and retry_needed and sweeps < opts.retry_sweeps:
            # Locked, changed, busy or failed logs are still inline: sweep the shard again, later.
            sweeps += 1
            retry_needed = False
            with lock:
                # The sweep recounts what is still not movable; running steps are not swept.
                running = stats.skipped_reasons.get("running", 0)
                stats.skipped_reasons = {"running": running} if running else {}
                stats.skipped, stats.failed = running, 0
                stats.failures.clear()
            if control.cancelled.wait(opts.retry_delay * sweeps):
                completed = False
                break
            completed = one_pass(0, finished_only=True, track=False)
        if fatal:
            stats.state = "failed"
            save()
            raise fatal[0]
        if control.cancelled.is_set():
            stats.state = "cancelled"
            save()
            return
        stats.state = "finished"
        save(finished=True)
    finally:
        for m in movers:
            m.close()
        batcher.close()
        if on_progress:
            on_progress(stats)


def list_runs(db: Database, limit: int = 20) -> list[dict[str, Any]]:
    return db.fetch(LIST_RUNS, {"limit": limit}, what="listing migration runs")


def move_log_once(settings: Settings, store: ObjectStore, step_result_id: int,
                  opts: MigrationOptions | None = None) -> MoveOutcome:
    """Move one log (no run bookkeeping); for tests and the viewer's "move this log" action."""
    mover = LogMover(settings, store, opts or MigrationOptions(min_size=0))
    try:
        return mover.move(step_result_id)
    finally:
        mover.close()


def stats_json(stats: MigrationStats) -> str:
    return json.dumps(stats.snapshot(), default=str)

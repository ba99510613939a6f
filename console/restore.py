"""Moving logs back from S3 into the database: the migration's guards in reverse.

Per log, on one connection holding the same per-log advisory lock as the migrator (so a restore
never races a move, another restore or the orphan cleaner):

1. The pointer must exist and the inline log must be NULL (S3 authoritative). A pointer with
   inline bytes is a half-finished move: the database is authoritative, the stale pointer is
   dropped (reconciled) and nothing is copied.
2. In one transaction: stream the object into a temporary table with ``COPY ... FROM STDIN
   (FORMAT BINARY)`` (bounded memory: the bytes pass through in chunks) while hashing; refuse if
   size or SHA-256 differ from the pointer; read the temporary copy back and hash it again (proves
   the server stored exactly those bytes); then set the row's log from it only if the log is still
   NULL, locking that one row with ``SKIP LOCKED`` (a locked row is skipped, never waited on), and
   delete the pointer only if it is unchanged. Commit.
3. Delete the object (``keep_object`` keeps it). A crash before this leaves an orphan object
   without pointer, which ``atc orphans --delete`` removes.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from .audit import audited
from .config import Settings
from .db import Database, connect, translate_error
from .errors import AtcError, NotFound
from .logstore import _BinaryCopyField
from .migrate import MOVE_LOCK_CLASS, TRY_LOCK_LOG, UNLOCK_LOG
from .storage import ObjectStore

# The pointer and whether the row still holds inline bytes. Null bitmap only: no body read, no lock.
POINTER_STATE = """
SELECT s.id AS row_id, s.log IS NOT NULL AS inline, m.step_result_id, m.bucket, m.key, m.size, m.sha256
FROM atc.moved_log m LEFT JOIN auto_test_step_result s ON s.id = m.step_result_id
WHERE m.step_result_id = %s
"""
ROW_EXISTS = "SELECT log IS NOT NULL AS inline FROM auto_test_step_result WHERE id = %s"

# Temporary table private to this session; gone at commit.
CREATE_BUFFER = "CREATE TEMP TABLE atc_restore_buffer (log json) ON COMMIT DROP"
COPY_INTO_BUFFER = "COPY atc_restore_buffer (log) FROM STDIN (FORMAT BINARY)"
# Reads back our own temporary copy (not an application table) in 1 MiB slices: libpq holds a
# whole COPY row in memory, so one row per slice keeps the client bounded (see logstore._COPY_LOG).
COPY_OUT_BUFFER = (
    "COPY (SELECT substring(s.b FROM g FOR 1048576)"
    " FROM (SELECT convert_to(log::text, 'UTF8') AS b FROM atc_restore_buffer OFFSET 0) AS s,"
    " LATERAL generate_series(1, octet_length(s.b), 1048576) AS g) TO STDOUT (FORMAT BINARY)"
)

# Puts the bytes back only if the log is still NULL; the single row is locked with SKIP LOCKED.
RESTORE_ROW = """
UPDATE auto_test_step_result s SET log = b.log
FROM atc_restore_buffer b
WHERE s.id = (SELECT id FROM auto_test_step_result WHERE id = %(id)s AND log IS NULL
              FOR NO KEY UPDATE SKIP LOCKED)
RETURNING s.id
"""
DROP_POINTER = "DELETE FROM atc.moved_log WHERE step_result_id = %(id)s AND sha256 = %(sha256)s AND key = %(key)s"
# Reconcile a half-finished move: drop the pointer only while the row still holds inline bytes.
DROP_STALE_POINTER = """
DELETE FROM atc.moved_log m USING auto_test_step_result s
WHERE m.step_result_id = %(id)s AND s.id = m.step_result_id AND s.log IS NOT NULL
RETURNING m.key
"""

_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


@dataclass
class RestoreOutcome:
    step_result_id: int
    # restored, reconciled (pointer dropped, DB already authoritative), not_moved, busy, locked, failed
    status: str
    size: int = 0
    key: str = ""
    object_deleted: bool = False
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _copy_header() -> bytes:
    return _SIGNATURE + struct.pack("!ii", 0, 0)


def restore_one(conn: psycopg.Connection, store: ObjectStore, sid: int, *, keep_object: bool = False,
                lock_timeout: str = "500ms", body_statement_timeout: str = "30min") -> RestoreOutcome:
    got = conn.execute(TRY_LOCK_LOG, (MOVE_LOCK_CLASS, sid)).fetchone()["got"]
    if not got:
        return RestoreOutcome(sid, "busy")
    try:
        pointer = conn.execute(POINTER_STATE, (sid,)).fetchone()
        if pointer is None:
            row = conn.execute(ROW_EXISTS, (sid,)).fetchone()
            if row is None:
                raise NotFound(f"step result {sid} does not exist (check the id)")
            return RestoreOutcome(sid, "not_moved")
        if pointer["row_id"] is None:
            raise NotFound(f"step result {sid} no longer exists; its pointer is cleaned by `atc orphans --delete`")
        if pointer["inline"]:
            dropped = conn.execute(DROP_STALE_POINTER, {"id": sid}).fetchone()
            return RestoreOutcome(sid, "reconciled", key=dropped["key"] if dropped else "")
        if pointer["bucket"] != store.bucket:
            from .logstore import LogLocation, store_for

            store = store_for(store, LogLocation(sid, "", "s3", None, bucket=pointer["bucket"], key=pointer["key"]))
        key, size, sha256 = pointer["key"], int(pointer["size"]), pointer["sha256"]
        with conn.transaction():
            conn.execute("SELECT set_config('statement_timeout', %s, true)", (body_statement_timeout,))
            conn.execute(CREATE_BUFFER)
            h = hashlib.sha256()
            n = 0
            with conn.cursor() as cur, cur.copy(COPY_INTO_BUFFER) as copy:
                copy.write(_copy_header() + struct.pack("!hi", 1, size))
                for chunk in store.iter_chunks(key):
                    if n + len(chunk) > size:
                        raise AtcError(f"s3://{store.bucket}/{key} is larger than its pointer says ({size} bytes); not restored")
                    h.update(chunk)
                    n += len(chunk)
                    copy.write(chunk)
                if n != size or h.hexdigest() != sha256:
                    raise AtcError(f"s3://{store.bucket}/{key} does not match its pointer (read {n} bytes, sha256 "
                                   f"{h.hexdigest()[:12]}, expected {size} bytes {sha256[:12]}); not restored")
                copy.write(struct.pack("!h", -1))
            # What the server stored must be those very bytes (json keeps its input text verbatim).
            back = hashlib.sha256()
            parser = _BinaryCopyField()
            with conn.cursor() as cur, cur.copy(COPY_OUT_BUFFER) as copy:
                for block in copy:
                    for piece in parser.feed(bytes(block)):
                        back.update(piece)
            if back.hexdigest() != sha256:
                raise AtcError(f"the database did not store log {sid} byte for byte; not restored")
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (lock_timeout,))
            restored = conn.execute(RESTORE_ROW, {"id": sid}).fetchone()
            if restored is None:
                raise _Skip("locked")
            conn.execute(DROP_POINTER, {"id": sid, "sha256": sha256, "key": key})
        deleted = False
        if not keep_object:
            store.delete(key)
            deleted = True
        return RestoreOutcome(sid, "restored", size=size, key=key, object_deleted=deleted)
    except _Skip as skip:
        return RestoreOutcome(sid, skip.status)
    except psycopg.errors.LockNotAvailable:
        return RestoreOutcome(sid, "locked")
    finally:
        if not conn.closed and not conn.broken:
            conn.execute(UNLOCK_LOG, (MOVE_LOCK_CLASS, sid))


class _Skip(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def restore_logs(settings: Settings, db: Database, store: ObjectStore, ids: list[int], *, reason: str = "",
                 keep_object: bool = False) -> list[RestoreOutcome]:
    """Restore each log; audited as one action. Failures of one log do not stop the others."""
    outcomes: list[RestoreOutcome] = []
    with audited(db, settings, "restore-log", [{"step_result_id": i} for i in ids], reason=reason) as entry:
        conn = connect(settings, application_suffix="/restore")
        try:
            for sid in ids:
                try:
                    outcomes.append(restore_one(conn, store, sid, keep_object=keep_object))
                except AtcError as exc:
                    outcomes.append(RestoreOutcome(sid, "failed", error=exc.message))
                except psycopg.Error as exc:
                    outcomes.append(RestoreOutcome(sid, "failed", error=translate_error(exc, f"restoring log {sid}").message))
                    if conn.broken or conn.closed:
                        conn = connect(settings, application_suffix="/restore")
        finally:
            conn.close()
        entry.details = {"outcomes": [o.as_dict() for o in outcomes]}
        bad = [o for o in outcomes if o.status in ("failed", "busy", "locked")]
        if bad:
            entry.outcome = f"{len(outcomes) - len(bad)} ok, {len(bad)} not restored"
    return outcomes

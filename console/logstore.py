"""Where a step's log lives, and its exact bytes, streamed.

A log is either inline (``auto_test_step_result.log``, a ``json`` column whose text is kept
verbatim) or moved to S3 (``log`` is NULL and ``atc.moved_log`` holds the pointer). Readers never
select the log column in a list query: ``locate`` reads only its stored size (``pg_column_size``
looks at the TOAST pointer, it does not de-TOAST), and ``stream_log`` is the one place that reads a
body, when an operator asked to see or move that log.

Streaming from PostgreSQL uses ``COPY (SELECT log ...) TO STDOUT (FORMAT BINARY)``: the client
receives the value in network-sized pieces and never holds it whole (a plain SELECT, or repeated
``substr`` calls, would each materialise or de-TOAST the whole value on the client or server).
The binary form of ``json`` is its text, so the bytes are exactly what is stored.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any, Iterator

import psycopg
from psycopg import sql

from .db import Database, translate_error
from .errors import NotFound

# One row, no body: where the log is and how big it is stored. Takes no row lock.
LOCATE_LOG = """
SELECT s.id, s.state::text AS state, s.log IS NOT NULL AS inline,
       pg_column_size(s.log) AS stored_size,
       m.bucket, m.key, m.size AS object_size, m.sha256, m.summary
FROM auto_test_step_result s
LEFT JOIN atc.moved_log m ON m.step_result_id = s.id
WHERE s.id = %s
"""

# The value leaves the server as rows of at most 1 MiB: libpq receives a COPY row as one message
# and holds it whole, so ``COPY (SELECT log ...)`` of a 500 MB log would cost the client 500 MB.
# The server de-TOASTs the value once (the OFFSET 0 fence keeps it a single in-memory datum) and
# slices the bytea in O(slice) each; the lateral generate_series yields the slices in order.
# Reads one row by primary key; ACCESS SHARE only, no row lock.
_COPY_LOG = (
    "COPY (SELECT substring(s.b FROM g FOR 1048576)"
    " FROM (SELECT convert_to(log::text, 'UTF8') AS b FROM auto_test_step_result"
    " WHERE id = {id} OFFSET 0) AS s,"
    " LATERAL generate_series(1, octet_length(s.b), 1048576) AS g) TO STDOUT (FORMAT BINARY)"
)
_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


@dataclass(frozen=True)
class LogLocation:
    step_result_id: int
    state: str
    # "db": inline in the row; "s3": moved, read by pointer; "none": no log at all.
    where: str
    stored_size: int | None
    bucket: str | None = None
    key: str | None = None
    object_size: int | None = None
    sha256: str | None = None
    summary: dict[str, Any] | None = None

    @property
    def size_hint(self) -> int | None:
        """Exact size for moved logs; stored (possibly compressed) size for inline ones."""
        return self.object_size if self.where == "s3" else self.stored_size


def locate(db: Database, step_result_id: int) -> LogLocation:
    row = db.fetch_one(LOCATE_LOG, (step_result_id,), what=f"locating the log of step result {step_result_id}")
    if row is None:
        raise NotFound(f"step result {step_result_id} does not exist (check the id)")
    if row["inline"]:
        where = "db"
    elif row["key"]:
        where = "s3"
    else:
        where = "none"
    return LogLocation(
        step_result_id=row["id"], state=row["state"], where=where, stored_size=row["stored_size"],
        bucket=row["bucket"], key=row["key"], object_size=row["object_size"], sha256=row["sha256"],
        summary=row["summary"],
    )


def stream_db_log(conn: psycopg.Connection, step_result_id: int, *,
                  statement_timeout: str | None = None) -> Iterator[bytes]:
    """Yield the inline log's exact bytes in chunks. Yields nothing if the log is NULL.

    ``statement_timeout`` (e.g. "15min") lifts the session's limit for this COPY only: sending a
    500 MB value can outlast a browse-sized timeout, and the COPY takes only ACCESS SHARE on the
    table, so it cannot block writers. The session value is restored afterwards (RESET returns to
    the value set at connection start-up by the session policy).
    """
    parser = _BinaryCopyField()
    query = sql.SQL(_COPY_LOG).format(id=sql.Literal(int(step_result_id)))
    with conn.cursor() as cur:
        if statement_timeout is not None:
            cur.execute("SELECT set_config('statement_timeout', %s, false)", (statement_timeout,))
        try:
            with cur.copy(query) as copy:
                for block in copy:
                    for piece in parser.feed(bytes(block)):
                        yield piece
        finally:
            if statement_timeout is not None and not conn.closed \
                    and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                cur.execute("RESET statement_timeout")


def stream_log(db: Database, store: Any, location: LogLocation, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The exact bytes of a log wherever it lives (``store``: a console.storage.ObjectStore)."""
    if location.where == "s3":
        yield from store_for(store, location).iter_chunks(location.key, chunk_size)
        return
    if location.where == "none":
        return
    try:
        with db.connection() as conn:
            yield from stream_db_log(conn, location.step_result_id)
    except psycopg.Error as exc:
        raise translate_error(exc, f"reading the log of step result {location.step_result_id}") from None


def store_for(store: Any, location: LogLocation) -> Any:
    """The store to read a pointer from: the pointer's bucket wins over the configured one."""
    if location.bucket and location.bucket != store.bucket:
        from dataclasses import replace

        from .storage import ObjectStore

        settings = store.settings
        return ObjectStore(replace(settings, s3=replace(settings.s3, bucket=location.bucket)))
    return store


def sha256_of(chunks: Iterator[bytes]) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    for chunk in chunks:
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


class _BinaryCopyField:
    """Incremental parser for a binary COPY stream of one-column rows; yields the field's bytes.

    Format: 11-byte signature, int32 flags, int32 extension length (+ extension); per tuple an
    int16 field count then per field an int32 length (-1 for NULL) and the bytes; trailer int16 -1.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = "header"
        self._remaining = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._buf += data
        while True:
            if self._state == "header":
                if len(self._buf) < 19:
                    return
                if bytes(self._buf[:11]) != _SIGNATURE:
                    raise ValueError("unexpected COPY BINARY signature")
                ext = struct.unpack("!i", self._buf[15:19])[0]
                if len(self._buf) < 19 + ext:
                    return
                del self._buf[: 19 + ext]
                self._state = "tuple"
            elif self._state == "tuple":
                if len(self._buf) < 2:
                    return
                count = struct.unpack("!h", self._buf[:2])[0]
                if count == -1:
                    del self._buf[:2]
                    self._state = "done"
                    continue
                if len(self._buf) < 6:
                    return
                length = struct.unpack("!i", self._buf[2:6])[0]
                del self._buf[:6]
                if length < 0:
                    continue  # NULL
                self._remaining = length
                self._state = "field"
            elif self._state == "field":
                if not self._buf:
                    return
                take = min(self._remaining, len(self._buf))
                piece = bytes(self._buf[:take])
                del self._buf[:take]
                self._remaining -= take
                yield piece
                if self._remaining == 0:
                    self._state = "tuple"
            else:  # done
                self._buf.clear()
                return

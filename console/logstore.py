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

The start (and, for uncompressed values, the end) of a big inline log can be read without
waiting for the server to de-TOAST the whole value: ``read_db_log_head``/``read_db_log_tail``
read the value's first/last TOAST chunks by their index and decompress a pglz prefix here (see
docs/log-viewer.md, "Inline logs: the head and the tail"). SQL cannot do it: ``json`` has no
binary cast to ``text``, so ``substr(log::text, 1, n)`` goes through json_out/textin and
de-TOASTs the whole value first (measured: as slow as reading it all).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any, Iterator

import psycopg
import psycopg.rows
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
# The same, when server and client encodings are both UTF8: ``json_send`` hands the stored text
# over as bytea with one copy, where ``log::text`` is an I/O cast (json_out + textin validating
# 500 MB) plus convert_to's copy; measured on 500 MB: first row after ~1.0 s instead of ~2.0 s.
# Same lock footprint (ACCESS SHARE, no row lock).
_COPY_LOG_SEND = _COPY_LOG.replace("convert_to(log::text, 'UTF8')", "json_send(log)")

# Many small logs in one COPY (the migration reads small logs in batches): rows of (id, slice
# start, bytes) with slices of at most 1 MiB, so the client holds one row at a time whatever the
# sizes. Reads only the listed ids, by primary key, one value de-TOASTed after the other;
# ACCESS SHARE only, no row lock.
_COPY_LOGS = (
    "COPY (SELECT s.id, g, substring(s.b FROM g FOR 1048576)"
    " FROM (SELECT id, {body} AS b FROM auto_test_step_result"
    " WHERE id = ANY({ids}) AND log IS NOT NULL ORDER BY id OFFSET 0) AS s,"
    " LATERAL generate_series(1, greatest(octet_length(s.b), 1), 1048576) AS g) TO STDOUT (FORMAT BINARY)"
)

# Where an inline log's value is stored, without reading it: pg_column_* look at the TOAST
# pointer only (pg_column_toast_chunk_id is PostgreSQL 17+). Reads pg_class and one row by
# primary key; no row lock.
TOAST_LAYOUT = """
SELECT pg_column_toast_chunk_id(s.log) AS chunk_id, pg_column_compression(s.log) AS compression,
       pg_column_size(s.log) AS stored_size, t.relname AS toast_table,
       has_schema_privilege('pg_toast', 'USAGE')
         AND has_table_privilege(c.reltoastrelid, 'SELECT') AS readable,
       current_setting('server_encoding') AS server_encoding
FROM auto_test_step_result s
JOIN pg_class c ON c.oid = 'auto_test_step_result'::regclass
JOIN pg_class t ON t.oid = c.reltoastrelid
WHERE s.id = %s
"""

# A body read (this module is the one allowed to read bodies): a range of one value's TOAST
# chunks, by the TOAST index (chunk_id, chunk_seq). ACCESS SHARE on the TOAST table only.
_TOAST_CHUNKS = ("SELECT chunk_seq, chunk_data FROM {toast} WHERE chunk_id = %s"
                 " AND chunk_seq >= %s AND chunk_seq < %s ORDER BY chunk_seq")
# TOAST_MAX_CHUNK_SIZE with the default 8 KiB block; only used to size the first fetch.
_TOAST_CHUNK_GUESS = 1996
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
    utf8 = conn.info.parameter_status("client_encoding") == "UTF8" \
        and conn.info.parameter_status("server_encoding") == "UTF8"
    query = sql.SQL(_COPY_LOG_SEND if utf8 else _COPY_LOG).format(id=sql.Literal(int(step_result_id)))
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


def stream_db_logs(conn: psycopg.Connection, step_result_ids: list[int]) -> Iterator[tuple[int, bytes]]:
    """Yield (id, piece) for the inline logs of many step results, each log's pieces in order.

    For the migration's batches of small logs (one statement instead of one per log). Ids whose
    log is NULL yield nothing. Pieces are at most 1 MiB (one COPY row each).
    """
    if not step_result_ids:
        return
    utf8 = conn.info.parameter_status("client_encoding") == "UTF8" \
        and conn.info.parameter_status("server_encoding") == "UTF8"
    body = "json_send(log)" if utf8 else "convert_to(log::text, 'UTF8')"
    ids = sql.SQL("ARRAY[{}]::int[]").format(sql.SQL(", ").join(sql.Literal(int(i)) for i in step_result_ids))
    query = sql.SQL(_COPY_LOGS.replace("{body}", body)).format(ids=ids)
    expected_start: dict[int, int] = {}
    with conn.cursor() as cur, cur.copy(query) as copy:
        copy.set_types(["int4", "int4", "bytea"])
        for sid, start, piece in copy.rows():
            if expected_start.get(sid, 1) != start:
                raise ValueError(f"log {sid}: slices out of order")
            expected_start[sid] = start + 1048576
            yield sid, bytes(piece)


@dataclass(frozen=True)
class ToastLayout:
    """Where one inline value lives in the TOAST table (only for values we can read there)."""

    step_result_id: int
    chunk_id: int
    compressed: bool           # pglz (lz4 is not read here: the slow path handles it)
    stored_size: int           # bytes in the TOAST table
    toast_table: str           # relation name in schema pg_toast


@dataclass(frozen=True)
class DbLogHead:
    data: bytes                # the value's first bytes, exactly as stored
    total_size: int            # the whole value's size in bytes (the decompressed size)
    complete: bool             # data is the whole value
    layout: ToastLayout


def toast_layout(conn: psycopg.Connection, step_result_id: int) -> ToastLayout | None:
    """The value's TOAST layout when its chunks can be read directly, else None.

    None when: the server is older than 17, the value is NULL or not stored out of line (small
    values: the normal stream is fast for them), it is lz4-compressed, the server encoding is not
    UTF8 (chunks hold server-encoded text), or this role may not read the TOAST table (needs
    superuser, or USAGE on schema pg_toast and SELECT on the table: see docs/log-viewer.md).
    """
    if conn.info.server_version < 170000:
        return None
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        row = cur.execute(TOAST_LAYOUT, (step_result_id,)).fetchone()
    if row is None or row["chunk_id"] is None or not row["readable"] or row["server_encoding"] != "UTF8":
        return None
    if row["compression"] not in (None, "pglz"):
        return None
    return ToastLayout(step_result_id, int(row["chunk_id"]), row["compression"] == "pglz",
                       int(row["stored_size"]), row["toast_table"])


def _toast_chunks(conn: psycopg.Connection, layout: ToastLayout, first: int, stop: int) -> list[bytes]:
    query = sql.SQL(_TOAST_CHUNKS).format(toast=sql.Identifier("pg_toast", layout.toast_table))
    with conn.cursor(row_factory=psycopg.rows.tuple_row) as cur:
        rows = cur.execute(query, (layout.chunk_id, first, stop)).fetchall()
    expected = first
    for seq, _ in rows:
        if seq != expected:
            raise ValueError(f"TOAST chunk {expected} missing")
        expected += 1
    return [bytes(data) for _, data in rows]


def read_db_log_head(conn: psycopg.Connection, step_result_id: int, max_bytes: int) -> DbLogHead | None:
    """The first ``max_bytes`` (or fewer) bytes of an inline log, without de-TOASTing it whole.

    Reads the first TOAST chunks and, for pglz, decompresses only the prefix here. None when
    there is no cheap way (see ``toast_layout``) or the chunks do not look as expected; callers
    then stream the whole value. Callers must check the head against the stream (the value may
    change between two statements): ``console.logview`` does, byte for byte.
    """
    try:
        layout = toast_layout(conn, step_result_id)
        if layout is None:
            return None
        if not layout.compressed:
            count = -(-min(max_bytes, layout.stored_size) // _TOAST_CHUNK_GUESS)
            data = b"".join(_toast_chunks(conn, layout, 0, count))[:max_bytes]
            total = layout.stored_size
        else:
            # pglz needs at most 9/8 of the output (+2) in compressed bytes; +4 for the header.
            need = max_bytes * 9 // 8 + 6
            count = -(-min(need, layout.stored_size) // _TOAST_CHUNK_GUESS)
            stream = b"".join(_toast_chunks(conn, layout, 0, count))
            if len(stream) < 4:
                return None
            header = int.from_bytes(stream[:4], "little")
            if header >> 30 != 0:  # compression method id: 0 is pglz
                return None
            total = header & 0x3FFFFFFF
            data = pglz_decompress_prefix(stream[4:], min(max_bytes, total))
        if not data:
            return None
        return DbLogHead(data, total, len(data) >= total, layout)
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedFunction, ValueError):
        return None


def read_db_log_tail(conn: psycopg.Connection, layout: ToastLayout, start: int, end: int) -> bytes:
    """Bytes [start, end] (inclusive, like an HTTP range) of an *uncompressed* TOASTed value."""
    if layout.compressed:
        raise ValueError("a compressed value has no cheap tail")
    end = min(end, layout.stored_size - 1)
    if end < start:
        return b""
    # Chunk size: every chunk but the last is full; learn it from chunk 0.
    first = _toast_chunks(conn, layout, 0, 1)
    size = len(first[0]) if first else 0
    if size <= 0:
        return b""
    lo, hi = start // size, end // size + 1
    data = b"".join(_toast_chunks(conn, layout, lo, hi))
    return data[start - lo * size: end - lo * size + 1]


def pglz_decompress_prefix(src: bytes, limit: int) -> bytes:
    """The first ``limit`` bytes of a pglz stream (PostgreSQL's pg_lzcompress format).

    Control bytes hold 8 flags (low bit first): 0 = one literal byte, 1 = a back reference of
    2-3 bytes: length (low nibble + 3; 18 means one more length byte) and a 12-bit offset. A
    stream cut short (we fetch only the chunks a prefix needs) stops cleanly. Corrupt input
    raises ValueError.
    """
    out = bytearray()
    sp = 0
    n = len(src)
    while sp < n and len(out) < limit:
        ctrl = src[sp]
        sp += 1
        if ctrl == 0 and sp + 8 <= n:  # eight literals: the common case in poorly compressible text
            out += src[sp: sp + 8]
            sp += 8
            continue
        for _ in range(8):
            if sp >= n or len(out) >= limit:
                break
            if ctrl & 1:
                if sp + 1 >= n:
                    return bytes(out[:limit])
                length = (src[sp] & 0x0F) + 3
                offset = ((src[sp] & 0xF0) << 4) | src[sp + 1]
                sp += 2
                if length == 18:
                    if sp >= n:
                        return bytes(out[:limit])
                    length += src[sp]
                    sp += 1
                if offset == 0 or offset > len(out):
                    raise ValueError("corrupt pglz data")
                begin = len(out) - offset
                if offset >= length:
                    out += out[begin: begin + length]
                else:  # overlapping copy repeats the last ``offset`` bytes
                    pattern = bytes(out[begin:])
                    out += (pattern * (length // offset + 1))[:length]
            else:
                out.append(src[sp])
                sp += 1
            ctrl >>= 1
    return bytes(out[:limit])


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

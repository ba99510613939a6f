"""`atc log` and logstore: the exact stored bytes, inline or moved to S3, in bounded memory."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from console.db import Database
from console.logstore import locate, stream_log
from console.storage import ObjectStore
from tests.log_support import LogFactory, json_log
from tests.migrate_support import write_config

ROOT = Path(__file__).resolve().parent.parent
REAL = Path(__file__).resolve().parent / "data" / "runner-outputs"

# Spacing and key order are kept by the json type: the bytes must come back exactly like this.
ODD_JSON = b'{ "stdout" :"a\\u0000b\\n\\u001b[31mred\\u001b[0m [bold]x[/]",\n\t"exit_code":  1 ,"stderr":"\xc3\xa9\\ud83d\\ude00"}'


@pytest.fixture
def logs(empty_db):
    factory = LogFactory(empty_db)
    yield factory
    factory.close()


def run_atc(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "console", "--config", str(config), *args], cwd=str(ROOT),
                          capture_output=True, timeout=120)


def test_stream_inline_and_moved_are_byte_exact(logs, empty_db):
    big = json_log(stdout="line\n" * 300_000)  # ~1.8 MB: several COPY messages
    inline_id = logs.inline(ODD_JSON)
    big_id = logs.inline(big)
    moved_id = logs.moved(ODD_JSON + b" \xff raw bytes are legal in S3")
    db = Database(empty_db)
    store = ObjectStore(empty_db)
    try:
        for sid, expected, where in ((inline_id, ODD_JSON, "db"), (big_id, big, "db"),
                                     (moved_id, ODD_JSON + b" \xff raw bytes are legal in S3", "s3")):
            loc = locate(db, sid)
            assert loc.where == where
            got = b"".join(stream_log(db, store, loc, chunk_size=4096))
            assert got == expected
    finally:
        db.close()


def test_stream_statement_timeout_is_lifted_only_for_the_copy(logs, empty_db):
    from console.logstore import stream_db_log

    sid = logs.inline(json_log(stdout="x" * 100))
    db = Database(empty_db)
    try:
        with db.connection() as conn:
            before = conn.execute("SHOW statement_timeout").fetchone()["statement_timeout"]
            assert b"".join(stream_db_log(conn, sid, statement_timeout="15min"))
            after = conn.execute("SHOW statement_timeout").fetchone()["statement_timeout"]
        assert before == after == "10s"
    finally:
        db.close()


def test_atc_log_cli_writes_exact_bytes_inline_and_s3(logs, empty_db, tmp_path):
    config = write_config(empty_db, tmp_path / "atc.toml")
    real = (REAL / "c_fwrite_binary_ints.stdout").read_bytes()
    inline_id = logs.inline(ODD_JSON)
    moved_bytes = json_log(stdout=real, stderr="\x1b]0;title\x07")
    moved_id = logs.moved(moved_bytes)
    for sid, expected in ((inline_id, ODD_JSON), (moved_id, moved_bytes)):
        result = run_atc(config, "log", str(sid))
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected

        meta = run_atc(config, "log", str(sid), "--json")
        assert meta.returncode == 0, meta.stderr
        data = json.loads(meta.stdout)
        assert data["size"] == len(expected)
        assert data["sha256"] == hashlib.sha256(expected).hexdigest()
        assert data["where"] == ("db" if sid == inline_id else "s3")
    assert json.loads(run_atc(config, "log", str(moved_id), "--json").stdout)["key"].endswith(f"/{moved_id}.json")


def test_atc_log_part_decodes_one_output(logs, empty_db, tmp_path):
    config = write_config(empty_db, tmp_path / "atc.toml")
    real = (REAL / "gcc_errors_color.stderr").read_bytes()
    sid = logs.moved(json_log(stdout="out\n", stderr=real))
    result = run_atc(config, "log", str(sid), "--part", "stderr")
    assert result.returncode == 0, result.stderr
    assert result.stdout == real
    missing = run_atc(config, "log", str(sid), "--part", "nope")
    assert missing.returncode == 2
    assert missing.stderr.decode().count("\n") == 1 and b"stdout, stderr" in missing.stderr


def test_atc_log_unknown_id_is_one_line_exit_2(empty_db, tmp_path):
    config = write_config(empty_db, tmp_path / "atc.toml")
    for args in (("log", "987654"), ("log", "987654", "--json")):
        result = run_atc(config, *args)
        assert result.returncode == 2
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "987654" in lines[0] and "Traceback" not in result.stderr.decode()
        assert result.stdout == b""


# -- the head and tail of an inline log, read from its TOAST chunks --------------------------------


def mixed_log(seed: int, size: int) -> bytes:
    """A JSON log mixing repetitive lines (long pglz matches, overlapping copies), random
    multibyte text (literals) and non-ASCII characters on every chunk boundary."""
    import random

    rng = random.Random(seed)
    pieces, n = [], 0
    while n < size:
        kind = rng.random()
        if kind < 0.4:
            piece = f"test_{rng.randrange(1000)} \x1b[32mPASSED\x1b[0m é€😀\n" * rng.randint(1, 50)
        elif kind < 0.6:
            piece = "a" * rng.randint(1, 600) + "\n"
        else:
            piece = "".join(rng.choice("aé€😀\u4e00\u4e01xyz \n\"\\") for _ in range(rng.randint(10, 3000)))
        pieces.append(piece)
        n += len(piece.encode())
    return json.dumps({"stdout": "".join(pieces), "exit_code": 0}, ensure_ascii=False).encode()


def incompressible_log(seed: int, size: int) -> bytes:
    import random

    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)] + list("abcdefghijklmnop 0123456789")
    return json.dumps({"stdout": "é" + "".join(rng.choices(alphabet, k=size // 2))}, ensure_ascii=False).encode()


def test_head_of_a_compressed_inline_log_is_its_exact_prefix(logs, empty_db):
    from console.logstore import read_db_log_head

    raw = mixed_log(1, 3_000_000)
    sid = logs.inline(raw)
    compression = logs.conn.execute("SELECT pg_column_compression(log), pg_column_size(log) FROM auto_test_step_result"
                                    " WHERE id = %s", (sid,)).fetchone()
    assert compression[0] == "pglz" and compression[1] < len(raw)  # the interesting case
    db = Database(empty_db)
    try:
        with db.connection() as conn:
            for limit in (1, 1000, 1995, 1996, 1997, 65536, 300_001, 10_000_000):
                head = read_db_log_head(conn, sid, limit)
                assert head is not None and head.layout.compressed
                assert head.total_size == len(raw)
                assert head.data == raw[:limit], limit
                assert head.complete == (limit >= len(raw))
    finally:
        db.close()


def test_head_and_tail_of_an_uncompressed_inline_log(logs, empty_db):
    from console.logstore import read_db_log_head, read_db_log_tail

    raw = incompressible_log(2, 1_500_000)
    sid = logs.inline(raw)
    db = Database(empty_db)
    try:
        with db.connection() as conn:
            head = read_db_log_head(conn, sid, 100_000)
            assert head is not None and not head.layout.compressed and head.total_size == len(raw)
            assert head.data == raw[:100_000]  # bytes, even though the cut splits a character
            size = len(raw)
            for start, end in ((size - 131072, size - 1), (0, 10), (1995, 1996), (size - 1, size + 50), (777, 123_456)):
                assert read_db_log_tail(conn, head.layout, start, end) == raw[start: end + 1]
            # a small log lives in the row itself: no head (the stream is fast enough)
            assert read_db_log_head(conn, logs.inline(b'{"stdout": "hi"}'), 100) is None
    finally:
        db.close()


def test_head_needs_rights_on_the_toast_table(logs, empty_db, pg):
    """A role that may read the table but not its TOAST table gets no head (and no error)."""
    import uuid

    import psycopg

    from console.config import settings_from_mapping  # noqa: F401 - settings built below
    from console.logstore import read_db_log_head, stream_db_log

    raw = mixed_log(3, 400_000)
    sid = logs.inline(raw)
    role = f"reader_{uuid.uuid4().hex[:8]}"
    dbname = psycopg.conninfo.conninfo_to_dict(empty_db.database.dsn)["dbname"]
    logs.conn.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        logs.conn.execute(f'GRANT SELECT ON auto_test_step_result TO "{role}"')
        with psycopg.connect(pg.dsn(dbname, user=role), autocommit=True) as conn:
            assert read_db_log_head(conn, sid, 1000) is None
            assert b"".join(stream_db_log(conn, sid)) == raw
    finally:
        logs.conn.execute(f'REVOKE ALL ON auto_test_step_result FROM "{role}"')
        logs.conn.execute(f'DROP ROLE "{role}"')


def test_pglz_prefix_decoder_stops_cleanly_on_a_cut_stream():
    from console.logstore import pglz_decompress_prefix

    # ctrl 0b00000010: literal 'a', then a match of length 5 at offset 1 -> "aaaaaa"
    stream = bytes([0b10, ord("a"), 0x02, 0x01])
    assert pglz_decompress_prefix(stream, 100) == b"aaaaaa"
    assert pglz_decompress_prefix(stream[:3], 100) == b"a"
    assert pglz_decompress_prefix(stream, 3) == b"aaa"
    with pytest.raises(ValueError):
        pglz_decompress_prefix(bytes([0b1, 0x02, 0x01]), 100)  # a reference before any output

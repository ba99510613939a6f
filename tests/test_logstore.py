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

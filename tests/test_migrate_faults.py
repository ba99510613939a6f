"""What can go wrong during a migration, against real servers: SIGKILL at every named point, S3
down / returning 500 / slow / refusing credentials / missing its bucket, PostgreSQL restarted
mid-run, the application rewriting or locking a log during its move, a 100 MB one-line log.

Each case ends in a one-line message, and after a rerun every log is readable from exactly one
authoritative place, byte-identical."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest

from console.config import settings_from_mapping
from console.db import Database
from console.embedded import EmbeddedPostgres, EmbeddedS3
from console.errors import AtcError
from console.logstore import locate, stream_log
from console.migrate import FAULT_POINTS, LogMover, MigrationOptions, migrate_logs
from console.orphans import clean, scan
from console.storage import ObjectStore
from datetime import timedelta
from tests.migrate_support import ROOT, assert_every_log_intact, placement, run_cli, seed_world, write_config

PART = 5 * 1024 * 1024


def _small_logs(n: int, size: int = 20_000) -> list[bytes]:
    return [json.dumps({"stdout": (f"log {i} " + "o" * size)[:size], "stderr": "", "exit_code": i % 3}).encode()
            for i in range(n)]


def _big_log() -> bytes:
    return json.dumps({"stdout": "".join(f"{i:08d} output line\n" for i in range(600_000)), "exit_code": 1}).encode()


# -- SIGKILL at every point ----------------------------------------------------------------------

# (point, skip): skip = how many earlier hits survive. Logs 1..10 are small, log 11 is multipart.
CRASH_CASES = [
    ("after_read", 2), ("during_upload", 0), ("during_upload", 10), ("after_upload", 3),
    ("after_verify", 4), ("before_commit", 5), ("after_commit", 1),
]


@pytest.mark.parametrize("point,skip", CRASH_CASES, ids=[f"{p}-{s}" for p, s in CRASH_CASES])
def test_sigkill_at_every_point_then_rerun(empty_db, tmp_path, point, skip):
    assert point in FAULT_POINTS
    logs = _small_logs(10) + [_big_log()]
    ids = seed_world(empty_db, logs)
    expected = dict(zip(ids, logs))
    config = write_config(empty_db, tmp_path / "atc.toml")
    store = ObjectStore(empty_db)
    args = ("migrate-logs", "--min-size", "0", "--concurrency", "1", "--part-size", "5MB", "--json")

    killed = run_cli(config, *args, env={"ATC_FAULT": point, "ATC_FAULT_SKIP": str(skip)})
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    counts = assert_every_log_intact(empty_db, store, expected)
    assert counts["half"] == 0
    assert counts["s3"] == (skip + 1 if point == "after_commit" else skip)

    rerun = run_cli(config, *args)
    assert rerun.returncode == 0, rerun.stderr
    counts = assert_every_log_intact(empty_db, store, expected)
    assert counts == {"db": 0, "s3": len(ids), "half": 0}

    db = Database(empty_db)
    try:
        report = scan(db, store)
        # The rerun overwrote the deterministic key of the interrupted log: no duplicate, no orphan.
        assert report.orphans == [] and report.missing == [] and report.size_mismatch == []
        if point == "during_upload" and skip == 10:
            assert report.incomplete_uploads, "the killed multipart upload should be visible"
        cleaned = clean(empty_db, db, store, older_than=timedelta(0), reason="crash test")
        assert scan(db, store).incomplete_uploads == []
        assert cleaned.missing == []
    finally:
        db.close()
    assert_every_log_intact(empty_db, store, expected)


@pytest.mark.parametrize("point", ["after_read", "after_verify", "before_commit", "after_commit"])
def test_sigkill_with_group_commits_then_rerun(empty_db, tmp_path, point):
    """Concurrency 8: small logs are read 64 per statement and swapped in groups; a kill at any
    point still leaves each log in exactly one place, and a rerun moves the rest."""
    logs = _small_logs(40, 5_000)
    ids = seed_world(empty_db, logs)
    expected = dict(zip(ids, logs))
    config = write_config(empty_db, tmp_path / "atc.toml")
    store = ObjectStore(empty_db)
    args = ("migrate-logs", "--min-size", "0", "--concurrency", "8", "--json")
    killed = run_cli(config, *args, env={"ATC_FAULT": point, "ATC_FAULT_SKIP": "12"})
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    counts = assert_every_log_intact(empty_db, store, expected)
    assert counts["half"] == 0 and counts["db"] > 0
    rerun = run_cli(config, *args)
    assert rerun.returncode == 0, rerun.stderr
    assert assert_every_log_intact(empty_db, store, expected) == {"db": 0, "s3": len(ids), "half": 0}
    db = Database(empty_db)
    try:
        report = scan(db, store)
        assert report.orphans == [] and report.missing == [] and report.half_finished == []
    finally:
        db.close()


# -- S3 outage, 500s, slowness, credentials, bucket ----------------------------------------------


def _private_s3_settings(make_settings, dbname, s3_server, **s3_overrides):
    creds = s3_server.aws_credentials_file("private")
    return make_settings(dbname, s3={"endpoint_url": s3_server.endpoint_url, "bucket": s3_server.bucket,
                                     "profile": "private", "credentials_file": str(creds), **s3_overrides})


def test_s3_outage_mid_run_then_restart_and_resume(empty_db, make_settings, tmp_path):
    server = EmbeddedS3(tmp_path / "s3", bucket="outage").start(tie_to_parent=True)
    try:
        settings = _private_s3_settings(make_settings, empty_db.database.dsn.split("dbname=")[1].split()[0], server,
                                        connect_timeout=1.0, read_timeout=3.0)
        logs = _small_logs(40, 50_000)
        ids = seed_world(settings, logs)
        expected = dict(zip(ids, logs))
        db, store = Database(settings), ObjectStore(settings)
        moved = []

        def on_outcome(outcome):
            moved.append(outcome.status)
            if len(moved) == 6:
                server.stop()

        with pytest.raises(AtcError) as exc:
            migrate_logs(settings, db, store, MigrationOptions(min_size=0, concurrency=2), on_outcome=on_outcome)
        message = exc.value.message
        assert "unreachable" in message and "\n" not in message
        assert_every_log_intact_s3_down = [placement(settings, i) for i in ids]
        in_s3 = [p for p in assert_every_log_intact_s3_down if not p["inline"]]
        assert 6 <= len(in_s3) < len(ids)
        assert all(p["key"] for p in in_s3)

        port = server.s3_port
        server = EmbeddedS3(tmp_path / "s3", bucket="outage", s3_port=port).start(tie_to_parent=True)
        store = ObjectStore(settings)
        stats = migrate_logs(settings, Database(settings), store, MigrationOptions(min_size=0, concurrency=2))
        assert stats.moved_logs == len(ids) - len(in_s3)
        assert stats.failed == 0
        assert assert_every_log_intact(settings, store, expected) == {"db": 0, "s3": len(ids), "half": 0}
        audit = db.fetch("SELECT outcome FROM atc.audit WHERE action = 'migrate-logs' ORDER BY id")
        assert audit[0]["outcome"].startswith("failed:") and "unreachable" in audit[0]["outcome"]
        assert audit[-1]["outcome"] == "ok"
    finally:
        server.stop()


class FaultProxy:
    """A real HTTP reverse proxy on loopback in front of SeaweedFS that can fail or stall requests."""

    def __init__(self, upstream_port: int) -> None:
        self.mode = "pass"
        self.methods = {"PUT"}
        self.delay = 0.0
        self.hits = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.command in proxy.methods and proxy.mode != "pass":
                    proxy.hits += 1
                    if proxy.mode == "error500":
                        payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                                   b'<Message>injected</Message></Error>')
                        self.send_response(500)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                    time.sleep(proxy.delay)
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                resp = upstream.getresponse()
                data = resp.read()
                upstream.close()
                try:
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except ConnectionError:
                    pass  # the client gave up (its read timeout): that is the point of "slow"

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_s3_returning_500_then_slow_then_healthy(empty_db, s3):
    proxy = FaultProxy(s3.s3_port)
    try:
        settings = replace(empty_db, s3=replace(empty_db.s3, endpoint_url=proxy.url, read_timeout=1.0))
        logs = _small_logs(8)
        ids = seed_world(settings, logs)
        expected = dict(zip(ids, logs))
        db, store = Database(settings), ObjectStore(settings)
        opts = MigrationOptions(min_size=0, concurrency=1, max_consecutive_failures=3, retry_sweeps=0)

        proxy.mode = "error500"
        with pytest.raises(AtcError) as exc:
            migrate_logs(settings, db, store, opts)
        assert "3 failures in a row" in exc.value.message and "InternalError" in exc.value.message
        assert "\n" not in exc.value.message
        assert proxy.hits >= 3
        assert assert_every_log_intact(settings, store, expected) == {"db": len(ids), "s3": 0, "half": 0}

        proxy.mode, proxy.delay = "slow", 2.5
        with pytest.raises(AtcError) as exc:
            migrate_logs(settings, db, ObjectStore(settings), opts)
        assert "timed out" in exc.value.message
        assert assert_every_log_intact(settings, store, expected)["s3"] == 0

        proxy.mode = "pass"
        stats = migrate_logs(settings, db, ObjectStore(settings), opts)
        assert stats.moved_logs == len(ids)
        assert assert_every_log_intact(settings, ObjectStore(settings), expected) == {"db": 0, "s3": len(ids), "half": 0}
    finally:
        proxy.close()


def test_wrong_credentials_missing_bucket_unreachable_are_one_line(empty_db, tmp_path):
    ids = seed_world(empty_db, _small_logs(2))
    bad_creds = tmp_path / "creds"
    bad_creds.write_text("[wrong]\naws_access_key_id = NOPE\naws_secret_access_key = nope\n")
    cases = {
        "credentials": (replace(empty_db, s3=replace(empty_db.s3, profile="wrong", credentials_file=str(bad_creds))),
                        "refused the credentials"),
        "bucket": (replace(empty_db, s3=replace(empty_db.s3, bucket="no-such-bucket-here")), "does not exist"),
        "unreachable": (replace(empty_db, s3=replace(empty_db.s3, endpoint_url="http://127.0.0.1:9", connect_timeout=1.0)),
                        "unreachable"),
    }
    for name, (settings, needle) in cases.items():
        config = write_config(settings, tmp_path / f"{name}.toml")
        result = run_cli(config, "migrate-logs", "--min-size", "0")
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (name, result.stderr)
        assert "Traceback" not in result.stderr
    for sid in ids:
        assert placement(empty_db, sid) == {"inline": True, "key": None, "size": None, "sha256": None}


# -- the database restarts mid-run ---------------------------------------------------------------


def test_database_restart_mid_run(tmp_path, s3, make_settings):
    from console.schema import install_reference_schema, upgrade

    server = EmbeddedPostgres(tmp_path / "pg").start(tie_to_parent=True)
    try:
        server.create_database("restart")
        with psycopg.connect(server.dsn("restart"), autocommit=True) as conn:
            install_reference_schema(conn)
        base = make_settings("restart_private")
        settings = replace(base, database=replace(base.database, dsn=server.dsn("restart")))
        upgrade(settings)
        logs = _small_logs(40, 60_000)
        ids = seed_world(settings, logs)
        expected = dict(zip(ids, logs))
        seen = []

        def on_outcome(outcome):
            seen.append(outcome)
            if len(seen) == 5:
                server.stop()

        with pytest.raises(AtcError) as exc:
            migrate_logs(settings, Database(settings), ObjectStore(settings),
                         MigrationOptions(min_size=0, concurrency=2), on_outcome=on_outcome)
        assert "\n" not in exc.value.message
        assert any(w in exc.value.message for w in ("connection", "connect", "terminat", "shut"))
        server.start(tie_to_parent=True)
        store = ObjectStore(settings)
        mid = assert_every_log_intact(settings, store, expected)
        assert mid["s3"] >= 5 and mid["half"] == 0
        stats = migrate_logs(settings, Database(settings), store, MigrationOptions(min_size=0, concurrency=2))
        assert stats.failed == 0
        assert assert_every_log_intact(settings, store, expected) == {"db": 0, "s3": len(ids), "half": 0}
    finally:
        server.stop()


# -- the application rewrites or locks a log while it moves --------------------------------------


def test_concurrent_writer_rewriting_the_log_during_its_move(empty_db):
    logs = _small_logs(3)
    ids = seed_world(empty_db, logs)
    target = ids[1]
    rewritten = json.dumps({"stdout": "rewritten by the application " * 500, "exit_code": 9}).encode()

    class RewritingMover(LogMover):
        """Lets the application's session rewrite the log between our read and our swap."""

        def _verify(self, key, size, sha256):
            with psycopg.connect(empty_db.database.dsn, autocommit=True) as app:
                app.execute("UPDATE auto_test_step_result SET log = %s::json, updated_at = now() WHERE id = %s",
                            (rewritten.decode(), target))
            super()._verify(key, size, sha256)

    store = ObjectStore(empty_db)
    mover = RewritingMover(empty_db, store, MigrationOptions(min_size=0))
    try:
        outcome = mover.move(target)
    finally:
        mover.close()
    assert outcome.status == "changed"
    expected = {ids[0]: logs[0], target: rewritten, ids[2]: logs[2]}
    assert assert_every_log_intact(empty_db, store, expected) == {"db": 3, "s3": 0, "half": 0}
    # The object of the stale read is an orphan (no pointer); the rerun overwrites its key.
    db = Database(empty_db)
    try:
        assert [o["step_result_id"] for o in scan(db, store).orphans] == [target]
        stats = migrate_logs(empty_db, db, store, MigrationOptions(min_size=0))
        assert stats.moved_logs == 3
        assert assert_every_log_intact(empty_db, store, expected) == {"db": 0, "s3": 3, "half": 0}
        assert scan(db, store).orphans == []
    finally:
        db.close()


def test_locked_row_is_skipped_not_waited_on(empty_db):
    logs = _small_logs(6)
    ids = seed_world(empty_db, logs)
    expected = dict(zip(ids, logs))
    locked = ids[2]
    app = psycopg.connect(empty_db.database.dsn)  # the application, holding a row lock, idle in transaction
    try:
        app.execute("SELECT id FROM auto_test_step_result WHERE id = %s FOR UPDATE", (locked,))
        db, store = Database(empty_db), ObjectStore(empty_db)
        started = time.monotonic()
        stats = migrate_logs(empty_db, db, store, MigrationOptions(min_size=0, retry_sweeps=2, retry_delay=0.1))
        elapsed = time.monotonic() - started
        assert stats.moved_logs == len(ids) - 1
        assert stats.skipped_reasons == {"locked": 1}
        assert elapsed < 15, "a locked row must be skipped, not waited on"
        assert placement(empty_db, locked)["inline"]
        # The application's transaction was never disturbed: it can still commit its change.
        app.execute("UPDATE auto_test_step_result SET updated_at = now() WHERE id = %s", (locked,))
        app.commit()
        stats = migrate_logs(empty_db, db, store, MigrationOptions(min_size=0))
        assert stats.moved_logs == 1
        assert assert_every_log_intact(empty_db, store, expected) == {"db": 0, "s3": len(ids), "half": 0}
        db.close()
    finally:
        app.close()


# -- 100 MB on one line --------------------------------------------------------------------------


def test_100mb_single_line_log_moves_and_restores_in_bounded_memory(empty_db, tmp_path):
    import base64
    import random

    rnd = random.Random(7)
    body = base64.b64encode(rnd.randbytes(75 * 1024 * 1024)).decode()  # ~100 MB, no newline, incompressible-ish
    doc = ('{"stdout": "' + body + '", "stderr": "", "exit_code": 0, "points": 1}').encode()
    del body
    sha = hashlib.sha256(doc).hexdigest()
    size = len(doc)
    [sid] = seed_world(empty_db, [doc])
    del doc
    config = write_config(empty_db, tmp_path / "atc.toml")
    proc = subprocess.Popen([sys.executable, "-m", "console", "--config", str(config), "migrate-logs",
                             "--min-size", "1MB", "--json"], cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert json.loads(out)["moved_bytes"] == size
    p = placement(empty_db, sid)
    assert not p["inline"] and p["sha256"] == sha and p["size"] == size
    db, store = Database(empty_db), ObjectStore(empty_db)
    try:
        h = hashlib.sha256()
        for chunk in stream_log(db, store, locate(db, sid)):
            h.update(chunk)
        assert h.hexdigest() == sha
        restored = run_cli(config, "restore-log", str(sid), "--json")
        assert restored.returncode == 0, restored.stderr
        h = hashlib.sha256()
        loc = locate(db, sid)
        assert loc.where == "db"
        for chunk in stream_log(db, store, loc):
            h.update(chunk)
        assert h.hexdigest() == sha
    finally:
        db.close()

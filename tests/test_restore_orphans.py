"""Restore guards and the orphan scan / clean-up against real PostgreSQL and SeaweedFS."""

from __future__ import annotations

import json
from datetime import timedelta

import psycopg
import pytest

from console.db import Database
from console.migrate import MOVE_LOCK_CLASS, MigrationOptions, migrate_logs
from console.orphans import clean, parse_age, scan, step_result_id_of
from console.restore import restore_logs
from console.storage import ObjectStore
from tests.migrate_support import assert_every_log_intact, placement, run_cli, seed_world, write_config


@pytest.fixture
def moved(empty_db):
    logs = [json.dumps({"stdout": f"output {i} " * 2000, "exit_code": i}).encode() for i in range(5)]
    ids = seed_world(empty_db, logs)
    db, store = Database(empty_db), ObjectStore(empty_db)
    migrate_logs(empty_db, db, store, MigrationOptions(min_size=0))
    yield empty_db, db, store, dict(zip(ids, logs))
    db.close()


def test_restore_refuses_a_corrupted_object_and_keeps_the_pointer(moved):
    settings, db, store, expected = moved
    sid = min(expected)
    store.put_bytes(store.log_key(sid), b'{"tampered": true}')
    [outcome] = restore_logs(settings, db, store, [sid])
    assert outcome.status == "failed" and "does not match its pointer" in outcome.error
    p = placement(settings, sid)
    assert not p["inline"] and p["key"]  # still S3 authoritative: nothing half-written
    audit = db.fetch_one("SELECT outcome FROM atc.audit WHERE action = 'restore-log' ORDER BY id DESC LIMIT 1")
    assert "not restored" in audit["outcome"]


def test_restore_skips_a_log_another_process_works_on(moved):
    settings, db, store, expected = moved
    sid = min(expected)
    with psycopg.connect(settings.database.dsn, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s, %s)", (MOVE_LOCK_CLASS, sid))
        [outcome] = restore_logs(settings, db, store, [sid])
        assert outcome.status == "busy"
    [outcome] = restore_logs(settings, db, store, [sid], keep_object=True)
    assert outcome.status == "restored" and not outcome.object_deleted
    assert assert_every_log_intact(settings, store, expected)["db"] == 1


def test_restore_of_a_locked_row_is_skipped(moved):
    settings, db, store, expected = moved
    sid = min(expected)
    app = psycopg.connect(settings.database.dsn)
    try:
        app.execute("SELECT id FROM auto_test_step_result WHERE id = %s FOR UPDATE", (sid,))
        [outcome] = restore_logs(settings, db, store, [sid])
        assert outcome.status == "locked"
        assert not placement(settings, sid)["inline"]
    finally:
        app.close()
    assert restore_logs(settings, db, store, [sid])[0].status == "restored"


def test_orphans_scan_and_clean(moved, tmp_path):
    settings, db, store, expected = moved
    ids = sorted(expected)
    # An orphan: an object no pointer references (a move killed after its upload).
    orphan_key = store.log_key(999_999)
    store.put_bytes(orphan_key, b"{}")
    # A half-finished move: the application wrote the log back inline under a pointer.
    half = ids[1]
    with psycopg.connect(settings.database.dsn, autocommit=True) as conn:
        conn.execute("UPDATE auto_test_step_result SET log = %s::json WHERE id = %s", ('{"new": 1}', half))
    expected[half] = b'{"new": 1}'
    # A missing object: S3 lost a moved log.
    lost = ids[2]
    store.delete(store.log_key(lost))

    report = scan(db, store)
    assert [o["key"] for o in report.orphans] == [orphan_key]
    assert [m["step_result_id"] for m in report.missing] == [lost]
    assert [h["step_result_id"] for h in report.half_finished] == [half]
    assert report.pointers == len(ids)

    config = write_config(settings, tmp_path / "atc.toml")
    listed = run_cli(config, "orphans", "--json")
    assert listed.returncode == 2  # missing objects are a problem the operator must see
    assert "have no object" in listed.stderr and len(listed.stderr.strip().splitlines()) == 1
    assert json.loads(listed.stdout)["orphans"][0]["key"] == orphan_key

    # Young orphans are kept; the half-finished move is reconciled in favour of the database.
    young = clean(settings, db, store, older_than=parse_age("1d"))
    assert any(a["action"].startswith("kept (younger") for a in young.actions)
    assert placement(settings, half) == {"inline": True, "key": None, "size": None, "sha256": None}
    # An orphan whose log a move holds (advisory lock) is never deleted.
    held_key = store.log_key(ids[3])
    with psycopg.connect(settings.database.dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM atc.moved_log WHERE step_result_id = %s", (ids[3],))
        conn.execute("UPDATE auto_test_step_result SET log = %s::json WHERE id = %s", (expected[ids[3]].decode(), ids[3]))
        conn.execute("SELECT pg_advisory_lock(%s, %s)", (MOVE_LOCK_CLASS, ids[3]))
        old = clean(settings, db, store, older_than=timedelta(0))
        assert any(a.get("step_result_id") == ids[3] and a["action"].startswith("skipped") for a in old.actions)
        assert store.head(held_key).size > 0
    final = clean(settings, db, store, older_than=timedelta(0), reason="tidy")
    assert scan(db, store).orphans == []
    assert any(a["action"] == "deleted orphan" for a in final.actions)
    del expected[lost]
    assert assert_every_log_intact(settings, store, expected)["half"] == 0
    assert db.fetch_one("SELECT count(*) AS n FROM atc.audit WHERE action = 'orphans-delete'")["n"] == 3


def test_helpers():
    assert step_result_id_of("test/x/step-result/42.json") == 42
    assert step_result_id_of("test/x/other") is None
    assert parse_age("1d") == timedelta(days=1) and parse_age("30m") == timedelta(minutes=30)
    with pytest.raises(Exception, match="not an age"):
        parse_age("soon")

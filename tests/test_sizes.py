"""Log sizes from catalog and pg_column_size only: figures, threshold, histogram, sampling, and the
proof that no log body (TOAST) was read."""

from __future__ import annotations

import json
import time

import psycopg

from console.db import Database
from console.migrate import MigrationOptions, migrate_logs
from console.sizes import above_threshold, compute_sizes
from console.storage import ObjectStore
from tests.migrate_support import run_cli, seed_world, write_config


def _toast_blocks(settings) -> int:
    with psycopg.connect(settings.database.dsn, autocommit=True) as conn:
        row = conn.execute("""SELECT coalesce(toast_blks_read, 0) + coalesce(toast_blks_hit, 0)
                              FROM pg_statio_user_tables WHERE relname = 'auto_test_step_result'""").fetchone()
    return int(row[0])


def _world(settings):
    # Incompressible-ish large logs end up in TOAST; small ones inline.
    import random

    rnd = random.Random(3)
    big = [json.dumps({"stdout": rnd.randbytes(300_000).hex(), "exit_code": 1}).encode() for _ in range(4)]
    small = [json.dumps({"stdout": "ok", "exit_code": 0}).encode() for _ in range(20)]
    ids = seed_world(settings, big + small, states=["passed"] * 3 + ["running"] + ["failed"] * 20, assignments=2)
    with psycopg.connect(settings.database.dsn, autocommit=True) as conn:
        conn.execute("ANALYZE auto_test_step_result")
    return ids, big, small


def test_sizes_report_without_reading_bodies(empty_db):
    ids, big, small = _world(empty_db)
    db = Database(empty_db)
    try:
        db.close()
        before = _toast_blocks(empty_db)
        report = compute_sizes(db, threshold=100_000, top=5)
        db.close()  # a backend flushes its I/O statistics when it exits
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _toast_blocks(empty_db) != before:
            time.sleep(0.1)
        assert _toast_blocks(empty_db) == before, "computing sizes read TOAST (log bodies)"

        assert report.method == "exact" and report.sample_percent == 100.0
        assert report.db_logs == len(ids) and report.s3_logs == 0
        stored = db.fetch("SELECT id, pg_column_size(log) AS n, state::text AS state FROM auto_test_step_result")
        assert report.db_bytes == sum(r["n"] for r in stored)
        above = [r for r in stored if r["n"] >= 100_000]
        assert report.above_threshold == {"logs": len(above), "bytes": sum(r["n"] for r in above),
                                          "movable_logs": len(above) - 1,
                                          "movable_bytes": sum(r["n"] for r in above if r["state"] != "running")}
        assert sum(h["db_logs"] for h in report.histogram) == len(ids)
        for h in report.histogram:
            assert h["db_logs"] == len([r for r in stored if h["from_bytes"] <= r["n"] < h["to_bytes"]
                                        or (h["bucket"] == 0 and r["n"] < 2)])
        assert [r["bytes"] for r in report.largest] == sorted((r["n"] for r in stored), reverse=True)[:5]
        step_table = next(t for t in report.tables if t["table_name"] == "auto_test_step_result")
        assert step_table["toast_bytes"] > 1_000_000 and step_table["heap_bytes"] > 0
        assert len(report.by_assignment) == 2
        assert sum(a["db_logs"] for a in report.by_assignment) == len(ids)
        assert sum(r["db_bytes"] for r in report.by_run) == report.db_bytes
    finally:
        db.close()


def test_sizes_after_migration_and_sampling(empty_db):
    ids, big, small = _world(empty_db)
    db = Database(empty_db)
    try:
        migrate_logs(empty_db, db, ObjectStore(empty_db), MigrationOptions(min_size=100_000))
        report = compute_sizes(db, threshold=100_000)
        assert report.s3_logs == 3 and report.s3_bytes == sum(len(b) for b in big[:3])
        assert report.db_logs == len(ids) - 3
        assert 0 < report.s3_share < 1
        assert sum(h["s3_logs"] for h in report.histogram) == 3
        assert sorted(r["location"] for r in report.largest[:4]) == ["db", "s3", "s3", "s3"]
        assert sum(a["s3_logs"] for a in report.by_assignment) == 3
        assert above_threshold(db, 100_000)["movable_logs"] == 0  # only the running one is left

        sampled = compute_sizes(db, threshold=100_000, force_percent=50)
        assert sampled.method.startswith("sampled 50%") and sampled.sample_percent == 50
        assert any("sample" in n for n in sampled.notes)
        assert sampled.as_of is not None
        # The sample scales counts by 2 (a tiny table may sample any page count, so only check scale).
        assert sampled.db_logs % 2 == 0
    finally:
        db.close()


def test_cli_sizes_json_and_table(empty_db, tmp_path):
    _world(empty_db)
    config = write_config(empty_db, tmp_path / "atc.toml")
    result = run_cli(config, "sizes", "--threshold", "100k", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["above_threshold"]["logs"] == 4 and data["method"] == "exact" and "as_of" in data
    text = run_cli(config, "sizes", "--threshold", "100k")
    assert text.returncode == 0 and "Histogram" in text.stdout and "as of" in text.stdout

"""Migration to S3 and back against embedded PostgreSQL and SeaweedFS: byte-exact round trips,
plans, running steps, resume, shards, CLI."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import replace

import psycopg
import pytest

from console.db import Database
from console.errors import AtcError
from console.migrate import (MigrationControl, MigrationOptions, list_runs, migrate_logs, parse_shard,
                             plan_migration)
from console.restore import restore_logs
from console.storage import ObjectStore
from tests.migrate_support import (assert_every_log_intact, placement, read_log, real_log_documents, run_cli,
                                   seed_world, write_config)


@pytest.fixture
def world(empty_db):
    """The real-output logs plus a multipart-sized one, all finished, in a fresh database."""
    docs = real_log_documents()
    big = json.dumps({"stdout": "line of output\n" * 800_000, "stderr": "", "exit_code": 0, "points": 2.5}).encode()
    docs.append(("big_multipart", big))
    ids = seed_world(empty_db, [d for _, d in docs])
    db = Database(empty_db)
    store = ObjectStore(empty_db)
    yield empty_db, db, store, dict(zip(ids, [d for _, d in docs])), dict(zip(ids, [n for n, _ in docs]))
    db.close()


SMALL_PARTS = dict(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)


def test_round_trip_real_logs_db_s3_viewer_restore(world):
    settings, db, store, expected, names = world
    stats = migrate_logs(settings, db, store, MigrationOptions(min_size=0, concurrency=3, reason="test", **SMALL_PARTS))
    assert stats.state == "finished"
    assert stats.failed == 0 and stats.skipped == 0
    assert stats.moved_logs == len(expected)
    assert stats.moved_bytes == sum(len(v) for v in expected.values())
    counts = assert_every_log_intact(settings, store, expected)
    assert counts == {"db": 0, "s3": len(expected), "half": 0}
    # The pointer keeps what graders read, without bodies.
    with psycopg.connect(settings.database.dsn) as conn:
        rows = dict(conn.execute("SELECT step_result_id, summary FROM atc.moved_log").fetchall())
    by_name = {names[k]: v for k, v in rows.items()}
    assert by_name["c_segfault"]["exit_code"] == 139 or "exit_code" in by_name["c_segfault"]
    assert by_name["big_multipart"]["points"] == 2.5
    assert by_name["big_multipart"]["parts"]["stdout"] == len("line of output\n" * 800_000)
    assert "line of output" not in json.dumps(by_name["big_multipart"])
    hdfs = by_name["loghub_HDFS_2k"]
    assert hdfs["kind"] == "io" and hdfs["step_count"] == 10 and hdfs["step_states"] == {"passed": 6, "failed": 4}
    assert by_name["nul_and_surrogates"]["fields"]["note"] == "\\0\\ud800"
    # The multipart object really was uploaded in parts (its ETag says how many).
    big_id = next(k for k, v in names.items() if v == "big_multipart")
    assert store.head(store.log_key(big_id)).etag.endswith("-3")
    # Audited, with the counts.
    audit = db.fetch("SELECT outcome, reason, details FROM atc.audit WHERE action = 'migrate-logs'")
    assert audit[0]["outcome"] == "ok" and audit[0]["reason"] == "test"
    assert audit[0]["details"]["moved_logs"] == len(expected)

    outcomes = restore_logs(settings, db, store, list(expected), reason="back")
    assert {o.status for o in outcomes} == {"restored"}
    counts = assert_every_log_intact(settings, store, expected)
    assert counts == {"db": len(expected), "s3": 0, "half": 0}
    assert list(store.list()) == []  # objects removed after the restore committed
    assert db.fetch_one("SELECT count(*) AS n FROM atc.moved_log")["n"] == 0


def test_plan_reads_sizes_only_and_changes_nothing(world):
    settings, db, store, expected, _ = world
    big = max(expected, key=lambda k: len(expected[k]))
    with psycopg.connect(settings.database.dsn, autocommit=True) as conn:
        conn.execute("UPDATE auto_test_step_result SET state = 'running' WHERE id = %s", (big,))
    plan = plan_migration(db, MigrationOptions(min_size=1000))
    sizes = db.fetch("SELECT id, state::text AS state, pg_column_size(log) AS n FROM auto_test_step_result")
    eligible = [r for r in sizes if r["n"] >= 1000]
    assert plan.logs == len(eligible)
    assert plan.movable_logs == len([r for r in eligible if r["state"] != "running"])
    assert plan.by_state["running"]["logs"] == 1
    assert db.fetch_one("SELECT count(*) AS n FROM atc.moved_log")["n"] == 0
    capped = plan_migration(db, MigrationOptions(min_size=1000, max_bytes=plan.movable_bytes // 3))
    assert capped.capped_by_max_bytes and capped.movable_bytes <= plan.movable_bytes // 3 + max(r["n"] for r in eligible)


def test_running_steps_and_small_logs_stay(world):
    settings, db, store, expected, _ = world
    sizes = {r["id"]: r["n"] for r in db.fetch("SELECT id, pg_column_size(log) AS n FROM auto_test_step_result")}
    running = sorted(k for k, n in sizes.items() if n >= 2000)[:3]
    with psycopg.connect(settings.database.dsn, autocommit=True) as conn:
        conn.execute("UPDATE auto_test_step_result SET state = 'running' WHERE id = ANY(%s)", (running,))
    stats = migrate_logs(settings, db, store, MigrationOptions(min_size=2000, concurrency=2, **SMALL_PARTS))
    assert stats.skipped_reasons == {"running": 3}
    assert stats.moved_logs == len([n for n in sizes.values() if n >= 2000]) - 3
    for sid in running:
        assert placement(settings, sid)["inline"] and placement(settings, sid)["key"] is None
    for sid, n in sizes.items():
        if n < 2000:
            assert placement(settings, sid)["key"] is None
    assert_every_log_intact(settings, store, expected)


def test_cancel_then_rerun_resumes_the_same_run(world):
    settings, db, store, expected, _ = world
    control = MigrationControl()
    seen = []

    def on_outcome(outcome):
        seen.append(outcome.status)
        if len(seen) == 5:
            control.cancel()

    opts = MigrationOptions(min_size=0, concurrency=1, **SMALL_PARTS)
    first = migrate_logs(settings, db, store, opts, control=control, on_outcome=on_outcome)
    assert first.state == "cancelled"
    assert 5 <= first.moved_logs < len(expected)
    progress = db.fetch_one("SELECT last_step_result_id, finished_at FROM atc.migration_progress WHERE run_id = %s",
                            (first.run_id,))
    assert progress["finished_at"] is None and progress["last_step_result_id"] >= min(expected)
    second = migrate_logs(settings, db, store, opts)
    assert second.run_id == first.run_id  # joined the unfinished run
    assert second.moved_logs == len(expected) - first.moved_logs
    runs = list_runs(db)
    assert runs[0]["id"] == first.run_id and runs[0]["finished_at"] is not None
    assert runs[0]["moved_logs"] == len(expected)
    assert_every_log_intact(settings, store, expected)
    # A new invocation after the run finished starts a new run with nothing left to do.
    third = migrate_logs(settings, db, store, opts)
    assert third.run_id != first.run_id and third.moved_logs == 0


def test_pause_blocks_progress_until_resumed(world):
    settings, db, store, expected, _ = world
    control = MigrationControl()
    control.pause()
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("stats", migrate_logs(
        settings, db, store, MigrationOptions(min_size=0, concurrency=2, **SMALL_PARTS), control=control)))
    t.start()
    t.join(1.0)
    assert t.is_alive()
    assert db.fetch_one("SELECT count(*) AS n FROM atc.moved_log")["n"] == 0
    control.resume()
    t.join(120)
    assert result["stats"].moved_logs == len(expected)


def test_two_shards_in_parallel_move_every_log_exactly_once(world, tmp_path):
    settings, db, store, expected, _ = world
    config = write_config(settings, tmp_path / "atc.toml")
    import subprocess
    import sys
    from tests.migrate_support import ROOT

    procs = [subprocess.Popen([sys.executable, "-m", "console", "--config", str(config), "migrate-logs",
                               "--min-size", "0", "--shard", shard, "--concurrency", "2", "--json"],
                              cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for shard in ("1/2", "2/2")]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    stats = [json.loads(out) for out, _ in outs]
    assert stats[0]["run_id"] == stats[1]["run_id"]  # both hosts joined one run through PostgreSQL
    assert sum(s["moved_logs"] for s in stats) == len(expected)
    assert all(s["skipped"] == 0 and s["failed"] == 0 for s in stats)
    rows = db.fetch("SELECT step_result_id FROM atc.moved_log")
    assert sorted(r["step_result_id"] for r in rows) == sorted(expected)
    expected_split = [len([i for i in expected if i % 2 == k]) for k in (0, 1)]
    assert [s["moved_logs"] for s in stats] == expected_split
    runs = list_runs(db)
    assert runs[0]["shards_finished"] == 2 and runs[0]["finished_at"] is not None
    assert_every_log_intact(settings, store, expected)


def test_assignment_filter(empty_db):
    logs = [json.dumps({"stdout": "x" * 5000, "exit_code": i}).encode() for i in range(6)]
    ids = seed_world(empty_db, logs, assignments=2)
    db = Database(empty_db)
    try:
        first_assignment = db.fetch_one('SELECT min(id) AS id FROM "Assignment"')["id"]
        stats = migrate_logs(empty_db, db, ObjectStore(empty_db),
                             MigrationOptions(min_size=0, assignment_ids=(first_assignment,)))
        assert stats.moved_logs == 3
        moved = {r["step_result_id"] for r in db.fetch("SELECT step_result_id FROM atc.moved_log")}
        assert moved == set(ids[0::2])
    finally:
        db.close()


def test_read_only_refuses(world):
    settings, db, store, _, _ = world
    with pytest.raises(AtcError, match="read-only"):
        migrate_logs(replace(settings, read_only=True), db, store, MigrationOptions(min_size=0))


def test_parse_shard():
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "x", "1/0"):
        with pytest.raises(AtcError):
            parse_shard(bad)


def test_cli_dry_run_migrate_runs_restore(world, tmp_path):
    settings, db, store, expected, _ = world
    config = write_config(settings, tmp_path / "atc.toml")
    dry = run_cli(config, "migrate-logs", "--min-size", "10k", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    big = [k for k in expected if db.fetch_one("SELECT pg_column_size(log) AS n FROM auto_test_step_result WHERE id=%s", (k,))["n"] >= 10240]
    assert plan["movable_logs"] == len(big) and plan["dry_run"] is True
    moved = run_cli(config, "migrate-logs", "--min-size", "10k", "--json", "--reason", "cli test")
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["moved_logs"] == len(big)
    runs = run_cli(config, "migration-runs", "--json")
    assert json.loads(runs.stdout)[0]["moved_logs"] == len(big)
    restored = run_cli(config, "restore-log", str(big[0]), "--json")
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)[0]["status"] == "restored"
    where, data = read_log(db, store, big[0])
    assert where == "db" and data == expected[big[0]]
    bad = run_cli(config, "migrate-logs", "--min-size", "lots")
    assert bad.returncode == 2 and "not a size" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = run_cli(config, "restore-log", "999999", "--json")
    assert missing.returncode == 1 and "does not exist" in json.loads(missing.stdout)[0]["error"]


def test_sha_of_expected_matches_pointer(world):
    """Pointers carry the SHA-256 of exactly the bytes that were inline."""
    settings, db, store, expected, _ = world
    sid = min(expected)
    migrate_logs(settings, db, store, MigrationOptions(min_size=0, **SMALL_PARTS))
    assert placement(settings, sid)["sha256"] == hashlib.sha256(expected[sid]).hexdigest()


def test_cli_refuses_unknown_assignment_and_empty_size_and_labels_units(empty_db, tmp_path):
    import random

    # Incompressible, so the stored size is above 1k.
    seed_world(empty_db, [json.dumps({"stdout": random.Random(3).randbytes(3000).hex()}).encode()])
    config = write_config(empty_db, tmp_path / "atc.toml")
    for args in (("--dry-run",), ("--json",)):
        missing = run_cli(config, "migrate-logs", "--min-size", "0", "--assignment", "99999", *args)
        assert missing.returncode == 2, missing.stdout
        assert "99999" in missing.stderr and "assignment" in missing.stderr
        assert len(missing.stderr.strip().splitlines()) == 1 and missing.stdout == ""
    empty = run_cli(config, "migrate-logs", "--min-size", "", "--dry-run")
    assert empty.returncode == 2 and "min-size" in empty.stderr
    dry = run_cli(config, "migrate-logs", "--min-size", "1k", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would move 1 logs" in dry.stdout and "stored in the database (compressed)" in dry.stdout
    db = Database(empty_db)
    try:
        assert db.fetch_one("SELECT count(*) AS n FROM atc.migration_run")["n"] == 0  # no run opened for a bad id
    finally:
        db.close()


def test_progress_columns_use_binary_units_and_say_stored_or_uploaded():
    import io

    from rich.console import Console
    from rich.progress import Progress

    from console.commands.migrate import _bar_columns
    from console.migrate import MigrationStats

    out = io.StringIO()
    progress = Progress(*_bar_columns(), console=Console(file=out, width=300, force_terminal=False))
    stats = MigrationStats(moved_bytes=3 * 1024 * 1024)
    progress.add_task("run 1 shard 1/1", total=10 * 1024 * 1024, completed=5 * 1024 * 1024, counts="moved 1/2 logs",
                      stats=stats)
    progress.console.print(progress.make_tasks_table(progress.tasks))
    line = out.getvalue()
    assert "5.0 MiB/10.0 MiB stored in DB (compressed)" in line
    assert re.search(r"3\.0 MiB uploaded \(raw\) at [\d.]+ (B|KiB|MiB|GiB)/s", line), line
    assert " MB" not in line and "kB" not in line


def test_paused_time_does_not_count_in_elapsed_rate_and_eta():
    import time

    from console.migrate import MigrationStats

    control = MigrationControl()
    stats = MigrationStats(planned_bytes=2000, done_stored_bytes=1000, moved_bytes=1000, state="running",
                           control=control)
    stats.started_at -= 1.0
    control.pause()
    assert stats.paused and stats.snapshot()["paused"] is True
    eta, elapsed, rate = stats.eta, stats.elapsed, stats.rate
    time.sleep(0.3)
    assert abs(stats.eta - eta) < 0.05 and abs(stats.elapsed - elapsed) < 0.05 and abs(stats.rate - rate) < 30
    control.resume()
    assert not stats.paused
    time.sleep(0.1)
    assert stats.elapsed > elapsed + 0.05  # the clock runs again, without the 0.3 s pause
    assert stats.elapsed < elapsed + 0.3

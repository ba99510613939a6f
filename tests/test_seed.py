"""console.seed: the demo data set and bulk seeding, against real PostgreSQL and S3.

Log bodies are read only through console.logstore streaming (the one place allowed to read them).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace

import psycopg
import pytest

from console.db import Database, connect
from console.errors import AtcError
from console.logformat import summarize_log
from console.logstore import locate, stream_db_log, stream_log
from console.seed import SCALES, seed_bulk, seed_demo
from console.storage import ObjectStore

OUTPUT_TYPES = {"run_program", "custom_output", "junit_test"}
ALL_STEP_STATES = {"not_started", "running", "passed", "failed", "timed_out", "skipped"}


def rows(settings, query, params=None):
    with connect(settings) as conn:
        return conn.execute(query, params).fetchall()


@pytest.fixture(scope="module")
def demo_logs(demo_db):
    """Every inline log of the demo data set: {step_result_id: (test_type, state, bytes)}."""
    meta = rows(demo_db, """
        SELECT s.id, t.test_type::text AS test_type, s.state::text AS state
        FROM auto_test_step_result s JOIN "AutoTestStep" t ON t.id = s.auto_test_step_id
        WHERE s.log IS NOT NULL ORDER BY s.id""")
    logs = {}
    with connect(demo_db) as conn:
        for row in meta:
            logs[row["id"]] = (row["test_type"], row["state"], b"".join(stream_db_log(conn, row["id"])))
    return logs


def test_scale_test_has_the_documented_counts(demo_db):
    counts = rows(demo_db, """
        SELECT (SELECT count(*) FROM "Course") AS courses, (SELECT count(*) FROM "Assignment") AS assignments,
               (SELECT count(*) FROM "AutoTestResult") AS results, (SELECT count(*) FROM auto_test_step_result) AS steps,
               (SELECT count(*) FROM "Work") AS works, (SELECT count(*) FROM "AutoTestRun") AS runs,
               (SELECT count(*) FROM job) AS jobs""")[0]
    assert counts["assignments"] == SCALES["test"].assignments
    assert counts["courses"] >= 3
    assert counts["results"] == SCALES["test"].results
    assert 3_500 <= counts["steps"] <= 4_500
    assert counts["works"] >= counts["results"]
    assert counts["jobs"] == counts["runs"]


def test_every_state_and_test_type_is_present(demo_db):
    assert {r["state"] for r in rows(demo_db, 'SELECT DISTINCT state::text AS state FROM "Assignment"')} == {"hidden", "open", "done"}
    assert all(r["deadline"] is not None for r in rows(demo_db, 'SELECT deadline FROM "Assignment"'))
    assert {r["s"] for r in rows(demo_db, 'SELECT DISTINCT state::text AS s FROM "AutoTestResult"')} == ALL_STEP_STATES
    assert {r["s"] for r in rows(demo_db, "SELECT DISTINCT state::text AS s FROM auto_test_step_result")} == ALL_STEP_STATES
    types = rows(demo_db, """SELECT DISTINCT t.test_type::text AS t FROM auto_test_step_result s
                             JOIN "AutoTestStep" t ON t.id = s.auto_test_step_id""")
    assert {r["t"] for r in types} == {"io_test", "run_program", "custom_output", "check_points", "junit_test"}
    structure = rows(demo_db, """SELECT count(DISTINCT se.id) AS sets, count(DISTINCT su.id) AS suites
                                 FROM "AutoTestSet" se JOIN "AutoTestSuite" su ON su.auto_test_set_id = se.id""")[0]
    assert structure["sets"] >= 2 and structure["suites"] >= 6
    # An assignment without an AutoTest, and hidden ones without runs.
    assert rows(demo_db, 'SELECT count(*) AS n FROM "Assignment" WHERE auto_test_id IS NULL')[0]["n"] >= 1


def test_results_belong_to_works_of_the_runs_assignment(demo_db):
    bad = rows(demo_db, """
        SELECT r.id FROM "AutoTestResult" r
        JOIN "AutoTestRun" run ON run.id = r.auto_test_run_id
        JOIN "Work" w ON w.id = r.work_id
        JOIN "Assignment" a ON a.id = w."Assignment_id"
        WHERE a.auto_test_id <> run.auto_test_id OR w.deleted""")
    assert bad == []
    # Steps of a result belong to the AutoTest of its run.
    bad = rows(demo_db, """
        SELECT s.id FROM auto_test_step_result s
        JOIN "AutoTestResult" r ON r.id = s.auto_test_result_id
        JOIN "AutoTestRun" run ON run.id = r.auto_test_run_id
        JOIN "AutoTestStep" st ON st.id = s.auto_test_step_id
        JOIN "AutoTestSuite" su ON su.id = st.auto_test_suite_id
        JOIN "AutoTestSet" se ON se.id = su.auto_test_set_id
        WHERE se.auto_test_id <> run.auto_test_id LIMIT 5""")
    assert bad == []


def test_broker_rows_are_consistent_with_the_runs(demo_db):
    jobs = rows(demo_db, """
        SELECT j.id, j.state::text AS state, j.remote_id, j.job_metadata, run.id AS run_id, run.job_id,
               a.id AS assignment_id, run.batch_run_done
        FROM job j
        JOIN "AutoTestRun" run ON run.id = (j.job_metadata->>'run_id')::int
        JOIN "Assignment" a ON a.auto_test_id = run.auto_test_id""")
    assert len(jobs) == rows(demo_db, "SELECT count(*) AS n FROM job")[0]["n"]
    for job in jobs:
        assert job["job_metadata"]["assignment_id"] == job["assignment_id"]
        assert job["remote_id"] == str(job["job_id"])
        assert (job["state"] == "finished") == job["batch_run_done"]
    states = {j["state"] for j in jobs}
    assert states == {"waiting_for_runner", "started", "finished"}
    # A waiting job while runners sit idle: the starvation the broker screens look for.
    idle = rows(demo_db, "SELECT count(*) AS n FROM runner WHERE state = 'started' AND job_id IS NULL")[0]["n"]
    assert idle >= 1
    working = rows(demo_db, """SELECT r.state::text AS state, j.state::text AS job_state FROM runner r
                               JOIN job j ON j.id = r.job_id WHERE r.state = 'running'""")
    assert working and all(w["job_state"] == "started" for w in working)
    # Running results have an app-side runner of their run.
    running = rows(demo_db, """SELECT r.id, atr.run_id, r.auto_test_run_id FROM "AutoTestResult" r
                               LEFT JOIN "AutoTestRunner" atr ON atr.id = r.auto_test_runner_id
                               WHERE r.state = 'running'""")
    assert running and all(r["run_id"] == r["auto_test_run_id"] for r in running)


def test_logs_have_the_documented_shapes(demo_logs):
    assert len(demo_logs) > 2_000
    for sid, (test_type, state, data) in demo_logs.items():
        log = json.loads(data)
        if test_type == "io_test":
            assert set(log) == {"steps"}, sid
            for step in log["steps"]:
                assert set(step) == {"name", "input", "expected", "stdout", "stderr", "exit_code", "state",
                                     "achieved_points"}, sid
        elif test_type == "check_points":
            assert isinstance(log["points"], float), sid
        else:
            assert {"stdout", "stderr", "exit_code", "time_spend"} <= set(log), sid
            assert isinstance(log["stdout"], str) and isinstance(log["stderr"], str)
            if state == "running":
                assert log["exit_code"] is None
            else:
                assert isinstance(log["exit_code"], int), sid
            if test_type in ("junit_test", "custom_output") and state in ("passed", "failed"):
                assert isinstance(log["points"], float), sid
        # What a grader reads is there without reading output.
        summary = summarize_log(data)
        assert summary["kind"] in ("io", "output", "points"), sid


def test_logs_hold_real_outputs_hostile_content_and_a_range_of_sizes(demo_logs):
    blobs = [data for _, _, data in demo_logs.values()]
    def some(needle: bytes) -> bool:
        return any(needle in b for b in blobs)

    # Real program outputs.
    assert some(b"error: expected") or some(b"error:")  # gcc / javac
    assert some(b"Traceback (most recent call last)")
    assert some(b"Segmentation fault")
    assert some(b"==ERROR: AddressSanitizer") or some(b"AddressSanitizer")
    assert some(b"\\u001b[1m=====") or some(b"\\u001b[")  # pytest with ANSI colour
    assert some("李小龍".encode())
    # Hostile on purpose.
    assert some(b"\\u0000") and some(b"\\ud800")
    assert some(b"\\u001b]8;;") and some(b"\\u001b]0;") and some(b"\\u001b[2J")
    assert some(b"[bold red]") and some(b"[link=")
    assert some(b"\\r")
    sizes = sorted(len(b) for b in blobs)
    assert sizes[0] < 200
    assert sum(100_000 <= s <= 2_100_000 for s in sizes) >= 3
    assert sizes[-1] >= 1_000_000


def test_moved_logs_are_in_s3_with_exact_bytes_and_a_summary(demo_db):
    moved = rows(demo_db, """SELECT m.*, s.log IS NULL AS row_empty FROM atc.moved_log m
                             JOIN auto_test_step_result s ON s.id = m.step_result_id ORDER BY m.size DESC""")
    assert len(moved) >= 10
    assert moved[0]["size"] >= 1_000_000
    store = ObjectStore(demo_db)
    db = Database(demo_db)
    try:
        for row in moved[:12]:
            assert row["row_empty"]
            location = locate(db, row["step_result_id"])
            assert location.where == "s3"
            data = b"".join(stream_log(db, store, location))
            assert len(data) == row["size"]
            assert hashlib.sha256(data).hexdigest() == row["sha256"]
            assert row["summary"] == json.loads(json.dumps(summarize_log(data)))
            assert row["key"] == store.log_key(row["step_result_id"])
    finally:
        db.close()


def test_seeding_is_deterministic_and_installs_the_schema(pg, make_settings, demo_db):
    name = f"t_seed_raw_{os.getpid()}"
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')  # no schema at all: the seeder installs it
    try:
        settings = make_settings(name)
        messages = []
        summary = seed_demo(settings, scale="test", progress=messages.append)
        assert any("reference AutoTest schema" in m for m in messages)
        assert summary["step_results"] == rows(settings, "SELECT count(*) AS n FROM auto_test_step_result")[0]["n"]
        assert summary["logs_moved"] > 0 and summary["s3"].startswith("moved")
        query = """SELECT s.id, s.auto_test_step_id, s.auto_test_result_id, s.state::text, pg_column_size(s.log) AS size,
                          m.sha256, m.size AS moved_size
                   FROM auto_test_step_result s LEFT JOIN atc.moved_log m ON m.step_result_id = s.id ORDER BY s.id"""
        assert rows(settings, query) == rows(demo_db, query)
        names = 'SELECT id, name, state::text, "Course_id" FROM "Assignment" ORDER BY id'
        assert rows(settings, names) == rows(demo_db, names)
    finally:
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_refuses_a_database_that_already_has_step_results(fresh_demo_db):
    with pytest.raises(AtcError) as info:
        seed_demo(fresh_demo_db, scale="test")
    assert "already holds step results" in info.value.message and "\n" not in info.value.message


def test_unknown_scale_and_read_only_are_one_line_errors(empty_db):
    with pytest.raises(AtcError, match="unknown seed scale 'huge'"):
        seed_demo(empty_db, scale="huge")
    with pytest.raises(AtcError, match="read_only"):
        seed_demo(replace(empty_db, read_only=True), scale="test")


def test_without_a_bucket_nothing_is_moved_and_the_summary_says_so(empty_db):
    settings = replace(empty_db, s3=replace(empty_db.s3, bucket=""))
    summary = seed_demo(settings, scale="test")
    assert summary["logs_moved"] == 0 and summary["s3"].startswith("skipped")
    assert rows(settings, "SELECT count(*) AS n FROM atc.moved_log")[0]["n"] == 0
    # Only steps that never produced output have no log.
    empty = rows(settings, "SELECT DISTINCT state::text AS s FROM auto_test_step_result WHERE log IS NULL")
    assert {r["s"] for r in empty} <= {"not_started", "skipped"}


@pytest.mark.parametrize("log_bytes,compressible,count", [(10, True, 1_234), (50_000, True, 1_234), (300_000, False, 123)])
def test_seed_bulk_creates_exactly_the_rows_asked_for(empty_db, log_bytes, compressible, count):
    summary = seed_bulk(empty_db, assignments=7, step_results=count, log_bytes=log_bytes, compressible=compressible)
    counts = rows(empty_db, """SELECT (SELECT count(*) FROM auto_test_step_result) AS steps,
                                      (SELECT count(*) FROM "Assignment") AS assignments,
                                      (SELECT count(DISTINCT auto_test_run_id) FROM "AutoTestResult") AS runs""")[0]
    assert counts == {"steps": count, "assignments": 7, "runs": 7}
    assert summary["step_results"] == count
    with connect(empty_db) as conn:
        first = conn.execute("SELECT min(id) AS id FROM auto_test_step_result").fetchone()["id"]
        data = b"".join(stream_db_log(conn, first))
    log = json.loads(data)
    assert set(log) >= {"stdout", "stderr", "exit_code", "time_spend"}
    if log_bytes > 100:
        assert abs(len(data) - log_bytes) <= log_bytes * 0.02

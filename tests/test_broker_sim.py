"""The reference broker simulator: jobs flow to runners, logs grow the application's way, the
claim honours pauses, the admin API answers over real HTTP, faults can be injected."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from broker_support import app_conn as _conn, wait_for as _wait

from console.broker_sim import BrokerSimProcess, create_assignment, create_run
from console.db import Database
from console.pauses import pause_assignments, resume_assignments




def _run_done(conn, run_id) -> bool:
    row = conn.execute("""SELECT count(*) FILTER (WHERE state IN ('not_started', 'running')) AS open,
                                 count(*) AS total
                          FROM "AutoTestResult" WHERE auto_test_run_id = %s""", (run_id,)).fetchone()
    return row["total"] > 0 and row["open"] == 0


def test_jobs_flow_and_logs_grow_like_the_application(empty_db, start_broker_sim):
    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "Sorting lab", works=3, steps=2)
        run = create_run(conn, aid)
    sim = start_broker_sim(empty_db)
    with _conn(empty_db) as conn:
        job = conn.execute("SELECT id, job_metadata FROM job").fetchone()
        assert job["job_metadata"]["assignment_id"] == aid and job["job_metadata"]["run_id"] == run
        _wait(lambda: _run_done(conn, run), what="the run to finish")
        _wait(lambda: conn.execute("SELECT state::text AS s FROM job WHERE id = %s", (job["id"],)).fetchone()["s"]
              == "finished", what="the job to finish")
        steps = conn.execute("""SELECT sr.state::text AS state, length(sr.log::text) AS size,
                                       sr.log->>'exit_code' AS exit_code
                                FROM auto_test_step_result sr JOIN "AutoTestResult" r ON r.id = sr.auto_test_result_id
                                WHERE r.auto_test_run_id = %s""", (run,)).fetchall()
        assert len(steps) == 3 * 2
        assert all(s["state"] in ("passed", "failed") for s in steps)
        assert all(s["size"] > 300 for s in steps), "each step wrote its whole output"
        assert all(s["exit_code"] in ("0", "1") for s in steps)
        # Runners are back to idle, heartbeats are fresh.
        runners = conn.execute("""SELECT r.state::text AS state, now() - a.last_heartbeat < interval '3 seconds' AS fresh
                                  FROM runner r JOIN "AutoTestRunner" a ON a.id = r.id
                                  WHERE r.state <> 'cleaned'""").fetchall()
        assert len(runners) == 2 and all(r["state"] == "started" and r["fresh"] for r in runners)
    assert sim.dispatch_count >= 1


def test_runner_locks_the_result_row_for_update_while_rewriting_the_log(empty_db, start_broker_sim):
    """The harmful habit is reproduced: while a runner appends, it holds a row lock on the step result."""
    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "Chatty lab", works=1, steps=1, output_bytes=400_000, chunk_bytes=20_000,
                                chunk_delay=0.0)
        create_run(conn, aid)
    start_broker_sim(empty_db)
    seen = threading.Event()
    with _conn(empty_db) as conn:
        def locked_by_runner():
            row = conn.execute("""SELECT count(*) AS n FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                                  WHERE l.relation = 'auto_test_step_result'::regclass AND l.mode = 'RowShareLock'
                                    AND a.application_name LIKE 'autotest-runner/%%'""").fetchone()
            return row["n"] > 0
        _wait(locked_by_runner, what="a runner holding a row lock on auto_test_step_result")
        seen.set()
        settings = conn.execute("""SELECT DISTINCT current_setting('lock_timeout') AS lt FROM pg_stat_activity""").fetchone()
        assert settings is not None
        apps = conn.execute("""SELECT application_name FROM pg_stat_activity
                               WHERE application_name LIKE 'autotest-%%'""").fetchall()
        assert {a["application_name"].split("/")[0] for a in apps} >= {"autotest-runner", "autotest-broker"}
    assert seen.is_set()


def test_paused_assignment_gets_no_runner_and_resume_lets_it_flow(empty_db, start_broker_sim):
    db = Database(empty_db)
    with _conn(empty_db) as conn:
        paused_aid = create_assignment(conn, "Paused lab", works=2, steps=1)
        other_aid = create_assignment(conn, "Other lab", works=2, steps=1)
    pause_assignments(db, empty_db, [paused_aid], reason="incident 42")
    sim = start_broker_sim(empty_db, register_existing=False)
    with _conn(empty_db) as conn:
        paused_run = create_run(conn, paused_aid)
        other_run = create_run(conn, other_aid)
        paused_job = sim.register_job(paused_run)
        sim.register_job(other_run)
        _wait(lambda: _run_done(conn, other_run), what="the unpaused run to finish")
        time.sleep(0.3)  # several dispatcher ticks
        job = conn.execute("SELECT state::text AS state FROM job WHERE id = %s", (paused_job,)).fetchone()
        assert job["state"] == "waiting_for_runner"
        assert conn.execute('SELECT count(*) AS n FROM "AutoTestResult" WHERE auto_test_run_id = %s '
                            "AND state <> 'not_started'", (paused_run,)).fetchone()["n"] == 0
        resume_assignments(db, empty_db, [paused_aid], reason="fixed")
        _wait(lambda: _run_done(conn, paused_run), what="the resumed run to finish")
    db.close()


def test_pause_then_enqueue_race_never_claims(empty_db, start_broker_sim):
    """Pause and immediately enqueue, many times, with idle runners polling hard: no claim follows."""
    db = Database(empty_db)
    with _conn(empty_db) as conn:
        aids = [create_assignment(conn, f"Race lab {i}", works=1, steps=1) for i in range(8)]
    sim = start_broker_sim(empty_db, runners=3, poll_interval=0.001, register_existing=False)
    jobs = []
    with _conn(empty_db) as conn:
        for aid in aids:
            pause_assignments(db, empty_db, [aid], reason="race")
            run = create_run(conn, aid)
            jobs.append(sim.register_job(run))
        time.sleep(0.5)
        claimed = conn.execute("""SELECT count(*) AS n FROM job WHERE id = ANY(%s) AND state <> 'waiting_for_runner'""",
                               (jobs,)).fetchone()["n"]
        touched = conn.execute("""SELECT count(*) AS n FROM "AutoTestResult" r JOIN job j
                                    ON j.job_metadata->>'run_id' = r.auto_test_run_id::text
                                  WHERE j.id = ANY(%s) AND r.state <> 'not_started'""", (jobs,)).fetchone()["n"]
    assert claimed == 0 and touched == 0
    db.close()


def test_pause_stops_a_running_job_between_results(empty_db, start_broker_sim):
    db = Database(empty_db)
    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "Long lab", works=6, steps=1, output_bytes=2000, chunk_bytes=100,
                                chunk_delay=0.01)
        run = create_run(conn, aid)
    start_broker_sim(empty_db, runners=1)
    with _conn(empty_db) as conn:
        _wait(lambda: conn.execute("""SELECT count(*) AS n FROM "AutoTestResult" WHERE auto_test_run_id = %s
                                      AND state = 'running'""", (run,)).fetchone()["n"], what="a running result")
        pause_assignments(db, empty_db, [aid], reason="stop dispatching")
        _wait(lambda: conn.execute("SELECT state::text AS s FROM job").fetchone()["s"] == "waiting_for_runner",
              what="the job to go back to the queue")
        counts = conn.execute("""SELECT count(*) FILTER (WHERE state = 'not_started') AS waiting,
                                        count(*) FILTER (WHERE state = 'running') AS running
                                 FROM "AutoTestResult" WHERE auto_test_run_id = %s""", (run,)).fetchone()
        assert counts["waiting"] >= 1 and counts["running"] == 0
    db.close()


def test_admin_api_over_http(empty_db, start_broker_sim):
    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "API lab", works=1, steps=1)
        run = create_run(conn, aid)
    sim = start_broker_sim(empty_db, register_existing=False)
    with httpx.Client(base_url=sim.url, timeout=5) as http:
        health = http.get("/health").json()
        assert health["dispatcher"] == "running" and health["live_runners"] == 2
        r = http.post("/api/v1/jobs", json={"run_id": run})
        assert r.status_code == 200 and r.json()["job_id"]
        assert http.post("/api/v1/jobs", json={"run_id": "x"}).status_code == 400
        jobs = http.get("/admin/jobs").json()["jobs"]
        assert jobs and jobs[0]["job_metadata"]["assignment_id"] == aid
        runners = http.get("/admin/runners").json()["runners"]
        assert len(runners) == 2
        stopped = http.post(f"/admin/runners/{runners[0]['id']}/stop").json()
        assert stopped["stopped"] is True
        assert http.post("/admin/runners/not-a-uuid/stop").status_code == 404
        assert http.get("/nope").status_code == 404
        # The supervisor replaces the stopped runner.
        _wait(lambda: len([x for x in http.get("/admin/runners").json()["runners"]
                           if x["id"] != runners[0]["id"]]) == 2, what="a replacement runner")
        # Faults: status, garbage, delay; clear.
        http.post("/admin/faults", json={"status": 500, "remaining": 1})
        assert http.get("/health").status_code == 500
        assert http.get("/health").status_code == 200
        http.post("/admin/faults", json={"garbage": True})
        assert not http.get("/health").text.startswith("{")
        http.post("/admin/faults", json={"clear": True})
        assert http.get("/health").json()["ok"] is True


@pytest.mark.slow
def test_runs_as_a_service_process(empty_db, tmp_path):
    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "Service lab", works=1, steps=1)
        run = create_run(conn, aid)
    service = BrokerSimProcess(tmp_path / "broker")
    service.start(empty_db.database.dsn, runners=1, tie_to_parent=True)
    try:
        assert service.is_running()
        assert httpx.get(f"{service.url}/health", timeout=5).json()["live_runners"] == 1
        with _conn(empty_db) as conn:
            _wait(lambda: _run_done(conn, run), timeout=30, what="the run to finish under the service")
    finally:
        service.stop()
    assert not service.is_running()

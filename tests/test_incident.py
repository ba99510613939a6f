"""The outage replay: the simulator produces it, atc's operations fix it.

The first test performs the walkthrough with atc's console functions; the pilot test performs it
through the TUI (lock screen, assignments screen, broker screen) exactly as docs/incident.md says.
"""

from __future__ import annotations

import time
from dataclasses import replace

import psycopg
import pytest
from psycopg.rows import dict_row

from console.db import Database
from console.incident import MiB
from console.locks import take_snapshot
from console.pauses import pause_assignments, paused_map
from console.signals import Signaller
from console.starvation import Thresholds, find_starvation, recover_starvation

FAST = Thresholds(waiting_after=0.5, assigned_grace=0.5, stalled_after=1.0, heartbeat_fresh=10, not_started_after=600)
SMALL_INCIDENT = {"output_bytes": 8 * MiB, "chunk_bytes": 256 * 1024, "chunk_delay": 0.02,
                  "big_log_bytes": MiB, "works": 2, "waiters": 2, "bystanders": 2, "bystander_results": 3}


def _conn(settings) -> psycopg.Connection:
    return psycopg.connect(settings.database.dsn, autocommit=True, row_factory=dict_row)


def _wait(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_incident(settings, start_broker_sim):
    sim = start_broker_sim(settings, runners=4, output_bytes=600, chunk_bytes=200, chunk_delay=0.01)
    sim.start_incident(**SMALL_INCIDENT)
    status = sim.incident.wait_for_phase("outage", timeout=60)
    return sim, status


def bystander_progress_since(settings, jobs, since) -> int:
    with _conn(settings) as conn:
        return conn.execute("""
            SELECT count(*) AS n FROM auto_test_step_result sr
            JOIN "AutoTestResult" r ON r.id = sr.auto_test_result_id
            JOIN job j ON j.job_metadata->>'run_id' = r.auto_test_run_id::text
            WHERE j.id = ANY(%s) AND sr.updated_at > %s AND sr.state IN ('passed', 'failed')""",
                            (jobs, since)).fetchone()["n"]


def test_incident_reproduces_the_outage_and_atc_fixes_it(empty_db, start_broker_sim):
    sim, status = start_incident(empty_db, start_broker_sim)
    settings = replace(empty_db, broker=replace(empty_db.broker, url=sim.url))
    db = Database(settings)
    # The outage: all kinds of starvation but the slow one; the runner on the big log is blocked.
    kinds = _wait(lambda: {f.kind for f in find_starvation(db, FAST)} >= {"waiting_idle", "stuck_assigned", "no_progress"}
                  and {f.kind for f in find_starvation(db, FAST)}, what="the broker to starve")
    assert kinds >= {"waiting_idle", "stuck_assigned", "no_progress"}
    # 1. Find the root blocker: the stalled web request, idle in transaction, others queued behind it.
    snapshot = take_snapshot(db)
    blocker = snapshot.sessions[status["blocker_pid"]]
    assert "request-stalled" in blocker.application_name and blocker.state == "idle in transaction"
    assert any(blocker.pid in s.blocked_by for s in snapshot.sessions.values())
    # 2. Pause the incident assignment (commits at once although its rows are locked).
    started = time.perf_counter()
    pause_assignments(db, settings, [status["assignment_id"]], reason="huge output, locks piling up")
    assert time.perf_counter() - started < 0.1
    # 3. Terminate the blocker.
    signaller = Signaller(settings)
    try:
        report = signaller.signal("terminate", signaller.lookup([status["blocker_pid"]]), reason="root blocker")
        assert report.all_signalled
    finally:
        signaller.close()
    # 4. Trigger recovery through the broker, 5. watch work flow.
    with _conn(settings) as conn:
        since = conn.execute("SELECT clock_timestamp() AS t").fetchone()["t"]
    result = recover_starvation(db, settings, via="broker", thresholds=FAST, watch_seconds=20, reason="incident")
    assert result.watch["flowing"], result.as_dict()
    assert status["deaf_runner"] in [r["runner_id"] for r in result.released]
    _wait(lambda: bystander_progress_since(settings, status["bystander_jobs"], since) >= 2,
          what="bystander results to complete")
    # The paused assignment stays parked; nothing else starves.
    assert status["assignment_id"] in paused_map(db)
    _wait(lambda: not [f for f in find_starvation(db, FAST) if f.kind != "no_progress"], what="starvation to clear")
    db.close()

"""The reference broker and runner simulator (used by `atc demo` and the tests).

A real HTTP service on 127.0.0.1 working on the broker tables (``job``, ``runner``) in the
AutoTest database, with simulated runners that execute AutoTest runs the way the application does:

- the *dispatcher* hands ``waiting_for_runner`` jobs to idle runners with one claim statement that
  checks atc's pauses inside it (``NOT EXISTS (current pause) ... FOR UPDATE SKIP LOCKED``) after
  taking the shared pause fence (see ``console.pauses``), so a pause cannot be slipped past by a
  claim in flight; runners claim each *result* the same way, so a paused assignment also stops
  between results;
- *runners* write step results with growing logs **the way the application does, harmful habits
  included**: every chunk is ``SELECT log ... FOR UPDATE``, read whole, appended to, and the whole
  log written back. Their sessions run with no statement/lock/idle timeouts, like the application's
  role in the outage. They heartbeat into ``"AutoTestRunner".last_heartbeat`` from a separate
  thread, so a runner blocked on a lock still looks alive;
- a *supervisor* replaces retired runners (stopped, or released by starvation recovery).

This module is the one place in atc allowed to lock application rows and to open sessions without
atc's session policy: it imitates the application on purpose. atc's console code never does.

Admin API (see ``console.broker``): ``GET /health``, ``GET /admin/jobs``, ``GET /admin/runners``,
``POST /admin/runners/<id>/stop``, ``POST /admin/recover``, plus for the demo and tests
``POST /api/v1/jobs`` (register a job for a run, as the application does), ``POST /admin/faults``
(inject slow answers, HTTP errors, garbage JSON, a wedged dispatcher, deaf runners) and
``POST /admin/incident`` (start the outage replay, ``console.incident``).

Run it with ``python -m console.broker_sim --dsn DSN`` or ``atc broker-sim``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Json, Jsonb

from .pauses import CURRENT_PAUSES_CTE, PAUSE_FENCE_KEY
from .starvation import (FIND_NO_PROGRESS, FIND_NOT_STARTED, FIND_STUCK_ASSIGNED, FIND_WAITING_IDLE,
                         Thresholds)

LOOPBACK = "127.0.0.1"
# The application's sessions in the outage had no timeouts at all; the simulator reproduces that.
APP_SESSION_OPTIONS = "-c statement_timeout=0 -c lock_timeout=0 -c idle_in_transaction_session_timeout=0"
DEFAULT_CG_URL = "http://autotest.local"


def app_connect(dsn: str, name: str) -> psycopg.Connection:
    """A session shaped like the application's: autocommit off by use of transaction(), no timeouts."""
    return psycopg.connect(dsn, autocommit=True, row_factory=dict_row, application_name=name[:63],
                           options=APP_SESSION_OPTIONS, connect_timeout=10)


# -- SQL (the simulated broker and application; these DO take row locks, on purpose) ------------

_JOB_ASSIGNMENT = "(CASE WHEN j.job_metadata->>'assignment_id' ~ '^[0-9]+$' THEN (j.job_metadata->>'assignment_id')::int END)"

# The dispatcher's claim: next waiting job of an unpaused assignment (or one given job: a runner
# the autoscaler started for it), then an idle runner of ours, both SKIP LOCKED, job row before
# runner row (the order atc's recovery uses too).
CLAIM_NEXT_JOB = f"""
WITH {CURRENT_PAUSES_CTE},
candidate_job AS (
    SELECT j.id FROM job j
    WHERE j.state = 'waiting_for_runner'
      AND (%(job)s::bigint IS NULL OR j.id = %(job)s::bigint)
      AND NOT EXISTS (SELECT 1 FROM current_pause p WHERE p.assignment_id = {_JOB_ASSIGNMENT})
    ORDER BY j.updated_at, j.id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
),
candidate_runner AS (
    SELECT r.id FROM runner r
    WHERE r.state = 'started' AND r.job_id IS NULL AND r.id = ANY(%(runners)s::uuid[])
      AND EXISTS (SELECT 1 FROM candidate_job)
    ORDER BY r.updated_at, r.id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
),
claimed AS (
    UPDATE job SET state = 'started', updated_at = now()
    FROM candidate_job c, candidate_runner cr
    WHERE job.id = c.id
    RETURNING job.id, job.job_metadata
)
UPDATE runner SET state = 'assigned', job_id = claimed.id, updated_at = now()
FROM claimed, candidate_runner cr
WHERE runner.id = cr.id
RETURNING runner.id AS runner_id, claimed.id AS job_id, claimed.job_metadata
"""

# A runner's claim of the next result of its run: not started, or left running by a runner that
# no longer holds the job; never for a paused assignment (checked inside the statement).
CLAIM_NEXT_RESULT = f"""
WITH {CURRENT_PAUSES_CTE}
UPDATE "AutoTestResult" res
SET state = 'running', auto_test_runner_id = %(runner)s, started_at = now(), updated_at = now()
WHERE res.id = (
    SELECT r2.id FROM "AutoTestResult" r2
    JOIN "Work" w ON w.id = r2.work_id AND NOT w.deleted
    WHERE r2.auto_test_run_id = %(run)s
      AND (r2.state = 'not_started'
           OR (r2.state = 'running'
               AND NOT EXISTS (SELECT 1 FROM runner x WHERE x.id = r2.auto_test_runner_id
                                 AND x.job_id = %(job)s AND x.state IN ('assigned', 'running')
                                 AND x.id <> %(runner)s)))
      AND NOT EXISTS (SELECT 1 FROM current_pause p WHERE p.assignment_id = w."Assignment_id")
    ORDER BY r2.id
    LIMIT 1
    FOR UPDATE OF r2 SKIP LOCKED
)
RETURNING res.id, res.work_id
"""

UNFINISHED_RESULTS = """
SELECT count(*) AS n FROM "AutoTestResult" res JOIN "Work" w ON w.id = res.work_id AND NOT w.deleted
WHERE res.auto_test_run_id = %s AND res.state IN ('not_started', 'running')
"""

STEPS_OF_AUTO_TEST = """
SELECT s.id, s.name, s.test_type::text AS test_type, s.data::jsonb AS data
FROM "AutoTestStep" s
JOIN "AutoTestSuite" su ON su.id = s.auto_test_suite_id
JOIN "AutoTestSet" se ON se.id = su.auto_test_set_id
WHERE se.auto_test_id = %s
ORDER BY se.id, su.id, s."order", s.id
"""

# The application's harmful habit, reproduced: lock the row and read the whole log to append.
READ_LOG_FOR_UPDATE = "SELECT log FROM auto_test_step_result WHERE id = %s FOR UPDATE"
WRITE_LOG = "UPDATE auto_test_step_result SET log = %s, state = %s, updated_at = now() WHERE id = %s"

REGISTER_JOB = """
INSERT INTO job (state, cg_url, remote_id, job_metadata, wanted_runners)
SELECT 'waiting_for_runner', %(cg_url)s, coalesce(run.job_id::text, 'run-' || run.id),
       jsonb_build_object('assignment_id',
                          (SELECT a.id FROM "Assignment" a WHERE a.auto_test_id = run.auto_test_id ORDER BY a.id LIMIT 1),
                          'run_id', run.id, 'auto_test_id', run.auto_test_id),
       1
FROM "AutoTestRun" run WHERE run.id = %(run_id)s
ON CONFLICT (cg_url, remote_id) DO UPDATE SET state = 'waiting_for_runner', updated_at = now()
    WHERE job.state = 'finished'
RETURNING id
"""

RUNS_WITHOUT_LIVE_JOB = """
SELECT DISTINCT res.auto_test_run_id AS run_id
FROM "AutoTestResult" res
WHERE res.state IN ('not_started', 'running')
  AND NOT EXISTS (SELECT 1 FROM job j WHERE j.job_metadata->>'run_id' = res.auto_test_run_id::text
                    AND j.state IN ('waiting_for_runner', 'started'))
ORDER BY 1
"""


@dataclass
class SimConfig:
    dsn: str
    host: str = LOOPBACK
    port: int = 0
    runners: int = 3
    cg_url: str = DEFAULT_CG_URL
    poll_interval: float = 0.05
    heartbeat_interval: float = 0.3
    # Per step: how many bytes of output and in how many appends (a step's data can override
    # with "simulated_output_bytes" / "simulated_chunk_bytes").
    output_bytes: int = 1200
    chunk_bytes: int = 400
    chunk_delay: float = 0.02
    # Register jobs at start for runs that have pending results and no live job.
    register_existing: bool = True
    # Every N seconds create a fresh run for a random assignment (demo liveliness); 0 = off.
    demo_load_interval: float = 0.0
    # Health thresholds (seconds).
    health_after: float = 30.0
    seed: int = 7


@dataclass
class Faults:
    """What the HTTP layer and the broker should get wrong (for tests and the incident)."""

    status: int | None = None      # answer every API call with this HTTP status
    delay: float = 0.0             # sleep before answering
    garbage: bool = False          # answer with a body that is not JSON
    remaining: int | None = None   # how many requests the HTTP faults apply to (None: until cleared)
    dispatcher_wedged: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "delay": self.delay, "garbage": self.garbage,
                "remaining": self.remaining, "dispatcher_wedged": self.dispatcher_wedged}


@dataclass
class SimRunner:
    id: uuid.UUID
    ipaddr: str
    deaf: bool = False            # ignores assignments (a runner VM that never comes up)
    # Started by the autoscaler for one job (the incident's): the dispatcher's loop leaves it
    # alone, and it retires when that job ends.
    reserved: bool = False
    retired: bool = False
    thread: threading.Thread | None = None
    conn: psycopg.Connection | None = field(default=None, repr=False)
    job_id: int | None = None


class _Abandon(Exception):
    """The runner no longer holds its job (stopped or released): stop working on it."""


class _Fetcher:
    """Lets the starvation queries (written for console.db.Database) run on a sim connection."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def fetch(self, query, params=None, *, what: str = "query"):
        return self.conn.execute(query, params).fetchall()

    def fetch_one(self, query, params=None, *, what: str = "query"):
        rows = self.fetch(query, params)
        return rows[0] if rows else None


class BrokerSimulator:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.faults = Faults()
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._dispatcher_parked = threading.Event()
        self._runners: dict[uuid.UUID, SimRunner] = {}
        self._threads: list[threading.Thread] = []
        self._server: ThreadingHTTPServer | None = None
        self._random = random.Random(config.seed)
        self._runner_serial = 0
        self.incident = None  # console.incident.IncidentScenario when replaying the outage
        self.service_down = False
        self.dispatch_count = 0

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "simulator not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "BrokerSimulator":
        with app_connect(self.config.dsn, "autotest-broker/startup") as conn:
            self._adopt_previous_runners(conn)
            if self.config.register_existing:
                for row in conn.execute(RUNS_WITHOUT_LIVE_JOB).fetchall():
                    conn.execute(REGISTER_JOB, {"cg_url": self.config.cg_url, "run_id": row["run_id"]})
        for _ in range(self.config.runners):
            self.spawn_runner()
        self._server = ThreadingHTTPServer((self.config.host, self.config.port), _handler_for(self))
        self._server.daemon_threads = True
        for target, name in ((self._server.serve_forever, "http"), (self._dispatcher_loop, "dispatcher"),
                             (self._heartbeat_loop, "heartbeat"), (self._supervisor_loop, "supervisor")):
            t = threading.Thread(target=target, name=f"broker-sim-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.config.demo_load_interval > 0:
            t = threading.Thread(target=self._demo_load_loop, name="broker-sim-load", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self.incident is not None:
            self.incident.stop()
        if self._server is not None and not self.service_down:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            runners = list(self._runners.values())
        for r in runners:
            r.retired = True
            self._cancel_backend(r)
        for r in runners:
            if r.thread is not None:
                r.thread.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)

    def stop_service(self) -> None:
        """Take the broker itself down (HTTP API and dispatcher) while the runner machines keep
        polling their rows: the situation in which atc recovers ``--via db``."""
        self.faults.dispatcher_wedged = True
        self.service_down = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> "BrokerSimulator":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _adopt_previous_runners(self, conn: psycopg.Connection) -> None:
        """A broker (re)start: runners of a previous instance are gone; their jobs go back to the queue."""
        with conn.transaction():
            conn.execute("""
                UPDATE job SET state = 'waiting_for_runner', updated_at = now()
                WHERE id IN (SELECT job_id FROM runner WHERE job_id IS NOT NULL
                               AND state IN ('assigned', 'running'))
                  AND state = 'started'""")
            conn.execute("""
                UPDATE runner SET state = 'cleaned', job_id = NULL, updated_at = now()
                WHERE state NOT IN ('cleaned', 'not_running')""")

    # -- runners ---------------------------------------------------------------------------------

    def spawn_runner(self, *, deaf: bool = False, reserved: bool = False) -> SimRunner:
        """Start one runner VM (the supervisor keeps the pool at ``config.runners``; extra ones,
        e.g. reserved for a job, are not replaced when they retire)."""
        with self._lock:
            self._runner_serial += 1
            serial = self._runner_serial
        runner = SimRunner(id=uuid.uuid4(), ipaddr=f"10.0.{serial // 250}.{serial % 250 + 1}",
                           deaf=deaf, reserved=reserved)
        with app_connect(self.config.dsn, "autotest-broker/supervisor") as conn:
            with conn.transaction():
                conn.execute('INSERT INTO "AutoTestRunner" (id, ipaddr, last_heartbeat) VALUES (%s, %s, now())',
                             (runner.id, runner.ipaddr))
                conn.execute("INSERT INTO runner (id, ipaddr, type, state) VALUES (%s, %s, 'simulated', 'creating')",
                             (runner.id, runner.ipaddr))
            conn.execute("UPDATE runner SET state = 'started', updated_at = now() WHERE id = %s", (runner.id,))
        runner.thread = threading.Thread(target=self._runner_loop, args=(runner,), daemon=True,
                                         name=f"broker-sim-runner-{serial}")
        with self._lock:
            self._runners[runner.id] = runner
        runner.thread.start()
        return runner

    def live_runner_ids(self) -> list[uuid.UUID]:
        with self._lock:
            return [r.id for r in self._runners.values() if not r.retired]

    def hearing_runner_ids(self) -> list[uuid.UUID]:
        """Live runners that would start a job they are given (not deaf)."""
        with self._lock:
            return [r.id for r in self._runners.values() if not r.retired and not r.deaf]

    def dispatchable_runner_ids(self) -> list[uuid.UUID]:
        """Runners the dispatcher may hand any waiting job to (not reserved for one job)."""
        with self._lock:
            return [r.id for r in self._runners.values() if not r.retired and not r.reserved]

    def runner(self, runner_id: str | uuid.UUID) -> SimRunner | None:
        with self._lock:
            return self._runners.get(uuid.UUID(str(runner_id)))

    def _cancel_backend(self, runner: SimRunner) -> None:
        conn = runner.conn
        if conn is not None and not conn.closed:
            try:
                conn.cancel_safe(timeout=3)
            except Exception:
                pass

    def _runner_loop(self, runner: SimRunner) -> None:
        try:
            runner.conn = app_connect(self.config.dsn, f"autotest-runner/{str(runner.id)[:8]}")
        except psycopg.Error:
            runner.retired = True
            return
        conn = runner.conn
        try:
            while not self._stopping.is_set() and not runner.retired:
                row = conn.execute("SELECT state::text AS state, job_id FROM runner WHERE id = %s",
                                   (runner.id,)).fetchone()
                if row is None or row["state"] in ("cleaning", "cleaned", "not_running"):
                    break
                if row["state"] == "assigned" and not runner.deaf:
                    try:
                        self._run_job(runner, conn, row["job_id"])
                    except _Abandon:
                        break
                    except psycopg.errors.QueryCanceled:
                        break  # stopped by the broker while blocked
                    continue
                self._stopping.wait(self.config.poll_interval)
        except psycopg.Error:
            pass  # connection terminated (e.g. by pg_terminate_backend): the runner dies
        finally:
            runner.retired = True
            try:
                conn.close()
            except Exception:
                pass

    def _owns(self, conn: psycopg.Connection, runner: SimRunner, job_id: int) -> None:
        if runner.retired or self._stopping.is_set():
            raise _Abandon()
        row = conn.execute("SELECT 1 FROM runner WHERE id = %s AND job_id = %s AND state = 'running'",
                           (runner.id, job_id)).fetchone()
        if row is None:
            raise _Abandon()

    def _run_job(self, runner: SimRunner, conn: psycopg.Connection, job_id: int) -> None:
        with conn.transaction():
            ok = conn.execute("""UPDATE runner SET state = 'running', updated_at = now()
                                 WHERE id = %s AND state = 'assigned' AND job_id = %s RETURNING id""",
                              (runner.id, job_id)).fetchone()
            if not ok:
                return
            job = conn.execute("SELECT job_metadata FROM job WHERE id = %s", (job_id,)).fetchone()
        meta = (job or {}).get("job_metadata") or {}
        run_id = int(meta.get("run_id") or 0)
        runner.job_id = job_id
        run = conn.execute('SELECT id, auto_test_id, job_id FROM "AutoTestRun" WHERE id = %s', (run_id,)).fetchone()
        if run is None:
            self._finish_job(conn, runner, job_id, run_id)
            return
        conn.execute('UPDATE "AutoTestRunner" SET job_id = %s, run_id = %s WHERE id = %s',
                     (run["job_id"], run_id, runner.id))
        steps = conn.execute(STEPS_OF_AUTO_TEST, (run["auto_test_id"],)).fetchall()
        while True:
            self._owns(conn, runner, job_id)
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (PAUSE_FENCE_KEY,))
                result = conn.execute(CLAIM_NEXT_RESULT, {"runner": runner.id, "run": run_id, "job": job_id}).fetchone()
            if result is None:
                break
            self._run_result(conn, runner, job_id, result["id"], steps)
        self._finish_job(conn, runner, job_id, run_id)

    def _finish_job(self, conn: psycopg.Connection, runner: SimRunner, job_id: int, run_id: int) -> None:
        with conn.transaction():
            left = conn.execute(UNFINISHED_RESULTS, (run_id,)).fetchone()["n"]
            # Results left (paused assignment, or a result locked elsewhere): back to the queue.
            state = "waiting_for_runner" if left else "finished"
            conn.execute("UPDATE job SET state = %s, updated_at = now() WHERE id = %s AND state = 'started'",
                         (state, job_id))
            conn.execute("""UPDATE runner SET state = 'started', job_id = NULL, updated_at = now()
                            WHERE id = %s AND job_id = %s""", (runner.id, job_id))
        runner.job_id = None
        if runner.reserved:
            runner.retired = True  # the autoscaler's extra VM goes away with its job

    def _run_result(self, conn: psycopg.Connection, runner: SimRunner, job_id: int, result_id: int,
                    steps: list[dict[str, Any]]) -> None:
        all_passed = True
        for step in steps:
            data = step["data"] if isinstance(step["data"], dict) else {}
            total = int(data.get("simulated_output_bytes") or self.config.output_bytes)
            chunk = max(1, int(data.get("simulated_chunk_bytes") or self.config.chunk_bytes))
            delay = float(data.get("simulated_chunk_delay", self.config.chunk_delay))
            initial = {"stdout": "", "stderr": "", "exit_code": None, "time_spent": None}
            with conn.transaction():
                row = conn.execute("SELECT id FROM auto_test_step_result WHERE auto_test_result_id = %s "
                                   "AND auto_test_step_id = %s ORDER BY id LIMIT 1",
                                   (result_id, step["id"])).fetchone()
                if row is None:
                    row = conn.execute("""INSERT INTO auto_test_step_result
                                          (auto_test_step_id, auto_test_result_id, state, started_at, log)
                                          VALUES (%s, %s, 'running', now(), %s) RETURNING id""",
                                       (step["id"], result_id, Json(initial))).fetchone()
                else:
                    conn.execute("""UPDATE auto_test_step_result SET state = 'running', started_at = now(),
                                    log = %s, updated_at = now() WHERE id = %s""", (Json(initial), row["id"]))
            step_result_id = row["id"]
            written = 0
            seq = 0
            started = time.monotonic()
            while written < total:
                self._owns(conn, runner, job_id)
                piece = _program_output(step["name"], result_id, seq, min(chunk, total - written))
                with conn.transaction():
                    log = conn.execute(READ_LOG_FOR_UPDATE, (step_result_id,)).fetchone()["log"] or dict(initial)
                    log["stdout"] = (log.get("stdout") or "") + piece
                    conn.execute(WRITE_LOG, (Json(log), "running", step_result_id))
                written += len(piece)
                seq += 1
                if delay:
                    self._stopping.wait(delay)
            self._owns(conn, runner, job_id)
            passed = (result_id + step["id"]) % 5 != 0
            all_passed = all_passed and passed
            with conn.transaction():
                log = conn.execute(READ_LOG_FOR_UPDATE, (step_result_id,)).fetchone()["log"] or dict(initial)
                log["exit_code"] = 0 if passed else 1
                log["time_spent"] = round(time.monotonic() - started, 3)
                conn.execute(WRITE_LOG, (Json(log), "passed" if passed else "failed", step_result_id))
        with conn.transaction():
            conn.execute("""UPDATE "AutoTestResult" SET state = %s, final_result = true, updated_at = now()
                            WHERE id = %s AND auto_test_runner_id = %s""",
                         ("passed" if all_passed else "failed", result_id, runner.id))

    # -- dispatcher, heartbeats, supervisor ----------------------------------------------------

    def dispatch_once(self, conn: psycopg.Connection, runners: list[uuid.UUID] | None = None,
                      job_id: int | None = None) -> dict[str, Any] | None:
        """One claim: a waiting job of an unpaused assignment (``job_id``: that one only) to an
        idle runner (of ``runners``, default: every runner not reserved), or None."""
        ids = runners if runners is not None else self.dispatchable_runner_ids()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (PAUSE_FENCE_KEY,))
            row = conn.execute(CLAIM_NEXT_JOB, {"runners": ids, "job": job_id}).fetchone()
        if row is None:
            return None
        self.dispatch_count += 1
        meta = row["job_metadata"] or {}
        # Tell the application its run started (it keeps this on the run row).
        if meta.get("run_id"):
            conn.execute('UPDATE "AutoTestRun" SET started_date = coalesce(started_date, now()) WHERE id = %s',
                         (int(meta["run_id"]),))
        return {"job_id": row["job_id"], "runner_id": str(row["runner_id"])}

    def wedge_dispatcher(self, timeout: float = 10.0) -> None:
        """Stop dispatching and return once the dispatcher has parked, so no claim that started
        before the wedge can still hand out a job registered after it (tests rely on that)."""
        self._dispatcher_parked.clear()
        self.faults.dispatcher_wedged = True
        self._dispatcher_parked.wait(timeout)

    def _dispatcher_loop(self) -> None:
        conn = self._loop_connection("autotest-broker/dispatcher")
        while not self._stopping.is_set():
            if self.faults.dispatcher_wedged:
                self._dispatcher_parked.set()
                self._stopping.wait(self.config.poll_interval)
                continue
            try:
                claimed = self.dispatch_once(conn)
            except psycopg.Error:
                conn = self._reconnect(conn, "autotest-broker/dispatcher")
                claimed = None
            if claimed is None:
                self._stopping.wait(self.config.poll_interval)
        conn.close()

    def _heartbeat_loop(self) -> None:
        conn = self._loop_connection("autotest-broker/heartbeat")
        while not self._stopping.is_set():
            try:
                conn.execute('UPDATE "AutoTestRunner" SET last_heartbeat = now() WHERE id = ANY(%s::uuid[])',
                             (self.live_runner_ids(),))
            except psycopg.Error:
                conn = self._reconnect(conn, "autotest-broker/heartbeat")
            self._stopping.wait(self.config.heartbeat_interval)
        conn.close()

    def _supervisor_loop(self) -> None:
        """Replace retired runners so the pool keeps its size (the broker's autoscaler)."""
        conn = self._loop_connection("autotest-broker/supervisor")
        while not self._stopping.is_set():
            with self._lock:
                retired = [r for r in self._runners.values() if r.retired and not (r.thread and r.thread.is_alive())]
                for r in retired:
                    del self._runners[r.id]
                live = sum(1 for r in self._runners.values() if not r.retired)
            try:
                for r in retired:
                    conn.execute("""UPDATE runner SET state = 'cleaned', job_id = NULL, updated_at = now()
                                    WHERE id = %s""", (r.id,))
                for _ in range(self.config.runners - live):
                    self.spawn_runner()
            except psycopg.Error:
                conn = self._reconnect(conn, "autotest-broker/supervisor")
            self._stopping.wait(max(0.1, self.config.poll_interval * 4))
        conn.close()

    def _demo_load_loop(self) -> None:
        conn = self._loop_connection("autotest-web/teacher")
        while not self._stopping.wait(self.config.demo_load_interval):
            try:
                row = conn.execute("""SELECT a.id FROM "Assignment" a
                                      WHERE a.auto_test_id IS NOT NULL
                                        AND EXISTS (SELECT 1 FROM "Work" w WHERE w."Assignment_id" = a.id)
                                      ORDER BY random() LIMIT 1""").fetchone()
                if row:
                    run_id = create_run(conn, row["id"], max_results=12)
                    self.register_job(run_id, conn=conn)
            except psycopg.Error:
                conn = self._reconnect(conn, "autotest-web/teacher")
        conn.close()

    def _loop_connection(self, name: str) -> psycopg.Connection:
        while True:
            try:
                return app_connect(self.config.dsn, name)
            except psycopg.OperationalError:
                if self._stopping.wait(0.5):
                    raise

    def _reconnect(self, conn: psycopg.Connection, name: str) -> psycopg.Connection:
        try:
            conn.close()
        except Exception:
            pass
        self._stopping.wait(0.2)
        return self._loop_connection(name)

    # -- the admin API (also called directly by tests) ------------------------------------------

    def register_job(self, run_id: int, conn: psycopg.Connection | None = None) -> int | None:
        own = conn is None
        conn = conn or app_connect(self.config.dsn, "autotest-web/register-job")
        try:
            row = conn.execute(REGISTER_JOB, {"cg_url": self.config.cg_url, "run_id": run_id}).fetchone()
            return row["id"] if row else None
        finally:
            if own:
                conn.close()

    def health(self) -> dict[str, Any]:
        after = self.config.health_after
        with app_connect(self.config.dsn, "autotest-broker/api") as conn:
            counts = conn.execute("""
                SELECT (SELECT count(*) FROM job WHERE state = 'waiting_for_runner'
                          AND updated_at < now() - make_interval(secs => %(after)s)) AS not_starting,
                       (SELECT count(*) FROM runner WHERE state = 'assigned'
                          AND updated_at < now() - make_interval(secs => %(after)s)) AS stuck_assigned
                """, {"after": after}).fetchone()
            slow = conn.execute(FIND_NO_PROGRESS, {"stalled_after": after, "limit": 1000}).fetchall()
            states = conn.execute("SELECT state::text AS state, count(*) AS n FROM runner GROUP BY 1").fetchall()
        return {
            "ok": not self.faults.dispatcher_wedged,
            "not_starting": counts["not_starting"] + counts["stuck_assigned"],
            "slow": len(slow),
            "dispatcher": "wedged" if self.faults.dispatcher_wedged else "running",
            "runners": {r["state"]: r["n"] for r in states},
            "live_runners": len(self.live_runner_ids()),
            "dispatched": self.dispatch_count,
            "incident": self.incident.status() if self.incident is not None else None,
        }

    def jobs(self) -> list[dict[str, Any]]:
        with app_connect(self.config.dsn, "autotest-broker/api") as conn:
            return conn.execute("""SELECT id, state::text AS state, cg_url, remote_id, job_metadata, wanted_runners,
                                          created_at, updated_at
                                   FROM job WHERE state <> 'finished' OR updated_at > now() - interval '10 minutes'
                                   ORDER BY id DESC LIMIT 500""").fetchall()

    def runners(self) -> list[dict[str, Any]]:
        with app_connect(self.config.dsn, "autotest-broker/api") as conn:
            rows = conn.execute("""SELECT r.id, r.ipaddr, r.type, r.state::text AS state, r.job_id, r.created_at,
                                          r.updated_at, atr.last_heartbeat
                                   FROM runner r LEFT JOIN "AutoTestRunner" atr ON atr.id = r.id
                                   WHERE r.state NOT IN ('cleaned', 'not_running')
                                   ORDER BY r.created_at, r.id""").fetchall()
        for row in rows:
            sim = self.runner(row["id"])
            row["deaf"] = bool(sim and sim.deaf)
        return rows

    def stop_runner(self, runner_id: str) -> dict[str, Any] | None:
        try:
            rid = uuid.UUID(str(runner_id))
        except ValueError:
            return None
        with app_connect(self.config.dsn, "autotest-broker/api") as conn:
            with conn.transaction():
                row = conn.execute("SELECT id, job_id FROM runner WHERE id = %s", (rid,)).fetchone()
                if row is None:
                    return None
                requeued = self._release(conn, rid, row["job_id"])
        return {"runner": str(rid), "stopped": True, "requeued_job": requeued}

    def _release(self, conn: psycopg.Connection, runner_id: uuid.UUID, job_id: int | None) -> int | None:
        """Retire a runner and put its job back in the queue (broker side: it may wait for locks)."""
        requeued = None
        if job_id is not None:
            row = conn.execute("""UPDATE job SET state = 'waiting_for_runner', updated_at = now()
                                  WHERE id = %s AND state = 'started' RETURNING id""", (job_id,)).fetchone()
            requeued = row["id"] if row else None
        conn.execute("UPDATE runner SET state = 'cleaning', job_id = NULL, updated_at = now() WHERE id = %s",
                     (runner_id,))
        sim = self.runner(runner_id)
        if sim is not None:
            sim.retired = True
            self._cancel_backend(sim)  # a runner blocked on a lock is killed, like a VM being stopped
        return requeued

    def recover(self, thresholds: dict[str, Any] | None = None, dry_run: bool = False) -> dict[str, Any]:
        """Starvation recovery, broker side: release stuck runners, requeue, register, dispatch."""
        th = Thresholds(**{k: float(v) for k, v in (thresholds or {}).items() if k in Thresholds.__dataclass_fields__})
        out: dict[str, Any] = {"released": [], "requeued": [], "registered": [], "dispatched": [], "notes": [],
                               "dispatcher_restarted": False, "dry_run": dry_run}
        params = {**th.params(), "limit": 500}
        with app_connect(self.config.dsn, "autotest-broker/recovery") as conn:
            stuck = conn.execute(FIND_STUCK_ASSIGNED, params).fetchall()
            stalled = conn.execute(FIND_NO_PROGRESS, params).fetchall()
            not_started = conn.execute(FIND_NOT_STARTED, params).fetchall()
            waiting = conn.execute(FIND_WAITING_IDLE, params).fetchall()
            if dry_run:
                out["released"] = [{"runner_id": str(r["runner_id"]), "job_id": r["job_id"], "kind": r["kind"]}
                                   for r in stuck + stalled]
                out["registered"] = [r["run_id"] for r in not_started]
                out["notes"].append("dry run: nothing changed")
                if self.faults.dispatcher_wedged:
                    out["notes"].append("the dispatcher is wedged and would be restarted")
                return out
            for row in sorted(stuck + stalled, key=lambda r: r["job_id"] or 0):
                with conn.transaction():
                    requeued = self._release(conn, row["runner_id"], row["job_id"])
                out["released"].append({"runner_id": str(row["runner_id"]), "job_id": row["job_id"], "kind": row["kind"]})
                if requeued is not None:
                    out["requeued"].append(requeued)
            for row in not_started:
                job = self.register_job(row["run_id"], conn=conn)
                if job is not None:
                    out["registered"].append(job)
            if self.faults.dispatcher_wedged or waiting:
                out["dispatcher_restarted"] = self.faults.dispatcher_wedged
                self.faults.dispatcher_wedged = False
            # Dispatch now rather than on the next tick, so the caller sees what moved.
            hearing = set(self.hearing_runner_ids()) & set(self.dispatchable_runner_ids())
            for _ in range(len(hearing)):
                claimed = self.dispatch_once(conn, runners=list(hearing))
                if claimed is None:
                    break
                out["dispatched"].append(claimed)
        return out

    def set_faults(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("clear"):
            wedged = self.faults.dispatcher_wedged if "dispatcher_wedged" not in body else False
            self.faults = Faults(dispatcher_wedged=wedged)
            for r in list(self._runners.values()):
                r.deaf = False
        if any(k in body for k in ("status", "delay", "garbage")):
            # A new HTTP fault replaces the previous one and lasts until cleared unless limited.
            self.faults.status, self.faults.delay, self.faults.garbage = None, 0.0, False
            self.faults.remaining = None
        for key in ("status", "delay", "garbage", "remaining", "dispatcher_wedged"):
            if key in body:
                setattr(self.faults, key, body[key])
        deaf = int(body.get("deaf_runners") or 0)
        made_deaf = []
        if deaf:
            with self._lock:
                for r in self._runners.values():
                    if len(made_deaf) >= deaf:
                        break
                    if not r.retired and not r.deaf and r.job_id is None:
                        r.deaf = True
                        made_deaf.append(str(r.id))
        return {**self.faults.as_dict(), "deaf_runners": made_deaf}

    def start_incident(self, **options: Any) -> dict[str, Any]:
        from .incident import IncidentScenario

        if self.incident is None or self.incident.finished:
            self.incident = IncidentScenario(self, **options)
            self.incident.start()
        return self.incident.status()

    # -- helpers for tests and the incident -----------------------------------------------------

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
                 what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


# -- HTTP ----------------------------------------------------------------------------------------


def _handler_for(sim: BrokerSimulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "atc-broker-sim/1"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet; the demo runs in a TUI
            return

        def _send(self, status: int, payload: Any, raw: bytes | None = None) -> None:
            body = raw if raw is not None else json.dumps(payload, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if raw is None else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            if not length:
                return {}
            try:
                data = json.loads(self.rfile.read(length))
            except ValueError:
                raise _BadRequest("body is not JSON") from None
            if not isinstance(data, dict):
                raise _BadRequest("body must be a JSON object")
            return data

        def _apply_faults(self) -> bool:
            f = sim.faults
            if f.remaining is not None and f.remaining <= 0:
                return False
            if not (f.delay or f.status or f.garbage):
                return False
            if f.remaining is not None:
                f.remaining -= 1
            if f.delay:
                time.sleep(f.delay)
            if f.status:
                self._send(int(f.status), {"error": f"injected fault {f.status}"})
                return True
            if f.garbage:
                self._send(200, None, raw=b"<html>502 proxy error: upstream \x1b[31mgone</html>")
                return True
            return False

        def _route(self, method: str) -> None:
            path = urlparse(self.path).path.rstrip("/") or "/"
            try:
                body = self._body() if method == "POST" else {}
                if path == "/admin/faults" and method == "POST":
                    return self._send(200, sim.set_faults(body))
                if self._apply_faults():
                    return
                if method == "GET" and path == "/health":
                    return self._send(200, sim.health())
                if method == "GET" and path == "/admin/jobs":
                    return self._send(200, {"jobs": sim.jobs()})
                if method == "GET" and path == "/admin/runners":
                    return self._send(200, {"runners": sim.runners()})
                if method == "POST" and path.startswith("/admin/runners/") and path.endswith("/stop"):
                    rid = path[len("/admin/runners/"):-len("/stop")]
                    result = sim.stop_runner(rid)
                    if result is None:
                        return self._send(404, {"error": f"no runner {rid}"})
                    return self._send(200, result)
                if method == "POST" and path == "/admin/recover":
                    return self._send(200, sim.recover(body.get("thresholds"), bool(body.get("dry_run"))))
                if method == "POST" and path == "/admin/incident":
                    return self._send(200, sim.start_incident(**(body.get("options") or {})))
                if method == "POST" and path == "/api/v1/jobs":
                    run_id = body.get("run_id")
                    if not isinstance(run_id, int):
                        raise _BadRequest("run_id (integer) is required")
                    job = sim.register_job(run_id)
                    return self._send(200 if job else 409, {"job_id": job})
                return self._send(404, {"error": f"no route {method} {path}"})
            except _BadRequest as exc:
                return self._send(400, {"error": str(exc)})
            except psycopg.Error as exc:
                return self._send(503, {"error": f"database: {' '.join(str(exc).split())[:200]}"})
            except Exception as exc:  # the simulator must answer, not hang up
                return self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

    return Handler


class _BadRequest(Exception):
    pass


# -- fake program output and test data -----------------------------------------------------------

_LINES = [
    "test_{n:05d} ... ok",
    "Running case {n}: input=[{a}, {b}] expected={c} got={c}",
    "  assert sorted(result) == expected  # case {n} passed",
    "Traceback (most recent call last):\n  File \"solution.py\", line {a}, in <module>\nValueError: case {n}",
    "{a} {b} {c} {a} {b} {c} {a} {b} {c}",
]


def _program_output(step_name: str, result_id: int, seq: int, nbytes: int) -> str:
    """Plausible program output of exactly nbytes (ASCII), different per step and chunk."""
    rnd = random.Random(hash((step_name, result_id, seq)) & 0xFFFFFFFF)
    parts: list[str] = []
    size = 0
    n = seq * 1000
    while size < nbytes:
        n += 1
        line = rnd.choice(_LINES).format(n=n, a=rnd.randint(1, 999), b=rnd.randint(1, 999), c=rnd.randint(1, 99999)) + "\n"
        parts.append(line)
        size += len(line)
    return "".join(parts)[:nbytes]


def create_assignment(conn: psycopg.Connection, name: str, *, works: int = 4, steps: int = 2,
                      output_bytes: int | None = None, chunk_bytes: int | None = None,
                      chunk_delay: float | None = None) -> int:
    """A course, an AutoTest (set, suite, steps), an open assignment and student works. Returns the id."""
    data: dict[str, Any] = {"program": "python3 solution.py"}
    if output_bytes is not None:
        data["simulated_output_bytes"] = output_bytes
    if chunk_bytes is not None:
        data["simulated_chunk_bytes"] = chunk_bytes
    if chunk_delay is not None:
        data["simulated_chunk_delay"] = chunk_delay
    with conn.transaction():
        course = conn.execute('INSERT INTO "Course" (name) VALUES (%s) RETURNING id', (f"{name} course",)).fetchone()["id"]
        at = conn.execute('INSERT INTO "AutoTest" DEFAULT VALUES RETURNING id').fetchone()["id"]
        st = conn.execute('INSERT INTO "AutoTestSet" (auto_test_id) VALUES (%s) RETURNING id', (at,)).fetchone()["id"]
        su = conn.execute('INSERT INTO "AutoTestSuite" (auto_test_set_id) VALUES (%s) RETURNING id', (st,)).fetchone()["id"]
        for i in range(steps):
            conn.execute("""INSERT INTO "AutoTestStep" (auto_test_suite_id, "order", name, test_type, data)
                            VALUES (%s, %s, %s, 'run_program', %s)""", (su, i, f"step {i + 1}", Json(data)))
        aid = conn.execute("""INSERT INTO "Assignment" (name, state, "Course_id", auto_test_id)
                              VALUES (%s, 'open', %s, %s) RETURNING id""", (name, course, at)).fetchone()["id"]
        for i in range(works):
            username = f"student-{aid}-{i}-{uuid.uuid4().hex[:6]}"
            user = conn.execute('INSERT INTO "User" (name, username) VALUES (%s, %s) RETURNING id',
                                (f"Student {i}", username)).fetchone()["id"]
            conn.execute('INSERT INTO "Work" ("Assignment_id", "User_id") VALUES (%s, %s)', (aid, user))
    return aid


def create_run(conn: psycopg.Connection, assignment_id: int, *, max_results: int | None = None) -> int:
    """A new AutoTest run of the assignment with one not-started result per (latest) work."""
    with conn.transaction():
        a = conn.execute('SELECT auto_test_id FROM "Assignment" WHERE id = %s', (assignment_id,)).fetchone()
        if a is None or a["auto_test_id"] is None:
            raise ValueError(f"assignment {assignment_id} has no AutoTest")
        run = conn.execute("""INSERT INTO "AutoTestRun" (auto_test_id, job_id, runners_requested)
                              VALUES (%s, %s, 1) RETURNING id""", (a["auto_test_id"], uuid.uuid4())).fetchone()["id"]
        conn.execute("""INSERT INTO "AutoTestResult" (auto_test_run_id, work_id)
                        SELECT %s, w.id FROM "Work" w WHERE w."Assignment_id" = %s AND NOT w.deleted
                        ORDER BY w.id DESC LIMIT %s""", (run, assignment_id, max_results))
    return run


# -- running it as a service ---------------------------------------------------------------------


@dataclass
class BrokerSimProcess:
    """The simulator as a demo service: a child process, recorded in data_dir like PostgreSQL/S3."""

    data_dir: Path
    port: int = 0
    pid: int = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "broker-sim.log"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "broker-sim.pid"

    def start(self, dsn: str, *, runners: int = 4, demo_load_interval: float = 0.0, incident: bool = False,
              tie_to_parent: bool = False, timeout: float = 30.0) -> "BrokerSimProcess":
        import subprocess

        from .embedded import _die_with_parent, free_ports

        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_ports(1)[0]
        args = [sys.executable, "-m", "console.broker_sim", "--dsn", dsn, "--port", str(self.port),
                "--runners", str(runners), "--demo-load", str(demo_load_interval)]
        if incident:
            args.append("--incident")
        log = open(self.log_path, "ab")
        try:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent),
                                    preexec_fn=_die_with_parent(signal.SIGTERM) if tie_to_parent else None)
        finally:
            log.close()
        self.pid = proc.pid
        self.pid_path.write_text(str(proc.pid))
        self._wait_ready(proc, timeout)
        return self

    def _wait_ready(self, proc, timeout: float) -> None:
        import httpx

        from .errors import AtcError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise AtcError(f"broker simulator exited during start: {' | '.join(tail)}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AtcError(f"broker simulator did not answer on {self.url} within {timeout:.0f}s (see {self.log_path})")

    def stop(self, timeout: float = 10.0) -> None:
        from .embedded import _stop_pid

        pid = self.pid
        if not pid:
            try:
                pid = int(self.pid_path.read_text())
            except (OSError, ValueError):
                pid = 0
        if pid:
            _stop_pid(pid, signal.SIGTERM, timeout)
        self.pid = 0
        try:
            self.pid_path.unlink()
        except OSError:
            pass

    def is_running(self) -> bool:
        from .embedded import _pid_alive

        pid = self.pid
        if not pid:
            try:
                pid = int(self.pid_path.read_text())
            except (OSError, ValueError):
                return False
        return _pid_alive(pid)


def serve(config: SimConfig, *, incident: bool = False, ready: Callable[[str], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT (the `python -m console.broker_sim` / `atc broker-sim` entry)."""
    sim = BrokerSimulator(config).start()
    stop = threading.Event()

    def _stop(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if incident:
        sim.start_incident()
    if ready:
        ready(sim.url)
    try:
        stop.wait()
    finally:
        sim.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m console.broker_sim",
                                description="atc's reference broker and runner simulator (loopback only)")
    p.add_argument("--dsn", required=True, help="libpq DSN of the AutoTest database")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    p.add_argument("--runners", type=int, default=4)
    p.add_argument("--demo-load", type=float, default=0.0, metavar="SECONDS",
                   help="create a fresh run every SECONDS (0: off)")
    p.add_argument("--incident", action="store_true", help="replay the outage (console.incident)")
    args = p.parse_args(argv)
    config = SimConfig(dsn=args.dsn, port=args.port, runners=args.runners, demo_load_interval=args.demo_load,
                       chunk_delay=0.2, output_bytes=4000, chunk_bytes=500)

    def ready(url: str) -> None:
        print(f"broker simulator listening on {url} (pid {os.getpid()})", flush=True)

    return serve(config, incident=args.incident, ready=ready)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

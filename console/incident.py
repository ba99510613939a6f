"""Replay the outage live, inside the broker simulator (`atc demo --incident`).

What happens, in order (each phase is visible in ``GET /health`` -> ``incident``):

1. ``preparing``: an assignment whose test configuration produces huge step output ("Incident:
   image pipeline (huge output)") gets a fresh run; the broker's autoscaler starts a runner for
   its job (on a busy demo every pool runner holds a seeded job for minutes, and the job would
   otherwise queue behind them) and hands the job to it, in the same pause-honouring claim; the
   runner
   writes the output the application's way: each append locks the step result row ``FOR UPDATE``,
   reads the whole log and writes it back (so every append costs the size of the log so far).
2. ``locking``: once a step's log is big, a web request (``autotest-web/request-stalled``) locks
   that row ``FOR UPDATE`` while reading the log, and the run's row too, then stalls: its HTTP
   client timed out long ago but, with no statement or idle-in-transaction timeout on the
   application's role, its transaction is never aborted. More requests queue behind it, and so
   does the runner's next append.
3. ``starving``: the broker's dispatcher is wedged (the real broker deadlocked under this load),
   one runner (a fresh VM that never comes up) was handed a job and never started it, and fresh
   runs of other assignments wait for runners while runners sit idle (the autoscaler adds idle
   runners if the pool has none, so this shows on a busy demo too).
4. ``outage``: all four kinds of starvation are present; work does not flow.

The operator fixes it from atc (docs/incident.md): find the root blocker on the lock screen, pause
the incident assignment, terminate the blocker, trigger recovery, watch work flow again.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import psycopg

from .broker_sim import app_connect, create_assignment, create_run

if TYPE_CHECKING:  # pragma: no cover
    from .broker_sim import BrokerSimulator

MiB = 1024 * 1024
INCIDENT_ASSIGNMENT = "Incident: image pipeline (huge output)"


class IncidentScenario:
    def __init__(self, sim: "BrokerSimulator", *, output_bytes: int = 64 * MiB, chunk_bytes: int = MiB,
                 chunk_delay: float = 0.05, big_log_bytes: int = 4 * MiB, works: int = 4, waiters: int = 3,
                 bystanders: int = 2, bystander_results: int = 6, idle_runners: int = 2,
                 build_up_timeout: float = 120.0) -> None:
        self.sim = sim
        self.output_bytes = int(output_bytes)
        self.chunk_bytes = int(chunk_bytes)
        self.chunk_delay = float(chunk_delay)
        self.big_log_bytes = int(big_log_bytes)
        self.works = int(works)
        self.waiters = int(waiters)
        self.bystanders = int(bystanders)
        self.bystander_results = int(bystander_results)
        self.idle_runners = int(idle_runners)
        self.build_up_timeout = float(build_up_timeout)
        self.phase = "new"
        self.error: str | None = None
        self.assignment_id: int | None = None
        self.run_id: int | None = None
        self.step_result_id: int | None = None
        self.blocker_pid: int | None = None
        self.waiter_pids: list[int] = []
        self.deaf_runner: str | None = None
        self.bystander_assignments: list[int] = []
        self.bystander_jobs: list[int] = []
        self.job_id: int | None = None
        self.runner_id: str | None = None
        self.started_at = time.monotonic()
        self.phase_since = self.started_at
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.finished = False

    # -- control ---------------------------------------------------------------------------------

    def start(self) -> None:
        t = threading.Thread(target=self._run, name="incident", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self.finished = True

    def _enter(self, phase: str) -> None:
        self.phase = phase
        self.phase_since = time.monotonic()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "phase": self.phase, "error": self.error, "assignment_id": self.assignment_id, "run_id": self.run_id,
            "job_id": self.job_id, "runner_id": self.runner_id,
            "elapsed_seconds": round(now - self.started_at, 1),
            "phase_seconds": round(now - self.phase_since, 1),
            "step_result_id": self.step_result_id, "blocker_pid": self.blocker_pid,
            "waiter_pids": self.waiter_pids, "deaf_runner": self.deaf_runner,
            "bystander_assignments": self.bystander_assignments, "bystander_jobs": self.bystander_jobs,
        }

    def wait_for_phase(self, phase: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error:
                raise RuntimeError(f"incident scenario failed: {self.error}")
            if self.phase == phase:
                return self.status()
            time.sleep(0.05)
        raise TimeoutError(f"incident did not reach phase {phase!r} within {timeout:.0f}s (at {self.phase!r})")

    # -- the scenario ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with app_connect(self.sim.config.dsn, "autotest-web/incident-setup") as conn:
                self._enter("preparing")
                self._prepare(conn)
                self._wait_for_big_log(conn)
                self._enter("locking")
                self._start_stalled_request()
                self._start_queued_requests()
                self._enter("starving")
                self._starve(conn)
                self._enter("outage")
        except Exception as exc:  # reported through /health (broker screen, broker-status); the simulator keeps serving
            self.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            self._enter("failed")

    def _prepare(self, conn: psycopg.Connection) -> None:
        self.assignment_id = create_assignment(conn, INCIDENT_ASSIGNMENT, works=self.works, steps=2,
                                               output_bytes=self.output_bytes, chunk_bytes=self.chunk_bytes,
                                               chunk_delay=self.chunk_delay)
        self.run_id = create_run(conn, self.assignment_id)
        # A runner of its own, so the job never queues behind busy runners. Registered and claimed
        # in one transaction: the dispatcher cannot hand the job elsewhere in between, and the
        # claim is the ordinary one (pause fence, pause check inside the statement).
        runner = self.sim.spawn_runner(reserved=True)
        self.runner_id = str(runner.id)
        with conn.transaction():
            self.job_id = self.sim.register_job(self.run_id, conn=conn)
            claimed = self.sim.dispatch_once(conn, runners=[runner.id], job_id=self.job_id) if self.job_id else None
        if claimed is None:
            runner.retired = True
            raise RuntimeError(f"the broker could not hand the incident job {self.job_id} to runner "
                               f"{str(runner.id)[:8]} (is the assignment paused?)")

    def _wait_for_big_log(self, conn: psycopg.Connection) -> None:
        timeout = self.build_up_timeout
        # pg_column_size reads the stored size from the TOAST pointer: the body is not read.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            row = conn.execute("""
                SELECT sr.id FROM auto_test_step_result sr
                JOIN "AutoTestResult" r ON r.id = sr.auto_test_result_id
                WHERE r.auto_test_run_id = %s AND sr.state = 'running'
                  AND pg_column_size(sr.log) >= %s
                ORDER BY sr.id LIMIT 1""", (self.run_id, self._stored_threshold())).fetchone()
            if row:
                self.step_result_id = row["id"]
                return
            time.sleep(0.05)
        if self._stop.is_set():
            raise RuntimeError("stopped before the outage built up")
        job = conn.execute("SELECT state::text AS state FROM job WHERE id = %s", (self.job_id,)).fetchone()
        raise TimeoutError(f"no step log of run {self.run_id} reached {self.big_log_bytes / MiB:g} MiB within "
                           f"{timeout:.0f}s (job {self.job_id} is {job['state'] if job else 'gone'}); "
                           f"see broker-sim.log")

    def _stored_threshold(self) -> int:
        # Program output compresses (pglz) to roughly a third; compare stored sizes accordingly.
        return max(1, self.big_log_bytes // 4)

    def _start_stalled_request(self) -> None:
        ready = threading.Event()

        def stalled() -> None:
            try:
                with app_connect(self.sim.config.dsn, "autotest-web/request-stalled") as conn:
                    self.blocker_pid = conn.info.backend_pid
                    conn.execute("BEGIN")
                    # The application's habit: lock the row and read the whole (huge) log.
                    conn.execute("SELECT log FROM auto_test_step_result WHERE id = %s FOR UPDATE",
                                 (self.step_result_id,)).fetchone()
                    conn.execute('SELECT id FROM "AutoTestRun" WHERE id = %s FOR UPDATE', (self.run_id,))
                    ready.set()
                    # The HTTP request timed out long ago; the transaction stays open (no timeouts).
                    while not self._stop.wait(1.0):
                        if conn.closed or conn.broken:
                            return
                        try:
                            conn.pgconn.consume_input()  # notices a pg_terminate_backend
                        except psycopg.OperationalError:
                            return
                        if conn.pgconn.status != psycopg.pq.ConnStatus.OK:
                            return
            except psycopg.Error:
                return  # terminated by the operator: that is the fix
            finally:
                ready.set()

        t = threading.Thread(target=stalled, name="incident-stalled-request", daemon=True)
        t.start()
        self._threads.append(t)
        ready.wait(60)

    def _start_queued_requests(self) -> None:
        for i in range(self.waiters):
            started = threading.Event()

            def queued(n: int = i, started: threading.Event = started) -> None:
                try:
                    with app_connect(self.sim.config.dsn, f"autotest-web/request-{n + 1}") as conn:
                        self.waiter_pids.append(conn.info.backend_pid)
                        started.set()
                        with conn.transaction():
                            conn.execute("SELECT log FROM auto_test_step_result WHERE id = %s FOR UPDATE",
                                         (self.step_result_id,)).fetchone()
                except psycopg.Error:
                    return
                finally:
                    started.set()

            t = threading.Thread(target=queued, name=f"incident-request-{i + 1}", daemon=True)
            t.start()
            self._threads.append(t)
            started.wait(10)

    def _starve(self, conn: psycopg.Connection) -> None:
        sim = self.sim
        sim.faults.dispatcher_wedged = True
        time.sleep(sim.config.poll_interval * 4)  # let an in-flight dispatch finish
        # Bystander assignments: existing ones with an AutoTest and works, else made up.
        rows = conn.execute("""
            SELECT a.id FROM "Assignment" a
            WHERE a.auto_test_id IS NOT NULL AND a.id <> %s
              AND EXISTS (SELECT 1 FROM "Work" w WHERE w."Assignment_id" = a.id AND NOT w.deleted)
              AND EXISTS (SELECT 1 FROM "AutoTestStep" s JOIN "AutoTestSuite" su ON su.id = s.auto_test_suite_id
                          JOIN "AutoTestSet" se ON se.id = su.auto_test_set_id WHERE se.auto_test_id = a.auto_test_id)
            ORDER BY a.id LIMIT %s""", (self.assignment_id, self.bystanders)).fetchall()
        ids = [r["id"] for r in rows]
        for i in range(len(ids), self.bystanders):
            ids.append(create_assignment(conn, f"Bystander lab {i + 1}", works=self.bystander_results, steps=2))
        self.bystander_assignments = ids
        jobs = []
        for aid in ids:
            run = create_run(conn, aid, max_results=self.bystander_results)
            job = sim.register_job(run, conn=conn)
            if job is not None:
                jobs.append(job)
        self.bystander_jobs = jobs
        # A runner VM that was handed a job and never came up (a fresh one: on a busy demo no
        # pool runner is free to play it).
        if jobs:
            deaf = sim.spawn_runner(deaf=True, reserved=True)
            self.deaf_runner = str(deaf.id)
            sim.dispatch_once(conn, runners=[deaf.id], job_id=jobs[0])
        # Runners sitting idle while jobs wait: the autoscaler adds some if all are busy.
        idle = conn.execute("SELECT count(*) AS n FROM runner WHERE state = 'started' AND job_id IS NULL "
                            "AND id = ANY(%s::uuid[])", (sim.dispatchable_runner_ids(),)).fetchone()["n"]
        for _ in range(max(0, self.idle_runners - idle)):
            sim.spawn_runner()

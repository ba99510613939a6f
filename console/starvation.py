"""Broker starvation: find jobs that should be running and are not, say why, and get them moving.

Four kinds of finding (each carries a sentence saying why it counts as starving):

- ``waiting_idle``: a job ``waiting_for_runner`` longer than ``waiting_after`` while runners sit idle
  (state ``started`` with no job) -- the dispatcher is not dispatching;
- ``stuck_assigned``: a runner ``assigned`` to a job for longer than ``assigned_grace`` -- it never
  started the job;
- ``no_progress``: a ``started`` job whose results have not changed for ``stalled_after`` although
  its runner's heartbeat is fresh (a heartbeat check alone misses this: the runner process is alive
  but its work is blocked, e.g. on a row lock) -- or whose heartbeat is stale;
- ``not_started``: results ``not_started`` for longer than ``not_started_after`` on an assignment
  that is not paused, whose run has no live job (none registered, or finished too early).

Detection reads only: no row locks, and progress is judged by ``updated_at`` columns, never by a
log body. Recovery goes through the broker's admin API (``recover_via_broker``) or, when the broker
is down, directly in the broker's tables (``recover_via_db``): one short transaction per finding,
rows locked job first then runner (the broker's own order) with ``FOR UPDATE SKIP LOCKED``, so atc
never waits on the broker and cannot deadlock with it; a row the broker holds is reported as busy
and left for the next attempt. Afterwards ``watch_recovery`` polls for a while and reports whether
the affected jobs got runners and their results moved.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Callable, Sequence

import psycopg

from .audit import audited, require_writable
from .config import Settings
from .db import Database, translate_error
from .errors import AtcError
from .pauses import CURRENT_PAUSES_CTE
from .text import human_duration

KINDS = ("waiting_idle", "stuck_assigned", "no_progress", "not_started")

# A job's assignment id, tolerating metadata that is not what we expect (never a cast error).
_JOB_ASSIGNMENT = "(CASE WHEN {j}.job_metadata->>'assignment_id' ~ '^[0-9]+$' THEN ({j}.job_metadata->>'assignment_id')::int END)"
_JOB_RUN = "(CASE WHEN {j}.job_metadata->>'run_id' ~ '^[0-9]+$' THEN ({j}.job_metadata->>'run_id')::int END)"


@dataclass(frozen=True)
class Thresholds:
    """Seconds. Defaults suit production; the demo and tests pass shorter ones."""

    waiting_after: float = 120.0
    assigned_grace: float = 60.0
    stalled_after: float = 120.0
    heartbeat_fresh: float = 30.0
    not_started_after: float = 600.0

    def params(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Thresholds":
        b = settings.broker
        return cls(waiting_after=b.waiting_after, assigned_grace=b.assigned_grace, stalled_after=b.stalled_after,
                   heartbeat_fresh=b.heartbeat_fresh, not_started_after=b.not_started_after)


# -- detection queries ---------------------------------------------------------------------------
# All are plain reads (no FOR UPDATE/SHARE): they never wait on the broker's or the application's
# row locks. None selects auto_test_step_result.log.

# Jobs waiting for a runner too long while idle runners exist; paused assignments excluded
# (their jobs are meant to wait).
FIND_WAITING_IDLE = f"""
WITH {CURRENT_PAUSES_CTE},
idle AS (SELECT count(*) AS n FROM runner WHERE state = 'started' AND job_id IS NULL)
SELECT 'waiting_idle' AS kind, j.id AS job_id, NULL::uuid AS runner_id,
       {_JOB_RUN.format(j='j')} AS run_id, {_JOB_ASSIGNMENT.format(j='j')} AS assignment_id,
       extract(epoch FROM now() - j.updated_at)::float8 AS age_seconds, idle.n AS idle_runners
FROM job j CROSS JOIN idle
WHERE j.state = 'waiting_for_runner'
  AND j.updated_at < now() - make_interval(secs => %(waiting_after)s)
  AND idle.n > 0
  AND NOT EXISTS (SELECT 1 FROM current_pause p WHERE p.assignment_id = {_JOB_ASSIGNMENT.format(j='j')})
ORDER BY j.updated_at, j.id
LIMIT %(limit)s
"""

# Runners assigned a job but never starting it.
FIND_STUCK_ASSIGNED = f"""
SELECT 'stuck_assigned' AS kind, r.job_id, r.id AS runner_id,
       {_JOB_RUN.format(j='j')} AS run_id, {_JOB_ASSIGNMENT.format(j='j')} AS assignment_id,
       extract(epoch FROM now() - r.updated_at)::float8 AS age_seconds
FROM runner r
LEFT JOIN job j ON j.id = r.job_id
WHERE r.state = 'assigned' AND r.updated_at < now() - make_interval(secs => %(assigned_grace)s)
ORDER BY r.updated_at, r.id
LIMIT %(limit)s
"""

# Started jobs whose run shows no progress. Progress = the newest updated_at among the run's
# results and their step results (index ix_auto_test_result_run / ..._result), or the moment the
# runner took the job. The heartbeat comes from "AutoTestRunner" (same uuid as the broker runner).
FIND_NO_PROGRESS = f"""
SELECT 'no_progress' AS kind, j.id AS job_id, r.id AS runner_id,
       {_JOB_RUN.format(j='j')} AS run_id, {_JOB_ASSIGNMENT.format(j='j')} AS assignment_id,
       extract(epoch FROM now() - progress.at)::float8 AS age_seconds,
       extract(epoch FROM now() - atr.last_heartbeat)::float8 AS heartbeat_age
FROM job j
JOIN runner r ON r.job_id = j.id AND r.state = 'running'
LEFT JOIN "AutoTestRunner" atr ON atr.id = r.id
CROSS JOIN LATERAL (
    SELECT greatest(r.updated_at,
                    (SELECT max(res.updated_at) FROM "AutoTestResult" res
                      WHERE res.auto_test_run_id = {_JOB_RUN.format(j='j')}),
                    (SELECT max(sr.updated_at) FROM "AutoTestResult" res
                       JOIN auto_test_step_result sr ON sr.auto_test_result_id = res.id
                      WHERE res.auto_test_run_id = {_JOB_RUN.format(j='j')}
                        AND res.state = 'running')) AS at
) progress
WHERE j.state = 'started'
  AND progress.at < now() - make_interval(secs => %(stalled_after)s)
ORDER BY progress.at, j.id
LIMIT %(limit)s
"""

# Runs with results not started for long, on unpaused assignments, whose job is missing or
# finished (a waiting or started job is covered by the kinds above).
FIND_NOT_STARTED = f"""
WITH {CURRENT_PAUSES_CTE},
pending AS (
    SELECT res.auto_test_run_id AS run_id, w."Assignment_id" AS assignment_id,
           count(*) AS results, min(res.created_at) AS oldest
    FROM "AutoTestResult" res
    JOIN "Work" w ON w.id = res.work_id AND NOT w.deleted
    WHERE res.state = 'not_started'
      AND res.created_at < now() - make_interval(secs => %(not_started_after)s)
    GROUP BY res.auto_test_run_id, w."Assignment_id"
)
SELECT 'not_started' AS kind, latest.id AS job_id, NULL::uuid AS runner_id, p.run_id, p.assignment_id,
       extract(epoch FROM now() - p.oldest)::float8 AS age_seconds, p.results,
       latest.state::text AS job_state
FROM pending p
LEFT JOIN LATERAL (
    SELECT j.id, j.state FROM job j
    WHERE j.job_metadata->>'run_id' = p.run_id::text
    ORDER BY j.id DESC LIMIT 1
) latest ON true
WHERE NOT EXISTS (SELECT 1 FROM current_pause cp WHERE cp.assignment_id = p.assignment_id)
  AND (latest.id IS NULL OR latest.state = 'finished')
ORDER BY p.oldest
LIMIT %(limit)s
"""

# Counts for the broker screen header. Plain reads.
BROKER_COUNTS = """
SELECT (SELECT count(*) FROM job WHERE state = 'waiting_for_runner') AS jobs_waiting,
       (SELECT count(*) FROM job WHERE state = 'started') AS jobs_started,
       (SELECT count(*) FROM runner WHERE state = 'started' AND job_id IS NULL) AS runners_idle,
       (SELECT count(*) FROM runner WHERE state = 'assigned') AS runners_assigned,
       (SELECT count(*) FROM runner WHERE state = 'running') AS runners_running
"""

# Jobs and runners straight from the broker's tables (the screen's fallback when the broker API
# is down). Plain reads; job_metadata is small JSON, not a log.
LIST_JOBS = f"""
SELECT j.id, j.state::text AS state, j.remote_id, j.job_metadata, j.wanted_runners, j.created_at, j.updated_at,
       {_JOB_ASSIGNMENT.format(j='j')} AS assignment_id, {_JOB_RUN.format(j='j')} AS run_id
FROM job j
WHERE j.state <> 'finished' OR j.updated_at > now() - interval '10 minutes'
ORDER BY j.state, j.id DESC
LIMIT %(limit)s
"""
LIST_RUNNERS = """
SELECT r.id, r.ipaddr, r.type, r.state::text AS state, r.job_id, r.created_at, r.updated_at,
       atr.last_heartbeat
FROM runner r LEFT JOIN "AutoTestRunner" atr ON atr.id = r.id
WHERE r.state NOT IN ('cleaned', 'not_running') OR r.updated_at > now() - interval '10 minutes'
ORDER BY r.created_at, r.id
LIMIT %(limit)s
"""


@dataclass
class Finding:
    kind: str
    why: str
    job_id: int | None = None
    runner_id: str | None = None
    run_id: int | None = None
    assignment_id: int | None = None
    age_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["age"] = human_duration(self.age_seconds)
        return d


def _why(row: dict[str, Any], th: Thresholds) -> str:
    kind = row["kind"]
    age = human_duration(row["age_seconds"])
    where = f"assignment {row['assignment_id']}" if row.get("assignment_id") is not None else "unknown assignment"
    if kind == "waiting_idle":
        return (f"job {row['job_id']} ({where}) has waited {age} for a runner (limit "
                f"{human_duration(th.waiting_after)}) while {row['idle_runners']} runner(s) sit idle: "
                f"the dispatcher is not dispatching")
    if kind == "stuck_assigned":
        return (f"runner {row['runner_id']} was assigned job {row['job_id']} ({where}) {age} ago and never "
                f"started it (grace {human_duration(th.assigned_grace)})")
    if kind == "no_progress":
        hb = row.get("heartbeat_age")
        if hb is None:
            beat = "no heartbeat recorded"
        elif hb <= th.heartbeat_fresh:
            beat = f"although its heartbeat is fresh ({human_duration(hb)} old): the runner is alive but its work is blocked"
        else:
            beat = f"and its heartbeat is stale ({human_duration(hb)} old): the runner is gone"
        return (f"job {row['job_id']} ({where}) on runner {row['runner_id']}: no result changed for {age} "
                f"(limit {human_duration(th.stalled_after)}) {beat}")
    if kind == "not_started":
        job = (f"its last job {row['job_id']} is finished" if row.get("job_id") is not None
               else "no job is registered for the run")
        return (f"{row['results']} result(s) of run {row['run_id']} ({where}, not paused) not started for {age} "
                f"(limit {human_duration(th.not_started_after)}) and {job}")
    return kind  # pragma: no cover


def find_starvation(db: Database, thresholds: Thresholds | None = None, *, limit: int = 200) -> list[Finding]:
    """Every starving job/runner/run now, oldest first within each kind."""
    th = thresholds or Thresholds()
    params = {**th.params(), "limit": limit}
    findings: list[Finding] = []
    for query in (FIND_WAITING_IDLE, FIND_STUCK_ASSIGNED, FIND_NO_PROGRESS, FIND_NOT_STARTED):
        for row in db.fetch(query, params, what="starvation check"):
            extra = {k: v for k, v in row.items()
                     if k not in ("kind", "job_id", "runner_id", "run_id", "assignment_id", "age_seconds")}
            findings.append(Finding(
                kind=row["kind"], why=_why(row, th), job_id=row["job_id"],
                runner_id=str(row["runner_id"]) if row["runner_id"] else None,
                run_id=row["run_id"], assignment_id=row["assignment_id"],
                age_seconds=float(row["age_seconds"] or 0), extra=extra,
            ))
    return findings


def broker_counts(db: Database) -> dict[str, int]:
    return db.fetch_one(BROKER_COUNTS, what="broker counts") or {}


def list_jobs(db: Database, limit: int = 200) -> list[dict[str, Any]]:
    return db.fetch(LIST_JOBS, {"limit": limit}, what="job listing")


def list_runners(db: Database, limit: int = 200) -> list[dict[str, Any]]:
    return db.fetch(LIST_RUNNERS, {"limit": limit}, what="runner listing")


# -- recovery in the database (broker down) ------------------------------------------------------
# Each statement below runs inside a short transaction of its own. Row locks are taken job first,
# then runner, always with SKIP LOCKED: a row the broker holds is skipped (reported "busy"), never
# waited for, so atc cannot queue behind the broker or form a deadlock cycle with it.

# Lock a started job (skip if the broker holds it).
LOCK_STARTED_JOB = "SELECT id FROM job WHERE id = %s AND state = 'started' FOR UPDATE SKIP LOCKED"
# Lock the runner still holding that job (skip if the broker holds it).
LOCK_RUNNER_OF_JOB = """
SELECT id FROM runner WHERE id = %s AND job_id = %s AND state IN ('assigned', 'running')
FOR UPDATE SKIP LOCKED
"""
# Retire the runner (the broker cleans and replaces it) and put the job back in the queue.
RELEASE_RUNNER = "UPDATE runner SET state = 'cleaning', job_id = NULL, updated_at = now() WHERE id = %s"
REQUEUE_JOB = "UPDATE job SET state = 'waiting_for_runner', updated_at = now() WHERE id = %s"

# Hand a waiting job to an idle runner, exactly as a pause-honouring broker claims: pause check
# inside the statement, job row then runner row, both SKIP LOCKED.
DISPATCH_JOB = f"""
WITH {CURRENT_PAUSES_CTE},
candidate_job AS (
    SELECT j.id FROM job j
    WHERE j.id = %(job_id)s AND j.state = 'waiting_for_runner'
      AND NOT EXISTS (SELECT 1 FROM current_pause p WHERE p.assignment_id = {_JOB_ASSIGNMENT.format(j='j')})
    FOR UPDATE SKIP LOCKED
),
candidate_runner AS (
    SELECT r.id FROM runner r
    WHERE r.state = 'started' AND r.job_id IS NULL AND EXISTS (SELECT 1 FROM candidate_job)
    ORDER BY r.updated_at, r.id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
),
claimed AS (
    UPDATE job SET state = 'started', updated_at = now()
    FROM candidate_job c, candidate_runner cr
    WHERE job.id = c.id
    RETURNING job.id
)
UPDATE runner SET state = 'assigned', job_id = claimed.id, updated_at = now()
FROM claimed, candidate_runner cr
WHERE runner.id = cr.id
RETURNING runner.id AS runner_id, claimed.id AS job_id
"""

# Take the run's finished job back into the queue (the broker finished it too early).
REQUEUE_FINISHED_JOB = """
UPDATE job SET state = 'waiting_for_runner', updated_at = now()
WHERE id = (SELECT id FROM job WHERE id = %s AND state = 'finished' FOR UPDATE SKIP LOCKED)
RETURNING id
"""

# Register a job for a run that has none, shaped like the broker's own rows (cg_url copied from
# the newest job; remote_id is the run's job uuid, or the run id). ON CONFLICT DO NOTHING: if the
# broker registered it meanwhile, nothing happens and nothing waits.
REGISTER_JOB_FOR_RUN = """
INSERT INTO job (state, cg_url, remote_id, job_metadata, wanted_runners)
SELECT 'waiting_for_runner', (SELECT cg_url FROM job ORDER BY id DESC LIMIT 1),
       coalesce(run.job_id::text, 'run-' || run.id),
       jsonb_build_object('assignment_id', %(assignment_id)s::int, 'run_id', run.id,
                          'auto_test_id', run.auto_test_id, 'registered_by', 'atc recover-starvation'),
       1
FROM "AutoTestRun" run
WHERE run.id = %(run_id)s AND EXISTS (SELECT 1 FROM job)
ON CONFLICT (cg_url, remote_id) DO NOTHING
RETURNING id
"""


@dataclass
class RecoveryReport:
    via: str
    dry_run: bool
    findings: list[Finding]
    released: list[dict[str, Any]] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)
    dispatched: list[dict[str, Any]] = field(default_factory=list)
    registered: list[int] = field(default_factory=list)
    busy: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    trigger_at: datetime | None = None
    watch: dict[str, Any] | None = None

    def affected_jobs(self) -> list[int]:
        ids = list(self.requeued) + list(self.registered) + [d["job_id"] for d in self.dispatched]
        ids += [r["job_id"] for r in self.released if r.get("job_id") is not None]
        ids += [f.job_id for f in self.findings if f.job_id is not None and f.kind == "waiting_idle"]
        return sorted({int(i) for i in ids})

    def as_dict(self) -> dict[str, Any]:
        return {
            "via": self.via, "dry_run": self.dry_run,
            "findings": [f.as_dict() for f in self.findings],
            "released": self.released, "requeued": self.requeued, "dispatched": self.dispatched,
            "registered": self.registered, "busy": self.busy, "notes": self.notes,
            "trigger_at": self.trigger_at, "watch": self.watch,
        }


def _now(db: Database) -> datetime:
    row = db.fetch_one("SELECT clock_timestamp() AS now", what="clock")
    return row["now"] if row else datetime.now().astimezone()


def recover_via_db(db: Database, findings: Sequence[Finding], *, dry_run: bool = False) -> RecoveryReport:
    """Recover in the broker's tables without the broker (see module doc for the locking)."""
    report = RecoveryReport(via="db", dry_run=dry_run, findings=list(findings))
    # Order: releases first (they free runners), then re-registrations, then dispatch onto the
    # idle runners, so one pass gets work flowing. Within a kind, by job id (ordered locking).
    by_kind = {k: sorted((f for f in findings if f.kind == k), key=lambda f: (f.job_id or 0)) for k in KINDS}
    report.trigger_at = _now(db)
    if dry_run:
        report.notes.append("dry run: nothing changed")
        for f in by_kind["stuck_assigned"] + by_kind["no_progress"]:
            report.released.append({"runner_id": f.runner_id, "job_id": f.job_id, "kind": f.kind, "would": True})
        for f in by_kind["not_started"]:
            report.registered.append(f.run_id) if f.job_id is None else report.requeued.append(f.job_id)
        for f in by_kind["waiting_idle"]:
            report.dispatched.append({"job_id": f.job_id, "runner_id": None, "would": True})
        return report
    try:
        with db.connection() as conn:
            for f in by_kind["stuck_assigned"] + by_kind["no_progress"]:
                if f.job_id is None or f.runner_id is None:
                    continue
                with conn.transaction():
                    job = conn.execute(LOCK_STARTED_JOB, (f.job_id,)).fetchone()
                    runner = conn.execute(LOCK_RUNNER_OF_JOB, (f.runner_id, f.job_id)).fetchone() if job else None
                    if not job or not runner:
                        report.busy.append({"job_id": f.job_id, "runner_id": f.runner_id,
                                            "why": "row locked by the broker or already changed; left alone"})
                        continue
                    conn.execute(RELEASE_RUNNER, (f.runner_id,))
                    conn.execute(REQUEUE_JOB, (f.job_id,))
                report.released.append({"runner_id": f.runner_id, "job_id": f.job_id, "kind": f.kind})
                report.requeued.append(f.job_id)
            for f in by_kind["not_started"]:
                with conn.transaction():
                    if f.job_id is not None:
                        row = conn.execute(REQUEUE_FINISHED_JOB, (f.job_id,)).fetchone()
                        if row:
                            report.requeued.append(row["id"])
                        else:
                            report.busy.append({"job_id": f.job_id, "why": "job locked or no longer finished"})
                    else:
                        row = conn.execute(REGISTER_JOB_FOR_RUN, {"run_id": f.run_id,
                                                                   "assignment_id": f.assignment_id}).fetchone()
                        if row:
                            report.registered.append(row["id"])
                        else:
                            report.notes.append(f"run {f.run_id}: no job registered (the broker has no jobs to "
                                                f"copy cg_url from, or registered one meanwhile)")
            waiting = [f.job_id for f in by_kind["waiting_idle"]]
            waiting += [j for j in report.requeued + report.registered if j not in waiting]
            for job_id in sorted(set(waiting)):
                with conn.transaction():
                    row = conn.execute(DISPATCH_JOB, {"job_id": job_id}).fetchone()
                if row:
                    report.dispatched.append({"job_id": row["job_id"], "runner_id": str(row["runner_id"])})
    except psycopg.Error as exc:
        raise translate_error(exc, "recovery in the database") from None
    return report


def recover_via_broker(client, db: Database, findings: Sequence[Finding], thresholds: Thresholds, *,
                       dry_run: bool = False) -> RecoveryReport:
    """Ask the broker to recover (it releases, requeues and restarts its dispatcher itself)."""
    report = RecoveryReport(via="broker", dry_run=dry_run, findings=list(findings))
    report.trigger_at = _now(db)
    answer = client.recover(thresholds.params(), dry_run=dry_run)
    report.released = list(answer.get("released", []))
    report.requeued = [int(j) for j in answer.get("requeued", [])]
    report.dispatched = list(answer.get("dispatched", []))
    report.registered = [int(j) for j in answer.get("registered", [])]
    report.notes = [str(n) for n in answer.get("notes", [])]
    if answer.get("dispatcher_restarted"):
        report.notes.append("the broker restarted its dispatcher")
    return report


# Progress of given jobs since a moment: does each have a runner, and did its run's results move?
# Plain reads; step results judged by updated_at, never by log.
WATCH_JOBS = f"""
SELECT j.id AS job_id, j.state::text AS state, {_JOB_RUN.format(j='j')} AS run_id,
       (SELECT r.id FROM runner r WHERE r.job_id = j.id AND r.state IN ('assigned', 'running') LIMIT 1) AS runner_id,
       (SELECT max(res.updated_at) FROM "AutoTestResult" res WHERE res.auto_test_run_id = {_JOB_RUN.format(j='j')}) AS result_at,
       (SELECT max(sr.updated_at) FROM "AutoTestResult" res
          JOIN auto_test_step_result sr ON sr.auto_test_result_id = res.id
         WHERE res.auto_test_run_id = {_JOB_RUN.format(j='j')} AND res.state <> 'not_started') AS step_at
FROM job j
WHERE j.id = ANY(%(ids)s)
ORDER BY j.id
"""


def watch_recovery(db: Database, report: RecoveryReport, *, seconds: float, poll: float = 0.5,
                   on_tick: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Poll for ``seconds`` (stops early once every job has a runner and moved). Returns a summary."""
    ids = report.affected_jobs()
    since = report.trigger_at
    started = time.monotonic()
    first_progress: float | None = None
    state: dict[int, dict[str, Any]] = {}
    while True:
        rows = db.fetch(WATCH_JOBS, {"ids": ids}, what="recovery watch") if ids else []
        elapsed = time.monotonic() - started
        for row in rows:
            moved_at = max([t for t in (row["result_at"], row["step_at"]) if t is not None], default=None)
            moved = bool(since and moved_at and moved_at > since)
            got_runner = row["runner_id"] is not None or row["state"] == "finished"
            prev = state.get(row["job_id"], {})
            state[row["job_id"]] = {
                "job_id": row["job_id"], "state": row["state"], "run_id": row["run_id"],
                "got_runner": got_runner or prev.get("got_runner", False),
                "results_moved": moved or prev.get("results_moved", False),
            }
            if moved and first_progress is None:
                first_progress = elapsed
        summary = {
            "watched_seconds": round(elapsed, 2),
            "jobs": list(state.values()),
            "all_got_runners": bool(state) and all(s["got_runner"] for s in state.values()),
            "results_moved": any(s["results_moved"] for s in state.values()),
            "first_progress_after_seconds": round(first_progress, 3) if first_progress is not None else None,
        }
        if on_tick:
            on_tick(summary)
        done = bool(state) and all(s["got_runner"] and s["results_moved"] for s in state.values())
        if done or elapsed >= seconds or not ids:
            summary["flowing"] = summary["results_moved"]
            return summary
        time.sleep(poll)


def recover_starvation(db: Database, settings: Settings, *, via: str = "broker", dry_run: bool = False,
                       thresholds: Thresholds | None = None, watch_seconds: float = 0.0, client=None,
                       reason: str = "", on_tick: Callable[[dict[str, Any]], None] | None = None,
                       watch_poll: float = 0.5) -> RecoveryReport:
    """Detect, recover (audited unless a dry run), then watch. ``via`` is 'broker' or 'db'."""
    if via not in ("broker", "db"):
        raise AtcError(f"--via must be 'broker' or 'db', not {via!r}")
    th = thresholds or Thresholds.from_settings(settings)
    findings = find_starvation(db, th)
    if dry_run:
        if via == "broker":
            from .broker import BrokerClient

            client = client or BrokerClient.from_settings(settings)
            return recover_via_broker(client, db, findings, th, dry_run=True)
        return recover_via_db(db, findings, dry_run=True)
    require_writable(settings, "recover-starvation")
    targets = [{"kind": f.kind, "job": f.job_id, "runner": f.runner_id, "run": f.run_id} for f in findings]
    with audited(db, settings, "recover-starvation", targets, reason=reason or f"via {via}") as entry:
        if via == "broker":
            from .broker import BrokerClient

            client = client or BrokerClient.from_settings(settings)
            report = recover_via_broker(client, db, findings, th)
        else:
            report = recover_via_db(db, findings)
        if watch_seconds > 0:
            report.watch = watch_recovery(db, report, seconds=watch_seconds, poll=watch_poll, on_tick=on_tick)
        entry.details = {k: v for k, v in report.as_dict().items() if k != "findings"}
        entry.outcome = "ok" if not report.busy else f"ok, {len(report.busy)} busy row(s) left alone"
        if report.watch is not None and not report.watch.get("flowing"):
            entry.outcome += "; no progress seen while watching"
    return report

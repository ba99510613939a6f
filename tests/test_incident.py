"""The outage replay: the simulator produces it, atc's operations fix it.

The first test performs the walkthrough with atc's console functions; the pilot test performs it
through the TUI (lock screen, assignments screen, broker screen) exactly as docs/incident.md says.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from broker_support import app_conn as _conn, wait_for as _wait

from console.broker_sim import create_assignment, create_run
from console.db import Database
from console.incident import MiB
from console.locks import take_snapshot
from console.pauses import pause_assignments, paused_map
from console.signals import Signaller
from console.starvation import Thresholds, find_starvation, recover_starvation

FAST = Thresholds(waiting_after=0.5, assigned_grace=0.5, stalled_after=1.0, heartbeat_fresh=10, not_started_after=600)
SMALL_INCIDENT = {"output_bytes": 8 * MiB, "chunk_bytes": 256 * 1024, "chunk_delay": 0.02,
                  "big_log_bytes": MiB, "works": 2, "waiters": 2, "bystanders": 2, "bystander_results": 3}




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


def test_incident_builds_up_on_a_busy_demo(empty_db, start_broker_sim):
    """Like the real demo: every runner holds a long seeded job and more jobs wait. The incident
    must still reach the outage quickly (its job must not queue behind the seeded ones)."""
    with _conn(empty_db) as conn:
        seeded = [create_assignment(conn, f"Seeded lab {i}", works=3, steps=2, output_bytes=200_000,
                                    chunk_bytes=100, chunk_delay=0.2) for i in range(3)]
        for aid in seeded + seeded:
            create_run(conn, aid)
    sim = start_broker_sim(empty_db, runners=3)
    with _conn(empty_db) as conn:
        _wait(lambda: conn.execute("SELECT count(*) AS n FROM runner WHERE state = 'running'").fetchone()["n"] == 3
              and conn.execute("SELECT count(*) AS n FROM job WHERE state = 'waiting_for_runner'").fetchone()["n"] >= 3,
              what="all runners busy with seeded jobs, more waiting")
    started = time.monotonic()
    sim.start_incident(**SMALL_INCIDENT)
    status = sim.incident.wait_for_phase("outage", timeout=30)
    assert time.monotonic() - started < 30
    db = Database(empty_db)
    kinds = _wait(lambda: {f.kind for f in find_starvation(db, FAST)} >= {"waiting_idle", "stuck_assigned", "no_progress"}
                  and {f.kind for f in find_starvation(db, FAST)}, what="the broker to starve")
    assert kinds >= {"waiting_idle", "stuck_assigned", "no_progress"}
    stalled = [f for f in find_starvation(db, FAST) if f.kind == "no_progress"]
    assert status["job_id"] in [f.job_id for f in stalled]  # the incident's runner hangs on the blocker
    db.close()
    # The seeded runners were not taken away: still on their own jobs.
    runners = {str(r["id"]): r for r in sim.runners()}
    assert sum(1 for r in runners.values() if r["state"] == "running" and r["job_id"] != status["job_id"]) >= 3


def test_incident_failure_is_reported(empty_db, start_broker_sim, tmp_path, capsys):
    """A replay that cannot build up says so: phase failed with a one-line reason, in /health and
    in `atc broker-status` (exit status 1, message on stderr)."""
    from console.cli import main

    sim = start_broker_sim(empty_db, runners=1)
    # Its steps print nothing, so no log ever grows big: the replay must fail, visibly.
    sim.start_incident(**{**SMALL_INCIDENT, "output_bytes": 10, "chunk_bytes": 10, "build_up_timeout": 1.0})
    with pytest.raises(RuntimeError, match="no step log"):
        sim.incident.wait_for_phase("outage", timeout=20)
    cfg = tmp_path / "atc.toml"
    cfg.write_text(f'[database]\ndsn = "{empty_db.database.dsn}"\n[broker]\nurl = "{sim.url}"\n')
    assert main(["--config", str(cfg), "broker-status"]) == 1
    assert "incident replay FAILED: TimeoutError: no step log" in capsys.readouterr().err


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


# -- the walkthrough, through the TUI --------------------------------------------------------------

SIZE = (150, 44)


async def _until(pilot, predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.05)
        try:
            if predicate():
                return
        except Exception:
            pass
    raise AssertionError(f"timed out waiting for {what}")


async def _type_into_focused_input(pilot, app, text: str) -> None:
    """Fill the focused Input at once: pressing 30 keys one by one while three live screens
    refresh costs minutes under the pilot; typing itself is covered by the app tests."""
    from textual.widgets import Input

    assert isinstance(app.focused, Input), app.focused
    app.focused.value = text
    await pilot.pause(0.05)


def _record(app, name: str) -> None:
    """SVG screenshots in sequence, when ATC_RECORD_DIR is set (docs/incident/ holds a recording)."""
    import os

    directory = os.environ.get("ATC_RECORD_DIR")
    if directory:
        app.save_screenshot(filename=f"{name}.svg", path=directory)


async def test_pilot_incident_walkthrough(empty_db, start_broker_sim):
    from screens.app import AtcApp
    from screens.broker import BrokerScreen
    from screens.browse import AssignmentsScreen
    from screens.locks import LocksScreen
    from screens.widgets import ConfirmModal, PagedTable, ReasonModal

    sim, status = start_incident(empty_db, start_broker_sim)
    settings = replace(
        empty_db,
        broker=replace(empty_db.broker, url=sim.url, waiting_after=0.5, assigned_grace=0.5, stalled_after=1.0,
                       heartbeat_fresh=10.0, recovery_watch=20.0),
        ui=replace(empty_db.ui, refresh_interval=0.5),
    )
    incident_aid = status["assignment_id"]
    db = Database(settings)
    app = AtcApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        # 0. The broker screen shows the broker starving, each finding with its reason.
        await pilot.press("6")
        await _until(pilot, lambda: isinstance(app.screen, BrokerScreen)
                     and {f.kind for f in app.screen.data.get("findings", [])} >= {"waiting_idle", "stuck_assigned", "no_progress"},
                     what="starvation on the broker screen")
        _record(app, "01-broker-starving")

        # 1. Find the root blocker on the lock screen.
        await pilot.press("2")
        await _until(pilot, lambda: isinstance(app.screen, LocksScreen) and app.screen.snapshot is not None
                     and status["blocker_pid"] in app.screen.snapshot.blocker_pids, what="the lock tree")
        locks = app.screen
        root_key = next(k for k in locks.row_keys if locks.rows_by_key[k].session.pid == status["blocker_pid"])
        locks.tree.move_cursor(row=locks.row_keys.index(root_key))
        await pilot.pause(0.1)
        root = locks.current_session()
        assert root.state == "idle in transaction" and "request-stalled" in root.application_name
        _record(app, "02-locks-root-blocker")

        # 2. Pause the incident assignment from the assignments screen (confirm, then reason).
        await pilot.press("1")
        await _until(pilot, lambda: isinstance(app.screen, AssignmentsScreen) and app.screen.token is None
                     and app.screen.query_one(PagedTable).row_count > 0, what="assignments")
        await pilot.press("slash")
        await _type_into_focused_input(pilot, app, "Incident")
        await pilot.press("enter")
        await _until(pilot, lambda: app.screen.token is None and app.screen.query_one(PagedTable).row_count == 1
                     and app.screen.query_one(PagedTable).current_row()["id"] == incident_aid, what="filtered list")
        assert app.screen.query_one(PagedTable).has_focus  # the filter hands focus back to the list
        await pilot.pause(0.05)
        await pilot.press("p")
        await _until(pilot, lambda: isinstance(app.screen, ConfirmModal), what="confirmation")
        _record(app, "03-pause-confirm")
        await pilot.press("y")
        await _until(pilot, lambda: isinstance(app.screen, ReasonModal), what="reason prompt")
        await _type_into_focused_input(pilot, app, "INC-7 huge output --for 2h")
        await pilot.press("enter")
        await _until(pilot, lambda: incident_aid in paused_map(db), what="the pause")
        pause = paused_map(db)[incident_aid]
        assert pause["reason"] == "INC-7 huge output" and pause["expires_at"] is not None
        # atc tells (a notification, never a surprise question) that a runner still works on it;
        # S would stop it. Not needed here: terminating the blocker frees it.
        await _until(pilot, lambda: any("press S" in n.message for n in app._notifications), timeout=10,
                     what="the runners-at-work notification")
        assert not isinstance(app.screen, (ConfirmModal, ReasonModal))
        await _until(pilot, lambda: isinstance(app.screen, AssignmentsScreen) and app.screen.token is None
                     and "⏸" in app.screen.query_one(PagedTable).get_cell(str(incident_aid), "paused").plain,
                     what="the paused mark")
        _record(app, "04-assignment-paused")

        # 3. Terminate the root blocker.
        await pilot.press("2")
        await _until(pilot, lambda: isinstance(app.screen, LocksScreen), what="lock screen")
        locks = app.screen
        await _until(pilot, lambda: any(locks.rows_by_key[k].session.pid == status["blocker_pid"] for k in locks.row_keys),
                     what="the blocker row")
        root_key = next(k for k in locks.row_keys if locks.rows_by_key[k].session.pid == status["blocker_pid"])
        locks.tree.move_cursor(row=locks.row_keys.index(root_key))
        await pilot.pause(0.1)
        await pilot.press("t")
        await _until(pilot, lambda: isinstance(app.screen, ConfirmModal), what="terminate confirmation")
        await pilot.press("y")
        await _until(pilot, lambda: isinstance(app.screen, ReasonModal), what="terminate reason")
        await _type_into_focused_input(pilot, app, "INC-7 root blocker, idle in transaction")
        await pilot.press("enter")
        await _until(pilot, lambda: isinstance(app.screen, LocksScreen) and app.screen.snapshot is not None
                     and status["blocker_pid"] not in app.screen.snapshot.sessions, what="the blocker gone")
        _record(app, "05-blocker-terminated")

        # 4. Trigger recovery on the broker screen and 5. watch work flow again.
        with _conn(settings) as conn:
            since = conn.execute("SELECT clock_timestamp() AS t").fetchone()["t"]
        await pilot.press("6")
        await _until(pilot, lambda: isinstance(app.screen, BrokerScreen), what="broker screen")
        broker_screen = app.screen
        await pilot.press("g")
        await _until(pilot, lambda: isinstance(app.screen, ConfirmModal), what="recovery confirmation")
        await pilot.press("y")
        await _until(pilot, lambda: isinstance(app.screen, ReasonModal), what="recovery reason")
        await _type_into_focused_input(pilot, app, "INC-7 get the broker moving")
        await pilot.press("enter")
        await _until(pilot, lambda: broker_screen.last_recovery is not None, timeout=40, what="the recovery report")
        watch = broker_screen.last_recovery["watch"]
        assert watch["flowing"], broker_screen.last_recovery
        await _until(pilot, lambda: bystander_progress_since(settings, status["bystander_jobs"], since) >= 2,
                     timeout=30, what="bystander results completing")
        await _until(pilot, lambda: not [f for f in broker_screen.data.get("findings", []) if f.kind != "no_progress"],
                     timeout=30, what="the starvation to clear on screen")
        _record(app, "06-work-flowing")
    actions = [e["action"] for e in __import__("console.audit", fromlist=["list_audit"]).list_audit(db)]
    assert {"pause", "terminate", "recover-starvation"} <= set(actions)
    db.close()

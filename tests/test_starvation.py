"""Each kind of starvation is produced with the simulator, detected with a reason, and recovered
through the broker's API and (with the broker down) directly in the database; afterwards work flows."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from broker_support import app_conn as _conn, wait_for as _wait

from console.audit import list_audit
from console.broker_sim import create_assignment, create_run
from console.db import Database
from console.errors import BrokerError
from console.starvation import Thresholds, find_starvation, recover_starvation, recover_via_db

FAST = Thresholds(waiting_after=0.3, assigned_grace=0.3, stalled_after=0.6, heartbeat_fresh=5, not_started_after=0.3)




def _run_done(conn, run_id) -> bool:
    row = conn.execute("""SELECT count(*) FILTER (WHERE state IN ('not_started', 'running')) AS open, count(*) AS total
                          FROM "AutoTestResult" WHERE auto_test_run_id = %s""", (run_id,)).fetchone()
    return row["total"] > 0 and row["open"] == 0


def _kinds(db, th=FAST):
    return {f.kind: f for f in find_starvation(db, th)}


def _settings_for(settings, sim):
    return replace(settings, broker=replace(settings.broker, url=sim.url, read_timeout=5.0, retries=1))


def _recover(db, settings, via):
    return recover_starvation(db, settings, via=via, thresholds=FAST, watch_seconds=10, reason="test")


def _down_if_db(sim, via):
    if via == "db":
        sim.stop_service()


@pytest.mark.parametrize("via", ["broker", "db"])
def test_waiting_while_runners_idle(empty_db, start_broker_sim, via):
    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "Waiting lab", works=2, steps=1)
        run = create_run(conn, aid)
    sim = start_broker_sim(empty_db, register_existing=False)
    sim.wedge_dispatcher()  # the broker stopped dispatching
    job = sim.register_job(run)
    settings = _settings_for(empty_db, sim)
    db = Database(settings)
    finding = _wait(lambda: _kinds(db).get("waiting_idle"), what="waiting_idle finding")
    assert finding.job_id == job and finding.assignment_id == aid
    assert "idle" in finding.why and "dispatcher" in finding.why
    _down_if_db(sim, via)
    report = _recover(db, settings, via)
    assert job in [d["job_id"] for d in report.dispatched]
    assert report.watch["flowing"] and report.watch["all_got_runners"]
    with _conn(empty_db) as conn:
        _wait(lambda: _run_done(conn, run), what="the recovered run to finish")
    assert "waiting_idle" not in _kinds(db)
    audit = list_audit(db, action="recover-starvation")
    assert audit and audit[0]["outcome"].startswith("ok") and audit[0]["reason"] == "test"
    db.close()


@pytest.mark.parametrize("via", ["broker", "db"])
def test_runner_stuck_assigned(empty_db, start_broker_sim, via):
    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "Stuck lab", works=2, steps=1)
        run = create_run(conn, aid)
    sim = start_broker_sim(empty_db, register_existing=False)
    sim.wedge_dispatcher()
    deaf = sim.set_faults({"deaf_runners": 1})["deaf_runners"][0]
    job = sim.register_job(run)
    with _conn(empty_db) as conn:
        assert sim.dispatch_once(conn, runners=[sim.runner(deaf).id])["runner_id"] == deaf
    if via == "broker":
        sim.faults.dispatcher_wedged = False
    settings = _settings_for(empty_db, sim)
    db = Database(settings)
    finding = _wait(lambda: _kinds(db).get("stuck_assigned"), what="stuck_assigned finding")
    assert finding.runner_id == deaf and finding.job_id == job and "never started" in finding.why
    _down_if_db(sim, via)
    report = _recover(db, settings, via)
    assert [r["runner_id"] for r in report.released] == [deaf]
    assert job in report.requeued
    assert report.watch["flowing"]
    with _conn(empty_db) as conn:
        _wait(lambda: _run_done(conn, run), what="the run to finish on another runner")
        assert conn.execute("SELECT state::text AS s FROM runner WHERE id = %s", (deaf,)).fetchone()["s"] in ("cleaning", "cleaned")
    db.close()


@pytest.mark.parametrize("via", ["broker", "db"])
def test_started_job_without_progress_despite_fresh_heartbeat(empty_db, start_broker_sim, via):
    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "Blocked lab", works=2, steps=1, output_bytes=60_000, chunk_bytes=2000,
                                chunk_delay=0.01)
        run = create_run(conn, aid)
    sim = start_broker_sim(empty_db, runners=2)
    settings = _settings_for(empty_db, sim)
    db = Database(settings)
    blocker = _conn(empty_db)
    try:
        with _conn(empty_db) as conn:
            step = _wait(lambda: conn.execute("""SELECT sr.id FROM auto_test_step_result sr
                                                 JOIN "AutoTestResult" r ON r.id = sr.auto_test_result_id
                                                 WHERE r.auto_test_run_id = %s AND sr.state = 'running' LIMIT 1""",
                                              (run,)).fetchone(), what="a running step")
        # Someone else holds the step result row (the outage's stalled request): the runner blocks.
        blocker.execute("BEGIN")
        blocker.execute("SELECT id FROM auto_test_step_result WHERE id = %s FOR UPDATE", (step["id"],))
        finding = _wait(lambda: _kinds(db).get("no_progress"), what="no_progress finding")
        assert "heartbeat is fresh" in finding.why
        assert finding.extra["heartbeat_age"] < 5
        _down_if_db(sim, via)
        report = recover_starvation(db, settings, via=via, thresholds=FAST, watch_seconds=0, reason="test")
        assert [r["runner_id"] for r in report.released] == [finding.runner_id]
        assert finding.job_id in report.requeued
        blocker.execute("ROLLBACK")  # the operator terminates the blocker
        with _conn(empty_db) as conn:
            _wait(lambda: _run_done(conn, run), timeout=30, what="the run to finish after recovery")
            done = conn.execute("""SELECT count(*) AS n FROM auto_test_step_result sr
                                   JOIN "AutoTestResult" r ON r.id = sr.auto_test_result_id
                                   WHERE r.auto_test_run_id = %s AND sr.state IN ('passed', 'failed')
                                     AND length(sr.log->>'stdout') = 60000""", (run,)).fetchone()["n"]
            assert done == 2, "each step's log is complete, written once, after the restart"
    finally:
        blocker.close()
        db.close()


@pytest.mark.parametrize("via", ["broker", "db"])
@pytest.mark.parametrize("job_shape", ["missing", "finished"])
def test_results_not_started_on_unpaused_assignment(empty_db, start_broker_sim, via, job_shape):
    with _conn(empty_db) as conn:
        warm = create_assignment(conn, "Warm lab", works=1, steps=1)
        warm_run = create_run(conn, warm)
        aid = create_assignment(conn, "Forgotten lab", works=2, steps=1)
    sim = start_broker_sim(empty_db, register_existing=False)
    sim.register_job(warm_run)  # the broker has jobs, so its row shape is known
    with _conn(empty_db) as conn:
        _wait(lambda: _run_done(conn, warm_run), what="the warm-up run")
        run = create_run(conn, aid)
        if job_shape == "finished":
            sim.wedge_dispatcher()
            job = sim.register_job(run)
            conn.execute("UPDATE job SET state = 'finished' WHERE id = %s", (job,))  # finished too early
            sim.faults.dispatcher_wedged = False
        conn.execute('UPDATE "AutoTestResult" SET created_at = now() - interval \'1 hour\' WHERE auto_test_run_id = %s',
                     (run,))
    settings = _settings_for(empty_db, sim)
    db = Database(settings)
    finding = _wait(lambda: _kinds(db).get("not_started"), what="not_started finding")
    assert finding.run_id == run and finding.assignment_id == aid and "not paused" in finding.why
    assert ("no job is registered" in finding.why) == (job_shape == "missing")
    _down_if_db(sim, via)
    report = _recover(db, settings, via)
    assert report.registered or report.requeued
    assert report.watch["flowing"]
    with _conn(empty_db) as conn:
        _wait(lambda: _run_done(conn, run), what="the forgotten run to finish")
    db.close()


def test_paused_assignment_is_not_starving(empty_db, start_broker_sim):
    from console.pauses import pause_assignments

    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "Paused lab", works=1, steps=1)
        run = create_run(conn, aid)
        conn.execute('UPDATE "AutoTestResult" SET created_at = now() - interval \'1 hour\'')
    db = Database(empty_db)
    pause_assignments(db, empty_db, [aid], reason="incident")
    sim = start_broker_sim(empty_db, register_existing=False)
    sim.register_job(run)
    time.sleep(0.5)
    assert _kinds(db) == {}
    db.close()


def test_db_recovery_skips_rows_the_broker_holds_and_never_waits(empty_db, start_broker_sim):
    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "Held lab", works=1, steps=1)
        run = create_run(conn, aid)
    sim = start_broker_sim(empty_db, register_existing=False)
    sim.wedge_dispatcher()
    deaf = sim.set_faults({"deaf_runners": 1})["deaf_runners"][0]
    job = sim.register_job(run)
    with _conn(empty_db) as conn:
        sim.dispatch_once(conn, runners=[sim.runner(deaf).id])
    db = Database(empty_db)
    findings = _wait(lambda: [f for f in find_starvation(db, FAST) if f.kind == "stuck_assigned"], what="finding")
    holder = _conn(empty_db)
    try:
        holder.execute("BEGIN")
        holder.execute("SELECT id FROM job WHERE id = %s FOR UPDATE", (job,))  # the broker holds the job row
        started = time.monotonic()
        report = recover_via_db(db, findings)
        assert time.monotonic() - started < 0.5, "recovery never waits for the broker's locks"
        assert report.busy and not report.released
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    report = recover_via_db(db, findings)
    assert [r["runner_id"] for r in report.released] == [deaf]
    db.close()


def test_broker_down_gives_a_clear_error_and_is_audited(empty_db):
    from console.embedded import free_ports

    settings = replace(empty_db, broker=replace(empty_db.broker, url=f"http://127.0.0.1:{free_ports(1)[0]}",
                                                connect_timeout=0.5, retries=1))
    db = Database(settings)
    with pytest.raises(BrokerError, match="refused.*--via db"):
        recover_starvation(db, settings, via="broker", thresholds=FAST)
    assert list_audit(db, action="recover-starvation")[0]["outcome"].startswith("failed: broker at")
    db.close()


def test_dry_run_changes_nothing(empty_db, start_broker_sim):
    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "Dry lab", works=1, steps=1)
        run = create_run(conn, aid)
    sim = start_broker_sim(empty_db, register_existing=False)
    sim.wedge_dispatcher()
    job = sim.register_job(run)
    settings = _settings_for(empty_db, sim)
    db = Database(settings)
    _wait(lambda: _kinds(db).get("waiting_idle"), what="finding")
    for via in ("db", "broker"):
        report = recover_starvation(db, settings, via=via, dry_run=True, thresholds=FAST)
        assert report.dry_run
    with _conn(empty_db) as conn:
        assert conn.execute("SELECT state::text AS s FROM job WHERE id = %s", (job,)).fetchone()["s"] == "waiting_for_runner"
    assert sim.faults.dispatcher_wedged
    assert list_audit(db, action="recover-starvation") == []
    db.close()


def test_cli_starvation_and_recover_via_db(empty_db, start_broker_sim, tmp_path, capsys):
    import json

    from console.cli import main

    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "CLI lab", works=1, steps=1)
        run = create_run(conn, aid)
    sim = start_broker_sim(empty_db, register_existing=False)
    sim.wedge_dispatcher()
    job = sim.register_job(run)
    cfg = tmp_path / "atc.toml"
    cfg.write_text(f'[database]\ndsn = "{empty_db.database.dsn}"\n[broker]\nurl = "{sim.url}"\n')
    time.sleep(0.4)
    assert main(["--config", str(cfg), "starvation", "--waiting-after", "0.2", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["thresholds"]["waiting_after"] == 0.2
    assert [(f["kind"], f["job_id"]) for f in out["findings"]] == [("waiting_idle", job)]
    assert main(["--config", str(cfg), "starvation", "--waiting-after", "2x"]) == 2
    assert "--waiting-after" in capsys.readouterr().err
    sim.stop_service()
    code = main(["--config", str(cfg), "recover-starvation", "--via", "db", "--waiting-after", "0.2",
                 "--watch", "10", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    assert out["via"] == "db" and out["dispatched"][0]["job_id"] == job and out["watch"]["flowing"] is True
    assert main(["--config", str(cfg), "recover-starvation"]) == 2
    assert "refused" in capsys.readouterr().err
    assert main(["--config", str(cfg), "broker-status", "--from-db", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["jobs_started"] + 1 >= 1


# -- the broker screen: live runners first, retired ones behind a toggle; why waiting is not starving --


async def test_pilot_broker_screen_lists_live_runners_first_and_explains_a_full_pool(empty_db):
    import uuid

    from screens.app import AtcApp
    from screens.broker import BrokerScreen
    from textual.widgets import DataTable

    with _conn(empty_db) as conn:
        job = conn.execute("INSERT INTO job (cg_url, remote_id, state) VALUES ('x', 'busy', 'started') RETURNING id"
                           ).fetchone()["id"]
        for i in range(3):
            conn.execute("INSERT INTO job (cg_url, remote_id) VALUES ('x', %s)", (f"waiting-{i}",))
        # Eight retired runners created first (the old order listed them first), then the live ones.
        for i in range(8):
            conn.execute("INSERT INTO runner (id, ipaddr, state, created_at) VALUES (%s, %s, 'cleaned', "
                         "now() - interval '1 hour')", (uuid.uuid4(), f"10.9.0.{i}"))
        live = uuid.uuid4()
        conn.execute("INSERT INTO runner (id, ipaddr, state, job_id) VALUES (%s, '10.0.0.1', 'running', %s)",
                     (live, job))
    settings = replace(empty_db, ui=replace(empty_db.ui, refresh_interval=0.5))
    app = AtcApp(settings)
    async with app.run_test(size=(150, 44)) as pilot:
        await pilot.press("6")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (isinstance(app.screen, BrokerScreen) and app.screen.data):
            await pilot.pause(0.05)
        screen = app.screen
        table = screen.query_one("#runners", DataTable)
        assert [k.value for k in table.rows] == [str(live)], "retired runners hidden by default"
        title = screen.query_one("#runners-title").render().plain
        assert "1 live" in title and "8 retired hidden" in title
        health = screen.query_one("#broker-health").render().plain
        assert "0 starving" in health and "3 waiting, all runners busy" in health
        await pilot.press("a")
        await pilot.pause(0.1)
        keys = [k.value for k in table.rows]
        assert len(keys) == 9 and keys[0] == str(live), "live runners first, retired after"

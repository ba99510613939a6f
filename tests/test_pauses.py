"""Pauses: append-only, fast under other sessions' row locks, expiring, audited, validated."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import timedelta

import psycopg
import pytest
from psycopg.rows import dict_row

from console.audit import list_audit
from console.broker import BrokerClient
from console.broker_sim import create_assignment, create_run
from console.db import Database
from console.errors import AtcError, NotFound, ReadOnlyError
from console.pauses import (PAUSE_FENCE_KEY, current_pauses, parse_duration, pause_assignments, pause_history,
                            paused_map, resume_assignments, runners_of_assignments, stop_runners)


def _conn(settings) -> psycopg.Connection:
    return psycopg.connect(settings.database.dsn, autocommit=True, row_factory=dict_row)


def test_pause_commits_within_100ms_while_the_assignment_rows_are_locked(empty_db, start_broker_sim):
    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "Locked lab", works=3, steps=1)
        create_run(conn, aid)
    start_broker_sim(empty_db)  # the simulator is running, as in production
    db = Database(empty_db)
    holder = _conn(empty_db)
    try:
        holder.execute("BEGIN")
        holder.execute('SELECT id FROM "Assignment" WHERE id = %s FOR UPDATE', (aid,))
        holder.execute('SELECT id FROM "Work" WHERE "Assignment_id" = %s FOR UPDATE', (aid,))
        holder.execute("""SELECT r.id FROM "AutoTestResult" r JOIN "Work" w ON w.id = r.work_id
                          WHERE w."Assignment_id" = %s FOR UPDATE OF r""", (aid,))
        # The naive way waits for the lock (here until lock_timeout = 1s) and fails.
        with pytest.raises(AtcError, match="lock"):
            db.execute('UPDATE "Assignment" SET state = \'hidden\' WHERE id = %s', (aid,), what="naive pause")
        started = time.perf_counter()
        result = pause_assignments(db, empty_db, [aid], reason="big logs", duration=timedelta(hours=2))
        elapsed_ms = (time.perf_counter() - started) * 1000
        assert elapsed_ms < 100, f"pause took {elapsed_ms:.1f} ms under locks"
        assert result.fenced and [e["assignment_id"] for e in result.events] == [aid]
    finally:
        holder.close()
    pause = current_pauses(db)[0]
    assert pause["assignment_id"] == aid and pause["assignment_name"] == "Locked lab"
    assert pause["operator"] == "tester" and pause["reason"] == "big logs"
    assert timedelta(hours=1, minutes=59) < pause["expires_at"] - pause["paused_at"] <= timedelta(hours=2, seconds=1)
    entry = list_audit(db, action="pause")[0]
    assert entry["targets"] == [aid] and entry["reason"] == "big logs" and entry["outcome"] == "ok"
    db.close()


def test_expiry_resume_history_and_idempotence(empty_db):
    with _conn(empty_db) as conn:
        a1 = create_assignment(conn, "A", works=0, steps=1)
        a2 = create_assignment(conn, "B", works=0, steps=1)
    db = Database(empty_db)
    pause_assignments(db, empty_db, [a1, a2], reason="maintenance", duration=timedelta(seconds=1))
    assert set(paused_map(db)) == {a1, a2}
    again = pause_assignments(db, empty_db, [a1], reason="still")
    assert again.unchanged == [a1]
    assert paused_map(db)[a1]["reason"] == "still" and paused_map(db)[a1]["expires_at"] is None
    time.sleep(1.2)
    assert set(paused_map(db)) == {a1}, "a2's pause expired by itself"
    resumed = resume_assignments(db, empty_db, [a1, a2], reason="done")
    assert resumed.unchanged == [a2]
    assert paused_map(db) == {}
    history = pause_history(db, [a1])
    assert [h["paused"] for h in history] == [False, True, True]
    with _conn(empty_db) as conn:  # nothing was ever updated: only inserts
        stats = conn.execute("""SELECT n_tup_upd + n_tup_del AS changed FROM pg_stat_user_tables
                                WHERE relid = 'atc.pause_event'::regclass""").fetchone()
        assert stats["changed"] == 0
        assert conn.execute('SELECT count(*) AS n FROM "Assignment" WHERE state <> \'open\'').fetchone()["n"] == 0
    assert [e["action"] for e in list_audit(db)][:3] == ["resume", "pause", "pause"]
    db.close()


def test_bad_input_is_one_line_and_audited_when_it_fails(empty_db):
    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "A", works=0, steps=1)
    db = Database(empty_db)
    with pytest.raises(NotFound, match="no assignment with id 999"):
        pause_assignments(db, empty_db, [aid, 999], reason="x")
    assert list_audit(db, action="pause")[0]["outcome"].startswith("failed: no assignment with id 999")
    with pytest.raises(AtcError, match="needs a reason"):
        pause_assignments(db, empty_db, [aid], reason="  ")
    with pytest.raises(AtcError, match="not a number"):
        pause_assignments(db, empty_db, ["abc"], reason="x")
    with pytest.raises(ReadOnlyError):
        pause_assignments(db, replace(empty_db, read_only=True), [aid], reason="x")
    assert paused_map(db) == {}
    for bad in ("", "2 weeks", "-1h", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert parse_duration("90") == timedelta(seconds=90)
    assert parse_duration("2h") == timedelta(hours=2)
    assert parse_duration("1.5d") == timedelta(hours=36)
    db.close()


def test_pause_does_not_wait_behind_a_stuck_broker_claim(empty_db):
    """If a broker claim holds the shared fence (stuck), the pause still commits, unfenced, fast."""
    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "A", works=0, steps=1)
    db = Database(empty_db)
    claim = _conn(empty_db)
    try:
        claim.execute("BEGIN")
        claim.execute("SELECT pg_advisory_xact_lock_shared(%s)", (PAUSE_FENCE_KEY,))
        started = time.perf_counter()
        result = pause_assignments(db, empty_db, [aid], reason="incident")
        assert time.perf_counter() - started < 0.8
        assert result.fenced is False
        assert list_audit(db, action="pause")[0]["outcome"].startswith("ok (unfenced")
    finally:
        claim.close()
    assert aid in paused_map(db)
    db.close()


def test_stop_runners_of_paused_assignment_through_the_broker(empty_db, start_broker_sim):
    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "Slow lab", works=2, steps=1, output_bytes=50_000, chunk_bytes=500,
                                chunk_delay=0.01)
        create_run(conn, aid)
    sim = start_broker_sim(empty_db, runners=2)
    settings = replace(empty_db, broker=replace(empty_db.broker, url=sim.url))
    db = Database(settings)
    client = BrokerClient.from_settings(settings)
    deadline = time.monotonic() + 10
    working = []
    while time.monotonic() < deadline and not working:
        working = runners_of_assignments(client, [aid])
        time.sleep(0.05)
    assert len(working) == 1 and working[0]["assignment_id"] == aid
    pause_assignments(db, settings, [aid], reason="runaway output")
    stopped = stop_runners(db, settings, client, [working[0]["id"]], reason="runaway output")
    assert stopped[0]["stopped"] and stopped[0]["requeued_job"]
    assert list_audit(db, action="stop-runners")[0]["targets"] == [working[0]["id"]]
    with _conn(empty_db) as conn:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            state = conn.execute("SELECT state::text AS s FROM job").fetchone()["s"]
            if state == "waiting_for_runner":
                break
            time.sleep(0.05)
        assert state == "waiting_for_runner", "the paused assignment's job is back in the queue, unclaimed"
    client.close()
    db.close()


def _config_file(tmp_path, settings) -> str:
    path = tmp_path / "atc.toml"
    path.write_text(f'operator = "cli-tester"\n[database]\ndsn = "{settings.database.dsn}"\n'
                    f'[broker]\nurl = "{settings.broker.url}"\n')
    return str(path)


def test_cli_pause_resume_pauses_json(empty_db, tmp_path, capsys):
    import json

    from console.cli import main

    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "CLI lab", works=0, steps=1)
    cfg = _config_file(tmp_path, empty_db)
    assert main(["--config", cfg, "pause", str(aid), "--reason", "cli test", "--for", "2h", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["action"] == "pause" and out["events"][0]["assignment_id"] == aid and out["fenced"] is True
    assert main(["--config", cfg, "pauses", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["operator"] == "cli-tester" and rows[0]["reason"] == "cli test" and rows[0]["expires_at"]
    assert main(["--config", cfg, "pause", str(aid), "--reason", "x", "--for", "soon"]) == 2
    assert "--for: 'soon' is not a duration" in capsys.readouterr().err
    assert main(["--config", cfg, "pause", "424242", "--reason", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("atc: no assignment with id 424242") and err.count("\n") == 1
    assert main(["--config", cfg, "resume", str(aid), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "resume"
    assert main(["--config", cfg, "pauses"]) == 0
    assert "no assignment is paused" in capsys.readouterr().out
    assert main(["--config", cfg, "pauses", "--history", "--json"]) == 0
    assert [e["paused"] for e in json.loads(capsys.readouterr().out)] == [False, True]


# -- the assignments screen: pause never pops up a second question; S stops runners on request ---


async def test_pilot_pause_never_asks_about_runners_on_its_own(empty_db, start_broker_sim):
    """A user who keeps typing after a pause (here: u, y and a resume reason) must resume, not
    confirm a surprise 'also stop the runners?' question. Stopping runners is S, explicitly."""
    from screens.app import AtcApp
    from screens.browse import AssignmentsScreen
    from screens.widgets import ConfirmModal, PagedTable, ReasonModal

    with _conn(empty_db) as conn:
        aid = create_assignment(conn, "Typing lab", works=2, steps=1, output_bytes=200_000, chunk_bytes=100,
                                chunk_delay=0.05)
        create_run(conn, aid)
    sim = start_broker_sim(empty_db, runners=1)
    settings = replace(empty_db, broker=replace(empty_db.broker, url=sim.url))
    db = Database(settings)
    client = BrokerClient.from_settings(settings)

    async def until(pilot, predicate, timeout=15.0, what="condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await pilot.pause(0.05)
            if predicate():
                return
        raise AssertionError(f"timed out waiting for {what}")

    app = AtcApp(settings)
    async with app.run_test(size=(150, 44)) as pilot:
        await until(pilot, lambda: runners_of_assignments(client, [aid]), what="a runner at work")
        await pilot.press("1")
        await until(pilot, lambda: isinstance(app.screen, AssignmentsScreen) and app.screen.token is None
                    and app.screen.query_one(PagedTable).row_count > 0, what="assignments")
        assert app.screen.query_one(PagedTable).current_row()["id"] == aid
        await pilot.press("p")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal), what="pause confirmation")
        await pilot.press("y")
        await until(pilot, lambda: isinstance(app.screen, ReasonModal), what="pause reason")
        await pilot.press(*"runaway output", "enter")
        await until(pilot, lambda: aid in paused_map(db), what="the pause")
        # atc tells about the runner, it does not ask.
        await until(pilot, lambda: any("press S" in n.message for n in app._notifications), what="the notification")
        await pilot.pause(0.5)
        assert isinstance(app.screen, AssignmentsScreen)
        # The user goes on typing a resume: it resumes, and no runner is stopped.
        await pilot.press("u")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal), what="resume confirmation")
        assert "Resume" in app.screen.title_text
        await pilot.press("y")
        await until(pilot, lambda: isinstance(app.screen, ReasonModal), what="resume reason")
        await pilot.press(*"false alarm", "enter")
        await until(pilot, lambda: aid not in paused_map(db), what="the resume")
        assert list_audit(db, action="stop-runners") == []
        assert runners_of_assignments(client, [aid]), "the runner still works"
        # Stopping the runners is an explicit action with its own confirmation.
        await until(pilot, lambda: isinstance(app.screen, AssignmentsScreen) and app.screen.token is None, what="list")
        await pilot.press("S")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal), what="stop-runners confirmation")
        assert "Stop the 1 runner(s)" in app.screen.title_text
        await pilot.press("y")
        await until(pilot, lambda: isinstance(app.screen, ReasonModal), what="stop-runners reason")
        await pilot.press(*"runaway output", "enter")
        await until(pilot, lambda: list_audit(db, action="stop-runners"), what="the runner stopped")
    client.close()
    db.close()

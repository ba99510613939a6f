"""Cancel / terminate against real sessions: re-check, per-pid outcome, read-only, audit."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import psycopg
import pytest

from blocking import Application, seed_jobs
from console.audit import list_audit
from console.db import Database
from console.errors import AtcError, ReadOnlyError
from console.locks import take_snapshot
from console.signals import (ALREADY_GONE, PERMISSION_DENIED, SIGNALLED, SignalTarget, Signaller,
                             signal_backends)


@pytest.fixture
def scene(empty_db):
    seed_jobs(empty_db.database.dsn, 5)
    app = Application(empty_db.database.dsn)
    yield empty_db, app
    app.close()


def target_for(db: Database, pid: int) -> SignalTarget:
    snap = take_snapshot(db)
    s = snap.sessions[pid]
    return SignalTarget(pid=s.pid, backend_start=s.backend_start, user=s.user, database=s.database,
                        application_name=s.application_name, state=s.state, query=s.query)


def test_terminate_root_blocker_releases_waiters_and_is_audited(scene):
    settings, app = scene
    holder = app.holder("SELECT id FROM job WHERE id = 1 FOR UPDATE")
    w1 = app.start_blocked("UPDATE job SET state = 'started' WHERE id = 1")
    app.wait_for_waiters(1)
    w2 = app.start_blocked("UPDATE job SET state = 'finished' WHERE id = 1")
    app.wait_for_waiters(2)
    db = Database(settings)
    target = target_for(db, holder.info.backend_pid)
    assert target.state == "idle in transaction"

    report = signal_backends(settings, "terminate", [target], reason="holder idle in transaction for minutes")
    assert [(o.pid, o.outcome, o.exited) for o in report.outcomes] == [(target.pid, SIGNALLED, True)]
    assert w1.finished() and w2.finished()
    assert w1.result.get("ok") and w2.result.get("ok")

    [row] = list_audit(db, action="terminate")
    assert row["operator"] == "tester" and row["db_role"] == "postgres"
    assert row["reason"] == "holder idle in transaction for minutes"
    assert row["outcome"] == "ok"
    assert row["targets"][0]["pid"] == target.pid
    assert datetime.fromisoformat(row["targets"][0]["backend_start"]) == target.backend_start
    assert row["details"]["outcomes"][0]["outcome"] == SIGNALLED
    db.close()


def test_cancel_a_waiter_leaves_the_holder(scene):
    settings, app = scene
    holder = app.holder("SELECT id FROM job WHERE id = 2 FOR UPDATE")
    waiter = app.start_blocked("UPDATE job SET state = 'started' WHERE id = 2")
    app.wait_for_waiters(1)
    signaller = Signaller(settings)
    try:
        [target] = signaller.lookup([waiter.pid])
        assert target.backend_start is not None and "UPDATE job" in target.query
        report = signaller.signal("cancel", [target], reason="test cancel")
    finally:
        signaller.close()
    assert report.outcomes[0].outcome == SIGNALLED
    assert waiter.finished()
    assert isinstance(waiter.result.get("error"), psycopg.errors.QueryCanceled)
    assert holder.execute("SELECT 1").fetchone() == (1,)   # the holder's session is untouched


def test_reused_or_gone_pids_are_not_signalled(scene):
    settings, app = scene
    victim = app.connect(autocommit=True)
    pid = victim.info.backend_pid
    stale = SignalTarget(pid=pid, backend_start=datetime(2001, 1, 1, tzinfo=timezone.utc))
    gone = SignalTarget(pid=2_000_000_000, backend_start=datetime(2001, 1, 1, tzinfo=timezone.utc))
    report = signal_backends(settings, "terminate", [stale, gone], reason="test reuse")
    assert [o.outcome for o in report.outcomes] == [ALREADY_GONE, ALREADY_GONE]
    assert "newer session" in report.outcomes[0].message
    assert "ended" in report.outcomes[1].message
    assert victim.execute("SELECT 1").fetchone() == (1,)   # same pid, other session: still alive
    db = Database(settings)
    [row] = list_audit(db, action="terminate")
    assert row["outcome"] == "2 already gone"
    db.close()


def test_permission_denied_is_reported_per_pid_as_a_non_superuser(pg, scene):
    settings, app = scene
    dbname = settings.database.dsn.split("dbname=")[1].split()[0]
    with psycopg.connect(settings.database.dsn, autocommit=True) as admin:
        admin.execute("""
            DO $$ BEGIN CREATE ROLE atc_lowly LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
        """)
        admin.execute("GRANT USAGE ON SCHEMA atc TO atc_lowly")
        admin.execute("GRANT SELECT, INSERT ON atc.audit TO atc_lowly")
        admin.execute("GRANT USAGE ON SEQUENCE atc.audit_id_seq TO atc_lowly")
    superuser_session = app.connect(autocommit=True)
    lowly_app = Application(pg.dsn(dbname, user="atc_lowly"), tag="lowly-app")
    try:
        own_session = lowly_app.connect(autocommit=True)
        lowly = replace(settings, database=replace(settings.database, dsn=pg.dsn(dbname, user="atc_lowly")))
        signaller = Signaller(lowly)
        try:
            targets = signaller.lookup([superuser_session.info.backend_pid, own_session.info.backend_pid])
            # Without pg_read_all_stats another role's backend_start is hidden; no role pre-check.
            assert targets[0].backend_start is None and targets[1].backend_start is not None
            report = signaller.signal("terminate", targets, reason="test permissions")
        finally:
            signaller.close()
        outcomes = {o.pid: o for o in report.outcomes}
        assert outcomes[superuser_session.info.backend_pid].outcome == PERMISSION_DENIED
        assert "SUPERUSER" in outcomes[superuser_session.info.backend_pid].message.upper()
        assert outcomes[own_session.info.backend_pid].outcome == SIGNALLED
        assert superuser_session.execute("SELECT 1").fetchone() == (1,)
        db = Database(settings)
        [row] = list_audit(db, action="terminate")
        assert row["db_role"] == "atc_lowly"
        assert row["outcome"] == "1 permission denied, 1 signalled"
        db.close()
    finally:
        lowly_app.close()


def test_read_only_refuses_before_touching_anything(scene):
    settings, app = scene
    victim = app.connect(autocommit=True)
    ro = replace(settings, read_only=True)
    target = SignalTarget(pid=victim.info.backend_pid, backend_start=None)
    with pytest.raises(ReadOnlyError, match="read-only"):
        signal_backends(ro, "terminate", [target], reason="should not happen")
    assert victim.execute("SELECT 1").fetchone() == (1,)
    db = Database(settings)
    assert list_audit(db) == []
    db.close()


def test_reason_is_required(scene):
    settings, app = scene
    with pytest.raises(AtcError, match="reason"):
        signal_backends(settings, "cancel", [SignalTarget(pid=1, backend_start=None)], reason="  ")


# -- the CLI ---------------------------------------------------------------------------------------


def test_cli_terminate_with_yes_reports_each_pid(scene, tmp_path, capsys):
    import json

    from blocking import write_config
    from console.cli import main

    settings, app = scene
    holder = app.holder("SELECT id FROM job WHERE id = 3 FOR UPDATE")
    waiter = app.start_blocked("UPDATE job SET state = 'started' WHERE id = 3")
    app.wait_for_waiters(1)
    config = write_config(tmp_path / "atc.toml", settings, operator="oncall")
    code = main(["--config", str(config), "terminate", str(holder.info.backend_pid), "2000000000",
                 "--reason", "stuck holder", "--yes", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1                        # one pid was not there: not everything was signalled
    assert [(o["pid"], o["outcome"]) for o in data["outcomes"]] == [
        (holder.info.backend_pid, SIGNALLED), (2000000000, ALREADY_GONE)]
    assert waiter.finished()
    db = Database(settings)
    [row] = list_audit(db, action="terminate")
    assert row["operator"] == "oncall" and row["outcome"] == "1 signalled, 1 already gone"
    db.close()


def test_cli_refuses_without_confirmation_or_in_read_only(scene, tmp_path, capsys, monkeypatch):
    import io

    from blocking import write_config
    from console.cli import main

    settings, app = scene
    victim = app.connect(autocommit=True)
    config = write_config(tmp_path / "atc.toml", settings)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))     # not a terminal
    assert main(["--config", str(config), "cancel", str(victim.info.backend_pid), "--reason", "x"]) == 2
    assert "needs confirmation" in capsys.readouterr().err
    assert main(["--config", str(config), "--read-only", "terminate", str(victim.info.backend_pid),
                 "--reason", "x", "--yes"]) == 2
    err = capsys.readouterr().err
    assert "read-only" in err and err.count("\n") == 1
    assert victim.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("bad", ["-1", "0"])
def test_cli_non_positive_pid_is_a_one_line_error(scene, tmp_path, capsys, bad):
    from blocking import write_config
    from console.cli import main

    settings, app = scene
    victim = app.connect(autocommit=True)
    config = write_config(tmp_path / "atc.toml", settings)
    code = main(["--config", str(config), "terminate", str(victim.info.backend_pid), bad, "--reason", "x", "--yes"])
    captured = capsys.readouterr()
    assert code == 2
    assert f"pid {bad} is not a server process id" in captured.err and captured.err.count("\n") == 1
    assert "refused" not in captured.out + captured.err
    assert victim.execute("SELECT 1").fetchone() == (1,)  # nothing was signalled
    db = Database(settings)
    assert list_audit(db, action="terminate") == []       # and nothing audited as attempted
    db.close()


def test_api_refuses_non_positive_pids(scene):
    settings, _ = scene
    signaller = Signaller(settings)
    try:
        with pytest.raises(AtcError, match="pid -5 is not a server process id"):
            signaller.lookup([12, -5])
        with pytest.raises(AtcError, match="pid -3 is not"):
            signaller.signal("cancel", [SignalTarget(pid=-3, backend_start=None)], reason="x")
        # pid 0 (a prepared transaction) is not an error but a per-target refusal
        # (test_locks.py::test_prepared_transaction_blocker_is_shown_as_pid_0)
    finally:
        signaller.close()

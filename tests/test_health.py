"""Database health against the embedded PostgreSQL: timeouts, sessions, deadlocks, sizes, roles."""

from __future__ import annotations

import time
from dataclasses import replace

import psycopg
import pytest

from blocking import Application, seed_jobs
from console.db import Database
from console.health import (HealthHistory, HealthSample, resolve_timeouts, take_health)


def dbname_of(settings) -> str:
    return settings.database.dsn.split("dbname=")[1].split()[0]


def as_role(settings, pg, role: str):
    return replace(settings, database=replace(settings.database, dsn=pg.dsn(dbname_of(settings), user=role)))


def ensure_role(dsn: str, role: str, *grants: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        for grant in grants:
            admin.execute(grant)


@pytest.fixture
def scene(empty_db):
    seed_jobs(empty_db.database.dsn, 5)
    app = Application(empty_db.database.dsn)
    db = Database(empty_db)
    yield empty_db, app, db
    app.close()
    db.close()


def test_missing_timeouts_are_warned_and_set_ones_resolved_by_precedence(pg, scene):
    settings, app, db = scene
    name = dbname_of(settings)
    ensure_role(settings.database.dsn, "atc_app_role")
    with psycopg.connect(settings.database.dsn, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" SET lock_timeout = \'2s\'')
        admin.execute("ALTER ROLE atc_app_role SET statement_timeout = '30s'")
        admin.execute(f'ALTER ROLE atc_app_role IN DATABASE "{name}" SET idle_in_transaction_session_timeout = \'1min\'')
    try:
        app_session = Application(pg.dsn(name, user="atc_app_role"), tag="role-app")
        app_session.connect(autocommit=True)
        health = take_health(db)
        by = {(t.role, t.name): t for t in health.timeouts}
        assert by[("atc_app_role", "statement_timeout")].value == "30s"
        assert by[("atc_app_role", "statement_timeout")].source == "role"
        assert by[("atc_app_role", "lock_timeout")].source == "database"
        assert by[("atc_app_role", "idle_in_transaction_session_timeout")].source == "role in database"
        assert not any("atc_app_role" in w for w in health.warnings)
        # The database owner (postgres) has only the database-wide lock_timeout.
        assert by[("postgres", "lock_timeout")].value == "2s"
        assert by[("postgres", "statement_timeout")].off
        assert any(w.startswith("statement_timeout is not set for role postgres") for w in health.warnings)
        assert any(w.startswith("idle_in_transaction_session_timeout is not set for role postgres")
                   for w in health.warnings)
        # atc's own session runs with its own timeouts; they must not mask the server's.
        assert by[("postgres", "statement_timeout")].source.startswith(("built-in", "server config"))
        app_session.close()
    finally:
        with psycopg.connect(settings.database.dsn, autocommit=True) as admin:
            admin.execute("ALTER ROLE atc_app_role RESET ALL")


def test_sessions_waiters_and_old_transactions(scene):
    settings, app, db = scene
    holder = app.holder("SELECT id FROM job WHERE id = 1 FOR UPDATE")
    waiter = app.start_blocked("UPDATE job SET state = 'started' WHERE id = 1")
    app.wait_for_waiters(1)
    time.sleep(0.05)
    health = take_health(db)
    states = {r["state"]: r["sessions"] for r in health.sessions_by_state}
    assert states.get("idle in transaction", 0) >= 1 and states.get("active", 0) >= 1
    assert health.lock_waiters == 1
    assert health.idle_in_transaction[0]["pid"] == holder.info.backend_pid
    assert "FOR UPDATE" in health.idle_in_transaction[0]["query"]
    assert health.longest_transactions[0]["pid"] == holder.info.backend_pid
    assert health.connections >= 3 and health.max_connections == 400
    assert 0 < health.connection_use < 0.1
    data = health.as_dict()
    assert data["lock_waiters"] == 1 and data["connections"]["max"] == 400
    assert waiter.pid in {s["pid"] for s in health.longest_transactions}


def test_table_sizes_split_heap_toast_and_never_wait_for_an_exclusive_lock(scene):
    settings, app, db = scene
    with psycopg.connect(settings.database.dsn, autocommit=True) as conn:
        conn.execute("UPDATE job SET job_metadata = jsonb_build_object('blob', "
                     "(SELECT string_agg(md5(random()::text || g), '') FROM generate_series(1, 20000) g)) "
                     "WHERE id = 1")
        conn.execute("ANALYZE job")
    health = take_health(db)
    job = next(t for t in health.tables if t.name == "job")
    assert job.exact and job.toast > 100_000 and job.heap > 0
    assert health.tables[0].name == "job"     # biggest first

    app.holder("LOCK TABLE job IN ACCESS EXCLUSIVE MODE")
    started = time.monotonic()
    health = take_health(db)
    assert time.monotonic() - started < 3
    job = next(t for t in health.tables if t.name == "job")
    assert not job.exact and job.note.startswith("locked")
    assert any("job" in line and "estimates" in line for line in health.limits)


def test_deadlocks_are_counted(scene):
    settings, app, db = scene
    a = app.holder("UPDATE job SET wanted_runners = 5 WHERE id = 1")
    b = app.holder("UPDATE job SET wanted_runners = 5 WHERE id = 2")
    first = app.start_blocked("UPDATE job SET wanted_runners = 6 WHERE id = 2", conn=a)
    app.wait_for_waiters(1)
    second = app.start_blocked("UPDATE job SET wanted_runners = 6 WHERE id = 1", conn=b)
    assert first.finished(10) and second.finished(10)
    assert any(isinstance(x.result.get("error"), psycopg.errors.DeadlockDetected) for x in (first, second))
    a.rollback()    # a backend flushes its statistics only once it is out of its (aborted) transaction
    b.rollback()
    deadline = time.monotonic() + 10
    while True:   # statistics are flushed by the backends within about a second
        health = take_health(db)
        if health.deadlocks >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert health.deadlocks >= 1 and health.xact_rollback >= 1
    assert health.deadlocks_per_hour > 0 and health.as_dict()["deadlocks"]["total"] >= 1


def test_works_as_a_non_superuser_and_says_what_it_cannot_see(pg, scene):
    settings, app, db = scene
    app.holder("SELECT id FROM job WHERE id = 1 FOR UPDATE")
    ensure_role(settings.database.dsn, "atc_nopriv")
    plain = Database(as_role(settings, pg, "atc_nopriv"))
    try:
        health = take_health(plain)
    finally:
        plain.close()
    assert health.role == "atc_nopriv"
    assert any("pg_read_all_stats" in line and "sessions hidden" in line for line in health.limits)
    assert any("pg_file_settings" in line for line in health.limits)
    assert health.idle_in_transaction == []          # hidden, not an error

    ensure_role(settings.database.dsn, "atc_monitor", "GRANT pg_monitor TO atc_monitor")
    monitor = Database(as_role(settings, pg, "atc_monitor"))
    try:
        health = take_health(monitor)
    finally:
        monitor.close()
    assert not any("pg_read_all_stats" in line for line in health.limits)
    assert health.idle_in_transaction and health.idle_in_transaction[0]["state"] == "idle in transaction"


def test_resolve_timeouts_precedence_without_server():
    rows = [
        {"for_database": True, "role": None, "config": "statement_timeout=1s"},
        {"for_database": False, "role": "app", "config": "statement_timeout=2s"},
        {"for_database": True, "role": "app", "config": "statement_timeout=3s"},
        {"for_database": False, "role": "other", "config": "lock_timeout=0"},
    ]
    server = {"lock_timeout": ("5s", "server config postgresql.conf:1")}
    got = {(t.role, t.name): (t.value, t.source) for t in resolve_timeouts(["app", "other", "x"], rows, server)}
    assert got[("app", "statement_timeout")] == ("3s", "role in database")
    assert got[("other", "statement_timeout")] == ("1s", "database")
    assert got[("other", "lock_timeout")] == ("0", "role")
    assert got[("x", "lock_timeout")] == ("5s", "server config postgresql.conf:1")
    assert got[("x", "idle_in_transaction_session_timeout")] == ("0", "built-in default")


def test_history_keeps_minutes_and_turns_deadlocks_into_deltas():
    history = HealthHistory(minutes=1)
    for i, total in enumerate([3, 3, 5, 5, 0, 1]):
        history.add_sample(HealthSample(at=1000 + i * 20, waiting=i, active=1, deadlocks_total=total))
    # 100 s of samples, 60 s kept: the first two fell off.
    assert history.waiting == [2, 3, 4, 5]
    assert history.deadlocks == [0, 0, 1]     # a stats reset (5 -> 0) is not a negative spike
    assert history.deadlocks_per_minute() == pytest.approx(1 / 60 * 60)


def test_cli_health_json_and_text(scene, tmp_path, capsys, monkeypatch):
    import json

    from blocking import write_config
    from console.cli import main

    settings, app, db = scene
    monkeypatch.setenv("COLUMNS", "250")
    config = write_config(tmp_path / "atc.toml", settings)
    assert main(["--config", str(config), "health", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {t["name"] for t in data["timeouts"]} == {"statement_timeout", "lock_timeout",
                                                    "idle_in_transaction_session_timeout"}
    assert data["connections"]["max"] == 400 and "deadlocks" in data and data["tables"]
    assert main(["--config", str(config), "health"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: statement_timeout is not set" in out and "Biggest tables" in out

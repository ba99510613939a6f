"""The lock tree against real blocking situations on the embedded PostgreSQL.

Every scenario compares the tree's (blocker, waiter) edges with pg_blocking_pids read straight
from the server: they must be equal, no more, no less.
"""

from __future__ import annotations

import psycopg
import pytest

from blocking import Application, blocking_pids_now, seed_jobs
from console.db import Database
from console.locks import LockSession, build_tree, decode_query, flatten, take_snapshot


@pytest.fixture
def app_db(empty_db):
    seed_jobs(empty_db.database.dsn, 10)
    application = Application(empty_db.database.dsn)
    db = Database(empty_db)
    yield empty_db, application, db
    application.close()
    db.close()


def server_edges(dsn: str) -> set[tuple[int, int]]:
    return {(b, w) for w, blockers in blocking_pids_now(dsn).items() for b in blockers}


def test_idle_in_transaction_row_lock_with_xid_and_tuple_waiters(app_db):
    settings, app, db = app_db
    holder = app.holder("SELECT id FROM job WHERE id = 3 FOR UPDATE")
    first = app.start_blocked("UPDATE job SET state = 'started' WHERE id = 3")
    app.wait_for_waiters(1)
    second = app.start_blocked("UPDATE job SET state = 'finished' WHERE id = 3")
    app.wait_for_waiters(2)

    snap = take_snapshot(db)
    assert snap.edges() == server_edges(settings.database.dsn)
    hp = holder.info.backend_pid
    assert snap.blocker_pids == [hp]
    root = snap.roots[0]
    assert root.session.state == "idle in transaction"
    assert "FOR UPDATE" in root.session.query
    assert root.session.xact_age is not None and root.session.xact_age >= 0
    # The first waiter waits on the holder's transaction id, the second on the tuple lock the
    # first one holds: a chain holder -> first -> second, as pg_blocking_pids says.
    waiter = snap.sessions[first.pid]
    assert waiter.waiting_for.locktype == "transactionid"
    assert waiter.waiting_for.row_key == {"id": 3}
    assert "job" in waiter.waiting_for.relation
    behind = snap.sessions[second.pid]
    assert behind.waiting_for.locktype == "tuple"
    assert behind.waiting_for.row_key == {"id": 3}
    assert (hp, first.pid) in snap.edges()
    assert any("transaction" in h for h in root.session.holds)
    rows, more = snap.rows()
    assert [r.session.pid for r in rows][0] == hp and more == 0
    # What is locked: the aggregate shows the row/transaction waits with counts.
    waiting_total = sum(g["waiting"] for g in snap.lock_summary)
    assert waiting_total == 2
    assert any(g["locktype"] == "tuple" and g["waiting"] == 1 for g in snap.lock_summary)
    assert all(g["oldest_wait_start"] for g in snap.lock_summary if g["waiting"])


def test_three_deep_chain(app_db):
    settings, app, db = app_db
    a = app.holder("SELECT id FROM job WHERE id = 1 FOR UPDATE")
    b_conn = app.connect()
    b_conn.execute("SELECT id FROM job WHERE id = 2 FOR UPDATE")
    b = app.start_blocked("UPDATE job SET state = 'started' WHERE id = 1", conn=b_conn)
    app.wait_for_waiters(1)
    c_conn = app.connect()
    c_conn.execute("SELECT id FROM job WHERE id = 4 FOR UPDATE")
    c = app.start_blocked("UPDATE job SET state = 'started' WHERE id = 2", conn=c_conn)
    app.wait_for_waiters(2)
    d = app.start_blocked("DELETE FROM job WHERE id = 4")
    app.wait_for_waiters(3)

    snap = take_snapshot(db)
    assert snap.edges() == server_edges(settings.database.dsn)
    assert snap.edges() == {(a.info.backend_pid, b.pid), (b.pid, c.pid), (c.pid, d.pid)}
    rows, _ = snap.rows()
    assert [(r.depth, r.session.pid) for r in rows] == [
        (0, a.info.backend_pid), (1, b.pid), (2, c.pid), (3, d.pid)]
    assert snap.sessions[d.pid].waiting_for.row_key == {"id": 4}
    # Row keys are stable for filtering too: the filter keeps the whole tree that matches.
    rows, _ = snap.rows(filter_text="DELETE FROM job")
    assert len(rows) == 4
    rows, more = snap.rows(limit=2)
    assert len(rows) == 2 and more == 2


def test_two_independent_trees(app_db):
    settings, app, db = app_db
    a = app.holder("SELECT id FROM job WHERE id = 5 FOR UPDATE")
    b = app.holder("SELECT id FROM job WHERE id = 6 FOR UPDATE")
    wa = app.start_blocked("UPDATE job SET wanted_runners = 2 WHERE id = 5")
    wb = app.start_blocked("UPDATE job SET wanted_runners = 2 WHERE id = 6")
    app.wait_for_waiters(2)
    snap = take_snapshot(db)
    assert snap.edges() == server_edges(settings.database.dsn)
    assert sorted(snap.blocker_pids) == sorted([a.info.backend_pid, b.info.backend_pid])
    assert {(r.session.pid, len(r.children)) for r in snap.roots} == {(a.info.backend_pid, 1), (b.info.backend_pid, 1)}
    assert {r.children[0].session.pid for r in snap.roots} == {wa.pid, wb.pid}
    # A filter narrows to one tree.
    rows, _ = snap.rows(filter_text=str(wb.pid))
    assert {r.session.pid for r in rows} == {b.info.backend_pid, wb.pid}


def test_non_conflicting_holder_is_not_named(app_db):
    settings, app, db = app_db
    share = app.holder("LOCK TABLE job IN SHARE MODE")               # blocks writers
    reader = app.holder("SELECT count(*) FROM job")                    # AccessShareLock: conflicts with nobody here
    writer = app.start_blocked("UPDATE job SET state = 'finished' WHERE id = 7")  # RowExclusiveLock
    app.wait_for_waiters(1)
    snap = take_snapshot(db)
    assert snap.edges() == server_edges(settings.database.dsn)
    assert snap.edges() == {(share.info.backend_pid, writer.pid)}
    assert reader.info.backend_pid not in snap.sessions
    waiting = snap.sessions[writer.pid].waiting_for
    assert waiting.locktype == "relation" and waiting.mode == "RowExclusiveLock" and "job" in waiting.relation
    assert snap.sessions[share.info.backend_pid].holds == ["ShareLock on table job"]


def test_advisory_lock(app_db):
    settings, app, db = app_db
    holder = app.connect(autocommit=True)
    holder.execute("SELECT pg_advisory_lock(424242)")
    waiter = app.start_blocked("SELECT pg_advisory_lock(424242)", autocommit=True)
    app.wait_for_waiters(1)
    snap = take_snapshot(db)
    assert snap.edges() == server_edges(settings.database.dsn) == {(holder.info.backend_pid, waiter.pid)}
    root = snap.sessions[holder.info.backend_pid]
    assert root.state == "idle"            # a session-level advisory lock outlives its statement
    assert snap.sessions[waiter.pid].waiting_for.detail == "advisory key 424242"
    data = snap.as_dict()
    assert data["tree"] == [{"pid": holder.info.backend_pid, "cycle": False,
                             "waiters": [{"pid": waiter.pid, "cycle": False, "waiters": []}]}]


def test_latin1_query_text_never_breaks_a_refresh(pg, app_db):
    settings, app, db = app_db
    name = f"latin1_{settings.database.dsn.split('dbname=')[1].split()[0]}"
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f"CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    latin = Application(pg.dsn(name), tag="latin-app")
    try:
        holder = latin.connect(autocommit=True, client_encoding="LATIN1")
        holder.execute("SELECT pg_advisory_lock(7) /* café holder */")
        waiter_conn = latin.connect(autocommit=True, client_encoding="LATIN1")
        waiter = latin.start_blocked("SELECT pg_advisory_lock(7) /* café \x1b[31m waiter */", conn=waiter_conn,
                                     autocommit=True)
        latin.wait_for_waiters(1)
        snap = take_snapshot(db)        # from a UTF-8 database: the bytes are LATIN1
        assert "café waiter" in snap.sessions[waiter.pid].query.replace("\x1b[31m ", "")
        assert "café holder" in snap.sessions[holder.info.backend_pid].query
        assert "\x1b" not in snap.sessions[waiter.pid].query_line   # shown escaped
    finally:
        latin.close()
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_no_waits_is_an_empty_snapshot(app_db):
    settings, app, db = app_db
    app.holder("SELECT id FROM job WHERE id = 1 FOR UPDATE")   # holds, but nobody waits
    snap = take_snapshot(db)
    assert snap.roots == [] and snap.sessions == {} and snap.edges() == set()


def test_snapshot_reads_no_table_data_and_takes_no_row_lock(app_db):
    """atc's own session holds nothing but what a catalog/stat read needs while it snapshots."""
    settings, app, db = app_db
    app.holder("SELECT id FROM job WHERE id = 2 FOR UPDATE")
    app.start_blocked("UPDATE job SET state = 'started' WHERE id = 2")
    app.wait_for_waiters(1)
    take_snapshot(db)
    with db.connection() as conn:
        pid = conn.info.backend_pid
    with psycopg.connect(settings.database.dsn, autocommit=True) as probe:
        held = probe.execute("SELECT locktype, mode FROM pg_locks WHERE pid = %s", (pid,)).fetchall()
    assert held == []        # autocommit: nothing is left behind


# -- the tree builder on its own (no server needed for these shapes) -------------------------------


def _s(pid: int, blocked_by=(), **kw) -> LockSession:
    return LockSession(pid=pid, blocked_by=tuple(blocked_by), **kw)


def test_waiter_with_two_blockers_appears_under_both():
    sessions = {1: _s(1), 2: _s(2), 3: _s(3, (1, 2))}
    roots = build_tree(sessions)
    assert sorted(r.session.pid for r in roots) == [1, 2]
    assert all([c.session.pid for c in r.children] == [3] for r in roots)
    rows, _ = flatten(roots)
    assert sorted(r.key for r in rows) == ["1", "1/3", "2", "2/3"]


def test_wait_cycle_is_shown_once_and_marked():
    sessions = {10: _s(10, (11,)), 11: _s(11, (10,))}
    roots = build_tree(sessions)
    assert len(roots) == 1
    rows, _ = flatten(roots)
    assert [(r.session.pid, r.cycle) for r in rows] == [(10, False), (11, False), (10, True)]


def test_decode_query_falls_back_without_raising():
    assert decode_query("café".encode("utf-8"), "UTF8") == "café"
    assert decode_query("café".encode("latin-1"), "LATIN1") == "café"
    assert decode_query(b"\xff\xfe", "UTF8") == "\\xff\\xfe"
    assert decode_query(b"\xff", "NO_SUCH_ENCODING") == "\\xff"
    assert decode_query(None, None) == ""


def test_cli_locks_json_and_table(app_db, tmp_path, capsys, monkeypatch):
    import json

    from blocking import write_config
    from console.cli import main

    settings, app, db = app_db
    monkeypatch.setenv("COLUMNS", "250")
    holder = app.holder("SELECT id FROM job WHERE id = 8 FOR UPDATE")
    waiter = app.start_blocked("UPDATE job SET state = 'started' WHERE id = 8")
    app.wait_for_waiters(1)
    config = write_config(tmp_path / "atc.toml", settings)
    assert main(["--config", str(config), "locks", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    hp = holder.info.backend_pid
    assert data["tree"] == [{"pid": hp, "cycle": False, "waiters": [{"pid": waiter.pid, "cycle": False, "waiters": []}]}]
    assert data["sessions"][str(waiter.pid)]["waiting_for"]["row_key"] == {"id": 8}
    assert data["sessions"][str(hp)]["state"] == "idle in transaction"
    assert main(["--config", str(config), "locks", "--full"]) == 0
    out = capsys.readouterr().out
    assert str(hp) in out and "idle in transaction" in out and "1 blocking tree(s), 1 waiting session(s)" in out
    assert main(["--config", str(config), "locks", "--limit", "1"]) == 0
    assert "1 more" in capsys.readouterr().out


# -- prepared transactions and parallel workers -----------------------------------------------------


def test_prepared_transaction_blocker_is_shown_as_pid_0(tmp_path):
    """Needs max_prepared_transactions > 0, so it runs on a private server (about 3 s)."""
    from console.config import settings_from_mapping
    from console.embedded import EmbeddedPostgres
    from console.schema import install_reference_schema, upgrade
    from console.signals import REFUSED, SignalTarget, signal_backends

    server = EmbeddedPostgres(tmp_path / "pg").start(tie_to_parent=True)
    app = None
    try:
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            admin.execute("ALTER SYSTEM SET max_prepared_transactions = 4")
        server.stop()
        server.start(tie_to_parent=True)
        server.create_database("app")
        dsn = server.dsn("app")
        with psycopg.connect(dsn, autocommit=True) as conn:
            install_reference_schema(conn)
        seed_jobs(dsn, 3)
        settings = settings_from_mapping({"operator": "tester", "database": {"dsn": dsn}})
        upgrade(settings)
        with psycopg.connect(dsn) as conn:
            conn.execute("SELECT id FROM job WHERE id = 1 FOR UPDATE")
            conn.execute("PREPARE TRANSACTION 'incident-42'")
        app = Application(dsn)
        waiter = app.start_blocked("UPDATE job SET state = 'started' WHERE id = 1")
        app.wait_for_waiters(1)
        db = Database(settings)
        snap = take_snapshot(db)
        db.close()
        assert snap.edges() == server_edges(dsn) == {(0, waiter.pid)}
        root = snap.sessions[0]
        assert root.is_prepared and root.state == "prepared transaction"
        assert [p["gid"] for p in root.prepared] == ["incident-42"]
        assert "incident-42" in root.query
        report = signal_backends(settings, "terminate", [SignalTarget(pid=0, backend_start=None)], reason="test")
        assert report.outcomes[0].outcome == REFUSED and "PREPARED" in report.outcomes[0].message
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ROLLBACK PREPARED 'incident-42'")
        assert waiter.finished() and waiter.result.get("ok")
    finally:
        if app is not None:
            app.close()
        server.stop()


def test_parallel_workers_fold_into_their_leader():
    from console.locks import _fold_workers

    sessions = {
        10: _s(10),                                               # holder
        20: _s(20, backend_type="client backend"),                # leader, not itself waiting
        21: _s(21, (10,), backend_type="parallel worker", leader_pid=20, wait_event_type="Lock",
               wait_event="relation"),
        22: _s(22, backend_type="parallel worker", leader_pid=20),
        30: _s(30, (21,)),                                        # someone reported behind a worker
    }
    _fold_workers(sessions)
    assert set(sessions) == {10, 20, 30}
    assert sessions[20].workers == [21, 22]
    assert sessions[20].blocked_by == (10,)
    assert sessions[20].wait_event == "relation (worker 21)"
    assert sessions[30].blocked_by == (20,)
    roots = build_tree(sessions)
    rows, _ = flatten(roots)
    assert [r.key for r in rows] == ["10", "10/20", "10/20/30"]

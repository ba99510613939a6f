"""Pilot tests of the lock, health and audit screens on a real PostgreSQL with real blocking."""

from __future__ import annotations

import time
from dataclasses import replace

import psycopg
import pytest
from textual.widgets import DataTable, Input, Sparkline, Static

from blocking import Application, seed_jobs
from console.audit import list_audit, record
from console.db import Database
from screens.app import AtcApp
from screens.widgets import ConfirmModal, ReasonModal

SIZE = (170, 45)


async def wait_until(pilot, predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.03)
        if predicate():
            return
    raise AssertionError(f"{what} not reached in {timeout}s")


def fast(settings, interval=0.25):
    return replace(settings, ui=replace(settings.ui, refresh_interval=interval))


@pytest.fixture
def scene(empty_db):
    seed_jobs(empty_db.database.dsn, 5)
    app = Application(empty_db.database.dsn)
    yield empty_db, app
    app.close()


def texts(table: DataTable, column: str) -> list[str]:
    return [table.get_cell(key, column).plain for key in [r.key.value for r in table.ordered_rows]]


async def test_terminate_the_root_blocker_through_the_modal_and_waiters_finish(scene):
    from screens.locks import LocksScreen

    settings, application = scene
    holder = application.holder("SELECT id FROM job WHERE id = 2 FOR UPDATE")
    w1 = application.start_blocked("UPDATE job SET state = 'started' WHERE id = 2")
    application.wait_for_waiters(1)
    w2 = application.start_blocked("UPDATE job SET state = 'finished' WHERE id = 2")
    application.wait_for_waiters(2)
    hp = holder.info.backend_pid

    app = AtcApp(fast(settings), start_mode="locks")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, LocksScreen) and app.screen.tree.row_count == 3,
                         what="lock tree with 3 rows")
        screen = app.screen
        tree = screen.tree
        assert [r.key.value for r in tree.ordered_rows] == [str(hp), f"{hp}/{w1.pid}", f"{hp}/{w1.pid}/{w2.pid}"]
        assert texts(tree, "state")[0] == "idle in transaction"
        assert "id=2" in texts(tree, "waits")[1]
        # The detail pane shows the highlighted session's full query.
        assert "FOR UPDATE" in screen.query_one("#locks-detail", Static).render().plain
        # Select the root blocker and terminate it.
        tree.move_cursor(row=0)
        await pilot.press("t")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmModal), what="confirm modal")
        assert len(app.screen.lines) == 1 and f"pid {hp} " in app.screen.lines[0]
        await pilot.press("y")
        await wait_until(pilot, lambda: isinstance(app.screen, ReasonModal), what="reason modal")
        await pilot.press(*"holder stuck")
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.last_report is not None, what="signal report")
        assert [(o.pid, o.outcome) for o in screen.last_report.outcomes] == [(hp, "signalled")]
        assert w1.finished() and w2.finished()
        assert w1.result.get("ok") and w2.result.get("ok")
        await wait_until(pilot, lambda: screen.tree.row_count == 0, what="empty tree after terminate")
    db = Database(settings)
    [row] = list_audit(db, action="terminate")
    assert row["reason"] == "holder stuck" and row["targets"][0]["pid"] == hp and row["outcome"] == "ok"
    db.close()


async def test_refresh_updates_in_place_pause_and_filter(scene):
    from screens.locks import LocksScreen

    settings, application = scene
    a = application.holder("SELECT id FROM job WHERE id = 1 FOR UPDATE")
    b = application.holder("SELECT id FROM job WHERE id = 3 FOR UPDATE")
    application.start_blocked("UPDATE job SET state = 'started' WHERE id = 1")
    wb = application.start_blocked("UPDATE job SET state = 'started' WHERE id = 3")
    application.wait_for_waiters(2)
    app = AtcApp(fast(settings, 0.1), start_mode="locks")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, LocksScreen) and app.screen.tree.row_count == 4)
        screen = app.screen
        start = screen.polls
        await wait_until(pilot, lambda: screen.polls >= start + 3, what="three more polls")
        assert screen.rebuilds == 1           # same shape: rows were updated in place
        # space pauses: no more polls; space again resumes.
        await pilot.press("space")
        assert screen.paused
        await pilot.pause(0.1)                # let a poll already in flight land
        paused_at = screen.polls
        await pilot.pause(0.5)
        assert screen.polls == paused_at
        assert "PAUSED" in screen.query_one("#locks-state", Static).render().plain
        await pilot.press("space")
        await wait_until(pilot, lambda: screen.polls > paused_at, what="polls after resume")
        # '/' filters to the tree that matches.
        await pilot.press("slash")
        await pilot.press(*str(wb.pid))
        await wait_until(pilot, lambda: screen.tree.row_count == 2)
        assert {k.split("/")[0] for k in screen.row_keys} == {str(b.info.backend_pid)}
        await pilot.press("enter")
        assert screen.tree.has_focus
        await pilot.press("escape")           # Escape with the filter bar closed does nothing harmful
        screen.action_filter()
        await pilot.press("escape")
        await wait_until(pilot, lambda: screen.tree.row_count == 4, what="filter cleared")
        assert a.info.backend_pid in {r.session.pid for r in screen.rows_by_key.values()}


async def test_connection_loss_keeps_data_marked_stale_and_reconnects(scene):
    from screens.locks import LocksScreen

    settings, application = scene
    application.holder("SELECT id FROM job WHERE id = 4 FOR UPDATE")
    application.start_blocked("UPDATE job SET state = 'started' WHERE id = 4")
    application.wait_for_waiters(1)
    app = AtcApp(fast(settings, 0.2), start_mode="locks")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, LocksScreen) and app.screen.tree.row_count == 2)
        screen = app.screen
        with psycopg.connect(settings.database.dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'atc/tester/locks'")
        await wait_until(pilot, lambda: screen.stale, what="stale mark")
        assert screen.tree.row_count == 2     # last data kept
        assert screen.has_class("stale")
        assert "STALE" in screen.query_one("#locks-state", Static).render().plain
        await wait_until(pilot, lambda: not screen.stale, timeout=10, what="reconnect")
        assert screen.tree.row_count == 2 and not screen.has_class("stale")


async def test_mark_several_and_cancel_lists_exactly_those(scene):
    from screens.locks import LocksScreen

    settings, application = scene
    application.holder("SELECT id FROM job WHERE id = 5 FOR UPDATE")
    w1 = application.start_blocked("UPDATE job SET state = 'started' WHERE id = 5")
    application.wait_for_waiters(1)
    w2 = application.start_blocked("UPDATE job SET state = 'finished' WHERE id = 5")
    application.wait_for_waiters(2)
    app = AtcApp(fast(settings, 0.5), start_mode="locks")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, LocksScreen) and app.screen.tree.row_count == 3)
        screen = app.screen
        screen.tree.move_cursor(row=1)
        await pilot.press("m")
        screen.tree.move_cursor(row=2)
        await pilot.press("m")
        assert sorted(screen.marked) == sorted([w1.pid, w2.pid])
        await pilot.press("c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmModal))
        assert [line.split()[1] for line in app.screen.lines] == [str(p) for p in sorted([w1.pid, w2.pid])]
        await pilot.press("n")                # declined: nothing signalled
        await wait_until(pilot, lambda: app.screen is screen)
        assert screen.last_report is None and not w1.finished(0.1)


async def test_read_only_refuses_signals(scene):
    from screens.locks import LocksScreen

    settings, application = scene
    application.holder("SELECT id FROM job WHERE id = 1 FOR UPDATE")
    waiter = application.start_blocked("UPDATE job SET state = 'started' WHERE id = 1")
    application.wait_for_waiters(1)
    app = AtcApp(replace(fast(settings), read_only=True), start_mode="locks")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, LocksScreen) and app.screen.tree.row_count == 2)
        await pilot.press("t")
        await pilot.pause(0.2)
        assert isinstance(app.screen, LocksScreen)     # no modal opened
        assert not waiter.finished(0.1)


async def test_health_screen_shows_warnings_sparklines_and_sizes(scene):
    from screens.health import HealthScreen

    settings, application = scene
    application.holder("SELECT id FROM job WHERE id = 1 FOR UPDATE")
    application.start_blocked("UPDATE job SET state = 'started' WHERE id = 1")
    application.wait_for_waiters(1)
    app = AtcApp(fast(settings, 0.2), start_mode="health")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, HealthScreen) and app.screen.polls >= 3,
                         what="three health polls")
        screen = app.screen
        warnings = screen.query_one("#health-warnings", Static).render().plain
        assert "statement_timeout is not set for role postgres" in warnings
        spark = screen.query_one("#spark-waiting", Sparkline)
        assert len(spark.data) >= 3 and max(spark.data) == 1
        assert "lock waiters: 1" in screen.query_one("#spark-label-waiting", Static).render().plain
        facts = screen.query_one("#health-facts", Static).render().plain
        assert "connections" in facts and "/400" in facts and "oldest idle in transaction: pid" in facts
        timeouts = screen.query_one("#health-timeouts", DataTable)
        assert timeouts.row_count >= 3
        big = screen.query_one("#health-big-tables", DataTable)
        assert big.row_count >= 1
        assert any(big.get_cell(r.key, "table").plain == "public.job" for r in big.ordered_rows)


async def test_health_screen_as_a_non_superuser_shows_a_banner(pg, scene):
    from screens.health import HealthScreen

    settings, application = scene
    dbname = settings.database.dsn.split("dbname=")[1].split()[0]
    with psycopg.connect(settings.database.dsn, autocommit=True) as admin:
        admin.execute("DO $$ BEGIN CREATE ROLE atc_nopriv LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    plain = replace(fast(settings), database=replace(settings.database, dsn=pg.dsn(dbname, user="atc_nopriv")))
    app = AtcApp(plain, start_mode="health")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, HealthScreen) and app.screen.polls >= 1)
        banner = app.screen.query_one("#health-limits", Static)
        assert banner.display and "pg_read_all_stats" in banner.render().plain


async def test_audit_screen_lists_filters_and_shows_details(scene):
    from screens.audit import AuditScreen

    settings, application = scene
    db = Database(settings)
    record(db, settings, "terminate", [{"pid": 4242, "backend_start": "2024-01-01T00:00:00+00:00"}],
           reason="stuck [bold]holder[/bold] \x1b[31m", details={"outcomes": [{"pid": 4242, "outcome": "signalled"}]})
    record(db, replace(settings, operator="alice"), "pause", [{"assignment_id": 7}], reason="exam")
    db.close()
    app = AtcApp(settings, start_mode="audit")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, AuditScreen) and app.screen.table.row_count == 2)
        screen = app.screen
        table = screen.table
        assert texts(table, "action") == ["pause", "terminate"]
        assert texts(table, "db_role") == ["postgres", "postgres"]
        table.move_cursor(row=1)
        await pilot.pause(0.05)
        detail = screen.query_one("#audit-detail", Static).render().plain
        assert "[bold]holder[/bold]" in detail and "\x1b" not in detail and "signalled" in detail
        assert "as database role postgres from 127.0.0.1" in detail
        await pilot.press("slash")
        await pilot.press(*"alice")
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.table.row_count == 1, what="filtered to alice")
        assert texts(screen.table, "operator") == ["alice"]
        screen.query_one("#audit-operator", Input).value = ""
        screen.query_one("#audit-since", Input).value = "not-a-time"
        screen.action_reload()
        await pilot.pause(0.1)
        assert screen.table.row_count == 1      # bad filter: notified, data kept


async def test_lock_screen_survives_a_database_restart(tmp_path):
    """A private server (about 3 s): stop it under the screen, then start it again."""
    from console.config import settings_from_mapping
    from console.embedded import EmbeddedPostgres
    from console.schema import install_reference_schema, upgrade
    from screens.locks import LocksScreen

    server = EmbeddedPostgres(tmp_path / "pg").start(tie_to_parent=True)
    application = None
    try:
        server.create_database("app")
        dsn = server.dsn("app")
        with psycopg.connect(dsn, autocommit=True) as conn:
            install_reference_schema(conn)
        seed_jobs(dsn, 3)
        settings = settings_from_mapping({"operator": "tester", "database": {"dsn": dsn, "connect_timeout": 2},
                                          "ui": {"refresh_interval": 0.2}})
        upgrade(settings)
        application = Application(dsn)
        application.holder("SELECT id FROM job WHERE id = 1 FOR UPDATE")
        application.start_blocked("UPDATE job SET state = 'started' WHERE id = 1")
        application.wait_for_waiters(1)
        app = AtcApp(settings, start_mode="locks")
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, LocksScreen) and app.screen.tree.row_count == 2)
            screen = app.screen
            server.stop()
            await wait_until(pilot, lambda: screen.stale, what="stale after the server stopped")
            assert screen.tree.row_count == 2                 # the last data stays, marked
            assert "STALE" in screen.query_one("#locks-state", Static).render().plain
            failures = screen.failures
            await wait_until(pilot, lambda: screen.failures > failures, timeout=8, what="a retry with backoff")
            server.start(tie_to_parent=True)
            await wait_until(pilot, lambda: not screen.stale, timeout=20, what="reconnect after restart")
            await wait_until(pilot, lambda: screen.tree.row_count == 0, what="fresh data")  # the blockers died with it
    finally:
        if application is not None and server.is_running():
            application.close()
        server.stop()

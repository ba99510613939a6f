"""Pilot tests of the sizes and migrate screens on real PostgreSQL and SeaweedFS."""

from __future__ import annotations

import json
import time

from textual.widgets import Input, ProgressBar, Static

from dataclasses import replace

from console.db import Database
from console.storage import ObjectStore
from screens.app import AtcApp
from screens.widgets import ConfirmModal, ReasonModal
from tests.migrate_support import assert_every_log_intact, seed_world
from tests.test_migrate_faults import FaultProxy

SIZE = (170, 45)


async def wait_until(pilot, predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.05)
        if predicate():
            return
    raise AssertionError(f"{what} not reached in {timeout}s")


def _text(app, selector) -> str:
    return str(app.screen.query_one(selector, Static).render())


async def test_sizes_screen_shows_histogram_and_recounts_threshold(empty_db):
    import random

    rnd = random.Random(5)  # incompressible, so stored size ~ text size
    logs = [json.dumps({"stdout": rnd.randbytes(n).hex(), "exit_code": 0}).encode() for n in (10, 1500, 1500, 35_000)]
    seed_world(empty_db, logs)
    app = AtcApp(empty_db, start_mode="sizes")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: getattr(app.screen, "loads", 0) >= 1, what="sizes loaded")
        assert "as of" in _text(app, "#sizes-asof") and "exact" in _text(app, "#sizes-asof")
        histogram = _text(app, "#sizes-histogram")
        assert "db / 0 s3" in histogram and "█" in histogram
        totals = _text(app, "#sizes-totals")
        assert "stored (compressed)" in totals and "uploaded (raw)" in totals
        threshold = app.screen.query_one("#sizes-threshold", Input)
        await pilot.press("t")
        assert app.focused is threshold
        threshold.value = "2k"
        await pilot.press("enter")
        await wait_until(pilot, lambda: "at or above 2.0 KiB: " in _text(app, "#sizes-totals"), what="recount")
        assert "stored at or above 2.0 KiB: 3 logs" in _text(app, "#sizes-totals")
        assert not isinstance(app.focused, Input), "Enter applies and gives the keys back"
        await pilot.press("slash")
        assert app.focused is threshold
        threshold.value = "lots"
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert any("threshold" in str(n.message) and "not a size" in str(n.message) for n in app._notifications)
        threshold.value = ""
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert any(str(n.message).startswith("threshold: enter a size") for n in app._notifications)
        await pilot.press("escape")
        assert not isinstance(app.focused, Input)


def _footer_descriptions(app) -> set[str]:
    from textual.widgets._footer import FooterKey

    return {k.description for k in app.screen.query(FooterKey)}


async def test_sizes_and_migrate_do_not_trap_the_keyboard(empty_db):
    """Arriving on sections 4 and 5 the content has focus: 1-9 switch sections, the footer shows
    the screen's keys; t / e enter a field, Escape leaves it."""
    seed_world(empty_db, [json.dumps({"stdout": "x" * 3000}).encode()])
    app = AtcApp(empty_db, start_mode="sizes")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: getattr(app.screen, "loads", 0) >= 1, what="sizes loaded")
        assert not isinstance(app.focused, Input)
        # the footer is recomposed after focus settles; under load that is a few frames later
        await wait_until(pilot, lambda: {"Recompute", "Threshold"} <= _footer_descriptions(app), what="sizes footer")
        await pilot.press("5")
        await wait_until(pilot, lambda: app.current_mode == "migrate", what="switched to migrate")
        assert app.screen.query_one("#migrate-min_size", Input).value == "1MB"
        assert not isinstance(app.focused, Input)
        await wait_until(pilot, lambda: "Plan (dry run)" in _footer_descriptions(app), what="migrate footer")
        # No run yet: the progress bar is not shown (an empty ProgressBar animates forever).
        assert not app.screen.query_one("#migrate-progress", ProgressBar).display
        await pilot.press("e")
        assert app.focused is app.screen.query_one("#migrate-min_size", Input)
        await pilot.press("escape")
        assert not isinstance(app.focused, Input)
        await pilot.press("4")
        await wait_until(pilot, lambda: app.current_mode == "sizes", what="back to sizes")
        assert not isinstance(app.focused, Input)
        await pilot.press("t")
        assert isinstance(app.focused, Input)
        await pilot.press("escape")
        assert not isinstance(app.focused, Input)
        await pilot.press("5")
        await wait_until(pilot, lambda: app.current_mode == "migrate", what="switched again")


async def test_migrate_form_refuses_empty_or_invalid_sizes(empty_db):
    """An empty min size must never mean "move every log": error naming the field, nothing starts."""
    ids = seed_world(empty_db, [json.dumps({"stdout": "x" * 3000}).encode() for _ in range(3)])
    app = AtcApp(empty_db, start_mode="migrate")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.focused is not None, what="screen mounted")
        screen = app.screen
        box = screen.query_one("#migrate-min_size", Input)
        for value, expected in (("", "min size: enter a size"), ("lots", "min size: 'lots' is not a size")):
            box.value = value
            app.clear_notifications()
            for key in ("s", "d"):
                app.clear_notifications()
                await pilot.press(key)
                await wait_until(pilot, lambda: any(str(n.message).startswith(expected) and n.severity == "error"
                                                    for n in app._notifications), timeout=5, what=f"{key}: {expected}")
                await pilot.pause(0.2)
                assert not isinstance(app.screen, (ReasonModal, ConfirmModal))
                assert "planning" not in _text(app, "#migrate-plan")
            # Enter in the field validates too.
            app.clear_notifications()
            await pilot.press("e", "enter")
            await wait_until(pilot, lambda: any(str(n.message).startswith(expected) for n in app._notifications),
                             timeout=5, what="enter validates")
            assert app.focused is box
            await pilot.press("escape")
            assert app.focused is not box
        box.value = "1k"
        for key, value, expected in (("concurrency", "", "concurrency:"), ("shard", "3/2", "shard K/N:"),
                                     ("max_bytes", "x", "max bytes:"), ("assignments", "a,b", "assignment ids:")):
            field = screen.query_one(f"#migrate-{key}", Input)
            old, field.value = field.value, value
            app.clear_notifications()
            await pilot.press("s")
            await wait_until(pilot, lambda: any(str(n.message).startswith(expected) for n in app._notifications),
                             timeout=5, what=key)
            field.value = old
        # An assignment that does not exist: the plan fails with its id, nothing starts.
        screen.query_one("#migrate-assignments", Input).value = "99999"
        app.clear_notifications()
        await pilot.press("s")
        await wait_until(pilot, lambda: any("99999" in str(n.message) for n in app._notifications), what="not found")
        assert not isinstance(app.screen, (ReasonModal, ConfirmModal)) and not screen.running
    db = Database(empty_db)
    try:
        assert db.fetch_one("SELECT count(*) AS n FROM atc.moved_log")["n"] == 0
        assert db.fetch_one("SELECT count(*) AS n FROM atc.migration_run")["n"] == 0
        assert db.fetch_one("SELECT count(*) AS n FROM auto_test_step_result WHERE id = ANY(%s) AND log IS NOT NULL",
                            (ids,))["n"] == 3
    finally:
        db.close()


async def test_migrate_screen_plan_start_pause_cancel_resume(empty_db):
    logs = [json.dumps({"stdout": f"{i} " + "y" * 40_000, "exit_code": 0}).encode() for i in range(30)]
    ids = seed_world(empty_db, logs)
    expected = dict(zip(ids, logs))
    # Every PUT goes through a real loopback proxy that holds it 0.15 s, so the run lasts long
    # enough to pause and cancel it deterministically.
    proxy = FaultProxy(_s3_port(empty_db))
    proxy.mode, proxy.delay = "slow", 0.15
    settings = replace(empty_db, s3=replace(empty_db.s3, endpoint_url=proxy.url))
    app = AtcApp(settings, start_mode="migrate")
    try:
        await _drive_migration(app, expected)
    finally:
        proxy.close()
    assert assert_every_log_intact(empty_db, ObjectStore(empty_db), expected)["s3"] == 30
    db = Database(empty_db)
    try:
        reasons = [r["reason"] for r in db.fetch("SELECT reason FROM atc.audit WHERE action = 'migrate-logs' ORDER BY id")]
        assert reasons == ["INC-1 test", "resume"]
    finally:
        db.close()


def _s3_port(settings) -> int:
    return int(settings.s3.endpoint_url.rsplit(":", 1)[1])


async def _drive_migration(app, expected):
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        screen.query_one("#migrate-min_size", Input).value = "0"
        screen.query_one("#migrate-concurrency", Input).value = "1"
        screen.query_one("#migrate-runs").focus()
        await pilot.press("d")
        await wait_until(pilot, lambda: "plan: 30 logs" in _text(app, "#migrate-plan"), what="plan")

        assert "stored in the database (compressed)" in _text(app, "#migrate-plan")
        bar = screen.query_one("#migrate-progress", ProgressBar)
        assert not bar.display and not bar.show_eta  # no run: no animation; one ETA, in the stats

        await pilot.press("s")
        await wait_until(pilot, lambda: isinstance(app.screen, ReasonModal), what="reason modal")
        await pilot.press(*"INC-1 test")
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmModal), what="confirm modal")
        confirm_text = " ".join([app.screen.title_text, *app.screen.lines,
                                 *(str(w.render()) for w in app.screen.query(Static))])
        assert app.screen.title_text.startswith("Move 30 logs (")
        assert "30 logs of finished steps" in confirm_text and "stored in the database (compressed)" in confirm_text
        assert "item(s)" not in confirm_text
        await pilot.press("y")
        await wait_until(pilot, lambda: screen.stats is not None and screen.stats.moved_logs >= 2, what="progress")
        assert bar.display
        await pilot.press("p")
        await pilot.pause(1.0)
        paused_at = screen.stats.moved_logs
        eta_paused, elapsed_paused = screen.stats.eta, screen.stats.elapsed
        await pilot.pause(1.0)
        assert screen.stats.moved_logs <= paused_at + 1, "pause must stop new logs from starting"
        stats_shown = _text(app, "#migrate-stats")
        assert "paused" in stats_shown and "ETA paused" in stats_shown and stats_shown.count("ETA") == 1
        assert "uploaded to S3 (raw)" in stats_shown and "stored in the database (compressed)" in stats_shown
        # Paused time does not count: the ETA and elapsed stand still (1 s went by).
        if screen.stats.moved_logs == paused_at:
            assert abs(screen.stats.elapsed - elapsed_paused) < 0.2
            assert eta_paused is None or abs(screen.stats.eta - eta_paused) < 0.5
        await pilot.press("c")
        await wait_until(pilot, lambda: not screen.running, what="cancelled")
        assert "cancelled" in _text(app, "#migrate-stats")
        first_moved = screen.stats.moved_logs
        assert first_moved < 30

        await pilot.press("s")
        await wait_until(pilot, lambda: isinstance(app.screen, ReasonModal), what="reason modal 2")
        await pilot.press(*"resume", "enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmModal), what="confirm modal 2")
        await pilot.press("y")
        await wait_until(pilot, lambda: not screen.running and screen.stats.state == "finished", what="finished")
        assert screen.stats.moved_logs == 30 - first_moved
        bar = screen.query_one("#migrate-progress", ProgressBar)
        assert bar.percentage == 1.0
        assert "finished" in _text(app, "#migrate-stats")


# -- restore from the browse steps screen, orphans view on the migrate screen --------------------


def _moved_world(settings, n=3):
    from console.migrate import MigrationOptions, migrate_logs

    logs = [json.dumps({"stdout": f"step {i} " + "z" * 30_000, "exit_code": i}).encode() for i in range(n)]
    ids = seed_world(settings, logs)
    db, store = Database(settings), ObjectStore(settings)
    try:
        migrate_logs(settings, db, store, MigrationOptions(min_size=0, concurrency=2))
        result_id = db.fetch_one("SELECT auto_test_result_id AS r FROM auto_test_step_result WHERE id = %s",
                                 (ids[0],))["r"]
    finally:
        db.close()
    return dict(zip(ids, logs)), result_id


async def test_steps_screen_restores_a_moved_log_through_confirm_and_reason(empty_db):
    from screens.browse import StepsScreen
    from tests.migrate_support import placement

    expected, result_id = _moved_world(empty_db)
    target = sorted(expected)[1]
    app = AtcApp(empty_db)
    async with app.run_test(size=SIZE) as pilot:
        app.push_screen(StepsScreen(result_id))
        await wait_until(pilot, lambda: isinstance(app.screen, StepsScreen) and len(app.screen.table.order) == 3,
                         what="steps loaded")
        screen = app.screen
        screen.table.move_cursor(row=[str(r) for r in screen.table.order].index(str(target)))
        await pilot.pause(0.05)
        assert screen.table.current_row()["id"] == target
        await pilot.press("R")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmModal), what="confirm modal")
        assert any(f"step result {target}" in line and "step-result/" in line for line in app.screen.lines)
        await pilot.press("y")
        await wait_until(pilot, lambda: isinstance(app.screen, ReasonModal), what="reason modal")
        await pilot.press(*"INC-7 grader needs it inline", "enter")
        await wait_until(pilot, lambda: placement(empty_db, target)["inline"], what="restored")
        await wait_until(pilot, lambda: any("restored to the database" in str(n.message) for n in app._notifications),
                         what="restored notification")
        # The list reloads: the row now says the log is in the database; R on it refuses politely.
        await wait_until(pilot, lambda: screen.table.current_row() is not None
                         and screen.table.current_row()["id"] == target
                         and screen.table.current_row()["log_where"] == "db", what="row reloaded")
        await pilot.press("R")
        await pilot.pause(0.1)
        assert not isinstance(app.screen, ConfirmModal)
        assert any("not in S3" in str(n.message) for n in app._notifications)
    store = ObjectStore(empty_db)
    assert assert_every_log_intact(empty_db, store, expected) == {"db": 1, "s3": 2, "half": 0}
    db = Database(empty_db)
    try:
        audit = db.fetch_one("SELECT reason, outcome, targets FROM atc.audit WHERE action = 'restore-log' ORDER BY id DESC LIMIT 1")
        assert audit["reason"] == "INC-7 grader needs it inline" and audit["outcome"] == "ok"
    finally:
        db.close()


async def test_orphans_view_lists_and_cleans_exactly_what_was_confirmed(empty_db):
    import psycopg

    from console.orphans import scan
    from screens.migrate import OrphansScreen

    expected, _ = _moved_world(empty_db)
    ids = sorted(expected)
    store = ObjectStore(empty_db)
    orphan_key = store.log_key(900_001)
    store.put_bytes(orphan_key, b'{"left": "by a killed move"}')
    half = ids[0]
    with psycopg.connect(empty_db.database.dsn, autocommit=True) as conn:
        conn.execute("UPDATE auto_test_step_result SET log = %s::json WHERE id = %s", ('{"rewritten": 1}', half))
    expected[half] = b'{"rewritten": 1}'

    app = AtcApp(empty_db, start_mode="migrate")
    async with app.run_test(size=SIZE) as pilot:
        app.screen.query_one("#migrate-runs").focus()
        await pilot.press("o")
        await wait_until(pilot, lambda: isinstance(app.screen, OrphansScreen) and app.screen.scans >= 1, what="scan")
        screen = app.screen
        assert screen.query_one("#orphans-table").row_count == 2
        summary = _text(app, "#orphans-summary")
        assert "1 orphans" in summary and "1 half-finished" in summary
        screen.query_one("#orphans-older-than", Input).value = "0"
        screen.query_one("#orphans-table").focus()
        # Appears after the scan the operator looks at: not in the confirmation, so never deleted.
        late_key = store.log_key(900_002)
        store.put_bytes(late_key, b"{}")
        await pilot.press("x")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmModal), what="confirm modal")
        lines = app.screen.lines
        assert len(lines) == 2
        assert any(orphan_key in line and "delete orphan" in line for line in lines)
        assert any(f"step result {half}" in line and "keep the database copy" in line for line in lines)
        assert not any(late_key in line for line in lines)
        await pilot.press("y")
        await wait_until(pilot, lambda: isinstance(app.screen, ReasonModal), what="reason modal")
        await pilot.press(*"tidy after crash", "enter")
        await wait_until(pilot, lambda: isinstance(app.screen, OrphansScreen) and app.screen.scans >= 2, what="rescan")
        assert any("cleaned 2 item(s)" in str(n.message) for n in app._notifications)
        assert screen.query_one("#orphans-table").row_count == 1  # only the late orphan is left

    db = Database(empty_db)
    try:
        report = scan(db, store)
        assert [o["key"] for o in report.orphans] == [late_key]
        assert report.half_finished == []
        audit = db.fetch_one("SELECT reason, details FROM atc.audit WHERE action = 'orphans-delete' ORDER BY id DESC LIMIT 1")
        assert audit["reason"] == "tidy after crash" and audit["details"]["confirmed"] == 2
    finally:
        db.close()
    assert assert_every_log_intact(empty_db, store, expected)["half"] == 0

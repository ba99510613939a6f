"""SVG snapshots of the main browse screens at 120x36 on fixed data (tests/browse_world.py).

The database is reached through libpq's environment (PGHOST/PGPORT/...) and the S3 endpoint is a
fixed name, so the status line does not show the test run's random ports. Update with
``pytest tests/test_snapshots.py --snapshot-update`` after checking the new SVGs by eye.
"""

from __future__ import annotations

import time
from dataclasses import replace

import psycopg
import pytest

from browse_world import make_world
from screens.app import AtcApp
from screens.browse import AssignmentsScreen, StepsScreen
from screens.widgets import PagedTable

SIZE = (120, 36)


@pytest.fixture
def snapshot_settings(empty_db, monkeypatch):
    import screens.app as app_module

    # Only the Browse section, so the footer does not change as other sections are added.
    monkeypatch.setattr(app_module, "SECTIONS", [s for s in app_module.SECTIONS if s.mode == "browse"])
    make_world(empty_db.database.dsn)
    info = psycopg.conninfo.conninfo_to_dict(empty_db.database.dsn)
    for key, env in (("host", "PGHOST"), ("port", "PGPORT"), ("dbname", "PGDATABASE"), ("user", "PGUSER")):
        if info.get(key):
            monkeypatch.setenv(env, str(info[key]))
    return replace(empty_db, database=replace(empty_db.database, dsn=""),
                   s3=replace(empty_db.s3, endpoint_url="http://s3.example:8333", bucket="atc-logs"))


async def settle(pilot, screen_type, *, stats: bool = False, timeout: float = 15.0):
    app = pilot.app
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.02)
        screen = app.screen
        if (isinstance(screen, screen_type) and screen.token is None and app.connection_state == "ok"
                and screen.query(PagedTable) and screen.query_one(PagedTable).row_count > 0
                and (not stats or getattr(screen, "stats_token", None) is None)
                and not app._notifications):
            await app.workers.wait_for_complete()
            await pilot.pause()
            return
    raise AssertionError("screen did not settle")


def test_assignments_screen(snap_compare, snapshot_settings):
    async def run_before(pilot):
        await settle(pilot, AssignmentsScreen, stats=True)
        await pilot.press("down")
        await pilot.pause()

    assert snap_compare(AtcApp(snapshot_settings), terminal_size=SIZE, run_before=run_before)


def test_steps_screen(snap_compare, snapshot_settings):
    async def run_before(pilot):
        await settle(pilot, AssignmentsScreen, stats=True)
        pilot.app.open_screen("open_result", 1)
        await settle(pilot, StepsScreen)
        await pilot.press("down")
        await pilot.pause()

    assert snap_compare(AtcApp(snapshot_settings), terminal_size=SIZE, run_before=run_before)


def test_help_screen(snap_compare, snapshot_settings):
    async def run_before(pilot):
        await settle(pilot, AssignmentsScreen, stats=True)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(AtcApp(snapshot_settings), terminal_size=SIZE, run_before=run_before)

"""Pilot tests of the Textual app on a real PostgreSQL: drill-down, filters, cancel, modes, help."""

from __future__ import annotations

import time
from dataclasses import replace

import psycopg
import pytest
from textual.widgets import Input, Static

from browse_world import HOSTILE_NAME, make_world
from screens.app import AtcApp, Section, parse_command_line
from console.text import one_line
from screens.browse import NAME_WIDTH, AssignmentsScreen, ResultsScreen, RunsScreen, StepsScreen
from screens.widgets import ConfirmModal, PagedTable, ReasonModal, StatusLine

SIZE = (120, 36)


@pytest.fixture
def world(empty_db):
    make_world(empty_db.database.dsn)
    return empty_db


async def wait_until(pilot, predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.02)
        if predicate():
            return
    raise AssertionError("condition not reached in time")


def table_of(app) -> PagedTable:
    return app.screen.query_one(PagedTable)


def loaded(app, screen_type):
    def check():
        return isinstance(app.screen, screen_type) and app.screen.token is None and table_of(app).row_count > 0
    return check


def cell_texts(table: PagedTable, column: str) -> list[str]:
    return [table.get_cell(rid, column).plain for rid in table.order]


async def test_drill_from_assignment_to_step_and_back(world):
    app = AtcApp(world)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, loaded(app, AssignmentsScreen))
        table = table_of(app)
        assert cell_texts(table, "id") == ["1", "2", "3", "4"]
        # shown literally (markup not applied), capped with an ellipsis; the row detail has it whole
        assert cell_texts(table, "name")[2] == one_line(HOSTILE_NAME, NAME_WIDTH)
        assert table.held_rows()[2]["name"] == HOSTILE_NAME
        assert "⏸ alice" in cell_texts(table, "paused")[1]
        # the second query fills the log bytes column after the page painted
        await wait_until(pilot, lambda: cell_texts(table_of(app), "log_bytes")[0] not in ("…", ""))
        assert cell_texts(table, "runs") == ["2", "1", "1", "0"]

        await pilot.press("enter")
        await wait_until(pilot, loaded(app, RunsScreen))
        assert "Hello world" in app.screen.query_one("#title").render().plain
        assert cell_texts(table_of(app), "id") == ["2", "1"]  # newest first
        assert cell_texts(table_of(app), "state") == ["running", "done"]

        await pilot.press("enter")
        await wait_until(pilot, loaded(app, ResultsScreen))
        assert cell_texts(table_of(app), "state") == ["passed", "failed", "running"]

        await pilot.press("enter")
        await wait_until(pilot, loaded(app, StepsScreen))
        steps = table_of(app)
        assert cell_texts(steps, "step_order") == ["0", "1", "2"]
        assert cell_texts(steps, "log_where") == ["db", "db", "db"]

        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, ResultsScreen))
        await pilot.press("backspace")
        await wait_until(pilot, lambda: isinstance(app.screen, RunsScreen))


async def test_steps_show_where_logs_live(world):
    app = AtcApp(world)
    async with app.run_test(size=SIZE) as pilot:
        app.open_screen("open_result", 1)
        await wait_until(pilot, loaded(app, StepsScreen))
        assert cell_texts(table_of(app), "log_where") == ["db", "s3", "none"]
        assert cell_texts(table_of(app), "log_bytes")[1] == "1.0 MiB"
        await pilot.press("down", "down", "enter")  # the step without a log
        await pilot.pause()
        assert any("has no log" in n.message for n in app._notifications)


async def test_filter_is_literal_text_not_sql_or_markup(world):
    app = AtcApp(world)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, loaded(app, AssignmentsScreen))
        await pilot.press("slash")
        assert isinstance(app.focused, Input)
        app.focused.value = HOSTILE_NAME
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen.token is None and table_of(app).row_count == 1)
        assert cell_texts(table_of(app), "name") == [one_line(HOSTILE_NAME, NAME_WIDTH)]
        assert HOSTILE_NAME in app.screen.query_one("#summary").render().plain
        # LIKE wildcards are literal too: "100%_" matches only the name containing it
        await pilot.press("slash")
        app.focused.value = "100%_"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen.token is None and cell_texts(table_of(app), "id") == ["4"])
        # after Enter the list has the focus again: the next key drives the list, not the filter
        await pilot.pause()
        assert table_of(app).has_focus
        await pilot.press("slash")
        app.focused.value = "%"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen.token is None and cell_texts(table_of(app), "id") == ["4"])
        # state filter from the same box
        await pilot.press("slash")
        app.focused.value = "state:paused"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen.token is None and cell_texts(table_of(app), "id") == ["2"])
    with psycopg.connect(world.database.dsn) as conn:
        assert conn.execute('SELECT count(*) FROM "Assignment"').fetchone()[0] == 4


async def test_sort_cycles_and_keeps_keyset(world):
    app = AtcApp(world)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, loaded(app, AssignmentsScreen))
        await pilot.press("s")  # name
        await wait_until(pilot, lambda: app.screen.token is None and cell_texts(table_of(app), "id") == ["3", "1", "2", "4"])
        await pilot.press("s")  # deadline, no deadline last
        await wait_until(pilot, lambda: app.screen.token is None and cell_texts(table_of(app), "id") == ["2", "1", "4", "3"])


async def test_paged_table_holds_a_bounded_window(empty_db, make_settings):
    make_world(empty_db.database.dsn, results_per_run=40)
    settings = replace(empty_db, ui=replace(empty_db.ui, page_size=5))
    app = AtcApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        app.open_screen("open_run", 2)  # assignment 1's second run: 40 results
        await wait_until(pilot, loaded(app, ResultsScreen))
        table = table_of(app)
        assert table.row_count == 5 and table.after_key is not None
        for _ in range(30):
            await pilot.press("down")
            await wait_until(pilot, lambda: app.screen.token is None)
        assert table.row_count <= 15  # window_pages (3) x page_size
        assert table.before_key is not None
        current = table.current_row()["id"]
        first_held = int(table.order[0])
        assert current > first_held
        for _ in range(30):
            await pilot.press("up")
            await wait_until(pilot, lambda: app.screen.token is None)
        assert table.before_key is None
        assert table.order[0] == str(min(int(r) for r in table.order))
        assert table.row_count <= 15


async def test_escape_cancels_a_slow_query_on_the_server(world, make_settings):
    # A session holding ACCESS EXCLUSIVE on "Assignment" makes the list query wait; atc's
    # lock_timeout is raised so the wait lasts until Escape.
    settings = replace(world, database=replace(world.database, lock_timeout="60s", statement_timeout="60s"))
    blocker = psycopg.connect(world.database.dsn)
    blocker.execute('LOCK TABLE "Assignment" IN ACCESS EXCLUSIVE MODE')
    watcher = psycopg.connect(world.database.dsn, autocommit=True)

    def atc_waiting() -> int:
        return watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'atc/%%' AND state = 'active' "
            "AND query LIKE '%%FROM \"Assignment\" a%%'").fetchone()[0]

    try:
        app = AtcApp(settings)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, AssignmentsScreen) and atc_waiting() == 1)
            assert table_of(app).loading  # a loading indicator is shown
            await pilot.press("escape")
            await wait_until(pilot, lambda: atc_waiting() == 0, timeout=5)
            await wait_until(pilot, lambda: app.screen.token is None)
            assert not table_of(app).loading
            assert any("cancelled" in n.message for n in app._notifications)
            assert isinstance(app.screen, AssignmentsScreen)  # Escape cancelled, it did not navigate
            blocker.rollback()
            await pilot.press("r")
            await wait_until(pilot, loaded(app, AssignmentsScreen))
    finally:
        blocker.close()
        watcher.close()


async def test_status_line_shows_target_operator_and_read_only(world):
    settings = replace(world, read_only=True)
    app = AtcApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.connection_state == "ok")
        status = app.screen.query_one(StatusLine).render_status().plain
        assert "READ-ONLY" in status
        assert app.db.describe() in status
        assert "operator tester" in status
        assert world.s3.endpoint_url in status
        assert "● ok" in status
        # read-only: the log-bytes cache is not written, but the numbers still show
        await wait_until(pilot, lambda: cell_texts(table_of(app), "log_bytes")[0] not in ("…", ""))
    with psycopg.connect(world.database.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM atc.assignment_stats").fetchone()[0] == 0


async def test_connection_loss_is_shown_not_crashed(world):
    settings = replace(world, database=replace(world.database, dsn="host=127.0.0.1 port=1 dbname=nope", connect_timeout=1))
    app = AtcApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.connection_state in ("stale", "reconnecting"))
        await wait_until(pilot, lambda: any("cannot connect" in n.message for n in app._notifications))
        assert isinstance(app.screen, AssignmentsScreen)


async def test_command_line(world):
    app = AtcApp(world)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, loaded(app, AssignmentsScreen))
        await pilot.press("colon")
        await pilot.press(*"a 3", "enter")
        await wait_until(pilot, loaded(app, RunsScreen))
        assert app.screen.assignment_id == 3
        await pilot.press("colon")
        await pilot.press(*"result 4", "enter")
        await wait_until(pilot, loaded(app, StepsScreen))
        await pilot.press("colon")
        await pilot.press(*"a 999", "enter")
        await wait_until(pilot, lambda: any("assignment 999 does not exist" in n.message for n in app._notifications))
        await wait_until(pilot, lambda: isinstance(app.screen, StepsScreen))  # the empty screen went away
        await pilot.press("colon")
        await pilot.press(*"frobnicate", "enter")
        await wait_until(pilot, lambda: any("unknown command" in n.message for n in app._notifications))
        await pilot.press("colon")
        await pilot.press("q", "enter")
        await pilot.pause()
    assert app.return_code == 0


def test_parse_command_line():
    sections = [Section("browse", "1", "Browse", "x:y"), Section("locks", "2", "Locks", "x:y")]
    assert parse_command_line(":a 12", sections).arg == 12
    assert parse_command_line("run 5", sections).name == "open_run"
    assert parse_command_line("log 123", sections).name == "open_log"
    assert parse_command_line("locks", sections).arg == "locks"
    assert parse_command_line("q", sections).name == "quit"
    with pytest.raises(Exception, match="needs one numeric id"):
        parse_command_line("a twelve", sections)
    with pytest.raises(Exception, match="unknown command"):
        parse_command_line("drop table", sections)


async def test_help_palette_and_sections_share_one_table(world):
    from screens.help import HelpScreen, binding_rows
    from screens.palette import AtcCommands

    app = AtcApp(world)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, loaded(app, AssignmentsScreen))
        rows = binding_rows(app.screen)
        descriptions = {r[2] for r in rows}
        assert {"Filter", "Sort", "Refresh", "Help", "Browse"} <= descriptions
        provider = AtcCommands(app.screen)
        titles = [title for title, _, _ in provider._entries()]
        assert "Go to Browse" in titles and "Filter" in titles and "Sort" in titles
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, AssignmentsScreen))


async def test_unavailable_section_and_mode_switch(world, monkeypatch):
    import screens.app as app_module

    monkeypatch.setattr(app_module, "SECTIONS", app_module.SECTIONS + [
        Section("nowhere", "9", "Nowhere", "screens.does_not_exist:Screen")])
    app = AtcApp(world)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, loaded(app, AssignmentsScreen))
        app.action_section("nowhere")
        await pilot.pause()
        assert "not available" in app.screen.query_one("#unavailable").render().plain
        assert app.screen.query(StatusLine)  # decorated like every screen
        await pilot.press("1")
        await wait_until(pilot, lambda: isinstance(app.screen, AssignmentsScreen))


async def test_confirm_and_reason_modals(world):
    results = []
    app = AtcApp(world)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, loaded(app, AssignmentsScreen))
        app.push_screen(ConfirmModal("Pause 2 assignments", ["assignment 1: Hello world", HOSTILE_NAME]), results.append)
        await pilot.pause()
        assert HOSTILE_NAME in "\n".join(w.render().plain for w in app.screen.query("Static"))
        await pilot.press("n")
        app.push_screen(ConfirmModal("x", ["y"]), results.append)
        await pilot.pause()
        await pilot.press("y")
        app.push_screen(ReasonModal("why"), results.append)
        await pilot.pause()
        await pilot.press("enter")  # empty reason refused
        assert isinstance(app.screen, ReasonModal)
        await pilot.press(*"INC-1", "enter")
        await pilot.pause()
        # the one confirm-and-run path: confirm, reason, action in a worker, outcome
        done = []
        app.confirm_and_run("Test action", ["thing 1"], lambda reason: f"did it because {reason}", on_done=done.append)
        await pilot.pause()
        await pilot.press("y")
        await pilot.pause()
        await pilot.press(*"because", "enter")
        await wait_until(pilot, lambda: done == ["did it because because"])
    assert results == [False, True, "INC-1"]


async def test_demo_data_drill_to_log(demo_db):
    """On the seeded demo: assignments → runs → results → steps → the log viewer (if built)."""
    app = AtcApp(demo_db)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, loaded(app, AssignmentsScreen), timeout=20)
        assert table_of(app).row_count > 0
        # find an assignment that has runs
        table = table_of(app)
        target = next(i for i, r in enumerate(table.held_rows()) if r["runs"] > 0)
        table.move_cursor(row=target)
        await pilot.press("enter")
        await wait_until(pilot, loaded(app, RunsScreen), timeout=20)
        await pilot.press("enter")
        await wait_until(pilot, loaded(app, ResultsScreen), timeout=20)
        await pilot.press("enter")
        await wait_until(pilot, loaded(app, StepsScreen), timeout=20)
        steps = table_of(app)
        with_log = next((i for i, r in enumerate(steps.held_rows()) if r["log_where"] != "none"), None)
        assert with_log is not None
        steps.move_cursor(row=with_log)
        try:
            from screens.log_viewer import LogViewerScreen
        except ImportError:
            return  # the viewer is another part's; the drill above is what this test owns
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, LogViewerScreen), timeout=20)


async def test_q_quits_but_typing_q_in_a_filter_does_not(world):
    app = AtcApp(world)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, loaded(app, AssignmentsScreen))
        await pilot.press("slash", "q")
        await pilot.pause()
        assert app.is_running and isinstance(app.focused, Input) and app.focused.value == "q"
        await pilot.press("escape")
        await pilot.pause()
        table_of(app).focus()
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


# -- newcomer findings: columns, ages, dead screens, help, habits ------------------------------------


def column_span(table: PagedTable, key: str) -> tuple[int, int]:
    """(start, end) x of a column inside the table's virtual width."""
    x = 0
    for column_key, column in table.columns.items():
        width = column.get_render_width(table)
        if column_key.value == key:
            return x, x + width
        x += width
    raise KeyError(key)


async def test_assignment_columns_fit_and_scroll_sideways(world):
    with psycopg.connect(world.database.dsn, autocommit=True) as conn:
        conn.execute("""UPDATE "Assignment" SET name = 'A very long assignment name that goes on and on and on' WHERE id = 1""")
        conn.execute("""UPDATE "Course" SET name = 'Introduction to programming with Python, spring term' WHERE id = 1""")
    app = AtcApp(world)
    async with app.run_test(size=(120, 36)) as pilot:
        await wait_until(pilot, loaded(app, AssignmentsScreen))
        await wait_until(pilot, lambda: app.screen.stats_token is None
                         and cell_texts(table_of(app), "log_bytes")[0] not in ("…", ""))
        await pilot.pause()
        table = table_of(app)
        # the log-bytes cell that replaced "…" is shown whole (it was cut to "221." before)
        for rid in table.order:
            text = table.get_cell(rid, "log_bytes").plain
            assert text.endswith("B") and len(text) <= column_span(table, "log_bytes")[1] - column_span(table, "log_bytes")[0] - 2
        assert cell_texts(table, "name")[0].endswith("…") and len(cell_texts(table, "name")[0]) <= 22
        assert cell_texts(table, "course")[0].endswith("…")
        # a pause (a refresh that makes the Paused cells wider) keeps Logs and Paused on screen
        await pilot.press("r")
        await wait_until(pilot, loaded(app, AssignmentsScreen))
        await pilot.pause()
        visible = table.scrollable_content_region.width
        for key in ("paused", "log_bytes", "stats_as_of"):
            assert column_span(table, key)[1] <= visible, key
        # wider data than the screen: right / ctrl+pagedown scroll to the last column
        with psycopg.connect(world.database.dsn, autocommit=True) as conn:
            conn.execute("""UPDATE "AutoTestResult" SET state = s::autoteststepresultstate FROM (VALUES (1, 'timed_out'), (2, 'skipped'),
                            (4, 'not_started')) v(i, s) WHERE id = v.i""")
    app = AtcApp(world)
    async with app.run_test(size=(100, 36)) as pilot:
        await wait_until(pilot, loaded(app, AssignmentsScreen))
        table = table_of(app)
        await pilot.pause()
        assert table.max_scroll_x > 0
        await pilot.press("right")
        await wait_until(pilot, lambda: table.scroll_x > 0)
        await pilot.press("ctrl+pagedown")
        await wait_until(pilot, lambda: table.scroll_x == table.max_scroll_x)


async def test_logs_age_is_the_age_of_the_cached_figure_and_counts_are_live(world):
    with psycopg.connect(world.database.dsn, autocommit=True) as conn:
        # a cached figure from 5 minutes ago (younger than the 10-minute refresh, so it is kept)
        conn.execute("""INSERT INTO atc.assignment_stats (assignment_id, step_results, log_bytes_db, log_bytes_s3, computed_at)
                        SELECT id, 1, 1000, 0, now() - interval '5 minutes 10 seconds' FROM "Assignment" """)
    app = AtcApp(world)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, loaded(app, AssignmentsScreen))
        table = table_of(app)
        assert table.columns[next(k for k in table.columns if k.value == "stats_as_of")].label.plain == "Logs age"
        assert cell_texts(table, "stats_as_of")[0] == "5m"     # not "now"
        assert "counted 5m ago, cached" in app.screen.query_one("#summary").render().plain
        assert "read <1m ago" in app.screen.query_one("#summary").render().plain
        before = cell_texts(table, "results_by_state")[0]
        with psycopg.connect(world.database.dsn, autocommit=True) as conn:
            conn.execute("UPDATE atc.assignment_stats SET computed_at = now() - interval '2 minutes 5 seconds'")
            conn.execute("""UPDATE "AutoTestResult" SET state = 'failed' WHERE auto_test_run_id = 2 AND state = 'passed'""")
        # drilling down and coming back re-reads the list: counts match what the runs view shows
        await pilot.press("enter")
        await wait_until(pilot, loaded(app, RunsScreen))
        runs_view = "".join(cell_texts(table_of(app), "results_by_state"))
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, AssignmentsScreen) and app.screen.token is None
                         and cell_texts(table_of(app), "results_by_state")[0] != before)
        assert "✗2" in cell_texts(table_of(app), "results_by_state")[0] and "✗2" in runs_view
        assert cell_texts(table_of(app), "stats_as_of")[0] == "2m"  # the reload re-read the cache age


async def test_failed_open_leaves_no_dead_screen(world):
    from screens.log_viewer import LogViewerScreen

    app = AtcApp(world)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, loaded(app, AssignmentsScreen))
        depth = len(app.screen_stack)
        for text in ("log 99999999999999999999", "log 987654", "a 99999999999999999999"):
            app._notifications.clear()
            await pilot.press("colon")
            await pilot.press(*text, "enter")
            await wait_until(pilot, lambda: any(n.severity == "error" for n in app._notifications))
            await wait_until(pilot, lambda: isinstance(app.screen, AssignmentsScreen))
            assert len(app.screen_stack) == depth
            assert not any(isinstance(s, LogViewerScreen) for s in app.screen_stack)


async def test_help_has_human_groups_in_key_order_and_palette_no_noise(world):
    from screens.help import HelpScreen, binding_rows
    from screens.palette import AtcCommands

    app = AtcApp(world)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, loaded(app, AssignmentsScreen))
        rows = binding_rows(app.screen)
        groups = list(dict.fromkeys(r[0] for r in rows))
        assert groups == ["Assignments", "List", "Everywhere"]
        shown = " ".join(f"{k} {d}" for _, k, d in rows)
        for noise in ("Screen", "PagedTable", "super+c", "Focus Next", "Copy", "Cursor"):
            assert noise not in shown and noise not in " ".join(groups)
        section_keys = [k for _, k, d in rows if d in {s.title for s in app.sections}]
        assert section_keys == sorted(section_keys)
        titles = [t for t, _, _ in AtcCommands(app.screen)._entries()]
        assert not any(t.startswith("Cursor") for t in titles)
        assert "Quit" in titles and "Open log by id" in titles
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert "Keys: Assignments" in app.screen.query_one(Static).render().plain
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, AssignmentsScreen))
        # the palette's "Open log by id" opens the command line holding "log "
        callback = next(cb for t, _, cb in AtcCommands(app.screen)._entries() if t == "Open log by id")
        callback()
        await wait_until(pilot, lambda: isinstance(app.focused, Input) and app.focused.value == "log ")
        await pilot.press("escape")


async def test_jk_and_filter_escape_semantics(world):
    app = AtcApp(world)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, loaded(app, AssignmentsScreen))
        table = table_of(app)
        await pilot.press("j", "j")
        assert table.cursor_row == 2
        await pilot.press("k")
        assert table.cursor_row == 1
        # apply a filter, then edit without applying and press Escape: the edit is dropped
        await pilot.press("slash")
        app.focused.value = "Hello"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen.token is None and cell_texts(table_of(app), "id") == ["1"])
        await pilot.press("slash")
        app.focused.value = "Linked"
        await pilot.press("escape")
        await pilot.pause()
        filter_input = app.screen.query_one("#filter", Input)
        assert filter_input.value == "Hello" and not filter_input.display and table_of(app).has_focus
        assert app.screen.search == "Hello" and cell_texts(table_of(app), "id") == ["1"]
        # emptying the box and pressing Escape clears the applied filter
        await pilot.press("slash")
        app.focused.value = ""
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen.token is None and cell_texts(table_of(app), "id") == ["1", "2", "3", "4"])
        assert app.screen.search is None

"""Browse screens: Assignments → Runs → Results → Steps → log viewer.

Enter drills down, Escape/Backspace goes back (Escape first cancels a running query), ``/``
filters (free text, plus ``state:NAME`` or a bare state name), ``s`` cycles the sort, ``r``
refreshes. Every query runs in a thread worker with a ``QueryToken``; Escape cancels the worker
and the server-side query. Lists are keyset-paginated through ``PagedTable``, which holds a
bounded window of pages. No SQL here: everything goes through ``console.browse``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Input, Static

from console import browse
from console.errors import AtcError, Cancelled
from console.text import human_bytes, human_duration, one_line

from .widgets import ColumnSpec, PagedTable, cell, state_cell
from .broker import PAUSE_BINDINGS, PauseActions, mark_column
from .migrate import RESTORE_BINDINGS, RestoreLogAction

_STATE_MARKS = {"passed": "✓", "failed": "✗", "timed_out": "⧗", "running": "▶", "not_started": "·", "skipped": "–"}


def by_state_cell(counts: dict[str, int] | None) -> Text:
    text = Text()
    if not counts:
        return Text("-", style="dim")
    for state in browse.RESULT_STATES:
        n = counts.get(state)
        if n:
            if text:
                text.append(" ")
            text.append(f"{_STATE_MARKS[state]}{n}", style=state_cell(state).style)
    return text


def date_cell(value: datetime | None) -> Text:
    if value is None:
        return Text("-", style="dim")
    return Text(value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M"))


def bytes_cell(value: int | None, unknown: str = "-") -> Text:
    if value is None:
        return Text(unknown, style="dim")
    return Text(human_bytes(value), justify="right")


def age(value: datetime | None) -> str:
    """How long ago ``value`` was, to the minute ("<1m", "4m", "2h05m", "3d02h")."""
    if value is None:
        return "-"
    seconds = max(0.0, (datetime.now(timezone.utc) - value).total_seconds())
    if seconds < 60:
        return "<1m"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m"
    return human_duration(seconds)


# Caps (ellipsis) of the free-text columns of the assignments list.
NAME_WIDTH = 22
COURSE_WIDTH = 14

# How often the "Logs age" column is rendered again (it is an age: it grows while on screen).
AGE_TICK_SECONDS = 15.0


def parse_filter(text: str, states: tuple[str, ...]) -> tuple[str | None, str | None]:
    """'/' filter text -> (state, search). ``state:x`` or a bare state name filters by state;
    everything else is literal search text."""
    state = None
    rest: list[str] = []
    for word in text.split():
        low = word.lower()
        if low.startswith("state:") and low[6:] in states:
            state = low[6:]
        elif low in states and state is None:
            state = low
        else:
            rest.append(word)
    search = " ".join(rest).strip() or None
    return state, search


class ListScreen(Screen):
    """A keyset-paginated list with filter, sort, refresh, drill-down and cancellable loading."""

    kind: ClassVar[str] = ""
    states: ClassVar[tuple[str, ...]] = ()
    AUTO_FOCUS = "#list"
    BINDINGS = [
        Binding("escape", "back_or_cancel", "Back/cancel", id="browse.back"),
        Binding("backspace", "back", "Back", show=False, id="browse.back_key"),
        Binding("slash", "filter", "Filter", key_display="/", id="browse.filter"),
        Binding("s", "cycle_sort", "Sort", id="browse.sort"),
        Binding("r", "refresh", "Refresh", id="browse.refresh"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.sort = browse.sort_names(self.kind)[0]
        self.state_filter: str | None = None
        self.search: str | None = None
        self.token: browse.QueryToken | None = None
        self.loading_direction: str | None = None
        self.header_row: dict[str, Any] | None = None
        self.applied_filter = ""  # the filter text in force (Escape in the box goes back to it)
        self.loaded_at: datetime | None = None  # when the list on screen was read
        self._reload_on_resume = False

    # -- to fill in by subclasses --------------------------------------------------------------

    def columns(self) -> list[ColumnSpec]:
        raise NotImplementedError

    def fetch_header(self, token: browse.QueryToken) -> dict[str, Any] | None:
        return None

    def fetch_page(self, *, after: Any, before: Any, limit: int, token: browse.QueryToken):
        raise NotImplementedError

    def title_text(self) -> Text:
        raise NotImplementedError

    def drill(self, row: dict[str, Any]) -> None:
        pass

    def describe_row(self, row: dict[str, Any]) -> Text:
        return Text("")

    # -- layout --------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(self.title_text(), classes="screen-title", id="title")
        yield Input(placeholder="filter: text, id, or state:NAME — Enter applies, Escape closes",
                    id="filter", classes="filter-bar")
        page_size = self.app.settings.ui.page_size if hasattr(self.app, "settings") else 100
        yield PagedTable(self.columns(), row_id=lambda r: r["id"], row_key=browse.row_key,
                         page_size=page_size, id="list")
        yield Static(Text(""), classes="summary", id="summary")

    @property
    def table(self) -> PagedTable:
        return self.query_one("#list", PagedTable)

    def on_mount(self) -> None:
        self.query_one("#filter", Input).display = False
        self.table.focus()
        self.set_interval(AGE_TICK_SECONDS, self.tick_ages)
        self.reload()

    def tick_ages(self) -> None:
        """Ages on screen grow with time: render them again (no query)."""
        if self.token is None and self.is_mounted:
            self.update_summary()

    # -- loading ---------------------------------------------------------------------------------

    def reload(self) -> None:
        self.start_load("first", None)

    def start_load(self, direction: str, key: Any) -> None:
        if self.token is not None:
            self.token.cancel()
        self.token = browse.QueryToken()
        self.loading_direction = direction
        if direction == "first":
            self.table.loading = True
        self.set_summary(Text("loading… (Escape cancels)", style="dim"))
        self.load(direction, key, self.token)

    @work(thread=True, exclusive=True, group="browse-list", exit_on_error=False)
    def load(self, direction: str, key: Any, token: browse.QueryToken) -> None:
        try:
            header = self.fetch_header(token) if direction == "first" else None
            page = self.fetch_page(after=key if direction == "after" else None,
                                   before=key if direction == "before" else None,
                                   limit=self.table.page_size, token=token)
        except AtcError as exc:
            self.app.call_from_thread(self._load_failed, exc, token)
            return
        self.app.call_from_thread(self._loaded, direction, header, page, token)

    def _loaded(self, direction: str, header: dict[str, Any] | None, page, token: browse.QueryToken) -> None:
        if token is not self.token:
            return  # a newer load replaced this one
        self.token = None
        self.loading_direction = None
        table = self.table
        table.loading = False
        self._refocus_table_after_filter()
        if direction == "first":
            if header is not None:
                self.header_row = header
                self.query_one("#title", Static).update(self.title_text())
            table.load_first(page.rows, page.next_after)
            self.loaded_at = datetime.now(timezone.utc)
        elif direction == "after":
            table.append_page(page.rows, page.next_after)
        else:
            table.prepend_page(page.rows, page.next_after is not None)
        self.update_summary()
        self.after_page(page.rows)

    def after_page(self, rows: list[dict[str, Any]]) -> None:
        """Hook for a second, slower query over the rows just painted."""

    def _load_failed(self, exc: AtcError, token: browse.QueryToken) -> None:
        if token is not self.token:
            return
        self.token = None
        direction = self.loading_direction
        self.loading_direction = None
        self.table.loading = False
        self._refocus_table_after_filter()
        self.table.waiting = None
        self.update_summary()
        if isinstance(exc, Cancelled):
            self.notify("query cancelled", markup=False)
            return
        self.app.note_error(exc) if hasattr(self.app, "note_error") else self.notify(exc.message, severity="error", markup=False)
        # A screen opened for an id that does not exist (or cannot: out of range) must not stay in
        # the back stack as a dead page: it goes away, the notification says why.
        if direction == "first" and self.header_row is None and type(self).fetch_header is not ListScreen.fetch_header:
            self.dismiss_if_possible()

    def cancel_loading(self) -> bool:
        """Cancel the running query (worker and server side). True if there was one."""
        if self.token is None:
            return False
        self.token.cancel()
        self.workers.cancel_group(self, "browse-list")
        return True

    # -- table events ----------------------------------------------------------------------------

    def on_paged_table_need_rows(self, event: PagedTable.NeedRows) -> None:
        if self.token is None:
            self.start_load(event.direction, event.key)
        else:
            event.table.waiting = None

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        row = self.table.rows_by_id.get(str(event.row_key.value))
        if row is not None:
            self.drill(row)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.update_summary()

    def update_summary(self) -> None:
        table = self.table
        text = Text()
        text.append(f"{table.row_count} row(s) held", style="dim")
        if table.after_key is not None:
            text.append(", more below", style="dim")
        if table.before_key is not None:
            text.append(", more above", style="dim")
        text.append(f" · sort: {browse.SORTS[self.kind][self.sort].label}", style="dim")
        if self.loaded_at is not None:
            text.append(f" · read {age(self.loaded_at)} ago (r reloads)", style="dim")
        if self.state_filter or self.search:
            text.append(" · filter: ", style="dim")
            text.append(one_line(" ".join(x for x in (f"state:{self.state_filter}" if self.state_filter else "",
                                                       self.search or "") if x), 80))
        row = table.current_row()
        if row is not None:
            detail = self.describe_row(row)
            if detail:
                text.append("\n")
                text.append_text(detail)
        self.set_summary(text)

    def set_summary(self, text: Text) -> None:
        self.query_one("#summary", Static).update(text)

    # -- actions -----------------------------------------------------------------------------

    # -- coming back ------------------------------------------------------------------------------

    def on_screen_suspend(self) -> None:
        # Covered by a drill-down or another section (not by a modal such as help): the counts on
        # this list are re-read when the operator comes back, so they are never older than the view.
        self._reload_on_resume = not isinstance(self.app.screen, ModalScreen)

    def on_screen_resume(self) -> None:
        if self._reload_on_resume and self.loaded_at is not None and self.token is None:
            self._reload_on_resume = False
            self.reload()

    def action_back_or_cancel(self) -> None:
        filter_input = self.query_one("#filter", Input)
        if filter_input.has_focus:
            self.close_filter(filter_input)
            return
        if self.cancel_loading():
            return
        self.dismiss_if_possible()

    def action_back(self) -> None:
        self.cancel_loading()
        self.dismiss_if_possible()

    def dismiss_if_possible(self) -> None:
        if len(self.app.screen_stack) > 1 and self.app.screen is self:
            self.app.pop_screen()

    def action_filter(self) -> None:
        filter_input = self.query_one("#filter", Input)
        filter_input.display = True
        filter_input.focus()

    def close_filter(self, filter_input: Input) -> None:
        """Escape in the filter box: an unapplied edit is dropped (the applied filter stays), but an
        emptied box means "no filter" and clears it."""
        filter_input.display = False
        self.table.focus()
        if not filter_input.value.strip() and self.applied_filter:
            self.apply_filter("")
        else:
            filter_input.value = self.applied_filter

    def apply_filter(self, value: str) -> None:
        self.applied_filter = value.strip()
        self.state_filter, self.search = parse_filter(value, self.states)
        # The loading overlay can take focus back to the input; give it to the table once loaded.
        self._focus_table_when_loaded = True
        self.table.focus()
        self.reload()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "filter":
            return
        event.stop()
        self.applied_filter = event.value.strip()
        self.state_filter, self.search = parse_filter(event.value, self.states)
        if not event.value.strip():
            event.input.display = False
        # The loading overlay can take focus back to the input; give it to the table once loaded.
        self._focus_table_when_loaded = True
        self.table.focus()
        self.reload()

    def _refocus_table_after_filter(self) -> None:
        if getattr(self, "_focus_table_when_loaded", False):
            self._focus_table_when_loaded = False
            self.table.focus()

    def action_cycle_sort(self) -> None:
        names = browse.sort_names(self.kind)
        self.sort = names[(names.index(self.sort) + 1) % len(names)]
        self.notify(f"sort: {browse.SORTS[self.kind][self.sort].label}", markup=False, timeout=2)
        self.reload()

    def action_refresh(self) -> None:
        self.reload()


# -- the four screens ---------------------------------------------------------------------------


class AssignmentsScreen(PauseActions, ListScreen):
    """All assignments: state, deadline, runs, results by state, log bytes (cached, with age), pause.

    Mark rows with m, pause them with p, resume with u (screens.broker.PauseActions)."""

    help_title = "Assignments"

    BINDINGS = PAUSE_BINDINGS

    kind = "assignments"
    states = browse.ASSIGNMENT_STATES + ("paused",)
    stats_token: browse.QueryToken | None = None

    def title_text(self) -> Text:
        return Text("Assignments", style="bold")

    def columns(self) -> list[ColumnSpec]:
        # Name and Course are capped (ellipsis; the row detail below shows the full name) and the
        # columns after them have fixed widths, so Paused and Logs stay on screen from 120 columns
        # on; the results-by-state column, the only one that grows with the data, comes last.
        return [
            mark_column(),
            ColumnSpec("id", "ID", lambda r: Text(str(r["id"]), justify="right")),
            ColumnSpec("name", "Name", lambda r: cell(r["name"], NAME_WIDTH)),
            ColumnSpec("course", "Course", lambda r: cell(r["course"], COURSE_WIDTH)),
            ColumnSpec("state", "State", lambda r: state_cell(r["state"]), width=6),
            ColumnSpec("paused", "Paused", lambda r: Text("⏸ " + one_line(r["paused_by"] or "", 8), style="bold yellow")
                       if r["paused"] else Text(""), width=10),
            ColumnSpec("deadline", "Deadline", lambda r: date_cell(r["deadline"]), width=16),
            ColumnSpec("runs", "Runs", lambda r: Text(str(r["runs"]), justify="right"), width=5),
            ColumnSpec("log_bytes", "Logs", lambda r: bytes_cell(
                None if r.get("log_bytes_db") is None else (r["log_bytes_db"] or 0) + (r["log_bytes_s3"] or 0), "…"),
                width=10),
            # The age of the cached log-bytes figure (atc.assignment_stats), not of the list.
            ColumnSpec("stats_as_of", "Logs age", lambda r: Text(age(r.get("stats_as_of")), style="dim"), width=8),
            ColumnSpec("results_by_state", "Results", lambda r: by_state_cell(r["results_by_state"])),
        ]

    def tick_ages(self) -> None:
        self.table.rerender_column("stats_as_of")
        super().tick_ages()

    def fetch_page(self, *, after, before, limit, token):
        return browse.list_assignments(self.app.browse_db, state=self.state_filter, search=self.search,
                                       sort=self.sort, after=after, before=before, limit=limit, token=token)

    def drill(self, row: dict[str, Any]) -> None:
        self.app.push_screen(RunsScreen(row["id"]))

    def describe_row(self, row: dict[str, Any]) -> Text:
        text = Text()
        text.append(f"assignment {row['id']}: ")
        text.append(one_line(row["name"], 80))
        if row.get("paused"):
            text.append("  PAUSED", style="bold yellow")
            text.append(" by ")
            text.append(one_line(row.get("paused_by") or "?", 30))
            text.append(f" at {date_cell(row.get('paused_at')).plain}: ")
            text.append(one_line(row.get("pause_reason") or "", 80))
            if row.get("pause_expires_at"):
                text.append(f" (until {date_cell(row['pause_expires_at']).plain})")
        if row.get("log_bytes_db") is not None:
            text.append(f"  · logs DB {human_bytes(row['log_bytes_db'])}, S3 {human_bytes(row['log_bytes_s3'])}"
                        f" (counted {age(row.get('stats_as_of'))} ago, cached)", style="dim")
        return text

    def after_page(self, rows: list[dict[str, Any]]) -> None:
        ids = browse.stale_assignment_ids(rows)
        if ids:
            if self.stats_token is not None:
                self.stats_token.cancel()
            self.stats_token = browse.QueryToken()
            self.load_stats(ids, self.stats_token)

    @work(thread=True, exclusive=True, group="browse-stats", exit_on_error=False)
    def load_stats(self, ids: list[int], token: browse.QueryToken) -> None:
        """Second query: live log bytes for the painted page, then cached (unless read-only)."""
        try:
            stats = browse.compute_assignment_log_bytes(self.app.browse_db, ids, token=token)
        except Cancelled:
            return
        except AtcError as exc:
            self.app.call_from_thread(self.app.notify, f"log bytes: {exc.message}", severity="warning", markup=False)
            return
        if not self.app.settings.read_only:
            try:
                browse.store_assignment_stats(self.app.db, stats)
            except AtcError:
                pass  # the cache is an optimisation; the numbers are still shown
        self.app.call_from_thread(self._stats_loaded, stats, token)

    def _stats_loaded(self, stats: list[dict[str, Any]], token: browse.QueryToken) -> None:
        if token is not self.stats_token:
            return
        self.stats_token = None
        table = self.table
        for s in stats:
            table.update_row_values(s["assignment_id"], {
                "log_bytes_db": s["log_bytes_db"], "log_bytes_s3": s["log_bytes_s3"],
                "stats_step_results": s["step_results"], "stats_as_of": s["computed_at"],
            })
        self.update_summary()

    def cancel_loading(self) -> bool:
        cancelled = False
        if self.stats_token is not None:
            self.stats_token.cancel()
            self.stats_token = None
            self.workers.cancel_group(self, "browse-stats")
            cancelled = True
        return super().cancel_loading() or cancelled


class RunsScreen(ListScreen):
    help_title = "Runs"
    kind = "runs"

    def __init__(self, assignment_id: int) -> None:
        super().__init__()
        self.assignment_id = int(assignment_id)

    def title_text(self) -> Text:
        text = Text(f"Runs of assignment {self.assignment_id}", style="bold")
        if self.header_row:
            text.append(" · ")
            text.append(one_line(self.header_row["name"], 60))
            if self.header_row.get("course"):
                text.append(" (")
                text.append(one_line(self.header_row["course"], 40))
                text.append(")")
        return text

    def columns(self) -> list[ColumnSpec]:
        return [
            ColumnSpec("id", "Run", lambda r: Text(str(r["id"]), justify="right")),
            ColumnSpec("state", "State", lambda r: state_cell(r["state"])),
            ColumnSpec("started_date", "Started", lambda r: date_cell(r["started_date"])),
            ColumnSpec("results_by_state", "Results", lambda r: by_state_cell(r["results_by_state"])),
            ColumnSpec("total", "Total", lambda r: Text(str(sum((r["results_by_state"] or {}).values())), justify="right")),
            ColumnSpec("job_id", "Job", lambda r: cell(r["job_id"], 40)),
        ]

    def fetch_header(self, token):
        return browse.get_assignment(self.app.browse_db, self.assignment_id, token=token)

    def fetch_page(self, *, after, before, limit, token):
        return browse.list_runs(self.app.browse_db, self.assignment_id, sort=self.sort, after=after,
                                before=before, limit=limit, token=token)

    def drill(self, row: dict[str, Any]) -> None:
        self.app.push_screen(ResultsScreen(row["id"]))


class ResultsScreen(ListScreen):
    help_title = "Results"
    kind = "results"
    states = browse.RESULT_STATES

    def __init__(self, run_id: int) -> None:
        super().__init__()
        self.run_id = int(run_id)

    def title_text(self) -> Text:
        text = Text(f"Results of run {self.run_id}", style="bold")
        if self.header_row and self.header_row.get("assignment_name"):
            text.append(f" · assignment {self.header_row['assignment_id']} ")
            text.append(one_line(self.header_row["assignment_name"], 60))
        return text

    def columns(self) -> list[ColumnSpec]:
        return [
            ColumnSpec("id", "Result", lambda r: Text(str(r["id"]), justify="right")),
            ColumnSpec("student", "Student", lambda r: cell(r["student"], 30)),
            ColumnSpec("state", "State", lambda r: state_cell(r["state"])),
            ColumnSpec("started_at", "Started", lambda r: date_cell(r["started_at"])),
            ColumnSpec("runner_id", "Runner", lambda r: cell(str(r["runner_id"])[:8] if r["runner_id"] else "-")),
            ColumnSpec("steps_by_state", "Steps", lambda r: by_state_cell(r["steps_by_state"])),
            ColumnSpec("log_bytes_db", "Logs DB", lambda r: bytes_cell(r["log_bytes_db"])),
            ColumnSpec("log_bytes_s3", "Logs S3", lambda r: bytes_cell(r["log_bytes_s3"])),
        ]

    def fetch_header(self, token):
        return browse.get_run(self.app.browse_db, self.run_id, token=token)

    def fetch_page(self, *, after, before, limit, token):
        return browse.list_results(self.app.browse_db, self.run_id, state=self.state_filter, search=self.search,
                                   sort=self.sort, after=after, before=before, limit=limit, token=token)

    def drill(self, row: dict[str, Any]) -> None:
        self.app.push_screen(StepsScreen(row["id"]))


class StepsScreen(RestoreLogAction, ListScreen):
    """R restores the highlighted step's log from S3 into the database (screens.migrate)."""

    help_title = "Steps"

    kind = "steps"
    states = browse.RESULT_STATES
    BINDINGS = RESTORE_BINDINGS

    def __init__(self, result_id: int) -> None:
        super().__init__()
        self.result_id = int(result_id)

    def title_text(self) -> Text:
        text = Text(f"Steps of result {self.result_id}", style="bold")
        if self.header_row:
            text.append(" · ")
            text.append(one_line(self.header_row.get("student") or "", 40))
            text.append(f" · run {self.header_row['run_id']} · ")
            text.append_text(state_cell(self.header_row["state"]))
        return text

    def columns(self) -> list[ColumnSpec]:
        return [
            ColumnSpec("id", "Step result", lambda r: Text(str(r["id"]), justify="right")),
            ColumnSpec("step_order", "#", lambda r: Text(str(r["step_order"]), justify="right")),
            ColumnSpec("step_name", "Step", lambda r: cell(r["step_name"], 40)),
            ColumnSpec("step_type", "Type", lambda r: cell(r["step_type"])),
            ColumnSpec("state", "State", lambda r: state_cell(r["state"])),
            ColumnSpec("started_at", "Started", lambda r: date_cell(r["started_at"])),
            ColumnSpec("duration_s", "Duration", lambda r: Text(human_duration(r["duration_s"]), justify="right")),
            ColumnSpec("log_bytes", "Log size", lambda r: bytes_cell(r["log_bytes"])),
            ColumnSpec("log_where", "Where", lambda r: Text(r["log_where"], style={"s3": "cyan", "none": "dim"}.get(r["log_where"], ""))),
        ]

    def fetch_header(self, token):
        return browse.get_result(self.app.browse_db, self.result_id, token=token)

    def fetch_page(self, *, after, before, limit, token):
        return browse.list_steps(self.app.browse_db, self.result_id, state=self.state_filter, search=self.search,
                                 sort=self.sort, after=after, before=before, limit=limit, token=token)

    def describe_row(self, row: dict[str, Any]) -> Text:
        text = Text(f"step result {row['id']}: log in {row['log_where']}")
        if row["log_where"] == "s3":
            text.append(" key ")
            text.append(one_line(row.get("log_s3_key") or "", 100))
        elif row["log_where"] == "db":
            text.append(f", {human_bytes(row['log_stored_bytes'])} stored (compressed size)")
        return text

    def drill(self, row: dict[str, Any]) -> None:
        if row["log_where"] == "none":
            self.notify(f"step result {row['id']} has no log", markup=False)
            return
        if hasattr(self.app, "open_screen"):
            self.app.open_screen("open_log", row["id"])

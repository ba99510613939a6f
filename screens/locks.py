"""The lock screen: who blocks whom, live, and cancel/terminate through one confirm path.

A tree of root blockers with their waiters beneath (from ``console.locks``: exactly
pg_blocking_pids), refreshed live (``LiveScreen``: next poll when the last ends, ``space``
pauses, stale on connection loss). Rows are keyed by their path of pids and updated in place
when the tree's shape is unchanged, so a refresh does not flicker or move the cursor.

Keys: ``/`` filter, ``m`` mark/unmark a session, ``U`` clear marks, ``c`` cancel, ``t`` terminate
(the marked sessions, else the highlighted one), ``l`` show/hide what is locked. The highlighted
session's full query text and details show in the pane below the tree. Signals go through
``AtcApp.confirm_and_run`` (modal listing exactly what is signalled, reason, audit) and run on
their own connection (``console.signals.Signaller``).
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Input, Static

from console.db import Database
from console.locks import LockSession, LockSnapshot, TreeRow, take_snapshot
from console.signals import SignalReport, SignalTarget, Signaller
from console.text import human_duration, one_line, visible

from .live import LiveScreen
from .widgets import cell, state_cell

COLUMNS = [
    ("mark", " "), ("pid", "PID"), ("state", "STATE"), ("xact", "XACT"), ("since", "STATE FOR"),
    ("waits", "WAITING FOR / HOLDS"), ("who", "USER@DB"), ("app", "APP"), ("client", "CLIENT"),
    ("query", "QUERY"),
]
LOCK_COLUMNS = [("locktype", "TYPE"), ("relation", "RELATION"), ("mode", "MODE"), ("granted", "GRANTED"),
                ("waiting", "WAITING"), ("oldest_wait_start", "OLDEST WAIT SINCE")]

_STATE_STYLE = {"idle in transaction": "bold red", "idle in transaction (aborted)": "bold red",
                "active": "yellow", "idle": "dim", "prepared transaction": "bold magenta"}


def tree_label(row: TreeRow, last_in_parent: bool = False) -> Text:
    s = row.session
    text = Text()
    if row.depth:
        text.append("  " * (row.depth - 1) + ("└─ " if last_in_parent else "├─ "), style="dim")
    text.append("prepared" if s.pid == 0 else str(s.pid), style="bold" if row.depth == 0 else "")
    if row.cycle:
        text.append(" ↺ cycle", style="red")
    if s.workers:
        text.append(f" +{len(s.workers)}w", style="dim")
    return text


def row_cells(row: TreeRow, marked: bool, last_in_parent: bool) -> dict[str, Text]:
    s = row.session
    if s.waiting_for is not None:
        waits = Text(one_line(s.waiting_for.describe(), 80), style="yellow")
    elif s.holds:
        waits = Text(one_line("holds " + "; ".join(s.holds), 80), style="red")
    else:
        waits = Text("")
    return {
        "mark": Text("●" if marked else " ", style="bold magenta"),
        "pid": tree_label(row, last_in_parent),
        "state": Text(one_line(s.state or s.backend_type or "-", 30), style=_STATE_STYLE.get(s.state or "", "")),
        "xact": Text(human_duration(s.xact_age), justify="right"),
        "since": Text(human_duration(s.state_age), justify="right"),
        "waits": waits,
        "who": cell(f"{s.user or '?'}@{s.database or '?'}", 40),
        "app": cell(s.application_name, 30),
        "client": cell(s.client, 24),
        "query": cell(s.query, 120),
    }


def session_detail(s: LockSession) -> Text:
    """Everything about one session, plain text (the full query included)."""
    text = Text()
    text.append(f"pid {s.pid}" if s.pid else "prepared transaction", style="bold")
    facts = [
        ("state", s.state), ("user", s.user), ("database", s.database), ("application", s.application_name),
        ("client", s.client), ("backend started", s.backend_start.isoformat(timespec="seconds") if s.backend_start else None),
        ("transaction age", human_duration(s.xact_age) if s.xact_age is not None else None),
        ("in state for", human_duration(s.state_age) if s.state_age is not None else None),
        ("wait event", f"{s.wait_event_type}/{s.wait_event}" if s.wait_event_type else None),
        ("blocked by", ", ".join(map(str, s.blocked_by)) if s.blocked_by else None),
        ("waiting for", s.waiting_for.describe() if s.waiting_for else None),
        ("holds", "; ".join(s.holds) if s.holds else None),
        ("parallel workers", ", ".join(map(str, s.workers)) if s.workers else None),
    ]
    for label, value in facts:
        if value:
            text.append(f"  {label}: ", style="dim")
            text.append(one_line(value, 200))
    text.append("\n")
    text.append(visible(s.query, keep_newlines=True) or "(no query text visible)")
    return text


class LocksScreen(LiveScreen):
    """Who blocks whom, live."""

    CSS_PATH = "locks.tcss"
    AUTO_FOCUS = "#lock-tree"
    application_suffix = "/locks"
    BINDINGS = [
        Binding("slash", "filter", "Filter", key_display="/", id="locks.filter"),
        Binding("m", "mark", "Mark", id="locks.mark"),
        Binding("U", "clear_marks", "Clear marks", id="locks.clear_marks"),
        Binding("c", "signal('cancel')", "Cancel query", id="locks.cancel"),
        Binding("t", "signal('terminate')", "Terminate", id="locks.terminate"),
        Binding("l", "toggle_locks", "What is locked", id="locks.toggle_locks"),
        Binding("escape", "close_filter", "Close filter", show=False, id="locks.close_filter"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.snapshot: LockSnapshot | None = None
        self.filter_text = ""
        self.marked: dict[int, SignalTarget] = {}
        self.row_keys: list[str] = []
        self.rows_by_key: dict[str, TreeRow] = {}
        self.rebuilds = 0          # full rebuilds of the table (shape changes), for tests and tuning
        self.last_report: SignalReport | None = None

    def compose(self) -> ComposeResult:
        yield Static(Text("Locks — who blocks whom", style="bold"), classes="screen-title", id="locks-title")
        yield Static(Text(""), id="locks-state")
        yield Static(Text(""), id="locks-banner")
        yield Input(placeholder="filter: pid, user, app, query text, relation — Enter applies, Escape clears",
                    id="locks-filter", classes="filter-bar")
        table = DataTable(id="lock-tree", cursor_type="row", zebra_stripes=False)
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        yield table
        yield Static(Text(""), classes="summary", id="locks-summary")
        locked = DataTable(id="locked-objects", cursor_type="row", show_cursor=False)
        for key, label in LOCK_COLUMNS:
            locked.add_column(label, key=key)
        yield locked
        with VerticalScroll(id="locks-detail-pane"):
            yield Static(Text("Highlight a session to see its full query.", style="dim"), id="locks-detail")

    def on_mount(self) -> None:
        self.query_one("#locks-filter", Input).display = False
        self.query_one("#locks-banner", Static).display = False
        self.query_one("#lock-tree", DataTable).focus()
        super().on_mount()

    @property
    def tree(self) -> DataTable:
        return self.query_one("#lock-tree", DataTable)

    # -- live refresh --------------------------------------------------------------------------

    def fetch(self, db: Database) -> LockSnapshot:
        return take_snapshot(db)

    def show_state(self, text: Text, stale: bool) -> None:
        if self.snapshot is not None:
            text.append(f"  refreshed in {self.snapshot.elapsed_ms:.0f} ms", style="dim")
        self.query_one("#locks-state", Static).update(text)

    def show(self, snapshot: LockSnapshot) -> None:
        self.snapshot = snapshot
        banner = self.query_one("#locks-banner", Static)
        banner.display = bool(snapshot.warnings)
        if snapshot.warnings:
            banner.update(Text("\n".join(one_line(w, 240) for w in snapshot.warnings)))
        # Marks follow the session, not the pid: a reused pid is a different session.
        for pid, target in list(self.marked.items()):
            s = snapshot.sessions.get(pid)
            if s is None or s.backend_start != target.backend_start:
                del self.marked[pid]
        self.render_tree()
        self.render_locked()

    def render_tree(self) -> None:
        snapshot = self.snapshot
        if snapshot is None:
            return
        limit = self.app.settings.ui.lock_rows if hasattr(self.app, "settings") else 200
        rows, more = snapshot.rows(limit, filter_text=self.filter_text)
        keys = [r.key for r in rows]
        last_child = _last_children(rows)
        table = self.tree
        cursor_key = self.current_key()
        if keys == self.row_keys:
            # Same shape: update changed cells in place (no flicker, cursor stays).
            for r in rows:
                new = row_cells(r, r.session.pid in self.marked, r.key in last_child)
                for column, value in new.items():
                    if table.get_cell(r.key, column) != value:
                        table.update_cell(r.key, column, value)
        else:
            self.rebuilds += 1
            with self.app.batch_update():
                table.clear()
                for r in rows:
                    values = row_cells(r, r.session.pid in self.marked, r.key in last_child)
                    table.add_row(*(values[k] for k, _ in COLUMNS), key=r.key)
                if cursor_key in keys:
                    table.move_cursor(row=keys.index(cursor_key))
        self.row_keys = keys
        self.rows_by_key = {r.key: r for r in rows}
        summary = Text()
        if not rows:
            summary.append("No session waits on a lock." if not self.filter_text else "No tree matches the filter.",
                           style="green" if not self.filter_text else "dim")
        else:
            summary.append(f"{len(snapshot.roots)} blocking tree(s), {snapshot.waiting_count} waiting")
            if more:
                summary.append(f" — {more} more not shown (ui.lock_rows = {limit})", style="yellow")
        if self.filter_text:
            summary.append(f"  filter: {one_line(self.filter_text, 40)}", style="dim")
        if self.marked:
            summary.append(f"  marked: {', '.join(str(p) for p in sorted(self.marked))}", style="magenta")
        self.query_one("#locks-summary", Static).update(summary)
        self.update_detail()

    def render_locked(self) -> None:
        table = self.query_one("#locked-objects", DataTable)
        groups = [g for g in (self.snapshot.lock_summary if self.snapshot else []) if g.get("waiting")]
        groups = groups[:8]
        with self.app.batch_update():
            table.clear()
            for g in groups:
                table.add_row(cell(g.get("locktype")), cell(g.get("relation") or "-"), cell(g.get("mode")),
                              Text(str(g.get("granted", 0)), justify="right"),
                              Text(str(g.get("waiting", 0)), justify="right", style="yellow"),
                              cell(_since(g.get("oldest_wait_start")), 40))

    # -- selection, detail -----------------------------------------------------------------------

    def current_key(self) -> str | None:
        table = self.tree
        if table.row_count == 0:
            return None
        try:
            return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except Exception:
            return None

    def current_session(self) -> LockSession | None:
        key = self.current_key()
        row = self.rows_by_key.get(key) if key else None
        return row.session if row else None

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "lock-tree":
            self.update_detail()

    def update_detail(self) -> None:
        s = self.current_session()
        detail = self.query_one("#locks-detail", Static)
        detail.update(session_detail(s) if s else Text("Highlight a session to see its full query.", style="dim"))

    # -- filter ----------------------------------------------------------------------------------

    def action_filter(self) -> None:
        box = self.query_one("#locks-filter", Input)
        box.display = True
        box.value = self.filter_text
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "locks-filter":
            self.filter_text = event.value
            self.render_tree()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "locks-filter":
            event.stop()
            self.filter_text = event.value.strip()
            if not self.filter_text:
                event.input.display = False
            self.tree.focus()
            self.render_tree()

    def action_close_filter(self) -> None:
        box = self.query_one("#locks-filter", Input)
        if box.display:
            box.value = ""
            box.display = False
            self.filter_text = ""
            self.tree.focus()
            self.render_tree()

    def action_toggle_locks(self) -> None:
        table = self.query_one("#locked-objects", DataTable)
        table.display = not table.display

    # -- marks and signals -----------------------------------------------------------------------

    def action_mark(self) -> None:
        s = self.current_session()
        if s is None:
            return
        if s.pid == 0:
            self.notify("a prepared transaction has no backend to signal (COMMIT/ROLLBACK PREPARED it)",
                        severity="warning", markup=False)
            return
        if s.pid in self.marked:
            del self.marked[s.pid]
        else:
            self.marked[s.pid] = _target(s)
        self.render_tree()

    def action_clear_marks(self) -> None:
        self.marked.clear()
        self.render_tree()

    def action_signal(self, action: str) -> None:
        if self.marked:
            targets = [self.marked[p] for p in sorted(self.marked)]
        else:
            s = self.current_session()
            if s is None:
                self.notify("no session highlighted", severity="warning", markup=False)
                return
            if s.pid == 0:
                self.notify("a prepared transaction has no backend to signal (COMMIT/ROLLBACK PREPARED it)",
                            severity="warning", markup=False)
                return
            targets = [_target(s)]
        title = f"{'Cancel the query of' if action == 'cancel' else 'Terminate'} {len(targets)} session(s)"
        lines = [t.describe() for t in targets]
        settings = self.app.settings

        def run(reason: str) -> SignalReport:
            signaller = Signaller(settings)    # its own connection: a stuck poll cannot block it
            try:
                return signaller.signal(action, targets, reason=reason)
            finally:
                signaller.close()

        confirm = getattr(self.app, "confirm_and_run", None)
        if confirm is None:
            self.notify("this app has no confirmation path; refusing to signal", severity="error", markup=False)
            return
        confirm(title, lines, run, on_done=self._signalled,
                confirm_label="Terminate" if action == "terminate" else "Cancel query")

    def _signalled(self, report: SignalReport) -> None:
        self.last_report = report
        self.marked.clear()
        severity = "information" if report.all_signalled else "warning"
        details = "; ".join(f"{o.pid}: {o.outcome}" + (f" ({o.message})" if o.message and o.outcome != "signalled" else "")
                            for o in report.outcomes)
        self.notify(f"{report.action}: {one_line(details, 300)}", severity=severity, markup=False)
        self.action_refresh_now()


def _since(value: Any) -> str:
    """'17:42:40 (1m05s ago)' from an ISO timestamp string (json_agg output) or a datetime."""
    from datetime import datetime, timezone

    if not value:
        return "-"
    try:
        at = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    ago = (datetime.now(timezone.utc) - at).total_seconds()
    return f"{at.astimezone().strftime('%H:%M:%S')} ({human_duration(max(0.0, ago))} ago)"


def _target(s: LockSession) -> SignalTarget:
    return SignalTarget(pid=s.pid, backend_start=s.backend_start, user=s.user, database=s.database,
                        application_name=s.application_name, state=s.state, query=s.query)


def _last_children(rows: list[TreeRow]) -> set[str]:
    """Keys of rows that are the last child of their parent (for └─ vs ├─)."""
    last: dict[str, str] = {}
    for r in rows:
        parent = r.key.rsplit("/", 1)[0] if "/" in r.key else ""
        last[parent] = r.key
    return set(last.values())

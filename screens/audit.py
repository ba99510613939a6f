"""The audit screen: browse every recorded action, newest first.

Filters (operator, action, target text, since/until: ``15m``, ``2h``, ``3d`` or an ISO time) sit in
a bar opened with ``/``; Enter in any of them reloads. ``n`` loads the next older page (keyset on
id), up to ``MAX_ROWS`` held. The highlighted row's targets, details, database role and client
address show in full below. Reads go through ``console.audit.list_audit`` on the browse database;
atc has no path that changes or deletes audit rows.
"""

from __future__ import annotations

import json
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Input, Static

from console.audit import describe_targets, list_audit, parse_time
from console.errors import AtcError
from console.text import one_line, visible

from .widgets import cell

PAGE = 100
MAX_ROWS = 2000
FILTERS = (("operator", "operator"), ("action", "action (terminate, pause, …)"), ("target", "target text (pid, id)"),
           ("since", "since: 15m, 2h, 3d, 2024-04-12"), ("until", "until"))
COLUMNS = (("id", "ID"), ("at", "AT"), ("operator", "OPERATOR"), ("db_role", "ROLE"), ("client_addr", "CLIENT"),
           ("action", "ACTION"), ("targets", "TARGETS"), ("reason", "REASON"), ("outcome", "OUTCOME"))




class AuditScreen(Screen):
    """The audit trail."""

    CSS_PATH = "audit.tcss"
    AUTO_FOCUS = "#audit-table"
    BINDINGS = [
        Binding("slash", "filter", "Filter", key_display="/", id="audit.filter"),
        Binding("r", "reload", "Reload", id="audit.reload"),
        Binding("n", "older", "Older", id="audit.older"),
        Binding("escape", "close_filter", "Back to list", show=False, id="audit.close_filter"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, Any]] = {}
        self.next_before: int | None = None
        self.loading_page = False
        self.loads = 0
        self.stale = False

    def compose(self) -> ComposeResult:
        yield Static(Text("Audit — every action, who, why, and what happened", style="bold"), classes="screen-title")
        with Horizontal(id="audit-filters"):
            for key, placeholder in FILTERS:
                yield Input(placeholder=placeholder, id=f"audit-{key}")
        table = DataTable(id="audit-table", cursor_type="row")
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        yield table
        yield Static(Text(""), classes="summary", id="audit-summary")
        with VerticalScroll(id="audit-detail-pane"):
            yield Static(Text(""), id="audit-detail")

    def on_mount(self) -> None:
        self.query_one("#audit-filters").display = False
        self.action_reload()

    def on_screen_resume(self) -> None:
        if self.loads:
            self.action_reload()

    @property
    def table(self) -> DataTable:
        return self.query_one("#audit-table", DataTable)

    def filters(self) -> dict[str, Any]:
        values = {key: self.query_one(f"#audit-{key}", Input).value.strip() or None for key, _ in FILTERS}
        values["since"] = parse_time(values["since"], what="since")
        values["until"] = parse_time(values["until"], what="until")
        return values

    # -- loading ---------------------------------------------------------------------------------

    def action_reload(self) -> None:
        self._start(before_id=None)

    def action_older(self) -> None:
        if self.next_before is None:
            self.notify("no older rows", markup=False)
            return
        if len(self.rows) >= MAX_ROWS:
            self.notify(f"holding {MAX_ROWS} rows already; narrow the filters", severity="warning", markup=False)
            return
        self._start(before_id=self.next_before)

    def _start(self, before_id: int | None) -> None:
        try:
            filters = self.filters()
        except AtcError as exc:
            self.notify(exc.message, severity="error", markup=False)
            return
        self.loading_page = True
        self.load(filters, before_id)

    @work(thread=True, exclusive=True, group="audit-load", exit_on_error=False)
    def load(self, filters: dict[str, Any], before_id: int | None) -> None:
        db = getattr(self.app, "browse_db", None) or self.app.db
        try:
            rows = list_audit(db, before_id=before_id, limit=PAGE, **filters)
        except AtcError as exc:
            self.app.call_from_thread(self._failed, exc.message)
            return
        self.app.call_from_thread(self._loaded, rows, before_id)

    def _failed(self, message: str) -> None:
        self.loading_page = False
        self.stale = True
        self.add_class("stale")
        self.notify(message, severity="error", markup=False)
        self._summary()

    def _loaded(self, rows: list[dict[str, Any]], before_id: int | None) -> None:
        self.loading_page = False
        self.loads += 1
        self.stale = False
        self.remove_class("stale")
        table = self.table
        with self.app.batch_update():
            if before_id is None:
                table.clear()
                self.rows.clear()
            for row in rows:
                if row["id"] in self.rows:
                    continue
                self.rows[row["id"]] = row
                table.add_row(
                    Text(str(row["id"]), justify="right"),
                    cell(row["at"].astimezone().strftime("%Y-%m-%d %H:%M:%S") if row["at"] else "-"),
                    cell(row["operator"], 30), cell(row["db_role"], 30), cell(row["client_addr"] or "local", 20),
                    cell(row["action"], 20, "bold"), cell(describe_targets(row["targets"]), 50), cell(row["reason"], 60),
                    cell(row["outcome"], 60, "green" if row["outcome"] == "ok" else "yellow"),
                    key=str(row["id"]),
                )
        self.next_before = rows[-1]["id"] if len(rows) == PAGE else None
        self._summary()
        self.update_detail()

    def _summary(self) -> None:
        text = Text(f"{len(self.rows)} row(s)")
        if self.next_before is not None:
            text.append("  n: older", style="dim")
        if self.stale:
            text.append("  STALE: the last load failed; r retries", style="bold red")
        self.query_one("#audit-summary", Static).update(text)

    # -- detail and filters ------------------------------------------------------------------------

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.update_detail()

    def update_detail(self) -> None:
        table = self.table
        row = None
        if table.row_count:
            try:
                key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
                row = self.rows.get(int(key))
            except Exception:
                row = None
        detail = self.query_one("#audit-detail", Static)
        if row is None:
            detail.update(Text("No audit rows match." if not table.row_count else "", style="dim"))
            return
        text = Text()
        text.append(f"#{row['id']} {row['action']}", style="bold")
        text.append(f"  by {one_line(row['operator'], 60)} as database role {one_line(row['db_role'], 60)}"
                    f" from {row['client_addr'] or 'local socket'}\n")
        text.append("reason: ", style="dim")
        text.append(visible(row["reason"]) + "\n")
        text.append("outcome: ", style="dim")
        text.append(visible(row["outcome"]) + "\n")
        text.append("targets: ", style="dim")
        text.append(visible(json.dumps(row["targets"], ensure_ascii=False, default=str)) + "\n")
        text.append("details: ", style="dim")
        text.append(visible(json.dumps(row["details"], ensure_ascii=False, default=str, indent=1), keep_newlines=True))
        detail.update(text)

    def action_filter(self) -> None:
        bar = self.query_one("#audit-filters")
        bar.display = True
        self.query_one("#audit-operator", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_reload()
        self.table.focus()

    def action_close_filter(self) -> None:
        self.table.focus()

"""Log sizes: where the bytes are (DB heap/TOAST vs S3), per assignment and run, the largest logs,
a size histogram and how much sits above a threshold typed in.

All figures come from ``console.sizes`` (catalog sizes and ``pg_column_size``: no log body is
read), computed in a thread worker on the browse database. The "as of" line says when and how
(exact or sampled) they were computed; ``r`` recomputes.

Focus starts on the tabs, so the section keys (1-9) and ``r`` work on arrival. ``t`` (or ``/``)
goes to the threshold box, Enter there recounts and goes back, Escape goes back unchanged.

Units: database figures are *stored* sizes (``pg_column_size``: compressed, what the log costs in
PostgreSQL); S3 figures are the raw bytes of the moved logs. Both in binary units (KiB, MiB).
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Input, Label, Static, TabbedContent, TabPane

from console.errors import AtcError
from console.sizes import SizeReport, above_threshold, compute_sizes
from console.text import human_bytes, parse_size

from .widgets import cell

BAR_WIDTH = 50


def histogram_text(report: SizeReport) -> Text:
    """One row per power-of-two bucket: DB bar and S3 bar scaled to the largest count."""
    text = Text()
    if not report.histogram:
        text.append("no logs", style="dim")
        return text
    peak = max(max(h["db_logs"], h["s3_logs"]) for h in report.histogram) or 1
    for h in report.histogram:
        label = f"{human_bytes(h['from_bytes']):>10} – {human_bytes(h['to_bytes']):<10}"
        text.append(label)
        db_len = round(BAR_WIDTH * h["db_logs"] / peak)
        s3_len = round(BAR_WIDTH * h["s3_logs"] / peak)
        text.append("█" * db_len, style="cyan")
        text.append("█" * s3_len, style="magenta")
        text.append(f" {h['db_logs']} db / {h['s3_logs']} s3\n")
    text.append("█ database (by stored size, compressed)", style="cyan")
    text.append("  ")
    text.append("█ S3 (by uploaded size, raw)", style="magenta")
    return text


class SizesScreen(Screen):
    """Where the log bytes are."""

    CSS_PATH = "sizes.tcss"
    # The content, never the threshold box: typed section keys must switch sections.
    AUTO_FOCUS = "#sizes-tabs Tabs"
    BINDINGS = [
        Binding("r", "reload", "Recompute", id="sizes.reload"),
        Binding("t", "edit_threshold", "Threshold", id="sizes.threshold"),
        Binding("slash", "edit_threshold", "Threshold", show=False, key_display="/", id="sizes.threshold_slash"),
        Binding("escape", "leave_input", "Back to tabs", show=False, id="sizes.leave_input"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.report: SizeReport | None = None
        self.threshold = 1 << 20
        self.loads = 0

    def compose(self) -> ComposeResult:
        yield Static(Text("Log sizes — where the bytes are (no log body is read)", style="bold"), classes="screen-title")
        with Horizontal(id="sizes-bar"):
            yield Label(Text("threshold "))
            yield Input(value="1MB", placeholder="e.g. 512k, 10MB — Enter applies", id="sizes-threshold")
            yield Static(Text("computing…", style="dim"), id="sizes-asof")
        yield Static(Text(""), id="sizes-totals")
        with TabbedContent(id="sizes-tabs"):
            with TabPane("Histogram", id="tab-histogram"):
                with VerticalScroll():
                    yield Static(Text(""), id="sizes-histogram")
            with TabPane("Tables", id="tab-tables"):
                yield self._table("sizes-tables", ("table", "heap", "TOAST", "indexes", "rows~"))
            with TabPane("Largest", id="tab-largest"):
                yield self._table("sizes-largest", ("step result", "state", "size (stored or raw)", "where"))
            with TabPane("Assignments", id="tab-assignments"):
                yield self._table("sizes-assignments", ("id", "assignment", "db logs", "db stored (compressed)",
                                                        "s3 logs", "s3 uploaded (raw)"))
            with TabPane("Runs", id="tab-runs"):
                yield self._table("sizes-runs", ("run", "assignment", "db logs", "db stored (compressed)", "s3 logs",
                                                 "s3 uploaded (raw)"))

    @staticmethod
    def _table(table_id: str, labels: tuple[str, ...]) -> DataTable:
        table = DataTable(id=table_id, cursor_type="row", zebra_stripes=True)
        for label in labels:
            table.add_column(label, key=label)
        return table

    def on_mount(self) -> None:
        self.action_reload()

    def action_reload(self) -> None:
        self.query_one("#sizes-asof", Static).update(Text("computing…", style="dim"))
        self.load(self.threshold)

    def focus_content(self) -> None:
        self.query_one("#sizes-tabs Tabs").focus()

    def action_edit_threshold(self) -> None:
        self.query_one("#sizes-threshold", Input).focus()

    def action_leave_input(self) -> None:
        if isinstance(self.focused, Input):
            self.focus_content()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if not event.value.strip():
            self.notify("threshold: enter a size, e.g. 512k or 10MB", severity="error", markup=False)
            return
        try:
            self.threshold = parse_size(event.value)
        except ValueError as exc:
            self.notify(f"threshold: {exc}", severity="error", markup=False)
            return
        self.focus_content()
        if self.report is None:
            self.action_reload()
        else:
            self.recount(self.threshold)

    @work(thread=True, exclusive=True, group="sizes-load", exit_on_error=False)
    def load(self, threshold: int) -> None:
        db = getattr(self.app, "browse_db", None) or self.app.db
        try:
            report = compute_sizes(db, threshold=threshold)
        except AtcError as exc:
            self.app.call_from_thread(self.notify, exc.message, severity="error", markup=False)
            return
        self.app.call_from_thread(self.show, report)

    @work(thread=True, exclusive=True, group="sizes-threshold", exit_on_error=False)
    def recount(self, threshold: int) -> None:
        db = getattr(self.app, "browse_db", None) or self.app.db
        try:
            counts = above_threshold(db, threshold)
        except AtcError as exc:
            self.app.call_from_thread(self.notify, exc.message, severity="error", markup=False)
            return
        self.app.call_from_thread(self._show_threshold, threshold, counts)

    def show(self, report: SizeReport) -> None:
        self.report = report
        self.loads += 1
        self.query_one("#sizes-asof", Static).update(
            Text(f"  as of {report.as_of:%Y-%m-%d %H:%M:%S} · {report.method}", style="dim"))
        self._show_threshold(report.threshold, report.above_threshold)
        self.query_one("#sizes-histogram", Static).update(histogram_text(report))
        hb = human_bytes
        self._fill("sizes-tables", [(r["table_name"], hb(r["heap_bytes"]), hb(r["toast_bytes"]), hb(r["index_bytes"]),
                                     str(r["estimated_rows"])) for r in report.tables])
        self._fill("sizes-largest", [(str(r["id"]), r["state"] or "-", hb(r["bytes"]), r["location"])
                                     for r in report.largest])
        self._fill("sizes-assignments", [(str(r["assignment_id"]), r["assignment"], str(r["db_logs"]), hb(r["db_bytes"]),
                                          str(r["s3_logs"]), hb(r["s3_bytes"])) for r in report.by_assignment])
        self._fill("sizes-runs", [(str(r["run_id"]), str(r["assignment_id"]), str(r["db_logs"]), hb(r["db_bytes"]),
                                   str(r["s3_logs"]), hb(r["s3_bytes"])) for r in report.by_run])

    def _show_threshold(self, threshold: int, counts: dict[str, int]) -> None:
        report = self.report
        text = Text()
        if report is not None:
            text.append(f"database: {report.db_logs:,} logs, {human_bytes(report.db_bytes)} stored (compressed) · "
                        f"S3: {report.s3_logs:,} logs, {human_bytes(report.s3_bytes)} uploaded (raw) · "
                        f"S3 share {report.s3_share:.1%}\n")
        text.append(f"stored at or above {human_bytes(threshold)}: {counts['logs']:,} logs, "
                    f"{human_bytes(counts['bytes'])} stored (compressed); movable now (finished): "
                    f"{counts['movable_logs']:,} logs, {human_bytes(counts['movable_bytes'])} stored", style="bold")
        for note in (report.notes if report else []):
            text.append(f"\nnote: {note}", style="dim")
        self.query_one("#sizes-totals", Static).update(text)

    def _fill(self, table_id: str, rows: list[tuple[Any, ...]]) -> None:
        table = self.query_one(f"#{table_id}", DataTable)
        with self.app.batch_update():
            table.clear()
            for row in rows:
                table.add_row(*(cell(v, 60) for v in row))

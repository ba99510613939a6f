"""Migrate large logs to S3: plan, start, pause, resume, cancel, with a live progress bar.

The form holds the same options as ``atc migrate-logs``. ``d`` plans (a dry run: sizes only),
``s`` starts after a reason and a confirmation listing the plan, ``p`` pauses or resumes (workers
finish the log in hand, then wait), ``c`` cancels (the run stays resumable: starting again with
the same options joins it). The run itself is ``console.migrate.migrate_logs`` in a thread worker;
progress comes back through ``call_from_thread``, throttled.
"""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Input, Label, ProgressBar, Static

from console.errors import AtcError
from console.migrate import (MigrationControl, MigrationOptions, MigrationStats, Plan, list_runs, migrate_logs,
                             parse_shard, plan_migration)
from console.text import human_bytes, human_duration, one_line, parse_size

from .widgets import ConfirmModal, ReasonModal, cell

# The restore action of the browse steps screen (screens.browse.StepsScreen mixes it in).
RESTORE_BINDINGS = [Binding("R", "restore_log", "Restore log to DB", id="steps.restore")]


class RestoreLogAction:
    """Mixin for a screen with ``self.table.current_row()`` rows carrying ``id``, ``log_where`` and
    ``log_s3_key``: ``R`` moves the highlighted step's log from S3 back into the database
    (``console.restore.restore_logs``: verified size + SHA-256, same guards as the move, audited)
    through the app's confirm -> reason -> worker path."""

    def action_restore_log(self) -> None:
        row = self.table.current_row()  # type: ignore[attr-defined]
        if row is None:
            self.notify("no step highlighted", severity="warning", markup=False)  # type: ignore[attr-defined]
            return
        sid = int(row["id"])
        if row.get("log_where") != "s3":
            self.notify(f"step result {sid}: its log is not in S3, nothing to restore",  # type: ignore[attr-defined]
                        severity="warning", markup=False)
            return
        app = self.app  # type: ignore[attr-defined]
        key = one_line(row.get("log_s3_key") or "", 200)
        lines = [f"step result {sid}: copy s3://{app.store.bucket}/{key} back into the database",
                 "verified against its pointer (size + SHA-256) before anything is written",
                 "then the pointer and the object are deleted: the database is authoritative again"]

        def run(reason: str) -> Any:
            from console.restore import restore_logs

            return restore_logs(app.settings, app.db, app.store, [sid], reason=reason)

        app.confirm_and_run(f"Restore log {sid} to the database", lines, run, on_done=self._log_restored,
                            confirm_label="Restore")

    def _log_restored(self, outcomes: list[Any]) -> None:
        for o in outcomes:
            if o.status == "restored":
                self.notify(f"log {o.step_result_id} restored to the database ({human_bytes(o.size)})",  # type: ignore[attr-defined]
                            markup=False)
            else:
                detail = f": {one_line(o.error, 200)}" if o.error else ""
                self.notify(f"log {o.step_result_id} not restored ({o.status}){detail}",  # type: ignore[attr-defined]
                            severity="error" if o.status == "failed" else "warning", markup=False)
        reload = getattr(self, "reload", None)
        if reload is not None:
            reload()

FIELDS = (("min_size", "min size", "1MB"), ("concurrency", "concurrency", "8"), ("shard", "shard K/N", "1/1"),
          ("assignments", "assignment ids", ""), ("max_bytes", "max bytes", ""))


def stats_text(stats: MigrationStats) -> Text:
    text = Text()
    style = {"finished": "green", "failed": "bold red", "cancelled": "yellow", "paused": "yellow"}.get(stats.state, "")
    text.append(f"run {stats.run_id} shard {stats.shard}: {stats.state}\n", style=style or "bold")
    text.append(f"moved {stats.moved_logs}/{stats.planned_logs} logs · {human_bytes(stats.moved_bytes)} to S3 · "
                f"{human_bytes(stats.rate)}/s · ETA {human_duration(stats.eta)} · elapsed {human_duration(stats.elapsed)}\n")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(stats.skipped_reasons.items())) or "-"
    text.append(f"skipped {stats.skipped} ({reasons}) · failed {stats.failed}")
    if stats.last_error:
        text.append("\nlast error: ", style="dim")
        text.append(one_line(stats.last_error, 300), style="red")
    return text


class MigrateScreen(Screen):
    """Move large logs to S3 with a progress bar."""

    CSS_PATH = "migrate.tcss"
    AUTO_FOCUS = "#migrate-min_size"
    BINDINGS = [
        Binding("d", "plan", "Plan (dry run)", id="migrate.plan"),
        Binding("s", "start", "Start", id="migrate.start"),
        Binding("p", "pause", "Pause/resume", id="migrate.pause"),
        Binding("c", "cancel_run", "Cancel run", id="migrate.cancel"),
        Binding("r", "runs", "Reload runs", id="migrate.runs"),
        Binding("o", "orphans", "Orphans", id="migrate.orphans"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.control: MigrationControl | None = None
        self.stats: MigrationStats | None = None
        self.plan: Plan | None = None
        self.running = False
        self._last_paint = 0.0

    def compose(self) -> ComposeResult:
        yield Static(Text("Migrate logs to S3 — streamed, verified, resumable", style="bold"), classes="screen-title")
        with Horizontal(id="migrate-form"):
            for key, label, default in FIELDS:
                with Vertical(classes="field"):
                    yield Label(Text(label))
                    yield Input(value=default, id=f"migrate-{key}")
        yield Static(Text("d: plan · s: start · p: pause/resume · c: cancel", style="dim"), id="migrate-plan")
        yield ProgressBar(id="migrate-progress", show_eta=True)
        yield Static(Text("no run in this session", style="dim"), id="migrate-stats")
        table = DataTable(id="migrate-runs", cursor_type="row", zebra_stripes=True)
        for label in ("run", "started", "finished", "operator", "min size", "moved", "bytes", "skipped", "failed",
                      "shards done"):
            table.add_column(label, key=label)
        yield table

    def on_mount(self) -> None:
        self.action_runs()

    # -- options --------------------------------------------------------------------------------

    def options(self, reason: str = "") -> MigrationOptions:
        values = {key: self.query_one(f"#migrate-{key}", Input).value.strip() for key, _, _ in FIELDS}
        try:
            min_size = parse_size(values["min_size"] or "0")
            max_bytes = parse_size(values["max_bytes"]) if values["max_bytes"] else None
        except ValueError as exc:
            raise AtcError(str(exc)) from None
        try:
            concurrency = int(values["concurrency"] or "8")
            assignments = tuple(int(x) for x in values["assignments"].replace(",", " ").split())
        except ValueError:
            raise AtcError("concurrency and assignment ids must be whole numbers") from None
        shard, count = parse_shard(values["shard"] or "1/1")
        return MigrationOptions(min_size=min_size, assignment_ids=assignments, concurrency=concurrency, shard=shard,
                                shard_count=count, max_bytes=max_bytes, reason=reason)

    # -- plan -----------------------------------------------------------------------------------

    def action_plan(self) -> None:
        try:
            opts = self.options()
        except AtcError as exc:
            self.notify(exc.message, severity="error", markup=False)
            return
        self.query_one("#migrate-plan", Static).update(Text("planning…", style="dim"))
        self.run_plan(opts)

    @work(thread=True, exclusive=True, group="migrate-plan", exit_on_error=False)
    def run_plan(self, opts: MigrationOptions) -> None:
        try:
            plan = plan_migration(self.app.db, opts)
        except AtcError as exc:
            self.app.call_from_thread(self.notify, exc.message, severity="error", markup=False)
            return
        self.app.call_from_thread(self._show_plan, plan, opts)

    def _show_plan(self, plan: Plan, opts: MigrationOptions) -> None:
        self.plan = plan
        text = Text(f"plan: {plan.movable_logs} logs ({human_bytes(plan.movable_bytes)} stored) would move from shard "
                    f"{opts.shard}/{opts.shard_count}; {plan.logs - plan.movable_logs} above the size are still running",
                    style="bold")
        if plan.capped_by_max_bytes:
            text.append(" · capped by max bytes")
        self.query_one("#migrate-plan", Static).update(text)

    # -- start / pause / cancel -----------------------------------------------------------------

    def action_start(self) -> None:
        if self.running:
            self.notify("a migration is already running here (p pauses, c cancels)", severity="warning", markup=False)
            return
        try:
            opts = self.options()
        except AtcError as exc:
            self.notify(exc.message, severity="error", markup=False)
            return
        lines = [f"logs of finished steps stored at {human_bytes(opts.min_size)} or more",
                 f"shard {opts.shard}/{opts.shard_count}, {opts.concurrency} at a time",
                 f"to s3://{self.app.store.bucket}/{self.app.settings.s3.prefix}"]
        if opts.assignment_ids:
            lines.append("assignments " + ", ".join(map(str, opts.assignment_ids)))
        if self.plan is not None:
            lines.append(f"last plan: {self.plan.movable_logs} logs, {human_bytes(self.plan.movable_bytes)}")

        def got_reason(reason: str | None) -> None:
            if reason is None:
                return

            def confirmed(ok: bool | None) -> None:
                if ok:
                    self._start(self.options(reason))

            self.app.push_screen(ConfirmModal("Move these logs to S3?", lines, confirm_label="Move"), confirmed)

        self.app.push_screen(ReasonModal("Migrate logs to S3", lines=lines), got_reason)

    def _start(self, opts: MigrationOptions) -> None:
        self.control = MigrationControl()
        self.running = True
        self.query_one("#migrate-stats", Static).update(Text("starting…", style="dim"))
        self.run_migration(opts, self.control)

    @work(thread=True, exclusive=True, group="migrate-run", exit_on_error=False)
    def run_migration(self, opts: MigrationOptions, control: MigrationControl) -> None:
        def progress(stats: MigrationStats) -> None:
            now = time.monotonic()
            if now - self._last_paint >= 0.2 or stats.state not in ("running", "starting"):
                self._last_paint = now
                self.app.call_from_thread(self._paint, stats)

        try:
            stats = migrate_logs(self.app.settings, self.app.db, self.app.store, opts, control=control,
                                 on_progress=progress)
        except AtcError as exc:
            self.app.call_from_thread(self._finished, None, exc.message)
            return
        self.app.call_from_thread(self._finished, stats, None)

    def _paint(self, stats: MigrationStats) -> None:
        self.stats = stats
        if self.control is not None and self.control.paused and stats.state == "running":
            shown_state = "paused"
        else:
            shown_state = stats.state
        bar = self.query_one("#migrate-progress", ProgressBar)
        bar.update(total=max(stats.planned_bytes, 1), progress=min(stats.done_stored_bytes, max(stats.planned_bytes, 1)))
        original = stats.state
        stats.state = shown_state
        try:
            self.query_one("#migrate-stats", Static).update(stats_text(stats))
        finally:
            stats.state = original

    def _finished(self, stats: MigrationStats | None, error: str | None) -> None:
        self.running = False
        if stats is not None:
            self._paint(stats)
            severity = "information" if stats.state == "finished" and not stats.failed else "warning"
            self.notify(f"migration {stats.state}: moved {stats.moved_logs} logs, skipped {stats.skipped}, "
                        f"failed {stats.failed}", severity=severity, markup=False)
        if error is not None:
            text = Text("stopped: ", style="bold red")
            text.append(one_line(error, 300))
            text.append("\nthe run is resumable: fix the cause and start again with the same options", style="dim")
            self.query_one("#migrate-stats", Static).update(text)
            self.notify(error, severity="error", markup=False)
        self.action_runs()

    def action_pause(self) -> None:
        if not self.running or self.control is None:
            self.notify("no migration running", markup=False)
            return
        if self.control.paused:
            self.control.resume()
            self.notify("resumed", markup=False)
        else:
            self.control.pause()
            self.notify("pausing: logs in hand finish, then the workers wait", markup=False)
        if self.stats is not None:
            self._paint(self.stats)

    def action_cancel_run(self) -> None:
        if not self.running or self.control is None:
            self.notify("no migration running", markup=False)
            return
        self.control.cancel()
        self.notify("cancelling: logs in hand finish; start again to resume", markup=False)

    # -- runs -----------------------------------------------------------------------------------

    def action_runs(self) -> None:
        self.load_runs()

    def action_orphans(self) -> None:
        self.app.push_screen(OrphansScreen())

    @work(thread=True, exclusive=True, group="migrate-runs", exit_on_error=False)
    def load_runs(self) -> None:
        try:
            rows = list_runs(self.app.db)
        except AtcError as exc:
            self.app.call_from_thread(self.notify, exc.message, severity="error", markup=False)
            return
        self.app.call_from_thread(self._show_runs, rows)

    def _show_runs(self, rows: list[dict[str, Any]]) -> None:
        table = self.query_one("#migrate-runs", DataTable)
        with self.app.batch_update():
            table.clear()
            for r in rows:
                table.add_row(cell(r["id"]), cell(f"{r['started_at']:%Y-%m-%d %H:%M}"),
                              cell(f"{r['finished_at']:%H:%M:%S}" if r["finished_at"] else "resumable"),
                              cell(r["operator"], 30), cell(human_bytes(r["min_size"])), cell(r["moved_logs"]),
                              cell(human_bytes(r["moved_bytes"])), cell(r["skipped"]), cell(r["failed"]),
                              cell(f"{r['shards_finished']}/{r['shards_seen']}"))


# -- orphans ---------------------------------------------------------------------------------------

ORPHAN_KINDS = {
    "orphans": ("orphan", "object without pointer (DB authoritative): deletable"),
    "half_finished": ("half-finished", "pointer + inline bytes (DB authoritative): reconcile"),
    "dangling": ("dangling", "pointer of a deleted step result: drop"),
    "incomplete_uploads": ("upload", "incomplete multipart upload: abort"),
    "missing": ("MISSING", "pointer whose object is gone: S3 lost a moved log"),
    "size_mismatch": ("SIZE", "object size differs from its pointer"),
}


class OrphansScreen(Screen):
    """Objects no pointer references and half-finished moves (``console.orphans``), and cleaning them.

    ``r`` rescans (read-only). ``x`` cleans what the scan found and is older than the age typed in
    (default 1d): the confirmation lists exactly each object, pointer and upload concerned, and
    only those are acted on (``clean(only=...)``), each re-checked under the log's advisory lock.
    """

    CSS_PATH = "migrate.tcss"
    AUTO_FOCUS = "#orphans-table"
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="orphans.back"),
        Binding("r", "scan", "Rescan", id="orphans.scan"),
        Binding("x", "clean", "Clean…", id="orphans.clean"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.report: Any = None
        self.scans = 0

    def compose(self) -> ComposeResult:
        yield Static(Text("Orphaned objects and half-finished moves", style="bold"), classes="screen-title")
        with Horizontal(id="orphans-form"):
            yield Label(Text("clean items older than"))
            yield Input(value="1d", id="orphans-older-than")
        yield Static(Text("scanning…", style="dim"), id="orphans-summary")
        table = DataTable(id="orphans-table", cursor_type="row", zebra_stripes=True)
        for label in ("kind", "step result", "key", "size", "age", "meaning"):
            table.add_column(label, key=label)
        yield table

    def on_mount(self) -> None:
        self.action_scan()

    def action_scan(self) -> None:
        self.query_one("#orphans-summary", Static).update(Text("scanning…", style="dim"))
        self.run_scan()

    @work(thread=True, exclusive=True, group="orphans-scan", exit_on_error=False)
    def run_scan(self) -> None:
        from console.orphans import scan

        try:
            report = scan(self.app.db, self.app.store)
        except AtcError as exc:
            self.app.call_from_thread(self._scan_failed, exc.message)
            return
        self.app.call_from_thread(self._show, report)

    def _scan_failed(self, message: str) -> None:
        self.query_one("#orphans-summary", Static).update(Text(one_line(message, 300), style="red"))
        self.notify(message, severity="error", markup=False)

    def _show(self, report: Any) -> None:
        from datetime import datetime, timezone

        self.report = report
        self.scans += 1
        now = datetime.now(timezone.utc)
        table = self.query_one("#orphans-table", DataTable)
        with self.app.batch_update():
            table.clear()
            for field_name, (label, meaning) in ORPHAN_KINDS.items():
                for item in getattr(report, field_name):
                    when = item.get("last_modified") or item.get("initiated")
                    age = human_duration((now - when).total_seconds()) if when is not None else "-"
                    size = item.get("size", item.get("object_size"))
                    table.add_row(cell(label, style="bold red" if label in ("MISSING", "SIZE") else ""),
                                  cell(item.get("step_result_id") if item.get("step_result_id") is not None else "-"),
                                  cell(item.get("key", ""), 80), cell(human_bytes(size) if size is not None else "-"),
                                  cell(age), cell(meaning))
        text = Text(f"s3://{report.bucket}/{report.prefix}: {report.objects} objects "
                    f"({human_bytes(report.object_bytes)}), {report.pointers} pointers · "
                    f"{len(report.orphans)} orphans · {len(report.half_finished)} half-finished · "
                    f"{len(report.dangling)} dangling · {len(report.incomplete_uploads)} incomplete uploads")
        if report.missing or report.size_mismatch:
            text.append(f"\n{len(report.missing)} pointers have no object, {len(report.size_mismatch)} sizes differ: "
                        "S3 lost or changed moved logs (nothing is done about them automatically)", style="bold red")
        self.query_one("#orphans-summary", Static).update(text)

    def action_clean(self) -> None:
        from console.orphans import parse_age, planned_actions

        if self.report is None:
            self.notify("no scan yet (r scans)", severity="warning", markup=False)
            return
        try:
            older_than = parse_age(self.query_one("#orphans-older-than", Input).value or "1d")
        except AtcError as exc:
            self.notify(exc.message, severity="error", markup=False)
            return
        plan = planned_actions(self.report, older_than)
        if not plan:
            self.notify(f"nothing to clean older than {human_duration(older_than.total_seconds())}", markup=False)
            return
        lines = [one_line(a["what"], 160) for a in plan]
        app = self.app

        def run(reason: str) -> Any:
            from console.orphans import clean

            return clean(app.settings, app.db, app.store, older_than=older_than, reason=reason, only=plan)

        app.confirm_and_run(f"Clean {len(plan)} orphaned item(s)", lines, run, on_done=self._cleaned,
                            confirm_label="Delete")

    def _cleaned(self, report: Any) -> None:
        done = [a for a in report.actions if not a["action"].startswith(("kept", "skipped"))]
        kept = len(report.actions) - len(done)
        self.notify(f"cleaned {len(done)} item(s)" + (f", {kept} kept or skipped (re-checked under lock)" if kept else ""),
                    markup=False)
        self.action_scan()

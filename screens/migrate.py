"""Migrate large logs to S3: plan, start, pause, resume, cancel, with a live progress bar.

The form holds the same options as ``atc migrate-logs``. ``d`` plans (a dry run: sizes only),
``s`` starts after a reason and a confirmation listing the plan, ``p`` pauses or resumes (workers
finish the log in hand, then wait), ``c`` cancels (the run stays resumable: starting again with
the same options joins it). The run itself is ``console.migrate.migrate_logs`` in a thread worker;
progress comes back through ``call_from_thread``, throttled.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, DataTable, Input, Label, ProgressBar, Static

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
    """Counters of a run. One ETA (working time left, frozen while paused); stored bytes
    (compressed, in the database) and uploaded bytes (raw, to S3) are labelled as such."""
    text = Text()
    state = "paused" if stats.paused else stats.state
    style = {"finished": "green", "failed": "bold red", "cancelled": "yellow", "paused": "yellow"}.get(state, "")
    text.append(f"run {stats.run_id} shard {stats.shard}: {state}\n", style=style or "bold")
    eta = "paused" if stats.paused else human_duration(stats.eta)
    text.append(f"moved {stats.moved_logs:,}/{stats.planned_logs:,} logs · dealt with "
                f"{human_bytes(stats.done_stored_bytes)} of {human_bytes(stats.planned_bytes)} stored in the database "
                f"(compressed) · {human_bytes(stats.moved_bytes)} uploaded to S3 (raw) at {human_bytes(stats.rate)}/s · "
                f"ETA {eta} · elapsed {human_duration(stats.elapsed)}\n")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(stats.skipped_reasons.items())) or "-"
    text.append(f"skipped {stats.skipped} ({reasons}) · failed {stats.failed}")
    if stats.last_error:
        text.append("\nlast error: ", style="dim")
        text.append(one_line(stats.last_error, 300), style="red")
    return text


def plan_lines(plan: Plan, opts: MigrationOptions, bucket: str, prefix: str) -> list[str]:
    """What starting this migration does, in logs and bytes (for the reason and confirm dialogs)."""
    lines = [f"{plan.movable_logs:,} logs of finished steps, each stored at {human_bytes(opts.min_size)} or more: "
             f"{human_bytes(plan.movable_bytes)} stored in the database (compressed)",
             f"their raw bytes are uploaded to s3://{bucket}/{prefix}, read back and verified (size + SHA-256), "
             "then the database copy is set to NULL",
             f"shard {opts.shard}/{opts.shard_count}, {opts.concurrency} logs at a time"]
    if opts.assignment_ids:
        lines.append("only assignments " + ", ".join(map(str, opts.assignment_ids)))
    if plan.capped_by_max_bytes:
        lines.append(f"capped at {human_bytes(opts.max_bytes)} stored (max bytes)")
    running = plan.logs - plan.movable_logs
    if running:
        lines.append(f"{running:,} logs at or above the size are not finished: left in the database")
    return lines


class MigrateScreen(Screen):
    """Move large logs to S3 with a progress bar.

    Focus starts on the runs table, so the section keys (1-9) and the action keys work on
    arrival. ``e`` (or ``/``) goes to the options form; Enter there plans with those options and
    goes back; Escape goes back unchanged."""

    CSS_PATH = "migrate.tcss"
    # The content, never a form field: typed section keys must switch sections.
    AUTO_FOCUS = "#migrate-runs"
    BINDINGS = [
        Binding("d", "plan", "Plan (dry run)", id="migrate.plan"),
        Binding("s", "start", "Start", id="migrate.start"),
        Binding("p", "pause", "Pause/resume", id="migrate.pause"),
        Binding("c", "cancel_run", "Cancel run", id="migrate.cancel"),
        Binding("e", "edit", "Edit options", id="migrate.edit"),
        Binding("slash", "edit", "Edit options", show=False, key_display="/", id="migrate.edit_slash"),
        Binding("r", "runs", "Reload runs", id="migrate.runs"),
        Binding("o", "orphans", "Orphans", id="migrate.orphans"),
        Binding("escape", "leave_form", "Back to runs", show=False, id="migrate.leave_form"),
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
        yield Static(Text("e: edit options (Enter plans, Escape leaves) · d: plan · s: start · p: pause/resume · "
                          "c: cancel · sizes: stored = in the database (compressed), uploaded = to S3 (raw)",
                          style="dim"), id="migrate-plan")
        # Hidden until a run reports progress: with no total a ProgressBar animates forever.
        yield ProgressBar(id="migrate-progress", show_eta=False)
        yield Static(Text("no run in this session", style="dim"), id="migrate-stats")
        table = DataTable(id="migrate-runs", cursor_type="row", zebra_stripes=True)
        for label in ("run", "started", "finished", "operator", "min size", "moved", "uploaded (raw)", "skipped",
                      "failed", "shards done"):
            table.add_column(label, key=label)
        yield table

    def on_mount(self) -> None:
        self.query_one("#migrate-progress", ProgressBar).display = False
        self.action_runs()

    # -- form focus -----------------------------------------------------------------------------

    def action_edit(self) -> None:
        self.query_one("#migrate-min_size", Input).focus()

    def action_leave_form(self) -> None:
        if isinstance(self.focused, Input):
            self.query_one("#migrate-runs", DataTable).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if not (event.input.id or "").startswith("migrate-"):
            return
        event.stop()
        try:
            self.options()
        except AtcError as exc:
            self.notify(exc.message, severity="error", markup=False)
            return
        self.query_one("#migrate-runs", DataTable).focus()
        self.action_plan()

    # -- options --------------------------------------------------------------------------------

    def options(self, reason: str = "") -> MigrationOptions:
        """The form as MigrationOptions; AtcError naming the field that is wrong (empty included:
        an empty min size must never mean "every log")."""
        values = {key: self.query_one(f"#migrate-{key}", Input).value.strip() for key, _, _ in FIELDS}

        def size(key: str, label: str, example: str) -> int:
            if not values[key]:
                raise AtcError(f"{label}: enter a size, e.g. {example} (binary units, stored size)")
            try:
                return parse_size(values[key])
            except ValueError:
                raise AtcError(f"{label}: {values[key]!r} is not a size (use e.g. {example})") from None

        min_size = size("min_size", "min size", "1MB")
        max_bytes = size("max_bytes", "max bytes", "10GB") if values["max_bytes"] else None
        try:
            concurrency = int(values["concurrency"])
        except ValueError:
            raise AtcError(f"concurrency: {values['concurrency']!r} is not a whole number (e.g. 8)") from None
        try:
            assignments = tuple(int(x) for x in values["assignments"].replace(",", " ").split())
        except ValueError:
            raise AtcError(f"assignment ids: {values['assignments']!r} must be whole numbers, e.g. 12, 15") from None
        try:
            shard, count = parse_shard(values["shard"])
        except AtcError:
            raise AtcError(f"shard K/N: {values['shard']!r} is not K/N with 1 <= K <= N (e.g. 1/1)") from None
        try:
            return MigrationOptions(min_size=min_size, assignment_ids=assignments, concurrency=concurrency,
                                    shard=shard, shard_count=count, max_bytes=max_bytes, reason=reason)
        except AtcError as exc:
            raise AtcError(exc.message.replace("--min-size", "min size").replace("--concurrency", "concurrency")
                           .replace("--max-bytes", "max bytes").replace("--shard", "shard")) from None

    # -- plan -----------------------------------------------------------------------------------

    def action_plan(self) -> None:
        try:
            opts = self.options()
        except AtcError as exc:
            self.notify(exc.message, severity="error", markup=False)
            return
        self.query_one("#migrate-plan", Static).update(Text("planning…", style="dim"))
        self.run_plan(opts, False)

    @work(thread=True, exclusive=True, group="migrate-plan", exit_on_error=False)
    def run_plan(self, opts: MigrationOptions, then_start: bool) -> None:
        try:
            plan = plan_migration(self.app.db, opts)
        except AtcError as exc:
            self.app.call_from_thread(self._plan_failed, exc.message)
            return
        self.app.call_from_thread(self._show_plan, plan, opts)
        if then_start:
            self.app.call_from_thread(self._ask_to_start, plan, opts)

    def _plan_failed(self, message: str) -> None:
        self.query_one("#migrate-plan", Static).update(Text(one_line(message, 300), style="red"))
        self.notify(message, severity="error", markup=False)

    def _show_plan(self, plan: Plan, opts: MigrationOptions) -> None:
        self.plan = plan
        text = Text(f"plan: {plan.movable_logs:,} logs would move from shard {opts.shard}/{opts.shard_count}, "
                    f"{human_bytes(plan.movable_bytes)} stored in the database (compressed); "
                    f"{plan.logs - plan.movable_logs:,} at or above {human_bytes(opts.min_size)} are still running",
                    style="bold")
        if plan.capped_by_max_bytes:
            text.append(" · capped by max bytes")
        self.query_one("#migrate-plan", Static).update(text)

    # -- start / pause / cancel -----------------------------------------------------------------

    def action_start(self) -> None:
        """Plan with the form's options, then reason and confirmation stating that plan."""
        if self.running:
            self.notify("a migration is already running here (p pauses, c cancels)", severity="warning", markup=False)
            return
        try:
            opts = self.options()
        except AtcError as exc:
            self.notify(exc.message, severity="error", markup=False)
            return
        self.query_one("#migrate-plan", Static).update(Text("planning…", style="dim"))
        self.run_plan(opts, True)

    def _ask_to_start(self, plan: Plan, opts: MigrationOptions) -> None:
        if self.running:
            return
        if not plan.movable_logs:
            self.notify(f"nothing to move: no finished log stored at {human_bytes(opts.min_size)} or more in shard "
                        f"{opts.shard}/{opts.shard_count}", severity="warning", markup=False)
            return
        lines = plan_lines(plan, opts, self.app.store.bucket, self.app.settings.s3.prefix)
        title = (f"Move {plan.movable_logs:,} logs ({human_bytes(plan.movable_bytes)} stored in the database) "
                 "to S3?")

        def got_reason(reason: str | None) -> None:
            if reason is None:
                return

            def confirmed(ok: bool | None) -> None:
                if ok:
                    self._start(replace(opts, reason=reason))

            self.app.push_screen(ConfirmModal(
                title, lines, confirm_label="Move",
                prompt=f"Press y to move these {plan.movable_logs:,} logs, n or Escape to cancel."), confirmed)

        self.app.push_screen(ReasonModal(f"Migrate {plan.movable_logs:,} logs to S3", lines=lines), got_reason)

    def _start(self, opts: MigrationOptions) -> None:
        self.control = MigrationControl()
        self.running = True
        self.stats = None
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
        bar = self.query_one("#migrate-progress", ProgressBar)
        total = max(stats.planned_bytes, 1)
        bar.update(total=total, progress=min(stats.done_stored_bytes, total))
        bar.display = True
        self.query_one("#migrate-stats", Static).update(stats_text(stats))

    def _finished(self, stats: MigrationStats | None, error: str | None) -> None:
        self.running = False
        if stats is not None:
            self._paint(stats)
            severity = "information" if stats.state == "finished" and not stats.failed else "warning"
            self.notify(f"migration {stats.state}: moved {stats.moved_logs:,} logs "
                        f"({human_bytes(stats.moved_stored_bytes)} stored, {human_bytes(stats.moved_bytes)} uploaded), "
                        f"skipped {stats.skipped}, failed {stats.failed}", severity=severity, markup=False)
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
        Binding("escape", "back", "Back", id="orphans.back"),
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

    def action_back(self) -> None:
        """Escape leaves the age box first (back to the table), then the view."""
        if isinstance(self.focused, Input):
            self.query_one("#orphans-table", DataTable).focus()
        else:
            self.app.pop_screen()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.query_one("#orphans-table", DataTable).focus()

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

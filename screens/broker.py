"""Broker section (key 6): starvation findings with their reasons, runners, jobs, pauses, live;
recover through the broker's API (g) or directly in the database (G), stop a runner (x).

Also ``PauseActions``: the pause/resume actions of the assignments screen (mark rows with ``m``,
pause ``p``, resume ``u``, stop the runners working on them ``S``), kept here so every broker-facing action lives in one module. All work
runs in thread workers through ``console`` functions; nothing here holds SQL.
"""

from __future__ import annotations

import re
import time
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from console.db import Database
from console.errors import AtcError
from console.text import human_duration, one_line
from screens.live import LiveScreen
from screens.widgets import ColumnSpec, cell, state_cell

KIND_STYLES = {"waiting_idle": "yellow", "stuck_assigned": "magenta", "no_progress": "red", "not_started": "cyan"}

# Runner table order: the ones doing (or about to do) work first, retired ones last.
RUNNER_STATE_ORDER = {"running": 0, "assigned": 1, "started": 2, "creating": 3, "cleaning": 4}
RETIRED_RUNNER_STATES = frozenset({"cleaned", "not_running"})


def sort_runners(runners: list[dict[str, Any]], *, include_retired: bool) -> list[dict[str, Any]]:
    """Live runners first (running, assigned, idle, ...), then, if asked, the retired ones."""
    kept = [r for r in runners if include_retired or r["state"] not in RETIRED_RUNNER_STATES]
    return sorted(kept, key=lambda r: (RUNNER_STATE_ORDER.get(r["state"], 9), str(r["id"])))


def waiting_note(counts: dict[str, Any], findings: list) -> str:
    """Why waiting jobs are (not) starvation: waiting while no runner is idle is a full pool."""
    waiting = int(counts.get("jobs_waiting") or 0)
    if not waiting or any(f.kind == "waiting_idle" for f in findings):
        return ""
    if not int(counts.get("runners_idle") or 0):
        return f"{waiting} waiting, all runners busy (a full pool, not starvation)"
    return f"{waiting} waiting, younger than the starvation threshold or paused"


def incident_line(incident: dict[str, Any] | None) -> Text | None:
    """The outage replay's progress (``atc demo --incident``), or its failure, or None."""
    if not incident:
        return None
    phase = one_line(incident.get("phase"), 20)
    text = Text("incident replay: ", style="bold")
    if phase == "failed":
        text.append("FAILED ", style="bold red")
        text.append(one_line(incident.get("error"), 200), style="red")
        return text
    text.append(phase, style="bold yellow" if phase != "outage" else "bold red")
    seconds = incident.get("phase_seconds")
    if seconds is not None and phase != "outage":
        text.append(f" for {human_duration(float(seconds))}")
    if phase == "outage":
        text.append(" · find the root blocker (2), pause the assignment (1, p), terminate it, recover (g)")
    return text


def _age(value: Any) -> str:
    from datetime import datetime, timezone

    if value is None:
        return "-"
    if isinstance(value, datetime):
        return human_duration(max(0.0, (datetime.now(timezone.utc) - value).total_seconds()))
    return str(value)


class BrokerScreen(LiveScreen):
    """Is the broker starving, and why; get it moving and watch it move."""

    CSS_PATH = "broker.tcss"
    AUTO_FOCUS = "#findings"
    application_suffix = "/broker"
    BINDINGS = [
        Binding("g", "recover('broker')", "Recover (broker)", id="broker.recover"),
        Binding("G", "recover('db')", "Recover (DB)", id="broker.recover_db"),
        Binding("n", "dry_run", "Dry run", id="broker.dry_run"),
        Binding("x", "stop_runner", "Stop runner", id="broker.stop_runner"),
        Binding("a", "toggle_retired", "Retired runners", id="broker.retired"),
        Binding("tab", "focus_next", "Next table", show=False, id="broker.next"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, Any] = {}
        self.last_recovery: dict[str, Any] | None = None
        self.recovering = False
        self.show_retired = False
        self._incident_error_shown: str | None = None

    def compose(self) -> ComposeResult:
        yield Static(Text("Broker — starvation, runners, jobs, pauses", style="bold"), classes="screen-title")
        yield Static(Text(""), id="broker-state")
        yield Static(Text(""), id="broker-health")
        yield Static(Text(""), id="broker-incident")
        yield Static(Text(""), id="broker-recovery")
        yield Static(Text("Starving", style="bold"), classes="section-title")
        findings = DataTable(id="findings", cursor_type="row")
        for key, label in (("kind", "Kind"), ("job", "Job"), ("runner", "Runner"), ("assignment", "Assignment"),
                           ("age", "Age"), ("why", "Why it counts as starving")):
            findings.add_column(label, key=key)
        yield findings
        yield Static(Text("Runners", style="bold"), classes="section-title", id="runners-title")
        runners = DataTable(id="runners", cursor_type="row")
        for key, label in (("id", "Runner"), ("state", "State"), ("job", "Job"), ("heartbeat", "Heartbeat"),
                           ("since", "In state for"), ("ip", "Address")):
            runners.add_column(label, key=key)
        yield runners
        yield Static(Text("Jobs and pauses", style="bold"), classes="section-title")
        jobs = DataTable(id="jobs", cursor_type="row")
        for key, label in (("id", "Job"), ("state", "State"), ("assignment", "Assignment"), ("run", "Run"),
                           ("since", "In state for"), ("paused", "Paused (by, why)")):
            jobs.add_column(label, key=key)
        yield jobs

    # -- polling -----------------------------------------------------------------------------------

    def fetch(self, db: Database) -> dict[str, Any]:
        from console.pauses import current_pauses
        from console.starvation import Thresholds, broker_counts, find_starvation, list_jobs, list_runners

        settings = self.app.settings
        data: dict[str, Any] = {
            "counts": broker_counts(db),
            "findings": find_starvation(db, Thresholds.from_settings(settings)),
            "runners": list_runners(db, limit=200),
            "jobs": list_jobs(db, limit=200),
            "pauses": {p["assignment_id"]: p for p in current_pauses(db)},
            "health": None, "health_error": None,
        }
        if settings.broker.url:
            from console.broker import BrokerClient

            try:
                with BrokerClient(settings.broker.url, connect_timeout=settings.broker.connect_timeout,
                                  read_timeout=min(settings.broker.read_timeout, 3.0), retries=0) as client:
                    data["health"] = client.health()
            except AtcError as exc:
                data["health_error"] = exc.message  # the tables above still come from the database
        return data

    def show(self, data: dict[str, Any]) -> None:
        self.data = data
        self._show_health(data)
        self._fill(self.query_one("#findings", DataTable), [
            (f"{f.kind}:{f.job_id}:{f.runner_id}:{f.run_id}",
             (Text(f.kind, style=KIND_STYLES.get(f.kind, "")), cell(f.job_id), cell((f.runner_id or "")[:8]),
              cell(f.assignment_id), cell(human_duration(f.age_seconds)), cell(f.why, 300)))
            for f in data["findings"]
        ])
        self._show_runners()
        pauses = data["pauses"]
        rows = []
        for j in data["jobs"]:
            pause = pauses.get(j["assignment_id"])
            paused = Text("")
            if pause:
                paused = Text("⏸ ", style="bold yellow")
                paused.append(one_line(pause["operator"], 20))
                paused.append(": ")
                paused.append(one_line(pause["reason"], 60))
            rows.append((str(j["id"]), (cell(j["id"]), state_cell(j["state"]), cell(j["assignment_id"]),
                                        cell(j["run_id"]), cell(_age(j["updated_at"])), paused)))
        self._fill(self.query_one("#jobs", DataTable), rows)

    def _show_runners(self) -> None:
        runners = self.data.get("runners", [])
        shown = sort_runners(runners, include_retired=self.show_retired)
        retired = sum(1 for r in runners if r["state"] in RETIRED_RUNNER_STATES)
        title = Text("Runners", style="bold")
        title.append(f"  {len(runners) - retired} live", style="green")
        if retired:
            title.append(f" · {retired} retired " + ("shown" if self.show_retired else "hidden") + " (a toggles)",
                         style="dim")
        self.query_one("#runners-title", Static).update(title)
        self._fill(self.query_one("#runners", DataTable), [
            (str(r["id"]), (cell(str(r["id"])[:8]), state_cell(r["state"]), cell(r["job_id"]),
                            cell(_age(r["last_heartbeat"]) + " ago" if r["last_heartbeat"] else "-"),
                            cell(_age(r["updated_at"])), cell(r["ipaddr"], 20)))
            for r in shown
        ])

    def action_toggle_retired(self) -> None:
        self.show_retired = not self.show_retired
        if self.data:
            self._show_runners()

    def _fill(self, table: DataTable, rows: list[tuple[str, tuple]]) -> None:
        """Update in place: changed cells only, rows added/removed; the cursor stays on its row.
        If the order changed (rows are sorted), the table is refilled and the cursor follows its row."""
        wanted = {key for key, _ in rows}
        current = [k.value for k in table.rows]
        if [k for k in current if k in wanted] != [key for key, _ in rows if key in set(current)]:
            cursor_key = None
            if table.row_count:
                cursor_key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            with self.app.batch_update():
                table.clear()
                for key, values in rows:
                    table.add_row(*values, key=key)
                if cursor_key in wanted:
                    table.move_cursor(row=table.get_row_index(cursor_key))
            return
        with self.app.batch_update():
            for key in [k.value for k in list(table.rows) if k.value not in wanted]:
                table.remove_row(key)
            columns = [c.key for c in table.ordered_columns]
            for key, values in rows:
                if key in table.rows:
                    for column, value in zip(columns, values):
                        if table.get_cell(key, column) != value:
                            table.update_cell(key, column, value)
                else:
                    table.add_row(*values, key=key)

    def _show_health(self, data: dict[str, Any]) -> None:
        c = data["counts"]
        text = Text()
        text.append(f"jobs: {c.get('jobs_waiting', 0)} waiting, {c.get('jobs_started', 0)} started · ")
        text.append(f"runners: {c.get('runners_idle', 0)} idle, {c.get('runners_assigned', 0)} assigned, "
                    f"{c.get('runners_running', 0)} running · ")
        n = len(data["findings"])
        text.append(f"{n} starving", style="bold red" if n else "green")
        note = waiting_note(c, data["findings"])
        if note:
            text.append(f" ({note})", style="yellow")
        text.append(" · broker API: ")
        if data.get("health"):
            h = data["health"]
            style = "green" if h.get("dispatcher") == "running" else "bold red"
            text.append(f"dispatcher {one_line(h.get('dispatcher'), 20)}", style=style)
            text.append(f", not starting {h.get('not_starting')}, slow {h.get('slow')}")
        elif data.get("health_error"):
            text.append(one_line(data["health_error"], 160), style="red")
            text.append("  (G recovers in the database)", style="dim")
        else:
            text.append("not configured ([broker] url)", style="dim")
        self.query_one("#broker-health", Static).update(text)
        incident = (data.get("health") or {}).get("incident")
        line = incident_line(incident)
        widget = self.query_one("#broker-incident", Static)
        widget.display = line is not None
        widget.update(line or Text(""))
        error = incident.get("error") if incident and incident.get("phase") == "failed" else None
        if error and error != self._incident_error_shown:
            self._incident_error_shown = error
            self.notify(f"the incident replay failed: {one_line(error, 200)}", severity="error", markup=False,
                        timeout=15)

    def show_state(self, text: Text, stale: bool) -> None:
        self.query_one("#broker-state", Static).update(text)

    # -- actions -----------------------------------------------------------------------------------

    def action_recover(self, via: str) -> None:
        if self.recovering:
            self.notify("a recovery is already running", severity="warning", markup=False)
            return
        findings = self.data.get("findings", [])
        lines = [f"[{f.kind}] {f.why}" for f in findings] or ["no finding right now: recovery will only restart "
                                                              "dispatching and report what moved"]
        settings = self.app.settings
        watch = settings.broker.recovery_watch
        title = f"Recover starvation via {'the broker API' if via == 'broker' else 'the database (SKIP LOCKED)'}"

        def run(reason: str):
            from console.starvation import Thresholds, recover_starvation

            db = Database(settings, application_suffix="/recover")
            try:
                self.app.call_from_thread(self._recovery_started, via)
                return recover_starvation(db, settings, via=via, thresholds=Thresholds.from_settings(settings),
                                          watch_seconds=watch, reason=reason,
                                          on_tick=lambda s: self.app.call_from_thread(self._recovery_tick, s))
            finally:
                db.close()
                self.app.call_from_thread(self._recovery_ended)

        self.app.confirm_and_run(title, lines, run, on_done=self._recovered, confirm_label="Recover")

    def _recovery_started(self, via: str) -> None:
        self.recovering = True
        self.query_one("#broker-recovery", Static).update(Text(f"recovery via {via}: triggered, watching…",
                                                               style="bold yellow"))

    def _recovery_ended(self) -> None:
        self.recovering = False

    def _recovery_tick(self, summary: dict[str, Any]) -> None:
        moved = sum(1 for j in summary["jobs"] if j["results_moved"])
        runners = sum(1 for j in summary["jobs"] if j["got_runner"])
        total = len(summary["jobs"])
        self.query_one("#broker-recovery", Static).update(Text(
            f"watching {summary['watched_seconds']:.1f}s: {runners}/{total} job(s) have runners, "
            f"{moved}/{total} moving", style="yellow"))
        self.action_refresh_now()

    def _recovered(self, report) -> None:
        self.recovering = False
        data = report.as_dict()
        self.last_recovery = data
        w = report.watch or {}
        flowing = bool(w.get("flowing"))
        text = Text()
        text.append(f"recovery via {report.via}: ", style="bold")
        text.append(f"released {len(report.released)} runner(s), requeued {len(report.requeued)}, "
                    f"registered {len(report.registered)}, dispatched {len(report.dispatched)}")
        if report.busy:
            text.append(f", {len(report.busy)} busy (left alone)", style="yellow")
        if w:
            first = w.get("first_progress_after_seconds")
            text.append(" · ")
            text.append("work is flowing" if flowing else "no progress seen", style="bold green" if flowing else "bold red")
            if first is not None:
                text.append(f" (first result {first:.1f}s after the trigger)")
        self.query_one("#broker-recovery", Static).update(text)
        self.notify(text.plain, severity="information" if flowing or not report.affected_jobs() else "warning",
                    markup=False)
        self.action_refresh_now()

    def action_dry_run(self) -> None:
        self._dry_run()

    @work(thread=True, exclusive=True, group="broker-dry-run", exit_on_error=False)
    def _dry_run(self) -> None:
        from console.starvation import Thresholds, recover_starvation

        settings = self.app.settings
        via = "broker" if settings.broker.url else "db"
        try:
            report = recover_starvation(self.poll_db, settings, via=via, dry_run=True,
                                        thresholds=Thresholds.from_settings(settings))
        except AtcError as exc:
            self.app.call_from_thread(self.notify, exc.message, severity="error", markup=False)
            return
        message = (f"dry run via {via}: would release {len(report.released)} runner(s), "
                   f"register/requeue {len(report.registered) + len(report.requeued)} job(s), "
                   f"dispatch {len(report.dispatched)}")
        self.app.call_from_thread(self.notify, message, markup=False)

    def action_stop_runner(self) -> None:
        table = self.query_one("#runners", DataTable)
        if not table.row_count:
            self.notify("no runner to stop", severity="warning", markup=False)
            return
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        runner = next((r for r in self.data.get("runners", []) if str(r["id"]) == key), None)
        if runner is None:
            return
        settings = self.app.settings

        def run(reason: str):
            from console.broker import BrokerClient
            from console.pauses import stop_runners

            db = Database(settings, application_suffix="/broker-action")
            try:
                with BrokerClient.from_settings(settings) as client:
                    return stop_runners(db, settings, client, [str(runner["id"])], reason=reason)
            finally:
                db.close()

        line = f"runner {runner['id']} ({runner['state']}, job {runner['job_id']})"
        self.app.confirm_and_run("Stop 1 runner", [line], run, confirm_label="Stop runner",
                                 on_done=lambda result: (self.notify(f"stopped runner {str(runner['id'])[:8]}",
                                                                     markup=False), self.action_refresh_now()))


# -- pause / resume on the assignments screen -------------------------------------------------------

_FOR_SUFFIX = re.compile(r"\s--for\s+(\S+)\s*$")

PAUSE_BINDINGS = [
    Binding("m", "mark_assignment", "Mark", id="assignments.mark"),
    Binding("p", "pause_assignments", "Pause", id="assignments.pause"),
    Binding("u", "resume_assignments", "Resume", id="assignments.resume"),
    Binding("S", "stop_assignment_runners", "Stop runners", id="assignments.stop_runners"),
]


def mark_column() -> ColumnSpec:
    return ColumnSpec("_marked", "✓", lambda r: Text("✓", style="bold cyan") if r.get("_marked") else Text(""))


class PauseActions:
    """Mixin for the assignments screen: mark rows (m), pause (p) or resume (u) the marked rows or
    the highlighted one. Confirm, then reason (``… --for 2h`` at the end of the reason sets an
    expiry), then the pause runs in a worker. Stopping the runners still working on them is a
    separate explicit action (S, its own confirmation): after a pause atc only *tells* how many
    runners are still at work (a notification), it never pops up a second question on its own,
    which keys typed ahead would answer by accident."""

    def _marked_ids(self) -> dict[int, str]:
        marked = getattr(self, "_pause_marks", None)
        if marked is None:
            marked = self._pause_marks = {}
        return marked

    def action_mark_assignment(self) -> None:
        row = self.table.current_row()
        if row is None:
            return
        marked = self._marked_ids()
        if row["id"] in marked:
            del marked[row["id"]]
        else:
            marked[row["id"]] = row.get("name") or ""
        self.table.update_row_values(row["id"], {"_marked": row["id"] in marked})

    def _targets(self) -> dict[int, str]:
        marked = self._marked_ids()
        if marked:
            return dict(marked)
        row = self.table.current_row()
        return {row["id"]: row.get("name") or ""} if row else {}

    def action_pause_assignments(self) -> None:
        targets = self._targets()
        if not targets:
            self.notify("no assignment highlighted", severity="warning", markup=False)
            return
        settings = self.app.settings
        lines = [f"assignment {i}: {name}" for i, name in targets.items()]

        def run(reason: str):
            from console.pauses import parse_duration, pause_assignments

            duration = None
            m = _FOR_SUFFIX.search(reason)
            if m:
                try:
                    duration = parse_duration(m.group(1))
                except ValueError as exc:
                    raise AtcError(f"--for in the reason: {exc}") from None
                reason = reason[:m.start()].strip()
            return pause_assignments(self.app.db, settings, list(targets), reason=reason, duration=duration)

        self.app.confirm_and_run(f"Pause {len(targets)} assignment(s) (no new AutoTest work)", lines, run,
                                 on_done=self._paused, confirm_label="Pause")

    def _paused(self, result) -> None:
        ids = [e["assignment_id"] for e in result.events]
        note = "" if result.fenced else " (a broker claim was in flight; check the broker screen)"
        self.notify(f"paused {', '.join(map(str, ids))} in {result.elapsed_ms:.0f} ms{note}", markup=False)
        self._marked_ids().clear()
        self.reload()
        if self.app.settings.broker.url:
            self._count_runners_at_work(ids)

    @work(thread=True, exclusive=True, group="pause-runners", exit_on_error=False)
    def _count_runners_at_work(self, ids: list[int]) -> None:
        """After a pause: say (never ask) how many runners still work on those assignments."""
        try:
            working = self._runners_of(ids)
        except AtcError as exc:
            self.app.call_from_thread(self.notify, f"could not ask the broker about runners: {exc.message}",
                                      severity="warning", markup=False)
            return
        if working:
            self.app.call_from_thread(
                self.notify, f"{len(working)} runner(s) still working on the paused assignment(s): they finish "
                             f"their current result; press S to stop them now", severity="warning", markup=False,
                timeout=10)

    def _runners_of(self, ids: list[int]) -> list[dict[str, Any]]:
        from console.broker import BrokerClient
        from console.pauses import runners_of_assignments

        with BrokerClient.from_settings(self.app.settings) as client:
            return runners_of_assignments(client, ids)

    def action_stop_assignment_runners(self) -> None:
        targets = self._targets()
        if not targets:
            self.notify("no assignment highlighted", severity="warning", markup=False)
            return
        if not self.app.settings.broker.url:
            self.notify("no broker configured ([broker] url): atc cannot stop runners", severity="error",
                        markup=False)
            return
        self._find_runners_to_stop(list(targets))

    @work(thread=True, exclusive=True, group="pause-runners", exit_on_error=False)
    def _find_runners_to_stop(self, ids: list[int]) -> None:
        try:
            working = self._runners_of(ids)
        except AtcError as exc:
            self.app.call_from_thread(self.notify, exc.message, severity="error", markup=False)
            return
        if not working:
            self.app.call_from_thread(self.notify, f"no runner is working on assignment(s) {', '.join(map(str, ids))}",
                                      markup=False)
            return
        self.app.call_from_thread(self._ask_stop_runners, working)

    def _ask_stop_runners(self, working: list[dict[str, Any]]) -> None:
        settings = self.app.settings
        lines = [f"runner {r['id']} on job {r['job_id']} of assignment {r['assignment_id']}" for r in working]

        def run(reason: str):
            from console.broker import BrokerClient
            from console.pauses import stop_runners

            with BrokerClient.from_settings(settings) as client:
                return stop_runners(self.app.db, settings, client, [str(r["id"]) for r in working], reason=reason)

        self.app.confirm_and_run(f"Stop the {len(working)} runner(s) working on these assignments", lines, run,
                                 confirm_label="Stop runners",
                                 on_done=lambda res: self.notify(f"stopped {len(res)} runner(s)", markup=False))

    def action_resume_assignments(self) -> None:
        targets = self._targets()
        if not targets:
            self.notify("no assignment highlighted", severity="warning", markup=False)
            return
        settings = self.app.settings
        lines = [f"assignment {i}: {name}" for i, name in targets.items()]

        def run(reason: str):
            from console.pauses import resume_assignments

            return resume_assignments(self.app.db, settings, list(targets), reason=reason)

        def done(result) -> None:
            self.notify(f"resumed {', '.join(str(e['assignment_id']) for e in result.events)}", markup=False)
            self._marked_ids().clear()
            self.reload()

        self.app.confirm_and_run(f"Resume {len(targets)} assignment(s)", lines, run, on_done=done,
                                 confirm_label="Resume")

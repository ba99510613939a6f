"""The health screen: what would have shortened the outage, refreshed live.

Timeouts that are not set for the application's roles (warnings on top), a banner for what this
role cannot see, sparklines of the last minutes of lock waiters, active sessions and deadlocks,
connections vs max_connections, deadlock and rollback rates, the longest transaction and the
oldest idle-in-transaction session, sessions by state, and the biggest tables (heap vs TOAST).
Everything comes from ``console.health`` (no SQL here); refresh is ``LiveScreen``'s.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Sparkline, Static

from console.db import Database
from console.health import HealthHistory, HealthSnapshot, take_health
from console.text import human_bytes, human_duration, one_line

from .live import LiveScreen
from .widgets import cell


class HealthScreen(LiveScreen):
    """Database health, live."""

    CSS_PATH = "health.tcss"
    application_suffix = "/health"
    AUTO_FOCUS = "#health-timeouts"

    def __init__(self, history_minutes: float = 10.0) -> None:
        super().__init__()
        self.history = HealthHistory(minutes=history_minutes)
        self.health: HealthSnapshot | None = None

    def compose(self) -> ComposeResult:
        yield Static(Text("Health — timeouts, waits, deadlocks, connections, big tables", style="bold"),
                     classes="screen-title")
        yield Static(Text(""), id="health-state")
        yield Static(Text(""), id="health-limits")
        yield Static(Text(""), id="health-warnings")
        with Horizontal(id="health-sparks"):
            for key, label in (("waiting", "lock waiters"), ("active", "active sessions"), ("deadlocks", "new deadlocks")):
                with Vertical(classes="spark-box"):
                    yield Static(Text(label, style="bold"), id=f"spark-label-{key}")
                    yield Sparkline([], id=f"spark-{key}", summary_function=max)
        yield Static(Text(""), id="health-facts")
        with Horizontal(id="health-tables"):
            timeouts = DataTable(id="health-timeouts", cursor_type="row")
            for key, label in (("role", "ROLE"), ("name", "TIMEOUT"), ("value", "VALUE"), ("source", "FROM")):
                timeouts.add_column(label, key=key)
            yield timeouts
            states = DataTable(id="health-states", cursor_type="row")
            for key, label in (("state", "STATE"), ("sessions", "SESSIONS"), ("waiting", "LOCK WAIT"), ("here", "THIS DB")):
                states.add_column(label, key=key)
            yield states
        tables = DataTable(id="health-big-tables", cursor_type="row")
        for key, label in (("table", "TABLE"), ("heap", "HEAP"), ("toast", "TOAST"), ("indexes", "INDEXES"),
                           ("toast_share", "TOAST %"), ("note", "NOTE")):
            tables.add_column(label, key=key)
        yield tables

    def on_mount(self) -> None:
        self.query_one("#health-limits", Static).display = False
        super().on_mount()

    def fetch(self, db: Database) -> HealthSnapshot:
        return take_health(db)

    def show_state(self, text: Text, stale: bool) -> None:
        if self.health is not None:
            text.append(f"  {self.health.database} as {self.health.role}, {self.health.elapsed_ms:.0f} ms", style="dim")
        self.query_one("#health-state", Static).update(text)

    def show(self, health: HealthSnapshot) -> None:
        self.health = health
        self.history.add(health)
        limits = self.query_one("#health-limits", Static)
        limits.display = bool(health.limits)
        limits.update(Text("\n".join("cannot see: " + one_line(line, 220) for line in health.limits)))
        warnings = Text()
        for line in health.warnings:
            if warnings:
                warnings.append("\n")
            warnings.append("⚠ " + one_line(line, 220), style="bold red")
        if not health.warnings:
            warnings.append("✓ statement, lock and idle-in-transaction timeouts are set for every application role",
                            style="green")
        self.query_one("#health-warnings", Static).update(warnings)
        for key, values, now in (("waiting", self.history.waiting, health.lock_waiters),
                                 ("active", self.history.active, health.active),
                                 ("deadlocks", self.history.deadlocks, health.deadlocks)):
            self.query_one(f"#spark-{key}", Sparkline).data = values or [0]
            label = {"waiting": f"lock waiters: {now}", "active": f"active sessions: {now}",
                     "deadlocks": f"deadlocks: {now} total, {health.deadlocks_per_hour:.2f}/h, "
                                  f"{self.history.deadlocks_per_minute():.1f}/min now"}[key]
            self.query_one(f"#spark-label-{key}", Static).update(Text(label, style="bold"))
        self.query_one("#health-facts", Static).update(self._facts(health))
        self._fill_timeouts(health)
        self._fill_states(health)
        self._fill_tables(health)

    def _facts(self, h: HealthSnapshot) -> Text:
        text = Text()
        use = h.connection_use
        text.append("connections ", style="bold")
        text.append(f"{h.connections}/{h.max_connections} ({use:.0%})",
                    style="bold red" if use >= 0.8 else ("yellow" if use >= 0.6 else ""))
        text.append("   rollbacks ", style="bold")
        text.append(f"{h.xact_rollback} ({h.rollback_ratio:.1%}, {h.rollbacks_per_minute:.2f}/min)")
        text.append("   counting since ", style="bold")
        text.append(h.counting_since.isoformat(timespec="seconds") if h.counting_since else "-")
        for label, rows in (("longest transaction", h.longest_transactions),
                            ("oldest idle in transaction", h.idle_in_transaction)):
            text.append(f"\n{label}: ", style="bold")
            if rows:
                s = rows[0]
                text.append(f"pid {s['pid']} {human_duration(s['age'])} ", style="red" if (s["age"] or 0) > 60 else "")
                text.append(one_line(f"{s['user']}@{s['database']} {s['application_name'] or ''} [{s['state']}] {s['query']}", 140))
            else:
                text.append("none", style="dim")
        return text

    def _fill_timeouts(self, h: HealthSnapshot) -> None:
        table = self.query_one("#health-timeouts", DataTable)
        with self.app.batch_update():
            table.clear()
            for t in h.timeouts:
                table.add_row(cell(t.role, 30), cell(t.name),
                              Text("off", style="bold red") if t.off else cell(t.value, 20), cell(t.source, 50))

    def _fill_states(self, h: HealthSnapshot) -> None:
        table = self.query_one("#health-states", DataTable)
        with self.app.batch_update():
            table.clear()
            for r in h.sessions_by_state:
                style = "bold red" if str(r["state"]).startswith("idle in transaction") else ""
                table.add_row(cell(r["state"], 40, style), Text(str(r["sessions"]), justify="right"),
                              Text(str(r["lock_waiters"]), justify="right", style="yellow" if r["lock_waiters"] else ""),
                              Text(str(r["in_this_database"]), justify="right"))

    def _fill_tables(self, h: HealthSnapshot) -> None:
        table = self.query_one("#health-big-tables", DataTable)
        with self.app.batch_update():
            table.clear()
            for t in h.tables:
                share = t.toast / (t.heap + t.toast) if (t.heap + t.toast) else 0.0
                table.add_row(cell(f"{t.schema}.{t.name}", 60), Text(human_bytes(t.heap), justify="right"),
                              Text(human_bytes(t.toast), justify="right"),
                              Text(human_bytes(t.indexes) if t.indexes is not None else "?", justify="right"),
                              Text(f"{share:.0%}", justify="right"), cell(t.note, 40, "yellow"))

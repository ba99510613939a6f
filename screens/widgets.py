"""Widgets shared by every atc screen.

- ``StatusLine``: database target, S3 endpoint, operator, READ-ONLY, connection state. The app
  mounts one on every full screen, whoever wrote the screen.
- ``ConfirmModal(title, lines)``: lists exactly what an action will affect; returns True/False.
- ``ReasonModal(title)``: asks for the reason recorded in the audit trail; returns str or None.
- ``PagedTable``: a DataTable over a keyset-paginated list that asks for the next page when the
  cursor nears the end (and the previous one near the top) and holds at most ``window_pages``
  pages, so a million-row list never lives in memory.
- ``cell(value)``: untrusted data as a plain ``rich.text.Text`` (no markup, controls escaped).

Every text that comes from the database or the operator is wrapped in ``Text`` (never markup).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, DataTable, Input, Label, Static

from console.text import one_line

STATE_STYLES = {
    "passed": "green", "failed": "red", "timed_out": "magenta", "running": "yellow",
    "not_started": "dim", "skipped": "dim", "done": "green", "open": "cyan", "hidden": "dim",
    "killed": "red", "finished": "green", "waiting_for_runner": "yellow", "started": "yellow",
}


def cell(value: Any, limit: int = 120, style: str = "") -> Text:
    """Untrusted value -> one visible line of plain text (never markup)."""
    return Text(one_line("" if value is None else value, limit), style=style)


def state_cell(state: str | None) -> Text:
    return Text(one_line(state or "-", 40), style=STATE_STYLES.get(state or "", ""))


# -- status line --------------------------------------------------------------------------------


class StatusLine(Static):
    """Always-visible facts: where atc points, as whom, read-only or not, connection health."""

    DEFAULT_CSS = """
    StatusLine { dock: bottom; height: 1; background: $panel; color: $text-muted; padding: 0 1; }
    """

    def on_mount(self) -> None:
        app = self.app
        if hasattr(app, "connection_state"):
            self.watch(app, "connection_state", self._refresh_text, init=False)
            self.watch(app, "server_info", self._refresh_text, init=False)
        self._refresh_text()

    def _refresh_text(self, *_: Any) -> None:
        self.update(self.render_status())

    def render_status(self) -> Text:
        app = self.app
        settings = getattr(app, "settings", None)
        text = Text(no_wrap=True, overflow="ellipsis")
        if settings is None:
            return text
        db = getattr(app, "db", None)
        browse_db = getattr(app, "browse_db", None)
        text.append("db ", style="bold")
        text.append(one_line(db.describe() if db else "?", 60))
        if browse_db is not None and browse_db is not db:
            text.append("  replica ", style="bold")
            text.append(one_line(browse_db.describe(), 60))
        text.append("  s3 ", style="bold")
        s3 = settings.s3
        text.append(one_line(f"{s3.endpoint_url or 'AWS S3'} {s3.bucket or '(no bucket)'}", 60))
        text.append("  operator ", style="bold")
        text.append(one_line(settings.operator_name, 30))
        if settings.read_only:
            text.append("  READ-ONLY", style="bold reverse yellow")
        state = getattr(app, "connection_state", "")
        style = {"ok": "green", "stale": "bold red", "reconnecting": "bold yellow"}.get(state, "dim")
        text.append("  ● ", style=style)
        text.append(state, style=style)
        info = getattr(app, "server_info", "")
        if info:
            text.append(f"  {one_line(info, 30)}", style="dim")
        return text


class BottomBar(Vertical):
    """Status line above the footer, docked together (two widgets docked to one edge overlap)."""

    DEFAULT_CSS = """
    BottomBar { dock: bottom; height: 2; }
    BottomBar > StatusLine { dock: none; }
    BottomBar > Footer { dock: none; }
    """


# -- modals ---------------------------------------------------------------------------------------


class ConfirmModal(ModalScreen[bool]):
    """Ask before a state-changing action, listing exactly what it affects.

    Dismisses with True (confirmed) or False. ``lines`` are untrusted text, shown literally.
    """

    DEFAULT_CSS = """
    ConfirmModal { align: center middle; }
    ConfirmModal > Vertical { width: 90; max-width: 95%; height: auto; max-height: 90%;
        border: thick $error; background: $surface; padding: 1 2; }
    ConfirmModal #confirm-title { text-style: bold; margin-bottom: 1; }
    ConfirmModal VerticalScroll { height: auto; max-height: 20; }
    ConfirmModal Horizontal { height: auto; margin-top: 1; align-horizontal: right; }
    ConfirmModal Button { margin-left: 2; }
    """

    BINDINGS = [
        Binding("y", "confirm", "Confirm", id="confirm.yes"),
        Binding("n,escape", "cancel", "Cancel", id="confirm.no"),
    ]

    def __init__(self, title: str, lines: Sequence[str], *, confirm_label: str = "Confirm",
                 prompt: str | None = None) -> None:
        super().__init__()
        self.title_text = title
        self.lines = list(lines)
        self.confirm_label = confirm_label
        # What "y" does, when counting lines would mislead (one line can stand for 4,900 logs).
        self.prompt = prompt or f"{len(self.lines)} item(s). Press y to confirm, n or Escape to cancel."

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(cell(self.title_text, 200), id="confirm-title")
            with VerticalScroll(id="confirm-lines"):
                for line in self.lines:
                    yield Static(cell(line, 300))
            yield Static(Text(self.prompt, style="dim"))
            with Horizontal():
                yield Button("Cancel", id="cancel")
                yield Button(self.confirm_label, id="confirm", variant="error")

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "confirm")

    def action_confirm(self) -> None:
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)


class ReasonModal(ModalScreen[str | None]):
    """Ask for the reason an action is taken (recorded in the audit trail).

    Dismisses with the reason (stripped) or None when cancelled. With ``required`` an empty
    reason is refused with a hint instead of being accepted.
    """

    DEFAULT_CSS = """
    ReasonModal { align: center middle; }
    ReasonModal > Vertical { width: 80; max-width: 95%; height: auto; border: thick $warning;
        background: $surface; padding: 1 2; }
    ReasonModal #reason-title { text-style: bold; margin-bottom: 1; }
    ReasonModal #reason-hint { color: $text-muted; }
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="reason.cancel")]

    def __init__(self, title: str, *, prompt: str = "Reason (recorded in the audit trail)",
                 lines: Sequence[str] = (), required: bool = True, placeholder: str = "e.g. INC-123 stuck runner") -> None:
        super().__init__()
        self.title_text = title
        self.prompt = prompt
        self.lines = list(lines)
        self.required = required
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(cell(self.title_text, 200), id="reason-title")
            for line in self.lines[:5]:
                yield Static(cell(line, 200))
            if len(self.lines) > 5:
                yield Static(Text(f"… and {len(self.lines) - 5} more", style="dim"))
            yield Label(cell(self.prompt))
            yield Input(placeholder=self.placeholder, id="reason-input")
            yield Static(Text("Enter to submit, Escape to cancel"), id="reason-hint")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        reason = event.value.strip()
        if self.required and not reason:
            self.query_one("#reason-hint", Static).update(Text("A reason is required (Escape cancels).", style="bold red"))
            return
        self.dismiss(reason)

    def action_cancel(self) -> None:
        self.dismiss(None)


# -- paged table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnSpec:
    """A column: its key in the row dict, its label, and how to render the value (Text)."""

    key: str
    label: str
    render: Callable[[dict[str, Any]], Text] | None = None
    width: int | None = None

    def cell(self, row: dict[str, Any]) -> Text:
        if self.render is not None:
            return self.render(row)
        return cell(row.get(self.key))


class PagedTable(DataTable):
    """A DataTable over a keyset-paginated list, holding a bounded window of pages.

    The owner loads pages (in a worker) and calls ``load_first``/``append_page``/``prepend_page``;
    the table posts ``NeedRows`` when the cursor comes within ``threshold`` rows of the end (or of
    the top after rows were dropped there). It never holds more than ``window_pages`` pages.
    Rows are identified by ``row_id(row)``; ``row_key(row)`` is the keyset key to page from.
    """

    help_group = "List"
    # vi habits next to the arrows; DataTable already scrolls sideways with left/right (row cursor)
    # and ctrl+pageup/ctrl+pagedown when the columns are wider than the screen.
    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]

    class NeedRows(Message):
        """Ask the owner for the page after ``key`` (direction "after") or before it ("before")."""

        def __init__(self, table: "PagedTable", direction: str, key: Any) -> None:
            super().__init__()
            self.table = table
            self.direction = direction
            self.key = key

        @property
        def control(self) -> "PagedTable":
            return self.table

    def __init__(self, columns: Sequence[ColumnSpec], *, row_id: Callable[[dict[str, Any]], Hashable],
                 row_key: Callable[[dict[str, Any]], Any], page_size: int = 100, window_pages: int = 3,
                 threshold: int = 10, **kwargs: Any) -> None:
        kwargs.setdefault("cursor_type", "row")
        kwargs.setdefault("zebra_stripes", True)
        super().__init__(**kwargs)
        self.specs = list(columns)
        self.row_id = row_id
        self.row_key = row_key
        self.page_size = page_size
        self.window_pages = max(2, window_pages)
        # Ask early enough to scroll smoothly, but never for a page the screen cannot show yet.
        self.threshold = max(1, min(threshold, page_size // 3))
        self.rows_by_id: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.after_key: Any | None = None   # more rows after the last held row
        self.before_key: Any | None = None  # rows were dropped above the first held row
        self.waiting: str | None = None     # direction of a page being fetched

    @property
    def max_rows(self) -> int:
        return self.page_size * self.window_pages

    def on_mount(self) -> None:
        for spec in self.specs:
            self.add_column(Text(spec.label), key=spec.key, width=spec.width)

    # -- filling ---------------------------------------------------------------------------------

    def load_first(self, rows: Sequence[dict[str, Any]], next_after: Any | None) -> None:
        """Replace everything with the first page, keeping the cursor on the same row if possible."""
        current = self.current_row_id()
        self.clear()
        self.rows_by_id.clear()
        self.order.clear()
        self.before_key = None
        self.waiting = None
        self._add(rows)
        self.after_key = next_after
        if current is not None and current in self.rows_by_id:
            self.move_cursor(row=self.order.index(current), animate=False)

    def append_page(self, rows: Sequence[dict[str, Any]], next_after: Any | None) -> None:
        self.waiting = None
        self._add(rows)
        self.after_key = next_after
        excess = len(self.order) - self.max_rows
        if excess > 0:
            cursor = self.cursor_row
            for rid in self.order[:excess]:
                self.remove_row(rid)
                del self.rows_by_id[rid]
            del self.order[:excess]
            self.before_key = self.row_key(self.rows_by_id[self.order[0]])
            self.move_cursor(row=max(0, cursor - excess), animate=False)

    def prepend_page(self, rows: Sequence[dict[str, Any]], more_before: bool) -> None:
        """Insert rows above the window (DataTable cannot insert, so the window is rebuilt)."""
        self.waiting = None
        held = [self.rows_by_id[rid] for rid in self.order]
        rows = [r for r in rows if str(self.row_id(r)) not in self.rows_by_id]
        combined = list(rows) + held
        dropped_tail = len(combined) > self.max_rows
        combined = combined[: self.max_rows]
        cursor = self.cursor_row + len(rows)
        self.clear()
        self.rows_by_id.clear()
        self.order.clear()
        self._add(combined)
        if dropped_tail:
            self.after_key = self.row_key(combined[-1])
        self.before_key = self.row_key(combined[0]) if more_before and combined else None
        self.move_cursor(row=min(cursor, max(0, len(self.order) - 1)), animate=False)

    def update_row_values(self, row_id: Hashable, values: dict[str, Any]) -> None:
        """Fill in columns that a second query computed (e.g. sizes), in place, without flicker."""
        rid = str(row_id)
        row = self.rows_by_id.get(rid)
        if row is None:
            return
        row.update(values)
        for spec in self.specs:
            if spec.key in values or spec.render is not None:
                try:
                    # Grow the column when the new value is wider (a "…" placeholder becoming
                    # "221.4 KiB" must not be cut to "221.").
                    self.update_cell(rid, spec.key, spec.cell(row), update_width=spec.width is None)
                except Exception:
                    pass

    def rerender_column(self, key: str) -> None:
        """Render one column again from the held rows (e.g. an age that grows with time)."""
        spec = next((s for s in self.specs if s.key == key), None)
        if spec is None:
            return
        for rid in self.order:
            try:
                self.update_cell(rid, key, spec.cell(self.rows_by_id[rid]), update_width=spec.width is None)
            except Exception:
                pass

    def _add(self, rows: Sequence[dict[str, Any]]) -> None:
        for row in rows:
            rid = str(self.row_id(row))
            if rid in self.rows_by_id:
                continue
            self.rows_by_id[rid] = row
            self.order.append(rid)
            self.add_row(*(spec.cell(row) for spec in self.specs), key=rid)

    # -- reading ---------------------------------------------------------------------------------

    def current_row(self) -> dict[str, Any] | None:
        rid = self.current_row_id()
        return self.rows_by_id.get(rid) if rid is not None else None

    def current_row_id(self) -> str | None:
        if not self.order or self.cursor_row < 0 or self.cursor_row >= len(self.order):
            return None
        return self.order[self.cursor_row]

    def held_rows(self) -> list[dict[str, Any]]:
        return [self.rows_by_id[rid] for rid in self.order]

    # -- asking for more -------------------------------------------------------------------------

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.check_need_rows()

    def check_need_rows(self) -> None:
        if self.waiting is not None or not self.order:
            return
        row = self.cursor_row
        if self.after_key is not None and row >= len(self.order) - self.threshold:
            self.waiting = "after"
            self.post_message(self.NeedRows(self, "after", self.after_key))
        elif self.before_key is not None and row < self.threshold:
            self.waiting = "before"
            self.post_message(self.NeedRows(self, "before", self.before_key))


class EmptyNote(Static):
    """A one-line note shown under a table (e.g. 'no results match the filter')."""

    DEFAULT_CSS = "EmptyNote { height: auto; color: $text-muted; padding: 0 1; }"


__all__ = [
    "BottomBar", "ColumnSpec", "ConfirmModal", "EmptyNote", "PagedTable", "ReasonModal", "StatusLine", "Widget", "cell",
    "state_cell",
]

"""The `?` help screen, generated from the bindings active on the screen it was opened from.

It reads the same binding table the footer and the command palette use, so it cannot go stale.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Static


def binding_rows(screen: Screen) -> list[tuple[str, str, str]]:
    """(where, keys, description) for every active, described binding of ``screen``."""
    app = screen.app
    rows: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str]] = set()
    for key, active in screen.active_bindings.items():
        binding = active.binding
        if not binding.description:
            continue
        node = active.node
        where = "global" if node is app else type(node).__name__
        display = binding.key_display or app.get_key_display(binding)
        if (display, binding.description) in seen:
            continue
        seen.add((display, binding.description))
        rows.append((where, display, binding.description))
    order = {"global": 1}
    rows.sort(key=lambda r: (order.get(r[0], 0), r[0]))
    return rows


class HelpScreen(ModalScreen[None]):
    """Keys of the screen underneath, grouped by where they apply."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 80; max-width: 95%; height: auto; max-height: 90%;
        border: thick $accent; background: $surface; padding: 1 2; }
    """
    BINDINGS = [Binding("escape,q,question_mark", "close", "Close help", id="help.close")]

    def __init__(self, target: Screen) -> None:
        super().__init__()
        self.target = target

    def compose(self) -> ComposeResult:
        table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
        table.add_column("Where")
        table.add_column("Key")
        table.add_column("Action")
        for where, key, description in binding_rows(self.target):
            table.add_row(Text(where, style="dim"), Text(key, style="bold"), Text(description))
        with VerticalScroll():
            yield Static(Text(f"Keys on {type(self.target).__name__}", style="bold"))
            yield Static(table, id="help-table")
            yield Static(Text(
                "\n: opens the command line (:a ID, :run ID, :result ID, :log ID, :q, section names);"
                " ctrl+p opens the command palette. Escape closes this help.", style="dim"))

    def action_close(self) -> None:
        self.dismiss(None)

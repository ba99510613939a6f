"""The `?` help screen, generated from the bindings active on the screen it was opened from.

It reads the same binding table the footer and the command palette use, so it cannot go stale.
Groups get human titles (``help_group`` / ``help_title`` class attributes, else the class name in
words); Textual's generic bindings that every app has (focus cycling, copy, per-cell cursor moves)
are left out, and the section keys are listed in key order.
"""

from __future__ import annotations

import re

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.dom import DOMNode
from textual.screen import ModalScreen, Screen
from textual.widgets import Static

# Bindings every Textual app carries that say nothing about atc (hidden from help and palette).
NOISE_ACTIONS = frozenset({
    "app.focus_next", "app.focus_previous", "focus_next", "focus_previous", "screen.copy_text", "copy_text",
    "command_palette",
})
NOISE_KEYS = frozenset({"super+c", "ctrl+c", "tab", "shift+tab"})
# DataTable's arrow-key bindings ("Cursor up", ...): the arrows need no explanation.
NOISE_DESCRIPTIONS = frozenset({"Cursor up", "Cursor down", "Cursor left", "Cursor right"})

GLOBAL_GROUP = "Everywhere"


def is_noise(key: str, binding: Binding) -> bool:
    return (binding.action in NOISE_ACTIONS or key in NOISE_KEYS or not binding.description
            or binding.description in NOISE_DESCRIPTIONS)


def group_title(node: DOMNode) -> str:
    """A human title for where a binding comes from (never a class name)."""
    from textual.app import App

    if isinstance(node, App):
        return GLOBAL_GROUP
    title = getattr(node, "help_title", None) or getattr(node, "help_group", None)
    if title:
        return str(title)
    name = type(node).__name__.removesuffix("Screen") or type(node).__name__
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).split()
    return " ".join([words[0]] + [w.lower() for w in words[1:]]) if words else name


def _section_key(action: str, key: str) -> tuple[int, str]:
    return (1, key) if action.startswith("section(") else (0, "")


def binding_rows(screen: Screen) -> list[tuple[str, str, str]]:
    """(group title, keys, description) for every active, described, non-noise binding of ``screen``:
    the screen's own keys first, then its widgets', then the global ones (sections by key)."""
    app = screen.app
    rows: list[tuple[int, tuple[int, str], int, str, str, str]] = []
    seen: set[tuple[str, str]] = set()
    for index, (key, active) in enumerate(screen.active_bindings.items()):
        binding = active.binding
        if is_noise(key, binding):
            continue
        node = active.node
        display = binding.key_display or app.get_key_display(binding)
        if (display, binding.description) in seen:
            continue
        seen.add((display, binding.description))
        rank = 2 if node is app else 0 if node is screen else 1
        rows.append((rank, _section_key(binding.action, key), index, group_title(node), display, binding.description))
    rows.sort(key=lambda r: r[:3])
    return [(group, display, description) for *_, group, display, description in rows]


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
        previous = None
        for where, key, description in binding_rows(self.target):
            # Name each group once, on its first row.
            table.add_row(Text(where if where != previous else "", style="dim"), Text(key, style="bold"),
                          Text(description))
            previous = where
        with VerticalScroll():
            yield Static(Text(f"Keys: {group_title(self.target)}", style="bold"))
            yield Static(table, id="help-table")
            yield Static(Text(
                "\n: opens the command line (:a ID, :run ID, :result ID, :log ID, :q, section names);"
                " ctrl+p opens the command palette. Escape closes this help.", style="dim"))

    def action_close(self) -> None:
        self.dismiss(None)

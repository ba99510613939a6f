"""Command palette provider fed from the same table as the bindings.

Entries: every section (switch with its number key), every described binding active on the
current screen (app-wide actions from ``APP_ACTIONS`` plus the screen's own BINDINGS), run exactly
as the key would run them, minus the noise the help screen hides too (cursor moves, focus cycling,
copy); plus "Quit" and "Open log by id" when no binding provides them.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from textual.command import DiscoveryHit, Hit, Hits, Provider

from .help import is_noise


# Moving around a list or a log is what keys are for; as palette entries they only pad the list.
MOVEMENT_PREFIXES = ("cursor_", "scroll_", "page_", "select_cursor")


def is_movement(binding: Any) -> bool:
    return not binding.show and binding.action.startswith(MOVEMENT_PREFIXES)


def open_log_prompt(app: Any) -> None:
    """The `:` command line, already holding ``log `` (type the step result id, Enter)."""
    from textual.widgets import Input

    from .app import CommandLine

    prompt = CommandLine()
    app.push_screen(prompt, app.run_command_line)

    def prefill() -> None:
        field = prompt.query_one(Input)
        field.value = "log "
        field.cursor_position = len(field.value)

    app.call_after_refresh(prefill)


class AtcCommands(Provider):
    def _entries(self) -> list[tuple[str, str, Callable[[], Any]]]:
        app = self.app
        # Provider.screen is the screen the palette was opened from.
        target = self.screen
        entries: list[tuple[str, str, Callable[[], Any]]] = []
        for section in getattr(app, "sections", []):
            entries.append((f"Go to {section.title}", f"key {section.key} — {section.description}",
                            partial(app.action_section, section.mode)))
        seen: set[str] = set()
        for key, active in target.active_bindings.items():
            binding = active.binding
            if is_noise(key, binding) or binding.action.startswith("section(") or is_movement(binding):
                continue
            if binding.description in seen:
                continue
            seen.add(binding.description)
            display = binding.key_display or app.get_key_display(binding)
            entries.append((binding.description, f"key {display}",
                            partial(app.run_action, binding.action, active.node)))
        if "Quit" not in seen:
            entries.append(("Quit", "leave atc (:q)", partial(app.exit, 0)))
        if hasattr(app, "run_command_line"):
            entries.append(("Open log by id", ":log STEP_RESULT_ID", partial(open_log_prompt, app)))
        return entries

    async def discover(self) -> Hits:
        for title, help_text, callback in self._entries():
            yield DiscoveryHit(title, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, callback in self._entries():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text)

"""Command palette provider fed from the same table as the bindings.

Entries: every section (switch with its number key), and every described binding active on the
current screen (app-wide actions from ``APP_ACTIONS`` plus the screen's own BINDINGS), run exactly
as the key would run them.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from textual.command import DiscoveryHit, Hit, Hits, Provider


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
            if not binding.description or binding.action.startswith("section("):
                continue
            if binding.description in seen or binding.action == "command_palette":
                continue
            seen.add(binding.description)
            display = binding.key_display or app.get_key_display(binding)
            entries.append((binding.description, f"key {display}",
                            partial(app.run_action, binding.action, active.node)))
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

"""Regenerate the README's screenshots from a running demo.

    atc demo up --data-dir /tmp/atc-shots
    python3 docs/screenshots/make.py /tmp/atc-shots/atc.toml
    atc demo down --data-dir /tmp/atc-shots

Drives the real app with Textual's pilot at 160x42 and saves SVGs next to this file.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from console.config import load_settings
from screens.app import AtcApp

HERE = Path(__file__).resolve().parent
SIZE = (160, 42)


async def settle(pilot, condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.1)
        try:
            if condition():
                return
        except Exception:
            pass
    raise TimeoutError("screen did not settle")


def list_loaded(app) -> bool:
    from screens.widgets import PagedTable

    screen = app.screen
    return getattr(screen, "token", 1) is None and screen.query_one(PagedTable).row_count > 0


async def main(config: str) -> None:
    settings = load_settings(config)
    app = AtcApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, lambda: list_loaded(app))
        await pilot.pause(1.0)  # let the log-bytes column fill in
        app.save_screenshot(str(HERE / "assignments.svg"))
        for _ in range(3):
            await pilot.press("enter")
            await settle(pilot, lambda: list_loaded(app))
        app.save_screenshot(str(HERE / "steps.svg"))
        await pilot.press("down", "down")
        await pilot.press("enter")
        await pilot.pause(2.0)
        app.save_screenshot(str(HERE / "log-viewer.svg"))
        for key, name in (("3", "health"), ("4", "sizes")):
            await pilot.press("escape", "escape", "escape", "escape")
            await pilot.press(key)
            await pilot.pause(3.0)
            app.save_screenshot(str(HERE / f"{name}.svg"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 docs/screenshots/make.py PATH/TO/atc.toml")
    asyncio.run(main(sys.argv[1]))

"""A screen that refreshes itself live, Dolphie style.

- The next poll is scheduled when the last one finishes (never a fixed timer that can pile up
  behind a slow server).
- ``space`` pauses and resumes; ``r`` polls now.
- A failed poll keeps the last data on screen, marked stale with the time it was last good, and
  retries with backoff (1, 2, 4 ... 30 s); the first good poll clears the mark.
- The poll has its own ``Database`` (application_name ``atc/<operator>/<suffix>``), so it never
  competes with actions, and actions (signals) never wait behind it.

Subclasses implement ``fetch(db)`` (runs in a thread, no UI access) and ``show(data)`` (UI
thread), and may override ``show_state(text, stale)``.
"""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.screen import Screen
from textual.timer import Timer

from console.db import Database
from console.errors import AtcError


class LiveScreen(Screen):
    BINDINGS = [
        Binding("space", "toggle_pause", "Pause/resume", id="live.pause"),
        Binding("r", "refresh_now", "Refresh", id="live.refresh"),
    ]
    application_suffix = "/live"
    max_backoff = 30.0

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.stale = False
        self.failures = 0
        self.polls = 0
        self.last_good: float | None = None
        self.last_error = ""
        self.polling = False
        self._timer: Timer | None = None
        self._poll_db: Database | None = None

    # -- to fill in --------------------------------------------------------------------------

    def fetch(self, db: Database) -> Any:
        raise NotImplementedError

    def show(self, data: Any) -> None:
        raise NotImplementedError

    def show_state(self, text: Text, stale: bool) -> None:
        pass

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def interval(self) -> float:
        settings = getattr(self.app, "settings", None)
        return max(0.1, settings.ui.refresh_interval) if settings else 2.0

    @property
    def poll_db(self) -> Database:
        if self._poll_db is None:
            self._poll_db = Database(self.app.settings, application_suffix=self.application_suffix)
        return self._poll_db

    def on_mount(self) -> None:
        self.start_poll()

    def on_unmount(self) -> None:
        self._cancel_timer()
        if self._poll_db is not None:
            self._poll_db.cancel()
            self._poll_db.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def _schedule(self, delay: float) -> None:
        self._cancel_timer()
        if not self.paused and self.is_mounted:
            self._timer = self.set_timer(delay, self.start_poll)

    def start_poll(self) -> None:
        self._timer = None
        if self.polling:
            return
        self.polling = True
        self.poll()

    @work(thread=True, exclusive=True, group="live-poll", exit_on_error=False)
    def poll(self) -> None:
        try:
            data = self.fetch(self.poll_db)
        except AtcError as exc:
            self.app.call_from_thread(self._poll_failed, exc.message)
            return
        except Exception as exc:  # a bug in one refresh must not end live monitoring
            self.app.call_from_thread(self._poll_failed, f"{type(exc).__name__}: {exc}")
            return
        self.app.call_from_thread(self._poll_done, data)

    def _poll_done(self, data: Any) -> None:
        self.polling = False
        self.polls += 1
        self.failures = 0
        self.stale = False
        self.last_error = ""
        self.last_good = time.time()
        self.remove_class("stale")
        self.show(data)
        self._update_state()
        self._schedule(self.interval)

    def _poll_failed(self, message: str) -> None:
        self.polling = False
        self.failures += 1
        self.stale = True
        self.last_error = message
        self.add_class("stale")
        if self.failures == 1:
            self.notify(message, severity="error", markup=False)
        self._update_state()
        self._schedule(self.backoff())

    def backoff(self) -> float:
        return min(self.max_backoff, 2.0 ** (self.failures - 1))

    def _update_state(self) -> None:
        text = Text()
        if self.stale:
            since = time.strftime("%H:%M:%S", time.localtime(self.last_good)) if self.last_good else "never"
            text.append(" STALE ", style="bold reverse red")
            text.append(f" last good {since}; ", style="red")
            text.append(self.last_error[:160], style="red")
            text.append(f"; retry {self.failures} in {self.backoff():.0f}s", style="red")
        elif self.paused:
            text.append(" PAUSED ", style="bold reverse yellow")
            text.append(" space resumes", style="dim")
        else:
            text.append(" LIVE ", style="bold reverse green")
            text.append(f" every {self.interval:g}s", style="dim")
        if self.paused and self.stale:
            text.append("  (paused)", style="yellow")
        self.show_state(text, self.stale)

    # -- actions -------------------------------------------------------------------------------

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        if self.paused:
            self._cancel_timer()
        elif not self.polling:
            self.start_poll()
        self._update_state()

    def action_refresh_now(self) -> None:
        self._cancel_timer()
        self.start_poll()

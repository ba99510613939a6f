"""The log viewer: one step result's log, streamed, virtualised, searchable.

All reading happens in ``console.logview`` (no SQL, no S3 calls here): opening the log (a query
and the start of a stream) runs in a thread worker; the spool fills in the background; the
``LogLines`` widget draws only the rows on screen, reading those display lines from the local
spool (a bounded ``pread`` of at most ~260 KiB from the page cache, cheap enough for the UI
thread). Searches run in an exclusive worker and can wait for a log that is still loading.

Every line goes through ``console.ansi``: plain ``Text`` (never markup), colour only from SGR,
every other control sequence shown as a visible escape.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal
from textual.geometry import Size
from textual.screen import Screen
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widgets import Input, Static, Tab, Tabs

from console.ansi import render, render_raw
from console.errors import AtcError
from console.logview import PIECE_BYTES, DisplayLine, Document, OpenLog, open_log
from console.text import human_bytes, one_line

GUTTER_STYLE = Style(dim=True)
HIT_LINE_STYLE = Style(bgcolor="grey23")
HIT_STYLE = Style(reverse=True, bold=True)
# Every other match of the search on screen (cheap: only the visible rows are rendered).
MATCH_STYLE = Style(bgcolor="yellow", color="black")
# Wrapped mode shows at most this many rows of one display line (a 2 KiB piece at 80 columns is
# ~26 rows; escapes can make it longer).
MAX_WRAP_ROWS = 200


class LogLines(ScrollView, can_focus=True):
    """Virtualised view of a Document: one scroll unit per display line.

    No-wrap mode: row y shows display line scroll_y + y, cropped at scroll_x.
    Wrap mode: display lines from scroll_y are wrapped to the width until the screen is full.
    """

    DEFAULT_CSS = """
    LogLines { height: 1fr; }
    """

    help_group = "Log lines"

    BINDINGS = [
        Binding("up,k", "scroll_up", "Up", show=False),
        Binding("down,j", "scroll_down", "Down", show=False),
        Binding("left", "scroll_left", "Left", show=False),
        Binding("right", "scroll_right", "Right", show=False),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
        Binding("home", "scroll_home", "Top", show=False),
        Binding("end", "scroll_end", "End", show=False),
    ]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.document: Document | None = None
        self.raw_mode = False
        self.colour = True
        self.wrap = False
        self.preview: list[DisplayLine] | None = None  # end of an S3 log before it is spooled
        self.hit_line: int | None = None
        self.hit_pattern: re.Pattern[str] | None = None
        self._layout_key: Any = None
        self._layout: list[tuple[Text, Text]] = []
        self._known_lines = 0

    # -- state --

    def show(self, document: Document | None, *, raw_mode: bool) -> None:
        self.document = document
        self.raw_mode = raw_mode
        self.preview = None
        self.hit_line = None
        self._known_lines = 0
        self.scroll_to(0, 0, animate=False)
        self.sync_size()
        self.refresh()

    def sync_size(self) -> None:
        """Grow the virtual size as the document grows (called by the screen's progress tick)."""
        count = self.document.line_count if self.document is not None else 0
        gutter = self._gutter_width()
        height = count + (max(0, self.size.height - 1) if self.wrap else 0)
        width = self.size.width if self.wrap else gutter + PIECE_BYTES + 16
        new = Size(width, height)
        if new != self.virtual_size:
            self.virtual_size = new
        if count != self._known_lines:
            self._known_lines = count
            self._layout_key = None
            self.refresh()

    def invalidate(self) -> None:
        self._layout_key = None
        self.sync_size()
        self.refresh()

    def _gutter_width(self) -> int:
        if self.document is None:
            return 0
        return max(4, len(str(self.document.index.logical_count + 1))) + 1

    # -- rendering --

    def _render_one(self, line: DisplayLine) -> Text:
        text = render_raw(line.data) if self.raw_mode else render(line.data, colour=self.colour)
        if line.cut:
            text.append("⏎" if False else "…", GUTTER_STYLE)  # the logical line goes on below
        if self.hit_line is not None and line.number == self.hit_line:
            text.stylize(HIT_LINE_STYLE)
            if self.hit_pattern is not None:
                text.highlight_regex(self.hit_pattern, HIT_STYLE)
        elif self.hit_pattern is not None:
            text.highlight_regex(self.hit_pattern, MATCH_STYLE)
        return text

    def _gutter(self, line: DisplayLine, width: int, first_row: bool) -> Text:
        if not first_row:
            label = ""
        elif line.number < 0:
            label = "…"
        elif line.continued:
            label = "↪"
        else:
            label = str(line.logical + 1)
        return Text(label.rjust(width - 1) + " ", style=GUTTER_STYLE)

    def _build_layout(self) -> list[tuple[Text, Text]]:
        height = self.size.height
        width = self.size.width
        top = int(self.scroll_offset.y)
        key = (top, width, height, self.wrap, self.colour, self.raw_mode, self.hit_line, self.hit_pattern,
               self._known_lines, id(self.document), id(self.preview))
        if key == self._layout_key:
            return self._layout
        rows: list[tuple[Text, Text]] = []
        gutter = self._gutter_width() if self.preview is None else 5
        if self.preview is not None:
            lines = self.preview[-height:]
        elif self.document is not None:
            lines = self.document.lines(top, height)
        else:
            lines = []
        text_width = max(1, width - gutter)
        for line in lines:
            text = self._render_one(line)
            if self.wrap:
                wrapped = text.wrap(self.app.console, text_width, overflow="fold", no_wrap=False)
                pieces = list(wrapped)[:MAX_WRAP_ROWS] or [Text("")]
                for i, piece in enumerate(pieces):
                    rows.append((self._gutter(line, gutter, i == 0), piece))
                    if len(rows) >= height:
                        break
            else:
                rows.append((self._gutter(line, gutter, True), text))
            if len(rows) >= height:
                break
        self._layout = rows
        self._layout_key = key
        return rows

    def render_line(self, y: int) -> Strip:
        rows = self._build_layout()
        width = self.size.width
        if y >= len(rows):
            return Strip.blank(width, self.rich_style)
        gutter, text = rows[y]
        console = self.app.console
        gutter_segments = list(gutter.render(console))
        body_segments = list(text.render(console))
        body = Strip(body_segments)
        if not self.wrap:
            scroll_x = int(self.scroll_offset.x)
            body = body.crop(scroll_x, scroll_x + max(0, width - gutter.cell_len))
        strip = Strip(gutter_segments + list(body))
        return strip.extend_cell_length(width, self.rich_style).crop(0, width).apply_style(self.rich_style)

    def watch_scroll_y(self, old: float, new: float) -> None:
        super().watch_scroll_y(old, new)
        self._layout_key = None

    # -- positions --

    @property
    def top_line(self) -> int:
        return int(self.scroll_offset.y)

    def go_to_line(self, number: int) -> None:
        """Scroll so that display line ``number`` is visible (a few lines below the top)."""
        self.preview = None
        target = max(0, number - max(0, self.size.height // 3))
        self.scroll_to(y=target, animate=False, force=True)
        self._layout_key = None
        self.refresh()

    def go_to_end(self) -> None:
        self.preview = None
        if self.document is None:
            return
        count = self.document.line_count
        height = max(1, self.size.height)
        if not self.wrap:
            self.scroll_to(y=max(0, count - height), animate=False, force=True)
        else:
            # Walk back from the last line until the wrapped rows fill the screen.
            rows = 0
            top = count
            width = max(1, self.size.width - self._gutter_width())
            while top > 0 and rows < height:
                top -= 1
                line = self.document.lines(top, 1)
                if not line:
                    break
                rows += min(MAX_WRAP_ROWS, len(self._render_one(line[0]).wrap(self.app.console, width, overflow="fold")))
            if rows > height:
                top += 1
            self.scroll_to(y=max(0, top), animate=False, force=True)
        self._layout_key = None
        self.refresh()

    def rendered_rows(self) -> list[str]:
        """The plain text of the rows on screen (for tests and for copying)."""
        return [g.plain + t.plain for g, t in self._build_layout()]


class LogViewerScreen(Screen):
    """One step result's log: header, parts, lines, search and progress."""

    CSS_PATH = "log_viewer.tcss"
    help_title = "Log viewer"

    BINDINGS = [
        Binding("g", "top", "Top", id="log.top"),
        Binding("G", "end", "End", id="log.end", key_display="G"),
        Binding("slash", "search", "Search", id="log.search", key_display="/"),
        Binding("n", "next_hit", "Next", id="log.next"),
        Binding("N", "previous_hit", "Prev", id="log.previous", key_display="N"),
        Binding("c", "toggle_colour", "Colour", id="log.colour"),
        Binding("w", "toggle_wrap", "Wrap", id="log.wrap"),
        Binding("right_square_bracket", "next_part", "Next part", id="log.next_part", key_display="]"),
        Binding("left_square_bracket", "previous_part", "Prev part", id="log.previous_part", key_display="["),
        Binding("escape", "close", "Back", id="log.close"),
        Binding("pageup", "page_up", "PgUp", show=False, id="log.page_up"),
        Binding("pagedown,space", "page_down", "PgDn", show=False, id="log.page_down"),
    ]

    def __init__(self, step_result_id: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_result_id = int(step_result_id)
        self.opened: OpenLog | None = None
        self.search_text = ""
        self._search_stop = threading.Event()
        self._part_names: list[str] = []
        self._user_chose_part = False
        self._pending_end = False
        self._timer = None
        self.error: str | None = None

    def compose(self):
        yield Static(Text(f"step result {self.step_result_id}: opening…"), id="log-header")
        yield Tabs(Tab(Text("summary"), id="part-summary"), Tab(Text("raw"), id="part-raw"), id="log-parts")
        yield LogLines(id="log-lines")
        with Horizontal(id="log-search-bar"):
            yield Input(placeholder="search (smart case: lower case ignores case); Enter finds forward",
                        id="log-search")
        yield Static(Text(""), id="log-status")
        # No Footer here: the app adds the status line and footer at the bottom of every screen.

    @property
    def lines_widget(self) -> LogLines:
        return self.query_one(LogLines)

    def on_mount(self) -> None:
        self.query_one("#log-search-bar").display = False
        self._part_names = ["summary", "raw"]
        self.lines_widget.focus()
        self.open_the_log()

    def on_unmount(self) -> None:
        self._search_stop.set()
        if self._timer is not None:
            self._timer.stop()
        if self.opened is not None:
            log, self.opened = self.opened, None
            # Closing joins the spool threads (a server-side cancel for a running COPY): off the UI.
            threading.Thread(target=log.close, name="atc-log-close", daemon=True).start()

    # -- opening --

    @work(thread=True, exclusive=True, group="log-open", exit_on_error=False)
    def open_the_log(self) -> None:
        try:
            log = open_log(self.app.browse_db, self.app.store, self.step_result_id)
        except AtcError as exc:
            self.app.call_from_thread(self._failed, exc.message)
            return
        except Exception as exc:  # never a dead "opening…" page: say what went wrong
            self.app.call_from_thread(self._failed, f"step result {self.step_result_id}: {type(exc).__name__}: {exc}")
            return
        log.wait_for_lines(1, timeout=1.0)
        self.app.call_from_thread(self._opened, log)

    def _failed(self, message: str) -> None:
        self.error = message
        self.notify(message, severity="error", markup=False)
        # Nothing to show: do not stay in the back stack as a dead page (Escape would land here).
        if self.is_current and len(self.app.screen_stack) > 1:
            self.app.pop_screen()
        elif self.is_mounted:
            self.query_one("#log-header", Static).update(Text(f"step result {self.step_result_id}: {one_line(message)}"))

    def _opened(self, log: OpenLog) -> None:
        if not self.is_mounted:
            log.close()
            return
        self.opened = log
        self.lines_widget.show(log.raw, raw_mode=True)
        self._select_tab("raw")
        self._tick()
        self._timer = self.set_interval(0.1, self._tick)

    # -- progress --

    def _tick(self) -> None:
        log = self.opened
        if log is None:
            return
        self._sync_parts()
        self.lines_widget.sync_size()
        self._update_header()
        self._update_status()
        if self._pending_end and log.complete:
            self._pending_end = False
            self.lines_widget.go_to_end()
        if log.complete and log.parts_complete and self._timer is not None:
            self._timer.stop()
            self._timer = None
            self._sync_parts()
            self._update_header()
            self._update_status()
            if log.error and log.error != "closed":
                self.notify(log.error, severity="error", markup=False)

    def _sync_parts(self) -> None:
        log = self.opened
        if log is None:
            return
        tabs = self.query_one(Tabs)
        for doc in log.parts()[len(self._part_names) - 2:]:
            index = len(self._part_names)
            self._part_names.append(doc.name)
            tabs.add_tab(Tab(Text(one_line(doc.name, 40)), id=f"part-{index}"))
            if doc.name == "stdout" and not self._user_chose_part:
                self._select_tab(doc.name)

    def _update_header(self) -> None:
        log = self.opened
        if log is None:
            return
        loc = log.location
        head = log.headline()
        where = "database (inline)" if loc.where == "db" else f"S3 s3://{loc.bucket}/{loc.key}" if loc.where == "s3" else "no log"
        size = log.known_size if log.known_size is not None else (log.raw.length if log.complete else None)
        bits = [f"step result {loc.step_result_id}", f"state {head['state']}", where,
                human_bytes(size) if size is not None else f"{human_bytes(log.raw.length)}+ (stored {human_bytes(loc.stored_size)})"]
        if head["exit_code"] is not None:
            bits.append(f"exit {head['exit_code']}")
        if head["points"] is not None:
            bits.append(f"points {head['points']}")
        if head["steps"]:
            bits.append(f"{head['steps']} steps")
        self.query_one("#log-header", Static).update(Text(one_line(" · ".join(str(b) for b in bits), 400)))

    def _update_status(self, message: str | None = None) -> None:
        log = self.opened
        widget = self.lines_widget
        parts = []
        if log is not None:
            progress = log.progress()
            if not progress.complete:
                fraction = progress.fraction
                pct = f" {fraction * 100:.0f}%" if fraction is not None else ""
                parts.append(f"loading {human_bytes(progress.bytes_read)}{pct}")
            elif progress.error and progress.error != "closed":
                parts.append(f"error: {progress.error}")
            doc = widget.document
            if doc is not None:
                total = doc.line_count
                if widget.preview is not None:
                    shown = "end preview"
                elif total == 0:
                    shown = "empty" if doc.complete else "no lines yet"
                else:
                    shown = f"line {widget.top_line + 1}/{total}"
                parts.append(f"{self._current_part()} · {shown}")
            parts.append("colour" if widget.colour else "plain")
            parts.append("wrap" if widget.wrap else "cut")
        if self.search_text:
            parts.append(f"/{one_line(self.search_text, 40)}")
        if message:
            parts.append(message)
        self.query_one("#log-status", Static).update(Text(" · ".join(parts)))

    # -- parts --

    def _current_part(self) -> str:
        active = self.query_one(Tabs).active
        if not active:
            return "raw"
        index = active.removeprefix("part-")
        if index in ("summary", "raw"):
            return index
        return self._part_names[int(index)]

    def _select_tab(self, name: str) -> None:
        if name in ("summary", "raw"):
            tab_id = f"part-{name}"
        else:
            tab_id = f"part-{self._part_names.index(name)}"
        self.query_one(Tabs).active = tab_id

    @on(Tabs.TabActivated, "#log-parts")
    def _tab_activated(self, event: Tabs.TabActivated) -> None:
        log = self.opened
        if log is None:
            return
        name = self._current_part()
        if name == "summary":
            self.lines_widget.show(log.summary(), raw_mode=False)
        elif name == "raw":
            self.lines_widget.show(log.raw, raw_mode=True)
        else:
            doc = log.part(name)
            self.lines_widget.show(doc, raw_mode=False)
        self._update_status()

    def select_part(self, name: str) -> None:
        """Show a part by name (summary, raw, stdout, steps[0].stdout...)."""
        self._user_chose_part = True
        self._select_tab(name)

    def action_next_part(self) -> None:
        self._user_chose_part = True
        self.query_one(Tabs).action_next_tab()

    def action_previous_part(self) -> None:
        self._user_chose_part = True
        self.query_one(Tabs).action_previous_tab()

    # -- moving --

    def action_top(self) -> None:
        self.lines_widget.preview = None
        self.lines_widget.go_to_line(0)
        self.lines_widget.scroll_home(animate=False)
        self._update_status()

    def action_end(self) -> None:
        log = self.opened
        widget = self.lines_widget
        if log is None or widget.document is None:
            return
        doc = widget.document
        if doc.complete:
            widget.go_to_end()
        elif doc is log.raw and log.can_preview_tail:
            self._pending_end = True
            self.fetch_tail(max(1, widget.size.height))
        else:
            self._pending_end = True
            self.notify("going to the end once the log is loaded", timeout=3)
        self._update_status()

    @work(thread=True, exclusive=True, group="log-tail", exit_on_error=False)
    def fetch_tail(self, count: int) -> None:
        log = self.opened
        if log is None:
            return
        try:
            lines = log.tail_preview(count)
        except AtcError as exc:
            self.app.call_from_thread(self.notify, exc.message, severity="error", markup=False)
            return
        self.app.call_from_thread(self._show_tail, lines)

    def _show_tail(self, lines: list[DisplayLine]) -> None:
        widget = self.lines_widget
        if self.opened is None or self.opened.complete:
            widget.go_to_end()
        else:
            widget.preview = lines
            widget.invalidate()
        self._update_status()

    def action_page_up(self) -> None:
        self.lines_widget.preview = None
        self.lines_widget.action_page_up()

    def action_page_down(self) -> None:
        self.lines_widget.preview = None
        self.lines_widget.action_page_down()

    def action_toggle_colour(self) -> None:
        widget = self.lines_widget
        widget.colour = not widget.colour
        widget.invalidate()
        self._update_status()

    def action_toggle_wrap(self) -> None:
        widget = self.lines_widget
        widget.wrap = not widget.wrap
        widget.scroll_to(x=0, animate=False)
        widget.invalidate()
        self._update_status()

    def action_close(self) -> None:
        bar = self.query_one("#log-search-bar")
        if bar.display:
            bar.display = False
            self.lines_widget.focus()
            return
        if len(self.app.screen_stack) > 1:
            self.app.pop_screen()

    # -- search --

    def action_search(self) -> None:
        bar = self.query_one("#log-search-bar")
        bar.display = True
        field = self.query_one("#log-search", Input)
        field.value = self.search_text
        field.focus()

    @on(Input.Submitted, "#log-search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        self.query_one("#log-search-bar").display = False
        self.lines_widget.focus()
        self.search_text = event.value
        if event.value:
            self.run_search(forward=True, from_top=True)

    def action_next_hit(self) -> None:
        if self.search_text:
            self.run_search(forward=True)

    def action_previous_hit(self) -> None:
        if self.search_text:
            self.run_search(forward=False)

    def run_search(self, *, forward: bool, from_top: bool = False) -> None:
        widget = self.lines_widget
        doc = widget.document
        if doc is None:
            return
        current = widget.hit_line if widget.hit_line is not None else widget.top_line
        if from_top:
            current = widget.top_line - 1
        self._search_stop.set()
        self._search_stop = threading.Event()
        self._update_status("searching…")
        self.search_worker(doc, self.search_text, current, forward, self._search_stop)

    @work(thread=True, exclusive=True, group="log-search", exit_on_error=False)
    def search_worker(self, doc: Document, query: str, current: int, forward: bool, stop: threading.Event) -> None:
        ignore_case = query == query.lower()  # smart case
        needle = query.encode("utf-8", "surrogatepass")
        if forward:
            start = doc.offset_of_line(current + 1) if current >= 0 else 0
            hit = doc.find(needle, start, ignore_case=ignore_case, stop=stop, wait=True)
        else:
            start = doc.offset_of_line(max(0, current))
            hit = doc.find(needle, start, backward=True, ignore_case=ignore_case, stop=stop)
        if stop.is_set():
            return
        line = doc.line_at_offset(hit) if hit is not None else None
        self.app.call_from_thread(self._search_done, doc, query, line, forward, ignore_case)

    def _search_done(self, doc: Document, query: str, line: int | None, forward: bool, ignore_case: bool) -> None:
        widget = self.lines_widget
        if widget.document is not doc:
            return
        if line is None:
            where = "below" if forward else "above"
            self._update_status(f"not found {where}")
            self.notify(f"{one_line(query, 60)!s}: not found {where}", markup=False, timeout=3)
            return
        widget.hit_line = line
        widget.hit_pattern = re.compile(re.escape(query), re.IGNORECASE if ignore_case else 0)
        widget.go_to_line(line)
        self._update_status(f"match on line {line + 1}")

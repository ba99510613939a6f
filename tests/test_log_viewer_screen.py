"""The log viewer screen, driven with the pilot against real PostgreSQL and S3."""

from __future__ import annotations

import json
import re
from pathlib import Path

import psycopg
import pytest
from textual.app import App

from console.db import Database
from console.storage import ObjectStore
from screens.log_viewer import LogLines, LogViewerScreen
from tests.log_support import LogFactory, json_log

REAL = Path(__file__).resolve().parent / "data" / "runner-outputs"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # \t and \n cannot appear in strips either
MARKUP = "[bold red]x[/] [link=https://evil.example]click[/link]"


class ViewerApp(App):
    """The two attributes the viewer needs from atc's app, nothing else."""

    def __init__(self, settings) -> None:
        super().__init__()
        self.browse_db = Database(settings)
        self.store = ObjectStore(settings)

    def on_unmount(self) -> None:
        self.browse_db.close()


def real_cases() -> list[str]:
    return sorted({p.stem for p in REAL.iterdir() if p.suffix in (".stdout", ".stderr")})


@pytest.fixture
def logs(empty_db):
    factory = LogFactory(empty_db)
    yield factory
    factory.close()


def store_log(logs: LogFactory, raw: bytes) -> int:
    """Inline if PostgreSQL's json accepts it (it refuses lone \\udcXX escapes), else moved to S3."""
    try:
        return logs.inline(raw)
    except psycopg.errors.DataError:
        return logs.moved(raw)


async def wait_loaded(pilot, screen: LogViewerScreen, timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.02)):
        await pilot.pause(0.02)
        if screen.error:
            raise AssertionError(screen.error)
        if screen.opened is not None and screen.opened.complete and screen.opened.parts_complete and screen._timer is None:
            await pilot.pause()
            return
    raise AssertionError("log did not load")


def strips_text(widget: LogLines) -> str:
    rows = []
    for y in range(widget.size.height):
        rows.append("".join(seg.text for seg in widget.render_line(y)))
    return "\n".join(rows)


def assert_inert(app: App, widget: LogLines, *, screenshot: bool = True) -> None:
    text = strips_text(widget)
    assert not CONTROL.search(text), repr(CONTROL.search(text))
    if screenshot:  # the whole screen as the terminal gets it (slower: once per log)
        svg = app.export_screenshot()
        assert "\x1b" not in svg and not CONTROL.search(svg.replace("\n", ""))


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def assert_document_inert(widget: LogLines, doc) -> None:
    """Every display line of ``doc``, rendered as the widget renders it, is free of controls."""
    console = widget.app.console
    for first in range(0, doc.line_count, 500):
        for line in doc.lines(first, 500):
            text = "".join(seg.text for seg in widget._render_one(line).render(console))
            assert not CONTROL.search(text), (doc.name, line.number, repr(CONTROL.search(text)))


async def show_part(pilot, screen: LogViewerScreen, part: str) -> None:
    """Select a part's tab and wait until the lines widget shows it (no idle waits: fast)."""
    screen.select_part(part)
    for _ in range(500):
        if screen._current_part() == part and screen.lines_widget.document is screen.opened.part(part):
            return
        await pilot.pause(0)
    raise AssertionError(f"part {part} not shown")


async def test_every_real_output_renders_inert(logs, empty_db):
    """Every real runner output, as stdout and stderr of an io step, through the viewer screen.

    The outputs go into two io-test logs (one step per output): inline in PostgreSQL, and moved
    to S3 for the outputs that are not UTF-8 (PostgreSQL's json refuses their lone \\udcXX
    escapes). Each part is shown through its tab; its visible rows are checked in colour and
    plain, cut and wrapped (the widget's strips, rendered synchronously: the Line API), the whole
    part's lines too, and the whole terminal output once per output. Two screens instead of one
    per output keep this pilot test at a few seconds.
    """
    cases = real_cases()
    assert len(cases) >= 20
    outputs = {}
    for name in cases:
        out = (REAL / f"{name}.stdout").read_bytes() if (REAL / f"{name}.stdout").exists() else b""
        err = (REAL / f"{name}.stderr").read_bytes() if (REAL / f"{name}.stderr").exists() else b""
        outputs[name] = (out, err)
    groups = {"db": [n for n in cases if all(map(is_utf8, outputs[n]))],
              "s3": [n for n in cases if not all(map(is_utf8, outputs[n]))]}
    assert groups["db"] and groups["s3"]

    def text(value: bytes) -> str:
        return value.decode("utf-8", "surrogateescape")

    app = ViewerApp(empty_db)
    async with app.run_test(size=(120, 40)) as pilot:
        for where, names in groups.items():
            steps = [{"name": name, "stdout": text(outputs[name][0] + MARKUP.encode()), "stderr": text(outputs[name][1]),
                      "state": "failed", "exit_code": 1, "achieved_points": 0} for name in names]
            raw = json.dumps({"steps": steps}).encode("ascii")
            sid = logs.inline(raw) if where == "db" else logs.moved(raw)
            screen = LogViewerScreen(sid)
            await app.push_screen(screen)
            await wait_loaded(pilot, screen)
            assert screen.opened.location.where == where
            widget = screen.lines_widget
            await show_part(pilot, screen, "raw")
            assert_document_inert(widget, screen.opened.raw)
            for i, name in enumerate(names):
                out, err = outputs[name]
                for stream in ("stdout", "stderr"):
                    part = f"steps[{i}].{stream}"
                    await show_part(pilot, screen, part)
                    # the decoded part: bytes that were not UTF-8 come back as surrogates (\\udcXX)
                    data = out + MARKUP.encode() if stream == "stdout" else err
                    expected = data.decode("utf-8", "surrogateescape").encode("utf-8", "surrogatepass")
                    doc = screen.opened.part(part)
                    assert doc.read(0, 1 << 22) == expected, (name, stream)
                    for colour in (True, False):
                        if widget.colour != colour:
                            screen.action_toggle_colour()
                        for wrap in (False, True):
                            if widget.wrap != wrap:
                                screen.action_toggle_wrap()
                            assert_inert(app, widget, screenshot=False)
                    if widget.wrap:
                        screen.action_toggle_wrap()
                    if not widget.colour:
                        screen.action_toggle_colour()
                    assert_document_inert(widget, doc)
                    if stream == "stdout":
                        await pilot.pause()
                        assert_inert(app, widget)  # the whole terminal output, once per output
                        if len(out) < 5000:
                            # markup-looking text is shown literally, after the program's own output
                            screen.action_end()  # what G does (the key itself: test_keys_top_end...)
                            assert MARKUP in strips_text(widget), name
            app.pop_screen()
            await pilot.pause()


async def test_colour_escapes_and_bad_bytes_are_shown(logs, empty_db):
    stdout = (b"\x1b[31mred\x1b[0m \x1b]0;title\x07 \x1b[2J \xff\xfe nul:\x00 cr:\r bell:\x07\n" + MARKUP.encode())
    sid = logs.moved(json_log(stdout=stdout, stderr="\ud800 lone"))
    app = ViewerApp(empty_db)
    async with app.run_test(size=(120, 30)) as pilot:
        screen = LogViewerScreen(sid)
        await app.push_screen(screen)
        await wait_loaded(pilot, screen)
        widget = screen.lines_widget
        screen.select_part("stdout")
        await pilot.pause()
        rows = widget.rendered_rows()
        first = rows[0]
        assert "red \\e]0;title\\a \\e[2J" in first
        # raw bytes became \udcXX escapes when the runner stored them as JSON text
        assert "\\udcff\\udcfe nul:\\0 cr:\\r bell:\\a" in first
        assert rows[1].endswith(MARKUP)
        assert any(s.style.color and s.style.color.name == "red"
                   for s in widget._build_layout()[0][1].spans if s.style)
        await pilot.press("c")
        assert not any(getattr(s.style, "color", None) for s in widget._build_layout()[0][1].spans)
        screen.select_part("stderr")
        await pilot.pause()
        assert widget.rendered_rows()[0].endswith("\\ud800 lone")
        assert_inert(app, widget)
        header = str(app.screen.query_one("#log-header").render())
        assert f"step result {sid}" in header and "S3" in header and "exit 1" in header


async def test_keys_top_end_search_next_previous(logs, empty_db):
    lines = [f"line {i:05d} {'match' if i in (150, 2600, 4100) else 'plain'}" for i in range(5000)]
    sid = logs.inline(json_log(stdout="\n".join(lines) + "\n"))
    app = ViewerApp(empty_db)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = LogViewerScreen(sid)
        await app.push_screen(screen)
        await wait_loaded(pilot, screen)
        widget = screen.lines_widget
        assert screen._current_part() == "stdout"  # chosen by default once found
        assert widget.rendered_rows()[0].strip().startswith("1 line 00000")
        await pilot.press("G")
        await pilot.pause()
        assert widget.rendered_rows()[-1].strip().endswith("line 04999 plain")
        await pilot.press("g")
        await pilot.pause()
        assert widget.top_line == 0
        await pilot.press("slash")
        await pilot.press(*"match")
        await pilot.press("enter")
        for _ in range(100):
            await pilot.pause(0.02)
            if widget.hit_line is not None:
                break
        assert widget.hit_line == 150
        assert any("line 00150 match" in r for r in widget.rendered_rows())
        await pilot.press("n")
        for _ in range(100):
            await pilot.pause(0.02)
            if widget.hit_line == 2600:
                break
        assert widget.hit_line == 2600
        await pilot.press("N")
        for _ in range(100):
            await pilot.pause(0.02)
            if widget.hit_line == 150:
                break
        assert widget.hit_line == 150
        await pilot.press("pagedown")
        await pilot.pause()
        assert widget.top_line > 0


async def test_one_megabyte_line_is_cut_and_wrapped_in_pieces(logs, empty_db):
    out = (REAL / "long_line_1mb.stdout").read_bytes()
    sid = logs.inline(json_log(stdout=out))
    app = ViewerApp(empty_db)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = LogViewerScreen(sid)
        await app.push_screen(screen)
        await wait_loaded(pilot, screen)
        widget = screen.lines_widget
        doc = screen.opened.part("stdout")
        assert doc.line_count >= len(out) // 2048
        rows = widget.rendered_rows()
        assert rows[1].lstrip().startswith("↪")
        await pilot.press("w")
        await pilot.pause()
        assert len(widget.rendered_rows()) == widget.size.height
        assert_inert(app, widget)


async def test_unknown_id_is_a_notification(empty_db):
    app = ViewerApp(empty_db)
    async with app.run_test(size=(100, 20)) as pilot:
        screen = LogViewerScreen(424242)
        await app.push_screen(screen)
        for _ in range(100):
            await pilot.pause(0.02)
            if screen.error:
                break
        assert "424242" in screen.error and "does not exist" in screen.error
        assert any(n.severity == "error" for n in app._notifications)


async def test_jk_space_and_every_visible_match_highlighted(logs, empty_db):
    from screens.log_viewer import HIT_STYLE, MATCH_STYLE

    lines = [f"line {i:04d} {'match' if i in (3, 5, 7) else 'plain'}" for i in range(300)]
    sid = logs.inline(json_log(stdout="\n".join(lines) + "\n"))
    app = ViewerApp(empty_db)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = LogViewerScreen(sid)
        await app.push_screen(screen)
        await wait_loaded(pilot, screen)
        widget = screen.lines_widget
        await pilot.press("j", "j")
        await pilot.pause()
        assert widget.top_line == 2
        await pilot.press("k")
        await pilot.pause()
        assert widget.top_line == 1
        await pilot.press("g", "slash", *"match", "enter")
        for _ in range(100):
            await pilot.pause(0.02)
            if widget.hit_line is not None:
                break
        assert widget.hit_line == 3
        styles = {}
        for gutter, text in widget._build_layout():
            styles[text.plain.split()[1]] = [span.style for span in text.spans]
        assert HIT_STYLE in styles["0003"]                      # the current match
        assert MATCH_STYLE in styles["0005"] and MATCH_STYLE in styles["0007"]  # and the others on screen
        assert MATCH_STYLE not in styles["0004"]
        top = widget.top_line
        await pilot.press("space")
        await pilot.pause()
        assert widget.top_line > top + 10  # a page, not a line


async def test_in_the_app_status_line_is_at_the_bottom_and_empty_part_says_so(empty_db):
    from browse_world import make_world
    from screens.app import AtcApp
    from screens.widgets import StatusLine

    make_world(empty_db.database.dsn)
    app = AtcApp(empty_db)
    async with app.run_test(size=(100, 30)) as pilot:
        app.open_screen("open_log", 1)  # the browse world's first step result: stderr is ""
        for _ in range(500):
            await pilot.pause(0.02)
            if isinstance(app.screen, LogViewerScreen) and app.screen.opened is not None and app.screen.query(StatusLine):
                break
        screen = app.screen
        await wait_loaded(pilot, screen)
        status = screen.query_one(StatusLine)
        assert status.region.y > screen.query_one("#log-status").region.y  # at the bottom, like everywhere
        assert status.region.y >= 30 - 2
        screen.select_part("stderr")
        await pilot.pause()
        text = screen.query_one("#log-status").render().plain
        assert "stderr · empty" in text and "1/0" not in text

"""The ANSI parser: colour only from SGR, every other control shown, never markup."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from console.ansi import decode_line, render, render_raw, spans

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def terminal_output(text) -> str:
    """What a real terminal would receive for this Text (colour on), minus our own SGR codes."""
    console = Console(force_terminal=True, color_system="truecolor", width=400, legacy_windows=False)
    with console.capture() as cap:
        console.print(text, end="")
    out = cap.get()
    return re.sub(r"\x1b\[[0-9;]*m", "", out)


def test_sgr_becomes_style_and_nothing_else_survives():
    text = render("\x1b[01;31merror:\x1b[m ok \x1b[38;5;208mo\x1b[38;2;1;2;3mr\x1b[0m")
    assert text.plain == "error: ok or"
    styles = {str(s.style) for s in text.spans}
    assert any("red" in s and "bold" in s for s in styles)
    assert any("color(208)" in s for s in styles)
    assert any("rgb(1,2,3)" in s.replace(" ", "") or "#010203" in s for s in styles)


def test_colour_off_drops_sgr_but_keeps_text():
    text = render("\x1b[32mgreen\x1b[0m", colour=False)
    assert text.plain == "green" and not text.spans


@pytest.mark.parametrize("raw, shown", [
    ("a\x1b[2Jb", "a\\e[2Jb"),                          # erase screen
    ("\x1b[10;20H", "\\e[10;20H"),                      # cursor move
    ("\x1b]0;pwned\x07rest", "\\e]0;pwned\\arest"),      # OSC title, BEL-terminated
    ("\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", "\\e]8;;http://x\\e\\link\\e]8;;\\e\\"),  # hyperlink
    ("\x1bP1$r\x1b\\", "\\eP1$r\\e\\"),                  # DCS
    ("\x9b31mX", "\\x9b31mX"),                          # 8-bit CSI is never colour
    ("\x9d0;t\x9c", "\\x9d0;t\\x9c"),                   # 8-bit OSC
    ("x\x1b", "x\\e"),                                  # lone ESC
    ("\x1bc", "\\ec"),                                  # reset terminal
    ("a\rb\x08c\x07d\x00e\x7f", "a\\rb\\bc\\ad\\0e\\x7f"),
    ("\x1b[?1049h", "\\e[?1049h"),                      # alternate screen
    ("\x1b[31;1", "\\e[31;1"),                          # unterminated CSI
    ("trojan\u202esource", "trojan\\u202esource"),     # bidi override
    ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
])
def test_every_other_sequence_is_a_visible_escape(raw, shown):
    for colour in (True, False):
        text = render(raw, colour=colour)
        assert text.plain == shown
        assert not CONTROL.search(text.plain)
        assert not CONTROL.search(terminal_output(text))


def test_markup_is_literal():
    text = render("[bold red]x[/] [link=http://evil]y[/link] :smile:")
    assert text.plain == "[bold red]x[/] [link=http://evil]y[/link] :smile:"
    assert not text.spans
    assert terminal_output(text) == "[bold red]x[/] [link=http://evil]y[/link] :smile:"


def test_tabs_expand_to_stops_across_styles():
    assert render("a\tb").plain == "a       b"
    assert render("\x1b[31mabc\x1b[0m\td").plain == "abc     d"
    assert "\t" not in render_raw("a\tb").plain


def test_invalid_utf8_nul_and_surrogates_never_crash():
    assert decode_line(b"ok \xff\xfe \xc3") == "ok \\xff\\xfe \\xc3"
    assert render(b"\x00\x01\x1b").plain == "\\0\\x01\\e"
    # a lone surrogate written with surrogatepass (how the viewer stores JSON "\\udc80")
    assert render(b"a\xed\xb2\x80b").plain == "a\\udc80b"
    assert render(b"\xf0\x9f\x98\x80 fine").plain == "\U0001F600 fine"


def test_conceal_and_blink_are_ignored():
    text = render("\x1b[8msecret\x1b[5mblink")
    assert text.plain == "secretblink"
    assert all(not s.style.conceal and not s.style.blink for s in text.spans if hasattr(s.style, "conceal"))


def test_spans_fuzz_no_control_escapes(tmp_path):
    import random

    rng = random.Random(7)
    alphabet = ["\x1b", "[", "]", "P", "\\", "\x07", "m", ";", "3", "1", "\x9b", "\x9c", "\r", "\x08", "a", "é", "\t", "\x00", "\ud800"]
    for _ in range(2000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for colour in (True, False):
            pieces = spans(line, colour=colour)
            for piece, _ in pieces:
                assert "\x1b" not in piece
            assert not CONTROL.search(render(line, colour=colour).plain)
            assert not CONTROL.search(render_raw(line).plain)

"""Untrusted terminal output turned into styled, inert text.

Program output (logs) is full of terminal control sequences. Handing them to the operator's
terminal would let a student's program move the cursor, clear the screen, set the window title,
plant hyperlinks or, on some terminals, answer back. This module parses one display line and
returns a ``rich.text.Text`` in which:

- SGR sequences (``ESC [ ... m``: colour, bold, underline, ...) become Rich styles when colour is
  on, and vanish when it is off (the plain reading view);
- EVERY other sequence — CSI cursor moves and erases, OSC titles and hyperlinks
  (``ESC ] ... BEL`` / ``ESC ] ... ESC \\``), DCS/SOS/PM/APC strings, two-byte ``ESC x``
  sequences, the 8-bit C1 forms (``\\x9b`` CSI, ``\\x9d`` OSC, ...), lone ESC, BEL, BS, CR and the
  other C0/C1 controls — is shown as a visible escape such as ``\\e[2J`` in a dim style;
- TAB is expanded to spaces (8-column stops);
- lone surrogates (from JSON ``\\ud800`` escapes) are shown as ``\\ud800``.

The ``Text`` is built from plain strings, never from markup, so ``[bold red]x[/]`` in a log is
just those characters. After rendering no code point 0x00-0x1f or 0x7f-0x9f remains.

Colour state does not carry from one display line to the next: each line starts unstyled. Lines
are rendered independently because the viewer reads windows of a log at random offsets; almost
every tool that colours output resets at the end of each line.

Bytes are decoded with :func:`decode_line`: invalid UTF-8 shows as ``\\xNN``, NUL as ``\\0``.
"""

from __future__ import annotations

import codecs
import re
from typing import Iterable

from rich.style import Style
from rich.text import Text

from .text import visible

# Style for the visible escapes, so they read as "something was here" and not as program output.
ESCAPE_STYLE = Style(dim=True, italic=True)

TAB_SIZE = 8


def _visible_decode_errors(exc: UnicodeError) -> tuple[str, int]:
    """Decode error handler: surrogates encoded as 3 bytes (CESU/'surrogatepass', as written for
    lone JSON surrogates) come back as the surrogate code point (shown later as ``\\udXXX``);
    any other invalid byte becomes the text ``\\xNN``."""
    if not isinstance(exc, UnicodeDecodeError):  # pragma: no cover - only used for decoding
        raise exc
    data = exc.object
    start = exc.start
    if data[start] == 0xED and start + 2 < len(data) and 0xA0 <= data[start + 1] <= 0xBF \
            and 0x80 <= data[start + 2] <= 0xBF:
        cp = ((data[start] & 0x0F) << 12) | ((data[start + 1] & 0x3F) << 6) | (data[start + 2] & 0x3F)
        return chr(cp), start + 3
    return f"\\x{data[start]:02x}", start + 1


codecs.register_error("atc-visible", _visible_decode_errors)


def decode_line(data: bytes | bytearray | memoryview) -> str:
    """Bytes of log output as text, never failing: invalid UTF-8 becomes ``\\xNN`` text."""
    return bytes(data).decode("utf-8", errors="atc-visible")


# One token: an escape/control sequence we recognise, or a single control character.
# Order matters: the longest forms first.
_SEQUENCE = re.compile(
    r"""
    (?P<csi>(?:\x1b\[|\x9b)(?P<params>[\x30-\x3f]*)(?P<inter>[\x20-\x2f]*)(?P<final>[\x40-\x7e])?)
  | (?P<string>(?:\x1b[\]P_^X]|[\x9d\x90\x9f\x9e\x98])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?)
  | (?P<esc2>\x1b[\x20-\x2f]*[\x30-\x7e])
  | (?P<ctrl>[\x00-\x08\x0a-\x1f\x7f-\x9f])
  | (?P<unicode>[\ud800-\udfff\u200e\u200f\u202a-\u202e\u2066-\u2069])
    """,
    re.VERBOSE,
)

# Bidirectional overrides/isolates could visually reorder the text around them ("trojan source");
# they are shown as escapes like lone surrogates.
_UNICODE_ESCAPES = re.compile(r"[\ud800-\udfff\u200e\u200f\u202a-\u202e\u2066-\u2069]")

_BASIC = ["black", "red", "green", "yellow", "blue", "magenta", "cyan", "white"]
_BRIGHT = ["bright_black", "bright_red", "bright_green", "bright_yellow", "bright_blue",
           "bright_magenta", "bright_cyan", "bright_white"]


def _extended_colour(codes: list[list[int]], i: int) -> tuple[str | None, int]:
    """Parse ``38;5;n`` / ``38;2;r;g;b`` (or the colon forms) starting at codes[i]; returns
    (colour or None, index of the next code)."""
    head = codes[i]
    if len(head) > 1:  # colon form: 38:5:n or 38:2:[cs]:r:g:b
        sub = head[1:]
        if sub[:1] == [5] and len(sub) >= 2:
            return (f"color({sub[1]})" if 0 <= sub[1] <= 255 else None), i + 1
        if sub[:1] == [2] and len(sub) >= 4:
            rgb = sub[-3:]
            if all(0 <= v <= 255 for v in rgb):
                return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})", i + 1
        return None, i + 1
    if i + 1 < len(codes) and codes[i + 1][:1] == [5] and i + 2 < len(codes):
        n = codes[i + 2][0]
        return (f"color({n})" if 0 <= n <= 255 else None), i + 3
    if i + 1 < len(codes) and codes[i + 1][:1] == [2] and i + 4 < len(codes):
        rgb = [codes[i + 2][0], codes[i + 3][0], codes[i + 4][0]]
        if all(0 <= v <= 255 for v in rgb):
            return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})", i + 5
        return None, i + 5
    return None, len(codes)  # malformed: ignore the rest of this sequence


class SgrState:
    """The current graphic rendition, updated by SGR parameter lists."""

    __slots__ = ("bold", "dim", "italic", "underline", "reverse", "strike", "overline", "fg", "bg")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bold = self.dim = self.italic = self.underline = False
        self.reverse = self.strike = self.overline = False
        self.fg: str | None = None
        self.bg: str | None = None

    def apply(self, params: str) -> None:
        # "" means 0 (reset); each ";" field may carry ":"-separated sub-parameters.
        try:
            codes = [[int(x) if x else 0 for x in field.split(":")] for field in (params or "0").split(";")]
        except ValueError:
            return
        i = 0
        while i < len(codes):
            code = codes[i][0]
            if code == 0:
                self.reset()
            elif code == 1:
                self.bold = True
            elif code == 2:
                self.dim = True
            elif code == 3:
                self.italic = True
            elif code == 4:
                # 4:0 means "underline off" in the colon form.
                self.underline = not (len(codes[i]) > 1 and codes[i][1] == 0)
            elif code == 7:
                self.reverse = True
            elif code == 9:
                self.strike = True
            elif code == 21:
                self.underline = True  # doubly underlined on most terminals
            elif code == 22:
                self.bold = self.dim = False
            elif code == 23:
                self.italic = False
            elif code == 24:
                self.underline = False
            elif code == 27:
                self.reverse = False
            elif code == 29:
                self.strike = False
            elif code == 53:
                self.overline = True
            elif code == 55:
                self.overline = False
            elif 30 <= code <= 37:
                self.fg = _BASIC[code - 30]
            elif 40 <= code <= 47:
                self.bg = _BASIC[code - 40]
            elif 90 <= code <= 97:
                self.fg = _BRIGHT[code - 90]
            elif 100 <= code <= 107:
                self.bg = _BRIGHT[code - 100]
            elif code == 39:
                self.fg = None
            elif code == 49:
                self.bg = None
            elif code in (38, 48):
                colour, i = _extended_colour(codes, i)
                if colour is not None:
                    if code == 38:
                        self.fg = colour
                    else:
                        self.bg = colour
                continue
            # Deliberately ignored: 5/6 blink (noise), 8 conceal (a log must not hide its text),
            # fonts (10-20), and anything unknown.
            i += 1

    def style(self) -> Style | None:
        if not (self.bold or self.dim or self.italic or self.underline or self.reverse or self.strike
                or self.overline or self.fg or self.bg):
            return None
        return Style(
            bold=self.bold or None, dim=self.dim or None, italic=self.italic or None,
            underline=self.underline or None, reverse=self.reverse or None, strike=self.strike or None,
            overline=self.overline or None, color=self.fg, bgcolor=self.bg,
        )


def _escape_text(seq: str) -> str:
    """A whole control sequence as visible text (``\\e[2J``, ``\\x9b``...)."""
    out = _UNICODE_ESCAPES.sub(lambda m: f"\\u{ord(m.group(0)):04x}", visible(seq))
    # visible() leaves TAB alone; inside an escape we want it visible too.
    return out.replace("\t", "\\t")


def spans(line: str, *, colour: bool = True) -> list[tuple[str, Style | None]]:
    """(text, style) pieces of one display line (no newline inside): the text pieces hold no
    control characters; escapes come out as visible text with ``ESCAPE_STYLE``."""
    out: list[tuple[str, Style | None]] = []
    sgr = SgrState()
    current = None
    pos = 0
    for m in _SEQUENCE.finditer(line):
        if m.start() > pos:
            out.append((line[pos:m.start()], current))
        pos = m.end()
        kind = m.lastgroup
        # Only the 7-bit form is colour: an 8-bit CSI (U+009B) in UTF-8 text is always suspect.
        if kind == "csi" and line[m.start()] == "\x1b" and m.group("final") == "m" and not m.group("inter") \
                and re.fullmatch(r"[0-9;:]*", m.group("params") or ""):
            if colour:
                sgr.apply(m.group("params"))
                current = sgr.style()
            continue  # colour off: SGR is dropped, the text reads plain
        out.append((_escape_text(m.group(0)), ESCAPE_STYLE))
    if pos < len(line):
        out.append((line[pos:], current))
    return out


def expand_tabs(pieces: Iterable[tuple[str, Style | None]], tab_size: int = TAB_SIZE) -> list[tuple[str, Style | None]]:
    """Replace TAB with spaces to the next tab stop, counting columns across pieces."""
    result: list[tuple[str, Style | None]] = []
    column = 0
    for text, style in pieces:
        if "\t" in text:
            parts = text.split("\t")
            buf = []
            for index, part in enumerate(parts):
                buf.append(part)
                column += len(part)
                if index < len(parts) - 1:
                    pad = tab_size - (column % tab_size)
                    buf.append(" " * pad)
                    column += pad
            text = "".join(buf)
        else:
            column += len(text)
        result.append((text, style))
    return result


def render(line: str | bytes, *, colour: bool = True) -> Text:
    """One display line of untrusted output as an inert ``Text`` (no markup, no controls)."""
    if not isinstance(line, str):
        line = decode_line(line)
    text = Text(no_wrap=True, end="")
    for piece, style in expand_tabs(spans(line, colour=colour)):
        if piece:
            text.append(piece, style)
    return text


def render_raw(line: str | bytes) -> Text:
    """The raw view of a line: every control character and sequence escaped, no colour."""
    if not isinstance(line, str):
        line = decode_line(line)
    return Text(_escape_text(line), no_wrap=True, end="")


def strip_controls_check(text: str) -> bool:
    """True if ``text`` contains no C0 (except none) or C1 control character (used by tests)."""
    return not re.search(r"[\x00-\x1f\x7f-\x9f]", text)

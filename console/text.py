"""Untrusted text made safe to show.

Anything from the database (names, query text, log bodies) may hold terminal control sequences,
invalid UTF-8, NUL bytes or Rich/Textual markup. These helpers return plain strings in which every
control character is replaced by a visible escape, so the terminal never receives a byte it would
act on. Markup is neutralised by never rendering these strings as markup (callers wrap them in
``rich.text.Text``, not ``Text.from_markup``); see also ``console.ansi`` for colour.
"""

from __future__ import annotations

import re

# C0 controls except TAB, DEL, and C1 controls (0x80-0x9f, which some terminals honour as CSI etc.)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_CONTROL_KEEP_NEWLINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

_NAMED = {"\x1b": "\\e", "\r": "\\r", "\n": "\\n", "\x00": "\\0", "\x08": "\\b", "\x07": "\\a"}


def _escape(match: re.Match[str]) -> str:
    ch = match.group(0)
    return _NAMED.get(ch) or f"\\x{ord(ch):02x}"


def visible(value: object, *, keep_newlines: bool = False) -> str:
    """A string with every control character shown as an escape (\\e, \\r, \\x07, ...)."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).decode("utf-8", errors="backslashreplace")
    else:
        text = str(value)
    pattern = _CONTROL_KEEP_NEWLINES if keep_newlines else _CONTROL
    text = pattern.sub(_escape, text)
    # Lone surrogates (from JSON "\ud800") cannot be encoded to the terminal; show them.
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        text = "".join(f"\\u{ord(ch):04x}" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
    return text


def one_line(value: object, limit: int = 200) -> str:
    """A single visible line, truncated with an ellipsis (for query text and names in tables)."""
    text = " ".join(visible(value, keep_newlines=True).split())
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_FACTORS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """'10MB', '512k', '1.5GiB', '2048' -> bytes (binary units). Raises ValueError naming the input."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size (use e.g. 512k, 10MB, 1GiB)")
    unit = (m.group(2) or "").lower()[:1]
    return int(float(m.group(1)) * _FACTORS[unit])


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"

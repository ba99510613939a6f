"""What a grader reads from a step log, without its output bodies.

Step logs are JSON whose shape depends on the step type (docs/schema.md):

- run_program / custom_output / junit_test:
  ``{"stdout": str, "stderr": str, "exit_code": int, "time_spend": float, "points": float?}``
- io_test: ``{"steps": [{"name", "input", "expected", "stdout", "stderr", "exit_code", "state",
  "achieved_points"}, ...]}``
- check_points: ``{"points": float, ...}``

``summarize_log`` turns a log into a small dict: its kind, exit code, points, per-step states and
points for io tests, and the byte length of every output part, but none of the output text. The
migration stores it next to a moved log's pointer (``atc.moved_log.summary``) so points stay
readable without fetching the object.

A log given as bytes is scanned as a stream (``summarize_log_stream``): output strings are
measured, never kept, so a 500 MB log is summarised in bounded memory. Pure: no I/O, no Textual.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Iterator

# String values under these keys are program output: only their length is kept.
OUTPUT_KEYS = frozenset({"stdout", "stderr", "input", "expected", "output", "diff", "message", "log"})
# Other strings longer than this are treated as output too (and never kept whole).
MAX_KEPT_STRING = 200
# At most this many io steps are listed one by one; the counts by state cover all of them.
MAX_LISTED_STEPS = 500
# Nesting deeper than this is not a log atc knows; refuse instead of recursing without bound.
MAX_DEPTH = 64


class LongString:
    """Stand-in for a string that was measured but not kept: its UTF-8 length in bytes."""

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"LongString({self.nbytes})"


def utf8_length(text: str) -> int:
    """Byte length as stored; lone surrogates (legal in a JSON log) count as 3 bytes."""
    return len(text.encode("utf-8", "surrogatepass"))


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def summarize_log(log: bytes | bytearray | memoryview | str | dict | list | None) -> dict[str, Any]:
    """Summary of one log (bytes/str: its JSON text; dict/list: an already parsed log)."""
    if log is None:
        return {"kind": "none"}
    if isinstance(log, (bytes, bytearray, memoryview)):
        return summarize_log_stream([bytes(log)])
    if isinstance(log, str):
        return summarize_log_stream([log.encode("utf-8", "surrogatepass")])
    return _summary_from_skeleton(_skeleton(log, 0), total_bytes=None)


def summarize_log_stream(chunks: Iterable[bytes]) -> dict[str, Any]:
    """Summary of a log given as its JSON bytes in chunks, in bounded memory."""
    reader = _Reader(chunks)
    try:
        value = _parse_value(reader, 0)
        reader.skip_space()
        if not reader.at_end():
            raise ValueError("extra data after the JSON value")
    except ValueError as exc:
        return {"kind": "invalid", "error": str(exc)[:200], "bytes": reader.consumed_total()}
    return _summary_from_skeleton(value, total_bytes=reader.consumed_total())


# ------------------------------------------------------------------------------------------------
# Building the summary from a skeleton (a parsed log whose output strings are LongStrings)
# ------------------------------------------------------------------------------------------------


def _skeleton(value: Any, depth: int, key: str | None = None) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError("log nested too deeply")
    if isinstance(value, str):
        n = utf8_length(value)
        if (key in OUTPUT_KEYS) or n > MAX_KEPT_STRING:
            return LongString(n)
        return value
    if isinstance(value, dict):
        return {str(k): _skeleton(v, depth + 1, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_skeleton(v, depth + 1) for v in value]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalar_fields(obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """Split an object's members into kept scalars and measured output parts."""
    fields: dict[str, Any] = {}
    parts: dict[str, int] = {}
    for key, value in obj.items():
        if isinstance(value, LongString):
            parts[key] = value.nbytes
        elif isinstance(value, str):
            if key in OUTPUT_KEYS:
                parts[key] = utf8_length(value)
            else:
                fields[key] = value
        elif value is None or isinstance(value, (bool, int, float)):
            fields[key] = value
    return fields, parts


def _summary_from_skeleton(value: Any, total_bytes: int | None) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if total_bytes is not None:
        summary["bytes"] = total_bytes
    if not isinstance(value, dict):
        summary["kind"] = "other"
        summary["json_type"] = type(value).__name__ if not isinstance(value, LongString) else "str"
        return summary
    fields, parts = _scalar_fields(value)
    steps = value.get("steps")
    if isinstance(steps, list):
        summary["kind"] = "io"
        listed: list[dict[str, Any]] = []
        states: dict[str, int] = {}
        achieved = 0.0
        output_bytes = 0
        for step in steps:
            if not isinstance(step, dict):
                continue
            step_fields, step_parts = _scalar_fields(step)
            state = step_fields.get("state")
            state_key = state if isinstance(state, str) else "unknown"
            states[state_key] = states.get(state_key, 0) + 1
            points = step_fields.get("achieved_points")
            if _is_number(points):
                achieved += float(points)
            output_bytes += sum(step_parts.values())
            if len(listed) < MAX_LISTED_STEPS:
                entry = {k: step_fields.get(k) for k in ("name", "state", "exit_code", "achieved_points")}
                entry["parts"] = step_parts
                listed.append(entry)
        summary["steps"] = listed
        summary["step_count"] = sum(states.values())
        summary["step_states"] = states
        summary["achieved_points"] = achieved
        summary["output_bytes"] = output_bytes + sum(parts.values())
    elif "stdout" in value or "stderr" in value:
        summary["kind"] = "output"
        summary["output_bytes"] = sum(parts.values())
    elif "points" in value:
        summary["kind"] = "points"
    else:
        summary["kind"] = "other"
    for key in ("exit_code", "time_spend", "points"):
        if key in fields:
            summary[key] = fields.pop(key)
    summary["parts"] = parts
    if fields:
        summary["fields"] = fields
    return summary


# ------------------------------------------------------------------------------------------------
# Streaming JSON scanner: structure and short strings are parsed, long strings only measured.
# ------------------------------------------------------------------------------------------------

_SPECIAL = re.compile(rb'["\\]')
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = re.compile(rb"[-+.eE0-9]*")
_SPACE = b" \t\r\n"
_SIMPLE_ESCAPES = frozenset(b'"\\/bfnrt')


class _Reader:
    """A byte buffer fed from an iterator of chunks; consumed bytes are dropped as it goes."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self.buf = b""
        self.pos = 0
        self._dropped = 0
        self._eof = False

    def fill(self) -> bool:
        """Append the next chunk (dropping what was consumed); False at end of input."""
        while not self._eof:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._eof = True
                return False
            if chunk:
                self._dropped += self.pos
                self.buf = self.buf[self.pos:] + bytes(chunk)
                self.pos = 0
                return True
        return False

    def ensure(self, n: int) -> bool:
        while len(self.buf) - self.pos < n:
            if not self.fill():
                return False
        return True

    def skip_space(self) -> None:
        while True:
            buf, pos = self.buf, self.pos
            while pos < len(buf) and buf[pos] in _SPACE:
                pos += 1
            self.pos = pos
            if pos < len(buf) or not self.fill():
                return

    def peek(self) -> int | None:
        self.skip_space()
        if self.pos >= len(self.buf):
            return None
        return self.buf[self.pos]

    def at_end(self) -> bool:
        return self.pos >= len(self.buf) and not self.fill()

    def consumed_total(self) -> int:
        # Everything read so far (used after a full parse, when all input has been consumed).
        while self.fill():
            pass
        return self._dropped + len(self.buf)


def _expect(reader: _Reader, literal: bytes) -> None:
    if not reader.ensure(len(literal)) or reader.buf[reader.pos:reader.pos + len(literal)] != literal:
        raise ValueError(f"invalid JSON near byte {reader._dropped + reader.pos}")
    reader.pos += len(literal)


def _parse_value(reader: _Reader, depth: int, key: str | None = None) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError("log nested too deeply")
    ch = reader.peek()
    if ch is None:
        raise ValueError("unexpected end of log")
    if ch == 0x22:  # "
        reader.pos += 1
        return _parse_string(reader, keep=key not in OUTPUT_KEYS)
    if ch == 0x7B:  # {
        reader.pos += 1
        obj: dict[str, Any] = {}
        if reader.peek() == 0x7D:
            reader.pos += 1
            return obj
        while True:
            if reader.peek() != 0x22:
                raise ValueError(f"expected an object key near byte {reader._dropped + reader.pos}")
            reader.pos += 1
            name = _parse_string(reader, keep=True)
            name = name if isinstance(name, str) else "(long key)"
            if reader.peek() != 0x3A:
                raise ValueError("expected ':' in an object")
            reader.pos += 1
            obj[name] = _parse_value(reader, depth + 1, name)
            ch = reader.peek()
            reader.pos += 1
            if ch == 0x2C:
                continue
            if ch == 0x7D:
                return obj
            raise ValueError("expected ',' or '}' in an object")
    if ch == 0x5B:  # [
        reader.pos += 1
        items: list[Any] = []
        if reader.peek() == 0x5D:
            reader.pos += 1
            return items
        while True:
            items.append(_parse_value(reader, depth + 1))
            ch = reader.peek()
            reader.pos += 1
            if ch == 0x2C:
                continue
            if ch == 0x5D:
                return items
            raise ValueError("expected ',' or ']' in an array")
    if ch == 0x74:
        _expect(reader, b"true")
        return True
    if ch == 0x66:
        _expect(reader, b"false")
        return False
    if ch == 0x6E:
        _expect(reader, b"null")
        return None
    # A number: buffer up to the first byte that cannot belong to it (numbers are short).
    while True:
        end = _NUMBER_CHARS.match(reader.buf, reader.pos).end()
        if end < len(reader.buf) or not reader.fill():
            break
        if len(reader.buf) - reader.pos > 400:
            raise ValueError("number too long in log")
    m = _NUMBER.match(reader.buf, reader.pos)
    if not m or m.end() == reader.pos:
        raise ValueError(f"invalid JSON value near byte {reader._dropped + reader.pos}")
    token = m.group(0)
    reader.pos = m.end()
    return float(token) if any(c in token for c in b".eE") else int(token)


def _parse_string(reader: _Reader, keep: bool) -> str | LongString:
    """Parse a string body after its opening quote. Kept (decoded) only while short."""
    nbytes = 0
    raw = bytearray() if keep else None
    pending_high = False  # the previous escape was a high surrogate (a following low one adds 1 byte)
    # The next quote, as an absolute stream offset (reused across escapes while still ahead, so
    # an output full of escapes is not rescanned up to its quote after each one); -1 = none up
    # to quote_scanned (absolute end of the buffer that was searched).
    quote_at, quote_scanned = -1, -1
    while True:
        buf, pos = reader.buf, reader.pos
        # memchr for the quote, then for a backslash before it: far faster than a regex search
        # over a multi-megabyte output string.
        base = reader._dropped
        if quote_at >= base + pos:
            quote = quote_at - base
        elif quote_at < 0 and quote_scanned == base + len(buf):
            quote = -1
        else:
            quote = buf.find(b'"', pos)
            quote_at, quote_scanned = (base + quote if quote >= 0 else -1), base + len(buf)
        escape = buf.find(b"\\", pos, quote if quote >= 0 else len(buf))
        special = escape if escape >= 0 else quote
        end = special if special >= 0 else len(buf)
        if end > pos:
            nbytes += end - pos
            pending_high = False
            if raw is not None:
                raw += buf[pos:end]
                if len(raw) > MAX_KEPT_STRING * 4 + 16:
                    raw = None
        reader.pos = end
        if special < 0:
            if not reader.fill():
                raise ValueError("unterminated string in log")
            continue
        if buf[end] == 0x22:  # closing quote
            reader.pos = end + 1
            if raw is not None:
                text = json.loads(b'"' + bytes(raw) + b'"')
                if utf8_length(text) <= MAX_KEPT_STRING:
                    return text
            return LongString(nbytes)
        # An escape: make sure it is complete in the buffer.
        if not reader.ensure(2):
            raise ValueError("unterminated escape in log")
        buf, pos = reader.buf, reader.pos
        kind = buf[pos + 1]
        if kind == 0x75:  # \uXXXX
            if not reader.ensure(6):
                raise ValueError("unterminated \\u escape in log")
            buf, pos = reader.buf, reader.pos
            try:
                cp = int(buf[pos + 2:pos + 6], 16)
            except ValueError:
                raise ValueError("invalid \\u escape in log") from None
            if 0xDC00 <= cp <= 0xDFFF and pending_high:
                nbytes += 1  # completes a pair: 3 (high) + 1 = 4 bytes for the code point
                pending_high = False
            else:
                nbytes += 1 if cp < 0x80 else 2 if cp < 0x800 else 3
                pending_high = 0xD800 <= cp <= 0xDBFF
            width = 6
        elif kind in _SIMPLE_ESCAPES:
            nbytes += 1
            pending_high = False
            width = 2
        else:
            raise ValueError("invalid escape in log")
        if raw is not None:
            raw += buf[pos:pos + width]
        reader.pos = pos + width

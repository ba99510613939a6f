"""An open log: spooled in the background, indexed sparsely, read by windows of lines.

Independent of Textual; the log viewer screen and tests drive it. See docs/log-viewer.md.

How it works:

- ``OpenLog.start()`` starts a thread that streams the log's exact bytes (``console.logstore``:
  COPY BINARY from PostgreSQL or a GET from S3) into an unlinked temporary file (the *spool*).
  Readers ``pread`` the spool below the bytes already written, so the first lines show as soon
  as the first chunk arrives, whatever the log's size.
- A :class:`LineIndex` is fed the same bytes. It keeps a *checkpoint* every ``CHECKPOINT_BYTES``
  (256 KiB): the offset of a display-line start with its display and logical line numbers. A
  window of lines is read by jumping to the nearest checkpoint and scanning at most 256 KiB.
  Memory: ~24 bytes per 256 KiB of log (a 500 MB log: 2000 checkpoints), whatever the line count.
- A *display line* is a logical line (up to ``\\n``) cut every ``PIECE_BYTES`` (2 KiB): a 1 MB
  line without a newline is 512 display lines, so nothing ever renders a whole 1 MB line.
- A second thread follows the spool with :class:`JsonPartScanner`, an incremental JSON scanner
  that finds the log's parts (``stdout``, ``stderr``, ``steps[3].stdout``...) and decodes each
  string value chunk-wise into a second spool; each part is a :class:`Document` over a byte range
  of it with its own index. Small scalars (exit code, points, state, names) are kept as fields.
- Searching scans the document in 1 MiB blocks (overlapping by the needle's length), forward or
  backward, never loading it whole; case-insensitive search folds ASCII letters.
- An inline (PostgreSQL) log starts with its *head*: the first ``HEAD_BYTES`` read from the
  value's first TOAST chunks (``logstore.read_db_log_head``, milliseconds, where the server would
  take seconds to de-TOAST the whole value before the first COPY row). The COPY stream then
  continues the same spool: its first bytes are checked against the head, byte for byte.
- The end can be shown before spooling finishes (:meth:`OpenLog.tail_preview`): for a moved (S3)
  log with a ranged GET, for an uncompressed inline log from its last TOAST chunks. A compressed
  inline value cannot be read from its end: ``G`` waits for the spool.
- ``close()`` stops the stream (a server-side cancel for PostgreSQL) and closes the spools, which
  were unlinked on creation, so nothing stays on disk even after a crash.
"""

from __future__ import annotations

import bisect
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from .errors import AtcError
from .logstore import LogLocation, locate, read_db_log_head, read_db_log_tail, store_for, stream_db_log
from .text import one_line

PIECE_BYTES = 2048
CHECKPOINT_BYTES = 256 * 1024
SEARCH_BLOCK = 1 << 20
SOURCE_CHUNK = 1 << 20
TAIL_BYTES = 128 * 1024
# The head of an inline log read from its TOAST chunks: many screens of raw lines and of the
# decoded stdout part; decoding 512 KiB of pglz here costs ~10-100 ms.
HEAD_BYTES = 512 * 1024
# Output strings under these keys (and any string longer than MAX_KEPT_STRING) become parts.
from .logformat import MAX_KEPT_STRING, OUTPUT_KEYS  # noqa: E402

MAX_PARTS = 2000
MAX_FIELDS = 5000
MAX_DEPTH = 64
# COPY of a huge log may legitimately run longer than the browse statement_timeout; it takes only
# an ACCESS SHARE lock on auto_test_step_result, so a longer limit cannot block anyone.
STREAM_STATEMENT_TIMEOUT = "15min"


# ------------------------------------------------------------------------------------------------
# Spools: append-only byte stores that readers can read while a writer appends
# ------------------------------------------------------------------------------------------------


class Spool:
    """An unlinked temporary file, appended by one thread, read (pread) by any."""

    def __init__(self, directory: str | None = None) -> None:
        self._file = tempfile.TemporaryFile(prefix="atc-log-", dir=directory)
        self._fd = self._file.fileno()
        self.size = 0
        self.complete = False
        self.error: str | None = None
        self.changed = threading.Condition()

    def append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        with self.changed:
            self.size += len(data)
            self.changed.notify_all()

    def finish(self, error: str | None = None) -> None:
        with self.changed:
            self.complete = True
            self.error = error
            self.changed.notify_all()

    def pread(self, offset: int, length: int) -> bytes:
        if self._fd < 0:
            raise AtcError("the log was closed")
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        return os.pread(self._fd, end - offset, offset)

    def wait_for(self, size: int, timeout: float) -> bool:
        """Wait until at least ``size`` bytes exist or the spool is complete."""
        with self.changed:
            if self.size >= size or self.complete:
                return True
            self.changed.wait(timeout)
            return self.size >= size or self.complete

    def close(self) -> None:
        if self._fd >= 0:
            self._fd = -1
            self._file.close()


class BytesSpool(Spool):
    """A small in-memory spool (for generated text such as a log's summary)."""

    def __init__(self, data: bytes) -> None:  # noqa: D107 - no file
        self._data = bytes(data)
        self._fd = 0
        self.size = len(self._data)
        self.complete = True
        self.error = None
        self.changed = threading.Condition()

    def pread(self, offset: int, length: int) -> bytes:
        return self._data[offset: offset + length]

    def close(self) -> None:
        self._data = b""


# ------------------------------------------------------------------------------------------------
# The sparse line index
# ------------------------------------------------------------------------------------------------


def _display_count(length: int) -> int:
    """Display lines taken by a logical line of ``length`` bytes (without its newline)."""
    return 1 if length == 0 else (length + PIECE_BYTES - 1) // PIECE_BYTES


class LineIndex:
    """Counts display lines of a growing byte stream and keeps a checkpoint every 256 KiB.

    A checkpoint is (offset, display line number, logical line number, continued): the start of a
    display line; ``continued`` says it starts inside a logical line (after a cut).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.offsets: list[int] = [0]
        self.numbers: list[int] = [0]
        self.logical: list[int] = [0]
        self.continued: list[bool] = [False]
        self.fed = 0
        self._lines_before = 0     # display lines before the current logical line
        self._logical_before = 0   # logical lines before the current one
        self._carry = 0            # bytes of the current logical line so far
        self._line_start = 0       # offset of the current logical line
        self._next_checkpoint = CHECKPOINT_BYTES

    def feed(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            take = min(len(data) - pos, self._next_checkpoint - self.fed)
            self._feed_slice(data[pos: pos + take])
            pos += take
            if self.fed >= self._next_checkpoint:
                self._checkpoint()
                self._next_checkpoint += CHECKPOINT_BYTES

    def _checkpoint(self) -> None:
        j = (self._carry - 1) // PIECE_BYTES if self._carry > 0 else 0
        offset = self._line_start + j * PIECE_BYTES
        with self._lock:
            if offset > self.offsets[-1]:
                self.offsets.append(offset)
                self.numbers.append(self._lines_before + j)
                self.logical.append(self._logical_before)
                self.continued.append(j > 0)

    def _feed_slice(self, data: bytes) -> None:
        parts = data.split(b"\n")
        newlines = len(parts) - 1
        with self._lock:
            if newlines == 0:
                self._carry += len(data)
            else:
                lines = _display_count(self._carry + len(parts[0]))
                middle = parts[1:-1]
                if middle:
                    if max(map(len, middle)) <= PIECE_BYTES:
                        lines += len(middle)
                    else:
                        lines += sum(_display_count(len(p)) for p in middle)
                self._lines_before += lines
                self._logical_before += newlines
                self._carry = len(parts[-1])
                self._line_start = self.fed + len(data) - self._carry
            self.fed += len(data)

    @property
    def line_count(self) -> int:
        """Display lines so far (the last one may still grow while spooling)."""
        with self._lock:
            tail = (self._carry + PIECE_BYTES - 1) // PIECE_BYTES
            return self._lines_before + tail

    @property
    def logical_count(self) -> int:
        with self._lock:
            return self._logical_before + (1 if self._carry else 0)

    def checkpoint_for_line(self, number: int) -> tuple[int, int, int, bool]:
        with self._lock:
            i = max(0, bisect.bisect_right(self.numbers, number) - 1)
            return self.offsets[i], self.numbers[i], self.logical[i], self.continued[i]

    def checkpoint_for_offset(self, offset: int) -> tuple[int, int, int, bool]:
        with self._lock:
            i = max(0, bisect.bisect_right(self.offsets, offset) - 1)
            return self.offsets[i], self.numbers[i], self.logical[i], self.continued[i]

    def memory_estimate(self) -> int:
        return len(self.offsets) * 4 * 8


@dataclass(frozen=True)
class DisplayLine:
    number: int          # display line number, 0-based
    logical: int         # logical (newline-separated) line number, 0-based
    offset: int          # byte offset in the document
    data: bytes          # the bytes shown (newline excluded; cut pieces fixed up to whole chars)
    continued: bool      # starts inside a logical line (a cut)
    cut: bool            # the logical line goes on in the next display line


def _char_start(window: bytes, index: int) -> int:
    """The start of the UTF-8 character containing ``window[index]`` (moves back at most 3)."""
    back = 0
    while back < 3 and index - back > 0 and 0x80 <= window[index - back] <= 0xBF:
        back += 1
    if back and window[index - back] >= 0xC0:
        return index - back
    return index


# ------------------------------------------------------------------------------------------------
# Documents: a byte range of a spool with its own index
# ------------------------------------------------------------------------------------------------


class Document:
    """Bytes [base, base+length) of a spool, growing until ``complete``, read by display lines."""

    def __init__(self, spool: Spool, name: str, base: int = 0) -> None:
        self.spool = spool
        self.name = name
        self.base = base
        self.length = 0
        self.complete = False
        self.index = LineIndex()

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> "Document":
        doc = cls(BytesSpool(data), name)
        doc.grow(len(data))
        doc.finish()
        return doc

    # -- writer side --

    def grow(self, n: int, data: bytes | None = None) -> None:
        """The writer appended ``n`` bytes (``data``) of this document to the spool."""
        if data is None:
            data = self.spool.pread(self.base + self.length, n)
        # Length first: readers trust the index only below ``length``.
        self.length += n
        self.index.feed(data)

    def finish(self) -> None:
        self.complete = True

    # -- reader side --

    @property
    def line_count(self) -> int:
        return self.index.line_count

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.length)
        if end <= offset:
            return b""
        return self.spool.pread(self.base + offset, end - offset)

    def lines(self, first: int, count: int) -> list[DisplayLine]:
        """Up to ``count`` display lines starting at display line ``first``."""
        if count <= 0 or first < 0:
            return []
        offset, number, logical, continued = self.index.checkpoint_for_line(first)
        out: list[DisplayLine] = []
        for line in self._scan(offset, number, logical, continued):
            if line.number >= first:
                out.append(line)
                if len(out) >= count:
                    break
        return out

    def _scan(self, offset: int, number: int, logical: int, continued: bool) -> Iterator[DisplayLine]:
        """Display lines from a display-line start, with the index's cutting rule."""
        limit = self.length
        # A few bytes before the start, so a cut piece can begin at its character's first byte.
        buf_at = max(0, offset - 4)
        buf = self.read(buf_at, offset - buf_at)
        pos = offset
        while pos < limit:
            # Keep at least one piece (+ newline + 3 bytes for the UTF-8 fix-up) in the buffer.
            rel = pos - buf_at
            if len(buf) - rel < PIECE_BYTES + 4 and buf_at + len(buf) < limit:
                keep_from = max(buf_at, pos - 4)
                buf = buf[keep_from - buf_at:] + self.read(buf_at + len(buf), 64 * 1024)
                buf_at = keep_from
                rel = pos - buf_at
            nl = buf.find(b"\n", rel, rel + PIECE_BYTES + 1)
            if nl >= 0:
                start = _char_start(buf, rel) if continued else rel
                end = nl
                yield DisplayLine(number, logical, pos, bytes(buf[start:end]), continued, False)
                pos = buf_at + nl + 1
                number += 1
                logical += 1
                continued = False
                continue
            available = len(buf) - rel
            if available > PIECE_BYTES:
                cut_rel = rel + PIECE_BYTES
                shown_end = _char_start(buf, cut_rel)
                start = _char_start(buf, rel) if continued else rel
                yield DisplayLine(number, logical, pos, bytes(buf[start:shown_end]), continued, True)
                pos += PIECE_BYTES
                number += 1
                continued = True
                continue
            # The rest, shorter than a piece and without a newline: the last (maybe growing) line.
            start = _char_start(buf, rel) if continued else rel
            yield DisplayLine(number, logical, pos, bytes(buf[start:]), continued, False)
            return

    def line_at_offset(self, offset: int) -> int:
        """The display line that holds byte ``offset``."""
        cp = self.index.checkpoint_for_offset(offset)
        last = cp[1]
        for line in self._scan(*cp):
            if line.offset > offset:
                break
            last = line.number
        return last

    def offset_of_line(self, number: int) -> int:
        lines = self.lines(number, 1)
        return lines[0].offset if lines else self.length

    def find(self, needle: bytes, start: int, *, backward: bool = False, ignore_case: bool = False,
             stop: threading.Event | None = None, wait: bool = False) -> int | None:
        """Offset of the first match at/after ``start`` (or the last one before it, backward).

        Scans 1 MiB blocks overlapping by ``len(needle) - 1``. With ``wait``, a forward search
        waits for a document that is still spooling until it completes or ``stop`` is set.
        """
        if not needle:
            return None
        if ignore_case:
            needle = needle.lower()
        overlap = len(needle) - 1
        if backward:
            end = min(start, self.length)
            while end > 0:
                if stop is not None and stop.is_set():
                    return None
                begin = max(0, end - SEARCH_BLOCK)
                block = self.read(begin, end - begin + (overlap if end < self.length else 0))
                block = block[: end - begin + overlap]
                if ignore_case:
                    block = block.lower()
                hit = block.rfind(needle)
                while hit >= 0 and begin + hit >= end:
                    hit = block.rfind(needle, 0, hit + len(needle) - 1)
                if hit >= 0:
                    return begin + hit
                end = begin
            return None
        pos = max(0, start)
        while True:
            if stop is not None and stop.is_set():
                return None
            available = self.length
            if pos + len(needle) <= available:
                block = self.read(pos, min(SEARCH_BLOCK, available - pos))
                if ignore_case:
                    block = block.lower()
                hit = block.find(needle)
                if hit >= 0:
                    return pos + hit
                pos = max(pos, pos + len(block) - overlap)
                if pos + len(needle) <= self.length:
                    continue
            if self.complete or not wait:
                return None
            self.spool.wait_for(self.base + self.length + 1, 0.2)


# ------------------------------------------------------------------------------------------------
# JSON parts
# ------------------------------------------------------------------------------------------------


@dataclass
class _Container:
    kind: str                 # "obj" | "arr"
    path: str
    key: str | None = None    # obj: the key whose value comes next
    index: int = 0            # arr: index of the next value
    expect: str = "first"     # obj: first|key|colon|value|comma ; arr: first|value|comma


_JSON_DECODER = json.JSONDecoder(strict=False)
_HEX = b"0123456789abcdefABCDEF"
_SCALAR_CHARS = frozenset(b"0123456789+-.eEtrufalsn")
_WS = b" \t\r\n"


def _decode_json_string_content(content: bytes) -> bytes:
    """Decode the content of a JSON string (complete escapes only) to UTF-8 bytes; lone
    surrogates are kept in their 3-byte 'surrogatepass' form (shown as ``\\udXXX``)."""
    if b"\\" not in content:
        return content
    text = content.decode("utf-8", "surrogateescape")
    try:
        value = _JSON_DECODER.decode('"' + text + '"')
    except ValueError:
        return content  # malformed escape: keep the raw bytes rather than lose them
    return value.encode("utf-8", "surrogatepass")


def _safe_cut(buf: bytes | bytearray, start: int, end: int) -> int:
    """The largest cut <= end in a string's content that does not split an escape sequence or a
    high-surrogate escape from its low half."""
    while True:
        cut = _safe_cut_once(buf, start, end)
        if cut == end:
            return cut
        end = cut


def _safe_cut_once(buf: bytes | bytearray, start: int, end: int) -> int:
    # Never split a raw UTF-8 character (the decoder would see half of it).
    for back in range(1, 4):
        i = end - back
        if i < start:
            break
        byte = buf[i]
        if byte < 0x80:
            break
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            if back < need:
                return i
            break
    # A trailing run of backslashes of odd length means the last one starts an escape.
    run = 0
    while end - run - 1 >= start and buf[end - run - 1] == 0x5C:
        run += 1
    if run % 2 == 1:
        return end - 1
    # An escape \uXXXX near the end: incomplete, or a high surrogate waiting for its low half.
    look = max(start, end - 11)
    i = end - 1
    while i >= look:
        if buf[i] == 0x75 and i - 1 >= start and buf[i - 1] == 0x5C:  # "\u"
            bs = 0
            while i - 2 - bs >= start and buf[i - 2 - bs] == 0x5C:
                bs += 1
            if bs % 2 == 0:  # a real escape start
                digits = bytes(buf[i + 1: min(end, i + 5)])
                if len(digits) < 4 or digits[:1].lower() == b"d" and digits[1:2].lower() in (b"8", b"9", b"a", b"b"):
                    return i - 1
                break
        i -= 1
    return end


class JsonPartScanner:
    """Incremental JSON scanner: output strings go to part documents, scalars to ``fields``.

    It never holds more than one chunk plus a few bytes, and never builds the JSON value.
    """

    def __init__(self, spool: Spool, on_part: Callable[[Document], None] | None = None) -> None:
        self.spool = spool
        self.on_part = on_part
        self.parts: list[Document] = []
        self.fields: dict[str, Any] = {}
        self.dropped_fields = 0
        self.dropped_parts = 0
        self.error: str | None = None
        self.done = False
        self.consumed = 0
        self._buf = bytearray()
        self._pos = 0
        self._stack: list[_Container] = []
        self._top_done = False
        # string state
        self._in_string: str | None = None  # "key" | "small" | "part" | "skip"
        self._small = bytearray()
        self._part: Document | None = None
        self._string_path = ""

    # -- path helpers --

    def _value_path(self) -> str:
        if not self._stack:
            return "value"
        top = self._stack[-1]
        if top.kind == "obj":
            key = top.key or ""
            return f"{top.path}.{key}" if top.path else key
        return f"{top.path}[{top.index}]"

    def _value_key(self) -> str | None:
        if self._stack and self._stack[-1].kind == "obj":
            return self._stack[-1].key
        return None

    def _value_done(self) -> None:
        if not self._stack:
            self._top_done = True
            return
        top = self._stack[-1]
        top.expect = "comma"
        if top.kind == "arr":
            top.index += 1

    def _set_field(self, path: str, value: Any) -> None:
        if len(self.fields) < MAX_FIELDS:
            self.fields[path] = value
        else:
            self.dropped_fields += 1

    # -- feeding --

    def feed(self, data: bytes) -> None:
        if self.error or self.done:
            return
        self._buf += data
        try:
            self._run(final=False)
        except ValueError as exc:
            self._fail(str(exc))
        self._compact()

    def finish(self) -> None:
        if not (self.error or self.done):
            try:
                self._run(final=True)
                if self._in_string or self._stack or not self._top_done:
                    raise ValueError("the JSON ends early")
            except ValueError as exc:
                self._fail(str(exc))
        if self._part is not None and not self._part.complete:
            self._part.finish()
        self.done = True

    def _fail(self, message: str) -> None:
        self.error = f"not a JSON log at byte {self.consumed + self._pos}: {message}"
        if self._part is not None:
            self._part.finish()

    def _compact(self) -> None:
        if self._pos:
            self.consumed += self._pos
            del self._buf[: self._pos]
            self._pos = 0

    def _run(self, final: bool) -> None:
        buf = self._buf
        while True:
            if self._in_string is not None:
                if not self._string_step(final):
                    return
                continue
            # skip whitespace
            n = len(buf)
            pos = self._pos
            while pos < n and buf[pos] in _WS:
                pos += 1
            self._pos = pos
            if pos >= n:
                return
            ch = buf[pos]
            if self._top_done:
                raise ValueError("extra data after the JSON value")
            top = self._stack[-1] if self._stack else None
            if top is not None and top.expect == "comma":
                if ch == 0x2C:  # ,
                    top.expect = "key" if top.kind == "obj" else "value"
                    self._pos += 1
                    continue
                if (ch == 0x7D and top.kind == "obj") or (ch == 0x5D and top.kind == "arr"):
                    self._stack.pop()
                    self._pos += 1
                    self._value_done()
                    continue
                raise ValueError(f"expected ',' or a closing bracket, found {chr(ch)!r}")
            if top is not None and top.kind == "obj" and top.expect in ("first", "key"):
                if ch == 0x7D and top.expect == "first":
                    self._stack.pop()
                    self._pos += 1
                    self._value_done()
                    continue
                if ch != 0x22:
                    raise ValueError("expected a key")
                self._pos += 1
                self._start_string("key")
                continue
            if top is not None and top.kind == "obj" and top.expect == "colon":
                if ch != 0x3A:
                    raise ValueError("expected ':'")
                self._pos += 1
                top.expect = "value"
                continue
            # a value
            if top is not None and top.kind == "arr" and top.expect == "first" and ch == 0x5D:
                self._stack.pop()
                self._pos += 1
                self._value_done()
                continue
            if ch == 0x7B or ch == 0x5B:  # { [
                if len(self._stack) >= MAX_DEPTH:
                    raise ValueError("nested too deeply")
                self._stack.append(_Container("obj" if ch == 0x7B else "arr", self._value_path() if self._stack else ""))
                self._pos += 1
                continue
            if ch == 0x22:
                self._pos += 1
                key = self._value_key()
                path = self._value_path()
                self._string_path = path
                if key in OUTPUT_KEYS or (not self._stack):
                    self._open_part(path)
                else:
                    self._start_string("small")
                continue
            if ch in _SCALAR_CHARS:
                end = pos
                while end < n and buf[end] in _SCALAR_CHARS:
                    end += 1
                if end >= n and not final:
                    return  # the token may go on in the next chunk
                token = bytes(buf[pos:end])
                try:
                    value = json.loads(token)
                except ValueError:
                    raise ValueError(f"bad literal {token[:20]!r}") from None
                self._set_field(self._value_path(), value)
                self._pos = end
                self._value_done()
                continue
            raise ValueError(f"unexpected {chr(ch)!r}")

    def _start_string(self, kind: str) -> None:
        self._in_string = kind
        self._small.clear()

    def _open_part(self, path: str) -> None:
        if len(self.parts) >= MAX_PARTS:
            self.dropped_parts += 1
            self._in_string = "skip"
            return
        doc = Document(self.spool, path, base=self.spool.size)
        self._part = doc
        self._in_string = "part"
        self.parts.append(doc)
        if self.on_part:
            self.on_part(doc)

    def _emit_part(self, raw: bytes) -> None:
        decoded = _decode_json_string_content(raw)
        if decoded and self._part is not None:
            self.spool.append(decoded)
            self._part.grow(len(decoded), decoded)

    def _string_step(self, final: bool) -> bool:
        """Consume string content; True when the string ended (continue parsing)."""
        buf = self._buf
        start = self._pos
        search = start
        while True:
            q = buf.find(b'"', search)
            if q < 0:
                break
            run = 0
            while q - run - 1 >= start and buf[q - run - 1] == 0x5C:
                run += 1
            if run % 2 == 0:
                break
            search = q + 1
        if q >= 0:
            self._take_content(bytes(buf[start:q]), ended=True)
            self._pos = q + 1
            return True
        cut = _safe_cut(buf, start, len(buf))
        if cut > start:
            self._take_content(bytes(buf[start:cut]), ended=False)
            self._pos = cut
        if final:
            raise ValueError("unterminated string")
        return False

    def _take_content(self, raw: bytes, *, ended: bool) -> None:
        kind = self._in_string
        if kind == "part":
            self._emit_part(raw)
        elif kind in ("small", "key"):
            self._small += raw
            if kind == "small" and len(self._small) > MAX_KEPT_STRING:
                kept = bytes(self._small)
                self._small.clear()
                self._open_part(self._string_path)
                if self._in_string == "part":
                    self._emit_part(kept)
                kind = self._in_string
            elif kind == "key" and len(self._small) > 1024:
                del self._small[1024:]
        if not ended:
            return
        self._in_string = None
        if kind == "part":
            assert self._part is not None
            self._part.finish()
            self._part = None
            self._value_done()
        elif kind == "skip":
            self._value_done()
        elif kind == "key":
            key = _decode_json_string_content(bytes(self._small)).decode("utf-8", "replace")
            top = self._stack[-1]
            top.key = one_line(key, 80)
            top.expect = "colon"
        else:
            value = _decode_json_string_content(bytes(self._small)).decode("utf-8", "surrogatepass")
            self._set_field(self._string_path, value)
            self._value_done()


# ------------------------------------------------------------------------------------------------
# The open log
# ------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    bytes_read: int
    total: int | None          # exact size when known (S3; or when complete)
    complete: bool
    lines: int
    parts_complete: bool
    error: str | None
    elapsed: float

    @property
    def fraction(self) -> float | None:
        if self.complete:
            return 1.0
        if self.total:
            return min(1.0, self.bytes_read / self.total)
        return None


class OpenLog:
    """One log opened for viewing. Use :func:`open_log`; always ``close()`` (or ``with``)."""

    def __init__(self, location: LogLocation, source: Callable[["OpenLog"], Iterable[bytes]],
                 *, tail_reader: Callable[[int, int], bytes] | None = None,
                 spool_dir: str | None = None, parse_parts: bool = True) -> None:
        self.location = location
        self._source = source
        self._tail_reader = tail_reader
        self.spool = Spool(spool_dir)
        self.raw = Document(self.spool, "raw")
        self.parts_spool = Spool(spool_dir) if parse_parts else None
        self.scanner = JsonPartScanner(self.parts_spool) if self.parts_spool is not None else None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = time.monotonic()
        self._finished_at: float | None = None
        self.cancel_stream: Callable[[], None] | None = None
        self.error: str | None = None
        # The log's exact size once known: at once for S3 (the pointer), from the head for an
        # inline log read through its TOAST chunks, else when the spool completes.
        self.known_size: int | None = location.object_size if location.where == "s3" else None
        # Bytes at the start of the spool that came from the head read (checked against the stream).
        self.head_size = 0

    # -- life cycle --

    def start(self) -> "OpenLog":
        t = threading.Thread(target=self._spool_thread, name=f"atc-spool-{self.location.step_result_id}", daemon=True)
        self._threads.append(t)
        t.start()
        if self.scanner is not None:
            p = threading.Thread(target=self._parts_thread, name=f"atc-parts-{self.location.step_result_id}", daemon=True)
            self._threads.append(p)
            p.start()
        return self

    def _spool_thread(self) -> None:
        error = None
        chunks = None
        try:
            chunks = iter(self._source(self))
            for chunk in chunks:
                if self._stop.is_set():
                    break
                self.spool.append(chunk)
                self.raw.grow(len(chunk), chunk)
        except AtcError as exc:
            error = exc.message
        except Exception as exc:  # a stream error must reach the operator as one line
            error = f"reading the log failed: {type(exc).__name__}: {one_line(exc, 200)}"
        finally:
            if chunks is not None and hasattr(chunks, "close"):
                try:
                    chunks.close()
                except Exception:
                    pass
        if self._stop.is_set():
            error = error or "closed"
        self.error = error
        self.raw.finish()
        self._finished_at = time.monotonic()
        self.spool.finish(error)

    def _parts_thread(self) -> None:
        assert self.scanner is not None and self.parts_spool is not None
        offset = 0
        try:
            while not self._stop.is_set():
                if offset < self.spool.size:
                    data = self.spool.pread(offset, min(SOURCE_CHUNK, self.spool.size - offset))
                    offset += len(data)
                    self.scanner.feed(data)
                    if self.scanner.error:
                        break
                    continue
                if self.spool.complete:
                    break
                self.spool.wait_for(offset + 1, 0.2)
            if self.spool.complete and not self.spool.error and not self._stop.is_set():
                self.scanner.finish()
            else:
                self.scanner.done = True
                for part in self.scanner.parts:
                    part.finish()
        except Exception as exc:
            self.scanner.error = f"scanning the log's parts failed: {type(exc).__name__}: {one_line(exc, 200)}"
            self.scanner.done = True
        finally:
            self.parts_spool.finish(self.scanner.error)

    def close(self) -> None:
        """Stop reading and drop the spools (already unlinked: closing frees the disk space)."""
        self._stop.set()
        if self.cancel_stream is not None:
            try:
                self.cancel_stream()
            except Exception:
                pass
        for t in self._threads:
            t.join(timeout=5)
        self.spool.close()
        if self.parts_spool is not None:
            self.parts_spool.close()

    def __enter__(self) -> "OpenLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- state --

    @property
    def complete(self) -> bool:
        return self.raw.complete

    @property
    def parts_complete(self) -> bool:
        return self.scanner is None or self.scanner.done

    def progress(self) -> Progress:
        total = self.known_size
        if self.raw.complete and not self.error:
            total = self.raw.length
        end = self._finished_at or time.monotonic()
        return Progress(bytes_read=self.raw.length, total=total, complete=self.raw.complete,
                        lines=self.raw.line_count, parts_complete=self.parts_complete,
                        error=self.error or (self.scanner.error if self.scanner else None),
                        elapsed=end - self._started)

    def wait(self, timeout: float = 60.0, *, parts: bool = False) -> bool:
        """Block until the log is spooled (and its parts scanned); for tests and the CLI."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.raw.complete and (not parts or self.parts_complete):
                return True
            self.spool.wait_for(self.spool.size + 1, 0.05)
        return False

    def wait_for_lines(self, count: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.raw.line_count >= count or self.raw.complete:
                return True
            self.spool.wait_for(self.spool.size + 1, 0.02)
        return False

    # -- parts --

    def parts(self) -> list[Document]:
        return list(self.scanner.parts) if self.scanner else []

    def part(self, name: str) -> Document | None:
        if name == "raw":
            return self.raw
        for doc in self.parts():
            if doc.name == name:
                return doc
        return None

    @property
    def fields(self) -> dict[str, Any]:
        return dict(self.scanner.fields) if self.scanner else {}

    def summary_text(self) -> str:
        """The log's scalars (exit code, points, state, per-step names...) as lines of text."""
        lines = [f"step result {self.location.step_result_id}  state {self.location.state}  "
                 f"log in {self.location.where}" + (f" ({self.location.key})" if self.location.key else "")]
        fields = self.fields
        if self.scanner is not None and self.scanner.error:
            lines.append(f"(not shown by parts: {self.scanner.error})")
        for key, value in fields.items():
            lines.append(f"{key}: {json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value}")
        for doc in self.parts():
            state = "" if doc.complete else " (still reading)"
            lines.append(f"{doc.name}: {doc.length} bytes, {doc.line_count} lines{state}")
        if self.scanner is not None and self.scanner.dropped_parts:
            lines.append(f"({self.scanner.dropped_parts} more output strings not listed)")
        return "\n".join(lines) + "\n"

    def summary(self) -> Document:
        return Document.from_bytes("summary", self.summary_text().encode("utf-8", "surrogatepass"))

    def headline(self) -> dict[str, Any]:
        """Exit code, points and state for the header (from the log's fields, else its summary)."""
        fields = self.fields
        summary = self.location.summary or {}
        steps = [k for k in fields if k.startswith("steps[")]
        points = fields.get("points", fields.get("achieved_points", summary.get("points")))
        if points is None and steps:
            step_points = [v for k, v in fields.items() if k.startswith("steps[") and k.endswith(".achieved_points")
                           and isinstance(v, (int, float))]
            points = sum(step_points) if step_points else None
        return {
            "exit_code": fields.get("exit_code", summary.get("exit_code")),
            "points": points,
            "state": fields.get("state", self.location.state),
            "steps": len({k.split("]")[0] for k in steps}) or None,
        }

    # -- the end of a log before it is spooled --

    @property
    def can_preview_tail(self) -> bool:
        return self._tail_reader is not None and bool(self.known_size)

    def tail_preview(self, count: int) -> list[DisplayLine]:
        """The last ``count`` display lines via a ranged read (line numbers unknown: -1).

        Used while the spool is still filling (S3 logs; uncompressed inline logs); once
        complete, use the index."""
        if self._tail_reader is None or not self.known_size:
            return []
        size = int(self.known_size)
        start = max(0, size - TAIL_BYTES)
        data = self._tail_reader(start, size - 1)
        if start > 0:
            nl = data.find(b"\n")
            data = data[nl + 1:] if nl >= 0 else data[-PIECE_BYTES:]
            start = size - len(data)
        doc = Document.from_bytes("tail", data)
        total = doc.line_count
        lines = doc.lines(max(0, total - count), count)
        return [DisplayLine(-1, -1, start + ln.offset, ln.data, ln.continued, ln.cut) for ln in lines]


def open_log(db: Any, store: Any, step_result_id: int, *, spool_dir: str | None = None,
             parse_parts: bool = True) -> OpenLog:
    """Locate a log and start spooling it (returns at once; the first lines follow quickly)."""
    location = locate(db, step_result_id)
    return open_location(db, store, location, spool_dir=spool_dir, parse_parts=parse_parts)


def open_location(db: Any, store: Any, location: LogLocation, *, spool_dir: str | None = None,
                  parse_parts: bool = True) -> OpenLog:
    tail_reader = None
    if location.where == "s3":
        bucket_store = store_for(store, location)

        def tail_reader(start: int, end: int) -> bytes:
            return bucket_store.read_range(location.key, start, end)

    log = OpenLog(location, lambda log: _source(db, store, location, log), tail_reader=tail_reader,
                  spool_dir=spool_dir, parse_parts=parse_parts)
    return log.start()


def _source(db: Any, store: Any, location: LogLocation, log: OpenLog) -> Iterator[bytes]:
    """The log's bytes; registers a cancel hook so close() stops a running COPY server-side."""
    if location.where == "s3":
        yield from store_for(store, location).iter_chunks(location.key, SOURCE_CHUNK)
        return
    if location.where == "none":
        return
    import psycopg

    from .db import translate_error

    try:
        with db.connection() as conn:
            log.cancel_stream = lambda: conn.cancel_safe(timeout=3)
            try:
                head = read_db_log_head(conn, location.step_result_id, HEAD_BYTES)
                if head is not None:
                    log.known_size = head.total_size
                    log.head_size = len(head.data)
                    if not head.layout.compressed:
                        log._tail_reader = _db_tail_reader(db, head.layout)
                    yield head.data
                    if head.complete or log._stop.is_set():
                        return
                stream = stream_db_log(conn, location.step_result_id, statement_timeout=STREAM_STATEMENT_TIMEOUT)
                yield from after_head(head.data if head is not None else b"", stream)
            finally:
                log.cancel_stream = None
    except psycopg.Error as exc:
        if log._stop.is_set():
            return
        raise translate_error(exc, f"reading the log of step result {location.step_result_id}") from None


def after_head(head: bytes, stream: Iterable[bytes]) -> Iterator[bytes]:
    """The stream's bytes after ``head``, checking that the stream starts with exactly ``head``.

    The head and the stream are two statements: a log rewritten in between (moved to S3, or
    changed by the application) would otherwise splice two different values in the spool."""
    pending = memoryview(head)
    for piece in stream:
        if pending:
            n = min(len(pending), len(piece))
            if bytes(piece[:n]) != bytes(pending[:n]):
                raise AtcError("the log changed while it was being read (its start no longer matches); reopen it")
            pending = pending[n:]
            piece = piece[n:]
            if not piece:
                continue
        yield piece
    if pending:
        raise AtcError("the log changed while it was being read (it is now shorter than its start); reopen it")


def _db_tail_reader(db: Any, layout: Any) -> Callable[[int, int], bytes]:
    """Ranged reads of an uncompressed inline value from its TOAST chunks (another connection:
    the spool's connection is busy with the COPY)."""
    import psycopg

    from .db import translate_error

    def read(start: int, end: int) -> bytes:
        try:
            with db.connection() as conn:
                return read_db_log_tail(conn, layout, start, end)
        except psycopg.Error as exc:
            raise translate_error(exc, f"reading the end of the log of step result {layout.step_result_id}") from None

    return read

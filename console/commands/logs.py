"""`atc log STEP_RESULT_ID`: a log's exact bytes on stdout, wherever it lives.

- no option: the stored bytes, byte for byte (the JSON text of an inline log, or the S3 object),
  streamed in chunks to ``sys.stdout.buffer`` (bounded memory whatever the size);
- ``--part stdout|stderr|steps[0].stdout|...``: one decoded output string of a JSON log, streamed
  through the same incremental scanner the viewer uses (``console.logview``);
- ``--json``: where the log is and what it is (where, bucket/key, size, sha256) instead of bytes.
  For an inline log the size and sha256 are computed by streaming it; for a moved log they come
  from its pointer (``atc.moved_log``), without fetching the object.

Unknown id: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from typing import Any, BinaryIO

from ..cli import Context, add_json_flag, emit
from ..errors import AtcError, NotFound


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("log", help="write a step's log (exact bytes) to stdout; --json: where it lives")
    p.add_argument("step_result_id", type=int, metavar="STEP_RESULT_ID")
    p.add_argument("--part", metavar="NAME",
                   help="only one output string of a JSON log, decoded: stdout, stderr, steps[0].stdout, ...")
    add_json_flag(p)
    p.set_defaults(handler=cmd_log)


def log_metadata(ctx: Context, step_result_id: int) -> dict[str, Any]:
    """Location and identity of a log; streams an inline log once to size and hash it."""
    from ..logstore import locate, sha256_of, stream_log

    loc = locate(ctx.browse_db, step_result_id)
    data: dict[str, Any] = {"step_result_id": loc.step_result_id, "state": loc.state, "where": loc.where,
                            "bucket": loc.bucket, "key": loc.key, "stored_size": loc.stored_size}
    if loc.where == "s3":
        data.update(size=loc.object_size, sha256=loc.sha256, summary=loc.summary)
    elif loc.where == "db":
        size, digest = sha256_of(stream_log(ctx.browse_db, None, loc))
        data.update(size=size, sha256=digest)
    else:
        data.update(size=0, sha256=None)
    return data


def write_log(ctx: Context, step_result_id: int, out: BinaryIO) -> int:
    """Stream the exact bytes of a log to ``out``; returns the number of bytes written."""
    from ..logstore import locate, stream_log

    loc = locate(ctx.browse_db, step_result_id)
    if loc.where == "none":
        raise NotFound(f"step result {step_result_id} has no log (its log is NULL and it was not moved)")
    written = 0
    store = ctx.store if loc.where == "s3" else None
    for chunk in stream_log(ctx.browse_db, store, loc):
        out.write(chunk)
        written += len(chunk)
    out.flush()
    return written


def write_part(ctx: Context, step_result_id: int, part: str, out: BinaryIO) -> int:
    """Stream one decoded output string of a JSON log to ``out``."""
    from ..logstore import locate, stream_log
    from ..logview import JsonPartScanner

    loc = locate(ctx.browse_db, step_result_id)
    if loc.where == "none":
        raise NotFound(f"step result {step_result_id} has no log")
    store = ctx.store if loc.where == "s3" else None
    spool = _ForwardingSpool(part, out)
    scanner = JsonPartScanner(spool)
    spool.scanner = scanner
    # The whole log is read even after the part ends: stopping a COPY half-way costs a cancel.
    for chunk in stream_log(ctx.browse_db, store, loc):
        scanner.feed(chunk)
        if scanner.error:
            break
    else:
        scanner.finish()
    if not spool.seen:
        if scanner.error:
            raise AtcError(f"step result {step_result_id}: {scanner.error}; use `atc log {step_result_id}` for the raw bytes")
        names = ", ".join(d.name for d in scanner.parts[:12]) or "none"
        raise NotFound(f"step result {step_result_id} has no part {part!r} (parts: {names})")
    out.flush()
    return spool.written


class _ForwardingSpool:
    """A spool stand-in for the CLI: the wanted part's bytes go straight to ``out``; other parts
    are counted and dropped, so memory stays bounded and nothing touches the disk."""

    def __init__(self, wanted: str, out: BinaryIO) -> None:
        self.wanted = wanted
        self.out = out
        self.size = 0
        self.complete = False
        self.error = None
        self.scanner: Any = None
        self.seen = False
        self.written = 0
        import threading

        self.changed = threading.Condition()

    def append(self, data: bytes) -> None:
        parts = self.scanner.parts if self.scanner is not None else []
        current = parts[-1] if parts else None
        if current is not None and current.name == self.wanted:
            self.seen = True
            self.out.write(data)
            self.written += len(data)
        self.size += len(data)

    def pread(self, offset: int, length: int) -> bytes:  # parts are never read back here
        return b""

    def close(self) -> None:
        pass


def cmd_log(ctx: Context, args: argparse.Namespace) -> int:
    if ctx.json_output:
        emit(ctx, log_metadata(ctx, args.step_result_id))
        return 0
    out = sys.stdout.buffer
    if args.part:
        write_part(ctx, args.step_result_id, args.part, out)
    else:
        write_log(ctx, args.step_result_id, out)
    return 0

"""Objects no pointer references, pointers whose object is missing, and half-finished moves.

The scan is a merge join of two streams sorted the same way (bytewise): the S3 listing under atc's
prefix (S3 lists keys in UTF-8 byte order) and ``atc.moved_log`` keys in ``COLLATE "C"`` order,
paged by keyset. Memory stays bounded whatever the number of objects.

- object without pointer -> orphan: left by a move killed between upload and swap, a restore
  killed before deleting its object, or a move whose swap was refused. Safe to delete: the
  database is authoritative for that log. Deleted only when older than ``older_than`` and only
  while holding the per-log advisory lock (so a move in flight, which holds it from upload to
  commit, can never lose its object), re-checking that no pointer appeared.
- pointer without object -> ``missing``: S3 lost a moved log. Reported loudly; nothing to fix
  automatically.
- pointer whose row still holds inline bytes -> ``half_finished``: the application rewrote the
  log after it was moved (or a restore was interrupted by hand). The database is authoritative;
  reconciling drops the pointer (and then the object, as an orphan).
- pointer whose step result row no longer exists -> ``dangling``: pointer and object are garbage.
- multipart uploads never completed under the prefix -> aborted when older than ``older_than``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import psycopg

from .audit import audited
from .config import Settings
from .db import Database, connect, translate_error
from .errors import AtcError
from .migrate import MOVE_LOCK_CLASS, TRY_LOCK_LOG, UNLOCK_LOG
from .storage import ObjectStore

# Keyset page of pointers in byte order of key (atc schema only; no application table read).
POINTERS_PAGE = """
SELECT step_result_id, key, size FROM atc.moved_log
WHERE bucket = %(bucket)s AND key COLLATE "C" > %(after)s COLLATE "C"
ORDER BY bucket, key COLLATE "C"
LIMIT %(limit)s
"""
# Pointers whose row holds inline bytes again, or whose row is gone. Null bitmap only; no lock.
HALF_FINISHED = """
SELECT m.step_result_id, m.key, (s.id IS NULL) AS row_gone
FROM atc.moved_log m LEFT JOIN auto_test_step_result s ON s.id = m.step_result_id
WHERE m.step_result_id > %(after)s AND (s.id IS NULL OR s.log IS NOT NULL)
ORDER BY m.step_result_id
LIMIT %(limit)s
"""
POINTER_FOR_KEY = "SELECT 1 FROM atc.moved_log WHERE bucket = %s AND key = %s"
DROP_STALE_POINTER = """
DELETE FROM atc.moved_log m USING auto_test_step_result s
WHERE m.step_result_id = %(id)s AND s.id = m.step_result_id AND s.log IS NOT NULL
RETURNING m.key
"""
DROP_DANGLING_POINTER = """
DELETE FROM atc.moved_log m
WHERE m.step_result_id = %(id)s AND NOT EXISTS (SELECT 1 FROM auto_test_step_result s WHERE s.id = m.step_result_id)
RETURNING m.key
"""

_KEY_ID = re.compile(r"step-result/(\d+)\.json$")


def parse_age(text: str) -> timedelta:
    """'1d', '12h', '30m', '45s', '0' -> timedelta."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text))
    if not m:
        raise AtcError(f"--older-than {text!r} is not an age (use e.g. 30m, 12h, 1d)")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return timedelta(seconds=float(m.group(1)) * unit)


def step_result_id_of(key: str) -> int | None:
    m = _KEY_ID.search(key)
    return int(m.group(1)) if m else None


@dataclass
class OrphanReport:
    bucket: str
    prefix: str
    objects: int = 0
    object_bytes: int = 0
    pointers: int = 0
    orphans: list[dict[str, Any]] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)
    size_mismatch: list[dict[str, Any]] = field(default_factory=list)
    half_finished: list[dict[str, Any]] = field(default_factory=list)
    dangling: list[dict[str, Any]] = field(default_factory=list)
    incomplete_uploads: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.size_mismatch)


def _pointers(db: Database, bucket: str, page: int = 1000) -> Iterator[dict[str, Any]]:
    after = ""
    while True:
        rows = db.fetch(POINTERS_PAGE, {"bucket": bucket, "after": after, "limit": page}, what="listing pointers")
        if not rows:
            return
        yield from rows
        after = rows[-1]["key"]


def scan(db: Database, store: ObjectStore, *, limit_listed: int = 10_000) -> OrphanReport:
    """Compare the bucket's objects under the prefix with the pointers (read-only)."""
    prefix = store.settings.s3.prefix
    report = OrphanReport(bucket=store.bucket, prefix=prefix)
    objects = iter(store.list(prefix))
    pointers = (p for p in _pointers(db, store.bucket) if p["key"].startswith(prefix))
    obj = next(objects, None)
    ptr = next(pointers, None)
    while obj is not None or ptr is not None:
        okey = obj.key.encode("utf-8") if obj is not None else None
        pkey = ptr["key"].encode("utf-8") if ptr is not None else None
        if obj is not None and (pkey is None or okey < pkey):
            report.objects += 1
            report.object_bytes += obj.size
            if len(report.orphans) < limit_listed:
                report.orphans.append({"key": obj.key, "size": obj.size, "step_result_id": step_result_id_of(obj.key),
                                       "last_modified": obj.last_modified})
            obj = next(objects, None)
        elif ptr is not None and (okey is None or pkey < okey):
            report.pointers += 1
            if len(report.missing) < limit_listed:
                report.missing.append({"key": ptr["key"], "step_result_id": ptr["step_result_id"], "size": ptr["size"]})
            ptr = next(pointers, None)
        else:
            assert obj is not None and ptr is not None
            report.objects += 1
            report.object_bytes += obj.size
            report.pointers += 1
            if obj.size != int(ptr["size"]) and len(report.size_mismatch) < limit_listed:
                report.size_mismatch.append({"key": obj.key, "step_result_id": ptr["step_result_id"],
                                             "object_size": obj.size, "pointer_size": ptr["size"]})
            obj = next(objects, None)
            ptr = next(pointers, None)
    after = 0
    while True:
        rows = db.fetch(HALF_FINISHED, {"after": after, "limit": 1000}, what="finding half-finished moves")
        if not rows:
            break
        for row in rows:
            target = report.dangling if row["row_gone"] else report.half_finished
            if len(target) < limit_listed:
                target.append({"step_result_id": row["step_result_id"], "key": row["key"]})
        after = rows[-1]["step_result_id"]
    try:
        paginator = store.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=store.bucket, Prefix=prefix):
            for up in page.get("Uploads", []) or []:
                report.incomplete_uploads.append({"key": up["Key"], "upload_id": up["UploadId"],
                                                  "initiated": up.get("Initiated")})
    except Exception as exc:
        raise store.translate(exc, "listing incomplete uploads") from None
    return report


def _old_enough(when: Any, cutoff: datetime) -> bool:
    if when is None:
        return False
    if isinstance(when, datetime) and when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when <= cutoff


def planned_actions(report: OrphanReport, older_than: timedelta, *, now: datetime | None = None) -> list[dict[str, Any]]:
    """What ``clean`` would do with this report, one entry per object, pointer or upload.

    The TUI shows this list in its confirmation and passes it back as ``clean(only=...)``, so
    nothing outside the confirmed list is touched even if the bucket changed since the scan.
    Each entry: ``kind`` (orphan, half_finished, dangling, incomplete_upload), ``ident`` (key,
    step result id or upload id), and ``what`` (one line for the operator).
    """
    cutoff = (now or datetime.now(timezone.utc)) - older_than
    plan: list[dict[str, Any]] = []
    for item in report.half_finished:
        plan.append({"kind": "half_finished", "ident": item["step_result_id"],
                     "what": f"step result {item['step_result_id']}: keep the database copy, delete pointer and "
                             f"object {item['key']}"})
    for item in report.dangling:
        plan.append({"kind": "dangling", "ident": item["step_result_id"],
                     "what": f"step result {item['step_result_id']} (deleted): drop its pointer and object {item['key']}"})
    for item in report.orphans:
        if _old_enough(item["last_modified"], cutoff):
            plan.append({"kind": "orphan", "ident": item["key"],
                         "what": f"delete orphan object {item['key']} ({item['size']} bytes, no pointer)"})
    for up in report.incomplete_uploads:
        if _old_enough(up["initiated"], cutoff):
            plan.append({"kind": "incomplete_upload", "ident": up["upload_id"],
                         "what": f"abort incomplete upload of {up['key']}"})
    return plan


def _restrict(report: OrphanReport, only: list[dict[str, Any]]) -> None:
    """Keep in the report only what the operator confirmed (``planned_actions`` entries)."""
    wanted = {(a["kind"], a["ident"]) for a in only}
    report.half_finished = [i for i in report.half_finished if ("half_finished", i["step_result_id"]) in wanted]
    report.dangling = [i for i in report.dangling if ("dangling", i["step_result_id"]) in wanted]
    report.orphans = [i for i in report.orphans if ("orphan", i["key"]) in wanted]
    report.incomplete_uploads = [u for u in report.incomplete_uploads if ("incomplete_upload", u["upload_id"]) in wanted]


def clean(settings: Settings, db: Database, store: ObjectStore, *, older_than: timedelta,
          reason: str = "", only: list[dict[str, Any]] | None = None) -> OrphanReport:
    """Scan, then delete old orphans, reconcile half-finished moves, drop dangling pointers,
    abort old incomplete uploads. Audited. Each deletion holds the log's advisory lock.

    ``only`` (entries of ``planned_actions``) limits the clean-up to what was confirmed: the scan
    is done again and only items found in both are acted on, each still re-checked under its lock.
    """
    report = scan(db, store)
    if only is not None:
        _restrict(report, only)
    cutoff = datetime.now(timezone.utc) - older_than
    targets = [{"bucket": store.bucket, "prefix": report.prefix, "older_than_s": older_than.total_seconds()}]
    with audited(db, settings, "orphans-delete", targets, reason=reason) as entry:
        conn = connect(settings, application_suffix="/orphans")
        try:
            for item in report.half_finished:
                _with_log_lock(conn, item["step_result_id"], report, lambda: _reconcile(conn, store, item, report))
            for item in report.dangling:
                _with_log_lock(conn, item["step_result_id"], report, lambda: _drop_dangling(conn, store, item, report))
            for item in report.orphans:
                if not _old_enough(item["last_modified"], cutoff):
                    report.actions.append({"key": item["key"], "action": "kept (younger than --older-than)"})
                    continue
                sid = item["step_result_id"]
                if sid is None:
                    _delete_orphan(conn, store, item, report)
                else:
                    _with_log_lock(conn, sid, report, lambda: _delete_orphan(conn, store, item, report))
            for up in report.incomplete_uploads:
                if _old_enough(up["initiated"], cutoff):
                    try:
                        store.client.abort_multipart_upload(Bucket=store.bucket, Key=up["key"], UploadId=up["upload_id"])
                    except Exception as exc:
                        raise store.translate(exc, "aborting an incomplete upload", up["key"]) from None
                    report.actions.append({"key": up["key"], "action": "aborted incomplete upload"})
        except psycopg.Error as exc:
            raise translate_error(exc, "cleaning orphans") from None
        finally:
            conn.close()
        counts: dict[str, int] = {}
        for a in report.actions:
            counts[a["action"]] = counts.get(a["action"], 0) + 1
        entry.details = {"counts": counts, "missing": len(report.missing)}
        if only is not None:
            entry.details["confirmed"] = len(only)
    return report


def _with_log_lock(conn: psycopg.Connection, sid: int, report: OrphanReport, action: Any) -> None:
    if not conn.execute(TRY_LOCK_LOG, (MOVE_LOCK_CLASS, sid)).fetchone()["got"]:
        report.actions.append({"step_result_id": sid, "action": "skipped (a move or restore holds it)"})
        return
    try:
        action()
    finally:
        conn.execute(UNLOCK_LOG, (MOVE_LOCK_CLASS, sid))


def _delete_orphan(conn: psycopg.Connection, store: ObjectStore, item: dict[str, Any], report: OrphanReport) -> None:
    # Re-check under the lock: a move may have committed its pointer since the scan.
    if conn.execute(POINTER_FOR_KEY, (store.bucket, item["key"])).fetchone():
        report.actions.append({"key": item["key"], "action": "kept (pointer appeared)"})
        return
    store.delete(item["key"])
    report.actions.append({"key": item["key"], "action": "deleted orphan", "size": item["size"]})


def _reconcile(conn: psycopg.Connection, store: ObjectStore, item: dict[str, Any], report: OrphanReport) -> None:
    dropped = conn.execute(DROP_STALE_POINTER, {"id": item["step_result_id"]}).fetchone()
    if dropped is None:
        report.actions.append({"step_result_id": item["step_result_id"], "action": "kept (no longer half-finished)"})
        return
    store.delete(dropped["key"])
    report.actions.append({"step_result_id": item["step_result_id"], "key": dropped["key"],
                           "action": "reconciled half-finished move (database kept, pointer and object removed)"})


def _drop_dangling(conn: psycopg.Connection, store: ObjectStore, item: dict[str, Any], report: OrphanReport) -> None:
    dropped = conn.execute(DROP_DANGLING_POINTER, {"id": item["step_result_id"]}).fetchone()
    if dropped is None:
        return
    store.delete(dropped["key"])
    report.actions.append({"step_result_id": item["step_result_id"], "key": dropped["key"],
                           "action": "dropped pointer of a deleted step result"})

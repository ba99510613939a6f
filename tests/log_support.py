"""Helpers for the log tests: step results with given logs, inline or moved to S3."""

from __future__ import annotations

import hashlib
import json

import psycopg

from console.config import Settings
from console.storage import ObjectStore

_CHAIN = """
WITH c AS (INSERT INTO "Course" (name) VALUES ('logs') RETURNING id),
     a AS (INSERT INTO "AutoTest" DEFAULT VALUES RETURNING id),
     asg AS (INSERT INTO "Assignment" (name, state, "Course_id", auto_test_id)
             SELECT 'log tests', 'open', c.id, a.id FROM c, a RETURNING id, auto_test_id),
     st AS (INSERT INTO "AutoTestSet" (auto_test_id) SELECT auto_test_id FROM asg RETURNING id),
     su AS (INSERT INTO "AutoTestSuite" (auto_test_set_id) SELECT id FROM st RETURNING id),
     sp AS (INSERT INTO "AutoTestStep" (auto_test_suite_id, "order", name, test_type)
            SELECT id, 0, 'run', 'run_program' FROM su RETURNING id),
     u AS (INSERT INTO "User" (name, username) VALUES ('student', 'student-' || md5(random()::text)) RETURNING id),
     w AS (INSERT INTO "Work" ("Assignment_id", "User_id") SELECT asg.id, u.id FROM asg, u RETURNING id),
     r AS (INSERT INTO "AutoTestRun" (auto_test_id) SELECT auto_test_id FROM asg RETURNING id),
     res AS (INSERT INTO "AutoTestResult" (auto_test_run_id, work_id, state)
             SELECT r.id, w.id, 'passed' FROM r, w RETURNING id)
SELECT sp.id AS step_id, res.id AS result_id FROM sp, res
"""


class LogFactory:
    """Creates step results whose log is given as exact bytes (JSON text)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.conn = psycopg.connect(settings.database.dsn, autocommit=True)
        self.step_id, self.result_id = self.conn.execute(_CHAIN).fetchone()
        self._store: ObjectStore | None = None

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = ObjectStore(self.settings)
        return self._store

    def inline(self, log: bytes | None, state: str = "passed") -> int:
        """A step result whose log column holds ``log`` verbatim (json keeps the text as is)."""
        text = None if log is None else log.decode("utf-8")
        row = self.conn.execute(
            "INSERT INTO auto_test_step_result (auto_test_step_id, auto_test_result_id, state, log) "
            "VALUES (%s, %s, %s, %s::json) RETURNING id",
            (self.step_id, self.result_id, state, text)).fetchone()
        return row[0]

    def moved(self, log: bytes, state: str = "failed", summary: dict | None = None) -> int:
        """A step result whose log was moved to S3: object uploaded, pointer written, column NULL."""
        sid = self.inline(None, state)
        key = self.store.log_key(sid)
        self.store.put_bytes(key, log)
        self.conn.execute(
            "INSERT INTO atc.moved_log (step_result_id, bucket, key, size, sha256, summary) "
            "VALUES (%s, %s, %s, %s, %s, %s::jsonb)",
            (sid, self.store.bucket, key, len(log), hashlib.sha256(log).hexdigest(), json.dumps(summary or {})))
        return sid

    def close(self) -> None:
        self.conn.close()


def json_log(stdout: bytes | str = "", stderr: bytes | str = "", **extra) -> bytes:
    """A run_program-shaped log; bytes outputs are decoded with surrogateescape, as a runner that
    captures raw bytes would store them (invalid UTF-8 becomes \\udcXX escapes)."""

    def text(value):
        return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value

    body = {"stdout": text(stdout), "stderr": text(stderr), "exit_code": 1, "time_spend": 0.25, **extra}
    return json.dumps(body).encode("ascii")

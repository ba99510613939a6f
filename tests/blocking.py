"""Real blocking situations on the embedded PostgreSQL, for the lock, signal and screen tests.

``Application`` plays the AutoTest application: its own plain psycopg connections (tagged with an
application_name), which may take row locks with FOR UPDATE and leave transactions idle, exactly
the habits atc must diagnose. Statements that block run in threads; ``wait_for_waiters`` polls
pg_stat_activity until the expected number of sessions wait on a lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg


@dataclass
class Blocked:
    """A statement running in a thread that is expected to wait on a lock."""

    pid: int
    thread: threading.Thread
    result: dict[str, Any] = field(default_factory=dict)

    def finished(self, timeout: float = 10.0) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


class Application:
    def __init__(self, dsn: str, tag: str = "autotest-app") -> None:
        self.dsn = dsn
        self.tag = tag
        self.conns: list[psycopg.Connection] = []
        self.blocked: list[Blocked] = []

    def connect(self, *, autocommit: bool = False, name: str | None = None, **kwargs: Any) -> psycopg.Connection:
        conn = psycopg.connect(self.dsn, autocommit=autocommit, application_name=name or self.tag, **kwargs)
        self.conns.append(conn)
        return conn

    def holder(self, *statements: str, name: str | None = None, params: Any = None) -> psycopg.Connection:
        """A session that runs statements in a transaction and then sits idle in transaction."""
        conn = self.connect(name=name)
        for statement in statements:
            conn.execute(statement, params)
        return conn

    def start_blocked(self, *statements: str, name: str | None = None, autocommit: bool = False,
                      conn: psycopg.Connection | None = None) -> Blocked:
        """Run statements in a thread (the last one is expected to wait); returns the session's pid."""
        conn = conn or self.connect(name=name, autocommit=autocommit)
        pid = conn.info.backend_pid
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                for statement in statements:
                    conn.execute(statement)
                if not autocommit and not conn.closed:
                    conn.commit()
                result["ok"] = True
            except Exception as exc:  # terminated or cancelled: the test checks which
                result["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        blocked = Blocked(pid=pid, thread=thread, result=result)
        self.blocked.append(blocked)
        return blocked

    def wait_for_waiters(self, count: int, timeout: float = 10.0) -> list[int]:
        """Poll until ``count`` of our sessions wait on a heavyweight lock; returns their pids."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.dsn, autocommit=True) as probe:
            while True:
                rows = probe.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name LIKE %s",
                    (self.tag + "%",),
                ).fetchall()
                if len(rows) >= count:
                    return sorted(r[0] for r in rows)
                if time.monotonic() > deadline:
                    raise AssertionError(f"expected {count} lock waiters, saw {len(rows)}")
                time.sleep(0.02)

    def close(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s AND pid <> pg_backend_pid()",
                (self.tag + "%",),
            )
        for blocked in self.blocked:
            blocked.thread.join(5)
        for conn in self.conns:
            try:
                conn.close()
            except Exception:
                pass


def blocking_pids_now(dsn: str, pids: list[int] | None = None) -> dict[int, set[int]]:
    """pg_blocking_pids for every waiting session, straight from the server."""
    with psycopg.connect(dsn, autocommit=True) as probe:
        rows = probe.execute(
            "SELECT pid, pg_blocking_pids(pid) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        ).fetchall()
    return {pid: set(b) for pid, b in rows if pids is None or pid in pids}


def seed_jobs(dsn: str, count: int = 5) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO job (cg_url, remote_id, job_metadata) "
            "SELECT 'http://cg', 'r' || g, jsonb_build_object('assignment_id', g) FROM generate_series(1, %s) g",
            (count,),
        )


def write_config(path, settings, **top: Any):
    """A TOML config file for `atc --config` pointing at the test database (CLI tests)."""
    import json as _json

    db = settings.database
    lines = [f"operator = {_json.dumps(top.get('operator', settings.operator_name))}"]
    if top.get("read_only"):
        lines.append("read_only = true")
    lines += ["[database]", f"dsn = {_json.dumps(db.dsn)}", f"statement_timeout = {_json.dumps(db.statement_timeout)}",
              f"lock_timeout = {_json.dumps(db.lock_timeout)}"]
    path.write_text("\n".join(lines) + "\n")
    return path

"""Shared helpers of the migration tests: build step results with exact log bytes, read them back.

Logs are inserted as text into the ``json`` column, which keeps its input verbatim, so the bytes
inserted are the bytes every later read must return.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable

import psycopg

from console.config import Settings
from console.db import Database
from console.logstore import locate, stream_log
from console.storage import ObjectStore

# Copies of shared/real-logs (runner-outputs with its manifest, loghub with its licence) kept in
# the repository, so the tests do not depend on where the shared folder happens to be.
REAL_LOGS = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parents[1]


def real_log_documents() -> list[tuple[str, bytes]]:
    """Step logs built from the real program outputs: (name, exact JSON bytes).

    Bytes that are not UTF-8 (binary program output) are kept the way an application that stores
    them in a json column must: as lone-surrogate escapes ("invalid UTF-8 in strings").
    """
    out: list[tuple[str, bytes]] = []
    runner = REAL_LOGS / "runner-outputs"
    manifest = json.loads((runner / "manifest.json").read_text())
    for i, case in enumerate(manifest["cases"]):
        stdout = (runner / case["stdout_file"]).read_bytes().decode("utf-8", "surrogateescape")
        stderr = (runner / case["stderr_file"]).read_bytes().decode("utf-8", "surrogateescape")
        doc = {"stdout": stdout, "stderr": stderr, "exit_code": case["exit_code"], "time_spend": case["duration_s"],
               "points": float(i % 3)}
        has_surrogates = any("\udc80" <= ch <= "\udcff" for ch in stdout + stderr)
        if has_surrogates or i % 2:
            text = json.dumps(doc)  # ASCII with \u escapes (surrogates must be escaped)
        else:
            text = json.dumps(doc, ensure_ascii=False, indent=1)  # raw UTF-8, odd whitespace kept verbatim
        out.append((case["name"], text.encode("utf-8")))
    loghub = REAL_LOGS / "loghub"
    for path in sorted(loghub.glob("*.log")):
        lines = path.read_text(errors="surrogateescape").splitlines()
        steps = [{"name": f"chunk {j}", "state": "passed" if j % 3 else "failed", "exit_code": j % 2,
                  "achieved_points": 1.0 if j % 3 else 0.0, "stdout": "\n".join(lines[j * 200:(j + 1) * 200]),
                  "stderr": "", "input": "", "expected": ""} for j in range(max(1, len(lines) // 200))]
        out.append((f"loghub_{path.stem}", json.dumps({"steps": steps}).encode("utf-8")))
    # NUL escapes and lone surrogates in short strings (they reach the summary, which is jsonb).
    out.append(("nul_and_surrogates", b'{"stdout": "a\\u0000b\\udcff", "stderr": "", "exit_code": 0, '
                                      b'"note": "\\u0000\\ud800", "points": 1}'))
    # Not an object at all, and spacing that a re-serialiser would change.
    out.append(("array_log", b'[1, 2 ,{"x" :  "y"}]'))
    return out


def seed_world(settings: Settings, logs: Iterable[bytes | None], *, states: Iterable[str] | None = None,
               assignments: int = 1) -> list[int]:
    """Create the rows one step result per log needs; returns the step result ids in order."""
    logs = list(logs)
    states = list(states) if states is not None else ["passed"] * len(logs)
    with psycopg.connect(settings.database.dsn, autocommit=True) as conn:
        with conn.transaction():
            course = conn.execute("""INSERT INTO "Course" (name) VALUES ('c') RETURNING id""").fetchone()[0]
            user = conn.execute("""INSERT INTO "User" (name, username) VALUES ('u', 'u' || gen_random_uuid()) RETURNING id""").fetchone()[0]
            at = conn.execute("""INSERT INTO "AutoTest" DEFAULT VALUES RETURNING id""").fetchone()[0]
            aset = conn.execute("""INSERT INTO "AutoTestSet" (auto_test_id) VALUES (%s) RETURNING id""", (at,)).fetchone()[0]
            suite = conn.execute("""INSERT INTO "AutoTestSuite" (auto_test_set_id) VALUES (%s) RETURNING id""", (aset,)).fetchone()[0]
            step = conn.execute("""INSERT INTO "AutoTestStep" (auto_test_suite_id, "order", name, test_type)
                                   VALUES (%s, 0, 'run', 'run_program') RETURNING id""", (suite,)).fetchone()[0]
            run = conn.execute("""INSERT INTO "AutoTestRun" (auto_test_id) VALUES (%s) RETURNING id""", (at,)).fetchone()[0]
            results = []
            for a in range(assignments):
                assignment = conn.execute("""INSERT INTO "Assignment" (name, "Course_id", auto_test_id, state)
                                             VALUES (%s, %s, %s, 'open') RETURNING id""", (f"a{a}", course, at)).fetchone()[0]
                work = conn.execute("""INSERT INTO "Work" ("Assignment_id", "User_id") VALUES (%s, %s) RETURNING id""",
                                    (assignment, user)).fetchone()[0]
                results.append(conn.execute("""INSERT INTO "AutoTestResult" (auto_test_run_id, work_id, state)
                                               VALUES (%s, %s, 'passed') RETURNING id""", (run, work)).fetchone()[0])
            ids = []
            for i, (log, state) in enumerate(zip(logs, states)):
                text = None if log is None else log.decode("utf-8")
                ids.append(conn.execute(
                    """INSERT INTO auto_test_step_result (auto_test_step_id, auto_test_result_id, state, log)
                       VALUES (%s, %s, %s, %s::json) RETURNING id""",
                    (step, results[i % len(results)], state, text)).fetchone()[0])
    return ids


def read_log(db: Database, store: ObjectStore, sid: int) -> tuple[str, bytes]:
    loc = locate(db, sid)
    return loc.where, b"".join(stream_log(db, store, loc))


def placement(settings: Settings, sid: int) -> dict[str, Any]:
    """Where a log is according to the rules: pointer? inline?"""
    with psycopg.connect(settings.database.dsn, autocommit=True) as conn:
        row = conn.execute("""SELECT s.log IS NOT NULL AS inline, m.key, m.size, m.sha256
                              FROM auto_test_step_result s LEFT JOIN atc.moved_log m ON m.step_result_id = s.id
                              WHERE s.id = %s""", (sid,)).fetchone()
    return {"inline": row[0], "key": row[1], "size": row[2], "sha256": row[3]}


def assert_every_log_intact(settings: Settings, store: ObjectStore, expected: dict[int, bytes]) -> dict[str, int]:
    """Each log readable from exactly one authoritative place, byte-identical. Returns counts."""
    db = Database(settings)
    counts = {"db": 0, "s3": 0, "half": 0}
    try:
        for sid, data in expected.items():
            p = placement(settings, sid)
            if p["inline"] and p["key"]:
                counts["half"] += 1  # pointer + inline: DB authoritative (reconciled by orphans)
            where, got = read_log(db, store, sid)
            assert got == data, f"log {sid} differs ({where}: {len(got)} bytes, expected {len(data)})"
            if where == "s3":
                assert p["sha256"] == hashlib.sha256(data).hexdigest()
                assert store.head(p["key"]).size == len(data)
            counts[where] += 1
    finally:
        db.close()
    return counts


def write_config(settings: Settings, path: Path) -> Path:
    """A TOML config file for the CLI equal to ``settings``."""

    def emit(obj: Any, prefix: str) -> list[str]:
        scalars, tables = [], []
        for f in fields(obj):
            if not f.compare:  # source, read_only_origin: not TOML keys
                continue
            value = getattr(obj, f.name)
            if is_dataclass(value):
                tables.append((f.name, value))
            elif isinstance(value, bool):
                scalars.append(f"{f.name} = {'true' if value else 'false'}")
            elif isinstance(value, (int, float)):
                scalars.append(f"{f.name} = {value}")
            else:
                scalars.append(f"{f.name} = {json.dumps(str(value))}")
        lines = ([f"[{prefix}]"] if prefix else []) + scalars + [""]
        for name, value in tables:
            lines += emit(value, f"{prefix}.{name}" if prefix else name)
        return lines

    path.write_text("\n".join(emit(settings, "")))
    return path


def run_cli(config: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "console", "--config", str(config), *args], cwd=str(ROOT),
                          capture_output=True, text=True, env=full_env, timeout=timeout)

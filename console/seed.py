"""Seed a realistic AutoTest data set (the demo, the tests and the benchmarks).

``seed_demo(settings, scale)`` fills an empty database that has (or gets) the reference schema:
courses, students, assignments in every state with deadlines, AutoTests with sets, suites and
steps of every test type, runs (finished and still running), results and step results in every
state, Work rows per student, broker ``job``/``runner`` rows consistent with the runs, and step
logs built from real program outputs (``console/data/runner-outputs``) plus deliberately hostile
ones. Some logs are moved to S3 (object + ``atc.moved_log`` pointer) so both locations exist.

``seed_bulk(settings, assignments=, step_results=, log_bytes=)`` creates exactly that many step
results with logs of about ``log_bytes`` each, for benchmarks.

Everything is deterministic for a scale (``random.Random`` with a fixed seed): ids, names, states
and log bytes are the same on every run; only timestamps are relative to the time of seeding.
Rows go in with COPY, in one transaction; big logs are written into the COPY stream piece by piece
so seeding a 400 MB log needs a few MB of client memory.

This module writes the application's tables on purpose: it is a demo/test tool, never pointed at a
production database (it refuses a database that already holds step results).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Iterator

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .config import Settings
from .db import connect, translate_error
from .errors import AtcError, DatabaseError
from .logformat import summarize_log

Progress = Callable[[str], None] | None

SEED = 20220414  # the day of the outage this tool is built from; any fixed number would do
CG_URL = "https://autotest.demo.invalid/"

TEST_TYPES = ("io_test", "run_program", "custom_output", "check_points", "junit_test")
FINAL_STATES = ("passed", "failed", "timed_out", "skipped")


@dataclass(frozen=True)
class Scale:
    name: str
    assignments: int
    results: int  # about; spread over the assignments that have a run
    steps_per_test: int  # average steps per AutoTest (step results = results x steps)
    big_logs: tuple[int, ...]  # sizes of synthetic big logs (system-log text), bytes
    moved_fraction: float  # share of inline-able logs moved to S3
    max_moved_bytes: int = 8 << 20  # never move a log bigger than this while seeding (in-memory upload)
    courses: int = 0  # 0: derived from assignments


SCALES: dict[str, Scale] = {
    "test": Scale("test", assignments=8, results=400, steps_per_test=10,
                  big_logs=(2_000_000, 400_000), moved_fraction=0.02),
    "small": Scale("small", assignments=50, results=2_000, steps_per_test=10,
                   big_logs=(6_000_000, 3_000_000, 1_500_000, 600_000), moved_fraction=0.03),
    "medium": Scale("medium", assignments=200, results=20_000, steps_per_test=10,
                    big_logs=(300_000_000, 150_000_000, 40_000_000, 8_000_000, 2_000_000), moved_fraction=0.01),
    "large": Scale("large", assignments=500, results=100_000, steps_per_test=10,
                   big_logs=(400_000_000, 200_000_000, 100_000_000, 20_000_000, 5_000_000), moved_fraction=0.002),
}


# ------------------------------------------------------------------------------------------------
# Log content
# ------------------------------------------------------------------------------------------------


def _data_dir():
    return resources.files("console").joinpath("data/runner-outputs")


def _decode(raw: bytes) -> str:
    # The runner captures bytes and stores text: invalid UTF-8 becomes U+FFFD, NUL stays (JSON \u0000).
    return raw.decode("utf-8", errors="replace")


@lru_cache(maxsize=None)
def real_output(name: str) -> tuple[str, str, int]:
    """(stdout, stderr, exit_code) of one captured case in console/data/runner-outputs."""
    base = _data_dir()
    manifest = _manifest()
    case = manifest[name]
    return (_decode(base.joinpath(case["stdout_file"]).read_bytes()),
            _decode(base.joinpath(case["stderr_file"]).read_bytes()), int(case["exit_code"]))


@lru_cache(maxsize=None)
def _manifest() -> dict[str, dict[str, Any]]:
    data = json.loads(_data_dir().joinpath("manifest.json").read_text(encoding="utf-8"))
    return {case["name"]: case for case in data["cases"]}


def real_output_names() -> list[str]:
    return sorted(_manifest())


@lru_cache(maxsize=None)
def system_log_lines() -> tuple[str, ...]:
    """Lines of the loghub samples (system logs), used for big outputs."""
    lines: list[str] = []
    base = _data_dir()
    for entry in sorted(base.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("loghub_") and entry.name.endswith(".log"):
            lines.extend(entry.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True))
    return tuple(lines)


# Deliberately hostile output: what a student's program can print, and a viewer must survive.
HOSTILE_STDOUT = (
    "Running hostile.c ...\n"
    "NUL byte here ->\x00<- and after it\n"
    "lone surrogate ->\ud800<- (legal in a JSON string, not in UTF-8)\n"
    "\x1b[2J\x1b[H\x1b[5;10H cursor moved, screen cleared\n"
    "\x1b]0;owned terminal title\x07 OSC title set\n"
    "\x1b]8;;https://evil.example/phish\x1b\\click here\x1b]8;;\x1b\\ OSC 8 hyperlink\n"
    "\x1b]52;c;aGVsbG8=\x07 OSC 52 clipboard write\n"
    "\x1bP+q544e\x1b\\ DCS request, \x1b[?1049h alternate screen, \x1b[?25l cursor hidden\n"
    "\u009b31m C1 CSI, \u009d0;title\u009c C1 OSC\n"
    "[bold red]not markup[/bold red] [link=https://evil.example]not a link[/link] [$accent]var[/]\n"
    "[@click=app.quit]quit?[/] \\[escaped] [/]\n"
    "progress   0%\rprogress  50%\rprogress 100%\r\n"
    "\x1b[31mred\x1b[0m \x1b[1;4;38;5;208mbold orange\x1b[0m normal\n"
    "bell\x07 backspace\x08\x08 vertical tab\x0b form feed\x0c DEL\x7f\n"
    "RTL override \u202etxt.exe\u202c, zero width \u200b\u200d, wide 漢字 😀, combining e\u0301\n"
)
HOSTILE_STDERR = "warning: \x1b[1;31m[error]\x1b[0m [red]fake markup in stderr[/red]\r\nlast line without newline"


def _json_text(value: Any) -> str:
    """JSON as the application stores it: UTF-8 text, escaped only where JSON (or UTF-8) needs it."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only an escape can carry it
        text = json.dumps(value, ensure_ascii=True)
    return text


def _copy_escape(data: bytes) -> bytes:
    """COPY text-format escaping of a JSON value (JSON text has no raw newlines or tabs)."""
    return data.replace(b"\\", b"\\\\")


@dataclass
class OutputCase:
    stdout: str
    stderr: str
    exit_code: int
    state: str  # step state this output leads to


def _output_pools() -> dict[str, list[OutputCase]]:
    """Real outputs by the kind of step they fit, with the state a grader gives them."""

    def case(name: str, state: str) -> OutputCase:
        out, err, code = real_output(name)
        return OutputCase(out, err, code, state)

    return {
        "compile_ok": [case("gcc_warnings_then_run", "passed"), case("bracket_todo_list", "passed"),
                       case("unicode_table", "passed"), case("c_fwrite_binary_ints", "passed"),
                       case("progress_cr_crlf", "passed")],
        "compile_fail": [case("gcc_errors_plain", "failed"), case("gcc_errors_color", "failed"),
                         case("javac_errors", "failed"), case("make_build_failure", "failed"),
                         case("python_syntax_error", "failed"), case("shell_set_x", "failed")],
        "run_fail": [case("c_segfault", "failed"), case("valgrind_memcheck_leak", "failed"),
                     case("asan_heap_overflow", "failed"), case("java_exception_caused_by", "failed"),
                     case("python_recursion_error", "failed"), case("io_diff_unified", "failed")],
        "timeout": [case("stdin_block_timeout", "timed_out")],
        "tests": [case("pytest_failures_plain", "failed"), case("pytest_failures_color", "failed"),
                  case("pytest_300_parametrized", "failed"), case("pytest_junitxml", "failed")],
        "hostile": [OutputCase(HOSTILE_STDOUT, HOSTILE_STDERR, 1, "failed")],
        "huge_line": [case("long_line_1mb", "passed")],
    }


def _fizzbuzz(n: int, bug: bool = False) -> str:
    out = []
    for i in range(1, n + 1):
        if i % 15 == 0:
            out.append("Fizz" if bug else "FizzBuzz")
        elif i % 3 == 0:
            out.append("Fizz")
        elif i % 5 == 0:
            out.append("Buzz")
        else:
            out.append(str(i))
    return "\n".join(out) + "\n"


class LogFactory:
    """Builds step logs (JSON bytes) in the shapes of docs/schema.md, deterministically."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.pools = _output_pools()

    def output_log(self, case: OutputCase, *, points: float | None = None, time_spend: float | None = None) -> bytes:
        log: dict[str, Any] = {"stdout": case.stdout, "stderr": case.stderr, "exit_code": case.exit_code,
                               "time_spend": round(time_spend if time_spend is not None else self.rng.uniform(0.01, 4.0), 3)}
        if points is not None:
            log["points"] = points
        return _json_text(log).encode("utf-8")

    def pick(self, pool: str) -> OutputCase:
        return self.rng.choice(self.pools[pool])

    def run_program(self, outcome: str) -> tuple[str, bytes]:
        rng = self.rng
        if outcome == "timed_out":
            case = self.pick("timeout")
        elif outcome == "failed":
            case = self.pick(rng.choice(("compile_fail", "run_fail", "run_fail")))
        else:
            if rng.random() < 0.5:
                case = self.pick("compile_ok")
            else:
                n = rng.randint(5, 40)
                case = OutputCase(_fizzbuzz(n), "", 0, "passed")
        return case.state, self.output_log(case)

    def junit_test(self, outcome: str) -> tuple[str, bytes]:
        rng = self.rng
        if outcome == "timed_out":
            case = self.pick("timeout")
            return case.state, self.output_log(case, points=0.0)
        if outcome == "failed":
            case = self.pick("tests")
            return "failed", self.output_log(case, points=round(rng.uniform(0.1, 0.9), 4))
        total = rng.randint(4, 30)
        out = (f"============================= test session starts ==============================\n"
               f"collected {total} items\n\ntest_solution.py " + "." * total + " [100%]\n\n"
               f"============================== {total} passed in {rng.uniform(0.05, 3):.2f}s ==============================\n")
        return "passed", self.output_log(OutputCase(out, "", 0, "passed"), points=1.0)

    def custom_output(self, outcome: str) -> tuple[str, bytes]:
        rng = self.rng
        if outcome == "timed_out":
            case = self.pick("timeout")
            return case.state, self.output_log(case, points=0.0)
        if outcome == "failed":
            case = self.pick(rng.choice(("tests", "run_fail")))
            points = round(rng.uniform(0.0, 0.6), 4)
            out = case.stdout + f"\nScore: {points}\n"
            return "failed", self.output_log(OutputCase(out, case.stderr, case.exit_code, "failed"), points=points)
        points = round(rng.uniform(0.6, 1.0), 4)
        out = f"Checking style with pylint...\nYour code has been rated at {points * 10:.2f}/10\n{points}\n"
        return "passed", self.output_log(OutputCase(out, "", 0, "passed"), points=points)

    def io_test(self, outcome: str, name: str) -> tuple[str, bytes]:
        rng = self.rng
        steps = []
        count = rng.randint(2, 6)
        failing = set()
        if outcome == "failed":
            failing = set(rng.sample(range(count), rng.randint(1, count)))
        for i in range(count):
            n = rng.randint(3, 35)
            expected = _fizzbuzz(n)
            state = "passed"
            stdout, stderr, code = expected, "", 0
            if i in failing:
                kind = rng.random()
                if kind < 0.6:
                    stdout, state = _fizzbuzz(n, bug=True), "failed"
                    if stdout == expected:
                        stdout = expected.rstrip("\n")  # a missing trailing newline
                elif kind < 0.85:
                    out, err, code = real_output(rng.choice(["python_syntax_error", "java_exception_caused_by",
                                                             "c_segfault"]))
                    stdout, stderr, state = out, err, "failed"
                else:
                    stdout, stderr, code, state = "", "Killed: time limit of 2s exceeded\n", 124, "timed_out"
            if outcome == "timed_out" and i == count - 1:
                stdout, stderr, code, state = "1\n2\n", "", 124, "timed_out"
            steps.append({"name": f"{name} #{i + 1}: n = {n}", "input": f"{n}\n", "expected": expected,
                          "stdout": stdout, "stderr": stderr, "exit_code": code, "state": state,
                          "achieved_points": 1.0 if state == "passed" else 0.0})
        step_state = "timed_out" if outcome == "timed_out" else ("failed" if failing else "passed")
        return step_state, _json_text({"steps": steps}).encode("utf-8")

    def check_points(self, outcome: str) -> tuple[str, bytes]:
        min_points = round(self.rng.choice((0.5, 0.6, 0.75)), 2)
        points = round(self.rng.uniform(0.0, min_points) if outcome == "failed" else self.rng.uniform(min_points, 1.0), 4)
        return ("failed" if outcome == "failed" else "passed"), _json_text({"points": points, "min_points": min_points}).encode("utf-8")

    def running(self, test_type: str) -> bytes:
        """The partial log of a step still running: output so far, no exit code yet."""
        if test_type == "io_test":
            return _json_text({"steps": [{"name": "Input #1", "input": "3\n", "expected": "1\n2\nFizz\n",
                                          "stdout": "1\n2\n", "stderr": "", "exit_code": None,
                                          "state": "running", "achieved_points": 0.0}]}).encode("utf-8")
        out = self.pick("compile_ok").stdout[: self.rng.randint(0, 200)]
        return _json_text({"stdout": out, "stderr": "", "exit_code": None, "time_spend": None}).encode("utf-8")

    def for_step(self, test_type: str, outcome: str, name: str) -> tuple[str, bytes]:
        if test_type == "io_test":
            return self.io_test(outcome, name)
        if test_type == "junit_test":
            return self.junit_test(outcome)
        if test_type == "custom_output":
            return self.custom_output(outcome)
        if test_type == "check_points":
            return self.check_points(outcome)
        return self.run_program(outcome)


def iter_big_log(size: int, *, stderr: str = "", exit_code: int = 0, time_spend: float = 59.9,
                 chunk_bytes: int = 1 << 20, start_line: int = 0) -> Iterator[bytes]:
    """A run_program log of about ``size`` bytes whose stdout is system-log text, as JSON pieces.

    Yields the JSON text in chunks of about ``chunk_bytes``; never holds the whole log.
    """
    lines = system_log_lines()
    yield b'{"stdout": "'
    written = 12
    tail = ('", "stderr": ' + _json_text(stderr) + f', "exit_code": {exit_code}, "time_spend": {time_spend}' + "}").encode()
    budget = max(size - len(tail), 0)
    batch: list[bytes] = []
    batch_len = 0
    i = start_line
    while written < budget:
        line = lines[i % len(lines)]
        if i % len(lines) == 0:
            line = f"--- pass {i // len(lines) + 1} over the system logs ---\n" + line
        fragment = _json_text(line)[1:-1]
        piece = fragment.encode("utf-8")
        if written + len(piece) > budget:
            # The last piece: cut whole characters, never inside an escape sequence.
            fragment = fragment[: budget - written]
            while fragment.endswith("\\") or ("\\u" in fragment[-5:] and len(fragment) - fragment.rfind("\\u") < 6):
                fragment = fragment[:-1]
            piece = fragment.encode("utf-8")
        if not piece:
            break
        batch.append(piece)
        batch_len += len(piece)
        written += len(piece)
        i += 1
        if batch_len >= chunk_bytes:
            yield b"".join(batch)
            batch, batch_len = [], 0
    if batch:
        yield b"".join(batch)
    yield tail


# ------------------------------------------------------------------------------------------------
# The data set
# ------------------------------------------------------------------------------------------------

COURSE_NAMES = [
    "Programming 1", "Data Structures", "Algorithms & Complexity", "Operating Systems", "Computer Networks",
    "Introduction to Java", "Functional Programming", "Databases", "Compiler Construction",
    "Scientific Computing with Python", "Software Testing", "Concurrency",
]
ASSIGNMENT_TOPICS = [
    "Hello, world", "FizzBuzz", "Linked lists", "Binary search tree", "Word count", "Matrix multiply",
    "Grade parser", "Bank account", "Prime sieve", "Calculator", "Hash map", "Shell scripting",
    "Recursion", "Sorting race", "Leaderboard (Unicode)", "To-do list", "Memory leaks", "Makefiles",
    "Heap overflow hunt", "Dijkstra", "Graph traversal", "Text adventure", "Dynamic programming",
]
# Names are untrusted too (teachers type them): markup lookalikes, Unicode, a control character.
ODD_ASSIGNMENT_NAMES = ["[b]Bonus[/b]: résumé parser 📄", "Opdracht 3 – Ünïcode & [red]markup[/red]",
                        "Lab \x1b[31m7\x1b[0m (escape in name)"]
ODD_NAME_AT = (2, 5, 6)  # assignment positions that get the odd names (all exist at the test scale)
STUDENT_FIRST = ["Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Zoë", "李", "Søren", "Chloé", "Małgorzata",
                 "José", "Ngozi", "Aarav", "Fatima", "Olamide", "Yuki", "Ivan", "Priya", "Lars"]
STUDENT_LAST = ["Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov", "Knuth", "van Dijk", "小龍", "Kierkegaard",
                "Dubois", "Nowak", "García", "Okafor", "Sharma", "Haddad", "Adeyemi", "Tanaka", "Petrov", "Iyer", "Berg"]

# Suites of an AutoTest: (suite name, [(step name, test_type, weight)]). Every test type appears.
SUITE_TEMPLATES = [
    ("Compilation", [("Compile", "run_program", 0.0), ("Compiler warnings", "custom_output", 1.0)]),
    ("Unit tests", [("Unit tests", "junit_test", 4.0), ("Edge cases", "junit_test", 2.0)]),
    ("Input/output", [("Small inputs", "io_test", 2.0), ("Large inputs", "io_test", 2.0),
                      ("Hidden inputs", "io_test", 2.0)]),
    ("Runtime checks", [("Memory check", "run_program", 1.0), ("Run with sample", "run_program", 1.0)]),
    ("Style", [("Style check", "custom_output", 1.0)]),
    ("Threshold", [("Enough points so far", "check_points", 0.0)]),
]


@dataclass
class Plan:
    """Row counts and facts gathered while seeding, returned as the summary."""

    scale: str
    courses: int = 0
    users: int = 0
    assignments: int = 0
    assignments_by_state: dict[str, int] = field(default_factory=dict)
    auto_tests: int = 0
    steps: int = 0
    runs: int = 0
    running_runs: int = 0
    works: int = 0
    results: int = 0
    results_by_state: dict[str, int] = field(default_factory=dict)
    step_results: int = 0
    step_results_by_state: dict[str, int] = field(default_factory=dict)
    logs_inline: int = 0
    logs_moved: int = 0
    log_bytes: int = 0
    moved_bytes: int = 0
    largest_log_bytes: int = 0
    largest_log_step_result_id: int = 0
    jobs: int = 0
    runners: int = 0
    s3: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _ts(value: datetime) -> str:
    return value.isoformat()


def _copy_field(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, datetime):
        return value.isoformat()
    text = str(value)
    if any(c in text for c in "\\\t\n\r"):
        text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text


def _copy_line(values: tuple | list) -> bytes:
    return ("\t".join(_copy_field(v) for v in values) + "\n").encode("utf-8")


def _reserve_ids(conn: psycopg.Connection, table: str, count: int) -> int:
    """Reserve ``count`` ids from a serial column's sequence; returns the first one."""
    if count <= 0:
        return 1
    row = conn.execute(
        "SELECT setval(seq, nextval(seq) + %s - 1) - %s + 1 AS first "
        "FROM (SELECT pg_get_serial_sequence(%s, 'id')::regclass AS seq) s",
        (count, count, table),
    ).fetchone()
    return int(row["first"] if isinstance(row, dict) else row[0])


def _copy_rows(conn: psycopg.Connection, table: str, columns: list[str], rows: Iterator[tuple] | list[tuple]) -> int:
    stmt = sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(*table.split(".")),
                                                     sql.SQL(", ").join(map(sql.Identifier, columns)))
    n = 0
    with conn.cursor() as cur, cur.copy(stmt) as copy:
        buf: list[bytes] = []
        size = 0
        for row in rows:
            line = _copy_line(row)
            buf.append(line)
            size += len(line)
            n += 1
            if size > 1 << 20:
                copy.write(b"".join(buf))
                buf, size = [], 0
        if buf:
            copy.write(b"".join(buf))
    return n


def _prepare(settings: Settings, progress: Progress) -> None:
    """Reference schema (if missing) and atc's schema."""
    from .schema import install_reference_schema, upgrade

    try:
        with connect(settings) as conn:
            present = conn.execute("SELECT to_regclass('auto_test_step_result') IS NOT NULL AS p").fetchone()
            if not (present["p"] if isinstance(present, dict) else present[0]):
                if progress:
                    progress("installing the reference AutoTest schema")
                install_reference_schema(conn)
    except psycopg.Error as exc:
        raise translate_error(exc, "installing the reference schema") from None
    upgrade(settings)


def _seed_session(conn: psycopg.Connection) -> None:
    # Seeding writes big values in one long transaction: lift the interactive session limits
    # for this transaction only (they exist to protect an incident, not a demo being built).
    conn.execute("SET LOCAL statement_timeout = 0")
    conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
    conn.execute("SET LOCAL lock_timeout = '10s'")
    conn.execute("SET LOCAL synchronous_commit = off")


def _refuse_if_seeded(conn: psycopg.Connection) -> None:
    row = conn.execute("SELECT EXISTS (SELECT 1 FROM auto_test_step_result) AS seeded").fetchone()
    if row["seeded"] if isinstance(row, dict) else row[0]:
        db = conn.info.dbname
        raise AtcError(f"database {db!r} already holds step results; seed only into an empty database "
                       "(for the demo: atc demo up --fresh)")


class _MovedLogs:
    """Logs chosen to live in S3: uploaded concurrently, pointers written with COPY."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enabled = bool(settings.s3.bucket)
        self.pending: list[tuple[int, bytes]] = []
        self._store = None

    @property
    def store(self):
        if self._store is None:
            from .storage import ObjectStore

            self._store = ObjectStore(self.settings)
        return self._store

    def add(self, step_result_id: int, data: bytes) -> None:
        self.pending.append((step_result_id, data))

    def flush(self, conn: psycopg.Connection, progress: Progress) -> tuple[int, int]:
        if not self.pending:
            return 0, 0
        store = self.store
        store.check()
        if progress:
            progress(f"uploading {len(self.pending)} moved logs to {store.describe()}")

        def upload(item: tuple[int, bytes]) -> tuple:
            sid, data = item
            key = store.log_key(sid)
            store.put_bytes(key, data, ContentType="application/json")
            return (sid, store.bucket, key, len(data), hashlib.sha256(data).hexdigest(),
                    json.dumps(summarize_log(data)), "atc seed")

        with ThreadPoolExecutor(max_workers=8) as pool:
            rows = list(pool.map(upload, self.pending))
        _copy_rows(conn, "atc.moved_log", ["step_result_id", "bucket", "key", "size", "sha256", "summary", "moved_by"], rows)
        total = sum(len(d) for _, d in self.pending)
        count = len(self.pending)
        self.pending.clear()
        return count, total


def seed_demo(settings: Settings, scale: str = "small", progress: Progress = None) -> dict[str, Any]:
    """Seed the demo data set at ``scale`` (test|small|medium|large); returns a summary dict."""
    if scale not in SCALES:
        raise AtcError(f"unknown seed scale {scale!r} (choose one of {', '.join(SCALES)})")
    if settings.read_only:
        raise AtcError("seeding writes the database; it cannot run with read_only = true")
    started = time.monotonic()
    spec = SCALES[scale]
    _prepare(settings, progress)
    plan = Plan(scale=scale)
    moved = _MovedLogs(settings)
    try:
        with connect(settings, autocommit=False, application_suffix="/seed") as conn:
            _seed_session(conn)
            _refuse_if_seeded(conn)
            _DemoSeeder(conn, spec, plan, moved, progress).run()
            if moved.enabled:
                plan.logs_moved, plan.moved_bytes = moved.flush(conn, progress)
                plan.s3 = f"moved {plan.logs_moved} logs to s3://{settings.s3.bucket}/{settings.s3.prefix}"
            else:
                plan.s3 = "skipped: no S3 bucket configured ([s3] bucket), every log stays in PostgreSQL"
            if progress:
                progress("committing")
            conn.commit()
            conn.autocommit = True
            conn.execute("ANALYZE")
    except psycopg.Error as exc:
        raise translate_error(exc, "seeding the demo data set") from None
    plan.seconds = round(time.monotonic() - started, 2)
    if progress:
        progress(f"seeded {plan.step_results} step results ({plan.log_bytes / 1e6:.1f} MB of logs) in {plan.seconds} s")
    return plan.as_dict()


class _DemoSeeder:
    def __init__(self, conn: psycopg.Connection, spec: Scale, plan: Plan, moved: _MovedLogs, progress: Progress) -> None:
        self.conn = conn
        self.spec = spec
        self.plan = plan
        self.moved = moved
        self.progress = progress or (lambda message: None)
        self.rng = random.Random(f"{SEED}:{spec.name}")
        self.logs = LogFactory(random.Random(f"{SEED}:{spec.name}:logs"))
        self.now = datetime.now(timezone.utc).replace(microsecond=0)

    def uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    # -- structure ---------------------------------------------------------------------------------

    def run(self) -> None:
        conn, rng, spec, plan, now = self.conn, self.rng, self.spec, self.plan, self.now
        self.progress(f"planning a {spec.name} data set")
        n_courses = spec.courses or max(3, min(len(COURSE_NAMES), spec.assignments // 6))
        course_id0 = _reserve_ids(conn, '"Course"', n_courses)
        courses = [(course_id0 + i, f"{COURSE_NAMES[i % len(COURSE_NAMES)]} ({2021 + i // len(COURSE_NAMES)})",
                    now - timedelta(days=200 - i)) for i in range(n_courses)]
        plan.courses = _copy_rows(conn, "Course", ["id", "name", "created_at"], courses)

        # Assignment states: the first ones cover every state and the odd cases at any scale.
        states = ["done", "open", "open", "hidden", "done", "open", "done", "hidden"]
        n = spec.assignments
        assignment_states = [states[i] if i < len(states) else rng.choices(("hidden", "open", "done"), (1, 4, 4))[0]
                             for i in range(n)]
        # One assignment without an AutoTest (teachers grade it by hand).
        no_autotest = {n - 1}
        with_runs = [i for i in range(n) if assignment_states[i] != "hidden" and i not in no_autotest]
        per_run = max(1, spec.results // max(1, len(with_runs)))
        students_per_course = max(per_run + per_run // 4, 10)

        user_id0 = _reserve_ids(conn, '"User"', students_per_course * n_courses)
        users = []
        for c in range(n_courses):
            for s in range(students_per_course):
                uid = user_id0 + c * students_per_course + s
                name = f"{rng.choice(STUDENT_FIRST)} {rng.choice(STUDENT_LAST)}"
                users.append((uid, name, f"s{uid:06d}"))
        plan.users = _copy_rows(conn, "User", ["id", "name", "username"], users)

        auto_test_count = n - len(no_autotest)
        at_id0 = _reserve_ids(conn, '"AutoTest"', auto_test_count)
        assignment_id0 = _reserve_ids(conn, '"Assignment"', n)
        auto_tests, assignments = [], []
        self.assignment_info: list[dict[str, Any]] = []
        at_next = at_id0
        for i in range(n):
            state = assignment_states[i]
            course = courses[i % n_courses]
            if i in ODD_NAME_AT:
                name = ODD_ASSIGNMENT_NAMES[ODD_NAME_AT.index(i)]
            else:
                name = f"{ASSIGNMENT_TOPICS[i % len(ASSIGNMENT_TOPICS)]}" + (f" {i // len(ASSIGNMENT_TOPICS) + 1}" if i >= len(ASSIGNMENT_TOPICS) else "")
            if state == "hidden":
                deadline = now + timedelta(days=rng.randint(14, 40), hours=rng.randint(0, 23))
            elif state == "open":
                deadline = now + timedelta(days=rng.randint(1, 12), hours=rng.randint(0, 23))
            else:
                deadline = now - timedelta(days=rng.randint(3, 90), hours=rng.randint(0, 23))
            at_id = None
            if i not in no_autotest:
                at_id = at_next
                at_next += 1
                auto_tests.append((at_id, "make install-deps", "", "", rng.choice(("full", "partial")), state == "done", False,
                                   deadline - timedelta(days=20)))
            assignments.append((assignment_id0 + i, name, state, deadline, course[0], at_id, deadline - timedelta(days=21)))
            self.assignment_info.append({"id": assignment_id0 + i, "state": state, "deadline": deadline,
                                         "course": i % n_courses, "auto_test_id": at_id, "has_run": i in with_runs})
            plan.assignments_by_state[state] = plan.assignments_by_state.get(state, 0) + 1
        plan.auto_tests = _copy_rows(conn, "AutoTest", ["id", "setup_script", "run_setup_script", "finalize_script",
                                                        "grade_calculation", "results_always_visible",
                                                        "prefer_teacher_revision", "created_at"], auto_tests)
        plan.assignments = _copy_rows(conn, "Assignment", ["id", "name", "state", "deadline", "Course_id", "auto_test_id",
                                                           "created_at"], assignments)
        self.progress(f"{plan.assignments} assignments in {plan.courses} courses, {plan.users} students")

        self._auto_test_structure([a["auto_test_id"] for a in self.assignment_info if a["auto_test_id"]])

        # Runs: one per assignment that is open or done and has an AutoTest. Open ones are partly
        # still running; the first open one waits for a runner (a starving job for the broker screens).
        run_id0 = _reserve_ids(conn, '"AutoTestRun"', len(with_runs))
        runs = []
        self.runs: list[dict[str, Any]] = []
        open_seen = 0
        for k, i in enumerate(with_runs):
            a = self.assignment_info[i]
            running = False
            if a["state"] == "open":
                open_seen += 1
                running = open_seen <= 2 or rng.random() < 0.3
            started = (now - timedelta(minutes=rng.randint(5, 90))) if running else a["deadline"] + timedelta(minutes=rng.randint(1, 30))
            if started > now:
                started = now - timedelta(hours=rng.randint(1, 48))
            job_uuid = self.uuid()
            run = {"id": run_id0 + k, "assignment": a, "running": running, "started": started, "job_uuid": job_uuid,
                   "students": max(1, int(per_run * rng.uniform(0.8, 1.2))) if k < len(with_runs) - 1 else None,
                   "waiting": running and open_seen == 1}
            self.runs.append(run)
            runs.append((run["id"], a["auto_test_id"], started, None, job_uuid, 1, 2 if running else 1,
                         not running, started))
        # The last run takes what is left so the result count lands on the scale's figure.
        assigned = sum(r["students"] for r in self.runs if r["students"])
        if self.runs:
            self.runs[-1]["students"] = max(1, spec.results - assigned)
        plan.runs = _copy_rows(conn, "AutoTestRun", ["id", "auto_test_id", "started_date", "kill_date", "job_id", "job_number",
                                                     "runners_requested", "batch_run_done", "created_at"], runs)
        plan.running_runs = sum(1 for r in self.runs if r["running"])

        self._broker_rows()
        self._works_results_and_steps(students_per_course, user_id0)

    def _auto_test_structure(self, auto_test_ids: list[int]) -> None:
        conn, rng, spec = self.conn, self.rng, self.spec
        sets, suites, steps = [], [], []
        self.steps_of: dict[int, list[dict[str, Any]]] = {}
        set_specs = []
        for at in auto_test_ids:
            # Between steps_per_test - 2 and + 2 steps, always covering every test type.
            target = spec.steps_per_test + rng.randint(-2, 2)
            templates = list(SUITE_TEMPLATES)
            chosen: list[tuple[str, list[tuple[str, str, float]]]] = []
            count = 0
            for suite_name, suite_steps in templates:
                chosen.append((suite_name, list(suite_steps)))
                count += len(suite_steps)
            while count > target and len(chosen[2][1]) > 1:
                chosen[2][1].pop()
                count -= 1
            while count < target:
                extra = rng.randint(1, 99)
                chosen[1][1].append((f"Extra tests #{extra}", "junit_test", 1.0))
                count += 1
            # Two sets: the threshold check separates them, as teachers configure it.
            set_specs.append((at, [chosen[:5], chosen[5:]]))
        n_sets = sum(len(s) for _, s in set_specs)
        n_suites = sum(len(x) for _, s in set_specs for x in s)
        n_steps = sum(len(steps_) for _, s in set_specs for x in s for _, steps_ in x)
        set_id = _reserve_ids(conn, '"AutoTestSet"', n_sets)
        suite_id = _reserve_ids(conn, '"AutoTestSuite"', n_suites)
        step_id = _reserve_ids(conn, '"AutoTestStep"', n_steps)
        for at, at_sets in set_specs:
            ordered: list[dict[str, Any]] = []
            for set_suites in at_sets:
                sets.append((set_id, at, 0.0))
                for suite_name, suite_steps in set_suites:
                    suites.append((suite_id, set_id, None, suite_name != "Input/output", False, 10.0))
                    for order, (step_name, test_type, weight) in enumerate(suite_steps):
                        hidden = step_name.startswith("Hidden")
                        data = {"program": "make run" if test_type != "check_points" else None}
                        if test_type == "check_points":
                            data = {"min_points": 0.6}
                        steps.append((step_id, suite_id, order, step_name, weight, hidden, test_type, json.dumps(data)))
                        ordered.append({"id": step_id, "name": step_name, "type": test_type, "suite": suite_name})
                        step_id += 1
                    suite_id += 1
                set_id += 1
            self.steps_of[at] = ordered
        _copy_rows(conn, "AutoTestSet", ["id", "auto_test_id", "stop_points"], sets)
        _copy_rows(conn, "AutoTestSuite", ["id", "auto_test_set_id", "rubric_row_id", "network_disabled",
                                           "submission_info", "command_time_limit"], suites)
        self.plan.steps = _copy_rows(conn, "AutoTestStep", ["id", "auto_test_suite_id", "order", "name", "weight", "hidden",
                                                            "test_type", "data"], steps)

    def _broker_rows(self) -> None:
        """Jobs for every run; runners working on running runs, idle and stuck ones besides."""
        conn, rng, now = self.conn, self.rng, self.now
        job_id0 = _reserve_ids(conn, "job", len(self.runs))
        jobs, runners, at_runners = [], [], []
        self.runner_of_run: dict[int, list[uuid.UUID]] = {}
        for k, run in enumerate(self.runs):
            job_id = job_id0 + k
            run["job_id"] = job_id
            if not run["running"]:
                state = "finished"
            elif run["waiting"]:
                state = "waiting_for_runner"
            else:
                state = "started"
            created = run["started"] - timedelta(seconds=30)
            updated = now - timedelta(minutes=rng.randint(20, 40)) if state == "waiting_for_runner" else (
                run["started"] + timedelta(minutes=rng.randint(5, 60)) if state == "finished" else now - timedelta(seconds=rng.randint(1, 30)))
            meta = {"assignment_id": run["assignment"]["id"], "run_id": run["id"]}
            jobs.append((job_id, state, CG_URL, str(run["job_uuid"]), json.dumps(meta), 2 if run["running"] else 1, created, updated))
            if state == "started":
                ids = []
                for r in range(2):
                    rid = self.uuid()
                    ip = f"10.0.{k % 250}.{10 + r}"
                    runners.append((rid, ip, "simulated", "running", job_id, run["started"], now - timedelta(seconds=rng.randint(1, 20))))
                    at_runners.append((rid, ip, now - timedelta(seconds=rng.randint(1, 20)), run["job_uuid"], run["id"], run["started"]))
                    ids.append(rid)
                self.runner_of_run[run["id"]] = ids
        # Idle runners while a job waits: the starvation the broker screens detect.
        for r in range(3):
            runners.append((self.uuid(), f"10.1.0.{20 + r}", "simulated", "started", None, now - timedelta(hours=2),
                            now - timedelta(minutes=rng.randint(25, 35))))
        # A runner stuck "assigned" to a finished job, and one long gone.
        finished = [j for j in jobs if j[1] == "finished"]
        if finished:
            runners.append((self.uuid(), "10.1.0.30", "simulated", "assigned", finished[0][0], now - timedelta(hours=3),
                            now - timedelta(hours=1)))
        runners.append((self.uuid(), "10.1.0.31", "simulated", "cleaned", None, now - timedelta(days=2), now - timedelta(days=2)))
        self.plan.jobs = _copy_rows(conn, "job", ["id", "state", "cg_url", "remote_id", "job_metadata", "wanted_runners",
                                                  "created_at", "updated_at"], jobs)
        self.plan.runners = _copy_rows(conn, "runner", ["id", "ipaddr", "type", "state", "job_id", "created_at", "updated_at"], runners)
        _copy_rows(conn, "AutoTestRunner", ["id", "ipaddr", "last_heartbeat", "job_id", "run_id", "created_at"], at_runners)

    # -- works, results, step results ---------------------------------------------------------------

    def _works_results_and_steps(self, students_per_course: int, user_id0: int) -> None:
        conn, rng, spec, plan, now = self.conn, self.rng, self.spec, self.plan, self.now
        # Works: every student of the course who handed in; a few resubmissions leave a deleted one.
        works, results = [], []
        result_plan: list[dict[str, Any]] = []
        # One deleted earlier submission for every j with j % 10 == 3 below: (n + 6) // 10 of them.
        total_works = sum(r["students"] + (r["students"] + 6) // 10 for r in self.runs)
        work_id = _reserve_ids(conn, '"Work"', total_works)
        result_id = _reserve_ids(conn, '"AutoTestResult"', sum(r["students"] for r in self.runs))
        for run in self.runs:
            a = run["assignment"]
            course_users = [user_id0 + a["course"] * students_per_course + s for s in range(students_per_course)]
            count = run["students"]
            takers = [course_users[j % len(course_users)] for j in range(count)]
            for j, user in enumerate(takers):
                submitted = run["started"] - timedelta(hours=rng.randint(1, 72), minutes=rng.randint(0, 59))
                if j % 10 == 3:  # an earlier, deleted submission
                    works.append((work_id, a["id"], user, submitted - timedelta(hours=5), True))
                    work_id += 1
                works.append((work_id, a["id"], user, submitted, False))
                state = self._result_state(run, j, count)
                started = None if state == "not_started" else run["started"] + timedelta(seconds=j * 7 % 3600)
                runner = None
                if state == "running" and self.runner_of_run.get(run["id"]):
                    runner = self.runner_of_run[run["id"]][j % 2]
                setup_out = None if state == "not_started" else "Installing dependencies...\nSetup finished in 3.1s\n"
                setup_err = None if state == "not_started" else ("" if state != "failed" or j % 3 else
                                                                   "pip: error: could not find requirements.txt\n")
                final = state in FINAL_STATES
                results.append((result_id, run["id"], runner, work_id, state, started, setup_out, setup_err, final,
                                submitted, started or submitted))
                result_plan.append({"id": result_id, "state": state, "started": started, "auto_test": a["auto_test_id"],
                                    "skill": rng.random(), "run": run})
                plan.results_by_state[state] = plan.results_by_state.get(state, 0) + 1
                result_id += 1
                work_id += 1
        # The unused reserved work ids are fine (sequences have gaps in real databases too).
        plan.works = _copy_rows(conn, "Work", ["id", "Assignment_id", "User_id", "created_at", "deleted"], works)
        plan.results = _copy_rows(conn, "AutoTestResult", ["id", "auto_test_run_id", "auto_test_runner_id", "work_id", "state",
                                                           "started_at", "setup_stdout", "setup_stderr", "final_result",
                                                           "created_at", "updated_at"], results)
        self.progress(f"{plan.results} results; writing step results and their logs")
        self._step_results(result_plan)

    def _result_state(self, run: dict[str, Any], j: int, count: int) -> str:
        rng = self.rng
        if run["running"]:
            if run["waiting"]:
                return "not_started"
            x = rng.random()
            return "passed" if x < 0.35 else "failed" if x < 0.4 else "running" if x < 0.5 else "not_started"
        x = rng.random()
        if x < 0.75:
            return "passed"
        if x < 0.88:
            return "failed"
        if x < 0.95:
            return "timed_out"
        return "skipped"

    def _step_results(self, result_plan: list[dict[str, Any]]) -> None:
        conn, rng, spec, plan = self.conn, self.rng, self.spec, self.plan
        total = sum(len(self.steps_of[r["auto_test"]]) for r in result_plan)
        sid0 = _reserve_ids(conn, "auto_test_step_result", total)
        # Which step results carry the special logs: big system-log outputs, the 1 MB line, hostile.
        finished_runprogram = []
        sid = sid0
        for r in result_plan:
            for step in self.steps_of[r["auto_test"]]:
                if r["state"] in ("passed", "failed") and step["type"] == "run_program":
                    finished_runprogram.append(sid)
                sid += 1
        special_rng = random.Random(f"{SEED}:{spec.name}:special")
        picks = special_rng.sample(finished_runprogram, min(len(finished_runprogram), len(spec.big_logs) + 6))
        big = dict(zip(picks[: len(spec.big_logs)], spec.big_logs))
        huge_line = picks[len(spec.big_logs)] if len(picks) > len(spec.big_logs) else None
        hostile = set(picks[len(spec.big_logs) + 1:])
        # The biggest log that fits an in-memory upload is moved, so S3 holds a real MB-sized log.
        movable_big = sorted((s for s, size in big.items() if size <= spec.max_moved_bytes), key=lambda s: -big[s])
        move_big = movable_big[0] if movable_big else None
        move_hostile = min(hostile) if hostile else None

        stmt = ("COPY auto_test_step_result (id, auto_test_step_id, auto_test_result_id, state, started_at, log, "
                "attachment_filename, created_at, updated_at) FROM STDIN")
        sid = sid0
        written = 0
        next_report = time.monotonic() + 2
        with conn.cursor() as cur, cur.copy(stmt) as copy:
            buf: list[bytes] = []
            size = 0
            for r in result_plan:
                steps = self.steps_of[r["auto_test"]]
                outcomes = self._step_outcomes(r, steps)
                for index, step in enumerate(steps):
                    state, log = outcomes[index]
                    if sid in big:
                        state = "passed"
                    elif sid == huge_line:
                        state, log = "passed", self.logs.output_log(self.logs.pools["huge_line"][0])
                    elif sid in hostile:
                        state, log = "failed", self.logs.output_log(self.logs.pools["hostile"][0])
                    started = r["started"] + timedelta(seconds=index * 3) if r["started"] and state != "not_started" else None
                    attachment = f"{uuid.UUID(int=rng.getrandbits(128), version=4)}.xml" if (
                        step["type"] == "junit_test" and state in ("passed", "failed")) else None
                    head = [sid, step["id"], r["id"], state, started]
                    tail = [attachment, r["started"] or self.now, (started or self.now) + timedelta(seconds=2)]
                    if sid in big:
                        if buf:
                            copy.write(b"".join(buf))
                            buf, size = [], 0
                        if sid == move_big and self.moved.enabled:
                            data = b"".join(iter_big_log(big[sid], exit_code=0, start_line=sid))
                            self._count_log(sid, len(data), moved=True)
                            self.moved.add(sid, data)
                            copy.write(_copy_line(head + [None] + tail))
                        else:
                            self.progress(f"writing a {big[sid] / 1e6:.1f} MB log (step result {sid})")
                            copy.write(("\t".join(_copy_field(v) for v in head) + "\t").encode())
                            n = 0
                            for piece in iter_big_log(big[sid], exit_code=0, start_line=sid):
                                n += len(piece)
                                copy.write(_copy_escape(piece))
                            copy.write(("\t" + "\t".join(_copy_field(v) for v in tail) + "\n").encode())
                            self._count_log(sid, n, moved=False)
                        sid += 1
                        plan.step_results_by_state["passed"] = plan.step_results_by_state.get("passed", 0) + 1
                        continue
                    plan.step_results_by_state[state] = plan.step_results_by_state.get(state, 0) + 1
                    move = log is not None and self.moved.enabled and len(log) <= spec.max_moved_bytes and (
                        sid == move_hostile or special_rng.random() < spec.moved_fraction)
                    if log is not None:
                        self._count_log(sid, len(log), moved=move)
                    if move:
                        self.moved.add(sid, log)
                        line = _copy_line(head + [None] + tail)
                    elif log is None:
                        line = _copy_line(head + [None] + tail)
                    else:
                        line = (("\t".join(_copy_field(v) for v in head) + "\t").encode() + _copy_escape(log)
                                + ("\t" + "\t".join(_copy_field(v) for v in tail) + "\n").encode())
                    buf.append(line)
                    size += len(line)
                    sid += 1
                    written += 1
                    if size >= 1 << 20:
                        copy.write(b"".join(buf))
                        buf, size = [], 0
                    if time.monotonic() > next_report:
                        self.progress(f"{sid - sid0} of {total} step results written")
                        next_report = time.monotonic() + 2
            if buf:
                copy.write(b"".join(buf))
        plan.step_results = sid - sid0

    def _count_log(self, sid: int, nbytes: int, moved: bool) -> None:
        plan = self.plan
        plan.log_bytes += nbytes
        if not moved:
            plan.logs_inline += 1
        if nbytes > plan.largest_log_bytes:
            plan.largest_log_bytes = nbytes
            plan.largest_log_step_result_id = sid

    def _step_outcomes(self, r: dict[str, Any], steps: list[dict[str, Any]]) -> list[tuple[str, bytes | None]]:
        """(state, log) per step of one result, following the result's state."""
        rng = self.rng
        logs = self.logs
        state = r["state"]
        n = len(steps)
        if state == "not_started":
            return [("not_started", None)] * n
        if state == "skipped":
            return [("skipped", None)] * n
        out: list[tuple[str, bytes | None]] = []
        stop_at = None  # from here on steps are skipped (failed setup / compile, a time-out)
        running_at = None
        if state == "running":
            running_at = rng.randrange(n)
        elif state == "timed_out":
            stop_at = rng.randrange(n)
        elif state == "failed" and rng.random() < 0.5:
            stop_at = 0  # compilation failed; nothing else ran
        skill = r["skill"]
        for i, step in enumerate(steps):
            if running_at is not None:
                if i < running_at:
                    outcome = "passed" if rng.random() < skill + 0.3 else "failed"
                    out.append(logs.for_step(step["type"], outcome, step["name"]))
                elif i == running_at:
                    out.append(("running", logs.running(step["type"])))
                else:
                    out.append(("not_started", None))
                continue
            if stop_at is not None and i > stop_at:
                out.append(("skipped", None))
                continue
            if stop_at is not None and i == stop_at:
                outcome = "timed_out" if state == "timed_out" else "failed"
                if step["type"] == "check_points":
                    outcome = "failed"
                out.append(logs.for_step(step["type"], outcome, step["name"]))
                continue
            outcome = "passed" if rng.random() < skill + 0.3 else "failed"
            out.append(logs.for_step(step["type"], outcome, step["name"]))
        return out


# ------------------------------------------------------------------------------------------------
# Bulk seeding for benchmarks
# ------------------------------------------------------------------------------------------------


def bulk_log(log_bytes: int, *, compressible: bool = True) -> bytes:
    """One run_program log of about ``log_bytes`` bytes.

    compressible: stdout repeats one real output (PostgreSQL's TOAST compresses it well, so the
    data set stays small on disk); otherwise it is system-log text (about 4x compressible).
    """
    if log_bytes <= 80:
        return _json_text({"stdout": "ok\n", "stderr": "", "exit_code": 0, "time_spend": 0.01}).encode()
    if not compressible:
        return b"".join(iter_big_log(log_bytes))
    unit = real_output("pytest_failures_plain")[0]
    head = {"stdout": "", "stderr": "", "exit_code": 1, "time_spend": 1.5}
    overhead = len(_json_text(head).encode())
    escaped_unit = _json_text(unit)[1:-1]
    reps, rest = divmod(max(log_bytes - overhead, 0), len(escaped_unit.encode()))
    body = escaped_unit * reps
    # Fill the remainder with plain characters so the size is close to what was asked.
    body += "." * rest
    return ('{"stdout": "' + body + '", "stderr": "", "exit_code": 1, "time_spend": 1.5}').encode("utf-8")


def seed_bulk(settings: Settings, *, assignments: int, step_results: int, log_bytes: int,
              compressible: bool = True, progress: Progress = None, steps_per_test: int = 10) -> dict[str, Any]:
    """Exactly ``step_results`` step results over ``assignments`` assignments, logs of ~``log_bytes``.

    Same shape as the demo data set (courses, AutoTests with sets/suites/steps, one run per
    assignment, Work rows, results), but every log is the same run_program log, so this is fast:
    the log is encoded once and written with COPY.
    """
    if assignments < 1 or step_results < 1:
        raise AtcError("seed_bulk needs at least one assignment and one step result")
    started = time.monotonic()
    _prepare(settings, progress)
    rng = random.Random(f"{SEED}:bulk")
    now = datetime.now(timezone.utc).replace(microsecond=0)
    log = bulk_log(log_bytes, compressible=compressible)
    log_field = _copy_escape(log)
    results_total = -(-step_results // steps_per_test)
    plan = Plan(scale=f"bulk:{assignments}x{step_results}x{log_bytes}")
    try:
        with connect(settings, autocommit=False, application_suffix="/seed") as conn:
            _seed_session(conn)
            _refuse_if_seeded(conn)
            n_courses = max(1, min(10, assignments // 5))
            course0 = _reserve_ids(conn, '"Course"', n_courses)
            plan.courses = _copy_rows(conn, "Course", ["id", "name"], [(course0 + i, f"Bulk course {i + 1}") for i in range(n_courses)])
            at0 = _reserve_ids(conn, '"AutoTest"', assignments)
            _copy_rows(conn, "AutoTest", ["id"], [(at0 + i,) for i in range(assignments)])
            plan.auto_tests = assignments
            a0 = _reserve_ids(conn, '"Assignment"', assignments)
            states = ("open", "done", "hidden")
            plan.assignments = _copy_rows(conn, "Assignment", ["id", "name", "state", "deadline", "Course_id", "auto_test_id"], [
                (a0 + i, f"Bulk assignment {i + 1}", states[i % 3], now + timedelta(days=(i % 20) - 10), course0 + i % n_courses, at0 + i)
                for i in range(assignments)])
            set0 = _reserve_ids(conn, '"AutoTestSet"', assignments)
            _copy_rows(conn, "AutoTestSet", ["id", "auto_test_id"], [(set0 + i, at0 + i) for i in range(assignments)])
            suite0 = _reserve_ids(conn, '"AutoTestSuite"', assignments)
            _copy_rows(conn, "AutoTestSuite", ["id", "auto_test_set_id"], [(suite0 + i, set0 + i) for i in range(assignments)])
            step0 = _reserve_ids(conn, '"AutoTestStep"', assignments * steps_per_test)
            plan.steps = _copy_rows(conn, "AutoTestStep", ["id", "auto_test_suite_id", "order", "name", "test_type"], [
                (step0 + i * steps_per_test + k, suite0 + i, k, f"Step {k + 1}", TEST_TYPES[k % len(TEST_TYPES)])
                for i in range(assignments) for k in range(steps_per_test)])
            run0 = _reserve_ids(conn, '"AutoTestRun"', assignments)
            plan.runs = _copy_rows(conn, "AutoTestRun", ["id", "auto_test_id", "started_date", "job_id", "batch_run_done"], [
                (run0 + i, at0 + i, now - timedelta(hours=i % 48), uuid.UUID(int=rng.getrandbits(128), version=4), True)
                for i in range(assignments)])
            user0 = _reserve_ids(conn, '"User"', max(1, results_total // assignments + 1))
            n_users = max(1, results_total // assignments + 1)
            plan.users = _copy_rows(conn, "User", ["id", "name", "username"],
                                    [(user0 + u, f"Bulk student {u + 1}", f"bulk{user0 + u}") for u in range(n_users)])
            work0 = _reserve_ids(conn, '"Work"', results_total)
            result0 = _reserve_ids(conn, '"AutoTestResult"', results_total)

            def result_rows() -> Iterator[tuple]:
                for k in range(results_total):
                    i = k % assignments
                    yield (result0 + k, run0 + i, None, work0 + k, "passed" if k % 7 else "failed", now, None, None, True)

            plan.works = _copy_rows(conn, "Work", ["id", "Assignment_id", "User_id"],
                                    ((work0 + k, a0 + k % assignments, user0 + (k // assignments) % n_users) for k in range(results_total)))
            plan.results = _copy_rows(conn, "AutoTestResult", ["id", "auto_test_run_id", "auto_test_runner_id", "work_id", "state",
                                                               "started_at", "setup_stdout", "setup_stderr", "final_result"], result_rows())
            sid0 = _reserve_ids(conn, "auto_test_step_result", step_results)
            stamp = _copy_field(now).encode()
            stmt = ("COPY auto_test_step_result (id, auto_test_step_id, auto_test_result_id, state, started_at, log) FROM STDIN")
            next_report = time.monotonic() + 2
            with conn.cursor() as cur, cur.copy(stmt) as copy:
                buf: list[bytes] = []
                size = 0
                for n in range(step_results):
                    k, step_index = divmod(n, steps_per_test)
                    i = k % assignments
                    line = b"%d\t%d\t%d\t%s\t%s\t%s\n" % (sid0 + n, step0 + i * steps_per_test + step_index, result0 + k,
                                                          b"passed" if n % 5 else b"failed", stamp, log_field)
                    buf.append(line)
                    size += len(line)
                    if size >= 4 << 20:
                        copy.write(b"".join(buf))
                        buf, size = [], 0
                    if progress and time.monotonic() > next_report:
                        progress(f"{n} of {step_results} step results written")
                        next_report = time.monotonic() + 2
                if buf:
                    copy.write(b"".join(buf))
            plan.step_results = step_results
            plan.logs_inline = step_results
            plan.log_bytes = step_results * len(log)
            plan.largest_log_bytes = len(log)
            plan.s3 = "skipped: bulk seeding keeps every log in PostgreSQL"
            conn.commit()
            conn.autocommit = True
            conn.execute("ANALYZE")
    except psycopg.Error as exc:
        raise translate_error(exc, "bulk seeding") from None
    plan.seconds = round(time.monotonic() - started, 2)
    return plan.as_dict()


__all__ = ["SCALES", "Scale", "seed_demo", "seed_bulk", "bulk_log", "iter_big_log", "real_output", "real_output_names",
           "LogFactory", "HOSTILE_STDOUT", "DatabaseError"]

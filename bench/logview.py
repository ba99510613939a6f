"""Benchmark: opening a 500 MB log in the viewer's model (console.logview), inline and in S3.

Starts embedded PostgreSQL and S3 in a temporary directory, stores one JSON log of SIZE_MB
(run_program shape, a pytest-like stdout with colour, a marker near the end), inline in a row
and as an S3 object with its atc.moved_log pointer, then measures for each location:

- time to the first 40 display lines (raw and the decoded ``stdout`` part); for the inline log
  with the head read from the TOAST chunks (the viewer's path) and without it (the stream alone,
  the previous behaviour, measured in the same run),
- time until the end is reachable (spool complete; for S3 and for an uncompressed inline log also
  the tail preview: ranged GET / last TOAST chunks),
- a forward search for the marker near the end of ``stdout`` (after it is decoded),
- peak RSS of this process (VmHWM) after each run,

against baselines measured in the same run: ``COPY (SELECT log ...) TO STDOUT`` of the same
value to /dev/null via psycopg, a plain boto3 ``download_fileobj`` to /dev/null, and the SQL
prefix ``substr(log::text, 1, 262144)`` (which de-TOASTs the whole value: json has no binary cast
to text). A second inline log of incompressible text (stored uncompressed) measures the head and
the tail of an uncompressed value.

    python3 bench/logview.py [--size-mb 500]

Results go to stdout; docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from console.config import settings_from_mapping  # noqa: E402
from console.db import Database  # noqa: E402
from console.embedded import EmbeddedPostgres, EmbeddedS3  # noqa: E402
import console.logview as logview  # noqa: E402
from console.logview import open_log  # noqa: E402
from console.schema import install_reference_schema, upgrade  # noqa: E402
from console.storage import ObjectStore  # noqa: E402


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def make_log(size_mb: int) -> bytes:
    line = "tests/test_mod.py::test_case[%08d] \x1b[32mPASSED\x1b[0m  [ 42%%]\n"
    count = size_mb * 1024 * 1024 // (len(line % 0) + 10)
    body = "".join(line % i for i in range(count - 1000)) + "MARKER near the end\n" + "".join(line % i for i in range(1000))
    return json.dumps({"stdout": body, "stderr": "", "exit_code": 0, "time_spend": 12.5}).encode()


def make_incompressible_log(size_mb: int) -> bytes:
    import random

    rng = random.Random(1)
    alphabet = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)] + [chr(c) for c in range(33, 126) if chr(c) not in '"\\']
    block = "".join(rng.choices(alphabet, k=1 << 20)) + "\n"
    parts, n = [], 0
    while n < size_mb * 1024 * 1024:
        k = rng.randrange(1 << 19)
        parts.append(block[k:] + block[:k])
        n += len(parts[-1].encode())
    return json.dumps({"stdout": "".join(parts) + "\nMARKER near the end\n" + block[:5000], "exit_code": 0},
                      ensure_ascii=False).encode()


def measure(name: str, db, store, sid: int, *, head: bool = True) -> dict:
    import console.logstore as logstore

    saved = logview.read_db_log_head, logstore._COPY_LOG_SEND
    if not head:  # the previous behaviour: the COPY stream alone, from log::text
        logview.read_db_log_head = lambda *args: None
        logstore._COPY_LOG_SEND = logstore._COPY_LOG
    try:
        return _measure(name, db, store, sid)
    finally:
        logview.read_db_log_head, logstore._COPY_LOG_SEND = saved


def _measure(name: str, db, store, sid: int) -> dict:
    reset_hwm()
    t0 = time.perf_counter()
    log = open_log(db, store, sid)
    log.wait_for_lines(40, timeout=30)
    first_raw = log.raw.lines(0, 40)
    t_first = time.perf_counter() - t0
    while log.part("stdout") is None or log.part("stdout").line_count < 40:
        time.sleep(0.001)
    t_known_size = log.known_size
    stdout = log.part("stdout")
    stdout.lines(0, 40)
    t_first_stdout = time.perf_counter() - t0
    t_tail = None
    if log.can_preview_tail:
        t1 = time.perf_counter()
        tail = log.tail_preview(40)
        t_tail = time.perf_counter() - t1
        assert tail
    log.wait(600)
    t_end = time.perf_counter() - t0
    last = log.raw.lines(log.raw.line_count - 1, 1)
    assert first_raw and last
    log.wait(600, parts=True)
    t_parts = time.perf_counter() - t0
    t2 = time.perf_counter()
    hit = stdout.find(b"MARKER near", 0)
    line = stdout.line_at_offset(hit)
    t_search = time.perf_counter() - t2
    assert stdout.lines(line, 1)[0].data == b"MARKER near the end"
    t3 = time.perf_counter()
    stdout.lines(stdout.line_count - 40, 40)
    t_jump = time.perf_counter() - t3
    result = {
        "where": name, "bytes": log.raw.length, "head_bytes": log.head_size,
        "size_known_at_first_lines": t_known_size,
        "first_lines_raw_s": t_first, "first_lines_stdout_s": t_first_stdout,
        "tail_preview_s": t_tail, "spooled_s": t_end, "parts_decoded_s": t_parts,
        "search_near_end_s": t_search, "jump_to_end_window_s": t_jump,
        "checkpoints": len(log.raw.index.offsets) + len(stdout.index.offsets),
        "stdout_lines": stdout.line_count, "peak_rss_mb": vm_hwm_mb(),
    }
    log.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=500)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="atc-bench-logview-"))
    pg = EmbeddedPostgres(work / "pg").start(tie_to_parent=True)
    s3 = EmbeddedS3(work / "s3", bucket="bench").start(tie_to_parent=True)
    try:
        creds = s3.aws_credentials_file("bench")
        settings = settings_from_mapping({
            "operator": "bench",
            "database": {"dsn": pg.dsn("postgres"), "statement_timeout": "60s"},
            "s3": {"endpoint_url": s3.endpoint_url, "bucket": s3.bucket, "region": "us-east-1",
                   "profile": "bench", "credentials_file": str(creds), "prefix": "bench/"},
        }, source="(bench)")
        import psycopg

        with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
            install_reference_schema(conn)
        upgrade(settings)
        from tests.log_support import LogFactory

        raw = make_log(args.size_mb)
        print(f"log: {len(raw) / 1e6:.0f} MB", flush=True)
        factory = LogFactory(settings)
        inline_id = factory.inline(raw)
        moved_id = factory.moved(raw)
        del raw
        flat = make_incompressible_log(args.size_mb)
        flat_id = factory.inline(flat)
        print(f"incompressible log: {len(flat) / 1e6:.0f} MB", flush=True)
        del flat
        for sid in (inline_id, flat_id):
            print(sid, factory.conn.execute("SELECT pg_column_size(log), pg_column_compression(log)"
                                            " FROM auto_test_step_result WHERE id = %s", (sid,)).fetchone())
        factory.close()
        db = Database(settings)
        store = ObjectStore(settings)

        # Baselines, same run: plain COPY to /dev/null, plain boto3 download to /dev/null.
        reset_hwm()
        t0 = time.perf_counter()
        with db.connection() as conn, open(os.devnull, "wb") as sink:
            conn.execute("SET statement_timeout = 0")
            with conn.cursor().copy(f"COPY (SELECT log FROM auto_test_step_result WHERE id = {inline_id}) TO STDOUT") as copy:
                for block in copy:
                    sink.write(block)
            conn.execute("RESET statement_timeout")
        copy_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with open(os.devnull, "wb") as sink:
            store.client.download_fileobj(store.bucket, store.log_key(moved_id), sink)
        boto_s = time.perf_counter() - t0
        print(f"baseline COPY TO STDOUT: {copy_s:.2f}s; boto3 download_fileobj: {boto_s:.2f}s; peak RSS {vm_hwm_mb():.0f} MB")
        for sid in (inline_id, flat_id):
            t0 = time.perf_counter()
            db.fetch_one("SELECT octet_length(convert_to(substr(log::text, 1, 262144), 'UTF8')) AS n"
                         " FROM auto_test_step_result WHERE id = %s", (sid,))
            print(f"SQL prefix substr(log::text, 1, 262144) of {sid}: {time.perf_counter() - t0:.2f}s", flush=True)

        runs = (("db (stream only, before)", inline_id, copy_s, False), ("db", inline_id, copy_s, True),
                ("db uncompressed", flat_id, copy_s, True), ("s3", moved_id, boto_s, True))
        for name, sid, baseline, head in runs:
            r = measure(name, db, store, sid, head=head)
            r["baseline_s"] = baseline
            r["spooled_vs_baseline"] = r["spooled_s"] / baseline
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
        db.close()
    finally:
        pg.stop()
        s3.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: migration throughput vs a plain boto3 upload of the same bytes, and peak memory.

Starts its own embedded PostgreSQL and SeaweedFS on loopback (in a temp dir), then:

(a) 200 logs of 5 MB and (b) 20,000 logs of 20 KB: each first uploaded with plain boto3
    ``put_object`` from memory (same bucket, same concurrency, a thread per upload slot), then
    migrated with ``console.migrate.migrate_logs`` (stream out of PostgreSQL, SHA-256, upload,
    read back and verify, guarded pointer swap). Ratio = migrate MB/s / plain upload MB/s.
    Goals: >= 0.8 for (a), >= 0.5 for (b).
(c) one 500 MB log migrated by `atc migrate-logs` in a subprocess; its peak RSS from wait4().
    Goal: < 150 MB.

Usage: python3 bench/migrate.py [--scale 1.0] [--concurrency 4] [--skip-rss]
(--scale shrinks the counts for a quick run; figures in docs/benchmarks.md come from scale 1.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from console.config import settings_from_mapping  # noqa: E402
from console.db import Database  # noqa: E402
from console.embedded import EmbeddedPostgres, EmbeddedS3  # noqa: E402
from console.migrate import MigrationOptions, migrate_logs  # noqa: E402
from console.schema import install_reference_schema, upgrade  # noqa: E402
from console.storage import ObjectStore  # noqa: E402
from migrate_support import seed_world, write_config  # noqa: E402


def make_log(i: int, size: int) -> bytes:
    """A JSON log of exactly `size` bytes whose output is hard to compress (like real mixed output)."""
    rnd = random.Random(i)
    head = '{"stdout": "'
    tail = f'", "stderr": "", "exit_code": {i % 3}, "points": 1}}'
    body_len = size - len(head) - len(tail)
    body = rnd.randbytes(body_len // 2 + 1).hex()[:body_len]
    return (head + body + tail).encode()


def seed(settings, count: int, size: int, batch: int = 2000) -> int:
    total = 0
    done = 0
    while done < count:
        n = min(batch, count - done)
        logs = [make_log(done + k, size) for k in range(n)]
        seed_world(settings, logs)
        total += sum(len(x) for x in logs)
        done += n
    with psycopg.connect(settings.database.dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE auto_test_step_result")
    return total


def plain_upload(store: ObjectStore, count: int, size: int, concurrency: int, prefix: str) -> tuple[float, int]:
    client = store.client

    def put(i: int) -> int:
        data = make_log(i, size)
        client.put_object(Bucket=store.bucket, Key=f"{prefix}{i}.json", Body=data)
        return len(data)

    # Build the bytes outside the timed region would need them all in memory at once for (a);
    # generating per upload costs the same in both arms (migrate's seed did it too), so time only
    # the upload by subtracting a generation-only pass.
    started = time.perf_counter()
    for i in range(min(count, 50)):
        make_log(i, size)
    gen_per_log = (time.perf_counter() - started) / min(count, 50)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        total = sum(pool.map(put, range(count)))
    elapsed = time.perf_counter() - started - gen_per_log * count / concurrency
    return elapsed, total


def scenario(name: str, pg, s3, creds, count: int, size: int, concurrency: int) -> dict:
    dbname = f"bench_{name}"
    pg.create_database(dbname)
    settings = settings_from_mapping({
        "operator": "bench",
        "database": {"dsn": pg.dsn(dbname), "statement_timeout": "60s"},
        "s3": {"endpoint_url": s3.endpoint_url, "bucket": s3.bucket, "region": "us-east-1",
               "prefix": f"bench/{name}/", "profile": "bench", "credentials_file": str(creds)},
    })
    with psycopg.connect(settings.database.dsn, autocommit=True) as conn:
        install_reference_schema(conn)
    upgrade(settings)
    t0 = time.perf_counter()
    total = seed(settings, count, size)
    print(f"[{name}] seeded {count} logs, {total / 1e6:.0f} MB in {time.perf_counter() - t0:.0f}s", flush=True)
    store = ObjectStore(settings)
    store.check()
    base_elapsed, base_total = plain_upload(store, count, size, concurrency, f"bench/{name}-baseline/")
    base_rate = base_total / base_elapsed
    print(f"[{name}] plain boto3 upload: {base_rate / 1e6:.1f} MB/s ({base_elapsed:.1f}s)", flush=True)
    db = Database(settings)
    started = time.perf_counter()
    stats = migrate_logs(settings, db, store, MigrationOptions(min_size=0, concurrency=concurrency))
    elapsed = time.perf_counter() - started
    db.close()
    assert stats.moved_logs == count and stats.failed == 0, stats.snapshot()
    rate = stats.moved_bytes / elapsed
    print(f"[{name}] migrate: {rate / 1e6:.1f} MB/s ({elapsed:.1f}s), {count / elapsed:.0f} logs/s; "
          f"ratio {rate / base_rate:.2f}", flush=True)
    return {"scenario": name, "logs": count, "log_bytes": size, "total_mb": round(total / 1e6, 1),
            "concurrency": concurrency, "plain_upload_mb_s": round(base_rate / 1e6, 1),
            "migrate_mb_s": round(rate / 1e6, 1), "migrate_logs_s": round(count / elapsed, 1),
            "ratio": round(rate / base_rate, 2)}


def rss_scenario(pg, s3, creds, tmp: Path, size: int) -> dict:
    dbname = "bench_rss"
    pg.create_database(dbname)
    settings = settings_from_mapping({
        "operator": "bench",
        "database": {"dsn": pg.dsn(dbname), "statement_timeout": "300s"},
        "s3": {"endpoint_url": s3.endpoint_url, "bucket": s3.bucket, "region": "us-east-1",
               "prefix": "bench/rss/", "profile": "bench", "credentials_file": str(creds)},
    })
    with psycopg.connect(settings.database.dsn, autocommit=True) as conn:
        install_reference_schema(conn)
    upgrade(settings)
    log = make_log(7, size)
    seed_world(settings, [log])
    del log
    config = write_config(settings, tmp / "rss.toml")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "console", "--config", str(config), "migrate-logs",
                             "--min-size", "1MB", "--json", "--no-progress"], cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Peak from the child's own VmHWM (its address space's high-water mark since exec), sampled
    # until it exits. wait4()'s ru_maxrss is not used: Linux folds the pre-exec (forked copy of
    # this process, which held the 500 MB log while seeding) high-water mark into it.
    hwm_kb = 0
    status_path = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status_path.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm_kb = max(hwm_kb, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    out, err = proc.communicate()
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"rss run failed: {err.decode()[-500:]}")
    stats = json.loads(out)
    peak_mb = hwm_kb / 1024
    print(f"[rss] one {size / 1e6:.0f} MB log: peak RSS {peak_mb:.0f} MB, {elapsed:.1f}s "
          f"({stats['moved_bytes'] / elapsed / 1e6:.0f} MB/s incl. start-up)", flush=True)
    return {"scenario": "rss", "log_mb": round(size / 1e6), "peak_rss_mb": round(peak_mb), "seconds": round(elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--only", choices=["a", "b", "rss"])
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="atc-bench-migrate-"))
    pg = EmbeddedPostgres(tmp / "pg").start(tie_to_parent=True)
    s3 = EmbeddedS3(tmp / "s3", bucket="bench").start(tie_to_parent=True)
    creds = s3.aws_credentials_file("bench")
    results = []
    try:
        if args.only in (None, "a"):
            results.append(scenario("a_5mb", pg, s3, creds, max(1, int(200 * args.scale)), 5 * 1024 * 1024, args.concurrency))
        if args.only in (None, "b"):
            results.append(scenario("b_20kb", pg, s3, creds, max(1, int(20_000 * args.scale)), 20 * 1024, args.concurrency))
        if args.only in (None, "rss") and not args.skip_rss:
            results.append(rss_scenario(pg, s3, creds, tmp, int(500 * 1024 * 1024 * min(1.0, args.scale))))
    finally:
        s3.stop()
        pg.stop()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

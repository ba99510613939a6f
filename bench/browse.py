"""Benchmark: every list query of the browse screens, tiny logs vs 1 MB logs, plus start-up time.

On a private embedded PostgreSQL:
1. seeds two databases with the SAME row counts (``console.seed.seed_bulk``): one with tiny logs,
   one with ~1 MB logs (``--ratio-step-results``, default 20k: 1 MB x 1M rows would be a terabyte);
   times each list query (median of ``--rounds`` after a warm-up) on both and prints big/tiny
   (goal <= 1.2);
2. seeds ``--step-results`` (default 1M) step results with tiny logs (the heaviest heap: logs
   inline) and prints the absolute times (goal < 20 ms each);
3. times ``atc`` from process start to the first painted assignments screen (headless Textual,
   fresh interpreter, goal < 1.5 s) and checks that boto3 was not imported on the way.

The second, cancellable per-page query (live log bytes of the assignments on screen) is timed too
and reported separately: it is not a list query and runs after the page has painted.

Run: python3 bench/browse.py [--step-results 1000000] [--ratio-step-results 20000] [--rounds 21] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from console import browse  # noqa: E402
from console.config import settings_from_mapping  # noqa: E402
from console.db import Database  # noqa: E402
from console.embedded import EmbeddedPostgres  # noqa: E402
from console.seed import seed_bulk  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def seeded(pg: EmbeddedPostgres, name: str, *, assignments: int, step_results: int, log_bytes: int):
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    settings = settings_from_mapping({
        "operator": "bench",
        "database": {"dsn": pg.dsn(name), "statement_timeout": "0", "lock_timeout": "5s"},
    }, source="(bench)")
    started = time.monotonic()
    seed_bulk(settings, assignments=assignments, step_results=step_results, log_bytes=log_bytes,
              progress=lambda m: log(f"{name}: {m}"))
    with psycopg.connect(pg.dsn(name), autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")  # visibility map for index-only scans, as on a live system
        size = conn.execute("SELECT pg_total_relation_size('auto_test_step_result')").fetchone()[0]
    log(f"{name}: seeded {step_results} step results in {time.monotonic() - started:.0f}s, table {size / 2**20:.0f} MiB")
    return settings, size


def timed(fn, rounds: int) -> float:
    fn()  # warm-up (plans, caches)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def query_suite(settings, page_size: int = 100):
    """The queries the screens run, on realistic targets: the first and second page of
    assignments (every sort), the runs of the biggest assignment, the first page of results of
    its run, the steps of one result."""
    db = Database(settings)
    first = browse.list_assignments(db, limit=page_size)
    assignment = first.rows[0]
    run = browse.list_runs(db, assignment["id"]).rows[0]
    result = browse.list_results(db, run["id"], limit=page_size).rows[0]
    result_page = browse.list_results(db, run["id"], limit=page_size)
    suite = {}
    for sort in browse.sort_names("assignments"):
        suite[f"assignments sort={sort}"] = lambda s=sort: browse.list_assignments(db, sort=s, limit=page_size)
    if first.next_after is not None:
        suite["assignments page 2"] = lambda: browse.list_assignments(db, after=first.next_after, limit=page_size)
    suite["assignments search"] = lambda: browse.list_assignments(db, search="assignment 7", limit=page_size)
    suite["runs of assignment"] = lambda: browse.list_runs(db, assignment["id"], limit=page_size)
    for sort in browse.sort_names("results"):
        suite[f"results sort={sort}"] = lambda s=sort: browse.list_results(db, run["id"], sort=s, limit=page_size)
    if result_page.next_after is not None:
        suite["results page 2"] = lambda: browse.list_results(db, run["id"], after=result_page.next_after, limit=page_size)
    suite["results state=failed"] = lambda: browse.list_results(db, run["id"], state="failed", limit=page_size)
    suite["steps of result"] = lambda: browse.list_steps(db, result["id"], limit=page_size)
    suite["steps sort=size"] = lambda: browse.list_steps(db, result["id"], sort="size", limit=page_size)
    ids = [r["id"] for r in first.rows]
    second = {"log bytes of a page (2nd query)": lambda: browse.compute_assignment_log_bytes(db, ids)}
    return db, suite, second


def measure(settings, rounds: int) -> dict[str, float]:
    db, suite, second = query_suite(settings)
    try:
        out = {name: timed(fn, rounds) for name, fn in suite.items()}
        out.update({name: timed(fn, max(3, rounds // 4)) for name, fn in second.items()})
        return out
    finally:
        db.close()


STARTUP_SCRIPT = textwrap.dedent("""
    import sys, time, asyncio
    t0 = float(sys.argv[2])
    from console.config import load_settings
    from screens.app import AtcApp
    from screens.widgets import PagedTable
    settings = load_settings(sys.argv[1])
    async def main():
        app = AtcApp(settings)
        async with app.run_test(size=(120, 36)) as pilot:
            while True:
                await pilot.pause(0.005)
                tables = app.screen.query(PagedTable)
                if tables and tables.first().row_count > 0:
                    break
            print(time.time() - t0, "boto3" in sys.modules)
    asyncio.run(main())
""")


def startup(settings, tmp: Path, rounds: int = 5) -> tuple[float, bool]:
    config = tmp / "atc.toml"
    config.write_text(f'operator = "bench"\n[database]\ndsn = "{settings.database.dsn}"\n', encoding="utf-8")
    samples, boto = [], False
    for _ in range(rounds):
        proc = subprocess.run([sys.executable, "-c", STARTUP_SCRIPT, str(config), repr(time.time())],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        if proc.returncode != 0:
            raise SystemExit(f"start-up run failed: {proc.stderr.strip().splitlines()[-1:]}")
        seconds, boto_loaded = proc.stdout.split()
        samples.append(float(seconds))
        boto = boto or boto_loaded == "True"
    return statistics.median(samples), boto


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-results", type=int, default=1_000_000, help="rows for the absolute timings (tiny logs)")
    parser.add_argument("--ratio-step-results", type=int, default=20_000, help="rows for the tiny vs 1 MB comparison")
    parser.add_argument("--assignments", type=int, default=0, help="default: step results / 2000 (min 20)")
    parser.add_argument("--big-log-bytes", type=int, default=1 << 20)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="atc-bench-browse-"))
    pg = EmbeddedPostgres(tmp / "pg").start(tie_to_parent=True)
    try:
        n_ratio = args.ratio_step_results
        a_ratio = args.assignments or max(20, n_ratio // 2000)
        tiny, tiny_size = seeded(pg, "tiny", assignments=a_ratio, step_results=n_ratio, log_bytes=40)
        big, big_size = seeded(pg, "big", assignments=a_ratio, step_results=n_ratio, log_bytes=args.big_log_bytes)
        t_tiny = measure(tiny, args.rounds)
        t_big = measure(big, args.rounds)
        n_abs = args.step_results
        if n_abs == n_ratio:
            abs_settings, t_abs = tiny, t_tiny
        else:
            abs_settings, _ = seeded(pg, "large", assignments=args.assignments or max(20, n_abs // 2000),
                                     step_results=n_abs, log_bytes=40)
            t_abs = measure(abs_settings, args.rounds)
        start_s, boto = startup(abs_settings, tmp)
    finally:
        pg.stop()

    rows = []
    for name in t_tiny:
        rows.append({"query": name, "tiny_ms": round(t_tiny[name], 2), "big_ms": round(t_big[name], 2),
                     "ratio": round(t_big[name] / t_tiny[name], 2) if t_tiny[name] else None,
                     "abs_ms": round(t_abs[name], 2)})
    list_rows = [r for r in rows if "2nd query" not in r["query"]]
    report = {
        "ratio_step_results": n_ratio, "abs_step_results": n_abs, "assignments": a_ratio,
        "tiny_table_mib": round(tiny_size / 2**20), "big_table_mib": round(big_size / 2**20),
        "queries": rows,
        "max_ratio": max(r["ratio"] for r in list_rows),
        "max_abs_ms": max(r["abs_ms"] for r in list_rows),
        "startup_s": round(start_s, 3), "boto3_imported_at_startup": boto,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'query':38} {'tiny ms':>9} {'1MB ms':>9} {'ratio':>6} {f'@{n_abs} ms':>12}")
    for r in rows:
        print(f"{r['query']:38} {r['tiny_ms']:9.2f} {r['big_ms']:9.2f} {r['ratio']:6.2f} {r['abs_ms']:12.2f}")
    print(f"max ratio big/tiny (list queries): {report['max_ratio']} (goal <= 1.2); "
          f"max list query at {n_abs} step results: {report['max_abs_ms']} ms (goal < 20)")
    print(f"start-up to first painted assignments: {start_s:.2f} s (goal < 1.5 s); boto3 imported: {boto}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: one atc lock snapshot vs pg_activity's waiting + blocking queries, same server, same run.

Setup (on a private embedded PostgreSQL, max_connections=400):
- 300 application sessions: advisory-lock holders (idle, ~20k advisory locks between them),
  row-lock holders idle in transaction (SELECT ... FOR UPDATE), row waiters (two per row: one on
  the transaction id, one on the tuple lock), advisory waiters, and one waiter behind a
  non-conflicting holder;
- then, alternately, N times each: atc's full refresh (``console.locks.take_snapshot``: sessions,
  pg_blocking_pids, the pg_locks aggregate and details, row-key lookups, tree) and pg_activity's
  two queries for its waiting and blocking views (its own SQL from its installed package,
  formatted and executed the way pg_activity does: prepared, duration column query_start).

pg_activity is installed with pip into this interpreter if missing (benchmark only; it is not a
project dependency). Prints a table and, with --json, the figures. Goal: atc <= pg_activity and
< 100 ms. Run: python3 bench/locks.py [--rounds 30] [--sessions 300] [--locks 20000]
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from console.config import settings_from_mapping  # noqa: E402
from console.db import Database  # noqa: E402
from console.embedded import EmbeddedPostgres  # noqa: E402
from console.locks import take_snapshot  # noqa: E402
from console.schema import install_reference_schema, upgrade  # noqa: E402


def pg_activity_queries():
    try:
        queries = importlib.import_module("pgactivity.queries")
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "pg_activity"], check=True)
        queries = importlib.import_module("pgactivity.queries")
    import pgactivity

    return queries, getattr(pgactivity, "__version__", "?")


def build_world(pg: EmbeddedPostgres, dbname: str, sessions: int, locks: int) -> tuple[list[psycopg.Connection], dict]:
    dsn = pg.dsn(dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        install_reference_schema(conn)
        conn.execute("INSERT INTO job (cg_url, remote_id) SELECT 'http://cg', 'r' || g FROM generate_series(1, 2000) g")
    conns: list[psycopg.Connection] = []

    def connect(name: str, autocommit: bool = True) -> psycopg.Connection:
        c = psycopg.connect(dsn, autocommit=autocommit, application_name=name)
        conns.append(c)
        return c

    row_holders = 30
    row_waiters = 2 * row_holders            # two per row: xid waiter then tuple waiter
    advisory_waiters = 20
    odd = 3                                  # LOCK TABLE SHARE holder, plain reader, blocked writer
    advisory_holders = max(1, sessions - row_holders - row_waiters - advisory_waiters - odd)
    per_holder = max(1, locks // advisory_holders)

    key = 0
    for i in range(advisory_holders):
        c = connect(f"app-advisory-{i}")
        c.execute("SELECT pg_advisory_lock(k) FROM generate_series(%s::bigint, %s::bigint) k",
                  (key + 1, key + per_holder))
        key += per_holder
    for i in range(row_holders):
        c = connect(f"app-rows-{i}", autocommit=False)
        c.execute("SELECT id FROM job WHERE id BETWEEN %s AND %s FOR UPDATE", (i * 10 + 1, i * 10 + 5))
    share = connect("app-share", autocommit=False)
    share.execute("LOCK TABLE runner IN SHARE MODE")
    reader = connect("app-reader", autocommit=False)
    reader.execute("SELECT count(*) FROM runner")

    def send(c: psycopg.Connection, text: str) -> None:
        c.pgconn.send_query(text.encode())   # returns at once; the session waits server-side

    def wait_for(count: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as probe:
            deadline = time.monotonic() + 60
            while probe.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0] < count:
                if time.monotonic() > deadline:
                    raise SystemExit("waiters did not queue up")
                time.sleep(0.05)

    for i in range(row_holders):
        send(connect(f"app-xid-waiter-{i}"), f"UPDATE job SET state = 'started' WHERE id = {i * 10 + 1}")
    wait_for(row_holders)
    for i in range(row_holders):
        send(connect(f"app-tuple-waiter-{i}"), f"UPDATE job SET state = 'finished' WHERE id = {i * 10 + 1}")
    for i in range(advisory_waiters):
        send(connect(f"app-advisory-waiter-{i}"), f"SELECT pg_advisory_lock({1 + i * per_holder})")
    send(connect("app-writer"), "UPDATE runner SET state = 'running'")
    waiting = row_waiters + advisory_waiters + 1
    wait_for(waiting)
    with psycopg.connect(dsn, autocommit=True) as probe:
        n_sessions = probe.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'").fetchone()[0]
        n_locks = probe.execute("SELECT count(*) FROM pg_locks").fetchone()[0]
    facts = {"sessions": n_sessions, "locks": n_locks, "waiting": waiting,
             "advisory_holders": advisory_holders, "advisory_locks_each": per_holder,
             "non_conflicting_reader_pid": reader.info.backend_pid}
    return conns, facts


def timed(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def screenshot(path: Path) -> None:
    """Save an SVG of the lock screen during a real block (for docs/locks.md)."""
    import asyncio
    from dataclasses import replace

    from screens.app import AtcApp
    from screens.locks import LocksScreen

    with tempfile.TemporaryDirectory(prefix="atc-shot-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pg").start(tie_to_parent=True)
        conns: list[psycopg.Connection] = []
        try:
            pg.create_database("codegrade")
            dsn = pg.dsn("codegrade")
            with psycopg.connect(dsn, autocommit=True) as conn:
                install_reference_schema(conn)
                conn.execute("INSERT INTO job (cg_url, remote_id, job_metadata) SELECT 'https://cg.example', "
                             "'run-' || g, jsonb_build_object('assignment_id', g) FROM generate_series(1, 20) g")
            settings = settings_from_mapping({"operator": "oncall", "database": {"dsn": dsn},
                                              "ui": {"refresh_interval": 0.5}})
            upgrade(settings)

            def session(name: str, *statements: str, autocommit: bool = False) -> psycopg.Connection:
                c = psycopg.connect(dsn, autocommit=autocommit, application_name=name)
                conns.append(c)
                for st in statements:
                    c.execute(st)
                return c

            def send(c: psycopg.Connection, text: str) -> None:
                c.pgconn.send_query(text.encode())

            def wait_for(n: int) -> None:
                with psycopg.connect(dsn, autocommit=True) as probe:
                    while probe.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0] < n:
                        time.sleep(0.05)

            session("codegrade-web", "SELECT id, state FROM job WHERE id = 3 FOR UPDATE")
            send(session("broker", "SELECT id FROM job WHERE id = 7 FOR UPDATE"),
                 "UPDATE job SET state = 'started', updated_at = now() WHERE id = 3")
            wait_for(1)
            send(session("codegrade-web"), "UPDATE job SET wanted_runners = 4 WHERE id = 3")
            wait_for(2)
            send(session("runner-17"), "UPDATE job SET state = 'finished' WHERE id = 7")
            wait_for(3)
            session("broker-dispatch", "SELECT pg_advisory_lock(4242)", autocommit=True)
            send(session("runner-21", autocommit=True), "SELECT pg_advisory_lock(4242) /* dispatch */")
            wait_for(4)
            time.sleep(1.5)      # let the transaction ages read like an incident, not like zero

            async def run() -> None:
                app = AtcApp(settings, start_mode="locks")
                async with app.run_test(size=(160, 38)) as pilot:
                    for _ in range(200):
                        await pilot.pause(0.05)
                        if isinstance(app.screen, LocksScreen) and app.screen.tree.row_count >= 6:
                            break
                    app.screen.tree.move_cursor(row=0)
                    await pilot.pause(0.3)
                    app.save_screenshot(filename=path.name, path=str(path.parent))

            asyncio.run(run())
        finally:
            for c in conns:
                try:
                    c.close()
                except Exception:
                    pass
            pg.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshot", type=Path, help="only save an SVG of the lock screen during a real block")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--locks", type=int, default=20000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.screenshot:
        screenshot(args.screenshot.resolve())
        print(f"saved {args.screenshot}")
        return 0

    queries, pga_version = pg_activity_queries()
    with tempfile.TemporaryDirectory(prefix="atc-bench-locks-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pg", max_connections=400).start(tie_to_parent=True)
        try:
            pg.create_database("bench")
            conns, facts = build_world(pg, "bench", args.sessions, args.locks)
            settings = settings_from_mapping({"operator": "bench", "database": {"dsn": pg.dsn("bench")}})
            upgrade(settings)
            db = Database(settings)

            pga_conn = psycopg.connect(pg.dsn("bench"), autocommit=True, row_factory=dict_row,
                                       application_name="pg_activity")
            fmt = dict(dbname_filter=sql.NULL, duration_column=sql.Identifier("query_start"),
                       min_duration=sql.Literal(0.0))
            waiting_q = sql.SQL(queries.get("get_waiting_post_090200")).format(**fmt)
            blocking_q = sql.SQL(queries.get("get_blocking_post_090600")).format(**fmt)
            params = {"min_duration": 0.0, "dbname_filter": None}

            def pga_waiting():
                return pga_conn.execute(waiting_q, params, prepare=True).fetchall()

            def pga_blocking():
                return pga_conn.execute(blocking_q, params, prepare=True).fetchall()

            # Warm both (plans, caches), and check what each names as a blocker.
            snap = take_snapshot(db)
            blocking_rows = pga_blocking()
            pga_waiting()
            atc_blockers = {pid for (pid, _) in snap.edges()}
            pga_blockers = {r["pid"] for r in blocking_rows}

            atc_ms, pga_w_ms, pga_b_ms = [], [], []
            for _ in range(args.rounds):       # interleaved so drift hits both equally
                atc_ms += timed(lambda: take_snapshot(db), 1)
                pga_w_ms += timed(pga_waiting, 1)
                pga_b_ms += timed(pga_blocking, 1)
            pga_ms = [w + b for w, b in zip(pga_w_ms, pga_b_ms)]
            result = {
                **facts,
                "pg_activity_version": pga_version,
                "server_version_num": snap.server_version_num,
                "rounds": args.rounds,
                "atc_snapshot_ms": {"median": statistics.median(atc_ms), "p95": sorted(atc_ms)[int(0.95 * (len(atc_ms) - 1))]},
                "pg_activity_waiting_ms": {"median": statistics.median(pga_w_ms)},
                "pg_activity_blocking_ms": {"median": statistics.median(pga_b_ms)},
                "pg_activity_both_ms": {"median": statistics.median(pga_ms), "p95": sorted(pga_ms)[int(0.95 * (len(pga_ms) - 1))]},
                "ratio_atc_over_pg_activity": statistics.median(atc_ms) / statistics.median(pga_ms),
                "atc_tree": {"blocking_trees": len(snap.roots), "waiting": snap.waiting_count,
                             "blockers": len(atc_blockers)},
                "pg_activity_blockers": len(pga_blockers),
                "named_by_pg_activity_not_blocking": sorted(pga_blockers - atc_blockers),
                "blocking_missed_by_pg_activity": len(atc_blockers - pga_blockers),
                "non_conflicting_reader_named_by_pg_activity": facts["non_conflicting_reader_pid"] in pga_blockers,
                "non_conflicting_reader_named_by_atc": facts["non_conflicting_reader_pid"] in atc_blockers,
            }
            pga_conn.close()
            db.close()
            for c in conns:
                try:
                    c.close()
                except Exception:
                    pass
        finally:
            pg.stop()
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(f"sessions {result['sessions']}, locks {result['locks']}, waiting {result['waiting']}, "
              f"PostgreSQL {result['server_version_num']}, pg_activity {pga_version}, {args.rounds} rounds")
        print(f"atc full snapshot      median {result['atc_snapshot_ms']['median']:7.1f} ms   p95 {result['atc_snapshot_ms']['p95']:7.1f} ms")
        print(f"pg_activity waiting    median {result['pg_activity_waiting_ms']['median']:7.1f} ms")
        print(f"pg_activity blocking   median {result['pg_activity_blocking_ms']['median']:7.1f} ms")
        print(f"pg_activity both       median {result['pg_activity_both_ms']['median']:7.1f} ms   p95 {result['pg_activity_both_ms']['p95']:7.1f} ms")
        print(f"ratio atc / pg_activity: {result['ratio_atc_over_pg_activity']:.2f}")
        print(f"blockers named: atc {result['atc_tree']['blockers']}, pg_activity {result['pg_activity_blockers']} "
              f"(pg_activity misses {result['blocking_missed_by_pg_activity']}); "
              f"non-conflicting reader named by pg_activity: {result['non_conflicting_reader_named_by_pg_activity']}, "
              f"by atc: {result['non_conflicting_reader_named_by_atc']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

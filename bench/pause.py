"""Benchmark: pause latency under row locks, and recovery time from trigger to first new result.

    python3 bench/pause.py [--rounds 20] [--recoveries 5]

Starts its own embedded PostgreSQL and the broker simulator (nothing shared with a running demo).

1. Pause latency. Another session holds ``FOR UPDATE`` on the assignment's rows ("Assignment",
   its "Work" and "AutoTestResult" rows) while the simulator runs. We time ``pause_assignments``
   (append-only event, audited) against the naive alternative measured in the same run, a plain
   ``UPDATE "Assignment"`` through atc's session policy, which waits for the row lock until
   ``lock_timeout`` (1 s here) and then fails. Reported: median and p95 of each, and the ratio.
2. Recovery time. The broker's dispatcher is wedged while idle runners wait; we trigger recovery
   (via the broker API, then via the database with the broker's API down) and measure the time
   from the trigger to the first step result written for the starving job.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402
from psycopg.rows import dict_row  # noqa: E402

from console.broker_sim import BrokerSimulator, SimConfig, create_assignment, create_run  # noqa: E402
from console.config import settings_from_mapping  # noqa: E402
from console.db import Database  # noqa: E402
from console.embedded import EmbeddedPostgres  # noqa: E402
from console.errors import AtcError  # noqa: E402
from console.pauses import pause_assignments, resume_assignments  # noqa: E402
from console.schema import install_reference_schema, upgrade  # noqa: E402
from console.starvation import Thresholds, find_starvation, recover_starvation  # noqa: E402


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--recoveries", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pg").start(tie_to_parent=True)
        try:
            pg.create_database("bench")
            with psycopg.connect(pg.dsn("bench"), autocommit=True) as conn:
                install_reference_schema(conn)
            settings = settings_from_mapping({"operator": "bench", "database": {"dsn": pg.dsn("bench"),
                                                                                "lock_timeout": "1s"}})
            upgrade(settings)
            return run(settings, args)
        finally:
            pg.stop()


def run(settings, args) -> int:
    with psycopg.connect(settings.database.dsn, autocommit=True, row_factory=dict_row) as conn:
        aid = create_assignment(conn, "Locked lab", works=50, steps=2)
        create_run(conn, aid)
        others = [create_assignment(conn, f"Lab {i}", works=3, steps=1) for i in range(args.recoveries * 2)]
    sim = BrokerSimulator(SimConfig(dsn=settings.database.dsn, runners=3, poll_interval=0.02,
                                    chunk_delay=0.01, output_bytes=400, chunk_bytes=100)).start()
    settings = replace(settings, broker=replace(settings.broker, url=sim.url))
    db = Database(settings)
    try:
        # -- 1. pause latency under locks -----------------------------------------------------------
        holder = psycopg.connect(settings.database.dsn, autocommit=True)
        holder.execute("BEGIN")
        holder.execute('SELECT id FROM "Assignment" WHERE id = %s FOR UPDATE', (aid,))
        holder.execute('SELECT id FROM "Work" WHERE "Assignment_id" = %s FOR UPDATE', (aid,))
        holder.execute("""SELECT r.id FROM "AutoTestResult" r JOIN "Work" w ON w.id = r.work_id
                          WHERE w."Assignment_id" = %s FOR UPDATE OF r""", (aid,))
        pause_ms = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            pause_assignments(db, settings, [aid], reason="bench")
            pause_ms.append((time.perf_counter() - t) * 1000)
            resume_assignments(db, settings, [aid], reason="bench")
        naive_ms = []
        for _ in range(max(3, args.rounds // 4)):
            t = time.perf_counter()
            try:
                db.execute('UPDATE "Assignment" SET state = state WHERE id = %s', (aid,), what="naive pause")
                outcome = "ok"
            except AtcError:
                outcome = "lock_timeout"
            naive_ms.append((time.perf_counter() - t) * 1000)
        holder.close()
        # -- 2. recovery time ------------------------------------------------------------------------
        th = Thresholds(waiting_after=0.2, assigned_grace=0.2, stalled_after=1, heartbeat_fresh=10, not_started_after=600)
        recoveries = {"broker": [], "db": []}
        queue = list(others)
        for via in ("broker", "db"):
            for _ in range(args.recoveries):
                sim.faults.dispatcher_wedged = True
                with psycopg.connect(settings.database.dsn, autocommit=True, row_factory=dict_row) as conn:
                    job = sim.register_job(create_run(conn, queue.pop()))
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not any(f.job_id == job and f.kind == "waiting_idle"
                                                              for f in find_starvation(db, th)):
                    time.sleep(0.05)
                report = recover_starvation(db, settings, via=via, thresholds=th, watch_seconds=15, reason="bench",
                                            watch_poll=0.02)
                first = report.watch.get("first_progress_after_seconds")
                recoveries[via].append(first if first is not None else float("nan"))
                sim.faults.dispatcher_wedged = False
                time.sleep(0.3)
    finally:
        db.close()
        sim.stop()
    med_pause, med_naive = statistics.median(pause_ms), statistics.median(naive_ms)
    print("## bench/pause.py")
    print()
    print(f"- pause under FOR UPDATE locks on the assignment's rows, {len(pause_ms)} rounds: "
          f"median {med_pause:.1f} ms, p95 {pct(pause_ms, 0.95):.1f} ms")
    print(f"- plain UPDATE \"Assignment\" under the same locks, {len(naive_ms)} rounds: "
          f"median {med_naive:.0f} ms (ended by {outcome}, lock_timeout = {settings.database.lock_timeout})")
    print(f"- ratio (plain UPDATE / pause): {med_naive / med_pause:.0f}x")
    for via, values in recoveries.items():
        print(f"- recovery via {via}, trigger -> first new result, {len(values)} runs: "
              f"median {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Broker subcommands: pause, resume, pauses, starvation, recover-starvation, broker-status, broker-sim."""

from __future__ import annotations

import argparse
import sys

from ..cli import Context, add_json_flag, emit, no_settings, print_json
from ..errors import AtcError
from ..text import human_duration


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pause", help="stop new AutoTest work for assignments (append-only, works under locks)")
    p.add_argument("assignments", nargs="+", metavar="ASSIGNMENT", help="assignment id(s)")
    p.add_argument("--reason", required=True, help="why (shown with the pause everywhere, and audited)")
    p.add_argument("--for", dest="duration", metavar="DURATION", help="expire after e.g. 30m, 2h, 1d")
    p.add_argument("--stop-runners", action="store_true",
                   help="also stop the runners working on these assignments' jobs (asks first)")
    p.add_argument("--yes", action="store_true", help="do not ask before stopping runners")
    add_json_flag(p)
    p.set_defaults(handler=cmd_pause)

    p = sub.add_parser("resume", help="let AutoTest work flow again for assignments")
    p.add_argument("assignments", nargs="+", metavar="ASSIGNMENT")
    p.add_argument("--reason", default="", help="why (audited)")
    add_json_flag(p)
    p.set_defaults(handler=cmd_resume)

    p = sub.add_parser("pauses", help="currently paused assignments with who, when and why")
    p.add_argument("assignments", nargs="*", metavar="ASSIGNMENT", type=int)
    p.add_argument("--history", action="store_true", help="every pause/resume event, newest first")
    add_json_flag(p)
    p.set_defaults(handler=cmd_pauses)

    p = sub.add_parser("starvation", help="jobs and runners that are starving, and why")
    _threshold_flags(p)
    add_json_flag(p)
    p.set_defaults(handler=cmd_starvation)

    p = sub.add_parser("recover-starvation", help="get starving jobs moving (broker API, or --via db) and watch")
    p.add_argument("--via", choices=("broker", "db"), default="broker",
                   help="broker: its admin API (default); db: directly, with SKIP LOCKED (broker down)")
    p.add_argument("--dry-run", action="store_true", help="show what would be done; change nothing")
    p.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                   help="watch this long afterwards for runners and results moving "
                        "(default [broker] recovery_watch, 30; 0: off)")
    p.add_argument("--reason", default="", help="why (audited)")
    _threshold_flags(p)
    add_json_flag(p)
    p.set_defaults(handler=cmd_recover)

    p = sub.add_parser("broker-status", help="the broker's health, runners and jobs")
    p.add_argument("--from-db", action="store_true", help="read the broker's tables instead of its API")
    add_json_flag(p)
    p.set_defaults(handler=cmd_broker_status)

    p = sub.add_parser("broker-sim", help="run the reference broker and runner simulator (demo, tests)")
    p.add_argument("--dsn", help="AutoTest database (default: database.dsn from the config)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    p.add_argument("--runners", type=int, default=4)
    p.add_argument("--demo-load", type=float, default=0.0, metavar="SECONDS",
                   help="create a fresh AutoTest run every SECONDS (0: off)")
    p.add_argument("--incident", action="store_true", help="replay the outage (see docs/incident.md)")
    p.set_defaults(handler=cmd_broker_sim)


def _threshold_flags(p: argparse.ArgumentParser) -> None:
    from ..starvation import Thresholds

    d = Thresholds()
    g = p.add_argument_group("thresholds (durations: 90s, 5m, 1h; defaults from [broker] in the config)")
    g.add_argument("--waiting-after", default=None, metavar="D",
                   help=f"job waiting for a runner while runners idle (default {human_duration(d.waiting_after)})")
    g.add_argument("--assigned-grace", default=None, metavar="D",
                   help=f"runner assigned but not started (default {human_duration(d.assigned_grace)})")
    g.add_argument("--stalled-after", default=None, metavar="D",
                   help=f"started job without result progress (default {human_duration(d.stalled_after)})")
    g.add_argument("--heartbeat-fresh", default=None, metavar="D",
                   help=f"heartbeat younger than this counts as fresh (default {human_duration(d.heartbeat_fresh)})")
    g.add_argument("--not-started-after", default=None, metavar="D",
                   help=f"results not started on unpaused assignments (default {human_duration(d.not_started_after)})")


def thresholds_from(args: argparse.Namespace, settings):
    from dataclasses import replace

    from ..pauses import parse_duration
    from ..starvation import Thresholds

    th = Thresholds.from_settings(settings)
    changes = {}
    for name in ("waiting_after", "assigned_grace", "stalled_after", "heartbeat_fresh", "not_started_after"):
        raw = getattr(args, name, None)
        if raw is None:
            continue
        try:
            changes[name] = parse_duration(raw).total_seconds()
        except ValueError as exc:
            raise AtcError(f"--{name.replace('_', '-')}: {exc}") from None
    return replace(th, **changes)


_PAUSE_COLUMNS = [("assignment_id", "Assignment"), ("assignment_name", "Name"), ("operator", "By"),
                  ("paused_at", "Since"), ("expires_at", "Expires"), ("reason", "Reason")]


def cmd_pause(ctx: Context, args: argparse.Namespace) -> int:
    from ..pauses import parse_duration, pause_assignments

    duration = None
    if args.duration:
        try:
            duration = parse_duration(args.duration)
        except ValueError as exc:
            raise AtcError(f"--for: {exc}") from None
    result = pause_assignments(ctx.db, ctx.settings, args.assignments, reason=args.reason, duration=duration)
    data = result.as_dict()
    if args.stop_runners:
        data["stopped_runners"] = _stop_runners_for(ctx, args, [e["assignment_id"] for e in result.events])
    if ctx.json_output:
        print_json(data)
        return 0
    ids = ", ".join(str(e["assignment_id"]) for e in result.events)
    expiry = f" until {result.events[0]['expires_at']:%Y-%m-%d %H:%M:%S %Z}" if result.events[0]["expires_at"] else ""
    print(f"paused assignment(s) {ids}{expiry} in {result.elapsed_ms:.1f} ms")
    if result.unchanged:
        print(f"  already paused before (reason/expiry updated): {', '.join(map(str, result.unchanged))}")
    if not result.fenced:
        print("  note: a broker claim was in flight; check `atc broker-status` for a job claimed at that moment")
    for runner in data.get("stopped_runners", []):
        print(f"  stopped runner {runner['runner']} (job {runner.get('requeued_job')} back in the queue)")
    return 0


def _stop_runners_for(ctx: Context, args: argparse.Namespace, ids: list[int]) -> list[dict]:
    from ..broker import BrokerClient
    from ..pauses import runners_of_assignments, stop_runners

    with BrokerClient.from_settings(ctx.settings) as client:
        working = runners_of_assignments(client, ids)
        if not working:
            if not ctx.json_output:
                print("  no runner is working on these assignments")
            return []
        if not args.yes:
            if not sys.stdin.isatty():
                raise AtcError(f"{len(working)} runner(s) would be stopped; confirm with --yes (no terminal to ask)")
            listing = ", ".join(f"{r['id'][:8]} (assignment {r['assignment_id']})" for r in working)
            answer = input(f"Stop {len(working)} runner(s): {listing}? [y/N] ").strip().lower()
            if answer not in ("y", "yes"):
                print("  runners left running")
                return []
        return stop_runners(ctx.db, ctx.settings, client, [r["id"] for r in working], reason=args.reason)


def cmd_resume(ctx: Context, args: argparse.Namespace) -> int:
    from ..pauses import resume_assignments

    result = resume_assignments(ctx.db, ctx.settings, args.assignments, reason=args.reason)
    if ctx.json_output:
        print_json(result.as_dict())
        return 0
    print(f"resumed assignment(s) {', '.join(str(e['assignment_id']) for e in result.events)}")
    if result.unchanged:
        print(f"  were not paused: {', '.join(map(str, result.unchanged))}")
    return 0


def cmd_pauses(ctx: Context, args: argparse.Namespace) -> int:
    from ..pauses import current_pauses, pause_history

    if args.history:
        rows = pause_history(ctx.browse_db, args.assignments or None)
        emit(ctx, rows, columns=[("id", "Event"), ("assignment_id", "Assignment"), ("paused", "Paused"),
                                 ("operator", "By"), ("at", "At"), ("expires_at", "Expires"), ("reason", "Reason")])
        return 0
    rows = current_pauses(ctx.browse_db, args.assignments or None)
    if not rows and not ctx.json_output:
        print("no assignment is paused")
        return 0
    emit(ctx, rows, columns=_PAUSE_COLUMNS)
    return 0


_FINDING_COLUMNS = [("kind", "Kind"), ("job_id", "Job"), ("runner_id", "Runner"), ("assignment_id", "Assignment"),
                    ("age", "Age"), ("why", "Why")]


def cmd_starvation(ctx: Context, args: argparse.Namespace) -> int:
    from ..starvation import find_starvation

    th = thresholds_from(args, ctx.settings)
    findings = [f.as_dict() for f in find_starvation(ctx.db, th)]
    # Exit status 1 when something starves (handy in monitoring scripts), in both output modes.
    if ctx.json_output:
        print_json({"thresholds": th.params(), "findings": findings})
    elif not findings:
        from ..starvation import broker_counts

        counts = broker_counts(ctx.db)
        waiting = int(counts.get("jobs_waiting") or 0)
        if waiting and not int(counts.get("runners_idle") or 0):
            print(f"nothing is starving ({waiting} job(s) waiting, all runners busy: a full pool, not starvation)")
        else:
            print("nothing is starving")
    else:
        emit(ctx, findings, columns=_FINDING_COLUMNS)
    return 1 if findings else 0


def cmd_recover(ctx: Context, args: argparse.Namespace) -> int:
    from ..starvation import recover_starvation

    th = thresholds_from(args, ctx.settings)
    watch = ctx.settings.broker.recovery_watch if args.watch is None else args.watch
    progress = None
    if not ctx.json_output and watch > 0 and not args.dry_run:
        def progress(summary):
            moved = sum(1 for j in summary["jobs"] if j["results_moved"])
            sys.stderr.write(f"\r  watching {summary['watched_seconds']:5.1f}s: {moved}/{len(summary['jobs'])} "
                             f"job(s) moving ")
            sys.stderr.flush()
    report = recover_starvation(ctx.db, ctx.settings, via=args.via, dry_run=args.dry_run, thresholds=th,
                                watch_seconds=0 if args.dry_run else watch, reason=args.reason,
                                on_tick=progress)
    data = report.as_dict()
    if ctx.json_output:
        print_json(data)
        return 0 if (args.dry_run or not report.watch or report.watch.get("flowing") or not report.affected_jobs()) else 1
    if progress:
        sys.stderr.write("\n")
    verb = "would " if args.dry_run else ""
    print(f"{len(report.findings)} starving finding(s); recovery via {report.via}{' (dry run)' if args.dry_run else ''}")
    for f in report.findings:
        print(f"  [{f.kind}] {f.why}")
    print(f"  {verb}release runner(s): {', '.join(str(r['runner_id'])[:8] for r in report.released) or '-'}")
    print(f"  {verb}requeue job(s): {', '.join(map(str, report.requeued)) or '-'}")
    print(f"  {verb}register job(s): {', '.join(map(str, report.registered)) or '-'}")
    dispatched = ", ".join(f"{d['job_id']}->{str(d.get('runner_id'))[:8]}" for d in report.dispatched)
    print(f"  dispatched: {dispatched or '-'}")
    for b in report.busy:
        print(f"  busy: {b}")
    for note in report.notes:
        print(f"  note: {note}")
    if report.watch is not None:
        w = report.watch
        state = "work is flowing" if w.get("flowing") else "NO progress seen"
        first = w.get("first_progress_after_seconds")
        print(f"  after {w['watched_seconds']}s: {state}; all jobs got runners: {w['all_got_runners']}"
              + (f"; first result moved {first}s after the trigger" if first is not None else ""))
        if not w.get("flowing") and report.affected_jobs():
            return 1
    return 0


def cmd_broker_status(ctx: Context, args: argparse.Namespace) -> int:
    from ..starvation import broker_counts, list_jobs, list_runners

    if args.from_db:
        data = {"source": "database", "counts": broker_counts(ctx.browse_db),
                "runners": list_runners(ctx.browse_db), "jobs": list_jobs(ctx.browse_db)}
    else:
        from ..broker import BrokerClient

        with BrokerClient.from_settings(ctx.settings) as client:
            data = {"source": client.url, "health": client.health(), "runners": client.runners(), "jobs": client.jobs()}
    if ctx.json_output:
        print_json(data)
        return 0
    if "health" in data:
        h = data["health"]
        print(f"broker {data['source']}: dispatcher {h.get('dispatcher')}, not starting {h.get('not_starting')}, "
              f"slow {h.get('slow')}")
        incident = h.get("incident")
        if incident:
            if incident.get("phase") == "failed":
                print(f"incident replay FAILED: {incident.get('error')}", file=sys.stderr)
            else:
                print(f"incident replay: {incident.get('phase')} (for {incident.get('phase_seconds', '?')}s)")
    else:
        print(f"broker tables: {data['counts']}")
    emit(ctx, data["runners"], columns=[("id", "Runner"), ("state", "State"), ("job_id", "Job"),
                                        ("last_heartbeat", "Heartbeat"), ("ipaddr", "Address")], title="Runners")
    emit(ctx, data["jobs"][:50], columns=[("id", "Job"), ("state", "State"), ("job_metadata", "Metadata"),
                                          ("updated_at", "Updated")], title="Jobs")
    # A failed outage replay is an error of `atc demo --incident`: say so in the exit status too.
    incident = (data.get("health") or {}).get("incident") or {}
    return 1 if incident.get("phase") == "failed" else 0


@no_settings
def cmd_broker_sim(ctx: Context | None, args: argparse.Namespace) -> int:
    from ..broker_sim import SimConfig, serve

    dsn = args.dsn
    if not dsn:
        from ..cli import settings_for

        dsn = settings_for(args).database.dsn
    if not dsn:
        raise AtcError("broker-sim needs a database: --dsn DSN or database.dsn in the config")
    config = SimConfig(dsn=dsn, port=args.port, runners=args.runners, demo_load_interval=args.demo_load,
                       chunk_delay=0.2, output_bytes=4000, chunk_bytes=500)

    def ready(url: str) -> None:
        print(f"broker simulator listening on {url}; Ctrl-C stops it", flush=True)

    return serve(config, incident=args.incident, ready=ready)

"""`atc locks | cancel | terminate | health | audit`: lock holders, signals, health, the audit trail.

JSON shapes are documented in docs/cli.md ("Locks, signals, health, audit"). Exit codes: 0 ok;
2 an error to fix (one line); 1 for cancel/terminate when not every pid was signalled.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..cli import Context, add_json_flag, emit, print_json, print_table
from ..audit import describe_targets
from ..errors import AtcError
from ..text import human_bytes, human_duration, one_line, visible


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("locks", help="who blocks whom: the lock tree from pg_blocking_pids, and what is locked")
    p.add_argument("--limit", type=int, default=None, help="most sessions to show (default: ui.lock_rows)")
    p.add_argument("--filter", default="", help="keep only trees with a session matching this text")
    p.add_argument("--full", action="store_true", help="also print each session's full query text")
    add_json_flag(p)
    p.set_defaults(handler=cmd_locks)

    for action, verb in (("cancel", "cancel the running query of"), ("terminate", "end")):
        p = sub.add_parser(action, help=f"{verb} sessions (pg_{action}_backend), after re-checking each pid")
        p.add_argument("pids", type=int, nargs="+", metavar="PID")
        p.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
        p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        add_json_flag(p)
        p.set_defaults(handler=cmd_signal, action=action)

    p = sub.add_parser("health", help="database health: missing timeouts, waits, deadlocks, connections, big tables")
    p.add_argument("--tables", type=int, default=10, help="how many of the biggest tables to show (default 10)")
    add_json_flag(p)
    p.set_defaults(handler=cmd_health)

    p = sub.add_parser("audit", help="browse the audit trail (newest first)")
    p.add_argument("--operator", help="only this operator name")
    p.add_argument("--action", help="only this action (terminate, cancel, pause, migrate, ...)")
    p.add_argument("--target", help="only rows whose targets contain this text (a pid, an id)")
    p.add_argument("--since", help="from this time: 15m, 2h, 3d ago, or an ISO date/time")
    p.add_argument("--until", help="before this time (same forms as --since)")
    p.add_argument("--before-id", type=int, help="continue after this audit id (paging)")
    p.add_argument("--limit", type=int, default=50, help="rows (default 50)")
    add_json_flag(p)
    p.set_defaults(handler=cmd_audit)


# -- locks -----------------------------------------------------------------------------------------


def _tree_label(depth: int, pid: int, cycle: bool) -> str:
    marker = "·" * (2 * depth) + ("└ " if depth else "")
    who = "prepared xact" if pid == 0 else str(pid)
    return f"{marker}{who}{' (cycle)' if cycle else ''}"


def cmd_locks(ctx: Context, args: argparse.Namespace) -> int:
    from ..locks import take_snapshot

    limit = args.limit if args.limit is not None else ctx.settings.ui.lock_rows
    if limit <= 0:
        raise AtcError("--limit must be at least 1")
    snap = take_snapshot(ctx.db)
    rows, more = snap.rows(limit, filter_text=args.filter)
    if ctx.json_output:
        data = snap.as_dict(limit)
        if args.filter:
            shown = {r.session.pid for r in rows}
            data["tree"] = [t for t in data["tree"] if t["pid"] in shown]
            data["more"] = more
        print_json(data)
        return 0
    for warning in snap.warnings:
        sys.stderr.write(f"atc: {one_line(warning, 300)}\n")
    if not rows:
        print(f"no session waits on a lock ({snap.elapsed_ms:.0f} ms)")
        return 0
    table = []
    for r in rows:
        s = r.session
        table.append({
            "tree": _tree_label(r.depth, s.pid, r.cycle), "state": s.state or s.backend_type or "",
            "xact": human_duration(s.xact_age), "since": human_duration(s.state_age),
            "waits": s.waiting_for.describe() if s.waiting_for else ("holds " + "; ".join(s.holds) if s.holds else ""),
            "who": f"{s.user or '?'}@{s.database or '?'}", "app": s.application_name, "client": s.client,
            "workers": len(s.workers) or "", "query": s.query_line,
        })
    print_table(table, [("tree", "PID"), ("state", "STATE"), ("xact", "XACT"), ("since", "STATE FOR"),
                        ("waits", "WAITING FOR / HOLDS"), ("who", "USER@DB"), ("app", "APP"), ("client", "CLIENT"),
                        ("workers", "WORKERS"), ("query", "QUERY")])
    blockers = len(snap.roots)
    tail = f"; {more} more (raise --limit or ui.lock_rows)" if more else ""
    print(f"{blockers} blocking tree(s), {snap.waiting_count} waiting session(s), {snap.elapsed_ms:.0f} ms{tail}")
    if args.full:
        for r in rows:
            print(f"\n-- pid {r.session.pid}:\n{visible(r.session.query, keep_newlines=True)}")
    return 0


# -- cancel / terminate ----------------------------------------------------------------------------


def cmd_signal(ctx: Context, args: argparse.Namespace) -> int:
    from ..audit import require_writable
    from ..signals import SIGNALLED, Signaller, check_pids

    action = args.action
    check_pids(args.pids)  # before touching the database: a bad pid is a one-line error, exit 2
    require_writable(ctx.settings, action)
    if not args.reason.strip():
        raise AtcError(f"{action} needs a non-empty --reason (it is recorded in the audit trail)")
    signaller = Signaller(ctx.settings)
    try:
        targets = signaller.lookup(args.pids)
        if not args.yes:
            if not sys.stdin.isatty():
                raise AtcError(f"{action} needs confirmation: run it in a terminal, or pass --yes")
            sys.stderr.write(f"{action.capitalize()} {len(targets)} session(s):\n")
            for t in targets:
                sys.stderr.write(f"  {t.describe()}\n")
            answer = input(f"{action.capitalize()} them? [y/N] ").strip().lower()
            if answer not in ("y", "yes"):
                sys.stderr.write("atc: nothing signalled\n")
                return 1
        report = signaller.signal(action, targets, reason=args.reason)
    finally:
        signaller.close()
    if ctx.json_output:
        print_json(report.as_dict())
    else:
        print_table([o.as_dict() for o in report.outcomes],
                    [("pid", "PID"), ("outcome", "OUTCOME"), ("exited", "EXITED"), ("message", "NOTE")],
                    formatters={"exited": lambda v: "" if v is None else ("yes" if v else "not yet")})
        print(f"{action}: {report.summary}")
    return 0 if all(o.outcome == SIGNALLED for o in report.outcomes) else 1


# -- health ----------------------------------------------------------------------------------------


def cmd_health(ctx: Context, args: argparse.Namespace) -> int:
    from ..health import take_health

    health = take_health(ctx.db, top_tables=max(1, args.tables))
    if ctx.json_output:
        print_json(health.as_dict())
        return 0
    print(f"{health.database} as {health.role}, PostgreSQL {health.server_version_num} ({health.elapsed_ms:.0f} ms)")
    for line in health.limits:
        print(f"  cannot see: {one_line(line, 300)}")
    for line in health.warnings:
        print(f"  WARNING: {one_line(line, 300)}")
    print()
    print_table([{"role": t.role, "name": t.name, "value": "off" if t.off else t.value, "source": t.source}
                 for t in health.timeouts],
                [("role", "ROLE"), ("name", "TIMEOUT"), ("value", "VALUE"), ("source", "FROM")], title="Timeouts")
    print()
    print_table(health.sessions_by_state, [("state", "STATE"), ("sessions", "SESSIONS"),
                                           ("lock_waiters", "WAITING ON LOCKS"), ("in_this_database", "IN THIS DB")],
                title="Sessions")
    print(f"connections {health.connections}/{health.max_connections} ({health.connection_use:.0%} of usable); "
          f"lock waiters {health.lock_waiters}; deadlocks {health.deadlocks} ({health.deadlocks_per_hour:.2f}/h); "
          f"rollbacks {health.xact_rollback} ({health.rollback_ratio:.1%} of transactions, "
          f"{health.rollbacks_per_minute:.2f}/min) since {health.counting_since}")
    for title, rows in (("Longest transactions", health.longest_transactions),
                        ("Oldest idle in transaction", health.idle_in_transaction)):
        if rows:
            print()
            print_table(rows, [("pid", "PID"), ("age", "AGE"), ("state", "STATE"), ("user", "USER"),
                               ("database", "DB"), ("application_name", "APP"), ("query", "QUERY")],
                        formatters={"age": human_duration}, title=title)
    print()
    print_table([{"table": f"{t.schema}.{t.name}", "heap": t.heap, "toast": t.toast, "indexes": t.indexes,
                  "note": t.note} for t in health.tables],
                [("table", "TABLE"), ("heap", "HEAP"), ("toast", "TOAST"), ("indexes", "INDEXES"), ("note", "NOTE")],
                formatters={"heap": human_bytes, "toast": human_bytes, "indexes": human_bytes}, title="Biggest tables")
    return 0


# -- audit -----------------------------------------------------------------------------------------


def cmd_audit(ctx: Context, args: argparse.Namespace) -> int:
    from ..audit import list_audit, parse_time

    rows = list_audit(ctx.browse_db, before_id=args.before_id, operator=args.operator, action=args.action,
                      target=args.target, since=parse_time(args.since, what="--since"),
                      until=parse_time(args.until, what="--until"), limit=max(1, args.limit))
    next_before = rows[-1]["id"] if len(rows) == max(1, args.limit) else None
    if ctx.json_output:
        print_json({"items": rows, "next_before_id": next_before})
        return 0
    emit(ctx, rows, columns=[("id", "ID"), ("at", "AT"), ("operator", "OPERATOR"), ("db_role", "ROLE"),
                             ("client_addr", "CLIENT"), ("action", "ACTION"), ("targets", "TARGETS"),
                             ("reason", "REASON"), ("outcome", "OUTCOME")],
         formatters={"at": lambda v: v.isoformat(timespec="seconds") if v else "", "targets": describe_targets})
    if next_before:
        print(f"more: --before-id {next_before}")
    return 0



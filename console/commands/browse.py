"""`atc assignments | runs | results | steps | view`: the browse screens as commands.

Output: a table, or with ``--json`` a stable object documented in docs/cli.md:
``{"kind", "parent", "sort", "filters", "items": [...], "next_after"}``. Pass ``next_after`` back
with ``--after`` to get the next page (keyset pagination, like the screens).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .. import browse
from ..cli import Context, add_json_flag, emit
from ..errors import AtcError
from ..text import human_bytes, human_duration


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("assignments", help="list assignments with runs, results by state, log bytes, pause mark")
    p.add_argument("--state", help="hidden | open | done | paused")
    p.add_argument("--search", help="literal text in the name or course, or an exact id")
    _paging(p, "assignments")
    p.set_defaults(handler=cmd_assignments)

    p = sub.add_parser("runs", help="list the runs of an assignment (state derived from their results)")
    p.add_argument("assignment_id", type=int, metavar="ASSIGNMENT_ID")
    _paging(p, "runs")
    p.set_defaults(handler=cmd_runs)

    p = sub.add_parser("results", help="list the results of a run (student, state, steps by state, log bytes)")
    p.add_argument("run_id", type=int, metavar="RUN_ID")
    p.add_argument("--state", help="|".join(browse.RESULT_STATES))
    p.add_argument("--search", help="literal text in the student's name or username, or an exact id")
    _paging(p, "results")
    p.set_defaults(handler=cmd_results)

    p = sub.add_parser("steps", help="list the step results of a result (where each log lives, its size)")
    p.add_argument("result_id", type=int, metavar="RESULT_ID")
    p.add_argument("--state", help="|".join(browse.RESULT_STATES))
    p.add_argument("--search", help="literal text in the step name, or an exact id")
    _paging(p, "steps")
    p.set_defaults(handler=cmd_steps)

    p = sub.add_parser("view", help="open the console straight on a step result's log")
    p.add_argument("step_result_id", type=int, metavar="STEP_RESULT_ID")
    p.set_defaults(handler=cmd_view)


def _paging(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--sort", choices=browse.sort_names(kind), help=f"order (default {browse.sort_names(kind)[0]})")
    p.add_argument("--after", metavar="KEY", help="continue after this page key (next_after of the previous page, or an id)")
    p.add_argument("--limit", type=int, default=100, help="rows per page (default 100)")
    add_json_flag(p)


def _after(text: str | None) -> Any:
    if text is None:
        return None
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        key = json.loads(text)
    except ValueError:
        raise AtcError(f"--after {text!r} is not a page key (use the next_after value printed by --json, or an id)") from None
    if not (isinstance(key, list) and len(key) == 2):
        raise AtcError(f"--after {text!r} is not a page key (expected [value, id])")
    return key


def _items(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "sort_key"} for row in rows]


def _output(ctx: Context, kind: str, page, args: argparse.Namespace, parent: dict[str, Any] | None,
            filters: dict[str, Any], columns, formatters, title: str) -> int:
    data = {
        "kind": kind,
        "parent": parent,
        "sort": args.sort or browse.sort_names(kind)[0],
        "filters": filters,
        "items": _items(page.rows),
        "next_after": page.next_after,
    }
    if ctx.json_output:
        emit(ctx, data)
        return 0
    emit(ctx, data, rows=page.rows, columns=columns, formatters=formatters, title=title)
    if page.next_after is not None:
        print(f"more: --after '{json.dumps(page.next_after)}'")
    return 0


def _by_state(counts: dict[str, int] | None) -> str:
    if not counts:
        return "-"
    return " ".join(f"{state}:{counts[state]}" for state in browse.RESULT_STATES if counts.get(state))


def _date(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"


def cmd_assignments(ctx: Context, args: argparse.Namespace) -> int:
    page = browse.list_assignments(ctx.browse_db, state=args.state, search=args.search, sort=args.sort,
                                   after=_after(args.after), limit=args.limit)
    columns = [("id", "ID"), ("name", "Name"), ("course", "Course"), ("state", "State"), ("deadline", "Deadline"),
               ("runs", "Runs"), ("results_by_state", "Results"), ("log_bytes_db", "Log bytes (DB)"),
               ("paused", "Paused")]
    formatters = {
        "deadline": _date, "results_by_state": _by_state,
        "log_bytes_db": lambda v: human_bytes(v) if v is not None else "(not computed)",
        "paused": lambda v: "PAUSED" if v else "",
    }
    return _output(ctx, "assignments", page, args, None, {"state": args.state, "search": args.search},
                   columns, formatters, "Assignments")


def cmd_runs(ctx: Context, args: argparse.Namespace) -> int:
    assignment = browse.get_assignment(ctx.browse_db, args.assignment_id)
    page = browse.list_runs(ctx.browse_db, args.assignment_id, sort=args.sort, after=_after(args.after),
                            limit=args.limit)
    columns = [("id", "Run"), ("state", "State"), ("started_date", "Started"), ("results_by_state", "Results"),
               ("job_id", "Job")]
    return _output(ctx, "runs", page, args, {"assignment": assignment}, {}, columns,
                   {"started_date": _date, "results_by_state": _by_state},
                   f"Runs of assignment {assignment['id']}")


def cmd_results(ctx: Context, args: argparse.Namespace) -> int:
    run = browse.get_run(ctx.browse_db, args.run_id)
    page = browse.list_results(ctx.browse_db, args.run_id, state=args.state, search=args.search, sort=args.sort,
                               after=_after(args.after), limit=args.limit)
    columns = [("id", "Result"), ("student", "Student"), ("state", "State"), ("started_at", "Started"),
               ("runner_id", "Runner"), ("steps_by_state", "Steps"), ("log_bytes_db", "Log bytes (DB)"),
               ("log_bytes_s3", "Log bytes (S3)")]
    return _output(ctx, "results", page, args, {"run": run}, {"state": args.state, "search": args.search}, columns,
                   {"started_at": _date, "steps_by_state": _by_state, "log_bytes_db": human_bytes,
                    "log_bytes_s3": human_bytes}, f"Results of run {run['id']}")


def cmd_steps(ctx: Context, args: argparse.Namespace) -> int:
    result = browse.get_result(ctx.browse_db, args.result_id)
    page = browse.list_steps(ctx.browse_db, args.result_id, state=args.state, search=args.search, sort=args.sort,
                             after=_after(args.after), limit=args.limit)
    columns = [("id", "Step result"), ("step_order", "#"), ("step_name", "Step"), ("step_type", "Type"),
               ("state", "State"), ("duration_s", "Duration"), ("log_bytes", "Log size"), ("log_where", "Where")]
    return _output(ctx, "steps", page, args, {"result": result}, {"state": args.state, "search": args.search},
                   columns, {"duration_s": human_duration, "log_bytes": human_bytes},
                   f"Steps of result {result['id']}")


def cmd_view(ctx: Context, args: argparse.Namespace) -> int:
    from ..logstore import locate

    locate(ctx.browse_db, args.step_result_id)  # NotFound before the screen opens
    from .core import run_tui

    ctx.close()
    return run_tui(args, settings=ctx.settings, open_log=args.step_result_id)

"""`atc sizes`, `atc migrate-logs`, `atc migration-runs`, `atc restore-log`, `atc orphans`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..cli import Context, add_json_flag, emit, print_json, print_table
from ..errors import AtcError
from ..text import human_bytes, human_duration, parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sizes", help="where the log bytes are: tables, assignments, runs, largest, histogram")
    p.add_argument("--threshold", type=_size, default=_size("1MB"), metavar="SIZE",
                   help="count logs and bytes at or above this stored size (default 1MB)")
    p.add_argument("--top", type=int, default=20, help="rows per list (default 20)")
    p.add_argument("--sample", type=float, metavar="PERCENT",
                   help="force TABLESAMPLE SYSTEM at this percentage (default: only above 1M rows)")
    add_json_flag(p)
    p.set_defaults(handler=cmd_sizes)

    p = sub.add_parser("migrate-logs", help="move logs of finished steps above a size to S3 (resumable, shardable)")
    p.add_argument("--min-size", type=_size, required=True, metavar="SIZE",
                   help="move logs whose stored size (pg_column_size) is at least this")
    p.add_argument("--assignment", type=int, action="append", default=[], metavar="ID",
                   help="only logs of this assignment (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="plan only: what would move, nothing changes")
    p.add_argument("--concurrency", type=int, default=8, help="logs moved at once (default 8: small logs are latency-bound)")
    p.add_argument("--shard", default="1/1", metavar="K/N", help="take the logs with id %% N = K-1 (default 1/1)")
    p.add_argument("--max-bytes", type=_size, metavar="SIZE", help="stop after this many stored bytes")
    p.add_argument("--reason", default="", help="why (recorded in the audit trail)")
    p.add_argument("--new-run", action="store_true", help="start a new run instead of resuming an unfinished one")
    p.add_argument("--part-size", type=_size, default=_size("16MB"), metavar="SIZE",
                   help="logs above this size are uploaded in parts of this size (default 16MB; S3 minimum 5MB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_flag(p)
    p.set_defaults(handler=cmd_migrate)

    p = sub.add_parser("migration-runs", help="list migration runs with their progress")
    p.add_argument("--limit", type=int, default=20)
    add_json_flag(p)
    p.set_defaults(handler=cmd_runs)

    p = sub.add_parser("restore-log", help="move logs back from S3 into the database")
    p.add_argument("ids", type=int, nargs="+", metavar="ID", help="step result ids")
    p.add_argument("--keep-object", action="store_true", help="leave the S3 object in place")
    p.add_argument("--reason", default="", help="why (recorded in the audit trail)")
    add_json_flag(p)
    p.set_defaults(handler=cmd_restore)

    p = sub.add_parser("orphans", help="objects without pointer, missing objects, half-finished moves")
    p.add_argument("--delete", action="store_true",
                   help="delete orphans older than --older-than, reconcile half-finished moves, abort stale uploads")
    p.add_argument("--older-than", default="1d", metavar="AGE", help="age before an orphan may be deleted (default 1d)")
    p.add_argument("--reason", default="", help="why (recorded in the audit trail)")
    add_json_flag(p)
    p.set_defaults(handler=cmd_orphans)


# -- sizes ---------------------------------------------------------------------------------------


def cmd_sizes(ctx: Context, args: argparse.Namespace) -> int:
    from ..sizes import compute_sizes

    report = compute_sizes(ctx.browse_db, threshold=args.threshold, top=args.top, force_percent=args.sample)
    if ctx.json_output:
        print_json(report.as_dict())
        return 0
    hb = human_bytes
    print(f"as of {report.as_of:%Y-%m-%d %H:%M:%S %Z} ({report.method})")
    print_table(report.tables, [("table_name", "table"), ("heap_bytes", "heap"), ("toast_bytes", "TOAST"),
                                ("index_bytes", "indexes"), ("estimated_rows", "rows~")],
                formatters={k: hb for k in ("heap_bytes", "toast_bytes", "index_bytes")}, title="Tables")
    print(f"\nlogs in the database: {report.db_logs:,} ({hb(report.db_bytes)} stored, compressed); in S3: "
          f"{report.s3_logs:,} ({hb(report.s3_bytes)} uploaded, raw); S3 share {report.s3_share:.1%}")
    a = report.above_threshold
    print(f"stored at or above {hb(report.threshold)}: {a['logs']:,} logs, {hb(a['bytes'])} stored; movable now "
          f"(finished): {a['movable_logs']:,} logs, {hb(a['movable_bytes'])} stored\n")
    print_table(report.histogram, [("from_bytes", "from"), ("to_bytes", "below"), ("db_logs", "db logs"),
                                   ("db_bytes", "db stored (compressed)"), ("s3_logs", "s3 logs"), ("s3_bytes", "s3 uploaded (raw)")],
                formatters={k: hb for k in ("from_bytes", "to_bytes", "db_bytes", "s3_bytes")}, title="Histogram")
    print_table(report.largest, [("id", "step result"), ("state", "state"), ("bytes", "size"), ("location", "where")],
                formatters={"bytes": hb}, title="Largest logs")
    print_table(report.by_assignment, [("assignment_id", "id"), ("assignment", "assignment"), ("db_logs", "db logs"),
                                       ("db_bytes", "db stored (compressed)"), ("s3_logs", "s3 logs"), ("s3_bytes", "s3 uploaded (raw)")],
                formatters={"db_bytes": hb, "s3_bytes": hb}, title="Per assignment")
    print_table(report.by_run, [("run_id", "run"), ("assignment_id", "assignment"), ("db_logs", "db logs"),
                                ("db_bytes", "db stored (compressed)"), ("s3_logs", "s3 logs"), ("s3_bytes", "s3 uploaded (raw)")],
                formatters={"db_bytes": hb, "s3_bytes": hb}, title="Per run")
    for note in report.notes:
        print(f"note: {note}")
    return 0


# -- migrate -------------------------------------------------------------------------------------


def _options(args: argparse.Namespace):
    from ..migrate import MigrationOptions, parse_shard

    k, n = parse_shard(args.shard)
    return MigrationOptions(min_size=args.min_size, assignment_ids=tuple(args.assignment), concurrency=args.concurrency,
                            shard=k, shard_count=n, max_bytes=args.max_bytes, reason=args.reason,
                            new_run=args.new_run, multipart_threshold=args.part_size,
                            multipart_chunksize=args.part_size)


def cmd_migrate(ctx: Context, args: argparse.Namespace) -> int:
    from ..migrate import migrate_logs, plan_migration

    opts = _options(args)
    if args.dry_run:
        plan = plan_migration(ctx.db, opts)
        data = {"dry_run": True, "shard": f"{opts.shard}/{opts.shard_count}", "min_size": opts.min_size, **plan.as_dict()}
        if ctx.json_output:
            print_json(data)
        else:
            print(f"would move {plan.movable_logs:,} logs of shard {opts.shard}/{opts.shard_count}, "
                  f"{human_bytes(plan.movable_bytes)} stored in the database (compressed); "
                  f"{plan.logs - plan.movable_logs:,} at or above {human_bytes(opts.min_size)} are not finished"
                  + ("; capped by --max-bytes" if plan.capped_by_max_bytes else ""))
            print_table([{"state": k, **v} for k, v in sorted(plan.by_state.items())],
                        [("state", "state"), ("logs", "logs"), ("bytes", "stored in DB (compressed)")],
                        formatters={"bytes": human_bytes})
        return 0

    show_bar = not args.no_progress and sys.stderr.isatty()
    progress = _Bar() if show_bar else None
    try:
        stats = migrate_logs(ctx.settings, ctx.db, ctx.store, opts,
                             on_progress=progress.update if progress else None)
    finally:
        if progress:
            progress.close()
    data = stats.snapshot()
    if ctx.json_output:
        print_json(data)
    else:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(stats.skipped_reasons.items())) or "none"
        print(f"run {stats.run_id} shard {stats.shard} {stats.state}: moved {stats.moved_logs:,} logs "
              f"({human_bytes(stats.moved_stored_bytes)} stored in the database (compressed), "
              f"{human_bytes(stats.moved_bytes)} uploaded (raw)) in {human_duration(stats.elapsed)} at "
              f"{human_bytes(stats.rate)}/s uploaded; skipped {stats.skipped} ({reasons}); failed {stats.failed}")
        for f in stats.failures[:10]:
            print(f"  failed {f['id']}: {f['error']}")
    if stats.state == "cancelled":
        return 130
    return 1 if stats.failed else 0


def _bar_columns() -> list[Any]:
    """Rich progress columns, all in binary units (KiB/MiB, as --min-size and every other atc
    figure). The bar counts *stored* bytes (pg_column_size, compressed) dealt with, as the plan
    does; the upload figures are raw bytes written to S3. Rich's DownloadColumn and
    TransferSpeedColumn would mix decimal units and stored/raw bytes, so these are our own."""
    from rich.progress import BarColumn, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class StoredColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{human_bytes(task.completed)}/{human_bytes(task.total)} stored in DB (compressed)")

    class UploadedColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            stats = task.fields.get("stats")
            if stats is None:
                return Text("")
            return Text(f"{human_bytes(stats.moved_bytes)} uploaded (raw) at {human_bytes(stats.rate)}/s")

    return [TextColumn("{task.description}", markup=False), BarColumn(), StoredColumn(), UploadedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[counts]}", markup=False)]


class _Bar:
    """Rich progress on stderr: stored bytes dealt with, raw bytes uploaded, rate, ETA, counts."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import Progress

        self._progress = Progress(*_bar_columns(), console=Console(stderr=True, markup=False, highlight=False),
                                  transient=False)
        self._task = None
        self._progress.start()

    def update(self, stats: Any) -> None:
        counts = f"moved {stats.moved_logs:,}/{stats.planned_logs:,} logs  skipped {stats.skipped}  failed {stats.failed}"
        if self._task is None:
            self._task = self._progress.add_task(f"run {stats.run_id} shard {stats.shard}",
                                                 total=max(stats.planned_bytes, 1), counts=counts, stats=stats)
        self._progress.update(self._task, completed=min(stats.done_stored_bytes, max(stats.planned_bytes, 1)),
                              counts=counts, stats=stats)

    def close(self) -> None:
        self._progress.stop()


def cmd_runs(ctx: Context, args: argparse.Namespace) -> int:
    from ..migrate import list_runs

    rows = list_runs(ctx.db, args.limit)
    emit(ctx, rows, columns=[("id", "run"), ("started_at", "started"), ("finished_at", "finished"),
                             ("operator", "operator"), ("min_size", "min size"), ("moved_logs", "moved"),
                             ("moved_bytes", "bytes"), ("skipped", "skipped"), ("failed", "failed"),
                             ("shards_finished", "shards done")],
         formatters={"moved_bytes": human_bytes, "min_size": human_bytes})
    return 0


# -- restore, orphans ----------------------------------------------------------------------------


def cmd_restore(ctx: Context, args: argparse.Namespace) -> int:
    from ..restore import restore_logs

    outcomes = restore_logs(ctx.settings, ctx.db, ctx.store, list(args.ids), reason=args.reason,
                            keep_object=args.keep_object)
    rows = [o.as_dict() for o in outcomes]
    emit(ctx, rows, columns=[("step_result_id", "step result"), ("status", "status"), ("size", "bytes"),
                             ("key", "key"), ("error", "error")])
    return 0 if all(o.status in ("restored", "reconciled", "not_moved") for o in outcomes) else 1


def cmd_orphans(ctx: Context, args: argparse.Namespace) -> int:
    from ..orphans import clean, parse_age, scan

    if args.delete:
        report = clean(ctx.settings, ctx.db, ctx.store, older_than=parse_age(args.older_than), reason=args.reason)
    else:
        parse_age(args.older_than)
        report = scan(ctx.db, ctx.store)
    if ctx.json_output:
        print_json(report.as_dict())
    else:
        print(f"s3://{report.bucket}/{report.prefix}: {report.objects} objects ({human_bytes(report.object_bytes)}), "
              f"{report.pointers} pointers")
        print(f"orphans {len(report.orphans)}, missing objects {len(report.missing)}, size mismatches "
              f"{len(report.size_mismatch)}, half-finished moves {len(report.half_finished)}, dangling pointers "
              f"{len(report.dangling)}, incomplete uploads {len(report.incomplete_uploads)}")
        if report.orphans:
            print_table(report.orphans[:50], [("key", "orphan object"), ("size", "bytes"), ("last_modified", "modified")])
        if report.missing:
            print_table(report.missing[:50], [("step_result_id", "step result"), ("key", "MISSING object")])
        if report.actions:
            print_table(report.actions[:100], [("key", "key"), ("step_result_id", "step result"), ("action", "action")])
    if report.problems:
        raise AtcError(f"{len(report.missing)} moved logs have no object and {len(report.size_mismatch)} objects "
                       f"differ in size from their pointer: restore them from a backup of bucket {report.bucket!r}")
    return 0

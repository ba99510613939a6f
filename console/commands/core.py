"""Core subcommands: config, db upgrade, and opening the TUI."""

from __future__ import annotations

import argparse

from ..cli import Context, add_json_flag, emit, settings_for
from ..config import describe


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the effective configuration (secrets redacted)")
    add_json_flag(p)
    p.set_defaults(handler=cmd_config)

    p = sub.add_parser("db", help="atc's own schema")
    dbsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = dbsub.add_parser("upgrade", help="create or update the atc schema (idempotent; never touches application tables)")
    add_json_flag(up)
    up.set_defaults(handler=cmd_db_upgrade)
    check = dbsub.add_parser("check", help="check that the database and S3 bucket are reachable")
    add_json_flag(check)
    check.set_defaults(handler=cmd_db_check)

    p = sub.add_parser("tui", help="open the console (the default with no subcommand)")
    p.set_defaults(handler=_tui_handler)


def _tui_handler(ctx: Context, args: argparse.Namespace) -> int:
    return run_tui(args, settings=ctx.settings)


def cmd_config(ctx: Context, args: argparse.Namespace) -> int:
    data = describe(ctx.settings)
    emit(ctx, data)
    return 0


def cmd_db_upgrade(ctx: Context, args: argparse.Namespace) -> int:
    from ..schema import upgrade

    version = upgrade(ctx.settings)
    if ctx.json_output:
        emit(ctx, {"schema": "atc", "version": version})
    else:
        print(f"atc schema is at version {version}")
    return 0


def cmd_db_check(ctx: Context, args: argparse.Namespace) -> int:
    info = ctx.db.ping()
    result = {"database": {"target": ctx.db.describe(), **info}}
    if ctx.settings.s3.bucket:
        ctx.store.check()
        result["s3"] = {"endpoint": ctx.store.endpoint, "bucket": ctx.store.bucket, "ok": True}
    else:
        # Browsing works without S3; moving logs and reading moved ones do not.
        result["s3"] = {"configured": False, "ok": False,
                        "note": "no [s3] bucket set: moved logs cannot be read and migrate-logs will refuse"}
    if ctx.json_output:
        emit(ctx, result)
    else:
        db = result["database"]
        print(f"database  ok  {db['target']} as {db['role']}, PostgreSQL {db['server_version']}"
              f"{' (replica)' if db['in_recovery'] else ''}")
        s3 = result["s3"]
        if s3.get("configured", True):
            print(f"s3        ok  {s3['endpoint']} bucket {s3['bucket']}")
        else:
            print(f"s3        --  {s3['note']}")
    return 0


def run_tui(args: argparse.Namespace, settings=None, *, open_log: int | None = None) -> int:
    """Open the Textual app. Imported lazily so CLI commands never pay for Textual."""
    if settings is None:
        settings = settings_for(args)
    from screens.app import run_app

    return run_app(settings, open_log=open_log)

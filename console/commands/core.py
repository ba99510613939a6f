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
    emit(ctx, result)
    return 0


def run_tui(args: argparse.Namespace, settings=None, *, open_log: int | None = None) -> int:
    """Open the Textual app. Imported lazily so CLI commands never pay for Textual."""
    if settings is None:
        settings = settings_for(args)
    from screens.app import run_app

    return run_app(settings, open_log=open_log)

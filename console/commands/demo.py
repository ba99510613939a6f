"""`atc demo`: the embedded stack for learning the tool (and for the tests)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ..cli import Context, add_json_flag, no_settings, print_json
from ..demo import default_data_dir, down, up

# Scales of console.seed.SCALES (not imported here: the CLI starts without loading the seeder).
# "test" is the tiny data set of the test suite; the others are for people.
SCALES = ("test", "small", "medium", "large")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run atc on an embedded PostgreSQL + S3 with a seeded AutoTest data set")
    p.add_argument("--data-dir", type=Path, default=None, help=f"where the demo lives (default {default_data_dir()})")
    p.add_argument("--scale", choices=SCALES, default=None,
                   help="size of the seeded data set (default: small, or what the data dir already holds)")
    p.add_argument("--fresh", action="store_true", help="throw away the data dir and seed again")
    p.add_argument("--incident", action="store_true",
                   help="replay the outage live: huge logs, piling locks, a starving broker (docs/incident.md)")
    p.set_defaults(handler=no_settings(cmd_demo))
    dsub = p.add_subparsers(dest="demo_command", metavar="ACTION")

    u = dsub.add_parser("up", help="start the services, seed, write DIR/atc.toml, and return")
    u.add_argument("--data-dir", type=Path, default=None)
    u.add_argument("--scale", choices=SCALES, default=None)
    u.add_argument("--fresh", action="store_true")
    u.add_argument("--incident", action="store_true", help="start the outage replay too")
    add_json_flag(u)
    u.set_defaults(handler=no_settings(cmd_demo_up))

    d = dsub.add_parser("down", help="stop the services of a demo started with `atc demo up`")
    d.add_argument("--data-dir", type=Path, default=None)
    add_json_flag(d)
    d.set_defaults(handler=no_settings(cmd_demo_down))


def _progress(message: str) -> None:
    sys.stderr.write(f"atc demo: {message}\n")
    sys.stderr.flush()


def cmd_demo_up(ctx: Context | None, args: argparse.Namespace) -> int:
    data_dir = args.data_dir or default_data_dir()
    stack = up(data_dir, scale=args.scale, fresh=args.fresh, detach=True, incident=args.incident,
               progress=_progress)
    info = {
        "data_dir": str(stack.data_dir),
        "config": str(stack.config_path),
        "postgres": stack.postgres.dsn("autotest"),
        "s3_endpoint": stack.s3.endpoint_url,
        "bucket": stack.s3.bucket,
        "broker": stack.broker.url,
        "incident": bool(args.incident),
        "seeded": stack.load_state().get("seeded", {}),
    }
    if getattr(args, "json", False):
        print_json(info)
    else:
        print(f"demo is up in {stack.data_dir}")
        print(f"  PostgreSQL  {info['postgres']}")
        print(f"  S3          {info['s3_endpoint']} bucket {info['bucket']}")
        print(f"  broker      {info['broker']}{'  (replaying the outage: see docs/incident.md)' if args.incident else ''}")
        print(f"  config      {info['config']}")
        print()
        print(f"  atc --config {info['config']}               # open the console")
        print(f"  atc --config {info['config']} assignments   # or script it")
        print(f"  atc demo down --data-dir {stack.data_dir}    # stop it")
    return 0


def cmd_demo_down(ctx: Context | None, args: argparse.Namespace) -> int:
    data_dir = args.data_dir or default_data_dir()
    was = down(data_dir)
    if getattr(args, "json", False):
        print_json({"data_dir": str(data_dir), "stopped": was})
    else:
        print(f"demo in {data_dir} {'stopped' if was else 'was not running'}")
    return 0


def cmd_demo(ctx: Context | None, args: argparse.Namespace) -> int:
    """Up, open the TUI, and stop everything on exit, Ctrl-C, SIGTERM or a crash."""
    data_dir = args.data_dir or default_data_dir()
    # SIGTERM/SIGHUP become exceptions so the finally below runs.
    def _raise(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)
    stack = up(data_dir, scale=args.scale, fresh=args.fresh, detach=False, incident=args.incident,
               progress=_progress)
    try:
        from screens.app import run_app

        settings = stack.settings()
        return run_app(settings)
    finally:
        stack.stop()

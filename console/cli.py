"""The `atc` command line.

Every action of the TUI exists here too, with ``--json`` output, because responders script during
incidents. Each concern registers its subcommands from its own module (``COMMAND_MODULES``); a
handler takes ``(ctx, args)`` and returns an exit code. Errors an operator can fix are
``AtcError``s: printed as one line on stderr, exit code 2 (130 for a cancel), never a traceback.

With no subcommand, `atc` opens the TUI.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Callable, Iterable, Sequence
from uuid import UUID

from .config import Settings, describe, load_settings
from .errors import AtcError

# Modules that add subcommands: each has ``register(subparsers)``.
COMMAND_MODULES = [
    "console.commands.core",
    "console.commands.demo",
    "console.commands.browse",
    "console.commands.locks",
    "console.commands.migrate",
    "console.commands.logs",
    "console.commands.broker",
]


@dataclass
class Context:
    """What a command handler needs: settings and lazily opened resources."""

    settings: Settings
    json_output: bool = False
    _db: Any = field(default=None, repr=False)
    _browse_db: Any = field(default=None, repr=False)
    _store: Any = field(default=None, repr=False)

    @property
    def db(self):
        """The primary database (actions, writes)."""
        if self._db is None:
            from .db import Database

            self._db = Database(self.settings)
        return self._db

    @property
    def browse_db(self):
        """The replica if configured, else the primary (list commands)."""
        if self._browse_db is None:
            from .db import Database

            self._browse_db = Database(self.settings, replica=True) if self.settings.database.replica_dsn else self.db
        return self._browse_db

    @property
    def store(self):
        if self._store is None:
            from .storage import ObjectStore

            self._store = ObjectStore(self.settings)
        return self._store

    def close(self) -> None:
        for res in (self._db, self._browse_db):
            if res is not None:
                res.close()


# -- output helpers ------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    return value


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(data), indent=2, ensure_ascii=False) + "\n")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]],
                formatters: dict[str, Callable[[Any], str]] | None = None, title: str | None = None) -> None:
    """A Rich table whose cells are plain text (no markup, control characters escaped)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .text import one_line

    formatters = formatters or {}
    table = Table(title=title, show_lines=False, header_style="bold", box=None, pad_edge=False)
    for _, header in columns:
        table.add_column(header, overflow="fold")
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            text = formatters[key](value) if key in formatters else ("" if value is None else str(value))
            cells.append(Text(one_line(text, 120)))
        table.add_row(*cells)
    Console(markup=False, highlight=False, soft_wrap=False).print(table)


def emit(ctx: Context, data: Any, rows: Sequence[dict[str, Any]] | None = None,
         columns: Sequence[tuple[str, str]] | None = None, **table_kwargs: Any) -> None:
    """JSON when --json was given, else a table of ``rows`` (default: data)."""
    if ctx.json_output:
        print_json(data)
    elif columns is not None:
        print_table(rows if rows is not None else data, columns, **table_kwargs)
    else:
        print_json(data)


def fail(message: str, code: int = 2) -> int:
    sys.stderr.write(f"atc: {' '.join(message.split())}\n")
    return code


# -- parser --------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit 2) instead of usage dumps."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"atc: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="atc", description="AutoTest operations console")
    parser.add_argument("--config", metavar="PATH", help="config file (default: $ATC_CONFIG, then ~/.config/atc/config.toml)")
    parser.add_argument("--json", action="store_true", help="machine-readable output (documented in docs/cli.md)")
    parser.add_argument("--read-only", action="store_true", help="refuse every state-changing action")
    parser.add_argument("--operator", help="who is acting (recorded in the audit trail); default: login name")
    parser.set_defaults(handler=None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def add_json_flag(p: argparse.ArgumentParser) -> None:
    """Let --json also follow the subcommand (`atc runs 3 --json`)."""
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON output")


def settings_for(args: argparse.Namespace) -> Settings:
    from dataclasses import replace

    settings = load_settings(args.config)
    if getattr(args, "read_only", False):
        settings = replace(settings, read_only=True, read_only_origin="--read-only")
    if getattr(args, "operator", None):
        settings = replace(settings, operator=args.operator)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ctx: Context | None = None
    try:
        if args.handler is None and args.command is None:
            from .commands.core import run_tui

            return run_tui(args)
        handler = args.handler
        if getattr(handler, "needs_settings", True):
            ctx = Context(settings=settings_for(args), json_output=bool(getattr(args, "json", False)))
        return int(handler(ctx, args) or 0)
    except AtcError as exc:
        return fail(exc.message, exc.exit_code)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except BrokenPipeError:
        return 0
    finally:
        if ctx is not None:
            ctx.close()


def no_settings(fn: Callable) -> Callable:
    """Mark a handler that loads no config (e.g. `atc demo up`, which writes one)."""
    fn.needs_settings = False  # type: ignore[attr-defined]
    return fn


def config_summary(settings: Settings) -> dict[str, Any]:
    return describe(settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

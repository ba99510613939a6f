"""Configuration: one TOML file, typed, validated, with every default documented.

Where the file comes from: ``--config PATH``, else ``$ATC_CONFIG``, else
``$XDG_CONFIG_HOME/atc/config.toml`` (``~/.config/atc/config.toml``). A missing default file is
fine (all settings have defaults and libpq's environment supplies the database); a missing file
named explicitly is an error.

Validation is strict because a typo in an incident must not silently fall back to a default:
unknown keys and wrong types are one-line errors that name the key.
"""

from __future__ import annotations

import getpass
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, get_type_hints

from .errors import ConfigError


@dataclass(frozen=True)
class DatabaseSettings:
    # libpq connection string or URI. Empty: libpq's own environment (PGHOST, PGDATABASE,
    # PGSERVICE, ~/.pgpass, service files) decides.
    dsn: str = ""
    # Optional read replica for browsing screens and list commands. Actions always use `dsn`.
    replica_dsn: str = ""
    # Session policy applied to every connection atc opens (PostgreSQL interval syntax).
    statement_timeout: str = "5s"
    lock_timeout: str = "1s"
    idle_in_transaction_session_timeout: str = "10s"
    # Seconds to wait for a connection before giving up.
    connect_timeout: int = 5


@dataclass(frozen=True)
class S3Settings:
    # Endpoint URL for S3-compatible stores; empty means AWS S3.
    endpoint_url: str = ""
    region: str = ""
    bucket: str = ""
    # Key prefix under which atc stores moved logs.
    prefix: str = "atc/logs/"
    # Credentials always come from boto3's own chain; these only choose within it.
    profile: str = ""
    credentials_file: str = ""
    # Address buckets as http://endpoint/bucket (needed by most S3-compatible stores).
    path_style: bool = True
    connect_timeout: float = 5.0
    read_timeout: float = 30.0


@dataclass(frozen=True)
class BrokerSettings:
    # Base URL of the broker's HTTP API, e.g. http://127.0.0.1:8080. Empty: broker features off.
    url: str = ""
    connect_timeout: float = 3.0
    read_timeout: float = 10.0
    retries: int = 2
    # Starvation thresholds in seconds (console.starvation.Thresholds; CLI flags override).
    waiting_after: float = 120.0
    assigned_grace: float = 60.0
    stalled_after: float = 120.0
    heartbeat_fresh: float = 30.0
    not_started_after: float = 600.0
    # Seconds atc watches after a recovery for runners taking the jobs and results moving.
    recovery_watch: float = 30.0


@dataclass(frozen=True)
class UISettings:
    # Rows fetched per page on list screens (keyset pagination fetches one page ahead at most).
    page_size: int = 100
    # Seconds between live refreshes of monitoring screens.
    refresh_interval: float = 2.0
    theme: str = "textual-dark"
    # Most sessions the lock tree shows (and `atc locks` prints); the rest are counted as "N more".
    lock_rows: int = 200


@dataclass(frozen=True)
class Settings:
    # Who is acting; recorded in every audit row next to the database role. Default: login name.
    operator: str = ""
    # Refuse every state-changing action and open all sessions read-only.
    read_only: bool = False
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    ui: UISettings = field(default_factory=UISettings)
    # Where the settings came from (not a TOML key).
    source: str = field(default="(defaults)", compare=False)
    # Why atc is read-only when it is (the --read-only flag or the file), for refusal messages.
    read_only_origin: str = field(default="", compare=False)

    @property
    def read_only_because(self) -> str:
        return self.read_only_origin or f"read_only = true in {self.source}"

    @property
    def operator_name(self) -> str:
        return self.operator or _login_name()


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


_INTERVAL = re.compile(r"^\s*\d+(\.\d+)?\s*(us|ms|s|min|h|d)\s*$")
_INTERVAL_KEYS = {"statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout"}


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "atc" / "config.toml"


def resolve_config_path(explicit: str | None) -> tuple[Path, bool]:
    """Return the path to read and whether it was asked for explicitly (and so must exist)."""
    if explicit:
        return Path(explicit).expanduser(), True
    env = os.environ.get("ATC_CONFIG")
    if env:
        return Path(env).expanduser(), True
    return default_config_path(), False


def load_settings(explicit: str | None = None) -> Settings:
    path, required = resolve_config_path(explicit)
    if not path.exists():
        if required:
            raise ConfigError(f"config file {path} does not exist (given by --config or $ATC_CONFIG)")
        return Settings()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    settings = settings_from_mapping(raw, source=str(path))
    return settings


def settings_from_mapping(raw: dict[str, Any], source: str = "(mapping)") -> Settings:
    settings = _build(Settings, raw, prefix="", source=source)
    return replace(settings, source=source)


def _build(cls: type, raw: Any, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"config {source}: [{prefix.rstrip('.')}] must be a table")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.name not in ("source", "read_only_origin")}
    unknown = sorted(set(raw) - known)
    if unknown:
        where = f"[{prefix.rstrip('.')}] " if prefix else ""
        raise ConfigError(
            f"config {source}: unknown key {where}{unknown[0]!r} (known: {', '.join(sorted(known))})"
        )
    values: dict[str, Any] = {}
    for name, value in raw.items():
        expected = hints[name]
        key = f"{prefix}{name}"
        if is_dataclass(expected):
            values[name] = _build(expected, value, prefix=f"{key}.", source=source)
            continue
        values[name] = _check_type(key, value, expected, source)
        if name in _INTERVAL_KEYS and str(value).strip() != "0" and not _INTERVAL.match(str(value)):
            if re.fullmatch(r"\s*\d+(\.\d+)?\s*", str(value)):
                # PostgreSQL would read a bare number as milliseconds; nobody means 5 ms.
                raise ConfigError(
                    f"config {source}: {key} = {value!r} has no unit: write e.g. '{value}s' or '{value}ms' (0 turns it off)"
                )
            raise ConfigError(
                f"config {source}: {key} = {value!r} is not a duration (use e.g. '500ms', '5s', '2min', or 0 for off)"
            )
    return cls(**values)


def _check_type(key: str, value: Any, expected: Any, source: str) -> Any:
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config {source}: {key} must be true or false, not {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config {source}: {key} must be a whole number, not {value!r}")
        if value < 0:
            raise ConfigError(f"config {source}: {key} must not be negative")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config {source}: {key} must be a number, not {value!r}")
        if value < 0:
            raise ConfigError(f"config {source}: {key} must not be negative")
        return float(value)
    if expected is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key.endswith("timeout"):
            return str(value)  # a bare number of milliseconds, as PostgreSQL takes it
        if not isinstance(value, str):
            raise ConfigError(f"config {source}: {key} must be a string, not {value!r}")
        return value
    raise ConfigError(f"config {source}: {key} has an unsupported type")  # pragma: no cover


def describe(settings: Settings) -> dict[str, Any]:
    """Settings as a plain mapping with secrets removed (for `atc config --json` and the status line)."""
    from .db import redact_dsn

    return {
        "source": settings.source,
        "operator": settings.operator_name,
        "read_only": settings.read_only,
        "database": {
            "dsn": redact_dsn(settings.database.dsn),
            "replica_dsn": redact_dsn(settings.database.replica_dsn) if settings.database.replica_dsn else "(none)",
            "statement_timeout": settings.database.statement_timeout,
            "lock_timeout": settings.database.lock_timeout,
            "idle_in_transaction_session_timeout": settings.database.idle_in_transaction_session_timeout,
        },
        "s3": {
            "endpoint_url": settings.s3.endpoint_url or "(AWS)",
            "region": settings.s3.region,
            "bucket": settings.s3.bucket,
            "prefix": settings.s3.prefix,
        },
        "broker": {"url": settings.broker.url},
    }

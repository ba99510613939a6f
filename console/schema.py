"""atc's own schema (``atc.*``) and the reference application schema used by the demo and tests."""

from __future__ import annotations

from importlib import resources

import psycopg

from .config import Settings
from .db import connect, translate_error
from .errors import DatabaseError

ATC_SCHEMA_VERSION = 1
# Serialises concurrent `atc db upgrade` runs (two hosts starting a sharded migration at once).
_UPGRADE_LOCK_KEY = 0x0A7C_0001


def sql_text(name: str) -> str:
    return resources.files("console.sql").joinpath(name).read_text(encoding="utf-8")


def upgrade(settings: Settings) -> int:
    """Create or update atc's schema idempotently; returns the schema version now in place.

    Runs in one transaction under the configured lock_timeout. It only creates objects inside the
    ``atc`` schema, so the application's tables are never locked.
    """
    if settings.read_only:
        raise DatabaseError("atc db upgrade changes the database; it cannot run with read_only = true")
    with connect(settings, autocommit=False) as conn:
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_UPGRADE_LOCK_KEY,))
                conn.execute(sql_text("atc.sql"))
            row = conn.execute("SELECT max(version) AS v FROM atc.schema_version").fetchone()
            conn.commit()
        except psycopg.Error as exc:
            raise translate_error(exc, "atc db upgrade") from None
    return int(row["v"]) if row else 0


def install_reference_schema(conn: psycopg.Connection) -> None:
    """Create the reference AutoTest schema (demo and tests only; never run against production)."""
    conn.execute(sql_text("autotest.sql"))


def atc_schema_present(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT to_regclass('atc.schema_version') IS NOT NULL AS present").fetchone()
    return bool(row["present"] if isinstance(row, dict) else row[0])

"""Helpers shared by the broker, starvation and incident tests."""

from __future__ import annotations

import time

import psycopg
from psycopg.rows import dict_row


def app_conn(settings) -> psycopg.Connection:
    """A connection as the application (no atc session policy): tests set up and inspect rows."""
    return psycopg.connect(settings.database.dsn, autocommit=True, row_factory=dict_row)


def wait_for(predicate, timeout=40.0, what="condition"):
    """Poll until predicate() is truthy and return its value; generous because CI shares 2 cores."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")

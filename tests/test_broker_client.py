"""The httpx broker client against the real simulator: answers, retries, and one-line errors for a
broker that is down, slow, failing (500), rejecting (4xx) or answering garbage."""

from __future__ import annotations

import time

import pytest

from console.broker import BrokerClient
from console.broker_sim import create_assignment, create_run
from console.embedded import free_ports
from console.errors import BrokerError


@pytest.fixture
def sim(empty_db, start_broker_sim):
    import psycopg

    with psycopg.connect(empty_db.database.dsn, autocommit=True) as conn:
        conn.row_factory = psycopg.rows.dict_row
        create_run(conn, create_assignment(conn, "Client lab", works=1, steps=1))
    return start_broker_sim(empty_db)


def test_health_lists_stop_and_recover(sim):
    with BrokerClient(sim.url, retries=0) as client:
        health = client.health()
        assert health["dispatcher"] == "running" and "not_starting" in health and "slow" in health
        runners = client.runners()
        assert len(runners) == 2 and {"id", "state", "job_id", "last_heartbeat"} <= set(runners[0])
        assert isinstance(client.jobs(), list)
        answer = client.recover({"waiting_after": 60}, dry_run=True)
        assert answer["dry_run"] is True and "released" in answer
        assert client.stop_runner(runners[0]["id"])["stopped"] is True


def test_refused_connection(empty_db):
    url = f"http://127.0.0.1:{free_ports(1)[0]}"
    client = BrokerClient(url, connect_timeout=0.5, retries=2)
    started = time.monotonic()
    with pytest.raises(BrokerError) as err:
        client.health()
    message = str(err.value)
    assert "refused" in message and url in message and "after 3 attempts" in message and "\n" not in message
    assert 0.5 <= time.monotonic() - started < 5, "bounded retries with backoff"


def test_slow_broker_hits_the_read_timeout(sim):
    sim.set_faults({"delay": 1.0})
    client = BrokerClient(sim.url, read_timeout=0.3, retries=0)
    with pytest.raises(BrokerError, match=r"did not answer GET /health within broker.read_timeout=0.3s"):
        client.health()


def test_500_is_retried_then_reported(sim):
    sim.set_faults({"status": 500, "remaining": 1})
    assert BrokerClient(sim.url, retries=1).health()["dispatcher"] == "running", "one retry got through"
    sim.set_faults({"status": 500})
    with pytest.raises(BrokerError, match=r"failed on GET /health: HTTP 500 .*after 2 attempts"):
        BrokerClient(sim.url, retries=1).health()


def test_4xx_is_not_retried(sim):
    sim.set_faults({"status": 403, "remaining": 1})
    with pytest.raises(BrokerError, match=r"rejected GET /health: HTTP 403"):
        BrokerClient(sim.url, retries=3).health()
    assert sim.faults.remaining == 0, "exactly one request was made"
    with pytest.raises(BrokerError, match=r"rejected POST /admin/runners/nope/stop: HTTP 404"):
        BrokerClient(sim.url).stop_runner("nope")


def test_garbage_answer(sim):
    sim.set_faults({"garbage": True})
    with pytest.raises(BrokerError) as err:
        BrokerClient(sim.url, retries=0).health()
    message = str(err.value)
    assert "not JSON" in message and "broker.url" in message
    assert "\x1b" not in message, "control characters from the answer are escaped"


def test_configuration_errors():
    with pytest.raises(BrokerError, match="broker.url is not set"):
        BrokerClient("")
    with pytest.raises(BrokerError, match="must start with http"):
        BrokerClient("127.0.0.1:8080")

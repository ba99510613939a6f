"""`atc assignments|runs|results|steps|view` against a real PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from browse_world import HOSTILE_NAME, make_world
from console.cli import main


@pytest.fixture
def config(empty_db, tmp_path):
    make_world(empty_db.database.dsn)
    path = tmp_path / "atc.toml"
    path.write_text(f'operator = "tester"\n[database]\ndsn = "{empty_db.database.dsn}"\n', encoding="utf-8")
    return str(path)


def run_json(capsys, *argv):
    code = main(["--config", argv[0], *argv[1:], "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_assignments_json_is_stable_and_pages_by_key(config, capsys):
    data = run_json(capsys, config, "assignments", "--limit", "3")
    assert set(data) == {"kind", "parent", "sort", "filters", "items", "next_after"}
    assert data["kind"] == "assignments" and data["sort"] == "id"
    assert [a["id"] for a in data["items"]] == [1, 2, 3]
    first = data["items"][0]
    assert {"id", "name", "course", "state", "deadline", "runs", "results_by_state", "log_bytes_db", "log_bytes_s3",
            "stats_as_of", "paused", "paused_by", "pause_reason"} <= set(first)
    assert first["results_by_state"] == {"passed": 4, "failed": 1, "running": 1}
    assert data["items"][1]["paused"] is True and data["items"][1]["paused_by"] == "alice"
    nxt = run_json(capsys, config, "assignments", "--limit", "3", "--after", json.dumps(data["next_after"]))
    assert [a["id"] for a in nxt["items"]] == [4] and nxt["next_after"] is None
    # a bare id works for the id sort
    assert [a["id"] for a in run_json(capsys, config, "assignments", "--after", "2")["items"]] == [3, 4]
    by_name = run_json(capsys, config, "assignments", "--sort", "name", "--limit", "2")
    assert [a["id"] for a in by_name["items"]] == [3, 1]


def test_search_is_literal(config, capsys):
    data = run_json(capsys, config, "assignments", "--search", "'; drop table x; --")
    assert [a["name"] for a in data["items"]] == [HOSTILE_NAME]
    assert run_json(capsys, config, "assignments", "--search", "%")["items"][0]["id"] == 4
    assert run_json(capsys, config, "assignments", "--state", "paused")["items"][0]["id"] == 2
    assert run_json(capsys, config, "assignments", "--search", "3")["items"][0]["id"] == 3


def test_runs_results_steps(config, capsys):
    runs = run_json(capsys, config, "runs", "1")
    assert runs["parent"]["assignment"]["name"] == "Hello world"
    assert [(r["id"], r["state"]) for r in runs["items"]] == [(2, "running"), (1, "done")]
    results = run_json(capsys, config, "results", "2", "--state", "failed")
    assert [r["state"] for r in results["items"]] == ["failed"]
    assert results["items"][0]["steps_by_state"] == {"passed": 1, "failed": 2}
    steps = run_json(capsys, config, "steps", "1")
    assert [(s["id"], s["log_where"]) for s in steps["items"]] == [(1, "db"), (2, "s3"), (3, "none")]
    assert steps["items"][1]["log_bytes"] == 1048576
    assert "sort_key" not in steps["items"][0]


def test_table_output_prints_names_literally(config, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["--config", config, "assignments"]) == 0
    out = capsys.readouterr().out
    assert HOSTILE_NAME in out
    assert "\x1b" not in out


@pytest.mark.parametrize("argv, message", [
    (["runs", "999"], "assignment 999 does not exist"),
    (["results", "999"], "run 999 does not exist"),
    (["steps", "999"], "result 999 does not exist"),
    (["view", "999"], "step result 999 does not exist"),
    (["assignments", "--state", "bogus"], "unknown assignment state 'bogus'"),
    (["assignments", "--after", "nonsense"], "is not a page key"),
    (["assignments", "--limit", "0"], "--limit must be between"),
])
def test_bad_input_is_one_line_exit_2(config, capsys, argv, message):
    code = main(["--config", config, *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_real_subprocess(config):
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "console", "--config", config, "steps", "4", "--json"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["kind"] == "steps" and len(data["items"]) == 3
    proc = subprocess.run([sys.executable, "-m", "console", "--config", config, "runs", "12345"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("atc: assignment 12345 does not exist")

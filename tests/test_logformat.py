"""console.logformat: what a grader reads from a log, without the output bodies."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from console.logformat import summarize_log, summarize_log_stream
from console.seed import (HOSTILE_STDERR, HOSTILE_STDOUT, iter_big_log, real_output, real_output_names,
                          system_log_lines)

MARKER = "SECRET-OUTPUT-BODY-7f3a"


def _chunks(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def sample_logs() -> list[dict]:
    out, err, code = real_output("pytest_failures_color")
    logs = [
        {"stdout": out, "stderr": err, "exit_code": code, "time_spend": 0.72, "points": 0.25},
        {"stdout": HOSTILE_STDOUT + MARKER, "stderr": HOSTILE_STDERR, "exit_code": 1, "time_spend": 0.1},
        {"steps": [
            {"name": "n = 3", "input": "3\n", "expected": "1\n2\nFizz\n", "stdout": "1\n2\nFizz\n", "stderr": "",
             "exit_code": 0, "state": "passed", "achieved_points": 1.0},
            {"name": "[bold]n[/bold] = 15 \ud800", "input": "15\n", "expected": MARKER, "stdout": "\x00" + MARKER,
             "stderr": "é😀", "exit_code": 1, "state": "failed", "achieved_points": 0},
        ]},
        {"points": 0.75, "min_points": 0.6},
        {"stdout": "", "stderr": "", "exit_code": None, "time_spend": None},
        {"stdout": "x" * 300, "weird": "y" * 300, "nested": {"a": [1, 2, {"b": "c"}]}, "flag": True},
    ]
    for name in real_output_names():
        out, err, code = real_output(name)
        logs.append({"stdout": out, "stderr": err, "exit_code": code, "time_spend": 1.0})
    return logs


def test_output_log_summary_has_codes_points_and_lengths_but_no_text():
    log = {"stdout": MARKER * 3, "stderr": "é", "exit_code": 2, "time_spend": 1.5, "points": 0.5}
    summary = summarize_log(json.dumps(log).encode())
    assert summary["kind"] == "output"
    assert summary["exit_code"] == 2 and summary["points"] == 0.5 and summary["time_spend"] == 1.5
    assert summary["parts"] == {"stdout": len(MARKER) * 3, "stderr": 2}
    assert summary["bytes"] == len(json.dumps(log).encode())
    assert MARKER not in json.dumps(summary)


def test_io_log_summary_lists_steps_with_states_and_points():
    log = sample_logs()[2]
    summary = summarize_log(json.dumps(log).encode())
    assert summary["kind"] == "io"
    assert summary["step_count"] == 2
    assert summary["step_states"] == {"passed": 1, "failed": 1}
    assert summary["achieved_points"] == 1.0
    second = summary["steps"][1]
    assert second["state"] == "failed" and second["exit_code"] == 1
    assert second["name"] == "[bold]n[/bold] = 15 \ud800"  # short names are kept (shown as plain text)
    assert second["parts"] == {"input": 3, "expected": len(MARKER), "stdout": 1 + len(MARKER), "stderr": 2 + 4}
    assert MARKER not in json.dumps(summary)


def test_points_and_other_shapes():
    assert summarize_log({"points": 0.75, "min_points": 0.6}) == {
        "kind": "points", "points": 0.75, "parts": {}, "fields": {"min_points": 0.6}}
    assert summarize_log(None) == {"kind": "none"}
    assert summarize_log(b"[1, 2]")["kind"] == "other"
    bad = summarize_log(b'{"stdout": "unterminated')
    assert bad["kind"] == "invalid" and "unterminated" in bad["error"]
    assert summarize_log(b'{"a": 1} trailing')["kind"] == "invalid"
    assert summarize_log(b'{"a": tru}')["kind"] == "invalid"


def test_deep_nesting_is_refused_not_a_recursion_error():
    deep = b"[" * 100_000 + b"]" * 100_000
    assert summarize_log(deep)["kind"] == "invalid"


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64, 1 << 20])
def test_streaming_agrees_with_the_parsed_log_at_any_chunk_boundary(chunk):
    for log in sample_logs():
        if chunk < 16 and len(json.dumps(log)) > 20_000:
            continue  # big outputs byte by byte are slow and prove nothing more
        for ensure_ascii in (True, False):
            text = json.dumps(log, ensure_ascii=ensure_ascii)
            data = text.encode("utf-8", "surrogatepass") if not ensure_ascii else text.encode()
            if not ensure_ascii and any("\ud800" <= c <= "\udfff" for c in text):
                continue  # raw surrogates are not UTF-8; the application stores them escaped
            streamed = summarize_log_stream(_chunks(data, chunk))
            parsed = summarize_log(log)
            streamed.pop("bytes")
            assert streamed == parsed, (chunk, ensure_ascii, list(log)[:3])


def test_surrogate_pairs_and_lone_surrogates_are_measured_as_stored():
    data = b'{"stdout": "\\ud83d\\ude00 \\ud800\\ud800 \\udc00 \\u00e9\\u0000", "exit_code": 0}'
    parsed = json.loads(data)
    summary = summarize_log(data)
    assert summary["parts"]["stdout"] == len(parsed["stdout"].encode("utf-8", "surrogatepass"))


def test_a_big_log_is_summarised_in_bounded_memory():
    size = 12_000_000
    system_log_lines()  # the source text is loaded once per process; not part of the log's cost
    tracemalloc.start()
    try:
        summary = summarize_log_stream(iter_big_log(size, exit_code=3))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary["kind"] == "output" and summary["exit_code"] == 3
    assert summary["bytes"] == size
    assert summary["parts"]["stdout"] > size * 0.95
    assert peak < 6_000_000, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB log"

"""The load benchmark builds a many-feed code location for real, and ``--strict`` fails on a miss."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_load


def test_a_small_run_builds_every_feed_of_every_vendor(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_load.main(["--feeds", "10", "--repeat", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["feeds"] == 10
    assert result["assets"] == 10 * 5  # hr_file, validated_rows, rejected_rows, import_job, failure_report
    assert result["sensors"] >= 10 * 3  # arrival, status and retries per feed
    assert result["load_seconds"] == pytest.approx(
        sum(result[k] for k in ("parse_seconds", "build_seconds", "resolve_seconds", "snapshot_seconds")),
        abs=0.01,
    )


def test_strict_exits_1_when_loading_is_too_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = {
        "feeds": 50,
        "jobs": 101,
        "sensors": 150,
        "assets": 250,
        "import_seconds": 1.5,
        "parse_seconds": 0.1,
        "build_seconds": 1.0,
        "resolve_seconds": 1.0,
        "snapshot_seconds": 1.5,
        "load_seconds": 3.6,
    }
    monkeypatch.setattr(bench_load, "_run_child", lambda path: slow)
    assert bench_load.main(["--repeat", "1", "--strict"]) == 1
    assert bench_load.main(["--repeat", "1"]) == 0

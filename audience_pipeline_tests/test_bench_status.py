"""The status benchmark runs end to end at a tiny size, and ``--strict`` fails on a missed target."""

from __future__ import annotations

import pytest

from benchmarks import bench_status
from benchmarks.bench_status import Run, main, measure, missed_targets


def _run(**update: object) -> Run:
    fields = {
        "imports": 5000,
        "latency_ms": 50,
        "ticks": 20,
        "tick_seconds_median": 8.0,
        "tick_seconds_max": 8.5,
        "calls_per_tick_median": 800,
        "calls_per_tick_max": 800,
        "minutes_to_poll_all": 1.5,
        "polled_at_least_once": 5000,
        "max_gap_minutes": 1.75,
        "cursor_bytes": 60,
        "state_bytes": 1_000_000,
        "peak_rss_mb": 250.0,
    }
    return Run(**{**fields, **update})


def test_targets_are_judged_on_gap_tick_and_cursor() -> None:
    assert missed_targets(_run()) == []
    assert len(missed_targets(_run(max_gap_minutes=2.5))) == 1
    assert len(missed_targets(_run(max_gap_minutes=None, minutes_to_poll_all=None))) == 1  # never all polled
    assert len(missed_targets(_run(tick_seconds_max=12.0, cursor_bytes=200_000))) == 2


def test_strict_exits_1_when_the_largest_run_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(count: int, latency: int, minutes: float, feeds: int) -> Run:
        return _run(imports=count, cursor_bytes=count * 40)  # 200 KB at 5,000: the cursor of before

    monkeypatch.setattr(bench_status, "measure", fake)

    assert main(["--sizes", "100,5000", "--latency-ms", "50", "--strict"]) == 1
    assert main(["--sizes", "100", "--latency-ms", "50", "--strict"]) == 0
    assert main(["--sizes", "100,5000", "--latency-ms", "50"]) == 0


@pytest.mark.integration
def test_a_small_run_polls_every_import_against_the_sandbox() -> None:
    run = measure(30, 10, minutes=0.5)

    assert run.polled_at_least_once == 30 and run.minutes_to_poll_all == 0
    assert run.calls_per_tick_max == 30  # young imports are all polled at every tick
    assert run.ticks >= 3 and run.max_gap_minutes == 0.25
    assert 0 < run.cursor_bytes < 200 and run.state_bytes > 30 * 50


@pytest.mark.integration
def test_imports_spread_over_feeds_are_all_polled() -> None:
    run = measure(30, 0, minutes=0.25, feeds_count=3)

    assert run.polled_at_least_once == 30 and run.calls_per_tick_max == 30
    assert run.state_bytes > 30 * 50

"""The latency benchmark's instance is deploy/dagster.yaml on SQLite, and its feeds file loads."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from audience_pipeline.feeds.loader import load_feeds
from benchmarks.bench_latency import drop, write_feeds, write_instance


def test_the_instance_is_the_production_queue_on_sqlite(tmp_path: Path) -> None:
    write_instance(tmp_path / "home")
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        coordinator = instance.run_coordinator
        assert type(coordinator).__name__ == "QueuedRunCoordinator"
        assert coordinator.dequeue_interval_seconds == 1
        assert instance.get_sensor_settings().get("use_threads") is True
        assert "sqlite" in type(instance.run_storage).__name__.lower()


def test_one_demo_feed_reads_the_drop_folder(tmp_path: Path) -> None:
    feeds = load_feeds(write_feeds(tmp_path, "all_staff_cxi"))
    assert [f.name for f in feeds.feeds] == ["all_staff_cxi"] and list(feeds.destinations) == ["cxi"]
    drop(tmp_path, "a.csv", "1")
    drop(tmp_path, "b.csv", "2")
    a, b = ((tmp_path / "incoming" / n).read_text("utf-8") for n in ("a.csv", "b.csv"))
    assert a != b and len(a.splitlines()) == 202  # the demo's rows, each file its own content
    assert not list(tmp_path.glob(".*.part"))

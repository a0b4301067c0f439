"""The retention job prunes old partitions' files for real and keeps their history."""

from __future__ import annotations

import time

import dagster as dg
import pytest

from audience_pipeline.assets import FeedKeys
from audience_pipeline.automation.lifecycle import feed_states
from audience_pipeline.retention import JOB_NAME, partition_locations
from audience_pipeline.storage import PipelineStorage, storage_url
from audience_pipeline_tests.integration.conftest import DEMO_CSV, FEED, Pipeline, demo_feeds

pytestmark = pytest.mark.integration


def _variant(n: int) -> str:
    """The demo export with one city changed: new content, same employees."""
    lines = DEMO_CSV.read_text("utf-8").splitlines(keepends=True)
    lines[1] = lines[1].replace(lines[1].rstrip("\r\n").rsplit(",", 1)[-1], f"City {n}", 1)
    return "".join(lines)


def _import(pipeline: Pipeline, name: str, content: str) -> str:
    pipeline.drop(name, content)
    assert len(pipeline.ingest()) == 1
    pipeline.wait_for_reports()
    return pipeline.partitions()[-1]


def test_old_partitions_lose_their_files_and_keep_their_history(pipeline_factory) -> None:
    retention = "retention: {keep_days: 0.00001, keep_last: 1}\n"  # ended a second ago is old
    pipeline = pipeline_factory(feeds_text=demo_feeds() + retention)
    first = _import(pipeline, "employees_2026-11-01.csv", _variant(1))
    second = _import(pipeline, "employees_2026-11-08.csv", _variant(2))
    newest = _import(pipeline, "employees_2026-11-15.csv", _variant(3))
    keys = FeedKeys(next(f for f in pipeline.feeds.feeds if f.name == FEED), pipeline.feeds)
    storage = PipelineStorage(base_dir=storage_url(pipeline.feeds, pipeline.root / "home"))
    before = {
        p: [loc for loc in partition_locations(storage, keys, p) if loc.exists()]
        for p in (first, second, newest)
    }
    assert all(len(found) >= 5 for found in before.values()), before  # staging, sync, reports, values
    report_before = pipeline.metadata("failure_report", first)
    snapshot = storage.snapshot_path(FEED)
    time.sleep(1.0)

    job = pipeline.defs.resolve_job_def(JOB_NAME)
    result = job.execute_in_process(instance=pipeline.instance)
    assert result.success

    for partition in (first, second):
        assert not [loc for loc in partition_locations(storage, keys, partition) if loc.exists()]
        observed = pipeline.instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=keys.hr_file, asset_partitions=[partition]), limit=1
        ).records
        meta = observed[0].asset_observation.metadata
        assert meta["pruned_files"].value >= 5 and meta["freed_bytes"].value > 0
    assert [loc for loc in partition_locations(storage, keys, newest) if loc.exists()] == before[newest]
    assert snapshot.exists()  # the next file is still diffed against what the vendor holds
    assert pipeline.metadata("failure_report", first) == report_before  # the history stays
    states = feed_states(pipeline.instance, keys, keys.feed.retries)
    assert states[first].state == "reported" and states[newest].state == "reported"
    other_feeds = [f.name for f in pipeline.feeds.feeds if f.name != FEED]
    assert other_feeds and all(
        not pipeline.instance.get_dynamic_partitions(f"{f}__files") for f in other_feeds
    )

    again = job.execute_in_process(instance=pipeline.instance)
    assert again.success
    pruned = [e for e in again.all_events if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION]
    assert pruned == []  # nothing left to prune: no new observation

    pipeline.drop("employees_2026-11-22.csv", _variant(4))  # the pipeline goes on after a prune
    assert len(pipeline.ingest()) == 1
    pipeline.wait_for_reports()
    report = pipeline.metadata("failure_report")  # diffed against the kept snapshot: one row changed,
    assert report["changed"] == 1 and report["added"] == 2  # and the two the vendor failed are new
    assert pipeline.accounting_passed()

"""The import-status sensor: follows ``import_job`` materializations, polls the vendor's cheap
status call within a per-tick cap, and asks for one failure report per finished import.

The destination is a fake of our own ``Destination`` interface (no HTTP here); the materializations
are real: one test runs the feed's own assets, the others record them as the asset would.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from audience_pipeline import sensors as sensors_module
from audience_pipeline.assets import (
    IO_MANAGER_KEY,
    STORAGE_KEY,
    FeedKeys,
    _handle_metadata,
    build_feed_assets,
)
from audience_pipeline.destinations.base import ChunkJob, JobHandle, JobState, JobStatus, combine_states
from audience_pipeline.feeds.model import FeedsFile
from audience_pipeline.redact import register_secret
from audience_pipeline.sensors import MAX_POLLS_PER_TICK, POLL_THREADS, build_status_sensor
from audience_pipeline.sources.base import hash_file, partition_key
from audience_pipeline.sources.registry import build_source_resource
from audience_pipeline.storage import AudienceIOManager, PipelineStorage
from audience_pipeline_tests.offline_feeds import FEED, write_offline_feeds

SECRET = "vendor-secret-9d1c7b2e"


class FakeVendor:
    """Job states by job id, set by the test; remembers every status call."""

    vendor = "communicate_xi"

    def __init__(self) -> None:
        self.states: dict[str, JobState] = {}
        self.errors: dict[str, str] = {}
        self.polled: list[str] = []
        self.submitted: list[pd.DataFrame] = []
        self.opened = self.closed = 0
        self.delay = 0.0
        self.active = self.max_active = 0
        self._lock = threading.Lock()

    def destination(self, options: dict) -> FakeVendor:
        self.opened += 1
        return self

    def close(self) -> None:
        self.closed += 1

    def submit(self, rows: pd.DataFrame, *, feed: str, partition: str) -> JobHandle:
        self.submitted.append(rows)
        jobs = [ChunkJob(job_id=f"job-{len(self.submitted)}-{i}", first_row=i, row_count=1) for i in range(2)]
        for job in jobs:
            self.states[job.job_id] = JobState.RUNNING
        return JobHandle(
            vendor=self.vendor, feed=feed, partition=partition, jobs=jobs, submitted_rows=len(rows)
        )

    def status(self, handle: JobHandle) -> JobStatus:
        with self._lock:
            self.polled.append(handle.key)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay)
            for job in handle.jobs:
                if job.job_id in self.errors:
                    raise RuntimeError(self.errors[job.job_id])
            state = combine_states([self.states[j.job_id] for j in handle.jobs])
            return JobStatus(state=state, vendor_status=f"vendor_{state.value}")
        finally:
            with self._lock:
                self.active -= 1


@pytest.fixture(scope="module")
def feeds(tmp_path_factory: pytest.TempPathFactory) -> FeedsFile:
    return write_offline_feeds(tmp_path_factory.mktemp("status"))


@pytest.fixture(scope="module")
def keys(feeds: FeedsFile) -> FeedKeys:
    return FeedKeys(feeds.feeds[0], feeds)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture
def vendor() -> FakeVendor:
    return FakeVendor()


def feed_resources(home: Path, feeds: FeedsFile, keys: FeedKeys, vendor: FakeVendor) -> dict:
    return {
        IO_MANAGER_KEY: AudienceIOManager(base_dir=str(home)),
        STORAGE_KEY: PipelineStorage(base_dir=str(home)),
        keys.source_resource: build_source_resource(feeds.sources["hr_drop"]),
        keys.destination_resource: vendor,
    }


@pytest.fixture(scope="module")
def sensor(tmp_path_factory: pytest.TempPathFactory, feeds: FeedsFile, keys: FeedKeys) -> dg.SensorDefinition:
    """The feed's status sensor; each tick gets the test's own vendor as its resource."""
    report_job = dg.define_asset_job(keys.report_job, selection=[keys.failure_report])
    status = build_status_sensor(keys, report_job)
    # Partitioned run requests are checked against the code location, as the daemon does.
    status.definitions = dg.Definitions(
        assets=build_feed_assets(feeds.feeds[0], feeds),
        jobs=[report_job],
        sensors=[status],
        resources=feed_resources(tmp_path_factory.mktemp("home"), feeds, keys, FakeVendor()),
    )
    return status


def tick(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, vendor: FakeVendor, cursor: str | None):
    """One evaluation, as the daemon does it."""
    context = dg.build_sensor_context(
        instance=instance,
        instance_ref=instance.get_ref(),
        cursor=cursor,
        sensor_name=sensor.name,
        resources={"destination_cxi": vendor},
        definitions=sensor.definitions,
    )
    return sensor.evaluate_tick(context)


def record_import(instance: dg.DagsterInstance, keys: FeedKeys, partition: str, handle: JobHandle) -> None:
    """The materialization ``import_job`` writes, with the metadata it writes."""
    instance.add_dynamic_partitions(keys.partitions.name, [partition])
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=keys.import_job, partition=partition, metadata=_handle_metadata(handle, reused=False)
        )
    )


def make_handle(
    vendor: FakeVendor, partition: str, *job_ids: str, state: JobState = JobState.RUNNING
) -> JobHandle:
    for job_id in job_ids:
        vendor.states[job_id] = state
    jobs = [ChunkJob(job_id=j, first_row=i, row_count=1) for i, j in enumerate(job_ids)]
    return JobHandle(
        vendor="communicate_xi", feed=FEED, partition=partition, jobs=jobs, submitted_rows=len(jobs)
    )


def test_nothing_in_flight_skips_with_a_small_cursor(sensor, instance, vendor) -> None:
    result = tick(sensor, instance, vendor, None)

    assert result.run_requests == []
    assert result.skip_message == "no import in flight"
    assert json.loads(result.cursor) == {"after": None, "inflight": {}}
    assert vendor.opened == 0  # no client is built when there is nothing to poll


def test_real_import_job_is_polled_until_it_ends_then_one_report_is_requested(
    tmp_path: Path, feeds: FeedsFile, keys: FeedKeys, sensor, instance, vendor
) -> None:
    csv = Path(feeds.sources["hr_drop"].path) / "employees.csv"
    csv.write_text("ID,Email\nE1,a@x.org\nE2,b@x.org\nE3,bad\n", "utf-8")
    old = time.time() - 3600
    os.utime(csv, (old, old))
    partition = partition_key(csv.name, hash_file(csv))
    instance.add_dynamic_partitions(keys.partitions.name, [partition])
    materialized = dg.materialize(
        build_feed_assets(feeds.feeds[0], feeds),
        selection=dg.AssetSelection.assets(
            keys.hr_file, keys.validated_rows, keys.rejected_rows, keys.import_job
        ),
        partition_key=partition,
        instance=instance,
        resources=feed_resources(tmp_path / "home", feeds, keys, vendor),
    )
    assert materialized.success
    assert vendor.submitted[0]["unique_id"].tolist() == ["E1", "E2"]

    running = tick(sensor, instance, vendor, None)

    assert running.run_requests == []
    state = json.loads(running.cursor)
    assert set(state) == {"after", "inflight"}
    assert list(state["inflight"]) == [partition]
    assert state["inflight"][partition] == state["after"]
    assert vendor.polled == ["job-1-0+job-1-1"]
    assert vendor.closed == vendor.opened == 2  # one client for the submit, one for the tick

    vendor.states["job-1-0"] = JobState.SUCCEEDED
    vendor.states["job-1-1"] = JobState.FAILED
    ended = tick(sensor, instance, vendor, running.cursor)

    assert [(r.partition_key, r.run_key) for r in ended.run_requests] == [
        (partition, "job-1-0+job-1-1:vendor_failed")
    ]
    assert (
        ended.run_requests[0].tags.items()
        >= {
            "audience_pipeline/import": "job-1-0+job-1-1",
            "audience_pipeline/vendor_status": "vendor_failed",
        }.items()
    )
    assert json.loads(ended.cursor) == {**state, "inflight": {}}

    quiet = tick(sensor, instance, vendor, ended.cursor)

    assert quiet.run_requests == [] and quiet.skip_message == "no import in flight"
    assert len(vendor.polled) == 2  # a finished import is not polled again


def test_run_key_is_job_ids_and_final_state_so_a_resubmission_gets_its_own_report(
    keys, sensor, instance, vendor
) -> None:
    record_import(instance, keys, "a.csv@0000000001", make_handle(vendor, "a.csv@0000000001", "J1"))
    cursor = tick(sensor, instance, vendor, None).cursor
    record_import(
        instance,
        keys,
        "a.csv@0000000001",
        make_handle(vendor, "a.csv@0000000001", "J2", state=JobState.SUCCEEDED),
    )

    result = tick(sensor, instance, vendor, cursor)

    assert [r.run_key for r in result.run_requests] == ["J2:vendor_succeeded"]
    assert vendor.polled == ["J1", "J2"]  # the superseded import is no longer polled
    assert json.loads(result.cursor)["inflight"] == {}


def test_nothing_submitted_ends_without_asking_the_vendor(keys, sensor, instance, vendor) -> None:
    empty = JobHandle(
        vendor="communicate_xi", feed=FEED, partition="e.csv@0000000001", jobs=[], submitted_rows=0
    )
    record_import(instance, keys, "e.csv@0000000001", empty)

    result = tick(sensor, instance, vendor, None)

    assert [(r.partition_key, r.run_key) for r in result.run_requests] == [
        ("e.csv@0000000001", f"{FEED}:e.csv@0000000001:empty:nothing_submitted")
    ]
    assert result.run_requests[0].tags["audience_pipeline/vendor_status"] == "nothing_submitted"
    assert vendor.polled == []


def test_a_poll_error_does_not_stop_the_other_polls_and_is_retried(
    keys, sensor, instance, vendor, capfd: pytest.CaptureFixture
) -> None:
    register_secret(SECRET)
    for name, job in (("a.csv@0000000001", "JA"), ("b.csv@0000000002", "JB"), ("c.csv@0000000003", "JC")):
        record_import(instance, keys, name, make_handle(vendor, name, job, state=JobState.SUCCEEDED))
    vendor.errors["JB"] = f"503 from https://api.example/imports?key={SECRET}"

    first = tick(sensor, instance, vendor, None)

    assert sorted(r.run_key for r in first.run_requests) == ["JA:vendor_succeeded", "JC:vendor_succeeded"]
    assert list(json.loads(first.cursor)["inflight"]) == ["b.csv@0000000002"]
    logged = capfd.readouterr().err  # the sensor's log goes to Dagster's console handler
    warnings = [line for line in logged.splitlines() if "status poll failed" in line]
    assert len(warnings) == 1 and "b.csv@0000000002" in warnings[0] and "503" in warnings[0]
    assert "key=***" in warnings[0] and SECRET not in logged

    del vendor.errors["JB"]
    second = tick(sensor, instance, vendor, first.cursor)

    assert [r.run_key for r in second.run_requests] == ["JB:vendor_succeeded"]
    assert json.loads(second.cursor)["inflight"] == {}


@pytest.fixture
def cap(monkeypatch: pytest.MonkeyPatch) -> int:
    """A small per-tick cap, so that going past it needs a handful of imports, not fifty."""
    assert 10 <= MAX_POLLS_PER_TICK <= 200  # enough per tick, yet well inside a 60 s tick
    monkeypatch.setattr(sensors_module, "MAX_POLLS_PER_TICK", 4)
    return 4


def test_polls_are_capped_per_tick_and_oldest_first(keys, sensor, instance, vendor, cap) -> None:
    names = [f"f{i:03d}.csv@{i:010d}" for i in range(cap + 3)]
    for i, name in enumerate(names):
        record_import(instance, keys, name, make_handle(vendor, name, f"J{i:03d}", state=JobState.SUCCEEDED))

    first = tick(sensor, instance, vendor, None)

    assert sorted(r.partition_key for r in first.run_requests) == names[:cap]
    assert len(vendor.polled) == cap
    assert sorted(json.loads(first.cursor)["inflight"]) == names[cap:]

    second = tick(sensor, instance, vendor, first.cursor)

    assert sorted(r.partition_key for r in second.run_requests) == names[cap:]
    assert len(vendor.polled) == len(names)
    assert "polled_up_to" not in json.loads(second.cursor)


def test_imports_that_run_long_do_not_starve_newer_ones(keys, sensor, instance, vendor, cap) -> None:
    """More long-running imports than the cap: every import is still polled within a few ticks."""
    stuck = [f"s{i:03d}.csv@{i:010d}" for i in range(cap + 1)]
    for i, name in enumerate(stuck):
        record_import(instance, keys, name, make_handle(vendor, name, f"S{i:03d}"))
    record_import(
        instance,
        keys,
        "new.csv@9999999999",
        make_handle(vendor, "new.csv@9999999999", "NEW", state=JobState.SUCCEEDED),
    )

    cursor, requested = None, []
    for _ in range(2):
        result = tick(sensor, instance, vendor, cursor)
        cursor, requested = result.cursor, requested + [r.run_key for r in result.run_requests]

    assert requested == ["NEW:vendor_succeeded"]
    assert set(vendor.polled) == {f"S{i:03d}" for i in range(len(stuck))} | {"NEW"}
    assert len(vendor.polled) == 2 * cap  # still capped


def test_cursor_stays_small_whatever_the_history(keys, sensor, instance, vendor) -> None:
    cursor = None
    for batch in range(3):
        for i in range(8):
            name = f"b{batch}-{i:02d}.csv@{batch:05d}{i:05d}"
            record_import(
                instance, keys, name, make_handle(vendor, name, f"J{batch}-{i}", state=JobState.SUCCEEDED)
            )
        cursor = tick(sensor, instance, vendor, cursor).cursor

    assert len(vendor.polled) == 24
    state = json.loads(cursor)
    assert state == {"after": state["after"], "inflight": {}} and isinstance(state["after"], int)
    assert len(cursor) < 60


def test_a_materialization_without_a_handle_is_dropped(keys, sensor, instance, vendor) -> None:
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=keys.import_job, partition="x.csv@0000000001")
    )
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=keys.import_job))  # no partition

    first = tick(sensor, instance, vendor, None)
    second = tick(sensor, instance, vendor, first.cursor)

    assert first.run_requests == [] and vendor.polled == []
    assert json.loads(first.cursor)["inflight"] == {}
    assert second.skip_message == "no import in flight"


def test_polls_run_concurrently_but_bounded(keys, sensor, instance, vendor) -> None:
    vendor.delay = 0.05
    for i in range(2 * POLL_THREADS):
        name = f"p{i:02d}.csv@{i:010d}"
        record_import(instance, keys, name, make_handle(vendor, name, f"P{i}"))

    started = time.monotonic()
    tick(sensor, instance, vendor, None)
    elapsed = time.monotonic() - started

    assert 1 < vendor.max_active <= POLL_THREADS
    assert elapsed < 2 * POLL_THREADS * vendor.delay  # sequential polls would take this long

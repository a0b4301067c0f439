"""The import-status sensor: follows ``import_job`` materializations, polls the vendor's cheap
status call within a per-tick cap, ends every import (the vendor's final word, the time limit or
too many failed polls) and keeps requesting its failure report until the report exists.

The destination is a fake of our own ``Destination`` interface (no HTTP here); the materializations
are real: one test runs the feed's own assets, the others record them as the assets would. Each
tick records one run per run request, as the daemon would launch it, with the status the test says.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from dagster._core.utils import make_new_run_id

from audience_pipeline.assets import (
    IO_MANAGER_KEY,
    STORAGE_KEY,
    FeedKeys,
    _handle_metadata,
    build_feed_assets,
)
from audience_pipeline.automation import status as status_module
from audience_pipeline.automation.status import (
    LOST_REQUEST_SECONDS,
    MAX_POLLS_PER_TICK,
    POLL_RETRY,
    build_status_sensor,
    in_flight,
    poll_interval,
)
from audience_pipeline.destinations.base import (
    ChunkJob,
    JobHandle,
    JobOutcome,
    JobState,
    JobStatus,
    Reconciliation,
    RowFailure,
    cannot_reconcile,
    combine_states,
)
from audience_pipeline.destinations.http import VendorConnectionError, VendorHTTPError
from audience_pipeline.feeds.model import DestinationConfig, FeedsFile, RetrySettings, StatusPolling
from audience_pipeline.redact import register_secret
from audience_pipeline.sources.base import hash_file, partition_key
from audience_pipeline.sources.registry import build_source_resource
from audience_pipeline.storage import AudienceIOManager, PipelineStorage
from audience_pipeline.tags import (
    FINAL_DETAIL_TAG,
    FINAL_STATE_TAG,
    IMPORT_TAG,
    OUTCOME_TAG,
    PARTITION_TAG,
    RUN_KEY_TAG,
)
from audience_pipeline_tests.offline_feeds import FEED, write_offline_feeds

SECRET = "vendor-secret-9d1c7b2e"
ENTRY_FIELDS = {"p", "sid", "since", "err", "polled", "next", "final", "detail", "att", "at"}
STARTED, FAILURE = dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.FAILURE


def not_found(job: str = "J") -> VendorHTTPError:
    return VendorHTTPError("communicate_xi", "GET", f"https://x/status/{job}", status=404)


def server_error(job: str = "J", status: int = 503) -> VendorHTTPError:
    return VendorHTTPError("communicate_xi", "GET", f"https://x/status/{job}", status=status)


class FakeVendor:
    """Job states by job id, set by the test; remembers every status call."""

    vendor = "communicate_xi"

    def __init__(self) -> None:
        self.states: dict[str, JobState] = {}
        self.words: dict[str, str] = {}
        """The vendor's own status word by job id, where it is not ``vendor_<state>``."""
        self.errors: dict[str, Exception] = {}
        self.polled: list[str] = []
        self.submitted: list[pd.DataFrame] = []
        self.retries: list[object] = []
        self.opened = self.closed = 0
        self.delay = 0.0
        self.active = self.max_active = 0
        self.first_poll = self.last_poll = 0.0
        self._lock = threading.Lock()

    def destination(self, options: dict, retry: object = None) -> FakeVendor:
        self.opened += 1
        self.retries.append(retry)
        return self

    def close(self) -> None:
        self.closed += 1

    def submit(
        self, rows: pd.DataFrame, *, feed: str, partition: str, previous: JobHandle | None = None
    ) -> JobHandle:
        self.submitted.append(rows)
        jobs = [ChunkJob(job_id=f"job-{len(self.submitted)}-{i}", first_row=i, row_count=1) for i in range(2)]
        for job in jobs:
            self.states[job.job_id] = JobState.RUNNING
        return JobHandle(
            vendor=self.vendor, feed=feed, partition=partition, jobs=jobs, submitted_rows=len(rows)
        )

    def reconcile(
        self, intent: object, rows: pd.DataFrame, *, previous: JobHandle | None = None
    ) -> Reconciliation:
        return cannot_reconcile(self.vendor, "the fake keeps no history")

    def status(self, handle: JobHandle) -> JobStatus:
        with self._lock:
            self.polled.append(handle.key)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.first_poll = self.first_poll or time.monotonic()
        try:
            time.sleep(self.delay)
            for job in handle.jobs:
                if job.job_id in self.errors:
                    raise self.errors[job.job_id]
            state = combine_states([self.states[j.job_id] for j in handle.jobs])
            word = self.words.get(handle.jobs[0].job_id, f"vendor_{state.value}")
            return JobStatus(state=state, vendor_status=word)
        finally:
            with self._lock:
                self.active -= 1
                self.last_poll = time.monotonic()

    def outcome(self, handle: JobHandle, *, status: JobStatus | None = None) -> JobOutcome:
        failed = [j for j in handle.jobs if self.states[j.job_id] is JobState.FAILED]
        return JobOutcome(
            submitted=handle.submitted_rows,
            failures=[RowFailure(row=j.first_row, reason="rejected by the vendor") for j in failed],
        )


class Clock:
    """Stands in for the ``time`` module inside ``status.py`` only: the test moves time on."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


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


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(status_module, "time", clock)
    return clock


def feed_resources(home: Path, feeds: FeedsFile, keys: FeedKeys, vendor: FakeVendor) -> dict:
    return {
        IO_MANAGER_KEY: AudienceIOManager(base_dir=str(home)),
        STORAGE_KEY: PipelineStorage(base_dir=str(home)),
        keys.source_resource: build_source_resource(feeds.sources["hr_drop"]),
        keys.destination_resource: vendor,
    }


def destination(feeds: FeedsFile, **update: object) -> DestinationConfig:
    return feeds.destination_for(feeds.feeds[0]).model_copy(update=update)


MakeSensor = Callable[..., dg.SensorDefinition]


@pytest.fixture(scope="module")
def make_sensor(tmp_path_factory: pytest.TempPathFactory, feeds: FeedsFile, keys: FeedKeys) -> MakeSensor:
    """The feed's status sensor for a destination config and retry settings (the feed's own by
    default); each tick gets the test's own vendor as its resource."""
    home = tmp_path_factory.mktemp("home")
    report_job = dg.define_asset_job(keys.report_job, selection=[keys.failure_report])

    def make(config: DestinationConfig | None = None, retries: RetrySettings | None = None):
        status = build_status_sensor(
            keys,
            report_job,
            config or feeds.destination_for(feeds.feeds[0]),
            retries or feeds.feeds[0].retries,
        )
        # Partitioned run requests are checked against the code location, as the daemon does.
        status.definitions = dg.Definitions(
            assets=build_feed_assets(feeds.feeds[0], feeds),
            jobs=[report_job],
            sensors=[status],
            resources=feed_resources(home, feeds, keys, FakeVendor()),
        )
        return status

    return make


@pytest.fixture(scope="module")
def sensor(make_sensor: MakeSensor) -> dg.SensorDefinition:
    return make_sensor()


def tick(
    sensor: dg.SensorDefinition,
    instance: dg.DagsterInstance,
    vendor: FakeVendor,
    cursor: str | None,
    *,
    launch: dg.DagsterRunStatus | None = STARTED,
):
    """One evaluation, as the daemon does it; each run request becomes a run in ``launch`` status
    (``None``: the test runs the requests itself). A run key is never launched twice."""
    context = dg.build_sensor_context(
        instance=instance,
        instance_ref=instance.get_ref(),
        cursor=cursor,
        sensor_name=sensor.name,
        resources={"destination_cxi": vendor},
        definitions=sensor.definitions,
    )
    result = sensor.evaluate_tick(context)
    TICK_STATE[id(result)] = in_flight(instance, FEED)
    for request in result.run_requests if launch is not None else []:
        assert not instance.get_run_records(dg.RunsFilter(tags={RUN_KEY_TAG: request.run_key}))
        instance.add_run(
            dg.DagsterRun(
                job_name=sensor.job_name,
                run_id=make_new_run_id(),
                tags={**request.tags, RUN_KEY_TAG: request.run_key, PARTITION_TAG: request.partition_key},
                status=launch,
            )
        )
    return result


def record_import(
    instance: dg.DagsterInstance, keys: FeedKeys, partition: str, handle: JobHandle, *, reused: bool = False
) -> None:
    """The materialization ``import_job`` writes, with the metadata it writes."""
    instance.add_dynamic_partitions(keys.partitions.name, [partition])
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=keys.import_job, partition=partition, metadata=_handle_metadata(handle, reused=reused)
        )
    )


def record_report(
    instance: dg.DagsterInstance, keys: FeedKeys, partition: str, import_key: str | None
) -> None:
    """The materialization ``failure_report`` writes; it names the import it reports."""
    metadata = {"outcome": "completed"} | ({"import_key": import_key} if import_key else {})
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=keys.failure_report, partition=partition, metadata=metadata)
    )


def make_handle(
    vendor: FakeVendor,
    partition: str,
    *job_ids: str,
    state: JobState = JobState.RUNNING,
    submitted_at: float | None = None,
) -> JobHandle:
    for job_id in job_ids:
        vendor.states[job_id] = state
    jobs = [ChunkJob(job_id=j, first_row=i, row_count=1) for i, j in enumerate(job_ids)]
    return JobHandle(
        vendor="communicate_xi",
        feed=FEED,
        partition=partition,
        jobs=jobs,
        submitted_rows=len(jobs),
        **({"submitted_at": submitted_at} if submitted_at is not None else {}),
    )


TICK_STATE: dict[int, dict[str, dict]] = {}
"""The imports the sensor tracked right after each tick (the state lives in the instance)."""


def imports_of(result) -> dict[str, dict]:
    return TICK_STATE[id(result)]


def logged(capfd: pytest.CaptureFixture, needle: str) -> list[str]:
    """Lines of the sensor's log (Dagster's console handler writes to stderr) containing ``needle``."""
    return [line for line in capfd.readouterr().err.splitlines() if needle in line]


# --- following imports --------------------------------------------------------------------------


def test_nothing_in_flight_skips_with_a_small_cursor(sensor, instance, vendor) -> None:
    result = tick(sensor, instance, vendor, None)

    assert result.run_requests == []
    assert result.skip_message == "no import in flight"
    assert json.loads(result.cursor) == {"after": None, "in_flight": 0, "awaiting_report": 0}
    assert vendor.opened == 0  # no client is built when there is nothing to poll


def test_the_earlier_cursor_is_read_again_from_the_start(keys, sensor, instance, vendor) -> None:
    record_import(instance, keys, "a.csv@0000000001", make_handle(vendor, "a.csv@0000000001", "J1"))
    earlier = json.dumps({"after": 10**9, "inflight": {}})

    result = tick(sensor, instance, vendor, earlier)

    assert list(imports_of(result)) == ["J1"] and vendor.polled == ["J1"]
    assert json.loads(result.cursor)["in_flight"] == 1


def test_real_import_job_is_polled_until_it_ends_then_its_report_ends_the_tracking(
    tmp_path: Path, feeds: FeedsFile, keys: FeedKeys, sensor, instance, vendor
) -> None:
    csv = Path(feeds.sources["hr_drop"].path) / "employees.csv"
    csv.write_text("ID,Email\nE1,a@x.org\nE2,b@x.org\nE3,bad\n", "utf-8")
    old = time.time() - 3600
    os.utime(csv, (old, old))
    partition = partition_key(csv.name, hash_file(csv))
    instance.add_dynamic_partitions(keys.partitions.name, [partition])
    resources = feed_resources(tmp_path / "home", feeds, keys, vendor)
    materialized = dg.materialize(
        build_feed_assets(feeds.feeds[0], feeds),
        selection=dg.AssetSelection.assets(
            keys.hr_file, keys.validated_rows, keys.rejected_rows, keys.import_job
        ),
        partition_key=partition,
        instance=instance,
        resources=resources,
    )
    assert materialized.success
    assert vendor.submitted[0]["unique_id"].tolist() == ["E1", "E2"]
    key = "job-1-0+job-1-1"

    running = tick(sensor, instance, vendor, None, launch=None)

    assert running.run_requests == []
    state = json.loads(running.cursor)
    assert state == {"after": state["after"], "in_flight": 1, "awaiting_report": 0}
    assert isinstance(state["after"], int) and list(imports_of(running)) == [key]
    entry = imports_of(running)[key]
    assert set(entry) == ENTRY_FIELDS | {"last"} and entry["last"] == "vendor_running"
    assert entry["p"] == partition and entry["final"] is None and entry["err"] == 0 and entry["polled"] > 0
    assert vendor.polled == [key]
    assert vendor.opened == 2 and vendor.closed == 1  # the submit's client closed, the tick's kept
    assert vendor.retries[-1] is POLL_RETRY  # the sensor's client never sleeps on Retry-After

    vendor.states["job-1-0"] = JobState.SUCCEEDED
    vendor.states["job-1-1"] = JobState.FAILED
    ended = tick(sensor, instance, vendor, running.cursor, launch=None)

    assert [(r.partition_key, r.run_key) for r in ended.run_requests] == [(partition, f"{key}:ended")]
    tags = ended.run_requests[0].tags
    assert tags[IMPORT_TAG] == key
    ours = {k: v for k, v in tags.items() if k.startswith("audience_pipeline/")}
    assert ours == {IMPORT_TAG: key}  # no vendor word in tags: the report's outcome may contradict it
    config = ended.run_requests[0].run_config["ops"][keys.failure_report.to_python_identifier()]["config"]
    assert config == {"vendor_status": "vendor_failed", "job_state": "failed", "detail": ""}
    assert imports_of(ended)[key]["final"] == "vendor_failed"
    assert imports_of(ended)[key]["att"] == 1

    # The daemon runs the requested report job; its materialization names the import.
    report = sensor.definitions.resolve_job_def(keys.report_job).execute_in_process(
        instance=instance,
        partition_key=partition,
        tags={**tags, RUN_KEY_TAG: ended.run_requests[0].run_key},
        run_config=ended.run_requests[0].run_config,
        resources=resources,
        raise_on_error=False,
    )
    assert report.success
    assert instance.get_run_by_id(report.run_id).tags[OUTCOME_TAG] == "completed_with_failures"
    polls = len(vendor.polled)  # the sensor's two: the report takes the final state from its config
    reported = tick(sensor, instance, vendor, ended.cursor, launch=None)

    assert reported.run_requests == [] and imports_of(reported) == {}
    assert len(vendor.polled) == polls == 2  # a finished import is not polled again
    quiet = tick(sensor, instance, vendor, reported.cursor, launch=None)
    assert quiet.run_requests == [] and quiet.skip_message == "no import in flight"


def test_run_key_is_job_ids_and_final_state_so_a_resubmission_gets_its_own_report(
    keys, sensor, instance, vendor, capfd
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

    assert [r.run_key for r in result.run_requests] == ["J2:ended"]
    assert vendor.polled == ["J1", "J2"]  # the superseded import is no longer polled
    assert list(imports_of(result)) == ["J2"]
    assert len(logged(capfd, "import J1 superseded by J2")) == 1


def test_a_new_import_supersedes_one_still_awaiting_its_report(keys, sensor, instance, vendor) -> None:
    partition = "a.csv@0000000001"
    record_import(instance, keys, partition, make_handle(vendor, partition, "J1", state=JobState.FAILED))
    first = tick(sensor, instance, vendor, None, launch=FAILURE)
    assert [r.run_key for r in first.run_requests] == ["J1:ended"]
    record_import(instance, keys, partition, make_handle(vendor, partition, "J2"))

    second = tick(sensor, instance, vendor, first.cursor)

    assert second.run_requests == []  # J1's failed report is not retried: J2 replaced it
    assert list(imports_of(second)) == ["J2"]


def test_nothing_submitted_ends_without_asking_the_vendor(keys, sensor, instance, vendor) -> None:
    empty = JobHandle(
        vendor="communicate_xi", feed=FEED, partition="e.csv@0000000001", jobs=[], submitted_rows=0
    )
    record_import(instance, keys, "e.csv@0000000001", empty)

    result = tick(sensor, instance, vendor, None)

    assert [(r.partition_key, r.run_key) for r in result.run_requests] == [
        ("e.csv@0000000001", f"{FEED}:e.csv@0000000001:empty:nothing_submitted")
    ]
    assert result.run_requests[0].tags[FINAL_STATE_TAG] == "nothing_submitted"
    assert vendor.polled == [] and vendor.opened == 0


def test_a_materialization_without_a_handle_is_dropped(keys, sensor, instance, vendor) -> None:
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=keys.import_job, partition="x.csv@0000000001")
    )
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=keys.import_job))  # no partition

    first = tick(sensor, instance, vendor, None)
    second = tick(sensor, instance, vendor, first.cursor)

    assert first.run_requests == [] and vendor.polled == []
    assert imports_of(first) == {} and isinstance(json.loads(first.cursor)["after"], int)
    assert second.skip_message == "no import in flight"


def test_a_rerun_that_reused_a_reported_import_is_not_tracked_again(
    keys, sensor, instance, vendor, capfd
) -> None:
    partition = "a.csv@0000000001"
    handle = make_handle(vendor, partition, "J1", state=JobState.SUCCEEDED)
    record_import(instance, keys, partition, handle)
    first = tick(sensor, instance, vendor, None, launch=dg.DagsterRunStatus.SUCCESS)
    assert [r.run_key for r in first.run_requests] == ["J1:ended"]
    record_report(instance, keys, partition, "J1")
    second = tick(sensor, instance, vendor, first.cursor)
    assert imports_of(second) == {}
    capfd.readouterr()

    record_import(instance, keys, partition, handle, reused=True)
    rerun = tick(sensor, instance, vendor, second.cursor)

    assert rerun.run_requests == [] and imports_of(rerun) == {}
    assert vendor.polled == ["J1"]  # not asked again
    assert len(logged(capfd, f"{partition}: a re-run reused import J1, whose report already exists")) == 1


def test_a_reused_import_without_its_report_is_tracked_until_it_has_one(
    keys, sensor, instance, vendor
) -> None:
    partition = "a.csv@0000000001"
    record_report(instance, keys, partition, "J0")  # an earlier import's report
    record_import(instance, keys, partition, make_handle(vendor, partition, "J1"), reused=True)

    result = tick(sensor, instance, vendor, None)

    assert list(imports_of(result)) == ["J1"] and vendor.polled == ["J1"]


# --- ending imports ------------------------------------------------------------------------------


def test_an_import_past_the_time_limit_is_reported_as_timed_out(
    feeds, keys, make_sensor, instance, vendor
) -> None:
    sensor = make_sensor(destination(feeds, import_timeout_minutes=1))
    handle = make_handle(vendor, "a.csv@0000000001", "J1", submitted_at=time.time() - 10_000)
    record_import(instance, keys, "a.csv@0000000001", handle)

    result = tick(sensor, instance, vendor, None)

    assert [(r.partition_key, r.run_key) for r in result.run_requests] == [
        ("a.csv@0000000001", "J1:timed_out")
    ]
    tags = result.run_requests[0].tags
    assert tags[FINAL_STATE_TAG] == "timed_out" and tags[IMPORT_TAG] == "J1"
    assert tags[FINAL_DETAIL_TAG] == "timed out after 1 min (last vendor status: vendor_running)"
    assert vendor.polled == ["J1"]  # asked once more: it might have ended just now


def test_the_time_limit_is_the_destinations(feeds, keys, make_sensor, instance, vendor, clock) -> None:
    sensor = make_sensor(destination(feeds, import_timeout_minutes=1))
    record_import(instance, keys, "a.csv@0000000001", make_handle(vendor, "a.csv@0000000001", "J1"))

    cursor = None
    for seconds in (0, 30, 29):
        clock.advance(seconds)
        result = tick(sensor, instance, vendor, cursor)
        assert result.run_requests == [], seconds
        cursor = result.cursor
    clock.advance(2)
    late = tick(sensor, instance, vendor, cursor)

    assert [r.run_key for r in late.run_requests] == ["J1:timed_out"]
    assert late.run_requests[0].tags[FINAL_DETAIL_TAG].startswith("timed out after 1 min")
    assert len(vendor.polled) == 4


def test_an_import_that_ends_at_its_time_limit_keeps_the_vendors_word(
    feeds, keys, make_sensor, instance, vendor
) -> None:
    sensor = make_sensor(destination(feeds, import_timeout_minutes=1))
    old = time.time() - 10_000
    record_import(
        instance,
        keys,
        "a.csv@0000000001",
        make_handle(vendor, "a.csv@0000000001", "J1", state=JobState.SUCCEEDED, submitted_at=old),
    )

    result = tick(sensor, instance, vendor, None)

    assert [r.run_key for r in result.run_requests] == ["J1:ended"]
    assert FINAL_DETAIL_TAG not in result.run_requests[0].tags


def test_an_unknown_status_is_logged_by_name_and_polled_again(keys, sensor, instance, vendor, capfd) -> None:
    record_import(instance, keys, "a.csv@0000000001", make_handle(vendor, "a.csv@0000000001", "J1"))
    vendor.states["J1"] = JobState.UNKNOWN
    vendor.words["J1"] = "AWAITING_COMPLIANCE_REVIEW"

    first = tick(sensor, instance, vendor, None)

    assert first.run_requests == [] and imports_of(first)["J1"]["final"] is None
    warnings = logged(capfd, "AWAITING_COMPLIANCE_REVIEW")
    assert len(warnings) == 1 and "a.csv@0000000001" in warnings[0] and "WARNING" in warnings[0]

    second = tick(sensor, instance, vendor, first.cursor)

    assert second.run_requests == [] and vendor.polled == ["J1", "J1"]
    vendor.states["J1"] = JobState.SUCCEEDED
    vendor.words["J1"] = "COMPLETED"
    third = tick(sensor, instance, vendor, second.cursor)
    assert [r.run_key for r in third.run_requests] == ["J1:ended"]


@pytest.mark.parametrize(
    "error",
    [
        not_found(),
        VendorHTTPError("communicate_xi", "GET", "https://x/status", status=400),
        ValueError("not JSON"),
    ],
    ids=["404", "400", "not-the-vendors-answer"],
)
def test_permanent_poll_errors_end_the_import_after_max_poll_errors_ticks(
    feeds, keys, make_sensor, instance, vendor, error: Exception
) -> None:
    sensor = make_sensor(destination(feeds, max_poll_errors=3))
    record_import(instance, keys, "a.csv@0000000001", make_handle(vendor, "a.csv@0000000001", "J1"))
    vendor.errors["J1"] = error

    cursor = None
    for count in (1, 2):
        result = tick(sensor, instance, vendor, cursor)
        assert result.run_requests == []
        assert imports_of(result)["J1"]["err"] == count and imports_of(result)["J1"]["final"] is None
        cursor = result.cursor
    last = tick(sensor, instance, vendor, cursor)

    assert [r.run_key for r in last.run_requests] == ["J1:poll_failed"]
    tags = last.run_requests[0].tags
    assert tags[FINAL_STATE_TAG] == "poll_failed"
    assert tags[FINAL_DETAIL_TAG].startswith("status polls failed 3 times in a row: ")
    assert str(error)[:40] in tags[FINAL_DETAIL_TAG]
    assert len(vendor.polled) == 3
    tick(sensor, instance, vendor, last.cursor)
    assert len(vendor.polled) == 3  # given up on: not polled again


def test_a_successful_poll_resets_the_error_count(feeds, keys, make_sensor, instance, vendor) -> None:
    sensor = make_sensor(destination(feeds, max_poll_errors=3))
    record_import(instance, keys, "a.csv@0000000001", make_handle(vendor, "a.csv@0000000001", "J1"))

    cursor, counts = None, []
    for fails in (True, True, False, True, True):
        if fails:
            vendor.errors["J1"] = not_found()
        else:
            vendor.errors.pop("J1")
        result = tick(sensor, instance, vendor, cursor)
        assert result.run_requests == []
        cursor, counts = result.cursor, [*counts, imports_of(result)["J1"]["err"]]
    assert counts == [1, 2, 0, 1, 2]

    last = tick(sensor, instance, vendor, cursor)
    assert [r.run_key for r in last.run_requests] == ["J1:poll_failed"]


def test_transient_poll_errors_only_end_at_the_time_limit(
    feeds, keys, make_sensor, instance, vendor, clock, capfd
) -> None:
    sensor = make_sensor(destination(feeds, max_poll_errors=2, import_timeout_minutes=10))
    record_import(instance, keys, "a.csv@0000000001", make_handle(vendor, "a.csv@0000000001", "J1"))
    transient = [
        server_error(status=503),
        server_error(status=502),
        server_error(status=408),
        VendorConnectionError("communicate_xi", "GET", "https://x/status/J1", detail="connection reset"),
        server_error(status=500),
    ]

    cursor = None
    for error in transient:
        vendor.errors["J1"] = error
        clock.advance(60)
        result = tick(sensor, instance, vendor, cursor)
        assert result.run_requests == [], error
        assert imports_of(result)["J1"]["err"] == 0 and imports_of(result)["J1"]["final"] is None
        cursor = result.cursor
    warnings = logged(capfd, "status poll failed")
    assert len(warnings) == len(transient) and not any(" in a row)" in w for w in warnings)

    clock.advance(6 * 60)
    late = tick(sensor, instance, vendor, cursor)

    assert [r.run_key for r in late.run_requests] == ["J1:timed_out"]
    assert late.run_requests[0].tags[FINAL_DETAIL_TAG].startswith("timed out after 10 min")
    assert len(vendor.polled) == len(transient) + 1


def test_a_429_defers_to_the_next_tick_without_counting_an_error(
    feeds, keys, make_sensor, instance, vendor, capfd
) -> None:
    sensor = make_sensor(destination(feeds, max_poll_errors=2))
    record_import(instance, keys, "a.csv@0000000001", make_handle(vendor, "a.csv@0000000001", "J1"))
    vendor.errors["J1"] = not_found()
    first = tick(sensor, instance, vendor, None)
    assert imports_of(first)["J1"]["err"] == 1
    cursor = first.cursor

    vendor.errors["J1"] = server_error(status=429)
    for _ in range(3):
        result = tick(sensor, instance, vendor, cursor)
        assert result.run_requests == []
        assert imports_of(result)["J1"]["err"] == 1  # neither counted nor a success
        cursor = result.cursor
    assert len(vendor.polled) == 4  # polled again every tick
    assert len(logged(capfd, "asked to slow down (429)")) == 3

    del vendor.errors["J1"]
    vendor.states["J1"] = JobState.SUCCEEDED
    done = tick(sensor, instance, vendor, cursor)
    assert [r.run_key for r in done.run_requests] == ["J1:ended"]


def test_a_poll_error_does_not_stop_the_other_polls_and_never_shows_a_secret(
    keys, sensor, instance, vendor, capfd
) -> None:
    register_secret(SECRET)
    for name, job in (("a.csv@0000000001", "JA"), ("b.csv@0000000002", "JB"), ("c.csv@0000000003", "JC")):
        record_import(instance, keys, name, make_handle(vendor, name, job, state=JobState.SUCCEEDED))
    vendor.errors["JB"] = RuntimeError(f"bad answer from https://api.example/imports?key={SECRET}")

    first = tick(sensor, instance, vendor, None)

    assert sorted(r.run_key for r in first.run_requests) == ["JA:ended", "JC:ended"]
    assert imports_of(first)["JB"]["final"] is None and imports_of(first)["JB"]["err"] == 1
    output = capfd.readouterr().err
    warnings = [line for line in output.splitlines() if "status poll failed" in line]
    assert len(warnings) == 1 and "b.csv@0000000002" in warnings[0] and "(1 of 5 in a row)" in warnings[0]
    assert "RuntimeError" in warnings[0] and "key=***" in warnings[0] and SECRET not in output

    vendor.errors["JB"] = server_error("JB?key=" + SECRET)
    second = tick(sensor, instance, vendor, first.cursor)
    output = capfd.readouterr().err
    assert "status poll failed" in output and "503" in output and SECRET not in output
    assert SECRET not in second.cursor

    del vendor.errors["JB"]
    third = tick(sensor, instance, vendor, second.cursor)

    assert [r.run_key for r in third.run_requests] == ["JB:ended"]
    assert all(e["final"] == "vendor_succeeded" for e in imports_of(third).values())


# --- capacity ------------------------------------------------------------------------------------


@pytest.fixture
def cap(monkeypatch: pytest.MonkeyPatch) -> int:
    """A small per-tick cap, so that going past it needs a handful of imports, not fifty."""
    assert MAX_POLLS_PER_TICK >= 1000  # the time budget and the vendor limits bound a tick first
    monkeypatch.setattr(status_module, "MAX_POLLS_PER_TICK", 4)
    return 4


def test_polls_are_capped_per_tick_and_new_imports_first(keys, sensor, instance, vendor, cap) -> None:
    names = [f"f{i:03d}.csv@{i:010d}" for i in range(cap + 3)]
    for i, name in enumerate(names):
        record_import(instance, keys, name, make_handle(vendor, name, f"J{i:03d}", state=JobState.SUCCEEDED))

    first = tick(sensor, instance, vendor, None)

    assert sorted(r.partition_key for r in first.run_requests) == names[:cap]
    assert len(vendor.polled) == cap
    waiting = {k for k, e in imports_of(first).items() if e["final"] is None}
    assert waiting == {f"J{i:03d}" for i in range(cap, len(names))}

    second = tick(sensor, instance, vendor, first.cursor)

    assert sorted(r.partition_key for r in second.run_requests) == names[cap:]
    assert len(vendor.polled) == len(names) == len(set(vendor.polled))


def test_least_recently_polled_first_so_long_imports_do_not_starve_newer_ones(
    keys, sensor, instance, vendor, cap, clock
) -> None:
    """More long-running imports than the cap: every import is still polled within a few ticks."""
    stuck = [f"s{i:03d}.csv@{i:010d}" for i in range(cap + 1)]
    for i, name in enumerate(stuck):
        record_import(instance, keys, name, make_handle(vendor, name, f"S{i:03d}"))

    cursor = tick(sensor, instance, vendor, None).cursor  # S000..S003
    record_import(
        instance,
        keys,
        "new.csv@9999999999",
        make_handle(vendor, "new.csv@9999999999", "NEW", state=JobState.SUCCEEDED),
    )
    clock.advance(15)
    second = tick(sensor, instance, vendor, cursor)  # never polled first: S004 and NEW, then S000, S001
    clock.advance(15)
    third = tick(sensor, instance, vendor, second.cursor)  # S002, S003 (oldest), then S000, S001

    assert [r.run_key for r in second.run_requests] == ["NEW:ended"] and not third.run_requests
    assert vendor.polled[:cap] == ["S000", "S001", "S002", "S003"]
    assert sorted(vendor.polled[cap : 2 * cap]) == ["NEW", "S000", "S001", "S004"]
    assert sorted(vendor.polled[2 * cap :]) == ["S000", "S001", "S002", "S003"]
    polled = {k: e["polled"] for k, e in imports_of(third).items()}
    assert polled["S002"] == polled["S003"] == clock.now and polled["S004"] == polled["NEW"] == clock.now - 15


def test_an_import_is_forgotten_once_its_report_exists_so_the_cursor_stays_small(
    keys, sensor, instance, vendor
) -> None:
    cursor = None
    for batch in range(3):
        names = [f"b{batch}-{i:02d}.csv@{batch:05d}{i:05d}" for i in range(8)]
        for i, name in enumerate(names):
            record_import(
                instance, keys, name, make_handle(vendor, name, f"J{batch}-{i}", state=JobState.SUCCEEDED)
            )
        result = tick(sensor, instance, vendor, cursor)
        assert len(result.run_requests) == 8
        for i, name in enumerate(names):
            record_report(instance, keys, name, f"J{batch}-{i}")
        cursor = result.cursor

    done = tick(sensor, instance, vendor, cursor)

    assert len(vendor.polled) == 24 and done.run_requests == []
    state = json.loads(done.cursor)
    assert state == {"after": state["after"], "in_flight": 0, "awaiting_report": 0}
    assert isinstance(state["after"], int) and imports_of(done) == {}


def test_polls_run_concurrently_within_the_destinations_limit_on_clients_kept_across_ticks(
    feeds, keys, make_sensor, instance, vendor
) -> None:
    sensor = make_sensor(destination(feeds, status_polling=StatusPolling(concurrency=4)))
    vendor.delay = 0.05
    for i in range(12):
        name = f"p{i:02d}.csv@{i:010d}"
        record_import(instance, keys, name, make_handle(vendor, name, f"P{i}"))

    tick(sensor, instance, vendor, None)

    assert len(vendor.polled) == 12
    assert 1 < vendor.max_active <= 4
    # Sequential polls would take 12 * delay; four at a time take about 3 * delay.
    assert vendor.last_poll - vendor.first_poll < 8 * vendor.delay
    opened = vendor.opened
    assert 1 <= opened <= 4 and vendor.closed == 0  # one client per worker, kept for the next tick

    tick(sensor, instance, vendor, None)

    assert len(vendor.polled) == 24 and vendor.opened == opened  # no new client on the next tick


def test_feeds_on_one_destination_share_its_concurrency(tmp_path, vendor) -> None:
    """Two feeds importing into one account poll it, together, no harder than its limit."""
    feeds = write_offline_feeds(tmp_path, feeds=2)
    vendor.delay = 0.05
    config = feeds.destination_for(feeds.feeds[0]).model_copy(
        update={"status_polling": StatusPolling(concurrency=3)}
    )
    sensors = []
    with dg.instance_for_test() as instance:
        for feed in feeds.feeds:
            keys = FeedKeys(feed, feeds)
            report_job = dg.define_asset_job(keys.report_job, selection=[keys.failure_report])
            sensor = build_status_sensor(keys, report_job, config, feed.retries)
            sensor.definitions = dg.Definitions(
                assets=build_feed_assets(feed, feeds),
                jobs=[report_job],
                sensors=[sensor],
                resources=feed_resources(tmp_path / "home", feeds, keys, FakeVendor()),
            )
            for i in range(9):
                name = f"{feed.name}{i}.csv@{i:010d}"
                handle = make_handle(vendor, name, f"{feed.name}-{i}").model_copy(update={"feed": feed.name})
                record_import(instance, keys, name, handle)
            sensors.append(sensor)
        with ThreadPoolExecutor(max_workers=2) as pool:  # the daemon may evaluate sensors in threads
            results = list(pool.map(lambda s: tick(s, instance, vendor, None), sensors))

    assert [json.loads(r.cursor)["in_flight"] for r in results] == [9, 9]
    assert len(vendor.polled) == 18
    assert 1 < vendor.max_active <= 3


def test_the_rate_limit_leaves_what_does_not_fit_for_the_next_tick(
    feeds, keys, make_sensor, instance, vendor, monkeypatch
) -> None:
    monkeypatch.setattr(status_module, "TICK_BUDGET_SECONDS", 1.0)
    sensor = make_sensor(
        destination(feeds, status_polling=StatusPolling(concurrency=2, requests_per_second=4))
    )
    names = [f"r{i:02d}.csv@{i:010d}" for i in range(20)]
    for i, name in enumerate(names):
        record_import(instance, keys, name, make_handle(vendor, name, f"R{i:02d}"))

    started = time.monotonic()
    first = tick(sensor, instance, vendor, None)
    elapsed = time.monotonic() - started

    # Four a second for one second, plus a burst of two: the rest is not waited for.
    assert 3 <= len(vendor.polled) <= 7 and elapsed < 4
    polled_first = set(vendor.polled)
    assert {k for k, e in imports_of(first).items() if e["polled"]} == polled_first
    assert json.loads(first.cursor)["in_flight"] == 20

    tick(sensor, instance, vendor, None)

    assert not polled_first & set(vendor.polled[len(polled_first) :])  # the ones left out come first


def test_long_running_imports_are_polled_less_often_but_at_least_every_max_interval(
    feeds, keys, make_sensor, instance, vendor, clock
) -> None:
    sensor = make_sensor(destination(feeds, status_polling=StatusPolling(max_interval_seconds=120)))
    record_import(instance, keys, "new.csv@0000000001", make_handle(vendor, "new.csv@0000000001", "NEW"))
    old = make_handle(vendor, "old.csv@0000000002", "OLD", submitted_at=clock.now - 2 * 3600)
    record_import(instance, keys, "old.csv@0000000002", old)
    mid = make_handle(vendor, "mid.csv@0000000003", "MID", submitted_at=clock.now - 300)
    record_import(instance, keys, "mid.csv@0000000003", mid)

    polls: dict[str, list[float]] = {"NEW": [], "OLD": [], "MID": []}
    cursor, start = None, clock.now
    for _ in range(20):  # five minutes of ticks, 15 s apart
        before = len(vendor.polled)
        cursor = tick(sensor, instance, vendor, cursor).cursor
        for key in vendor.polled[before:]:
            polls[key].append(clock.now - start)
        clock.advance(15)

    assert len(polls["NEW"]) >= 18  # young: every tick (a tenth of a minute-old import's age < 15 s)
    assert polls["OLD"] == [0, 120, 240]  # two hours old: capped at max_interval_seconds
    gaps = [b - a for a, b in zip(polls["MID"], polls["MID"][1:], strict=False)]
    assert gaps and all(30 <= g <= 75 for g in gaps)  # five minutes old: about every 30 s, then more


def test_poll_interval_is_a_tenth_of_the_age_in_whole_ticks_capped() -> None:
    assert poll_interval(0, 120) == poll_interval(149, 120) == 0  # every tick
    assert poll_interval(150, 120) == poll_interval(299, 120) == 15
    assert poll_interval(600, 120) == 60
    assert poll_interval(7200, 120) == 120
    assert poll_interval(-5, 120) == 0  # a vendor clock ahead of ours


def test_the_cursor_stays_small_with_hundreds_in_flight(keys, sensor, instance, vendor) -> None:
    for i in range(300):
        name = f"m{i:03d}.csv@{i:010d}"
        record_import(instance, keys, name, make_handle(vendor, name, f"M{i:03d}-{'x' * 30}"))

    result = tick(sensor, instance, vendor, None)

    assert len(imports_of(result)) == 300 and len(vendor.polled) == 300
    assert len(result.cursor) < 100  # the imports live in the instance, not the cursor


# --- report runs ---------------------------------------------------------------------------------


def test_a_failed_report_run_is_requested_again_at_once_without_backoff(
    keys, make_sensor, instance, vendor
) -> None:
    sensor = make_sensor(retries=RetrySettings(max_attempts=3, backoff_seconds=0))
    record_import(
        instance,
        keys,
        "a.csv@0000000001",
        make_handle(vendor, "a.csv@0000000001", "J1", state=JobState.FAILED),
    )
    first = tick(sensor, instance, vendor, None, launch=FAILURE)

    second = tick(sensor, instance, vendor, first.cursor)

    assert [(r.partition_key, r.run_key) for r in second.run_requests] == [
        ("a.csv@0000000001", "J1:ended#report2")
    ]
    assert second.run_requests[0].tags[IMPORT_TAG] == "J1"
    assert FINAL_STATE_TAG not in second.run_requests[0].tags
    assert second.run_requests[0].run_config["ops"]  # the vendor's word travels in the run config
    assert imports_of(second)["J1"]["att"] == 2
    assert vendor.polled == ["J1"]  # an ended import is not polled for its report


def test_a_report_run_in_progress_is_waited_for(keys, make_sensor, instance, vendor) -> None:
    sensor = make_sensor(retries=RetrySettings(max_attempts=3, backoff_seconds=0))
    record_import(
        instance,
        keys,
        "a.csv@0000000001",
        make_handle(vendor, "a.csv@0000000001", "J1", state=JobState.FAILED),
    )
    first = tick(sensor, instance, vendor, None, launch=STARTED)

    waiting = tick(sensor, instance, vendor, first.cursor)

    assert waiting.run_requests == [] and imports_of(waiting)["J1"]["att"] == 1
    (run,) = [r.dagster_run for r in instance.get_run_records(dg.RunsFilter(tags={IMPORT_TAG: "J1"}))]
    instance.report_run_failed(run, "the report step failed")
    retried = tick(sensor, instance, vendor, waiting.cursor)
    assert [r.run_key for r in retried.run_requests] == ["J1:ended#report2"]


def test_failed_report_runs_are_retried_after_the_backoff_then_given_up(
    keys, make_sensor, instance, vendor, clock, capfd
) -> None:
    sensor = make_sensor(retries=RetrySettings(max_attempts=3, backoff_seconds=60))
    partition = "a.csv@0000000001"
    record_import(instance, keys, partition, make_handle(vendor, partition, "J1", state=JobState.FAILED))

    first = tick(sensor, instance, vendor, None, launch=FAILURE)
    assert [r.run_key for r in first.run_requests] == ["J1:ended"]
    clock.advance(59)
    early = tick(sensor, instance, vendor, first.cursor, launch=FAILURE)
    assert early.run_requests == []  # 60 s after the first failure
    clock.advance(2)
    second = tick(sensor, instance, vendor, early.cursor, launch=FAILURE)
    assert [r.run_key for r in second.run_requests] == ["J1:ended#report2"]
    clock.advance(119)
    early = tick(sensor, instance, vendor, second.cursor, launch=FAILURE)
    assert early.run_requests == []  # doubled: 120 s after the second failure
    clock.advance(2)
    third = tick(sensor, instance, vendor, early.cursor, launch=FAILURE)
    assert [r.run_key for r in third.run_requests] == ["J1:ended#report3"]
    capfd.readouterr()

    clock.advance(10_000)
    given_up = tick(sensor, instance, vendor, third.cursor, launch=FAILURE)

    assert given_up.run_requests == [] and imports_of(given_up) == {}
    errors = logged(capfd, "3 report runs of import J1 ended without its report")
    assert len(errors) == 1 and partition in errors[0] and "ERROR" in errors[0]
    after = tick(sensor, instance, vendor, given_up.cursor)
    assert after.run_requests == [] and after.skip_message == "no import in flight"
    assert len(instance.get_run_records(dg.RunsFilter(tags={IMPORT_TAG: "J1"}))) == 3


def test_the_report_of_that_very_import_ends_the_tracking(keys, make_sensor, instance, vendor) -> None:
    sensor = make_sensor(retries=RetrySettings(max_attempts=3, backoff_seconds=0))
    partition = "a.csv@0000000001"
    record_import(instance, keys, partition, make_handle(vendor, partition, "J1", state=JobState.FAILED))
    first = tick(sensor, instance, vendor, None, launch=FAILURE)

    record_report(instance, keys, partition, "J0")  # another import's report: J1 still has none
    other = tick(sensor, instance, vendor, first.cursor, launch=dg.DagsterRunStatus.SUCCESS)
    assert [r.run_key for r in other.run_requests] == ["J1:ended#report2"]
    assert list(imports_of(other)) == ["J1"]

    record_report(instance, keys, partition, "J1")
    done = tick(sensor, instance, vendor, other.cursor)

    assert done.run_requests == [] and imports_of(done) == {}
    assert vendor.polled == ["J1"]


def test_a_report_written_after_the_import_without_an_import_key_counts(
    keys, sensor, instance, vendor
) -> None:
    """Reports from before ``import_key`` was recorded: a report newer than the import covers it."""
    partition = "a.csv@0000000001"
    record_import(instance, keys, partition, make_handle(vendor, partition, "J1", state=JobState.SUCCEEDED))
    first = tick(sensor, instance, vendor, None, launch=dg.DagsterRunStatus.SUCCESS)
    assert [r.run_key for r in first.run_requests] == ["J1:ended"]

    record_report(instance, keys, partition, None)
    done = tick(sensor, instance, vendor, first.cursor)

    assert done.run_requests == [] and imports_of(done) == {}


def test_a_report_run_that_succeeded_but_left_no_report_is_requested_again(
    keys, make_sensor, instance, vendor, clock
) -> None:
    """The report run ended well, but its report is gone (wiped before the sensor saw it): no
    failed run to count, so the first back-off applies (the tick used to raise on delay(0))."""
    sensor = make_sensor(retries=RetrySettings(max_attempts=3, backoff_seconds=60))
    partition = "a.csv@0000000001"
    record_import(instance, keys, partition, make_handle(vendor, partition, "J1", state=JobState.SUCCEEDED))
    first = tick(sensor, instance, vendor, None, launch=dg.DagsterRunStatus.SUCCESS)
    record_report(instance, keys, partition, "J1")
    instance.wipe_assets([keys.failure_report])

    clock.advance(59)
    early = tick(sensor, instance, vendor, first.cursor)
    clock.advance(2)
    again = tick(sensor, instance, vendor, early.cursor)

    assert early.run_requests == [] and list(imports_of(early)) == ["J1"]
    assert [r.run_key for r in again.run_requests] == ["J1:ended#report2"]


def test_a_report_request_that_never_became_a_run_is_asked_again_with_the_same_key(
    keys, sensor, instance, vendor, clock
) -> None:
    """A tick whose requests were dropped: after LOST_REQUEST_SECONDS, the same run key again
    (the daemon launches a run key once, so this cannot duplicate a run), not a new attempt."""
    partition = "a.csv@0000000001"
    record_import(instance, keys, partition, make_handle(vendor, partition, "J1", state=JobState.SUCCEEDED))
    first = tick(sensor, instance, vendor, None, launch=None)
    assert [r.run_key for r in first.run_requests] == ["J1:ended"]

    clock.advance(LOST_REQUEST_SECONDS - 1)
    pending = tick(sensor, instance, vendor, first.cursor, launch=None)
    clock.advance(2)
    lost = tick(sensor, instance, vendor, pending.cursor)

    assert pending.run_requests == []  # requested, not started yet
    assert [(r.partition_key, r.run_key) for r in lost.run_requests] == [(partition, "J1:ended")]
    assert lost.run_requests[0].tags[IMPORT_TAG] == "J1"
    assert imports_of(lost)["J1"]["att"] == 1 and imports_of(lost)["J1"]["at"] == clock.now
    clock.advance(LOST_REQUEST_SECONDS + 1)
    started = tick(sensor, instance, vendor, lost.cursor)
    assert started.run_requests == []  # its run exists now (STARTED): waited for


def test_a_transient_error_between_permanent_ones_does_not_reset_the_count(
    feeds, keys, make_sensor, instance, vendor
) -> None:
    sensor = make_sensor(destination(feeds, max_poll_errors=2))
    record_import(instance, keys, "a.csv@0000000001", make_handle(vendor, "a.csv@0000000001", "J1"))

    cursor, counts = None, []
    for error in (not_found(), server_error(status=503), not_found()):
        vendor.errors["J1"] = error
        result = tick(sensor, instance, vendor, cursor)
        cursor, counts = result.cursor, [*counts, imports_of(result)["J1"]["err"]]

    assert counts == [1, 1, 2]
    assert [r.run_key for r in result.run_requests] == ["J1:poll_failed"]


def test_a_time_limit_reached_on_a_failed_poll_names_the_last_status_seen(
    feeds, keys, make_sensor, instance, vendor, clock
) -> None:
    sensor = make_sensor(destination(feeds, import_timeout_minutes=1))
    record_import(instance, keys, "a.csv@0000000001", make_handle(vendor, "a.csv@0000000001", "J1"))
    first = tick(sensor, instance, vendor, None)
    vendor.errors["J1"] = server_error(status=503)
    clock.advance(120)

    late = tick(sensor, instance, vendor, first.cursor)

    detail = late.run_requests[0].tags[FINAL_DETAIL_TAG]
    assert detail == "timed out after 1 min (last vendor status: vendor_running)"

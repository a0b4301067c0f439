"""The new-file sensor and the report schedule, evaluated with Dagster's test contexts against a
real drop folder (or an in-memory source where a failure must be staged precisely)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from audience_pipeline.assets import FeedKeys
from audience_pipeline.automation import arrival as sensors
from audience_pipeline.automation.arrival import FileCursor, files_settling
from audience_pipeline.definitions import build_definitions
from audience_pipeline.feeds.model import FeedsFile
from audience_pipeline.redact import register_secret
from audience_pipeline.sources.base import SourceFile, partition_key

FEED = "staff"
SENSOR = f"{FEED}__new_files"
OLD = 1_600_000_000  # an mtime far in the past: stable on first sight


def _feeds(source: dict) -> FeedsFile:
    return FeedsFile.model_validate(
        {
            "sources": {"drop": source},
            "destinations": {
                "cxi": {
                    "type": "communicate_xi",
                    "base_url": "http://127.0.0.1:9/cxi",
                    "api_key": {"env_var": "TEST_CXI_API_KEY"},
                }
            },
            "feeds": [
                {
                    "name": FEED,
                    "source": "drop",
                    "destination": "cxi",
                    "mapping": {"unique_id": "Employee ID", "email": "Email"},
                    "options": {"import_name": "Staff"},
                }
            ],
        }
    )


@pytest.fixture(autouse=True)
def cxi_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination's key comes from the environment, as every secret in a feeds file must."""
    monkeypatch.setenv("TEST_CXI_API_KEY", "k" * 8)


@dataclass
class Harness:
    folder: Path
    feeds: FeedsFile
    defs: dg.Definitions
    instance: dg.DagsterInstance

    @property
    def keys(self) -> FeedKeys:
        return FeedKeys(self.feeds.feeds[0], self.feeds)

    def tick(self, cursor: str | None, source: object | None = None):
        resources = dict(self.defs.resources)
        if source is not None:
            resources["source_drop"] = source
        context = dg.build_sensor_context(
            instance=self.instance,
            instance_ref=self.instance.get_ref(),
            cursor=cursor,
            resources=resources,
            definitions=self.defs,
        )
        result = self.defs.resolve_sensor_def(SENSOR).evaluate_tick(context)
        for request in result.dynamic_partitions_requests or []:
            self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return result

    def write(self, name: str, data: bytes, mtime: float | None = OLD) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    def partitions(self) -> list[str]:
        return self.instance.get_dynamic_partitions(f"{FEED}__files")


@pytest.fixture
def harness_factory(tmp_path: Path):
    instances = []

    def make(**source_options) -> Harness:
        folder = tmp_path / "drop"
        folder.mkdir(exist_ok=True)
        feeds = _feeds({"type": "folder", "path": str(folder), **source_options})
        cm = dg.instance_for_test()
        instances.append(cm)
        return Harness(folder, feeds, build_definitions(feeds, tmp_path / "home"), cm.__enter__())

    yield make
    for cm in instances:
        cm.__exit__(None, None, None)


@pytest.fixture
def harness(harness_factory) -> Harness:
    return harness_factory()


def _key(name: str, data: bytes, *, again: bool = False) -> str:
    """A file's partition key: its name for a first content, with 8 hex chars of sha256 ``again``."""
    return partition_key(name, hashlib.sha256(data).hexdigest()) if again else name


def test_a_fresh_file_waits_one_listing_then_becomes_a_partition(harness: Harness) -> None:
    data = b"Employee ID,Email\nE1,a@example.com\n"
    harness.write("a.csv", data, mtime=None)

    first = harness.tick(None)

    assert not first.run_requests and harness.partitions() == []
    assert files_settling(first.cursor) == ["a.csv"]
    assert "not complete yet" in first.skip_message and "a.csv" in first.skip_message

    second = harness.tick(first.cursor)

    assert [(r.partition_key, r.run_key) for r in second.run_requests] == [(_key("a.csv", data),) * 2]
    assert harness.partitions() == [_key("a.csv", data)]
    assert files_settling(second.cursor) == []
    assert not harness.tick(second.cursor).run_requests


def test_a_file_still_growing_is_not_taken_half_written(harness: Harness) -> None:
    path = harness.write("a.csv", b"Employee ID,Email\nE1,a@example.com\n", mtime=None)
    cursor = harness.tick(None).cursor
    with path.open("ab") as fh:
        fh.write(b"E2,b@example.com\n")

    grown = harness.tick(cursor)

    assert not grown.run_requests and files_settling(grown.cursor) == ["a.csv"]
    final = harness.tick(grown.cursor)
    assert [r.partition_key for r in final.run_requests] == [_key("a.csv", path.read_bytes())]


def test_an_old_file_is_stable_on_first_sight_and_a_changed_one_is_a_new_partition(harness: Harness) -> None:
    harness.write("a.csv", b"v1\n")

    first = harness.tick(None)

    assert [r.partition_key for r in first.run_requests] == [_key("a.csv", b"v1\n")]
    harness.write("a.csv", b"version 2\n", mtime=OLD + 60)
    second = harness.tick(first.cursor)
    assert [r.partition_key for r in second.run_requests] == [_key("a.csv", b"version 2\n", again=True)]
    assert len(harness.partitions()) == 2


def test_stable_after_zero_takes_files_on_first_sight(harness_factory) -> None:
    harness = harness_factory(stable_after_seconds=0)
    harness.write("a.csv", b"x\n", mtime=None)
    assert len(harness.tick(None).run_requests) == 1


def test_ready_marker_decides_alone(harness_factory) -> None:
    harness = harness_factory(ready_marker=".done")
    harness.write("a.csv", b"a\n")  # old, but no marker: not ready however long it waits
    harness.write("b.csv", b"b\n", mtime=None)
    harness.write("b.csv.done", b"")
    harness.write("c.csv", b"c\n", mtime=None)
    harness.write("c.done", b"")

    first = harness.tick(None)
    second = harness.tick(first.cursor)

    assert sorted(r.partition_key for r in first.run_requests) == [
        _key("b.csv", b"b\n"),
        _key("c.csv", b"c\n"),
    ]
    assert not second.run_requests and files_settling(second.cursor) == ["a.csv"]


def test_cursor_forgets_files_that_disappeared(harness: Harness) -> None:
    for i in range(5):
        harness.write(f"f{i}.csv", f"{i}\n".encode())
    cursor = harness.tick(None).cursor
    for i in range(4):
        (harness.folder / f"f{i}.csv").unlink()

    state = FileCursor.parse(harness.tick(cursor).cursor)

    assert list(state.files) == ["f4.csv"]
    assert state.files["f4.csv"][2] == hashlib.sha256(b"4\n").hexdigest()[:16]


def test_source_down_skips_with_the_redacted_error_and_keeps_the_cursor(harness: Harness, capfd) -> None:
    secret = "folder-secret-4c1d9e7a"
    register_secret(secret)

    class Down:
        stable_after_seconds = 0.0

        def list_files(self) -> list[SourceFile]:
            raise ConnectionError(f"connect to 10.0.0.5 with password {secret} refused")

        def describe(self) -> str:
            return "sftp hr@10.0.0.5:22:outbound"

    cursor = FileCursor(files={"a.csv": [3, 4, "0123456789"]}, after=7).dump()

    result = harness.tick(cursor, source=Down())

    assert result.cursor == cursor
    assert not result.run_requests
    assert result.skip_message.startswith("sftp hr@10.0.0.5:22:outbound is unavailable: ")
    assert secret not in result.skip_message and "***" in result.skip_message
    logged = capfd.readouterr().err  # the sensor's tick log (console handler of context.log)
    assert "WARNING" in logged and "is unavailable" in logged and secret not in logged


def test_a_file_that_cannot_be_read_stays_pending_and_others_go_on(harness: Harness) -> None:
    class Flaky:
        stable_after_seconds = 0.0
        broken = True

        def list_files(self) -> list[SourceFile]:
            return [SourceFile("a.csv", 2, 1), SourceFile("b.csv", 2, 1)]

        def open(self, name: str):
            if name == "a.csv" and self.broken:
                raise OSError("read timed out")
            return io.BytesIO(name.encode())

        def describe(self) -> str:
            return "flaky"

    source = Flaky()
    first = harness.tick(None, source=source)
    assert "cannot read a.csv from flaky: read timed out" in first.skip_message
    assert files_settling(first.cursor) == ["a.csv", "b.csv"]  # stops at the first failure

    source.broken = False
    second = harness.tick(first.cursor, source=source)
    assert sorted(r.partition_key for r in second.run_requests) == [
        _key("a.csv", b"a.csv"),
        _key("b.csv", b"b.csv"),
    ]


def test_hashing_stops_at_the_time_budget(harness: Harness, monkeypatch) -> None:
    monkeypatch.setattr(sensors, "HASH_BUDGET_SECONDS", 0.0)
    for i in range(3):
        harness.write(f"f{i}.csv", f"{i}\n".encode())

    cursor, taken = None, []
    for _ in range(3):
        result = harness.tick(cursor)
        cursor = result.cursor
        taken.append(len(result.run_requests))

    assert taken == [1, 1, 1] and len(harness.partitions()) == 3


def test_earlier_cursor_format_is_read(harness: Harness) -> None:
    harness.write("a.csv", b"x\n")
    key = partition_key("a.csv", hashlib.sha256(b"x\n").hexdigest(), 10)  # an earlier release's key
    harness.instance.add_dynamic_partitions(f"{FEED}__files", [key])
    st = (harness.folder / "a.csv").stat()
    old = json.dumps({"a.csv": [st.st_size, st.st_mtime_ns, key]})

    result = harness.tick(old)

    assert not result.run_requests and result.skip_message == "no new files"
    assert FileCursor.parse(result.cursor).files["a.csv"][2] == key.rpartition("@")[2]


def test_imported_files_are_moved_once_and_new_content_under_the_name_stays(harness_factory) -> None:
    harness = harness_factory(move_processed_to="processed")
    harness.write("a.csv", b"a\n")
    harness.write("b.csv", b"b\n")
    cursor = harness.tick(None).cursor
    keys = harness.keys
    for name, data in (("a.csv", b"a\n"), ("b.csv", b"b\n")):
        harness.instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=keys.import_job, partition=_key(name, data))
        )
    harness.write("b.csv", b"b, corrected\n", mtime=OLD + 5)  # replaced before the sensor ran

    result = harness.tick(cursor)

    assert (harness.folder / "processed" / "a.csv").read_bytes() == b"a\n"
    assert not (harness.folder / "a.csv").exists()
    assert (harness.folder / "b.csv").read_bytes() == b"b, corrected\n"
    assert [r.partition_key for r in result.run_requests] == [_key("b.csv", b"b, corrected\n", again=True)]
    after = json.loads(result.cursor)["after"]
    assert after is not None
    assert json.loads(harness.tick(result.cursor).cursor)["after"] == after


class MemoryReport:
    """An in-memory report source, so the schedule's logic is tested without a network."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.down = False
        self.file_name = "workers.csv"

    def list_files(self) -> list[SourceFile]:
        return [SourceFile(self.file_name, -1, 0)]

    def open(self, name: str):
        if self.down:
            raise ConnectionError("connection refused")
        return io.BytesIO(self.body)

    def describe(self) -> str:
        return "report GET http://hr.example/report"


def test_report_schedule_imports_only_new_content(tmp_path: Path) -> None:
    feeds = _feeds({"type": "http_report", "url": "http://hr.example/report", "file_name": "workers.csv"})
    defs = build_definitions(feeds, tmp_path / "home")
    schedule = defs.resolve_schedule_def(f"{FEED}__report_pull")
    assert schedule.cron_schedule == "0 6 * * *"
    assert {s.name for s in defs.sensors} == {f"{FEED}__import_status", f"{FEED}__ingest_retries"}
    source = MemoryReport(b"Employee ID,Email\nE1,a@example.com\n")
    with dg.instance_for_test() as instance:

        def pull():
            with dg.build_schedule_context(
                instance=instance,
                resources={**defs.resources, "source_drop": source},
                repository_def=defs.get_repository_def(),
            ) as context:
                return schedule.evaluate_tick(context)

        first = pull()
        key = _key("workers.csv", source.body)
        assert [r.partition_key for r in first.run_requests] == [key]
        assert first.run_requests[0].run_key == key
        assert instance.get_dynamic_partitions(f"{FEED}__files") == [key]
        staged = tmp_path / "home" / "staging" / FEED / key / "workers.csv"
        assert staged.read_bytes() == source.body

        unchanged = pull()
        assert not unchanged.run_requests and "unchanged" in unchanged.skip_message

        source.down = True
        down = pull()
        assert down.skip_message == ("report GET http://hr.example/report is unavailable: connection refused")

        source.down, source.body = False, source.body + b"E2,b@example.com\n"
        changed = pull()
        assert [r.partition_key for r in changed.run_requests] == [
            _key("workers.csv", source.body, again=True)
        ]
        assert len(instance.get_dynamic_partitions(f"{FEED}__files")) == 2
        pulls = [
            p.name for p in (tmp_path / "home" / "staging" / FEED).iterdir() if p.name.startswith(".pull")
        ]
        assert pulls == []


def test_settling_is_empty_for_other_cursors() -> None:
    assert files_settling(None) == []
    assert files_settling('{"after": 3, "inflight": {}}') == []
    assert files_settling("not json") == []
    assert time.time() > OLD


def test_an_unreadable_cursor_starts_over_without_rerunning_known_files(harness: Harness) -> None:
    harness.write("a.csv", b"x\n")
    first = harness.tick(None)
    assert len(first.run_requests) == 1

    again = harness.tick("{not json")

    assert not again.run_requests and FileCursor.parse(again.cursor).files["a.csv"][2]


def _stage(harness: Harness, partition: str) -> dg.ExecuteInProcessResult:
    """Materialize only ``hr_file`` for ``partition``: staging and its content check."""
    return dg.materialize(
        [harness.defs.resolve_assets_def(harness.keys.hr_file)],
        partition_key=partition,
        instance=harness.instance,  # the resolved asset carries the definitions' resources
        raise_on_error=False,
    )


def test_partition_keys_are_file_names_and_a_hash_only_for_a_name_seen_before(harness: Harness) -> None:
    harness.write("employees_2026-11-01.csv", b"v1\n")
    first = harness.tick(None)
    assert harness.partitions() == ["employees_2026-11-01.csv"]

    (harness.folder / "employees_2026-11-01.csv").unlink()  # moved away: the cursor forgets it
    gone = harness.tick(first.cursor)
    harness.write("employees_2026-11-01.csv", b"v1\n", mtime=OLD + 30)  # the same bytes again
    again = harness.tick(gone.cursor)
    assert not again.run_requests  # recognised from the content recorded for the bare key

    harness.write("employees_2026-11-01.csv", b"v2\n", mtime=OLD + 60)
    changed = harness.tick(again.cursor)
    expected = "employees_2026-11-01.csv@" + hashlib.sha256(b"v2\n").hexdigest()[:8]
    assert [r.partition_key for r in changed.run_requests] == [expected]
    assert sorted(harness.partitions()) == ["employees_2026-11-01.csv", expected]


def test_hr_file_refuses_content_that_changed_after_its_bare_key_was_made(harness: Harness) -> None:
    harness.write("a.csv", b"Employee ID,Email\nE1,a@example.com\n")
    harness.tick(None)
    assert harness.partitions() == ["a.csv"]
    harness.write("a.csv", b"Employee ID,Email\nE2,b@example.com\n", mtime=OLD + 60)  # before the run

    result = _stage(harness, "a.csv")

    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert "a.csv changed since it was discovered" in failure.step_failure_data.error.message


def test_hr_file_runs_keys_of_earlier_releases_and_keys_added_by_hand(harness: Harness) -> None:
    from audience_pipeline.partition_content import expected_content

    data = b"Employee ID,Email\nE1,a@example.com\n"
    harness.write("a.csv", data)
    legacy = partition_key("a.csv", hashlib.sha256(data).hexdigest(), 10)  # <name>@<10 hex chars>
    harness.instance.add_dynamic_partitions(f"{FEED}__files", [legacy, "a.csv"])

    assert _stage(harness, legacy).success
    staged = harness.instance.fetch_materializations(harness.keys.hr_file, limit=1).records[0]
    assert staged.asset_materialization.metadata["sha256"].value == hashlib.sha256(data).hexdigest()

    assert expected_content(harness.instance, FEED, "a.csv") is None  # added by hand: nothing recorded
    assert _stage(harness, "a.csv").success  # taken as it is, and recorded for later runs
    assert expected_content(harness.instance, FEED, "a.csv") == hashlib.sha256(data).hexdigest()

"""Yesmail end to end through Dagster: sensors, runs, checks and the failure report against the
sandbox over real HTTP (success with per-member failures, 413 splitting, a failed ticket,
ignored members, exact accounting, no credential anywhere)."""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import httpx
import pytest

from audience_pipeline.assets import ACCOUNTING_CHECK, latest_metadata
from audience_pipeline.definitions import build_definitions
from audience_pipeline.feeds.loader import load_feeds
from audience_pipeline.runner import SensorDriver
from audience_pipeline.sandbox import SandboxServer, SandboxSettings
from audience_pipeline_tests.integration.conftest import DEMO_CSV

pytestmark = pytest.mark.integration

FEED = "staff_yesmail"
USER = "itest-ym-user-0c5e9a71"
KEY = "itest-ym-key-b38f2d6e94"
SANDBOX_MAX_MEMBERS = 150
KEY_OF = lambda *parts: dg.AssetKey([FEED, *parts])  # noqa: E731

FEEDS_YAML = """
sources:
  drop: {{type: folder, path: {incoming}, glob: "*.csv", stable_after_seconds: 0}}
destinations:
  ym:
    type: yesmail
    base_url: ${{ITEST_YM_URL}}
    api_user: ${{ITEST_YM_USER}}
    api_key: ${{ITEST_YM_KEY}}
    max_members_per_request: {per_request}
    max_in_flight: 3
feeds:
  - name: {feed}
    source: drop
    destination: ym
    mapping:
      unique_id: Employee ID
      email: Email
      mobile_phone: Mobile Phone
      first_name: First Name
      last_name: Last Name
      attributes:
        department: Department
        start_date: {{header: Start Date, type: date}}
    options:
      target_list: all-staff
      import_type: {import_type}
      error_threshold: {threshold}
      attributes: {{FIRSTNAME: first_name, LASTNAME: last_name, DEPARTMENT: department}}
"""


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    settings = SandboxSettings(
        pace_seconds=0.05, yesmail_api_user=USER, yesmail_api_key=KEY, yesmail_max_members=SANDBOX_MAX_MEMBERS
    )
    with SandboxServer(settings) as server:
        yield server


@dataclass
class Run:
    root: Path
    instance: dg.DagsterInstance
    driver: SensorDriver

    def ingest(self) -> list[dg.DagsterRun]:
        (self.root / "incoming" / "employees.csv").write_bytes(DEMO_CSV.read_bytes())
        return self.driver.tick(f"{FEED}__new_files")

    def reports(self, timeout: float = 20.0) -> list[dg.DagsterRun]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = self.driver.tick(f"{FEED}__import_status")
            if runs:
                return runs
            time.sleep(0.05)
        raise AssertionError("no report run")

    @property
    def partition(self) -> str:
        (partition,) = self.instance.get_dynamic_partitions(f"{FEED}__files")
        return partition

    def metadata(self, asset: str) -> dict:
        return latest_metadata(self.instance, KEY_OF(asset), self.partition)

    def check(self, asset: str, name: str):
        key = dg.AssetCheckKey(KEY_OF(asset), name)
        return self.instance.event_log_storage.get_latest_asset_check_execution_by_key([key]).get(key)

    def event_text(self) -> str:
        chunks = []
        for run in self.instance.get_runs():
            for entry in self.instance.all_logs(run.run_id):
                chunks.append(entry.user_message or "")
                if entry.dagster_event is not None:
                    chunks.append(repr(entry.dagster_event))
        return "\n".join(chunks)


@pytest.fixture
def make_run(
    tmp_path: Path, sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Run]]:
    sandbox.reset()
    monkeypatch.setenv("ITEST_YM_URL", sandbox.vendor_url("yesmail"))
    monkeypatch.setenv("ITEST_YM_USER", USER)
    monkeypatch.setenv("ITEST_YM_KEY", KEY)
    contexts: list = []

    def make(per_request: int = 1000, import_type: str = "update", threshold: str | int = 0) -> Run:
        (tmp_path / "incoming").mkdir()
        feeds_file = tmp_path / "feeds.yaml"
        text = FEEDS_YAML.format(
            incoming=tmp_path / "incoming",
            per_request=per_request,
            feed=FEED,
            import_type=import_type,
            threshold=f'"{threshold}"' if isinstance(threshold, str) else threshold,
        )
        feeds_file.write_text(text, "utf-8")
        feeds = load_feeds(feeds_file)
        defs = build_definitions(feeds, tmp_path / "home")
        (tmp_path / "dagster").mkdir()
        context = dg.instance_for_test(temp_dir=str(tmp_path / "dagster"))
        instance = context.__enter__()
        contexts.append(context)
        return Run(tmp_path, instance, SensorDriver(defs, instance, log_level="DEBUG"))

    yield make
    for context in contexts:
        context.__exit__(None, None, None)


def _report_rows(report: dict) -> list[dict[str, str]]:
    with open(report["report_path"], newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _accounting_ok(run: Run) -> None:
    report = run.metadata("failure_report")
    total = report["imported"] + report["rejected_by_validation"] + report["failed_at_target"]
    assert total + report["ignored_by_target"] == report["source_rows"] == 200
    assert run.check("failure_report", ACCOUNTING_CHECK).status.value == "SUCCEEDED"


def test_push_reports_unknown_subscribers_and_adds_up(
    make_run, sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    run = make_run(per_request=100)

    (ingest,) = run.ingest()
    assert ingest.is_success
    handle = run.metadata("import_job")["job_handle"]
    assert [(j["first_row"], j["row_count"]) for j in handle["jobs"]] == [(0, 100), (100, 94)]
    assert handle["submitted_rows"] == 194
    (report_run,) = run.reports()

    assert report_run.is_success
    tickets = "+".join(j["job_id"] for j in handle["jobs"])
    assert report_run.tags["dagster/run_key"] == f"{tickets}:completed"
    report = run.metadata("failure_report")
    assert (report["imported"], report["rejected_by_validation"], report["failed_at_target"]) == (192, 6, 2)
    assert report["vendor_counts"]["processed"] == 192
    target = [r for r in _report_rows(report) if r["stage"] == "target"]
    assert [(r["source_line"], r["unique_id"], r["outcome"]) for r in target] == [
        ("163", "E01161", "failed"),
        ("180", "E01178", "failed"),
    ]
    assert target[0]["reason"] == "Subscriber 'diego.novak@acme-corp.invalid' does not exist"
    _accounting_ok(run)
    with httpx.Client(headers={"Api-User": USER, "Api-Key": KEY}) as client:
        listed = client.get(sandbox.vendor_url("yesmail") + "/v2/target-lists/all-staff")
    assert listed.json()["memberCount"] == 192

    text = run.event_text()
    files = [p for p in run.root.rglob("*") if p.is_file() and p.suffix != ".yaml"]
    for secret in (USER, KEY):
        assert secret not in text and secret not in caplog.text
        assert not [p for p in files if secret.encode() in p.read_bytes()]


def test_413_splits_batches_and_every_row_is_still_accounted(make_run) -> None:
    run = make_run(per_request=1000)

    (ingest,) = run.ingest()
    assert ingest.is_success
    handle = run.metadata("import_job")["job_handle"]
    assert [(j["first_row"], j["row_count"]) for j in handle["jobs"]] == [(0, 97), (97, 97)]
    assert handle["extra"]["members_per_request"] == 97
    (report_run,) = run.reports()
    assert report_run.is_success
    report = run.metadata("failure_report")
    assert (report["imported"], report["failed_at_target"]) == (192, 2)
    _accounting_ok(run)


def test_error_threshold_fails_a_ticket_and_its_unprocessed_rows(make_run) -> None:
    run = make_run(per_request=50, threshold=1)

    run.ingest()
    (report_run,) = run.reports()

    assert report_run.tags["dagster/run_key"].endswith(":failed")
    report = run.metadata("failure_report")
    assert report["vendor_status"] == "failed"
    target = [r for r in _report_rows(report) if r["stage"] == "target"]
    stopped = [r for r in target if r["reason"].startswith("not imported: Yesmail stopped this batch")]
    assert target[0]["source_line"] == "163" and "does not exist" in target[0]["reason"]
    assert stopped and all(int(r["source_line"]) > 163 for r in stopped)
    assert report["failed_at_target"] == len(target) > 2
    assert report["imported"] == 194 - len(target) == report["vendor_counts"]["processed"]
    _accounting_ok(run)


def test_ignore_keeps_members_already_on_the_list(make_run, sandbox: SandboxServer) -> None:
    already = ["priya.ibrahim@acme-corp.com", "olivia.lopez@acme-corp.com", "sam.costa@acme-corp.com"]
    httpx.put(
        f"{sandbox.url}/_sandbox/yesmail/target-lists/all-staff", json={"members": already}
    ).raise_for_status()
    run = make_run(import_type="ignore")

    run.ingest()
    (report_run,) = run.reports()

    assert report_run.is_success
    report = run.metadata("failure_report")
    assert (report["imported"], report["failed_at_target"], report["ignored_by_target"]) == (189, 2, 3)
    ignored = [r for r in _report_rows(report) if r["outcome"] == "ignored"]
    assert [(r["source_line"], r["unique_id"], r["stage"]) for r in ignored] == [
        ("2", "E01001", "target"),
        ("3", "E01002", "target"),
        ("4", "E01003", "target"),
    ]
    _accounting_ok(run)

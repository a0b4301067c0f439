"""Altcraft end to end through Dagster: sensors, ingest and report runs, checks, against the sandbox.

Covers a partial failure, a clean import followed by updates, requests split by the 10,000-profile
and the 10 MB limits, a task that ends in ``error``, a batch refused with an ``error != 0``
envelope, exact row accounting in every case, and the token kept out of logs, events and files.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import httpx
import pytest

from audience_pipeline.assets import ACCOUNTING_CHECK, latest_metadata
from audience_pipeline.definitions import build_definitions
from audience_pipeline.destinations.altcraft import MAX_REQUEST_BYTES
from audience_pipeline.feeds.loader import load_feeds
from audience_pipeline.runner import SensorDriver
from audience_pipeline.sandbox import SandboxServer, SandboxSettings
from audience_pipeline_tests.integration.conftest import DEMO_CSV

pytestmark = pytest.mark.integration

TOKEN = "itest-altcraft-token-3b9d71e0c4a8"
FEED = "staff_altcraft"
HEADER = "Employee ID,Email,Mobile Phone,First Name,Last Name,Department,Start Date,Office City"
NOTES = [f"note{i}" for i in range(1, 7)]

FEEDS_YAML = """
sources:
  drop:
    type: folder
    path: {incoming}
destinations:
  ac:
    type: altcraft
    base_url: ${{ALTCRAFT_BASE_URL}}
    token: ${{ALTCRAFT_TOKEN}}
feeds:
  - name: {feed}
    source: drop
    destination: ac
    max_rejection_rate: 0.05
    mapping:
      unique_id: Employee ID
      email: Email
      mobile_phone: Mobile Phone
      first_name: First Name
      last_name: Last Name
      attributes:
        department: Department
        start_date: {{header: Start Date, type: date}}
        office_city: Office City
{notes}    options:
      trigger_id: 13
      matching: custom
      field_name: EMPLOYEE_ID
{options}"""


@pytest.fixture(scope="module")
def altcraft_server() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxSettings(pace_seconds=0.05, altcraft_token=TOKEN)) as server:
        yield server


@dataclass
class AltcraftPipeline:
    root: Path
    defs: dg.Definitions
    instance: dg.DagsterInstance
    driver: SensorDriver
    sandbox: SandboxServer

    def drop(self, name: str, content: str | Path) -> None:
        text = content.read_text("utf-8") if isinstance(content, Path) else content
        (self.root / "incoming" / name).write_text(text, "utf-8")

    def ingest(self) -> list[dg.DagsterRun]:
        """Tick the new-file sensor until it starts runs (a file may need two sightings to settle)."""
        for _ in range(3):
            runs = self.driver.tick(f"{FEED}__new_files")
            if runs:
                return runs
        return []

    def wait_for_reports(self, expected: int = 1, timeout: float = 30.0) -> list[dg.DagsterRun]:
        runs: list[dg.DagsterRun] = []
        deadline = time.monotonic() + timeout
        while len(runs) < expected and time.monotonic() < deadline:
            runs += self.driver.tick(f"{FEED}__import_status")
            time.sleep(0.05)
        assert len(runs) == expected, f"expected {expected} report runs, got {len(runs)}"
        return runs

    def metadata(self, asset: str, partition: str | None = None) -> dict:
        partition = partition or self.instance.get_dynamic_partitions(f"{FEED}__files")[-1]
        found = latest_metadata(self.instance, dg.AssetKey([FEED, asset]), partition)
        assert found is not None, f"{asset} was not materialized for {partition}"
        return found

    def report_rows(self) -> list[dict[str, str]]:
        with open(self.metadata("failure_report")["report_path"], newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def accounting_passed(self) -> bool:
        key = dg.AssetCheckKey(dg.AssetKey([FEED, "failure_report"]), ACCOUNTING_CHECK)
        check = self.instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
        return check.status.value == "SUCCEEDED"

    def tasks_in_submission_order(self) -> list[dict]:
        """The sandbox's view of each task, in the handle's row order (batches race each other)."""
        by_id = {t["task_id"]: t for t in self.control("GET", "/tasks")["tasks"]}
        return [by_id[j["job_id"]] for j in self.metadata("import_job")["job_handle"]["jobs"]]

    def control(self, method: str, path: str, **kw) -> dict:
        response = httpx.request(method, f"{self.sandbox.url}/_sandbox/altcraft{path}", timeout=5, **kw)
        response.raise_for_status()
        return response.json()


@pytest.fixture
def make_pipeline(tmp_path: Path, altcraft_server: SandboxServer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ALTCRAFT_BASE_URL", altcraft_server.vendor_url("altcraft"))
    monkeypatch.setenv("ALTCRAFT_TOKEN", TOKEN)
    altcraft_server.reset()
    stack: list = []

    def make(*, notes: bool = False, options: str = "") -> AltcraftPipeline:
        (tmp_path / "incoming").mkdir(exist_ok=True)
        extra = "".join(f"        {n}: {n.title()}\n" for n in NOTES) if notes else ""
        text = FEEDS_YAML.format(
            incoming=tmp_path / "incoming",
            feed=FEED,
            notes=extra,
            options=options or "      skip_triggers: false\n",
        )
        (tmp_path / "feeds.yaml").write_text(text, "utf-8")
        defs = build_definitions(load_feeds(tmp_path / "feeds.yaml"), tmp_path / "home")
        (tmp_path / "dagster").mkdir(exist_ok=True)
        cm = dg.instance_for_test(temp_dir=str(tmp_path / "dagster"))
        stack.append(cm)
        instance = cm.__enter__()
        return AltcraftPipeline(
            tmp_path, defs, instance, SensorDriver(defs, instance, log_level="WARNING"), altcraft_server
        )

    yield make
    for cm in stack:
        cm.__exit__(None, None, None)


def employees(n: int, *, department: str = "Sales", notes: bool = False) -> str:
    """A clean export of ``n`` employees; with ``notes``, six 250-character attributes per row."""
    header = HEADER + ("," + ",".join(n.title() for n in NOTES) if notes else "")
    lines = [header]
    for i in range(n):
        row = (
            f"E{i:06d},user{i}@acme-corp.com,+14155550100,First{i},Last{i},{department},"
            f"2020-01-0{1 + i % 9},Austin"
        )
        if notes:
            row += "," + ",".join(f"{i:06d}{n}".ljust(250, "x") for n in NOTES)
        lines.append(row)
    return "\n".join(lines) + "\n"


def _event_text(instance: dg.DagsterInstance) -> str:
    chunks = []
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id):
            chunks.append(entry.user_message or "")
            if entry.dagster_event is not None:
                chunks.append(repr(entry.dagster_event))
    return "\n".join(chunks)


def test_partial_failure_is_reported_and_the_token_stays_secret(make_pipeline, caplog, capfd) -> None:
    caplog.set_level(logging.DEBUG)
    pipeline = make_pipeline()
    pipeline.drop("employees.csv", DEMO_CSV)

    runs = pipeline.ingest()
    assert len(runs) == 1 and runs[0].is_success
    handle = pipeline.metadata("import_job")["job_handle"]
    assert handle["submitted_rows"] == 194 and len(handle["jobs"]) == 1
    [report_run] = pipeline.wait_for_reports()

    assert report_run.is_success
    assert report_run.tags["dagster/run_key"] == f"{handle['jobs'][0]['job_id']}:completed"
    report = pipeline.metadata("failure_report")
    assert (report["source_rows"], report["rejected_by_validation"], report["imported"]) == (200, 6, 192)
    assert (report["failed_at_target"], report["ignored_by_target"]) == (2, 0)
    assert report["vendor_counts"] == {"created": 192, "updated": 0, "processed": 192, "failed": 2}
    assert report["vendor_status"] == "completed"
    assert pipeline.accounting_passed()
    target = [r for r in pipeline.report_rows() if r["stage"] == "target"]
    assert [(r["source_line"], r["unique_id"], r["reason"]) for r in target] == [
        ("163", "E01161", "Email domain 'acme-corp.invalid' does not accept mail"),
        ("180", "E01178", "Email domain 'acme-corp.invalid' does not accept mail"),
    ]
    [task] = pipeline.control("GET", "/tasks")["tasks"]
    assert (task["profiles"], task["triggered"], task["matching"], task["field_name"]) == (
        194,
        192,
        "custom",
        "EMPLOYEE_ID",
    )
    profiles = pipeline.control("GET", "/profiles")["profiles"]
    assert len(profiles) == 192 and {"E01001", "E01002"} <= {p["EMPLOYEE_ID"] for p in profiles}

    out, err = capfd.readouterr()
    assert "altcraft" in caplog.text.lower()
    for text in (caplog.text, out, err, _event_text(pipeline.instance)):
        assert TOKEN not in text
    assert not any(TOKEN.encode() in p.read_bytes() for p in pipeline.root.rglob("*") if p.is_file())


def test_clean_import_then_a_new_file_updates_the_same_profiles(make_pipeline) -> None:
    pipeline = make_pipeline(options="      skip_triggers: true\n")
    pipeline.drop("staff.csv", employees(50))
    pipeline.ingest()
    pipeline.wait_for_reports()
    first = pipeline.metadata("failure_report")
    assert (first["imported"], first["failed_at_target"], first["dagster/row_count"]) == (50, 0, 0)
    assert first["vendor_counts"]["created"] == 50

    pipeline.drop("staff.csv", employees(50, department="Support"))
    assert len(pipeline.ingest()) == 1
    pipeline.wait_for_reports()

    second = pipeline.metadata("failure_report")
    assert second["vendor_counts"] == {"created": 0, "updated": 50, "processed": 50, "failed": 0}
    assert pipeline.accounting_passed()
    profiles = pipeline.control("GET", "/profiles")["profiles"]
    assert len(profiles) == 50 and {p["department"] for p in profiles} == {"Support"}
    assert [t["triggered"] for t in pipeline.control("GET", "/tasks")["tasks"]] == [0, 0]


def test_more_than_10000_rows_become_two_tasks(make_pipeline) -> None:
    pipeline = make_pipeline()
    pipeline.drop("big.csv", employees(10_050))

    assert pipeline.ingest()[0].is_success
    pipeline.wait_for_reports()

    handle = pipeline.metadata("import_job")["job_handle"]
    assert [(j["first_row"], j["row_count"]) for j in handle["jobs"]] == [(0, 10_000), (10_000, 50)]
    tasks = pipeline.tasks_in_submission_order()
    assert [t["profiles"] for t in tasks] == [10_000, 50]
    report = pipeline.metadata("failure_report")
    assert (report["source_rows"], report["imported"], report["failed_at_target"]) == (10_050, 10_050, 0)
    assert report["vendor_counts"]["processed"] == 10_050
    assert pipeline.accounting_passed()


def test_rows_over_10_mb_are_split_by_measured_size(make_pipeline) -> None:
    pipeline = make_pipeline(notes=True)
    pipeline.drop("wide.csv", employees(7_000, notes=True))

    assert pipeline.ingest()[0].is_success
    pipeline.wait_for_reports()

    tasks = pipeline.tasks_in_submission_order()
    assert len(pipeline.control("GET", "/tasks")["tasks"]) == 2
    assert len(tasks) == 2 and sum(t["profiles"] for t in tasks) == 7_000
    assert all(t["profiles"] < 10_000 for t in tasks)  # the byte limit cut them, not the count
    assert all(t["body_bytes"] <= MAX_REQUEST_BYTES for t in tasks)
    assert tasks[0]["body_bytes"] > MAX_REQUEST_BYTES - 2_000  # filled up to the limit
    handle = pipeline.metadata("import_job")["job_handle"]
    assert [j["row_count"] for j in handle["jobs"]] == [t["profiles"] for t in tasks]
    report = pipeline.metadata("failure_report")
    assert (report["imported"], report["failed_at_target"]) == (7_000, 0)
    assert pipeline.accounting_passed()
    [profile] = [p for p in pipeline.control("GET", "/profiles")["profiles"] if p["EMPLOYEE_ID"] == "E000007"]
    assert profile["note6"] == "000007note6".ljust(250, "x")


def test_task_that_ends_in_error_fails_its_rows(make_pipeline) -> None:
    pipeline = make_pipeline()
    pipeline.control("POST", "/fail-tasks", json={"times": 1, "error_text": "Database is read-only"})
    pipeline.drop("staff.csv", employees(20))
    pipeline.ingest()

    [run] = pipeline.wait_for_reports()

    task_id = pipeline.metadata("import_job")["job_handle"]["jobs"][0]["job_id"]
    assert run.tags["dagster/run_key"] == f"{task_id}:error"
    report = pipeline.metadata("failure_report")
    assert (report["imported"], report["failed_at_target"], report["vendor_status"]) == (0, 20, "error")
    assert pipeline.accounting_passed()
    rows = pipeline.report_rows()
    assert len(rows) == 20 and rows[0]["source_line"] == "2" and rows[0]["unique_id"] == "E000000"
    assert {r["reason"] for r in rows} == {f"Altcraft task {task_id} ended in error: Database is read-only"}


def test_error_envelope_is_a_reported_failure_not_a_success(make_pipeline) -> None:
    pipeline = make_pipeline()
    pipeline.control("POST", "/triggers/13", json={"active": False})
    pipeline.drop("staff.csv", employees(5))

    assert pipeline.ingest()[0].is_success
    [run] = pipeline.wait_for_reports()

    assert run.tags["dagster/run_key"].endswith(":refused")
    report = pipeline.metadata("failure_report")
    assert (report["imported"], report["failed_at_target"], report["vendor_status"]) == (0, 5, "refused")
    assert pipeline.accounting_passed()
    reasons = {r["reason"] for r in pipeline.report_rows()}
    assert reasons == {
        "Altcraft refused the request: Trigger campaign 13 not found or not active (error 404)"
    }
    assert pipeline.control("GET", "/tasks")["tasks"] == []


def test_wrong_token_fails_the_run_without_echoing_it(make_pipeline, monkeypatch, caplog) -> None:
    wrong = "wrong-altcraft-token-77e1c0d9"
    monkeypatch.setenv("ALTCRAFT_TOKEN", wrong)
    caplog.set_level(logging.DEBUG)
    pipeline = make_pipeline()
    pipeline.drop("staff.csv", employees(3))

    runs = pipeline.ingest()

    assert runs[0].status == dg.DagsterRunStatus.FAILURE
    text = _event_text(pipeline.instance)
    assert "401" in text and "Invalid API token" in text
    assert wrong not in text and wrong not in caplog.text
    assert not any(wrong.encode() in p.read_bytes() for p in pipeline.root.rglob("*") if p.is_file())

"""Altcraft end to end through Dagster: sensors, ingest and report runs, checks, against the sandbox.

Covers a partial failure, a clean import followed by updates, requests split by the 10,000-profile
and the 10 MB limits, a task that ends in ``error``, a batch refused with an ``error != 0``
envelope, exact row accounting in every case, and the token kept out of logs, events and files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import dagster as dg
import pytest

from audience_pipeline.destinations.altcraft import MAX_REQUEST_BYTES
from audience_pipeline.sandbox import SandboxSettings
from audience_pipeline_tests.integration.conftest import DEMO_CSV, DEMO_MAPPING, Pipeline, PipelineFactory
from audience_pipeline_tests.integration.leaks import assert_not_leaked, event_text

pytestmark = pytest.mark.integration

TOKEN = "itest-altcraft-token-3b9d71e0c4a8"
FEED = "staff_altcraft"
HEADER = "Employee ID,Email,Mobile Phone,First Name,Last Name,Department,Start Date,Office City"
NOTES = [f"note{i}" for i in range(1, 7)]

FEEDS_YAML = """
sources:
  drop:
    type: folder
    path: incoming
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
{mapping}{notes}    options:
      trigger_id: 13
      matching: custom
      field_name: EMPLOYEE_ID
{options}"""


@pytest.fixture
def sandbox_settings() -> SandboxSettings:
    return SandboxSettings(pace_seconds=0.05, altcraft_token=TOKEN)


@pytest.fixture
def make_pipeline(pipeline_factory: PipelineFactory) -> Callable[..., Pipeline]:
    def make(*, notes: bool = False, options: str = "") -> Pipeline:
        extra = "".join(f"        {n}: {n.title()}\n" for n in NOTES) if notes else ""
        text = FEEDS_YAML.format(
            feed=FEED, mapping=DEMO_MAPPING, notes=extra, options=options or "      skip_triggers: false\n"
        )
        return pipeline_factory(FEED, feeds_text=text, report_timeout=30.0)

    return make


def tasks_in_submission_order(pipeline: Pipeline) -> list[dict]:
    """The sandbox's view of each task, in the handle's row order (batches race each other)."""
    by_id = {t["task_id"]: t for t in pipeline.control("altcraft", "/tasks")["tasks"]}
    return [by_id[j["job_id"]] for j in pipeline.metadata("import_job")["job_handle"]["jobs"]]


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
    assert report_run.tags["dagster/run_key"] == f"{handle['jobs'][0]['job_id']}:ended"
    report = pipeline.metadata("failure_report")
    assert (report["source_rows"], report["rejected_by_validation"], report["imported"]) == (200, 6, 192)
    assert (report["failed_at_target"], report["ignored_by_target"]) == (2, 0)
    assert report["vendor_counts"] == {"created": 192, "updated": 0, "processed": 192, "failed": 2}
    assert report["vendor_status"] == "completed"
    assert report["outcome"] == "completed_with_failures"  # one word for every vendor
    assert report["target"].startswith("Altcraft trigger 13 (profiles matched by ")
    assert pipeline.accounting_passed()
    target = [r for r in pipeline.report_rows() if r["stage"] == "target"]
    assert [(r["source_line"], r["unique_id"], r["reason"]) for r in target] == [
        ("163", "E01161", "Email domain 'acme-corp.invalid' does not accept mail"),
        ("180", "E01178", "Email domain 'acme-corp.invalid' does not accept mail"),
    ]
    [task] = pipeline.control("altcraft", "/tasks")["tasks"]
    assert (task["profiles"], task["triggered"], task["matching"], task["field_name"]) == (
        194,
        192,
        "custom",
        "EMPLOYEE_ID",
    )
    profiles = pipeline.control("altcraft", "/profiles")["profiles"]
    assert len(profiles) == 192 and {"E01001", "E01002"} <= {p["EMPLOYEE_ID"] for p in profiles}

    out, err = capfd.readouterr()
    assert "altcraft" in caplog.text.lower()
    texts = {"logs": caplog.text, "stdout": out, "stderr": err, "events": event_text(pipeline.instance)}
    assert_not_leaked([TOKEN], texts=texts, root=pipeline.root)


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
    profiles = pipeline.control("altcraft", "/profiles")["profiles"]
    assert len(profiles) == 50 and {p["department"] for p in profiles} == {"Support"}
    assert [t["triggered"] for t in pipeline.control("altcraft", "/tasks")["tasks"]] == [0, 0]


def test_more_than_10000_rows_become_two_tasks(make_pipeline) -> None:
    pipeline = make_pipeline()
    pipeline.drop("big.csv", employees(10_050))

    assert pipeline.ingest()[0].is_success
    pipeline.wait_for_reports()

    handle = pipeline.metadata("import_job")["job_handle"]
    assert [(j["first_row"], j["row_count"]) for j in handle["jobs"]] == [(0, 10_000), (10_000, 50)]
    tasks = tasks_in_submission_order(pipeline)
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

    tasks = tasks_in_submission_order(pipeline)
    assert len(pipeline.control("altcraft", "/tasks")["tasks"]) == 2
    assert len(tasks) == 2 and sum(t["profiles"] for t in tasks) == 7_000
    assert all(t["profiles"] < 10_000 for t in tasks)  # the byte limit cut them, not the count
    assert all(t["body_bytes"] <= MAX_REQUEST_BYTES for t in tasks)
    assert tasks[0]["body_bytes"] > MAX_REQUEST_BYTES - 2_000  # filled up to the limit
    handle = pipeline.metadata("import_job")["job_handle"]
    assert [j["row_count"] for j in handle["jobs"]] == [t["profiles"] for t in tasks]
    report = pipeline.metadata("failure_report")
    assert (report["imported"], report["failed_at_target"]) == (7_000, 0)
    assert pipeline.accounting_passed()
    [profile] = [
        p for p in pipeline.control("altcraft", "/profiles")["profiles"] if p["EMPLOYEE_ID"] == "E000007"
    ]
    assert profile["note6"] == "000007note6".ljust(250, "x")


def test_task_that_ends_in_error_fails_its_rows(make_pipeline) -> None:
    pipeline = make_pipeline()
    pipeline.control("altcraft", "/fail-tasks", {"times": 1, "error_text": "Database is read-only"})
    pipeline.drop("staff.csv", employees(20))
    pipeline.ingest()

    [run] = pipeline.wait_for_reports()

    task_id = pipeline.metadata("import_job")["job_handle"]["jobs"][0]["job_id"]
    assert run.tags["dagster/run_key"] == f"{task_id}:ended"
    report = pipeline.metadata("failure_report")
    assert (report["imported"], report["failed_at_target"], report["vendor_status"]) == (0, 20, "error")
    assert pipeline.accounting_passed()
    rows = pipeline.report_rows()
    assert len(rows) == 20 and rows[0]["source_line"] == "2" and rows[0]["unique_id"] == "E000000"
    assert {r["reason"] for r in rows} == {f"Altcraft task {task_id} ended in error: Database is read-only"}


def test_error_envelope_is_a_reported_failure_not_a_success(make_pipeline) -> None:
    pipeline = make_pipeline()
    pipeline.control("altcraft", "/triggers/13", {"active": False})
    pipeline.drop("staff.csv", employees(5))

    assert pipeline.ingest()[0].is_success
    [run] = pipeline.wait_for_reports()

    assert run.tags["dagster/run_key"].endswith(":ended")
    report = pipeline.metadata("failure_report")
    assert (report["imported"], report["failed_at_target"], report["vendor_status"]) == (0, 5, "refused")
    assert pipeline.accounting_passed()
    reasons = {r["reason"] for r in pipeline.report_rows()}
    assert reasons == {
        "Altcraft refused the request: Trigger campaign 13 not found or not active (error 404)"
    }
    assert pipeline.control("altcraft", "/tasks")["tasks"] == []


def test_wrong_token_fails_the_run_without_echoing_it(make_pipeline, monkeypatch, caplog) -> None:
    wrong = "wrong-altcraft-token-77e1c0d9"
    monkeypatch.setenv("ALTCRAFT_TOKEN", wrong)
    caplog.set_level(logging.DEBUG)
    pipeline = make_pipeline()
    pipeline.drop("staff.csv", employees(3))

    runs = pipeline.ingest()

    assert runs[0].status == dg.DagsterRunStatus.FAILURE
    text = event_text(pipeline.instance)
    assert "401" in text and "Invalid API token" in text
    assert_not_leaked([wrong], texts={"events": text, "logs": caplog.text}, root=pipeline.root)

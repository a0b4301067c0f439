"""Yesmail end to end through Dagster: sensors, runs, checks and the failure report against the
sandbox over real HTTP (success with per-member failures, 413 splitting, a failed ticket,
ignored members, exact accounting, no credential anywhere)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx
import pytest

from audience_pipeline.sandbox import SandboxSettings
from audience_pipeline_tests.integration.conftest import DEMO_CSV, Pipeline, PipelineFactory
from audience_pipeline_tests.integration.leaks import assert_not_leaked, event_text

pytestmark = pytest.mark.integration

FEED = "staff_yesmail"
USER = "itest-ym-user-0c5e9a71"
KEY = "itest-ym-key-b38f2d6e94"
SANDBOX_MAX_MEMBERS = 150

FEEDS_YAML = """
sources:
  drop: {{type: folder, path: incoming, glob: "*.csv", stable_after_seconds: 0}}
destinations:
  ym:
    type: yesmail
    base_url: ${{YESMAIL_BASE_URL}}
    api_user: ${{YESMAIL_API_USER}}
    api_key: ${{YESMAIL_API_KEY}}
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


@pytest.fixture
def sandbox_settings() -> SandboxSettings:
    return SandboxSettings(
        pace_seconds=0.05, yesmail_api_user=USER, yesmail_api_key=KEY, yesmail_max_members=SANDBOX_MAX_MEMBERS
    )


@pytest.fixture
def make_pipeline(pipeline_factory: PipelineFactory) -> Callable[..., Pipeline]:
    """A pipeline with the demo export dropped in, ready to ingest."""

    def make(per_request: int = 1000, import_type: str = "update", threshold: str | int = 0) -> Pipeline:
        text = FEEDS_YAML.format(
            per_request=per_request,
            feed=FEED,
            import_type=import_type,
            threshold=f'"{threshold}"' if isinstance(threshold, str) else threshold,
        )
        pipeline = pipeline_factory(FEED, feeds_text=text, log_level="DEBUG")
        pipeline.drop("employees.csv", DEMO_CSV)
        return pipeline

    return make


def _accounting_ok(pipeline: Pipeline) -> None:
    assert len(pipeline.partitions()) == 1
    report = pipeline.metadata("failure_report")
    total = report["imported"] + report["rejected_by_validation"] + report["failed_at_target"]
    assert total + report["ignored_by_target"] == report["source_rows"] == 200
    assert pipeline.accounting_passed()


def test_push_reports_unknown_subscribers_and_adds_up(
    make_pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pipeline = make_pipeline(per_request=100)

    (ingest,) = pipeline.ingest()
    assert ingest.is_success
    handle = pipeline.metadata("import_job")["job_handle"]
    assert [(j["first_row"], j["row_count"]) for j in handle["jobs"]] == [(0, 100), (100, 94)]
    assert handle["submitted_rows"] == 194
    (report_run,) = pipeline.wait_for_reports()

    assert report_run.is_success
    tickets = "+".join(j["job_id"] for j in handle["jobs"])
    assert report_run.tags["dagster/run_key"] == f"{tickets}:ended"
    report = pipeline.metadata("failure_report")
    assert (report["imported"], report["rejected_by_validation"], report["failed_at_target"]) == (192, 6, 2)
    assert report["vendor_counts"]["processed"] == 192
    assert (report["outcome"], report["target"]) == (
        "completed_with_failures",
        'Yesmail target list "all-staff"',
    )
    target = [r for r in pipeline.report_rows() if r["stage"] == "target"]
    assert [(r["source_line"], r["unique_id"], r["outcome"]) for r in target] == [
        ("163", "E01161", "failed"),
        ("180", "E01178", "failed"),
    ]
    assert target[0]["reason"] == "Subscriber 'diego.novak@acme-corp.invalid' does not exist"
    _accounting_ok(pipeline)
    with httpx.Client(headers={"Api-User": USER, "Api-Key": KEY}) as client:
        listed = client.get(pipeline.sandbox.vendor_url("yesmail") + "/v2/target-lists/all-staff")
    assert listed.json()["memberCount"] == 192

    texts = {"events": event_text(pipeline.instance), "logs": caplog.text}
    assert_not_leaked([USER, KEY], texts=texts, root=pipeline.root)


def test_413_splits_batches_and_every_row_is_still_accounted(make_pipeline) -> None:
    pipeline = make_pipeline(per_request=1000)

    (ingest,) = pipeline.ingest()
    assert ingest.is_success
    handle = pipeline.metadata("import_job")["job_handle"]
    assert [(j["first_row"], j["row_count"]) for j in handle["jobs"]] == [(0, 97), (97, 97)]
    assert handle["extra"]["members_per_request"] == 97
    (report_run,) = pipeline.wait_for_reports()
    assert report_run.is_success
    report = pipeline.metadata("failure_report")
    assert (report["imported"], report["failed_at_target"]) == (192, 2)
    _accounting_ok(pipeline)


def test_error_threshold_fails_a_ticket_and_its_unprocessed_rows(make_pipeline) -> None:
    pipeline = make_pipeline(per_request=50, threshold=1)

    pipeline.ingest()
    (report_run,) = pipeline.wait_for_reports()

    assert report_run.tags["dagster/run_key"].endswith(":ended")
    report = pipeline.metadata("failure_report")
    assert report["vendor_status"] == "failed"
    target = [r for r in pipeline.report_rows() if r["stage"] == "target"]
    stopped = [r for r in target if r["reason"].startswith("not imported: Yesmail stopped this batch")]
    assert target[0]["source_line"] == "163" and "does not exist" in target[0]["reason"]
    assert stopped and all(int(r["source_line"]) > 163 for r in stopped)
    assert report["failed_at_target"] == len(target) > 2
    assert report["imported"] == 194 - len(target) == report["vendor_counts"]["processed"]
    _accounting_ok(pipeline)


def test_ignore_keeps_members_already_on_the_list(make_pipeline) -> None:
    already = ["priya.ibrahim@acme-corp.com", "olivia.lopez@acme-corp.com", "sam.costa@acme-corp.com"]
    pipeline = make_pipeline(import_type="ignore")
    pipeline.control("yesmail", "target-lists/all-staff", {"members": already}, method="PUT")

    pipeline.ingest()
    (report_run,) = pipeline.wait_for_reports()

    assert report_run.is_success
    report = pipeline.metadata("failure_report")
    assert (report["imported"], report["failed_at_target"], report["ignored_by_target"]) == (189, 2, 3)
    ignored = [r for r in pipeline.report_rows() if r["outcome"] == "ignored"]
    assert [(r["source_line"], r["unique_id"], r["stage"]) for r in ignored] == [
        ("2", "E01001", "target"),
        ("3", "E01002", "target"),
        ("4", "E01003", "target"),
    ]
    _accounting_ok(pipeline)

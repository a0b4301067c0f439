"""APSIS One end to end through Dagster: sensors, runs, checks and the failure report against the
sandbox over real HTTP (token, import requests, presigned uploads, 429s, expiry, a split file)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from audience_pipeline.sandbox import SandboxSettings
from audience_pipeline.sandbox.apsis import SECTION
from audience_pipeline_tests.integration.conftest import DEMO_CSV, DEMO_MAPPING, Pipeline, PipelineFactory
from audience_pipeline_tests.integration.leaks import assert_not_leaked, event_text
from benchmarks.generate_employees import generate

pytestmark = pytest.mark.integration

FEED = "staff_apsis"
CLIENT_ID = "itest-apsis-client-61c0d2"
CLIENT_SECRET = "itest-apsis-secret-f47b93a1e8"
UPLOAD_TTL = 2.0

FEEDS_YAML = """
sources:
  drop: {{type: folder, path: incoming, stable_after_seconds: 0}}
destinations:
  apsis:
    type: apsis_one
    base_url: ${{APSIS_BASE_URL}}
    client_id: ${{APSIS_CLIENT_ID}}
    client_secret: ${{APSIS_CLIENT_SECRET}}
feeds:
  - name: {feed}
    source: drop
    destination: apsis
    max_rejection_rate: 0.05
{mapping}{extra_mapping}    options:
      section: {section}
      attributes: {{unique_id: Employee ID, department: Department, start_date: Start date,
                    office_city: Office city{extra_attributes}}}
      consents: [{{topic: com.apsis1.topics.newsletter, address_field: email}}]
{extra_options}"""


@pytest.fixture
def sandbox_settings() -> SandboxSettings:
    return SandboxSettings(
        pace_seconds=0.05,
        apsis_client_id=CLIENT_ID,
        apsis_client_secret=CLIENT_SECRET,
        apsis_upload_url_ttl_seconds=UPLOAD_TTL,
    )


@pytest.fixture
def apsis_pipeline(pipeline_factory: PipelineFactory) -> Callable[..., Pipeline]:
    def make(extra_options: str = "", extra_mapping: str = "", extra_attributes: str = "") -> Pipeline:
        text = FEEDS_YAML.format(
            feed=FEED,
            mapping=DEMO_MAPPING,
            section=SECTION,
            extra_options=extra_options,
            extra_mapping=extra_mapping,
            extra_attributes=extra_attributes,
        )
        return pipeline_factory(FEED, feeds_text=text, register_secrets=True, report_timeout=30.0)

    return make


def _vendor_state(pipeline: Pipeline) -> dict:
    return pipeline.control("apsis", "imports")


def test_first_push_then_a_changed_file_updates_the_profiles(apsis_pipeline) -> None:
    pipeline = apsis_pipeline()
    pipeline.drop("employees.csv", DEMO_CSV.read_bytes())

    runs = pipeline.ingest()
    assert len(runs) == 1 and runs[0].is_success
    reports = pipeline.wait_for_reports()

    partition = pipeline.partitions()[-1]
    handle = pipeline.metadata("import_job", partition)["job_handle"]
    assert (
        reports[0].is_success and reports[0].tags["dagster/run_key"] == f"{handle['jobs'][0]['job_id']}:ended"
    )
    report = pipeline.metadata("failure_report", partition)
    assert (report["source_rows"], report["rejected_by_validation"]) == (200, 6)
    assert (report["imported"], report["failed_at_target"], report["ignored_by_target"]) == (192, 2, 0)
    assert report["vendor_counts"]["processed"] == 192 and report["vendor_counts"]["created"] == 192
    assert report["outcome"] == "completed_with_failures"
    assert report["target"].startswith('APSIS One section "') and "keyspace " in report["target"]
    assert pipeline.accounting_passed()
    target = [r for r in pipeline.report_rows(partition) if r["stage"] == "target"]
    assert [(r["source_line"], r["unique_id"], r["outcome"]) for r in target] == [
        ("163", "E01161", "failed"),
        ("180", "E01178", "failed"),
    ]
    assert target[0]["reason"] == "email: Email domain 'acme-corp.invalid' does not accept mail"
    (vendor_import,) = _vendor_state(pipeline)["imports"]
    request = vendor_import["request"]
    assert request["keyspace_mapping"] == {
        "keyspace_discriminator": "com.apsis1.keyspaces.crm",
        "field_selector": "unique_id",
    }
    assert {m["field_selector"] for m in request["attribute_mappings"]} == {
        "unique_id",
        "email",
        "mobile_phone",
        "first_name",
        "last_name",
        "department",
        "start_date",
        "office_city",
    }
    assert request["consent_mappings"][0]["address_field_selector"] == "email"

    pipeline.drop("employees.csv", DEMO_CSV.read_text("utf-8").replace("Research &", "R&D &"))
    runs = pipeline.ingest()
    assert len(runs) == 1 and runs[0].is_success
    pipeline.wait_for_reports()

    second = pipeline.metadata("failure_report", runs[0].tags["dagster/partition"])
    # sync_mode changed (APSIS One's default): the one changed row, and the two that failed last time
    assert (second["sent"], second["imported"], second["failed_at_target"]) == (3, 1, 2)
    assert second["unchanged"] == 191
    assert second["vendor_counts"]["created"] == 0 and second["vendor_counts"]["updated"] == 1
    assert len(_vendor_state(pipeline)["imports"]) == 2


def test_an_import_that_ends_in_error_fails_all_its_rows(apsis_pipeline) -> None:
    pipeline = apsis_pipeline()
    pipeline.control("apsis", "imports/fail-next", {"detail": "Import file could not be processed"})
    pipeline.drop("employees.csv", DEMO_CSV.read_bytes())

    pipeline.ingest()
    (run,) = pipeline.wait_for_reports()

    assert run.tags["dagster/run_key"].endswith(":ended")
    partition = pipeline.partitions()[-1]
    report = pipeline.metadata("failure_report", partition)
    assert (report["imported"], report["failed_at_target"], report["rejected_by_validation"]) == (0, 194, 6)
    assert report["vendor_status"] == "error"
    assert pipeline.accounting_passed()
    reasons = {r["reason"] for r in pipeline.report_rows(partition) if r["stage"] == "target"}
    (reason,) = reasons
    assert "ended in error (Import file could not be processed)" in reason and "force: true" in reason


SLOW_IMPORTS = SandboxSettings(
    pace_seconds=0.5,
    apsis_client_id=CLIENT_ID,
    apsis_client_secret=CLIENT_SECRET,
    apsis_upload_url_ttl_seconds=UPLOAD_TTL,
)
"""Imports that stay pending long enough that a loaded machine still meets the three-pending limit."""


@pytest.mark.parametrize("sandbox_settings", [SLOW_IMPORTS], ids=["slow_imports"])
def test_a_429_storm_and_the_three_pending_limit_lose_no_part(apsis_pipeline, caplog) -> None:
    caplog.set_level(logging.INFO, logger="audience_pipeline.apsis")
    pipeline = apsis_pipeline(extra_options="      max_file_bytes: 4000\n")
    pipeline.sandbox.add_fault(
        vendor="apsis",
        kind="status",
        status=429,
        retry_after=0,
        method="POST",
        path_contains="/imports",
        times=4,
    )
    pipeline.drop("employees.csv", DEMO_CSV.read_bytes())

    runs = pipeline.ingest()
    assert runs[0].is_success
    pipeline.wait_for_reports()

    waits = [r.getMessage() for r in caplog.records if "three imports pending" in r.getMessage()]
    assert sum("waiting 0.0 s" in w for w in waits) == 4  # the injected storm
    assert any("waiting 1.0 s" in w for w in waits)  # the sandbox's own limit, Retry-After: 1
    partition = pipeline.partitions()[-1]
    handle = pipeline.metadata("import_job", partition)["job_handle"]
    jobs = handle["jobs"]
    assert len(jobs) >= 5  # more parts than may be pending at once
    assert all(size <= 4000 for size in handle["extra"]["part_bytes"])
    assert [j["first_row"] for j in jobs] == [
        0,
        *(sum(j["row_count"] for j in jobs[:i]) for i in range(1, len(jobs))),
    ]
    assert sum(j["row_count"] for j in jobs) == handle["submitted_rows"] == 194
    state = _vendor_state(pipeline)
    assert sorted(i["import_id"] for i in state["imports"]) == sorted(j["job_id"] for j in jobs)
    assert {i["status"] for i in state["imports"]} == {"completed"}
    report = pipeline.metadata("failure_report", partition)
    assert (report["imported"], report["failed_at_target"]) == (192, 2)
    assert report["vendor_counts"]["processed"] == 192
    assert pipeline.accounting_passed()


def test_an_expired_upload_url_fails_its_part_and_never_leaks(apsis_pipeline, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    pipeline = apsis_pipeline(extra_options="      max_file_bytes: 12000\n")
    pipeline.sandbox.add_fault(
        vendor="apsis", kind="delay", delay_seconds=UPLOAD_TTL + 0.5, path_contains="/uploads/", times=1
    )
    pipeline.drop("employees.csv", DEMO_CSV.read_bytes())

    runs = pipeline.ingest()
    assert runs[0].is_success
    (report_run,) = pipeline.wait_for_reports()

    partition = pipeline.partitions()[-1]
    handle = pipeline.metadata("import_job", partition)["job_handle"]
    first, *others = handle["jobs"]
    assert others and list(handle["extra"]["upload_errors"]) == [first["job_id"]]
    assert report_run.tags["dagster/run_key"].endswith(":ended")
    report = pipeline.metadata("failure_report", partition)
    assert report["failed_at_target"] >= first["row_count"]
    assert report["imported"] + report["failed_at_target"] == 194
    assert pipeline.accounting_passed()
    rows = [r for r in pipeline.report_rows(partition) if "never received its file" in r["reason"]]
    assert len(rows) == first["row_count"]
    assert "403" in rows[0]["reason"] and "expired" in rows[0]["reason"]
    state = _vendor_state(pipeline)
    expired = next(i for i in state["imports"] if i["import_id"] == first["job_id"])
    assert expired["status"] == "waiting_for_file"

    secrets = [CLIENT_SECRET, CLIENT_ID]
    for item in state["imports"]:
        secrets += [item["file_upload_url"], item["file_upload_url"].split("signature=")[1]]
        secrets += [item["file_upload_body"]["policy"], item["file_upload_body"]["x-apsis-signature"]]
    texts = {"events": event_text(pipeline.instance), "logs": caplog.text}
    assert_not_leaked(secrets, texts=texts, root=pipeline.root)


def test_a_120_mb_file_is_split_and_every_row_is_accounted_for(apsis_pipeline) -> None:
    pipeline = apsis_pipeline(
        extra_mapping="        job_title: Job Title\n", extra_attributes=", job_title: Job title"
    )
    generated = generate(pipeline.root / "incoming" / "big.csv", 1_110_000, bad_fraction=0.001, seed=11)
    assert generated.bytes > 118_000_000

    runs = pipeline.ingest()
    assert runs[0].is_success
    pipeline.wait_for_reports(timeout=120)

    partition = pipeline.partitions()[-1]
    handle = pipeline.metadata("import_job", partition)["job_handle"]
    parts = handle["extra"]["part_bytes"]
    assert len(parts) == len(handle["jobs"]) == 3 and all(size <= 50_000_000 for size in parts)
    assert sum(parts) > 100_000_000
    assert sum(j["row_count"] for j in handle["jobs"]) == handle["submitted_rows"]
    report = pipeline.metadata("failure_report", partition)
    assert report["source_rows"] == generated.rows
    assert report["rejected_by_validation"] == generated.expected_rejects
    assert report["validation_warnings"] == generated.expected_warnings  # imported, a value cleared
    assert (
        report["imported"] + report["failed_at_target"] + report["rejected_by_validation"] == generated.rows
    )
    assert report["vendor_counts"]["processed"] == report["imported"]
    assert report["vendor_counts"]["total"] == handle["submitted_rows"]
    assert pipeline.accounting_passed()

"""Experience Platform end to end through Dagster: sensors, runs, reports and checks against the
sandbox (IMS, Platform API, Data Landing Zone) over real HTTP, and S3 through moto."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from audience_pipeline.cli import random_credentials
from audience_pipeline.sandbox import SandboxSettings
from audience_pipeline_tests.conftest import S3Server
from audience_pipeline_tests.integration.conftest import DEMO_CSV, Pipeline, PipelineFactory
from audience_pipeline_tests.integration.leaks import assert_not_leaked, event_text

pytestmark = pytest.mark.integration

FEED = "staff_aep"
SETTINGS = random_credentials(SandboxSettings(pace_seconds=0.05))
DLZ = "{type: dlz, folder: hr}"
FEEDS = """
sources:
  drop: {type: folder, path: incoming}
destinations:
  aep:
    type: adobe_experience_platform
    base_url: ${AEP_BASE_URL}
    ims_url: ${AEP_IMS_URL}
    client_id: ${AEP_CLIENT_ID}
    client_secret: ${AEP_CLIENT_SECRET}
    org_id: ${AEP_ORG_ID}
    sandbox_name: prod
    s3_access_key_id: ${AEP_TEST_S3_KEY_ID}
    s3_secret_access_key: ${AEP_TEST_S3_SECRET}
feeds:
  - name: staff_aep
    source: drop
    destination: aep
    mapping:
      unique_id: Employee ID
      email: Email
      mobile_phone: Mobile Phone
      first_name: First Name
      last_name: Last Name
      attributes:
        department: Department
        start_date: {header: Start Date, type: date}
        office_city: Office City
    options:
      audience_name: All staff
      description: Every employee
      labels: [C1]
      poll_interval_seconds: 0.05
      run_wait_seconds: 30
      storage: %(storage)s
"""


@pytest.fixture
def sandbox_settings() -> SandboxSettings:
    return SETTINGS


@pytest.fixture
def aep_factory(
    pipeline_factory: PipelineFactory, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Pipeline]:
    monkeypatch.setenv("AEP_TEST_S3_KEY_ID", "testing-access-key")
    monkeypatch.setenv("AEP_TEST_S3_SECRET", S3Server("").secret_access_key)

    def make(storage: str = DLZ) -> Pipeline:
        return pipeline_factory(FEED, feeds_text=FEEDS % {"storage": storage}, register_secrets=True)

    return make


def _audiences(pipeline: Pipeline) -> list[dict]:
    return pipeline.control("aep", "audiences")["audiences"]


def _changed_demo() -> tuple[str, int]:
    """The demo file with its last 10 data lines removed and a department renamed."""
    lines = DEMO_CSV.read_text("utf-8").splitlines(keepends=True)
    return "".join(lines[:-10]).replace("Research &", "R&D &"), 10


def test_first_push_creates_the_audience_and_second_push_runs_ingestion(aep_factory, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    pipeline = aep_factory()
    pipeline.drop("employees.csv", DEMO_CSV.read_text("utf-8"))

    runs = pipeline.ingest()
    assert len(runs) == 1 and runs[0].is_success
    first = runs[0].tags["dagster/partition"]
    handle = pipeline.metadata("import_job", first)["job_handle"]
    assert handle["extra"]["kind"] == "operation"
    assert handle["extra"]["source_path"] == "dlz-user-container/hr/staff_aep.csv"
    pipeline.wait_for_reports()

    report = pipeline.metadata("failure_report", first)
    assert (report["source_rows"], report["rejected_by_validation"]) == (200, 6)
    assert (report["imported"], report["failed_at_target"], report["ignored_by_target"]) == (194, 0, 0)
    assert report["vendor_status"] == "SUCCESS"
    assert "no row-level results" in report["notes"]
    assert pipeline.accounting_passed()
    [audience] = _audiences(pipeline)
    assert audience["customAudienceId"] == "audience_pipeline.staff_aep"
    assert audience["operation"] == {"status": "SUCCESS", "rows": 194}
    types = {f["name"]: (f["type"], f.get("identityNs")) for f in audience["fields"]}
    assert types["start_date"] == ("date", None) and types["email"] == ("string", "email")
    assert audience["sourceSpec"]["params"]["cloudType"] == "DLZ"

    changed, removed = _changed_demo()
    pipeline.drop("employees.csv", changed)
    runs = pipeline.ingest()
    assert len(runs) == 1 and runs[0].is_success
    second = runs[0].tags["dagster/partition"]
    handle = pipeline.metadata("import_job", second)["job_handle"]
    assert handle["extra"]["kind"] == "run" and handle["extra"]["audience_id"] == audience["audienceId"]
    pipeline.wait_for_reports()

    report = pipeline.metadata("failure_report", second)
    rejected = report["rejected_by_validation"]
    assert report["source_rows"] == 200 - removed
    assert report["imported"] == 200 - removed - rejected and report["failed_at_target"] == 0
    assert pipeline.accounting_passed()
    [audience] = _audiences(pipeline)
    assert [r["status"] for r in audience["runs"]] == ["SUCCESS"]
    assert audience["runs"][0]["rows"] == report["imported"]

    settings = pipeline.sandbox.settings
    vendor = pipeline.sandbox.app.vendors["aep"]
    leaked = [settings.aep_client_id, settings.aep_client_secret, vendor._sig, *vendor._tokens]
    texts = {"events": event_text(pipeline.instance), "logs": caplog.text}
    assert_not_leaked(leaked, texts=texts, root=pipeline.root)


def test_a_failed_run_fails_every_submitted_row_with_the_stage(aep_factory) -> None:
    pipeline = aep_factory()
    pipeline.control("aep", "fail-next", {"stage": "DATASET_INGEST", "message": "Schema mismatch in batch"})
    pipeline.drop("employees.csv", DEMO_CSV.read_text("utf-8"))
    [run] = pipeline.ingest()
    pipeline.wait_for_reports()

    report = pipeline.metadata("failure_report", run.tags["dagster/partition"])
    assert report["vendor_status"] == "FAILED"
    assert (report["imported"], report["failed_at_target"], report["rejected_by_validation"]) == (0, 194, 6)
    assert pipeline.accounting_passed()
    rows = [r for r in pipeline.report_rows(run.tags["dagster/partition"]) if r["stage"] == "target"]
    assert len(rows) == 194
    assert "DATASET_INGEST" in rows[0]["reason"] and "Schema mismatch in batch" in rows[0]["reason"]
    assert _audiences(pipeline) == []  # a failed creation leaves no audience: the next push creates it

    changed, _ = _changed_demo()
    pipeline.control(
        "aep", "fail-next", {"stage": "PROFILE_STORE_INGEST", "message": "Profile store unavailable"}
    )
    pipeline.drop("employees.csv", changed)
    pipeline.ingest()
    [pipeline_run] = pipeline.wait_for_reports()
    report = pipeline.metadata("failure_report", pipeline_run.tags["dagster/partition"])
    assert report["imported"] == 0 and report["failed_at_target"] > 0
    assert "PROFILE_STORE_INGEST" in report["preview"]


def test_a_run_in_progress_makes_the_next_push_wait(aep_factory) -> None:
    pipeline = aep_factory()
    pipeline.drop("employees.csv", DEMO_CSV.read_text("utf-8"))
    pipeline.ingest()
    pipeline.wait_for_reports()

    changed, _ = _changed_demo()
    pipeline.drop("employees.csv", changed)
    pipeline.drop("employees_b.csv", DEMO_CSV.read_text("utf-8").replace("Austin", "Dallas"))
    pipeline.sandbox.add_fault(vendor="aep", path_contains="/runs", method="POST", kind="status", status=409)
    runs = pipeline.ingest()  # two partitions: the second waits for the first one's run

    assert len(runs) == 2 and all(r.is_success for r in runs)
    assert pipeline.sandbox.app.faults.pending() == []
    pipeline.wait_for_reports(expected=2)
    [audience] = _audiences(pipeline)
    assert [r["status"] for r in audience["runs"]] == ["SUCCESS", "SUCCESS"]
    for run in runs:
        assert (
            pipeline.metadata("failure_report", run.tags["dagster/partition"])["vendor_status"] == "SUCCESS"
        )


def test_s3_storage_through_a_base_connection(aep_factory, s3: S3Server) -> None:
    s3.client().create_bucket(Bucket="hr-audiences")
    storage = (
        "{type: s3, bucket: hr-audiences, prefix: aep/exports, base_connection_id: conn-s3-1, "
        f"endpoint_url: '{s3.endpoint_url}'}}"
    )
    pipeline = aep_factory(storage)
    pipeline.control(
        "aep",
        "connections",
        {
            "id": "conn-s3-1",
            "endpoint_url": s3.endpoint_url,
            "access_key_id": s3.access_key_id,
            "secret_access_key": s3.secret_access_key,
        },
    )
    pipeline.drop("employees.csv", DEMO_CSV.read_text("utf-8"))
    [run] = pipeline.ingest()
    assert run.is_success
    pipeline.wait_for_reports()

    body = s3.client().get_object(Bucket="hr-audiences", Key="aep/exports/staff_aep.csv")["Body"].read()
    assert body.decode().splitlines()[0].startswith("unique_id,email,mobile_phone")
    assert pipeline.metadata("failure_report", run.tags["dagster/partition"])["imported"] == 194
    [audience] = _audiences(pipeline)
    assert audience["sourceSpec"]["params"] == {
        "path": "hr-audiences/aep/exports/staff_aep.csv",
        "type": "file",
        "sourceType": "Cloud Storage",
        "cloudType": "S3",
        "baseConnectionId": "conn-s3-1",
    }
    assert s3.secret_access_key not in event_text(pipeline.instance)

"""Experience Platform end to end through Dagster: sensors, runs, reports and checks against the
sandbox (IMS, Platform API, Data Landing Zone) over real HTTP, and S3 through moto; also a 429
storm, an expired landing-zone SAS and a 120 MB export."""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from collections.abc import Callable

import dagster as dg
import pytest

from audience_pipeline.assets import ACCOUNTING_CHECK
from audience_pipeline.automation.status import in_flight
from audience_pipeline.cli import random_credentials
from audience_pipeline.sandbox import SandboxSettings
from audience_pipeline_tests.conftest import S3Server
from audience_pipeline_tests.integration.conftest import DEMO_CSV, DEMO_MAPPING, Pipeline, PipelineFactory
from audience_pipeline_tests.integration.leaks import assert_not_leaked, event_text
from benchmarks.generate_employees import generate

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
%(mapping)s    options:
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
        return pipeline_factory(
            FEED, feeds_text=FEEDS % {"storage": storage, "mapping": DEMO_MAPPING}, register_secrets=True
        )

    return make


def _audiences(pipeline: Pipeline) -> list[dict]:
    return pipeline.control("aep", "audiences")["audiences"]


def _sas_secrets(pipeline: Pipeline) -> list[str]:
    """Every SAS the sandbox issued, and each one's signature on its own."""
    issued = pipeline.sandbox.app.vendors["aep"].issued_sas()
    assert issued, "no SAS was issued"
    return [*issued, *(sas.rpartition("sig=")[2] for sas in issued)]


def _retry_waits(caplog: pytest.LogCaptureFixture, call: str, seconds: float) -> int:
    """How many times the client waited ``seconds`` after a 429 on ``call`` (``"POST /path"``)."""
    wanted = f"-> 429; retrying in {seconds:.1f} s as asked by Retry-After"
    return sum(call in r.getMessage() and wanted in r.getMessage() for r in caplog.records)


def _failure_text(pipeline: Pipeline, run: dg.DagsterRun) -> str:
    """Every failed step's error with its causes (Dagster wraps the client's exception)."""
    records = pipeline.instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    events = [r.event_log_entry.dagster_event for r in records.records]
    return "\n".join(e.event_specific_data.error.to_string() for e in events if e is not None)


def _lookups(pipeline: Pipeline) -> list[int]:
    """Answers to the audience list, which the vendor document does not show (a 401 that only
    renewed a token cached by an earlier test is left out)."""
    entries = pipeline.sandbox.requests(vendor="aep", method="GET", path_contains="/external-audiences")
    return [e["status"] for e in entries if e["path"].endswith("/external-audiences") and e["status"] != 401]


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
    assert report["outcome"] == "completed" and report["target"].startswith("Experience Platform audience ")
    assert "no row-level results" in report["notes"]
    assert pipeline.accounting_passed()
    check = pipeline.check("failure_report", ACCOUNTING_CHECK)
    assert check is not None and check.partition == first
    evaluation = check.event.dagster_event.event_specific_data
    assert "vendor_imported" not in evaluation.metadata  # no placeholder number
    assert evaluation.metadata["vendor_count"].value == "not reported"
    assert evaluation.description.endswith("Experience Platform reports no count of its own")
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
    # The audience list is not in the document (the sandbox answers 404): the first push tried it
    # as the fallback it is; the second found the audience through its creation operation.
    assert _lookups(pipeline) == [404]

    settings = pipeline.sandbox.settings
    vendor = pipeline.sandbox.app.vendors["aep"]
    leaked = [settings.aep_client_id, settings.aep_client_secret, *_sas_secrets(pipeline), *vendor._tokens]
    texts = {"events": event_text(pipeline.instance), "logs": caplog.text}
    assert_not_leaked(leaked, texts=texts, root=pipeline.root)


def test_an_audience_whose_id_the_pipeline_lost_fails_naming_the_option_to_set(aep_factory) -> None:
    """Without the pipeline's record and without a lookup, a 409 on creation cannot be resolved
    automatically: the partition fails telling the person which option to set, and where."""
    pipeline = aep_factory()
    pipeline.drop("employees.csv", DEMO_CSV.read_text("utf-8"))
    pipeline.ingest()
    pipeline.wait_for_reports()
    [audience] = _audiences(pipeline)
    pipeline.instance.wipe_assets([pipeline.key("import_job")])  # the state is gone

    changed, _ = _changed_demo()
    pipeline.drop("employees.csv", changed)
    [run] = pipeline.ingest()

    assert not run.is_success
    [(step, _)] = pipeline.step_failures(run)
    message = _failure_text(pipeline, run)
    assert step == f"{FEED}__import_job" and "-> 409" in message
    assert f"Set audience_id: <that audience's id> under options: of feed '{FEED}'" in message
    assert "in the feeds file" in message
    assert [a["audienceId"] for a in _audiences(pipeline)] == [audience["audienceId"]]
    assert _audiences(pipeline)[0]["runs"] == [] and set(_lookups(pipeline)) == {404}


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


def test_a_429_storm_is_waited_out_as_asked_and_nothing_is_sent_twice(aep_factory, caplog) -> None:
    """429s on IMS, create, operation status and run start: the client waits each Retry-After and
    repeats the call (a 429 was not processed); a poll that runs out of attempts loses nothing."""
    caplog.set_level(logging.INFO, logger="audience_pipeline.http")
    pipeline = aep_factory()
    storm = {"vendor": "aep", "kind": "status", "status": 429}
    pipeline.sandbox.add_fault(**storm, method="POST", path_contains="/ims/token/v3", retry_after=1, times=2)
    pipeline.sandbox.add_fault(
        **storm, method="POST", path_contains="/external-audience/", retry_after=1, times=2
    )
    pipeline.drop("employees.csv", DEMO_CSV.read_text("utf-8"))

    started = time.monotonic()
    [run] = pipeline.ingest()
    assert run.is_success and time.monotonic() - started >= 4.0  # 2 x 1 s on IMS, 2 x 1 s on create
    assert _retry_waits(caplog, "POST http", 1.0) == 4
    assert _retry_waits(caplog, "/ims/token/v3", 1.0) == 2
    assert _retry_waits(caplog, "/external-audience/", 1.0) == 2
    assert pipeline.sandbox.app.faults.pending() == []
    partition = run.tags["dagster/partition"]
    handle = pipeline.metadata("import_job", partition)["job_handle"]
    assert handle["extra"]["kind"] == "operation"  # a repeated create would have met a 409 and run

    # A 429 on a poll defers the import to the next tick: no Retry-After wait inside a sensor tick.
    operations = "/external-audiences/operations/"
    pipeline.sandbox.add_fault(**storm, method="GET", path_contains=operations, retry_after=120, times=5)
    started = time.monotonic()
    assert pipeline.driver.tick(f"{FEED}__import_status") == []
    assert time.monotonic() - started < 5
    assert [f.remaining for f in pipeline.sandbox.app.faults.pending()] == [4]  # one call, not five
    assert [e["p"] for e in in_flight(pipeline.instance, FEED).values()] == [partition]
    pipeline.sandbox.app.faults.clear()
    pipeline.wait_for_reports()

    report = pipeline.metadata("failure_report", partition)
    assert (report["source_rows"], report["rejected_by_validation"]) == (200, 6)
    assert (report["imported"], report["failed_at_target"]) == (194, 0)
    assert pipeline.accounting_passed()

    changed, removed = _changed_demo()
    pipeline.sandbox.add_fault(**storm, method="POST", path_contains="/runs", retry_after=1, times=3)
    pipeline.drop("employees.csv", changed)
    started = time.monotonic()
    [run] = pipeline.ingest()
    assert run.is_success and time.monotonic() - started >= 3.0
    assert _retry_waits(caplog, "/runs", 1.0) == 3
    pipeline.wait_for_reports()

    report = pipeline.metadata("failure_report", run.tags["dagster/partition"])
    assert report["source_rows"] == 200 - removed
    assert report["imported"] + report["rejected_by_validation"] == report["source_rows"]
    assert report["failed_at_target"] == 0 and pipeline.accounting_passed()
    [audience] = _audiences(pipeline)
    assert audience["operation"] == {"status": "SUCCESS", "rows": 194}
    assert [(r["status"], r["rows"]) for r in audience["runs"]] == [("SUCCESS", report["imported"])]
    assert pipeline.sandbox.app.faults.pending() == []


SAS_TTL = 2.0  # generous: the fresh SAS must reach the sandbox within it on a busy runner


@pytest.mark.parametrize("sandbox_settings", [dataclasses.replace(SETTINGS, aep_sas_ttl_seconds=SAS_TTL)])
def test_a_sas_that_expires_before_the_upload_is_fetched_again(aep_factory, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    pipeline = aep_factory()
    pipeline.sandbox.add_fault(
        vendor="aep", kind="delay", method="PUT", path_contains="/dlz/", delay_seconds=SAS_TTL + 0.5
    )
    pipeline.drop("employees.csv", DEMO_CSV.read_text("utf-8"))

    [run] = pipeline.ingest()
    assert run.is_success
    assert len(pipeline.sandbox.app.vendors["aep"].issued_sas()) == 2
    [warning] = [r.getMessage() for r in caplog.records if "refused the SAS" in r.getMessage()]
    assert "container dlz-user-container" in warning and "Signature not valid" in warning
    pipeline.wait_for_reports()
    report = pipeline.metadata("failure_report", run.tags["dagster/partition"])
    assert (report["imported"], report["failed_at_target"], report["rejected_by_validation"]) == (194, 0, 6)
    assert pipeline.accounting_passed()
    assert _audiences(pipeline)[0]["operation"] == {"status": "SUCCESS", "rows": 194}
    texts = {"events": event_text(pipeline.instance), "logs": caplog.text}
    assert_not_leaked(_sas_secrets(pipeline), texts=texts, root=pipeline.root)


@pytest.mark.parametrize("sandbox_settings", [dataclasses.replace(SETTINGS, aep_sas_ttl_seconds=0.0)])
def test_a_sas_that_is_always_expired_fails_the_partition_naming_the_container(aep_factory, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    pipeline = aep_factory()
    pipeline.drop("employees.csv", DEMO_CSV.read_text("utf-8"))

    [run] = pipeline.ingest()
    assert not run.is_success
    [(step, _)] = pipeline.step_failures(run)
    assert step == f"{FEED}__import_job"
    message = _failure_text(pipeline, run)
    assert "Data Landing Zone container dlz-user-container, blob hr/staff_aep.csv -> 403" in message
    assert "refused again with freshly fetched credentials" in message and "AuthenticationFailed" in message
    assert len(pipeline.sandbox.app.vendors["aep"].issued_sas()) == 2  # the first SAS and one fresh one
    assert _audiences(pipeline) == []
    assert pipeline.find_metadata("import_job", run.tags["dagster/partition"]) is None

    settings = pipeline.sandbox.settings
    secrets = [*_sas_secrets(pipeline), settings.aep_client_secret, settings.aep_client_id]
    texts = {"events": event_text(pipeline.instance), "logs": caplog.text, "failure": message}
    assert_not_leaked(secrets, texts=texts, root=pipeline.root)


def test_a_120_mb_export_is_uploaded_whole_and_every_row_is_accounted_for(aep_factory) -> None:
    """Platform reads files up to ~10 GB, so the export goes up as one streamed blob, unsplit."""
    pipeline = aep_factory()
    generated = generate(pipeline.incoming / "big.csv", 1_110_000, bad_fraction=0.001, seed=11)
    assert generated.bytes > 118_000_000

    started = time.monotonic()
    [run] = pipeline.ingest()
    assert run.is_success
    pipeline.wait_for_reports(timeout=120)
    elapsed = time.monotonic() - started

    partition = run.tags["dagster/partition"]
    handle = pipeline.metadata("import_job", partition)["job_handle"]
    assert len(handle["jobs"]) == 1 and handle["extra"]["kind"] == "operation"
    report = pipeline.metadata("failure_report", partition)
    assert report["source_rows"] == generated.rows
    assert report["rejected_by_validation"] == generated.expected_rejects
    assert report["validation_warnings"] == generated.expected_warnings  # imported, a value cleared
    assert report["failed_at_target"] == len(handle["extra"]["not_sent_rows"])
    assert (
        report["imported"] + report["failed_at_target"] + report["rejected_by_validation"] == generated.rows
    )
    assert handle["submitted_rows"] == generated.rows - generated.expected_rejects
    [audience] = _audiences(pipeline)
    assert audience["operation"] == {"status": "SUCCESS", "rows": report["imported"]}
    assert pipeline.accounting_passed()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"120 MB export: {generated.bytes} bytes, {elapsed:.1f} s, test process peak RSS {peak_mib:.0f} MiB"
    )

"""Experience Platform end to end through Dagster: sensors, runs, reports and checks against the
sandbox (IMS, Platform API, Data Landing Zone) over real HTTP, and S3 through moto."""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import httpx
import pytest

from audience_pipeline.assets import ACCOUNTING_CHECK, latest_metadata
from audience_pipeline.cli import random_credentials
from audience_pipeline.definitions import build_definitions
from audience_pipeline.feeds.loader import load_feeds, register_feed_secrets
from audience_pipeline.runner import SensorDriver
from audience_pipeline.sandbox import SandboxServer, SandboxSettings
from audience_pipeline_tests.conftest import S3Server
from audience_pipeline_tests.integration.conftest import DEMO_CSV

pytestmark = pytest.mark.integration

FEED = "staff_aep"
KEY = lambda *parts: dg.AssetKey([FEED, *parts])  # noqa: E731
DLZ = "{type: dlz, folder: hr}"
FEEDS = """
sources:
  drop: {type: folder, path: "%(incoming)s"}
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


@pytest.fixture(scope="module")
def aep_server() -> Iterator[SandboxServer]:
    settings = random_credentials(SandboxSettings(pace_seconds=0.05))
    with SandboxServer(settings) as server:
        yield server


@dataclasses.dataclass
class AepPipeline:
    root: Path
    defs: dg.Definitions
    instance: dg.DagsterInstance
    driver: SensorDriver
    sandbox: SandboxServer

    def drop(self, name: str, text: str) -> None:
        (self.root / "incoming" / name).write_text(text, "utf-8")

    def ingest(self) -> list[dg.DagsterRun]:
        """Tick the new-file sensor until it launches runs (a file may settle for one listing)."""
        for _ in range(3):
            runs = self.driver.tick(f"{FEED}__new_files")
            if runs:
                return runs
        return []

    def reports(self, expected: int = 1, timeout: float = 20.0) -> list[dg.DagsterRun]:
        runs: list[dg.DagsterRun] = []
        deadline = time.monotonic() + timeout
        while len(runs) < expected and time.monotonic() < deadline:
            runs += self.driver.tick(f"{FEED}__import_status")
            time.sleep(0.05)
        assert len(runs) == expected, f"expected {expected} report runs, got {len(runs)}"
        return runs

    def report(self, partition: str) -> dict:
        return latest_metadata(self.instance, KEY("failure_report"), partition) or {}

    def control(self, path: str, payload: dict | None = None) -> dict:
        url = f"{self.sandbox.url}/_sandbox/aep/{path}"
        response = httpx.post(url, json=payload or {}, timeout=5) if payload is not None else httpx.get(url)
        response.raise_for_status()
        return response.json()

    def audiences(self) -> list[dict]:
        return self.control("audiences")["audiences"]


@pytest.fixture
def aep_factory(tmp_path: Path, aep_server: SandboxServer, monkeypatch: pytest.MonkeyPatch):
    aep_server.reset()
    for name, value in aep_server.app.vendors["aep"].demo_env(aep_server.vendor_url("aep")).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AEP_TEST_S3_KEY_ID", "testing-access-key")
    monkeypatch.setenv("AEP_TEST_S3_SECRET", S3Server("").secret_access_key)
    stack: list = []

    def make(storage: str = DLZ) -> AepPipeline:
        (tmp_path / "incoming").mkdir(exist_ok=True)
        path = tmp_path / "feeds.yaml"
        path.write_text(FEEDS % {"incoming": tmp_path / "incoming", "storage": storage}, "utf-8")
        feeds = load_feeds(path)
        register_feed_secrets(feeds)
        defs = build_definitions(feeds, tmp_path / "home")
        (tmp_path / "dagster").mkdir(exist_ok=True)
        cm = dg.instance_for_test(temp_dir=str(tmp_path / "dagster"))
        stack.append(cm)
        instance = cm.__enter__()
        driver = SensorDriver(defs, instance, log_level="WARNING")
        return AepPipeline(tmp_path, defs, instance, driver, aep_server)

    yield make
    for cm in stack:
        cm.__exit__(None, None, None)


def _accounting_passed(pipeline: AepPipeline) -> bool:
    key = dg.AssetCheckKey(KEY("failure_report"), ACCOUNTING_CHECK)
    check = pipeline.instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    return check.status.value == "SUCCEEDED"


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
    handle = latest_metadata(pipeline.instance, KEY("import_job"), first)["job_handle"]
    assert handle["extra"]["kind"] == "operation"
    assert handle["extra"]["source_path"] == "dlz-user-container/hr/staff_aep.csv"
    pipeline.reports()

    report = pipeline.report(first)
    assert (report["source_rows"], report["rejected_by_validation"]) == (200, 6)
    assert (report["imported"], report["failed_at_target"], report["ignored_by_target"]) == (194, 0, 0)
    assert report["vendor_status"] == "SUCCESS"
    assert "no row-level results" in report["notes"]
    assert _accounting_passed(pipeline)
    [audience] = pipeline.audiences()
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
    handle = latest_metadata(pipeline.instance, KEY("import_job"), second)["job_handle"]
    assert handle["extra"]["kind"] == "run" and handle["extra"]["audience_id"] == audience["audienceId"]
    pipeline.reports()

    report = pipeline.report(second)
    rejected = report["rejected_by_validation"]
    assert report["source_rows"] == 200 - removed
    assert report["imported"] == 200 - removed - rejected and report["failed_at_target"] == 0
    assert _accounting_passed(pipeline)
    [audience] = pipeline.audiences()
    assert [r["status"] for r in audience["runs"]] == ["SUCCESS"]
    assert audience["runs"][0]["rows"] == report["imported"]

    settings = pipeline.sandbox.settings
    vendor = pipeline.sandbox.app.vendors["aep"]
    leaked = [settings.aep_client_id, settings.aep_client_secret, vendor._sig, *vendor._tokens]
    text = _event_text(pipeline.instance)
    for secret in leaked:
        assert secret not in text and secret not in caplog.text
        assert not [p for p in pipeline.root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_failed_run_fails_every_submitted_row_with_the_stage(aep_factory) -> None:
    pipeline = aep_factory()
    pipeline.control("fail-next", {"stage": "DATASET_INGEST", "message": "Schema mismatch in batch"})
    pipeline.drop("employees.csv", DEMO_CSV.read_text("utf-8"))
    [run] = pipeline.ingest()
    pipeline.reports()

    report = pipeline.report(run.tags["dagster/partition"])
    assert report["vendor_status"] == "FAILED"
    assert (report["imported"], report["failed_at_target"], report["rejected_by_validation"]) == (0, 194, 6)
    assert _accounting_passed(pipeline)
    with open(report["report_path"], newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["stage"] == "target"]
    assert len(rows) == 194
    assert "DATASET_INGEST" in rows[0]["reason"] and "Schema mismatch in batch" in rows[0]["reason"]
    assert pipeline.audiences() == []  # a failed creation leaves no audience: the next push creates it

    changed, _ = _changed_demo()
    pipeline.control("fail-next", {"stage": "PROFILE_STORE_INGEST", "message": "Profile store unavailable"})
    pipeline.drop("employees.csv", changed)
    pipeline.ingest()
    [pipeline_run] = pipeline.reports()
    report = pipeline.report(pipeline_run.tags["dagster/partition"])
    assert report["imported"] == 0 and report["failed_at_target"] > 0
    assert "PROFILE_STORE_INGEST" in report["preview"]


def test_a_run_in_progress_makes_the_next_push_wait(aep_factory) -> None:
    pipeline = aep_factory()
    pipeline.drop("employees.csv", DEMO_CSV.read_text("utf-8"))
    pipeline.ingest()
    pipeline.reports()

    changed, _ = _changed_demo()
    pipeline.drop("employees.csv", changed)
    pipeline.drop("employees_b.csv", DEMO_CSV.read_text("utf-8").replace("Austin", "Dallas"))
    pipeline.sandbox.add_fault(vendor="aep", path_contains="/runs", method="POST", kind="status", status=409)
    runs = pipeline.ingest()  # two partitions: the second waits for the first one's run

    assert len(runs) == 2 and all(r.is_success for r in runs)
    assert pipeline.sandbox.app.faults.pending() == []
    pipeline.reports(expected=2)
    [audience] = pipeline.audiences()
    assert [r["status"] for r in audience["runs"]] == ["SUCCESS", "SUCCESS"]
    for run in runs:
        assert pipeline.report(run.tags["dagster/partition"])["vendor_status"] == "SUCCESS"


def test_s3_storage_through_a_base_connection(aep_factory, s3: S3Server) -> None:
    s3.client().create_bucket(Bucket="hr-audiences")
    storage = (
        "{type: s3, bucket: hr-audiences, prefix: aep/exports, base_connection_id: conn-s3-1, "
        f"endpoint_url: '{s3.endpoint_url}'}}"
    )
    pipeline = aep_factory(storage)
    pipeline.control(
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
    pipeline.reports()

    body = s3.client().get_object(Bucket="hr-audiences", Key="aep/exports/staff_aep.csv")["Body"].read()
    assert body.decode().splitlines()[0].startswith("unique_id,email,mobile_phone")
    assert pipeline.report(run.tags["dagster/partition"])["imported"] == 194
    [audience] = pipeline.audiences()
    assert audience["sourceSpec"]["params"] == {
        "path": "hr-audiences/aep/exports/staff_aep.csv",
        "type": "file",
        "sourceType": "Cloud Storage",
        "cloudType": "S3",
        "baseConnectionId": "conn-s3-1",
    }
    assert s3.secret_access_key not in _event_text(pipeline.instance)


def _event_text(instance: dg.DagsterInstance) -> str:
    chunks = []
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id):
            chunks.append(entry.user_message or "")
            if entry.dagster_event is not None:
                chunks.append(repr(entry.dagster_event))
    return "\n".join(chunks)

"""Each HR source through Dagster against its real server: discovery, partition, ingest run to
the CXI sandbox, failure report; a file caught mid-write; a source that goes down between ticks;
re-processing a partition after its file was moved."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import httpx
import pytest

from audience_pipeline.assets import ACCOUNTING_CHECK, latest_metadata
from audience_pipeline.definitions import build_definitions
from audience_pipeline.feeds.loader import load_feeds, register_feed_secrets
from audience_pipeline.runner import SensorDriver
from audience_pipeline.sandbox import SandboxServer
from audience_pipeline.sources.base import hash_file, partition_key
from audience_pipeline_tests.conftest import S3Server
from audience_pipeline_tests.integration.conftest import API_KEY, DEMO_CSV
from audience_pipeline_tests.sources.servers import SFTP_PASSWORD, SFTP_USER, ReportServer, SftpTestServer

pytestmark = pytest.mark.integration

FEED = "staff"
MAPPING = """
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
      import_name: Staff from sources
"""
KEY = lambda *parts: dg.AssetKey([FEED, *parts])  # noqa: E731


@dataclass
class SourcePipeline:
    defs: dg.Definitions
    instance: dg.DagsterInstance
    driver: SensorDriver
    sandbox: SandboxServer
    home: Path

    def discover(self) -> list[dg.DagsterRun]:
        return self.driver.discover(FEED)

    def tick_files(self) -> list[dg.DagsterRun]:
        return self.driver.tick(f"{FEED}__new_files")

    def partitions(self) -> list[str]:
        return self.instance.get_dynamic_partitions(f"{FEED}__files")

    def wait_for_reports(self, expected: int = 1, timeout: float = 20.0) -> list[dg.DagsterRun]:
        runs: list[dg.DagsterRun] = []
        deadline = time.monotonic() + timeout
        while len(runs) < expected and time.monotonic() < deadline:
            runs += self.driver.tick(f"{FEED}__import_status")
            time.sleep(0.05)
        assert len(runs) == expected
        return runs

    def imports(self) -> list[dict]:
        with httpx.Client(base_url=self.sandbox.vendor_url("cxi"), headers={"X-GSCC-Api-Key": API_KEY}) as c:
            return c.get("/public-api/audience-imports").json()["data"]["audienceImports"]

    def event_text(self) -> str:
        chunks = []
        for run in self.instance.get_runs():
            for entry in self.instance.all_logs(run.run_id):
                chunks.append(entry.user_message or "")
                if entry.dagster_event is not None:
                    chunks.append(repr(entry.dagster_event))
        return "\n".join(chunks)


@pytest.fixture
def make_pipeline(tmp_path: Path, sandbox_server: SandboxServer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CXI_BASE_URL", sandbox_server.vendor_url("cxi"))
    monkeypatch.setenv("CXI_API_KEY", API_KEY)
    sandbox_server.reset()
    stack = []

    def make(source_yaml: str, *, settle_seconds: float = 0.0) -> SourcePipeline:
        path = tmp_path / "feeds.yaml"
        path.write_text(
            f"sources:\n  hr:\n{source_yaml}\n"
            "destinations:\n  cxi:\n    type: communicate_xi\n    base_url: ${CXI_BASE_URL}\n"
            "    api_key: ${CXI_API_KEY}\n"
            f"feeds:\n  - name: {FEED}\n    source: hr\n    destination: cxi\n{MAPPING}",
            "utf-8",
        )
        feeds = load_feeds(path)
        register_feed_secrets(feeds)
        defs = build_definitions(feeds, tmp_path / "home")
        (tmp_path / "dagster").mkdir(exist_ok=True)
        cm = dg.instance_for_test(temp_dir=str(tmp_path / "dagster"))
        stack.append(cm)
        instance = cm.__enter__()
        driver = SensorDriver(defs, instance, log_level="WARNING", settle_seconds=settle_seconds)
        return SourcePipeline(defs, instance, driver, sandbox_server, tmp_path / "home")

    yield make
    for cm in stack:
        cm.__exit__(None, None, None)


@pytest.fixture
def sftp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SftpTestServer]:
    root = tmp_path / "sftp-root"
    (root / "outbound").mkdir(parents=True)
    server = SftpTestServer(root)
    server.start()
    monkeypatch.setenv("SFTP_PASSWORD", SFTP_PASSWORD)
    monkeypatch.setenv("SFTP_KNOWN_HOSTS", server.known_hosts_line)
    try:
        yield server
    finally:
        server.shutdown()


def sftp_yaml(server: SftpTestServer, extra: str = "") -> str:
    return (
        f"    type: sftp\n    host: 127.0.0.1\n    port: {server.port}\n    username: {SFTP_USER}\n"
        "    password: ${SFTP_PASSWORD}\n    known_hosts: ${SFTP_KNOWN_HOSTS}\n"
        f"    remote_dir: outbound\n    timeout_seconds: 5\n{extra}"
    )


def assert_demo_report(pipeline: SourcePipeline, partition: str) -> None:
    report = latest_metadata(pipeline.instance, KEY("failure_report"), partition)
    assert (report["source_rows"], report["rejected_by_validation"]) == (200, 6)
    assert (report["imported"], report["failed_at_target"], report["ignored_by_target"]) == (192, 2, 0)
    key = dg.AssetCheckKey(KEY("failure_report"), ACCOUNTING_CHECK)
    check = pipeline.instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    assert check.status.value == "SUCCEEDED"


def test_sftp_file_flows_to_the_failure_report(make_pipeline, sftp: SftpTestServer) -> None:
    pipeline = make_pipeline(sftp_yaml(sftp), settle_seconds=0.2)
    shutil.copy(DEMO_CSV, sftp.root / "outbound" / "employees.csv")

    runs = pipeline.discover()  # first sighting, then the settle re-tick takes it

    expected = partition_key("employees.csv", hash_file(DEMO_CSV))
    assert [r.tags["dagster/partition"] for r in runs] == [expected] and runs[0].is_success
    assert latest_metadata(pipeline.instance, KEY("hr_file"), expected)["source"].startswith(
        f"sftp {SFTP_USER}@127.0.0.1:{sftp.port}:outbound"
    )
    assert pipeline.wait_for_reports()[0].is_success
    assert_demo_report(pipeline, expected)
    assert [i["name"] for i in pipeline.imports()] == ["Staff from sources"]
    assert SFTP_PASSWORD not in pipeline.event_text()


def test_sftp_file_written_slowly_is_taken_only_when_complete(make_pipeline, sftp: SftpTestServer) -> None:
    pipeline = make_pipeline(sftp_yaml(sftp))
    data = DEMO_CSV.read_bytes()
    target = sftp.root / "outbound" / "employees.csv"
    target.write_bytes(data[: len(data) // 2])

    assert pipeline.tick_files() == []
    with target.open("ab") as fh:
        fh.write(data[len(data) // 2 :])
    assert pipeline.tick_files() == []  # grew since the last listing: still being written
    runs = pipeline.tick_files()

    assert len(runs) == 1 and runs[0].is_success
    assert pipeline.partitions() == [partition_key("employees.csv", hash_file(DEMO_CSV))]
    validation = latest_metadata(pipeline.instance, KEY("validated_rows"), pipeline.partitions()[0])
    assert validation["source_rows"] == 200


def test_sftp_down_between_ticks_skips_and_keeps_the_cursor(make_pipeline, sftp: SftpTestServer) -> None:
    pipeline = make_pipeline(sftp_yaml(sftp), settle_seconds=0.2)
    shutil.copy(DEMO_CSV, sftp.root / "outbound" / "a.csv")
    assert len(pipeline.discover()) == 1
    cursor = pipeline.driver.cursors[f"{FEED}__new_files"]
    sftp.stop()
    (sftp.root / "outbound" / "b.csv").write_bytes(DEMO_CSV.read_bytes().replace(b"Research &", b"R&D &"))

    sensor = pipeline.defs.resolve_sensor_def(f"{FEED}__new_files")
    context = dg.build_sensor_context(
        instance=pipeline.instance,
        instance_ref=pipeline.instance.get_ref(),
        cursor=cursor,
        resources=pipeline.defs.resources,
        definitions=pipeline.defs,
    )
    result = sensor.evaluate_tick(context)
    assert result.cursor == cursor and not result.run_requests
    assert f"sftp {SFTP_USER}@127.0.0.1:{sftp.port}" in result.skip_message
    assert SFTP_PASSWORD not in result.skip_message
    assert pipeline.discover() == [] and pipeline.driver.cursors[f"{FEED}__new_files"] == cursor

    sftp.start()
    runs = pipeline.discover()
    assert [r.tags["dagster/partition"].split("@")[0] for r in runs] == ["b.csv"]


def test_moved_file_is_reprocessed_from_staging_without_a_second_import(
    make_pipeline, sftp: SftpTestServer
) -> None:
    pipeline = make_pipeline(sftp_yaml(sftp, "    move_processed_to: processed\n"), settle_seconds=0.2)
    shutil.copy(DEMO_CSV, sftp.root / "outbound" / "employees.csv")
    (partition,) = [r.tags["dagster/partition"] for r in pipeline.discover()]
    pipeline.wait_for_reports()
    first_job = pipeline.imports()[0]["asyncJobId"]

    assert pipeline.discover() == []  # this tick moves the imported file
    assert (sftp.root / "outbound" / "processed" / "employees.csv").is_file()
    assert not (sftp.root / "outbound" / "employees.csv").exists()

    ingest = pipeline.defs.resolve_job_def(f"{FEED}__ingest")
    for wipe_staging in (False, True):  # backfill from the UI/CLI: staged copy, then the moved file
        if wipe_staging:
            shutil.rmtree(pipeline.home / "staging")
        rerun = ingest.execute_in_process(instance=pipeline.instance, partition_key=partition)
        assert rerun.success
        reused = latest_metadata(pipeline.instance, KEY("import_job"), partition)
        assert reused["reused_previous_import"] is True
    assert pipeline.imports()[0]["asyncJobId"] == first_job
    assert pipeline.wait_for_reports(expected=0, timeout=0.3) == []
    assert pipeline.discover() == []


def test_s3_object_flows_to_the_failure_report(make_pipeline, s3: S3Server, monkeypatch) -> None:
    client = s3.client()
    client.create_bucket(Bucket="hr-exports")
    client.put_object(Bucket="hr-exports", Key="workday/employees.csv", Body=DEMO_CSV.read_bytes())
    monkeypatch.setenv("S3_ENDPOINT", s3.endpoint_url)
    monkeypatch.setenv("S3_KEY_ID", s3.access_key_id)
    monkeypatch.setenv("S3_SECRET", s3.secret_access_key)
    pipeline = make_pipeline(
        "    type: s3\n    bucket: hr-exports\n    prefix: workday\n    endpoint_url: ${S3_ENDPOINT}\n"
        "    region: us-east-1\n    access_key_id: ${S3_KEY_ID}\n    secret_access_key: ${S3_SECRET}\n"
        "    tag_processed: audience-pipeline=imported\n"
    )

    runs = pipeline.discover()  # S3 objects are complete once listed: no second listing needed

    expected = partition_key("employees.csv", hash_file(DEMO_CSV))
    assert [r.tags["dagster/partition"] for r in runs] == [expected] and runs[0].is_success
    pipeline.wait_for_reports()
    assert_demo_report(pipeline, expected)
    assert pipeline.discover() == []
    tags = client.get_object_tagging(Bucket="hr-exports", Key="workday/employees.csv")["TagSet"]
    assert tags == [{"Key": "audience-pipeline", "Value": "imported"}]
    assert s3.secret_access_key not in pipeline.event_text()


@pytest.fixture
def report_server() -> Iterator[ReportServer]:
    server = ReportServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_report_url_pulls_on_schedule_and_imports_only_changes(
    make_pipeline, report_server: ReportServer, monkeypatch
) -> None:
    report_server.state.body = DEMO_CSV.read_bytes()
    monkeypatch.setenv("REPORT_URL", report_server.url + "?format=csv")
    monkeypatch.setenv("REPORT_USER", report_server.state.username)
    monkeypatch.setenv("REPORT_PASSWORD", report_server.state.password)
    pipeline = make_pipeline(
        "    type: http_report\n    url: ${REPORT_URL}\n    schedule: '0 6 * * 1-5'\n"
        "    timezone: Europe/Berlin\n    file_name: all_workers.csv\n"
        "    username: ${REPORT_USER}\n    password: ${REPORT_PASSWORD}\n"
    )
    assert pipeline.defs.resolve_schedule_def(f"{FEED}__report_pull").cron_schedule == "0 6 * * 1-5"

    runs = pipeline.discover()

    expected = partition_key("all_workers.csv", hash_file(DEMO_CSV))
    assert [r.tags["dagster/partition"] for r in runs] == [expected] and runs[0].is_success
    assert runs[0].tags["dagster/schedule_name"] == f"{FEED}__report_pull"
    pipeline.wait_for_reports()
    assert_demo_report(pipeline, expected)

    assert pipeline.discover() == []  # the same report again: no second import
    report_server.stop()
    assert pipeline.discover() == []  # down: the tick is skipped, the next one tries again
    report_server.start()
    report_server.state.body = DEMO_CSV.read_bytes().replace(b"Research &", b"R&D &")
    changed = pipeline.discover()
    assert len(changed) == 1 and changed[0].is_success
    pipeline.wait_for_reports()
    imports = pipeline.imports()
    assert len(imports) == 1 and len(pipeline.partitions()) == 2
    assert report_server.state.password not in pipeline.event_text()

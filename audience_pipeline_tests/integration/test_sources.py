"""Each HR source through Dagster against its real server: discovery, partition, ingest run to
the CXI sandbox, failure report; a file caught mid-write; a source that goes down between ticks;
re-processing a partition after its file was moved."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from audience_pipeline.automation.arrival import files_settling, new_files_sensor_name, report_schedule_name
from audience_pipeline.sources import http_report
from audience_pipeline.sources.base import partition_key
from audience_pipeline_tests.conftest import S3Server
from audience_pipeline_tests.integration.conftest import DEMO_CSV, DEMO_MAPPING, Pipeline, PipelineFactory
from audience_pipeline_tests.integration.leaks import assert_not_leaked, event_text
from audience_pipeline_tests.integration.test_pipeline import EXPECTED_REPORT
from audience_pipeline_tests.sources.servers import (
    SFTP_PASSWORD,
    SFTP_USER,
    ReportServer,
    RestartableS3Server,
    SftpTestServer,
)

pytestmark = pytest.mark.integration

FEED = "staff"
MAPPING = DEMO_MAPPING + "    options:\n      import_name: Staff from sources\n"
DEMO_KEY = "employees.csv"  # a file's first content: its name is the key
CHANGED_CSV = DEMO_CSV.read_bytes().replace(b"Research &", b"R&D &")

MakePipeline = Callable[..., Pipeline]


@pytest.fixture
def make_pipeline(pipeline_factory: PipelineFactory) -> MakePipeline:
    """The shared harness with the ``staff`` feed reading ``source_yaml`` (the source ``hr``)."""

    def make(source_yaml: str, *, settle_seconds: float = 0.0) -> Pipeline:
        feeds_text = (
            f"sources:\n  hr:\n{source_yaml}\n"
            "destinations:\n  cxi:\n    type: communicate_xi\n    base_url: ${CXI_BASE_URL}\n"
            "    api_key: ${CXI_API_KEY}\n"
            f"feeds:\n  - name: {FEED}\n    source: hr\n    destination: cxi\n{MAPPING}"
        )
        pipeline = pipeline_factory(FEED, feeds_text=feeds_text, register_secrets=True)
        pipeline.driver.settle_seconds = settle_seconds
        return pipeline

    return make


def discover(pipeline: Pipeline) -> list[dg.DagsterRun]:
    """One tick of what brings the feed's files: its new-file sensor or its report schedule."""
    return pipeline.driver.discover(pipeline.feed)


def tick_files(pipeline: Pipeline) -> list[dg.DagsterRun]:
    return pipeline.driver.tick(new_files_sensor_name(pipeline.feed))


def files_cursor(pipeline: Pipeline) -> str | None:
    return pipeline.driver.cursors.get(new_files_sensor_name(pipeline.feed))


def evaluate_new_files(pipeline: Pipeline) -> dg.SensorResult:
    """One evaluation of the new-file sensor from the driver's cursor, to read its skip message."""
    sensor = pipeline.defs.resolve_sensor_def(new_files_sensor_name(pipeline.feed))
    context = dg.build_sensor_context(
        instance=pipeline.instance,
        instance_ref=pipeline.instance.get_ref(),
        cursor=files_cursor(pipeline),
        resources=pipeline.defs.resources,
        definitions=pipeline.defs,
    )
    return sensor.evaluate_tick(context)


def assert_down_tick_skips(pipeline: Pipeline, *names: str) -> str:
    """The source is down: the tick skips naming it, the cursor stays; returns the skip message."""
    cursor = files_cursor(pipeline)
    result = evaluate_new_files(pipeline)
    assert result.cursor == cursor and not result.run_requests
    assert result.skip_message is not None
    for name in names:
        assert name in result.skip_message
    assert discover(pipeline) == [] and files_cursor(pipeline) == cursor
    return result.skip_message


def staged_files(pipeline: Pipeline) -> list[str]:
    """Every file (and left-over pull folder) under staging, relative to it."""
    staging = pipeline.root / "home" / "staging"
    if not staging.exists():
        return []
    return sorted(
        str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file() or p.name.startswith(".pull-")
    )


def assert_no_leak(pipeline: Pipeline, *secrets: str) -> None:
    assert_not_leaked(secrets, texts={"events": event_text(pipeline.instance)}, root=pipeline.root)


def assert_demo_report(pipeline: Pipeline, partition: str) -> None:
    report = pipeline.metadata("failure_report", partition)
    assert (report["source_rows"], report["rejected_by_validation"]) == (200, 6)
    assert (report["imported"], report["failed_at_target"], report["ignored_by_target"]) == (192, 2, 0)
    rows = pipeline.report_rows(partition)
    got = [(r["source_line"], r["unique_id"], r["stage"], r["outcome"], r["column"]) for r in rows]
    assert got == EXPECTED_REPORT
    assert pipeline.accounting_passed()


# --- folder -------------------------------------------------------------------------------------

FOLDER_YAML = "    type: folder\n    path: incoming\n"


def test_folder_file_written_in_two_halves_is_taken_only_when_complete(make_pipeline) -> None:
    pipeline = make_pipeline(FOLDER_YAML)
    data = DEMO_CSV.read_bytes()
    target = pipeline.drop("employees.csv", data[: len(data) // 2])

    assert tick_files(pipeline) == []  # first sighting: settling
    assert files_settling(files_cursor(pipeline)) == ["employees.csv"]
    with target.open("ab") as fh:
        fh.write(data[len(data) // 2 :])
    assert tick_files(pipeline) == []  # grew since the last listing: still being written
    assert files_settling(files_cursor(pipeline)) == ["employees.csv"] and pipeline.partitions() == []
    runs = tick_files(pipeline)

    assert [r.tags["dagster/partition"] for r in runs] == [DEMO_KEY] and runs[0].is_success
    assert pipeline.partitions() == [DEMO_KEY]
    assert pipeline.metadata("hr_file", DEMO_KEY)["source"] == f"folder {pipeline.incoming} (*.csv)"
    assert pipeline.wait_for_reports()[0].is_success
    assert_demo_report(pipeline, DEMO_KEY)
    assert [i["name"] for i in pipeline.imports()] == ["Staff from sources"]


def test_folder_unmounted_between_ticks_skips_and_keeps_the_cursor(make_pipeline) -> None:
    pipeline = make_pipeline(FOLDER_YAML, settle_seconds=0.2)
    pipeline.drop("a.csv", DEMO_CSV)
    assert len(discover(pipeline)) == 1
    unmounted = pipeline.root / "share-offline"
    pipeline.incoming.rename(unmounted)  # the share goes away, a new file lands on the server
    (unmounted / "b.csv").write_bytes(CHANGED_CSV)

    message = assert_down_tick_skips(pipeline, f"drop folder {pipeline.incoming} does not exist")
    assert message.startswith(f"folder {pipeline.incoming} (*.csv) is unavailable")

    unmounted.rename(pipeline.incoming)
    runs = discover(pipeline)
    assert [r.tags["dagster/partition"].split("@")[0] for r in runs] == ["b.csv"] and runs[0].is_success
    assert len(pipeline.partitions()) == 2
    assert discover(pipeline) == []


# --- SFTP ---------------------------------------------------------------------------------------


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


def test_sftp_file_flows_to_the_failure_report(make_pipeline, sftp: SftpTestServer) -> None:
    pipeline = make_pipeline(sftp_yaml(sftp), settle_seconds=0.2)
    shutil.copy(DEMO_CSV, sftp.root / "outbound" / "employees.csv")

    runs = discover(pipeline)  # first sighting, then the settle re-tick takes it

    assert [r.tags["dagster/partition"] for r in runs] == [DEMO_KEY] and runs[0].is_success
    assert pipeline.metadata("hr_file", DEMO_KEY)["source"].startswith(
        f"sftp {SFTP_USER}@127.0.0.1:{sftp.port}:outbound"
    )
    assert pipeline.wait_for_reports()[0].is_success
    assert_demo_report(pipeline, DEMO_KEY)
    assert [i["name"] for i in pipeline.imports()] == ["Staff from sources"]
    assert_no_leak(pipeline, SFTP_PASSWORD)


def test_sftp_file_written_slowly_is_taken_only_when_complete(make_pipeline, sftp: SftpTestServer) -> None:
    pipeline = make_pipeline(sftp_yaml(sftp))
    data = DEMO_CSV.read_bytes()
    target = sftp.root / "outbound" / "employees.csv"
    target.write_bytes(data[: len(data) // 2])

    assert tick_files(pipeline) == []
    with target.open("ab") as fh:
        fh.write(data[len(data) // 2 :])
    assert tick_files(pipeline) == []  # grew since the last listing: still being written
    runs = tick_files(pipeline)

    assert len(runs) == 1 and runs[0].is_success
    assert pipeline.partitions() == [DEMO_KEY]
    assert pipeline.metadata("validated_rows", DEMO_KEY)["source_rows"] == 200


def test_sftp_down_between_ticks_skips_and_keeps_the_cursor(make_pipeline, sftp: SftpTestServer) -> None:
    pipeline = make_pipeline(sftp_yaml(sftp), settle_seconds=0.2)
    shutil.copy(DEMO_CSV, sftp.root / "outbound" / "a.csv")
    assert len(discover(pipeline)) == 1
    sftp.stop()
    (sftp.root / "outbound" / "b.csv").write_bytes(CHANGED_CSV)

    message = assert_down_tick_skips(pipeline, f"sftp {SFTP_USER}@127.0.0.1:{sftp.port}")
    assert SFTP_PASSWORD not in message

    sftp.start()
    runs = discover(pipeline)
    assert [r.tags["dagster/partition"].split("@")[0] for r in runs] == ["b.csv"]


def test_moved_file_is_reprocessed_from_staging_without_a_second_import(
    make_pipeline, sftp: SftpTestServer
) -> None:
    pipeline = make_pipeline(sftp_yaml(sftp, "    move_processed_to: processed\n"), settle_seconds=0.2)
    shutil.copy(DEMO_CSV, sftp.root / "outbound" / "employees.csv")
    (partition,) = [r.tags["dagster/partition"] for r in discover(pipeline)]
    pipeline.wait_for_reports()
    first_job = pipeline.imports()[0]["asyncJobId"]

    assert discover(pipeline) == []  # this tick moves the imported file
    assert (sftp.root / "outbound" / "processed" / "employees.csv").is_file()
    assert not (sftp.root / "outbound" / "employees.csv").exists()

    ingest = pipeline.defs.resolve_job_def(f"{FEED}__ingest")
    for wipe_staging in (False, True):  # backfill from the UI/CLI: staged copy, then the moved file
        if wipe_staging:
            shutil.rmtree(pipeline.root / "home" / "staging")
        rerun = ingest.execute_in_process(instance=pipeline.instance, partition_key=partition)
        assert rerun.success
        assert pipeline.metadata("import_job", partition)["reused_previous_import"] is True
    assert pipeline.imports()[0]["asyncJobId"] == first_job
    assert pipeline.wait_for_reports(expected=0, timeout=0.3) == []
    assert discover(pipeline) == []


# --- S3 -----------------------------------------------------------------------------------------

BUCKET = "hr-exports"


def s3_yaml(server: S3Server, monkeypatch: pytest.MonkeyPatch, extra: str = "") -> str:
    monkeypatch.setenv("S3_ENDPOINT", server.endpoint_url)
    monkeypatch.setenv("S3_KEY_ID", server.access_key_id)
    monkeypatch.setenv("S3_SECRET", server.secret_access_key)
    return (
        f"    type: s3\n    bucket: {BUCKET}\n    prefix: workday\n    endpoint_url: ${{S3_ENDPOINT}}\n"
        "    region: us-east-1\n    access_key_id: ${S3_KEY_ID}\n    secret_access_key: ${S3_SECRET}\n"
        f"    timeout_seconds: 5\n{extra}"
    )


def test_s3_object_flows_to_the_failure_report(make_pipeline, s3: S3Server, monkeypatch) -> None:
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="workday/employees.csv", Body=DEMO_CSV.read_bytes())
    pipeline = make_pipeline(s3_yaml(s3, monkeypatch, "    tag_processed: audience-pipeline=imported\n"))

    runs = discover(pipeline)  # S3 objects are complete once listed: no second listing needed

    assert [r.tags["dagster/partition"] for r in runs] == [DEMO_KEY] and runs[0].is_success
    pipeline.wait_for_reports()
    assert_demo_report(pipeline, DEMO_KEY)
    assert discover(pipeline) == []
    tags = client.get_object_tagging(Bucket=BUCKET, Key="workday/employees.csv")["TagSet"]
    assert tags == [{"Key": "audience-pipeline", "Value": "imported"}]
    assert_no_leak(pipeline, s3.secret_access_key)


def test_s3_multipart_upload_in_progress_is_invisible_until_completed(
    make_pipeline, s3: S3Server, monkeypatch
) -> None:
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    key = "workday/employees.csv"
    upload = client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    data = DEMO_CSV.read_bytes()
    part = client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=1, Body=data)
    pipeline = make_pipeline(s3_yaml(s3, monkeypatch))

    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=BUCKET)["Uploads"]] == [key]
    assert discover(pipeline) == [] and pipeline.partitions() == []
    assert files_settling(files_cursor(pipeline)) == []  # not even seen: nothing to wait for

    client.complete_multipart_upload(
        Bucket=BUCKET,
        Key=key,
        UploadId=upload,
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )
    runs = discover(pipeline)

    assert [r.tags["dagster/partition"] for r in runs] == [DEMO_KEY] and runs[0].is_success
    assert pipeline.wait_for_reports()[0].is_success
    assert_demo_report(pipeline, DEMO_KEY)


def test_s3_object_waits_for_its_ready_marker(make_pipeline, s3: S3Server, monkeypatch) -> None:
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="workday/employees.csv", Body=DEMO_CSV.read_bytes())
    pipeline = make_pipeline(s3_yaml(s3, monkeypatch, "    ready_marker: .done\n"))

    assert discover(pipeline) == [] and discover(pipeline) == []  # complete object, but no marker
    assert files_settling(files_cursor(pipeline)) == ["employees.csv"] and pipeline.partitions() == []

    client.put_object(Bucket=BUCKET, Key="workday/employees.csv.done", Body=b"")
    runs = discover(pipeline)

    assert [r.tags["dagster/partition"] for r in runs] == [DEMO_KEY] and runs[0].is_success
    assert pipeline.partitions() == [DEMO_KEY]
    assert pipeline.metadata("validated_rows", DEMO_KEY)["source_rows"] == 200


@pytest.fixture
def own_s3() -> Iterator[RestartableS3Server]:
    """A moto server of this test's own, so stopping it leaves the session's alone."""
    server = RestartableS3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_s3_down_between_ticks_skips_keeps_the_cursor_and_resumes(
    make_pipeline, own_s3: RestartableS3Server, monkeypatch
) -> None:
    s3 = S3Server(endpoint_url=own_s3.endpoint_url)
    s3.reset()
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="workday/a.csv", Body=DEMO_CSV.read_bytes())
    pipeline = make_pipeline(s3_yaml(s3, monkeypatch))
    assert len(discover(pipeline)) == 1
    port = own_s3.port
    own_s3.stop()

    message = assert_down_tick_skips(pipeline, own_s3.endpoint_url, f"s3://{BUCKET}/workday/")
    assert "cannot list objects" in message and s3.secret_access_key not in message

    own_s3.start()  # a new server on the same port, with the same bucket and object
    assert own_s3.port == port
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="workday/a.csv", Body=DEMO_CSV.read_bytes())
    client.put_object(Bucket=BUCKET, Key="workday/b.csv", Body=CHANGED_CSV)
    runs = discover(pipeline)

    assert [r.tags["dagster/partition"].split("@")[0] for r in runs] == ["b.csv"] and runs[0].is_success
    assert len(pipeline.partitions()) == 2 and discover(pipeline) == []
    assert_no_leak(pipeline, s3.secret_access_key)


# --- HTTP report --------------------------------------------------------------------------------


@pytest.fixture
def report_server() -> Iterator[ReportServer]:
    server = ReportServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def report_pipeline(make_pipeline, report_server: ReportServer, monkeypatch) -> Pipeline:
    monkeypatch.setattr(http_report, "BACKOFF_SECONDS", 0.01)
    monkeypatch.setenv("REPORT_URL", report_server.url + "?format=csv")
    monkeypatch.setenv("REPORT_USER", report_server.state.username)
    monkeypatch.setenv("REPORT_PASSWORD", report_server.state.password)
    return make_pipeline(
        "    type: http_report\n    url: ${REPORT_URL}\n    schedule: '0 6 * * 1-5'\n"
        "    timezone: Europe/Berlin\n    file_name: all_workers.csv\n"
        "    username: ${REPORT_USER}\n    password: ${REPORT_PASSWORD}\n"
    )


def test_report_url_pulls_on_schedule_and_imports_only_changes(
    report_pipeline: Pipeline, report_server: ReportServer
) -> None:
    pipeline = report_pipeline
    report_server.state.body = DEMO_CSV.read_bytes()
    assert pipeline.defs.resolve_schedule_def(f"{FEED}__report_pull").cron_schedule == "0 6 * * 1-5"

    runs = discover(pipeline)

    expected = "all_workers.csv"
    assert [r.tags["dagster/partition"] for r in runs] == [expected] and runs[0].is_success
    assert runs[0].tags["dagster/schedule_name"] == f"{FEED}__report_pull"
    pipeline.wait_for_reports()
    assert_demo_report(pipeline, expected)

    assert discover(pipeline) == []  # the same report again: no second import
    report_server.stop()
    assert discover(pipeline) == []  # down: the tick is skipped, the next one tries again
    report_server.start()
    report_server.state.body = CHANGED_CSV
    changed = discover(pipeline)
    assert len(changed) == 1 and changed[0].is_success
    pipeline.wait_for_reports()
    imports = pipeline.imports()
    new_content = partition_key("all_workers.csv", hashlib.sha256(CHANGED_CSV).hexdigest())
    assert sorted(pipeline.partitions()) == [expected, new_content]  # the same name: now with a hash
    assert len(imports) == 1
    assert_no_leak(pipeline, report_server.state.password)


@pytest.mark.parametrize("declares_length", [True, False], ids=["short-of-content-length", "chunked-cut"])
def test_report_cut_mid_download_adds_nothing_and_the_next_pull_works(
    report_pipeline: Pipeline, report_server: ReportServer, declares_length: bool
) -> None:
    pipeline = report_pipeline
    report_server.state.body = DEMO_CSV.read_bytes()
    report_server.state.cut_after = len(report_server.state.body) // 2
    report_server.state.cut_declares_length = declares_length
    schedule = pipeline.defs.resolve_schedule_def(report_schedule_name(FEED))

    with dg.build_schedule_context(
        instance=pipeline.instance,
        scheduled_execution_time=datetime.now(UTC),
        resources=pipeline.defs.resources,
        repository_def=pipeline.defs.get_repository_def(),
    ) as context:
        result = schedule.evaluate_tick(context)

    assert not result.run_requests and result.skip_message is not None
    assert result.skip_message.startswith(f"report GET http://127.0.0.1:{report_server.port}/ccx/")
    assert "peer closed connection without sending complete message body" in result.skip_message
    assert report_server.state.password not in result.skip_message
    assert discover(pipeline) == []  # through the driver too: nothing launched
    assert len(report_server.state.requests) == 2  # both pulls reached the server and were cut
    assert pipeline.partitions() == [] and staged_files(pipeline) == []

    report_server.state.cut_after = None
    runs = discover(pipeline)

    expected = "all_workers.csv"
    assert [r.tags["dagster/partition"] for r in runs] == [expected] and runs[0].is_success
    assert staged_files(pipeline) == [f"{FEED}/{expected}/all_workers.csv"]
    assert pipeline.wait_for_reports()[0].is_success
    assert_demo_report(pipeline, expected)

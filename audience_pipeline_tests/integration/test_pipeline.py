"""End to end through Dagster: sensor-added partitions, runs, the blocking check, the status
sensor, the failure report and its accounting, against the sandbox over real HTTP."""

from __future__ import annotations

import json
import time

import dagster as dg
import pytest

from audience_pipeline.assets import ACCOUNTING_CHECK, REJECTION_CHECK
from audience_pipeline.automation.status import in_flight
from audience_pipeline_tests.integration.conftest import DEMO_CSV, FEED, Pipeline, PipelineFactory, demo_feeds

pytestmark = pytest.mark.integration

EXPECTED_REPORT = [
    ("43", "E01041", "validation", "rejected", "Mobile Phone"),
    ("60", "E01058", "validation", "rejected", "Email"),
    ("76", "", "validation", "rejected", "Employee ID"),
    ("94", "E01013", "validation", "rejected", "Employee ID"),
    ("121", "E01119", "validation", "rejected", "Email; Start Date"),  # nothing left to reach them
    ("143", "E01141", "validation", "rejected", "Email / Mobile Phone"),
    ("163", "E01161", "target", "failed", ""),
    ("180", "E01178", "target", "failed", ""),
]


def test_new_file_flows_to_failure_report(pipeline: Pipeline) -> None:
    pipeline.drop("employees_2026-11-01.csv", DEMO_CSV)

    runs = pipeline.ingest()

    assert len(runs) == 1 and runs[0].is_success
    partitions = pipeline.partitions()
    assert partitions == ["employees_2026-11-01.csv"]  # a first content is named by its file alone
    partition = partitions[0]
    assert runs[0].tags["dagster/partition"] == partition
    assert runs[0].tags["dagster/run_key"] == partition
    validation = pipeline.metadata("validated_rows", partition)
    assert validation["source_rows"] == 200
    assert validation["rejected_rows"] == 6
    assert validation["dagster/row_count"] == 194
    assert pipeline.check("validated_rows", REJECTION_CHECK).status.value == "SUCCEEDED"

    report_runs = pipeline.wait_for_reports()

    assert report_runs[0].is_success
    handle = pipeline.metadata("import_job", partition)["job_handle"]
    assert report_runs[0].tags["dagster/run_key"] == f"{handle['jobs'][0]['job_id']}:ended"
    report = pipeline.metadata("failure_report", partition)
    assert report["source_rows"] == 200
    assert report["rejected_by_validation"] == 6
    assert report["failed_at_target"] == 2
    assert report["imported"] == 192
    assert report["ignored_by_target"] == 0
    assert report["dagster/row_count"] == 8
    assert "| 163 | E01161 |" in report["preview"]
    rows = pipeline.report_rows(partition)
    got = [(r["source_line"], r["unique_id"], r["stage"], r["outcome"], r["column"]) for r in rows]
    assert got == EXPECTED_REPORT
    assert rows[6]["reason"] == "Email domain 'acme-corp.invalid' does not accept mail"
    assert rows[3]["reason"] == "Employee ID duplicates a value first seen on line 14"
    assert pipeline.accounting_passed()

    imports = pipeline.imports()
    assert [i["name"] for i in imports] == ["All staff"]
    assert imports[0]["uniqueIdFieldName"] == "unique_id"
    assert pipeline.wait_for_reports(expected=0, timeout=0.3) == []
    assert_story_is_told(pipeline, partition, report_runs[0], handle["jobs"][0]["job_id"])


TARGET = 'Communicate XI import "All staff"'


def assert_story_is_told(pipeline: Pipeline, partition: str, report_run: dg.DagsterRun, job_id: str) -> None:
    """Issue 14: target, typed metadata, one outcome word, checks tied to the file, log lines."""
    staged = pipeline.metadata("hr_file", partition)
    assert staged["file_name"] == "employees_2026-11-01.csv" and len(staged["sha256"]) == 64
    assert staged["source"].startswith("folder ") and staged["source"].endswith("incoming (*.csv)")

    event = (
        pipeline.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=pipeline.key("import_job"), asset_partitions=[partition]), limit=1
        )
        .records[0]
        .asset_materialization
    )
    assert event is not None
    typed = event.metadata
    assert typed["target"].value == TARGET
    assert isinstance(typed["submitted_at"], dg.TimestampMetadataValue)
    assert isinstance(typed["jobs"], dg.TextMetadataValue) and typed["jobs"].value == job_id
    assert isinstance(typed["import_key"], dg.TextMetadataValue)
    assert "| import_name | All staff |" in typed["vendor_details"].value
    assert "url" not in typed["vendor_details"].value.lower()

    report = pipeline.metadata("failure_report", partition)
    assert (report["outcome"], report["vendor_status"], report["target"]) == (
        "completed_with_failures",
        "failed",  # the vendor's own word, kept next to ours, never a run tag
        TARGET,
    )
    tags = pipeline.instance.get_run_by_id(report_run.run_id).tags
    assert tags["audience_pipeline/outcome"] == "completed_with_failures"
    assert "failed" not in {v for k, v in tags.items() if k.startswith("audience_pipeline/")}

    check = pipeline.check("failure_report", ACCOUNTING_CHECK)
    assert check is not None and check.partition == partition  # a partitioned check: its file shows
    evaluation = check.event.dagster_event.event_specific_data
    assert evaluation.description == (
        "200 source rows = 6 rejected + 0 unchanged + 194 submitted; 194 submitted = 192 imported + "
        "2 failed + 0 ignored; Communicate XI counts 192 imported (agrees)"
    )
    assert pipeline.check("validated_rows", REJECTION_CHECK).partition == partition

    defs = pipeline.defs
    spec = defs.resolve_assets_def(pipeline.key("import_job")).specs_by_key[pipeline.key("import_job")]
    assert TARGET in spec.description and "Every employee into the Communicate XI import" in spec.description
    assert spec.metadata["target"] == TARGET and spec.metadata["feed"] == FEED
    assert TARGET in defs.resolve_job_def(f"{FEED}__ingest").description

    said = [
        record.event_log_entry.user_message
        for run in pipeline.instance.get_runs()
        for record in pipeline.instance.get_records_for_run(run.run_id).records
        if record.event_log_entry.dagster_event is None
    ]
    for expected in (
        "staged employees_2026-11-01.csv from folder ",
        "validated employees_2026-11-01.csv: 200 rows, 194 valid, 6 rejected",
        f"submitted 194 rows to {TARGET} as job {job_id}",
        f"import finished: 192 imported, 2 failed, 0 ignored of 194 sent to {TARGET}",
        "report ",
    ):
        assert any(line.startswith(expected) for line in said), (expected, said)


def test_blocking_check_stops_a_broken_export(pipeline_factory: PipelineFactory) -> None:
    pipeline = pipeline_factory(feeds_text=demo_feeds(max_rejection_rate=0.02))
    pipeline.drop("employees.csv", DEMO_CSV)

    runs = pipeline.ingest()

    partition = pipeline.partitions()[0]
    check = pipeline.check("validated_rows", REJECTION_CHECK)
    assert check.status.value == "FAILED"
    assert pipeline.metadata("rejected_rows", partition)["dagster/row_count"] == 6
    assert pipeline.find_metadata("import_job", partition) is None
    assert pipeline.imports() == []
    assert runs[0].status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)
    assert pipeline.wait_for_reports(expected=0, timeout=0.3) == []


def test_same_content_is_not_imported_twice_and_new_content_updates_the_import(pipeline: Pipeline) -> None:
    pipeline.drop("employees.csv", DEMO_CSV)
    pipeline.ingest()
    pipeline.wait_for_reports()
    first_job = pipeline.imports()[0]["asyncJobId"]

    assert pipeline.ingest() == []  # next tick: nothing new
    partition = pipeline.partitions()[0]
    rerun = pipeline.defs.resolve_job_def(f"{FEED}__ingest").execute_in_process(
        instance=pipeline.instance, partition_key=partition
    )  # a backfill of the same partition from the UI or CLI
    assert rerun.success
    reused = pipeline.metadata("import_job", partition)
    assert reused["reused_previous_import"] is True
    assert pipeline.imports()[0]["asyncJobId"] == first_job
    assert pipeline.wait_for_reports(expected=0, timeout=0.3) == []

    changed = DEMO_CSV.read_text("utf-8").replace("Research &", "R&D &")
    pipeline.drop("employees.csv", changed)
    runs = pipeline.ingest()
    assert len(runs) == 1 and runs[0].is_success
    assert len(pipeline.partitions()) == 2
    pipeline.wait_for_reports()
    imports = pipeline.imports()
    assert len(imports) == 1 and imports[0]["asyncJobId"] != first_job


def test_status_sensor_keeps_a_small_cursor_and_requests_once(pipeline: Pipeline) -> None:
    pipeline.drop("employees.csv", DEMO_CSV)
    pipeline.ingest()
    sensor = pipeline.defs.resolve_sensor_def(f"{FEED}__import_status")

    def tick(cursor: str | None):
        context = dg.build_sensor_context(
            instance=pipeline.instance,
            instance_ref=pipeline.instance.get_ref(),
            cursor=cursor,
            resources=pipeline.defs.resources,
            definitions=pipeline.defs,
        )
        return sensor.evaluate_tick(context)

    pipeline.sandbox.add_fault(vendor="cxi", path_contains="/status", kind="status", status=404, times=1)
    first = tick(None)  # the poll fails: the import stays in flight, the sensor does not crash
    state = json.loads(first.cursor)
    assert not first.run_requests
    assert state["in_flight"] == 1 and len(first.cursor) < 100  # the imports live in the instance
    imports = in_flight(pipeline.instance, FEED)
    assert len(imports) == 1 and next(iter(imports.values()))["err"] == 1
    result, cursor = first, first.cursor
    for _ in range(100):
        result = tick(cursor)
        cursor = result.cursor
        if result.run_requests:
            break
        time.sleep(0.05)  # the sandbox moves the job on in the background
    assert len(result.run_requests) == 1
    assert result.run_requests[0].run_key.endswith(":ended")
    assert not tick(result.cursor).run_requests  # requested once; tracked until its report exists


def test_unreadable_file_fails_with_file_and_reason(pipeline: Pipeline) -> None:
    pipeline.drop("export.csv", b"PK\x03\x04 this is really a workbook")

    runs = pipeline.ingest()

    assert runs[0].status == dg.DagsterRunStatus.FAILURE
    message = pipeline.step_failures(runs[0])[0][1]
    assert "export.csv" in message and "xlsx" in message
    assert pipeline.imports() == []


def test_mapping_to_a_missing_header_names_it(pipeline: Pipeline) -> None:
    pipeline.drop("renamed.csv", DEMO_CSV.read_text("utf-8").replace("Start Date", "Hire Date", 1))

    runs = pipeline.ingest()

    assert runs[0].status == dg.DagsterRunStatus.FAILURE
    message = pipeline.step_failures(runs[0])[0][1]
    assert "renamed.csv" in message and "'Start Date'" in message and "line 1" in message


def test_source_that_is_down_skips_the_tick(pipeline: Pipeline) -> None:
    pipeline.incoming.rmdir()
    sensor = pipeline.defs.resolve_sensor_def(f"{FEED}__new_files")
    cursor = '{"a.csv": [1, 2, "a.csv@0123456789"]}'
    context = dg.build_sensor_context(
        instance=pipeline.instance,
        cursor=cursor,
        resources=pipeline.defs.resources,
        definitions=pipeline.defs,
    )
    result = sensor.evaluate_tick(context)
    assert not result.run_requests
    assert "does not exist" in result.skip_message
    assert result.cursor in (None, cursor)

"""Dialects through Dagster: a refused export fails the validate step with the file's name and the
reason and leaves the destination, and the last good import, alone; an Excel export in the
Windows code page flows exactly like the UTF-8 one, line numbers included."""

from __future__ import annotations

import csv
import io
import zipfile

import dagster as dg
import pytest

from audience_pipeline.feeds.loader import load_feeds
from audience_pipeline.validation import validate_for_feed
from audience_pipeline_tests.integration.conftest import DEMO_CSV, FEED, Pipeline
from audience_pipeline_tests.integration.test_pipeline import EXPECTED_REPORT

pytestmark = pytest.mark.integration


def _xlsx() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("xl/workbook.xml", "<workbook/>")
        archive.writestr("xl/worksheets/sheet1.xml", "<worksheet/>")
    return buffer.getvalue()


def _excel_windows_csv() -> bytes:
    """The demo export as Excel on a European Windows saves it: ';', CRLF, Windows-1252."""
    text = DEMO_CSV.read_text("utf-8").replace(",Sales,", ",Sales – EMEA,", 1)
    out = io.StringIO()
    csv.writer(out, delimiter=";", lineterminator="\r\n").writerows(csv.reader(io.StringIO(text, newline="")))
    return out.getvalue().encode("cp1252")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (_xlsx(), "this is an Excel workbook (.xlsx), not a CSV file; export it as CSV (UTF-8)"),
        (b"Employee ID,Email,Mobile Phone\r\n,,\r\n", "line 1: the file has a header but no data rows"),
        (b"Employee ID,Email,Email\nE1,a@b.c,d@e.f\n", "line 1: duplicate header 'Email' in columns 2 and 3"),
    ],
    ids=["xlsx", "header-only", "duplicate-header"],
)
def test_refused_file_fails_validation_and_leaves_the_last_import_alone(
    pipeline: Pipeline, content: bytes, reason: str
) -> None:
    pipeline.drop("employees_2026-11-01.csv", DEMO_CSV)
    assert pipeline.ingest()[0].is_success
    pipeline.wait_for_reports()
    imports_before = pipeline.imports()

    pipeline.drop("employees_2026-11-08.csv", content)
    runs = pipeline.ingest()

    assert len(runs) == 1 and runs[0].status == dg.DagsterRunStatus.FAILURE
    partition = runs[0].tags["dagster/partition"]
    assert partition == "employees_2026-11-08.csv"
    [(step, message)] = pipeline.step_failures(runs[0])
    assert step == f"{FEED}__validate"
    assert "employees_2026-11-08.csv: " in message and reason in message
    assert pipeline.find_metadata("hr_file", partition) is not None
    assert pipeline.find_metadata("validated_rows", partition) is None
    assert pipeline.find_metadata("import_job", partition) is None
    assert pipeline.imports() == imports_before
    assert pipeline.wait_for_reports(expected=0, timeout=0.3) == []


def test_windows_excel_export_flows_like_the_utf8_one(pipeline: Pipeline) -> None:
    pipeline.drop("employees_2026-11-01.csv", _excel_windows_csv())

    runs = pipeline.ingest()

    assert len(runs) == 1 and runs[0].is_success
    partition = runs[0].tags["dagster/partition"]
    validation = pipeline.metadata("validated_rows", partition)
    assert validation["encoding"] == "windows-1252"
    assert validation["delimiter"] == "';'"
    assert (validation["source_rows"], validation["rejected_rows"]) == (200, 6)
    pipeline.wait_for_reports()
    report = pipeline.metadata("failure_report", partition)
    assert (report["imported"], report["failed_at_target"]) == (192, 2)
    rows = pipeline.report_rows(partition)
    assert [(r["source_line"], r["unique_id"], r["stage"], r["outcome"], r["column"]) for r in rows] == (
        EXPECTED_REPORT
    )
    staging = pipeline.root / "home"
    assert not [p for p in staging.rglob("*.utf-8.csv")], "the transcoded copy must not be left behind"


def test_a_titled_export_with_capitalised_headers_flows_and_its_metadata_says_so(pipeline: Pipeline) -> None:
    header, *rows = DEMO_CSV.read_text("utf-8").splitlines()
    feed = next(f for f in load_feeds().feeds if f.name == FEED)
    plain = validate_for_feed(DEMO_CSV, feed)
    pipeline.drop(
        "employees_2026-11-01.csv",
        "\n".join(["Employee Report 2026-11-01", "", header.upper(), *rows, "Total: 200"]).encode() + b"\n",
    )

    runs = pipeline.ingest()

    assert len(runs) == 1 and runs[0].is_success
    validation = pipeline.metadata("validated_rows", runs[0].tags["dagster/partition"])
    assert validation["header_line"] == 3
    assert validation["header_matches"] == {name: name.upper() for name in header.split(",")}
    # the same rows as the plain export, and the footer as one reject more
    assert (validation["source_rows"], validation["rejected_rows"]) == (201, len(plain.rejects) + 1)

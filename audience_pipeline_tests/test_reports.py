"""The failure report people open in a spreadsheet, and the row accounting behind its check."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest

from audience_pipeline.destinations.base import JobOutcome, RowFailure
from audience_pipeline.reports import (
    REPORT_COLUMNS,
    RowAccounting,
    build_report,
    count_outcomes,
    markdown_preview,
    spreadsheet_safe,
    validation_findings,
    write_report,
)


def rejects() -> pd.DataFrame:
    """As ``validate_file`` returns them: a missing id and a frame-level reject without a column."""
    return pd.DataFrame(
        {
            "source_line": pd.Series([7, 2], dtype="int64"),
            "unique_id": pd.Series([None, "E2"], dtype="str"),
            "column": pd.Series(["Employee ID", None], dtype="str"),
            "value": pd.Series(["", "=HYPERLINK(1)"], dtype="str"),
            "reason": pd.Series(["missing unique id", "duplicate unique id"], dtype="str"),
        }
    )


def submitted() -> pd.DataFrame:
    return pd.DataFrame(
        {"source_line": [3, 4, 5, 8], "unique_id": ["E3", "E4", "E5", "E8"], "email": ["a", "b", "c", "d"]}
    ).astype({"unique_id": "str", "email": "str"})


def outcome() -> JobOutcome:
    return JobOutcome(
        submitted=4,
        failures=[
            RowFailure(row=3, reason="Invalid email"),
            RowFailure(row=1, reason="already a member", outcome="ignored"),
        ],
    )


def test_build_report_merges_and_sorts_by_line() -> None:
    report = build_report(rejects(), outcome(), submitted())

    assert list(report.columns) == REPORT_COLUMNS
    assert report["source_line"].dtype == "int64"
    got = [
        (r.source_line, None if pd.isna(r.unique_id) else r.unique_id, r.stage, r.outcome, r.reason)
        for r in report.itertuples()
    ]
    assert got == [
        (2, "E2", "validation", "rejected", "duplicate unique id"),
        (4, "E4", "target", "ignored", "already a member"),
        (7, None, "validation", "rejected", "missing unique id"),
        (8, "E8", "target", "failed", "Invalid email"),
    ]
    assert list(report["column"].fillna("<none>")) == ["<none>", "", "Employee ID", ""]


def warnings() -> pd.DataFrame:
    """Values cleared from kept rows: line 5 was imported all the same (submitted row 2)."""
    return pd.DataFrame(
        {
            "source_line": pd.Series([5], dtype="int64"),
            "unique_id": pd.Series(["E5"], dtype="str"),
            "column": pd.Series(["Mobile"], dtype="str"),
            "value": pd.Series(["n/a-ish"], dtype="str"),
            "reason": pd.Series(["Mobile is not a valid phone number: cleared"], dtype="str"),
        }
    )


def test_warnings_are_listed_with_their_own_outcome_beside_the_rows_failures() -> None:
    findings = validation_findings(rejects(), warnings())

    report = build_report(findings, outcome(), submitted())

    assert findings["source_line"].tolist() == [2, 5, 7]
    assert count_outcomes(findings) == (2, 1)
    assert count_outcomes(rejects()) == (2, 0)  # a frame from before warnings existed: all rejects
    assert [(r.source_line, r.stage, r.outcome) for r in report.itertuples()] == [
        (2, "validation", "rejected"),
        (4, "target", "ignored"),
        (5, "validation", "warning"),
        (7, "validation", "rejected"),
        (8, "target", "failed"),
    ]
    assert report.loc[2, ["column", "value"]].tolist() == ["Mobile", "n/a-ish"]


def test_warnings_are_an_extra_count_not_a_bucket() -> None:
    # 10 rows: 2 rejected, 8 submitted (3 of them with a cleared value), 5 imported, 2 failed, 1 ignored
    accounting = RowAccounting(
        source_rows=10, rejected=2, submitted=8, imported=5, failed=2, ignored=1, warnings=3
    )

    assert accounting.balanced
    assert accounting.as_metadata()["validation_warnings"] == 3
    assert validation_findings(rejects().iloc[:0], warnings().iloc[:0]).columns.tolist() == [
        "source_line",
        "unique_id",
        "column",
        "value",
        "reason",
        "outcome",
    ]


def test_build_report_without_problems_is_empty_with_columns() -> None:
    report = build_report(rejects().iloc[:0], JobOutcome(submitted=4), submitted())

    assert report.empty
    assert list(report.columns) == REPORT_COLUMNS
    assert report["source_line"].dtype == "int64"


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_spreadsheet_safe_prefixes_formula_starts(start: str) -> None:
    frame = pd.DataFrame({"value": [f"{start}cmd|'/c calc'!A1", "plain", None]}).astype({"value": "str"})

    safe = spreadsheet_safe(frame)

    assert safe["value"].iloc[0] == f"'{start}cmd|'/c calc'!A1"
    assert safe["value"].iloc[1] == "plain"
    assert pd.isna(safe["value"].iloc[2])
    assert frame["value"].iloc[0].startswith(start), "the input frame must not be modified"


def test_spreadsheet_safe_leaves_numbers_alone() -> None:
    frame = pd.DataFrame(
        {
            "ints": pd.Series([-3, 4], dtype="int64"),
            "floats": [-1.5, 2.0],
            "nullable": pd.array([-7, None], dtype="Int64"),
            "text": ["-3", "a=b"],
        }
    )

    safe = spreadsheet_safe(frame)

    pd.testing.assert_frame_equal(safe[["ints", "floats", "nullable"]], frame[["ints", "floats", "nullable"]])
    assert list(safe["text"]) == ["'-3", "a=b"]


def test_write_report_reads_back_as_expected(tmp_path: Path) -> None:
    report = build_report(rejects(), outcome(), submitted())

    path = write_report(report, tmp_path / "reports" / "failures.csv")

    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [
        REPORT_COLUMNS,
        ["2", "E2", "validation", "rejected", "", "'=HYPERLINK(1)", "duplicate unique id"],
        ["4", "E4", "target", "ignored", "", "", "already a member"],
        ["7", "", "validation", "rejected", "Employee ID", "", "missing unique id"],
        ["8", "E8", "target", "failed", "", "", "Invalid email"],
    ]


@pytest.mark.parametrize(
    ("accounting", "balanced"),
    [
        (RowAccounting(source_rows=10, rejected=2, submitted=8, imported=5, failed=2, ignored=1), True),
        (RowAccounting(source_rows=0, rejected=0, submitted=0, imported=0, failed=0, ignored=0), True),
        (RowAccounting(source_rows=10, rejected=2, submitted=8, imported=5, failed=2, ignored=0), False),
        (RowAccounting(source_rows=11, rejected=2, submitted=8, imported=5, failed=2, ignored=1), False),
        (RowAccounting(source_rows=10, rejected=2, submitted=9, imported=5, failed=2, ignored=1), False),
    ],
)
def test_row_accounting_balanced(accounting: RowAccounting, balanced: bool) -> None:
    assert accounting.balanced is balanced


def test_row_accounting_metadata() -> None:
    accounting = RowAccounting(source_rows=10, rejected=2, submitted=8, imported=5, failed=2, ignored=1)

    assert accounting.as_metadata() == {
        "source_rows": 10,
        "imported": 5,
        "rejected_by_validation": 2,
        "failed_at_target": 2,
        "ignored_by_target": 1,
        "unchanged": 0,
        "validation_warnings": 0,
    }


def test_markdown_preview_escapes_and_blanks_missing_values() -> None:
    report = build_report(rejects(), JobOutcome(submitted=4, failures=[RowFailure(0, "a|b\nc")]), submitted())

    lines = markdown_preview(report).splitlines()

    assert lines[:2] == ["| line | id | stage | column | reason |", "|---:|---|---|---|---|"]
    assert lines[2:] == [
        "| 2 | E2 | validation/rejected |  | duplicate unique id |",
        "| 3 | E3 | target/failed |  | a\\|b c |",
        "| 7 |  | validation/rejected | Employee ID | missing unique id |",
    ]


def test_markdown_preview_truncates_with_a_more_rows_line() -> None:
    report = build_report(rejects(), outcome(), submitted())

    preview = markdown_preview(report, limit=3)

    assert len([line for line in preview.splitlines() if line.startswith("| ")]) == 4
    assert "| 8 |" not in preview
    assert preview.endswith("\n\n_1 more row in the CSV report_")
    assert markdown_preview(report, limit=2).endswith("_2 more rows in the CSV report_")
    assert "more" not in markdown_preview(report, limit=4)


def test_markdown_preview_of_nothing() -> None:
    assert markdown_preview(build_report(rejects().iloc[:0], JobOutcome(submitted=0), submitted())) == (
        "_No rejected or failed rows._"
    )

"""Assemble the failure report: validation rejects and warnings, vendor failures, and leavers.

A rejected or failed row appears once per stage; a ``warning`` (an invalid optional value cleared
from a row that was imported all the same) is not a row outcome, so its source row can appear
again, for instance as failed at the target. A ``removed`` row is an employee who left since the
snapshot and whom the destination cannot remove: it has no line in the file and is not a source
row.

The CSV is opened by people in Excel, so a cell that starts like a formula (``= + - @``, tab,
carriage return) is prefixed with an apostrophe (OWASP's CSV-injection advice); HR data is
untrusted input like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from audience_pipeline.destinations.base import JobOutcome
from audience_pipeline.object_store import StorePath, write_file

REPORT_COLUMNS = ["source_line", "unique_id", "stage", "outcome", "column", "value", "reason"]
REJECTED, WARNING, REMOVED = "rejected", "warning", "removed"
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass
class RowAccounting:
    """Where every source row went; ``balanced`` is the check that none was lost or counted twice.

    ``source_rows = rejected + unchanged + submitted`` and ``submitted = imported + failed +
    ignored``: a valid row is either sent or, under ``sync_mode: changed``, ``unchanged`` since
    the snapshot and not sent (the destination already holds it as it is).
    ``warnings`` counts imported rows that had values cleared: they are in ``submitted`` already,
    so they are reported but take no part in the balance.
    """

    source_rows: int
    rejected: int
    submitted: int
    imported: int
    failed: int
    ignored: int
    warnings: int = 0
    unchanged: int = 0

    @property
    def balanced(self) -> bool:
        return (
            self.source_rows == self.rejected + self.unchanged + self.submitted
            and self.submitted == self.imported + self.failed + self.ignored
        )

    def as_metadata(self) -> dict[str, int]:
        return {
            "source_rows": self.source_rows,
            "imported": self.imported,
            "rejected_by_validation": self.rejected,
            "failed_at_target": self.failed,
            "ignored_by_target": self.ignored,
            "unchanged": self.unchanged,
            "validation_warnings": self.warnings,
        }


def validation_findings(rejects: pd.DataFrame, warnings: pd.DataFrame) -> pd.DataFrame:
    """Rejects and warnings in one frame (their columns plus ``outcome``), in file order: what the
    validate asset hands to the report."""
    frames = [f.assign(outcome=o) for f, o in ((rejects, REJECTED), (warnings, WARNING)) if len(f)]
    if not frames:
        return rejects.assign(outcome=pd.Series(dtype="str"))
    findings = pd.concat(frames, ignore_index=True)
    return findings.sort_values("source_line", kind="stable", ignore_index=True)


def count_outcomes(findings: pd.DataFrame) -> tuple[int, int]:
    """(rejected, warnings) among validation findings; a frame without ``outcome`` is all rejects."""
    if "outcome" not in findings.columns:
        return len(findings), 0
    warnings = int((findings["outcome"] == WARNING).sum())
    return len(findings) - warnings, warnings


def build_report(
    rejects: pd.DataFrame,
    outcome: JobOutcome,
    submitted: pd.DataFrame,
    leavers: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per rejected or failed source row, and per warning, in file order, so a person can
    fix the export; then the ``leavers`` (:func:`leaver_rows`), which have no line.

    ``rejects`` are validation's findings: rejects, or :func:`validation_findings` with an
    ``outcome`` column. ``submitted`` needs ``source_line`` and ``unique_id`` in the order the rows
    were sent, because a vendor failure only knows its row position.
    """
    validation = pd.DataFrame(
        {
            "source_line": rejects["source_line"].astype("int64"),
            "unique_id": rejects["unique_id"].astype("str"),
            "stage": "validation",
            "outcome": rejects["outcome"].astype("str") if "outcome" in rejects.columns else REJECTED,
            "column": rejects["column"].astype("str"),
            "value": rejects["value"].astype("str"),
            "reason": rejects["reason"].astype("str"),
        }
    )
    sent = submitted.iloc[[f.row for f in outcome.failures]].reset_index(drop=True)
    vendor = pd.DataFrame(
        {
            "source_line": sent["source_line"].astype("int64"),
            "unique_id": sent["unique_id"].astype("str"),
            "stage": "target",
            "outcome": [f.outcome for f in outcome.failures],
            "column": "",
            "value": "",
            "reason": [f.reason for f in outcome.failures],
        }
    )
    frames = [f for f in (validation, vendor) if len(f)]
    if not frames:
        report = pd.DataFrame(
            {c: pd.Series(dtype="int64" if c == "source_line" else "str") for c in REPORT_COLUMNS}
        )
    else:
        report = pd.concat(frames, ignore_index=True)
        report = report.sort_values("source_line", kind="stable", ignore_index=True)[REPORT_COLUMNS]
    if leavers is None or leavers.empty:
        return report
    return pd.concat([report, leavers[REPORT_COLUMNS]], ignore_index=True)


def leaver_rows(ids: Sequence[str], reason: str) -> pd.DataFrame:
    """Employees in the snapshot but not in the file, as report rows (``outcome: removed``, no
    line: they are not in the file), for destinations that cannot remove them."""
    return pd.DataFrame(
        {
            "source_line": pd.array([None] * len(ids), dtype="Int64"),
            "unique_id": pd.Series(list(ids), dtype="str"),
            "stage": "target",
            "outcome": REMOVED,
            "column": "",
            "value": "",
            "reason": reason,
        }
    )


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Text cells that a spreadsheet would run as a formula get a leading apostrophe.

    Numeric columns are left alone: ``-3`` is a number there, not a formula, and must stay one.
    """
    safe = frame.copy()
    for column in safe.columns:
        if pd.api.types.is_numeric_dtype(safe[column].dtype):
            continue
        values = safe[column].astype("str")
        risky = values.str.startswith(_FORMULA_START)
        safe[column] = values.where(~risky, "'" + values)
    return safe


def write_report(report: pd.DataFrame, path: StorePath) -> StorePath:
    """Write ``report`` as a spreadsheet-safe UTF-8 CSV (missing values as empty cells), locally or
    as an object (``object_store.py``); it appears whole or not at all."""
    with write_file(path) as fh:
        spreadsheet_safe(report).to_csv(fh, index=False, encoding="utf-8")
    return path


def markdown_preview(report: pd.DataFrame, limit: int = 20) -> str:
    """The first ``limit`` rows as a Markdown table for the Dagster UI; the CSV has them all."""
    if report.empty:
        return "_No rejected or failed rows._"
    head = report.head(limit)
    lines = ["| line | id | stage | column | reason |", "|---:|---|---|---|---|"]
    for row in head.itertuples(index=False):
        cells = [
            markdown_cell(row.source_line),
            markdown_cell(row.unique_id),
            f"{markdown_cell(row.stage)}/{markdown_cell(row.outcome)}",
            markdown_cell(row.column),
            markdown_cell(row.reason),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    more = len(report) - limit
    if more > 0:
        lines.append(f"\n_{more} more {'row' if more == 1 else 'rows'} in the CSV report_")
    return "\n".join(lines)


def markdown_cell(value: Any) -> str:
    """A table cell: missing values blank (not ``nan``), pipes escaped, on one line."""
    text = "" if pd.isna(value) else str(value)
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")

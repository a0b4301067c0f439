"""Assemble the failure report: validation rejects and vendor failures, one row per source row.

The CSV is opened by people in Excel, so a cell that starts like a formula (``= + - @``, tab,
carriage return) is prefixed with an apostrophe (OWASP's CSV-injection advice); HR data is
untrusted input like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from audience_pipeline.destinations.base import JobOutcome

REPORT_COLUMNS = ["source_line", "unique_id", "stage", "outcome", "column", "value", "reason"]
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass
class RowAccounting:
    source_rows: int
    rejected: int
    submitted: int
    imported: int
    failed: int
    ignored: int

    @property
    def balanced(self) -> bool:
        return (
            self.source_rows == self.imported + self.rejected + self.failed + self.ignored
            and self.submitted == self.imported + self.failed + self.ignored
        )

    def as_metadata(self) -> dict[str, int]:
        return {
            "source_rows": self.source_rows,
            "imported": self.imported,
            "rejected_by_validation": self.rejected,
            "failed_at_target": self.failed,
            "ignored_by_target": self.ignored,
        }


def build_report(rejects: pd.DataFrame, outcome: JobOutcome, submitted: pd.DataFrame) -> pd.DataFrame:
    """``submitted`` needs ``source_line`` and ``unique_id`` in the order the rows were sent."""
    validation = pd.DataFrame(
        {
            "source_line": rejects["source_line"].astype("int64"),
            "unique_id": rejects["unique_id"].astype("str"),
            "stage": "validation",
            "outcome": "rejected",
            "column": rejects["column"].astype("str"),
            "value": rejects["value"].astype("str"),
            "reason": rejects["reason"].astype("str"),
        }
    )
    rows = [f.row for f in outcome.failures]
    vendor = pd.DataFrame(
        {
            "source_line": submitted["source_line"].to_numpy()[rows].astype("int64"),
            "unique_id": submitted["unique_id"].to_numpy()[rows].astype(str),
            "stage": "target",
            "outcome": [f.outcome for f in outcome.failures],
            "column": "",
            "value": "",
            "reason": [f.reason for f in outcome.failures],
        }
    )
    frames = [f for f in (validation, vendor) if len(f)]
    if not frames:
        return pd.DataFrame(
            {c: pd.Series(dtype="int64" if c == "source_line" else "str") for c in REPORT_COLUMNS}
        )
    report = pd.concat(frames, ignore_index=True)
    return report.sort_values("source_line", kind="stable", ignore_index=True)[REPORT_COLUMNS]


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    safe = frame.copy()
    for column in safe.columns:
        if safe[column].dtype == "int64":
            continue
        values = safe[column].astype("str")
        risky = values.str.startswith(_FORMULA_START)
        safe[column] = values.where(~risky, "'" + values)
    return safe


def write_report(report: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    spreadsheet_safe(report).to_csv(path, index=False, encoding="utf-8")
    return path


def markdown_preview(report: pd.DataFrame, limit: int = 20) -> str:
    if report.empty:
        return "_No rejected or failed rows._"
    head = report.head(limit)
    lines = ["| line | id | stage | column | reason |", "|---:|---|---|---|---|"]
    for row in head.itertuples(index=False):
        cells = [
            str(row.source_line),
            str(row.unique_id),
            f"{row.stage}/{row.outcome}",
            str(row.column),
            str(row.reason),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    if len(report) > limit:
        lines.append(f"\n_{len(report) - limit} more rows in failures.csv_")
    return "\n".join(lines)

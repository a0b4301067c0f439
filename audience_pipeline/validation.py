"""Parse, normalise and validate one HR file, splitting it into valid rows and rejects.

``pandera`` runs with ``lazy=True`` so that every problem in the file is found in one pass, and its
``failure_cases`` become one reject per source row: the line, the identifier, the column as the
file names it, the value and a reason. Rows with the wrong number of fields (from the parser)
are rejects too, so every data record in the file ends up in exactly one of ``valid`` or
``rejects``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa

from audience_pipeline.csv_reader import ParsedCsv, read_csv
from audience_pipeline.feeds.model import FieldMapping
from audience_pipeline.normalize import normalize
from audience_pipeline.schemas.employee import REASONS, employee_schema, first_seen_index

REJECT_COLUMNS = ["source_line", "unique_id", "column", "value", "reason"]


@dataclass
class ValidationResult:
    valid: pd.DataFrame
    rejects: pd.DataFrame
    source_rows: int
    encoding: str
    delimiter: str
    headers: list[str]

    @property
    def rejection_rate(self) -> float:
        return len(self.rejects) / self.source_rows if self.source_rows else 0.0


def validate_file(path: Path | str, mapping: FieldMapping, *, default_region: str = "US") -> ValidationResult:
    parsed = read_csv(path)
    frame = normalize(parsed, mapping, default_region=default_region)
    valid, rejects = validate_frame(frame, mapping)
    rejects = pd.concat([_malformed_rejects(parsed), rejects], ignore_index=True)
    rejects = rejects.sort_values("source_line", kind="stable", ignore_index=True)
    return ValidationResult(
        valid=valid,
        rejects=rejects,
        source_rows=parsed.source_rows,
        encoding=parsed.encoding,
        delimiter=parsed.delimiter,
        headers=parsed.headers,
    )


def validate_frame(frame: pd.DataFrame, mapping: FieldMapping) -> tuple[pd.DataFrame, pd.DataFrame]:
    schema = employee_schema(mapping)
    try:
        schema.validate(frame, lazy=True, inplace=True)
    except pa.errors.SchemaErrors as exc:
        rejects = _rejects_from_failures(frame, exc.failure_cases, mapping)
        bad = np.zeros(len(frame), dtype=bool)
        bad[frame.index.get_indexer(rejects.pop("row_pos"))] = True
        return frame.loc[~bad].reset_index(drop=True), rejects
    return frame, pd.DataFrame(
        {c: pd.Series(dtype="int64" if c == "source_line" else "str") for c in REJECT_COLUMNS}
    )


def _rejects_from_failures(frame: pd.DataFrame, cases: pd.DataFrame, mapping: FieldMapping) -> pd.DataFrame:
    schema_errors = cases[cases["index"].isna()]
    if len(schema_errors):
        problems = "; ".join(f"{r.column}: {r.check}" for r in schema_errors.itertuples())
        raise ValueError(f"normalised frame does not match the schema: {problems}")
    headers = mapping.canonical_headers()
    frame_level = cases["schema_context"] == "DataFrameSchema"
    cases = cases.assign(
        row_pos=cases["index"].astype("int64"),
        column=cases["column"].where(~frame_level, None),
    )
    cases = cases.drop_duplicates(["row_pos", "column", "check"], ignore_index=True)
    positions = frame.index.get_indexer(cases["row_pos"])
    first_lines: np.ndarray | None = None
    if (cases["check"] == "unique_value").any():
        first = first_seen_index(frame["unique_id"])
        first_lines = frame["source_line"].to_numpy()[first]
    lines = frame["source_line"].to_numpy()
    records = []
    for case, pos in zip(cases.itertuples(index=False), positions, strict=True):
        column = case.column if case.column in headers else None
        check = str(case.check)
        reason = REASONS.get(check, check)
        if check == "unique_value" and first_lines is not None:
            reason = reason.format(first_line=int(first_lines[pos]))
        elif check == "iso_date":
            spec = mapping.attributes.get(str(column))
            reason = reason.format(
                format_hint=f" (expected {spec.format if spec and spec.format else 'YYYY-MM-DD'})"
            )
        if column is None:
            label = " / ".join(headers[c] for c in ("email", "mobile_phone") if c in headers)
            value = ""
            reason = f"both empty: the row {reason}"
        else:
            label = headers[column]
            raw = case.failure_case
            value = "" if raw is None or (isinstance(raw, float) and np.isnan(raw)) else str(raw)
        records.append((case.row_pos, int(lines[pos]), label, value, f"{label} {reason}"))
    long = pd.DataFrame(records, columns=["row_pos", "source_line", "column", "value", "reason"])
    grouped = long.groupby("row_pos", sort=False).agg(
        source_line=("source_line", "first"),
        column=("column", "; ".join),
        value=("value", "; ".join),
        reason=("reason", "; ".join),
    )
    grouped["unique_id"] = frame["unique_id"].reindex(grouped.index).fillna("").astype("str").to_numpy()
    grouped = grouped.reset_index()
    return grouped[["row_pos", *REJECT_COLUMNS]]


def _malformed_rejects(parsed: ParsedCsv) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "source_line": pd.Series([m.line for m in parsed.malformed], dtype="int64"),
            "unique_id": pd.Series([""] * len(parsed.malformed), dtype="str"),
            "column": pd.Series([""] * len(parsed.malformed), dtype="str"),
            "value": pd.Series([m.text for m in parsed.malformed], dtype="str"),
            "reason": pd.Series(
                [
                    f"row has {m.actual_fields} fields, the header has {m.expected_fields}"
                    for m in parsed.malformed
                ],
                dtype="str",
            ),
        }
    )

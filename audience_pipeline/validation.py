"""Parse, normalise and validate one HR file, splitting it into valid rows and rejects.

``pandera`` runs with ``lazy=True`` so that every problem in the file is found in one pass, and its
``failure_cases`` become one reject per source row: the line, the identifier, the column as the
file names it, the value as the file wrote it (:mod:`raw_values`) and a reason. Rows with the
wrong number of fields (from the parser) are rejects too, as are the rows :mod:`row_hygiene` sets
aside (NUL bytes, repeated headers, footers, Excel-rounded ids), so every data record in the file
ends up in exactly one of ``valid`` or ``rejects``. An invalid value in an optional column is, by
the feed's ``invalid_optional_fields``, either cleared from a row that is kept (listed in
``warnings``, same columns as ``rejects``) or a reason to reject the row (:mod:`optional_fields`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as pa_arrow
import pyarrow.compute as pc

from audience_pipeline.csv_reader import DEFAULT_MAX_FILE_BYTES, ParsedCsv, read_csv
from audience_pipeline.feeds.model import Feed, FieldMapping, InvalidOptionalFields
from audience_pipeline.header_match import in_file_terms
from audience_pipeline.normalize import check_mapping, normalize
from audience_pipeline.optional_fields import CLEARED_NOTE, clear_cells, triage
from audience_pipeline.raw_values import RawValues
from audience_pipeline.row_hygiene import screen_rows
from audience_pipeline.schemas.employee import REASONS, employee_schema

REJECT_COLUMNS = ["source_line", "unique_id", "column", "value", "reason"]


@dataclass
class ValidationResult:
    valid: pd.DataFrame
    rejects: pd.DataFrame
    source_rows: int
    encoding: str
    delimiter: str
    headers: list[str]
    header_matches: dict[str, str] = field(default_factory=dict)  # mapped -> as in the file, if inexact
    header_line: int = 1  # more than 1 when blank or title lines precede the header
    # Values cleared from rows that were kept (REJECT_COLUMNS): not rejects, the rows are in ``valid``.
    warnings: pd.DataFrame = field(default_factory=lambda: _empty_rejects())

    @property
    def rejection_rate(self) -> float:
        return len(self.rejects) / self.source_rows if self.source_rows else 0.0


def validate_for_feed(path: Path | str, feed: Feed) -> ValidationResult:
    """:func:`validate_file` with the feed's own mapping, phone region and file limits, so the
    asset and ``audience-pipeline validate`` judge a file the same way."""
    return validate_file(
        path,
        feed.mapping,
        default_region=feed.default_phone_region,
        allow_empty=feed.allow_empty,
        max_file_bytes=feed.max_file_bytes,
        invalid_optional_fields=feed.invalid_optional_fields,
    )


def validate_file(
    path: Path | str,
    mapping: FieldMapping,
    *,
    default_region: str = "US",
    allow_empty: bool = False,
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
    invalid_optional_fields: InvalidOptionalFields = "clear",
) -> ValidationResult:
    """Parse, normalise and validate ``path``; every data record ends up in ``valid`` or ``rejects``.

    ``allow_empty``, ``max_file_bytes`` and ``invalid_optional_fields`` are the feed's settings.
    """
    parsed = read_csv(
        path,
        allow_empty=allow_empty,
        max_file_bytes=max_file_bytes,
        mapped_headers=mapping.canonical_headers().values(),
    )
    mapping = in_file_terms(mapping, parsed.header_matches)
    check_mapping(parsed, mapping)
    set_aside = screen_rows(parsed, mapping)  # NUL bytes, repeated headers, footers, Excel ids
    raw_values = RawValues()
    frame = normalize(parsed, mapping, default_region=default_region, release=True, raw_values=raw_values)
    valid, rejects, warnings = _validate(
        frame, mapping, consume=True, raw_values=raw_values, invalid_optional_fields=invalid_optional_fields
    )
    del frame
    rejects = pd.concat([_malformed_rejects(parsed, mapping), set_aside, rejects], ignore_index=True)
    rejects = rejects.sort_values("source_line", kind="stable", ignore_index=True)
    return ValidationResult(
        valid=valid,
        rejects=rejects,
        source_rows=parsed.source_rows,
        encoding=parsed.encoding,
        delimiter=parsed.delimiter,
        headers=parsed.headers,
        header_matches=parsed.header_matches,
        header_line=parsed.header_line,
        warnings=warnings,
    )


def validate_frame(
    frame: pd.DataFrame, mapping: FieldMapping, *, invalid_optional_fields: InvalidOptionalFields = "clear"
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Split a normalised frame into valid rows (fresh ``RangeIndex``), one reject per bad row and
    one warning per kept row that had invalid optional values cleared."""
    return _validate(frame, mapping, consume=False, invalid_optional_fields=invalid_optional_fields)


def _validate(
    frame: pd.DataFrame,
    mapping: FieldMapping,
    *,
    consume: bool,
    raw_values: RawValues | None = None,
    invalid_optional_fields: InvalidOptionalFields = "clear",
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``consume=True`` empties ``frame`` column by column while copying out the valid rows, so that
    a large file is never held twice."""
    schema = employee_schema(mapping)
    try:
        schema.validate(frame, lazy=True, inplace=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
        del exc  # its traceback references the frame and pandera's intermediate results
        sorted_out = triage(frame, cases, schema, invalid_optional_fields)
        rejects = _rejects_from_failures(frame, cases[sorted_out.rejected], mapping, raw_values)
        warnings = _rejects_from_failures(
            frame, cases[sorted_out.cleared], mapping, raw_values, note=CLEARED_NOTE
        )
        bad = np.zeros(len(frame), dtype=bool)
        bad[rejects.pop("row_pos").to_numpy()] = True
        warnings.pop("row_pos")
        valid = _keep_rows(frame, ~bad, consume=consume)
        kept_at = np.cumsum(~bad) - 1  # a kept row's position in ``valid``
        clear_cells(valid, {name: kept_at[rows] for name, rows in sorted_out.cells.items()})
        return valid, rejects, warnings
    return frame, _empty_rejects(), _empty_rejects()


def _keep_rows(frame: pd.DataFrame, keep: np.ndarray, *, consume: bool) -> pd.DataFrame:
    """The rows where ``keep`` is true, filtered with Arrow kernels for the Arrow-backed columns."""
    mask = pa_arrow.array(keep)
    columns: dict[str, pd.Series] = {}
    for name in list(frame.columns):
        series = frame.pop(name) if consume else frame[name]
        dtype = series.dtype
        if isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow":
            columns[name] = pd.Series(dtype.__from_arrow__(_arrow(series).filter(mask)), copy=False)
        else:
            columns[name] = pd.Series(series.to_numpy()[keep])
        del series
    return pd.DataFrame(columns, copy=False)


def _arrow(series: pd.Series) -> pa_arrow.ChunkedArray | pa_arrow.Array:
    return pa_arrow.array(series, type=pa_arrow.large_string(), from_pandas=True)


def _empty_rejects() -> pd.DataFrame:
    return pd.DataFrame(
        {c: pd.Series(dtype="int64" if c == "source_line" else "str") for c in REJECT_COLUMNS}
    )


def _rejects_from_failures(
    frame: pd.DataFrame,
    cases: pd.DataFrame,
    mapping: FieldMapping,
    raw_values: RawValues | None = None,
    note: str = "",
) -> pd.DataFrame:
    """One row per failing frame row (``row_pos``), its problems joined with "; " in schema order;
    a value shows the file's own text where ``raw_values`` has it; ``note`` ends every reason."""
    schema_errors = cases[cases["index"].isna()]
    if len(schema_errors):
        problems = "; ".join(f"{r.column}: {r.check}" for r in schema_errors.itertuples())
        raise ValueError(f"normalised frame does not match the schema: {problems}")
    headers = mapping.canonical_headers()
    frame_level = (cases["schema_context"] == "DataFrameSchema").to_numpy()
    positions = frame.index.get_indexer(cases["index"].astype("int64"))
    columns = [None if f else c for f, c in zip(frame_level, cases["column"].tolist(), strict=True)]
    checks = [str(c) for c in cases["check"].tolist()]
    first_lines = _first_lines(frame, positions[np.array(checks) == "unique_value"]) if checks else {}
    lines = frame["source_line"].to_numpy()
    # pandera lists frame-level failures first: order by row, then by the column's place in the
    # mapping (the channel check sits with the email column), so a row's reasons read left to right.
    rank = {c: i for i, c in enumerate(headers)}
    channel_rank = min(rank.get("email", len(rank)), rank.get("mobile_phone", len(rank)))
    ranks = np.array([channel_rank if c is None else rank.get(c, len(rank)) for c in columns], dtype=np.int64)
    raws = cases["failure_case"].tolist()
    as_written = raw_values.lookup(columns, positions) if raw_values else {}
    rows: dict[int, tuple[list[str], list[str], list[str]]] = {}
    seen: set[tuple[int, str | None, str]] = set()
    for i in np.lexsort((ranks, positions)).tolist():
        pos, column, check, raw = int(positions[i]), columns[i], checks[i], raws[i]
        if (pos, column, check) in seen:
            continue
        seen.add((pos, column, check))
        column = column if column in headers else None
        reason = REASONS.get(check, check)
        if check == "unique_value":
            reason = reason.format(first_line=first_lines[pos])
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
            value = "" if raw is None or (isinstance(raw, float) and np.isnan(raw)) else str(raw)
            value = as_written.get(i, value)
        labels, values, reasons = rows.setdefault(pos, ([], [], []))
        labels.append(label)
        values.append(value)
        reasons.append(f"{label} {reason}{note}")
    row_pos = np.fromiter(rows, dtype=np.int64, count=len(rows))
    ids = _arrow(frame["unique_id"]).take(pa_arrow.array(row_pos)).to_pylist()
    return pd.DataFrame(
        {
            "row_pos": row_pos,
            "source_line": lines[row_pos].astype("int64"),
            "unique_id": pd.Series([v or "" for v in ids], dtype="str"),
            "column": pd.Series(["; ".join(r[0]) for r in rows.values()], dtype="str"),
            "value": pd.Series(["; ".join(r[1]) for r in rows.values()], dtype="str"),
            "reason": pd.Series(["; ".join(r[2]) for r in rows.values()], dtype="str"),
        }
    )


def _first_lines(frame: pd.DataFrame, duplicates: np.ndarray) -> dict[int, int]:
    """Source line of the first row with the same ``unique_id``, for each duplicate position.

    Only the duplicated values are looked up (one ``is_in`` pass), instead of indexing the column
    again as the schema's uniqueness check did.
    """
    if not len(duplicates):
        return {}
    ids = _arrow(frame["unique_id"])
    wanted = pc.unique(ids.take(pa_arrow.array(duplicates)))
    involved = np.flatnonzero(pc.is_in(ids, value_set=wanted).to_numpy(zero_copy_only=False))
    first: dict[str, int] = {}
    for pos, value in zip(involved.tolist(), ids.take(pa_arrow.array(involved)).to_pylist(), strict=True):
        first.setdefault(value, pos)
    lines = frame["source_line"].to_numpy()
    values = ids.take(pa_arrow.array(duplicates)).to_pylist()
    return {int(p): int(lines[first[v]]) for p, v in zip(duplicates.tolist(), values, strict=True)}


def _malformed_rejects(parsed: ParsedCsv, mapping: FieldMapping) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "source_line": pd.Series([m.line for m in parsed.malformed], dtype="int64"),
            "unique_id": pd.Series(parsed.malformed_ids(mapping.unique_id), dtype="str"),
            "column": pd.Series([""] * len(parsed.malformed), dtype="str"),
            "value": pd.Series([m.text for m in parsed.malformed], dtype="str"),
            "reason": pd.Series([m.reason for m in parsed.malformed], dtype="str"),
        }
    )

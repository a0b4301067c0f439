"""Set aside records that are not employees, or whose id cannot be trusted, before validation.

Each of these would otherwise be rejected for the wrong reason (an "invalid email" that is really
the header again) or, worse, pass. They become rejects with a reason of their own, taken out of
the parsed file before normalisation, so they never reach the schema and never count as the first
occurrence of a duplicate id. Rules, in order (a row gets the first that fits):

- **NUL byte**: a value of a mapped column holds U+0000 (a broken export step). The value is shown
  with the NUL written as ``\\x00``; the rest of the file is read.
- **Repeated header row**: the row repeats the header line (two exports joined together): its
  first field is the first header name as the header line wrote it, and every named field,
  trimmed, is its column's name.
- **Footer**: the last records of the file (at most :data:`FOOTER_RECORDS`, read upwards until one
  is not a footer) with at most two values, the first of which starts with a word such as Total,
  Count, Rows, Records, End, EOF, Generated or Summary; or with a single value that is words (has a
  space, ``:`` or ``=``), such as ``42 employees``. ``E42`` alone is a short row, not a footer.
- **Excel scientific notation id**: the id reads like ``1.23E+10``. Excel shows long numbers that
  way and keeps only 15 significant digits, so the digits that told people apart are gone; only a
  re-export with the column formatted as text brings them back.

Every test is a vectorised kernel over one column, skipped when a byte scan shows it cannot match
(no NUL in the file, no ``+`` in the ids); a clean file pays a few milliseconds per million rows.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from audience_pipeline.arrow_strings import value_bytes
from audience_pipeline.csv_reader import MalformedRow, ParsedCsv
from audience_pipeline.feeds.model import FieldMapping
from audience_pipeline.invisible import INVISIBLE_CLASS

FOOTER_RECORDS = 5
EXCEL_ID_PATTERN = r"^\s*[0-9](?:[.,][0-9]+)?[eE]\+[0-9]+\s*$"
_FOOTER_WORD = re.compile(
    r"(?:grand\s+)?(?:totals?|count|(?:row|record|employee)\s*count|rows|records|end|eof|"
    r"generated|summary)\b",
    re.IGNORECASE,
)
_WORDS = re.compile(r"[\s:=]")
NUL_REASON = (
    "{label} contains a NUL byte (shown as \\x00), a control character no value may hold; "
    "fix it in the HR system and export again"
)
HEADER_REASON = "repeated header row: the header line again (two exports joined?), not an employee"
FOOTER_REASON = "footer line below the data (a total or end-of-report line), not an employee"
EXCEL_REASON = (
    " is in Excel's scientific notation: Excel rounded the number and the original id is lost; "
    "re-export with the column formatted as text"
)


def screen_rows(parsed: ParsedCsv, mapping: FieldMapping) -> pd.DataFrame:
    """Rejects (``source_line, unique_id, column, value, reason``) for the records the rules above
    set aside; they leave ``parsed.table`` and ``parsed.malformed`` and count in ``set_aside``.

    ``mapping`` names the file's own headers (:func:`header_match.in_file_terms`).
    """
    table, headers = parsed.table, mapping.canonical_headers()
    id_header = mapping.unique_id
    taken = np.zeros(table.num_rows, dtype=bool)
    parts: list[pd.DataFrame] = []

    def claim(rows: np.ndarray) -> np.ndarray:
        rows = rows[~taken[rows]]
        taken[rows] = True
        return rows

    if parsed.has_nul:
        for header in dict.fromkeys(headers.values()):
            rows = claim(_rows_with(table.column(header), "\x00"))
            if len(rows):
                values = pc.replace_substring(table.column(header).take(rows), "\x00", "\\x00")
                reason = NUL_REASON.format(label=header)
                parts.append(_rejects(parsed, rows, _ids(table, id_header, rows), header, values, reason))
    rows = claim(_repeated_headers(table, parsed.headers, parsed.header_text))
    if len(rows):
        parts.append(_rejects(parsed, rows, "", "", _texts(table, rows, parsed.delimiter), HEADER_REASON))
    rows, footers = _footers(parsed)
    rows = claim(rows)
    if len(rows):
        parts.append(_rejects(parsed, rows, "", "", _texts(table, rows, parsed.delimiter), FOOTER_REASON))
    if footers:
        parts.append(_malformed_footers(footers))
        parsed.malformed = [m for m in parsed.malformed if m not in footers]
    rows = claim(_excel_ids(table.column(id_header)))
    if len(rows):
        ids = _ids(table, id_header, rows)
        reason = pd.Series(f"{id_header} ", index=range(len(rows)), dtype="str") + ids + EXCEL_REASON
        parts.append(_rejects(parsed, rows, ids, id_header, ids, reason))
    del table  # _drop frees each original column once its filtered copy exists
    if taken.any():
        _drop(parsed, ~taken)
    parsed.set_aside += int(taken.sum()) + len(footers)
    if not parts:
        return _rejects(parsed, _none(), "", "", [], "")
    return pd.concat(parts, ignore_index=True)


def _rows_with(values: pa.ChunkedArray, text: str) -> np.ndarray:
    found = pc.match_substring(values, text)
    return np.flatnonzero(found.to_numpy(zero_copy_only=False)) if pc.any(found).as_py() else _none()


def _none() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


def _repeated_headers(table: pa.Table, headers: list[str], as_written: list[str]) -> np.ndarray:
    """Rows whose every field, trimmed, is its column's name. Candidates are the rows whose first
    field equals the first name, trimmed or as written (a comparison at memcmp speed); only
    those are compared in full."""
    if not table.num_rows or not headers:
        return _none()
    first = pc.equal(table.column(0), headers[0])
    if as_written and as_written[0] != headers[0]:
        first = pc.or_(first, pc.equal(table.column(0), as_written[0]))
    rows = np.flatnonzero(first.to_numpy(zero_copy_only=False)) if pc.any(first).as_py() else _none()
    for i, name in enumerate(headers):
        if not len(rows):
            break
        same = pc.equal(pc.utf8_trim_whitespace(table.column(i).take(rows)), name)
        rows = rows[same.to_numpy(zero_copy_only=False)]
    return rows


def _footers(parsed: ParsedCsv) -> tuple[np.ndarray, list[MalformedRow]]:
    """The trailing footer records: positions in the table, and malformed rows."""
    table = parsed.table
    tail = range(max(0, table.num_rows - FOOTER_RECORDS), table.num_rows)
    records: list[tuple[int, int | MalformedRow]] = [(int(parsed.source_line[p]), p) for p in tail]
    records += [(m.line, m) for m in parsed.malformed[-FOOTER_RECORDS:]]
    rows: list[int] = []
    malformed: list[MalformedRow] = []
    for _, record in sorted(records, key=lambda r: r[0], reverse=True)[:FOOTER_RECORDS]:
        if isinstance(record, MalformedRow):
            fields = list(record.fields) if record.actual_fields > 1 else [record.text]
        else:
            fields = [table.column(i)[record].as_py() for i in range(table.num_columns)]
        if not _footer_like(fields, len(parsed.headers)):
            break
        (malformed if isinstance(record, MalformedRow) else rows).append(record)  # type: ignore[arg-type]
    return np.array(sorted(rows), dtype=np.int64), malformed


def _footer_like(fields: list[str], width: int) -> bool:
    values = [v.strip() for v in fields if v and v.strip()]
    if not values or len(values) > 2:
        return False
    if _FOOTER_WORD.match(values[0]):
        return True
    return len(values) == 1 and width > 1 and bool(_WORDS.search(values[0]))


def _excel_ids(ids: pa.ChunkedArray) -> np.ndarray:
    """Ids in Excel's scientific notation; skipped when no id has a ``+``."""
    if not any((data == 0x2B).any() for data in value_bytes(ids)):
        return _none()
    found = pc.match_substring_regex(ids, EXCEL_ID_PATTERN)
    return np.flatnonzero(found.to_numpy(zero_copy_only=False))


def _ids(table: pa.Table, id_header: str, rows: np.ndarray) -> pd.Series:
    """The rows' ids as the rejects report shows them: trimmed, without NUL or invisible characters."""
    ids = table.column(id_header).take(pa.array(rows))
    ids = pc.utf8_trim_whitespace(pc.replace_substring_regex(ids, f"\\x00|{INVISIBLE_CLASS}", ""))
    return pd.Series(ids.to_pylist(), dtype="str")


def _texts(table: pa.Table, rows: np.ndarray, delimiter: str) -> list[str]:
    """Whole rows as text (the delimiter between fields), as malformed rows are shown. Cell by
    cell: these are a few rows, and ``take`` would first join each column's chunks."""
    return [
        delimiter.join(table.column(i)[int(r)].as_py() or "" for i in range(table.num_columns))[:200]
        for r in rows
    ]


def _rejects(
    parsed: ParsedCsv,
    rows: np.ndarray,
    ids: pd.Series | str,
    column: str,
    values: pa.ChunkedArray | pd.Series | list[str],
    reason: pd.Series | str,
) -> pd.DataFrame:
    if isinstance(values, pa.ChunkedArray):
        values = values.to_pylist()
    return pd.DataFrame(
        {
            "source_line": pd.Series(parsed.source_line[rows], dtype="int64"),
            "unique_id": pd.Series(ids, index=range(len(rows)), dtype="str"),
            "column": pd.Series(column, index=range(len(rows)), dtype="str"),
            "value": pd.Series(values, index=range(len(rows)), dtype="str"),
            "reason": pd.Series(reason, index=range(len(rows)), dtype="str"),
        }
    )


def _malformed_footers(footers: list[MalformedRow]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "source_line": pd.Series([m.line for m in footers], dtype="int64"),
            "unique_id": pd.Series([""] * len(footers), dtype="str"),
            "column": pd.Series([""] * len(footers), dtype="str"),
            "value": pd.Series([m.text for m in footers], dtype="str"),
            "reason": pd.Series([FOOTER_REASON] * len(footers), dtype="str"),
        }
    )


def _drop(parsed: ParsedCsv, keep: np.ndarray) -> None:
    """Filter ``parsed`` to the kept rows a column at a time, so only one column is ever copied."""
    mask = pa.array(keep)
    names, columns = parsed.table.column_names, parsed.table.columns
    parsed.table = pa.table({})
    kept = []
    for i, column in enumerate(columns):
        kept.append(column.filter(mask))
        columns[i] = None  # type: ignore[call-overload]
        del column
    parsed.table = pa.Table.from_arrays(kept, names=names)
    parsed.source_line = parsed.source_line[keep]

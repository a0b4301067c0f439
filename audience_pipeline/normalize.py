"""Map source headers to canonical fields and normalise values, column at a time.

Everything runs as ``pyarrow.compute`` kernels (or numpy over the Arrow buffers) on whole
columns. Placeholders such as ``n/a`` become empty cells (:mod:`placeholders`); phone numbers
become E.164 when ``phonenumbers``' metadata says they are valid, judged column-wide as RE2
patterns (:mod:`phones`). A value that cannot be normalised is kept as it was (trimmed) so that
the schema rejects it and the report shows what the file said.
"""

from __future__ import annotations

import difflib
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from audience_pipeline.arrow_strings import string_chunks as _string_chunks
from audience_pipeline.csv_reader import ParsedCsv
from audience_pipeline.feeds.model import AttributeSpec, FieldMapping
from audience_pipeline.invisible import strip_invisible
from audience_pipeline.phones import E164_PATTERN as E164_PATTERN  # re-exported
from audience_pipeline.phones import e164_mask as e164_mask  # re-exported
from audience_pipeline.phones import remember_verdict, to_e164
from audience_pipeline.placeholders import placeholders_to_null
from audience_pipeline.raw_values import RawValues

ISO_DATE_FORMAT = "%Y-%m-%d"
_TRUE = ("true", "yes", "y", "1")
_FALSE = ("false", "no", "n", "0")
_DAYS_IN_MONTH = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int32)
_ROWS_PER_SLICE = 1 << 16  # bounds the temporaries of the numpy byte scans


class MappingError(ValueError):
    """The feed's mapping names a header that the file does not have."""


def check_mapping(parsed: ParsedCsv, mapping: FieldMapping) -> None:
    """Fail early, naming every missing header and the closest one the file has."""
    missing = [
        (field, header)
        for field, header in mapping.canonical_headers().items()
        if header not in parsed.headers
    ]
    if not missing:
        return
    parts = []
    for field, header in missing:
        close = difflib.get_close_matches(header, parsed.headers, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        parts.append(f"{field} -> {header!r}{hint}")
    raise MappingError(
        f"{parsed.path}: line {parsed.header_line}: the feed maps headers the file does not have: "
        f"{'; '.join(parts)}. "
        f"Headers in the file: {', '.join(repr(h) for h in parsed.headers)}"
    )


def normalize(
    parsed: ParsedCsv,
    mapping: FieldMapping,
    *,
    default_region: str = "US",
    release: bool = False,
    raw_values: RawValues | None = None,
) -> pd.DataFrame:
    """Canonical frame: ``source_line`` plus one column per mapped field, nulls for empty cells.

    With ``release=True`` each raw column is dropped from ``parsed.table`` once nothing else
    needs it, so a large file never holds its raw and normalised copies at the same time;
    ``raw_values`` keeps the raw text of the cells normalisation changed, for the rejects.
    Columns are built as ``large_string`` because that is what pandas' ``str`` dtype stores:
    ``to_pandas`` then shares the buffers instead of copying them.
    """
    check_mapping(parsed, mapping)
    headers = mapping.canonical_headers()
    uses = Counter(headers.values())
    columns: dict[str, pa.ChunkedArray] = {
        "source_line": pa.chunked_array([pa.array(parsed.source_line, type=pa.int64())])
    }
    for name, header in headers.items():
        raw = parsed.table.column(header)
        values = _normalize_column(raw, name, mapping, default_region)
        if raw_values is not None:
            raw_values.keep(name, raw, values)
        columns[name] = values.cast(pa.large_string())
        del raw, values
        uses[header] -= 1
        if release and not uses[header]:
            parsed.table = parsed.table.drop_columns([header])
    return pa.table(columns).to_pandas()


def _normalize_column(
    raw: pa.ChunkedArray, name: str, mapping: FieldMapping, default_region: str
) -> pa.ChunkedArray:
    if name in ("unique_id", "email"):
        raw = strip_invisible(raw)  # see invisible.py: never part of an id or an address
    values = placeholders_to_null(_blank_to_null(_trim(_single_line(raw))))
    if name == "email":
        return pc.utf8_lower(values)
    if name == "mobile_phone":
        return normalize_phones(values, default_region)
    if name in mapping.attributes:
        return _normalize_attribute(values, mapping.attributes[name])
    return values


# --------------------------------------------------------------------------- byte-level scans


def _may_contain_line_breaks(values: pa.ChunkedArray) -> bool:
    """Cheap over-approximation: any control byte (< 0x0e) in the values' data."""
    for offsets, data in _string_chunks(values):
        used = data[offsets[0] : offsets[-1]]
        for start in range(0, len(used), 1 << 24):
            if (used[start : start + (1 << 24)] < 0x0E).any():
                return True
    return False


def _edge_bytes_table(ascii_max: int, extra: tuple[int, ...]) -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    table[: ascii_max + 1] = True
    table[list(extra)] = True
    return table


# Bytes that can start / end a character utf8_trim_whitespace removes: ASCII <= 0x20, or the first /
# last byte of U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000
# (a test checks this against the kernel for every code point).
_TRIM_FIRST_BYTES = _edge_bytes_table(0x20, (0xC2, 0xE1, 0xE2, 0xE3))
_TRIM_LAST_BYTES = _edge_bytes_table(0x20, (*range(0x80, 0x8B), 0x9F, 0xA0, 0xA8, 0xA9, 0xAF))


def _trim_candidates(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Per row: might ``utf8_trim_whitespace`` change it? (Never false when it would.)"""
    out = []
    for offsets, data in _string_chunks(values):
        starts, ends = offsets[:-1], offsets[1:]
        filled = ends > starts
        rows = np.zeros(len(starts), dtype=bool)
        rows[filled] = _TRIM_FIRST_BYTES[data[starts[filled]]] | _TRIM_LAST_BYTES[data[ends[filled] - 1]]
        out.append(rows)
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def _single_line(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Line breaks inside a value become spaces, so row i of an upload is always line i + 2."""
    if _may_contain_line_breaks(values) and pc.any(pc.match_substring_regex(values, "[\r\n]")).as_py():
        return pc.replace_substring_regex(values, r"\s*[\r\n]+\s*", " ")
    return values


def _trim(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Trim surrounding whitespace, without allocating a new column when nothing needs it."""
    return pc.utf8_trim_whitespace(values) if _trim_candidates(values).any() else values


def _blank_to_null(values: pa.ChunkedArray) -> pa.ChunkedArray:
    blank = pc.equal(values, "")
    if not pc.any(blank).as_py():
        return values
    return pc.if_else(blank, pa.scalar(None, values.type), values)


# --------------------------------------------------------------------------- phones


def normalize_phones(values: pa.ChunkedArray, default_region: str) -> pa.ChunkedArray:
    """E.164 for every valid number (see :mod:`phones`); anything else is kept as written, so that
    the schema rejects or clears it and the report shows it. The verdict is handed on to the
    schema's check (``phones.remember_verdict``): judging a million numbers twice costs 0.3 s."""
    e164 = to_e164(values, default_region)
    valid = e164.is_valid().to_numpy(zero_copy_only=False)
    if e164.null_count:
        e164 = pc.if_else(e164.is_valid(), e164, values)
    result = e164.cast(pa.large_string())
    remember_verdict(result, valid)
    return result


# --------------------------------------------------------------------------- attributes


def _normalize_attribute(values: pa.ChunkedArray, spec: AttributeSpec) -> pa.ChunkedArray:
    if spec.type == "date":
        if spec.format in (None, ISO_DATE_FORMAT):
            # A valid ISO date already reads back as itself, and invalid values are kept: no-op.
            return values
        parsed = parse_dates(values, spec.format)
        iso = pc.cast(pc.cast(parsed, pa.date32(), safe=False), values.type)
        return pc.if_else(pc.is_null(parsed), values, iso)
    if spec.type == "boolean":
        lowered = pc.utf8_lower(values)
        return pc.if_else(
            pc.is_in(lowered, pa.array(_TRUE, values.type)),
            pa.scalar("true", values.type),
            pc.if_else(
                pc.is_in(lowered, pa.array(_FALSE, values.type)), pa.scalar("false", values.type), values
            ),
        )
    if spec.type in ("integer", "number"):
        return pc.replace_substring_regex(values, r"^\+", "")
    return values


def parse_dates(values: pa.ChunkedArray | pa.Array, fmt: str | None) -> pa.ChunkedArray | pa.Array:
    """Timestamps, or null where the value is empty or not a real date in the expected format.

    Arrow's strptime rolls impossible dates over (2021-02-30 becomes 2021-03-02), so a value only
    counts when formatting the parsed date again gives the same text back. ISO dates, the common
    case, are checked by :func:`iso_date_mask` instead, which is the same rule without strftime
    (the slowest kernel in the pipeline).
    """
    fmt = fmt or ISO_DATE_FORMAT
    if fmt == ISO_DATE_FORMAT:
        real = pa.array(iso_date_mask(values))
        return pc.cast(pc.if_else(real, values, pa.scalar(None, values.type)), pa.timestamp("s"))
    parsed = pc.strptime(values, format=fmt, unit="s", error_is_null=True)
    # strptime also reads unpadded numbers and any letter case ("1/2/2021", "5 FEB 2021"), so those
    # are compared without leading zeros, in lower case.
    same = pc.equal(_date_text_key(pc.strftime(parsed, format=fmt)), _date_text_key(values))
    return pc.if_else(pc.fill_null(same, False), parsed, pa.scalar(None, parsed.type))


def _date_text_key(values: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    return pc.utf8_lower(pc.replace_substring_regex(values, r"(^|[^0-9])0+([0-9])", r"\1\2"))


def iso_date_mask(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """True where a value is a real ``YYYY-MM-DD`` date (years 0000-9999), false otherwise and for nulls.

    Reads the 10 bytes of each candidate straight from the Arrow buffers: this is what the strptime
    and strftime round trip accepts, at a fraction of its cost.
    """
    out: list[np.ndarray] = []
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    for chunk, (offsets, data) in zip(chunks, _string_chunks(values), strict=True):
        starts = offsets[:-1]
        ok = (offsets[1:] - starts) == 10
        if chunk.null_count:
            ok &= chunk.is_valid().to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(ok)
        for first in range(0, len(rows), _ROWS_PER_SLICE):
            part = rows[first : first + _ROWS_PER_SLICE]
            ok[part] = _real_iso_dates(data[starts[part, None] + np.arange(10)].astype(np.int32) - 48)
        out.append(ok)
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def _real_iso_dates(d: np.ndarray) -> np.ndarray:
    """``d``: rows of 10 byte values minus ord('0'); a dash is -3."""
    digits = d[:, [0, 1, 2, 3, 5, 6, 8, 9]]
    shape = ((digits >= 0) & (digits <= 9)).all(axis=1) & (d[:, 4] == -3) & (d[:, 7] == -3)
    year = d[:, 0] * 1000 + d[:, 1] * 100 + d[:, 2] * 10 + d[:, 3]
    month = d[:, 5] * 10 + d[:, 6]
    day = d[:, 8] * 10 + d[:, 9]
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    days = _DAYS_IN_MONTH[np.clip(month, 0, 12)] + (leap & (month == 2))
    return shape & (month >= 1) & (month <= 12) & (day >= 1) & (day <= days)

"""Map source headers to canonical fields and normalise values, column at a time.

Everything runs as ``pyarrow.compute`` kernels over whole columns; only the few phone numbers
that are not already E.164 go through ``phonenumbers`` one by one (PERF-NOTES: 28 s row by row
for a million rows, 2 s with the fast path). A value that cannot be normalised is kept as it was
(trimmed) so that the schema rejects it and the report shows what the file said.
"""

from __future__ import annotations

import difflib

import numpy as np
import pandas as pd
import phonenumbers
import pyarrow as pa
import pyarrow.compute as pc

from audience_pipeline.csv_reader import ParsedCsv
from audience_pipeline.feeds.model import AttributeSpec, FieldMapping

E164_PATTERN = r"^\+[1-9][0-9]{6,14}$"
_PHONE_PUNCTUATION = r"[\s\-\(\)\./]"
_TRUE = ("true", "yes", "y", "1")
_FALSE = ("false", "no", "n", "0")


class MappingError(ValueError):
    """The feed's mapping names a header that the file does not have."""


def check_mapping(parsed: ParsedCsv, mapping: FieldMapping) -> None:
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
        f"{parsed.path}: line 1: the feed maps headers the file does not have: {'; '.join(parts)}. "
        f"Headers in the file: {', '.join(repr(h) for h in parsed.headers)}"
    )


def normalize(parsed: ParsedCsv, mapping: FieldMapping, *, default_region: str = "US") -> pd.DataFrame:
    """Canonical frame: ``source_line`` plus one column per mapped field, nulls for empty cells."""
    check_mapping(parsed, mapping)
    table = parsed.table
    columns: dict[str, pa.Array] = {"source_line": pa.array(parsed.source_line, type=pa.int64())}
    for name, header in mapping.canonical_headers().items():
        values = _blank_to_null(pc.utf8_trim_whitespace(_single_line(table.column(header))))
        if name == "email":
            values = pc.utf8_lower(values)
        elif name == "mobile_phone":
            values = normalize_phones(values, default_region)
        elif name in mapping.attributes:
            values = _normalize_attribute(values, mapping.attributes[name])
        columns[name] = values
    return pa.table(columns).to_pandas()


def _single_line(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Line breaks inside a value become spaces, so row i of an upload is always line i + 2."""
    if pc.any(pc.match_substring(values, "\n")).as_py() or pc.any(pc.match_substring(values, "\r")).as_py():
        return pc.replace_substring_regex(values, r"\s*[\r\n]+\s*", " ")
    return values


def _blank_to_null(values: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)


def normalize_phones(values: pa.ChunkedArray, default_region: str) -> pa.ChunkedArray:
    """E.164 where possible: strip punctuation, ``00`` -> ``+``; parse only what is left."""
    stripped = pc.replace_substring_regex(values, _PHONE_PUNCTUATION, "")
    stripped = pc.replace_substring_regex(stripped, r"^00", "+")
    ok = pc.fill_null(pc.match_substring_regex(stripped, E164_PATTERN), True)
    if pc.all(ok).as_py():
        return stripped
    todo = np.flatnonzero(~ok.to_numpy(zero_copy_only=False))
    originals = values.take(pa.array(todo)).to_pylist()
    fixed = [_parse_phone(v, default_region) for v in originals]
    out = stripped.to_numpy(zero_copy_only=False).astype(object)
    out[todo] = fixed
    return pa.chunked_array([pa.array(out, type=pa.string())])


def _parse_phone(value: str, region: str) -> str:
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return value
    if not phonenumbers.is_valid_number(number):
        return value
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _normalize_attribute(values: pa.ChunkedArray, spec: AttributeSpec) -> pa.ChunkedArray:
    if spec.type == "date":
        parsed = parse_dates(values, spec.format)
        iso = pc.strftime(parsed, format="%Y-%m-%d")
        return pc.if_else(pc.is_null(parsed), values, iso)
    if spec.type == "boolean":
        lowered = pc.utf8_lower(values)
        mapped = pc.if_else(
            pc.is_in(lowered, pa.array(_TRUE)),
            "true",
            pc.if_else(pc.is_in(lowered, pa.array(_FALSE)), "false", values),
        )
        return mapped
    if spec.type in ("integer", "number"):
        return pc.replace_substring_regex(values, r"^\+", "")
    return values


def parse_dates(values: pa.ChunkedArray, fmt: str | None) -> pa.ChunkedArray:
    """Timestamps, or null where the value is empty or not a real date in the expected format.

    Arrow's strptime rolls impossible dates over (2021-02-30 becomes 2021-03-02), so a value only
    counts when formatting the parsed date again gives the same text back.
    """
    fmt = fmt or "%Y-%m-%d"
    parsed = pc.strptime(values, format=fmt, unit="s", error_is_null=True)
    same = pc.equal(pc.strftime(parsed, format=fmt), values)
    return pc.if_else(pc.fill_null(same, False), parsed, pa.scalar(None, parsed.type))

"""The canonical employee record as a pandera schema, built per feed mapping.

Checks are vectorised ``pyarrow.compute`` kernels on the frame's own ``str`` dtype: pandera's
built-in ``str_matches`` and ``unique`` cost several times more per million rows, and any dtype
the frame does not already have would make pandera coerce element by element (PERF-NOTES).
Each check has a stable name; :data:`REASONS` turns it into a sentence a person can act on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as arrow
import pyarrow.compute as pc

from audience_pipeline.feeds.model import AttributeSpec, FieldMapping
from audience_pipeline.normalize import E164_PATTERN, parse_dates

EMAIL_PATTERN = r"^[a-z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$"
MAX_TEXT_LENGTH = 255

REASONS: dict[str, str] = {
    "not_nullable": "is empty but required",
    "unique_value": "duplicates a value first seen on line {first_line}",
    "email_format": "is not a valid email address",
    "e164_phone": "is not a phone number that can be written in E.164 (+ country code and number)",
    "iso_date": "is not a valid date{format_hint}",
    "integer": "is not a whole number",
    "number": "is not a number",
    "boolean": "is not true/false (accepted: true, false, yes, no, y, n, 1, 0)",
    "text_length": f"is longer than {MAX_TEXT_LENGTH} characters",
    "has_channel": "has neither an email address nor a mobile phone number",
}


def _arrow(series: pd.Series) -> arrow.Array:
    return arrow.array(series, type=arrow.string(), from_pandas=True)


def _mask(result: arrow.Array | arrow.ChunkedArray, index: pd.Index) -> pd.Series:
    return pd.Series(result.to_numpy(zero_copy_only=False), index=index, dtype=bool)


def _regex_check(name: str, pattern: str) -> pa.Check:
    def check(series: pd.Series) -> pd.Series:
        ok = pc.fill_null(pc.match_substring_regex(_arrow(series), pattern), True)
        return _mask(ok, series.index)

    return pa.Check(check, name=name, error=name)


def first_seen_index(series: pd.Series) -> np.ndarray:
    """Position of each value's first occurrence (nulls point at themselves)."""
    encoded = pc.dictionary_encode(_arrow(series))
    if isinstance(encoded, arrow.ChunkedArray):
        encoded = encoded.combine_chunks()
    codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    positions = np.arange(len(series))
    valid = codes >= 0
    first = np.full(len(encoded.dictionary), len(series), dtype=np.int64)
    np.minimum.at(first, codes[valid], positions[valid])
    out = positions.copy()
    out[valid] = first[codes[valid]]
    return out


def _unique_check() -> pa.Check:
    def check(series: pd.Series) -> pd.Series:
        first = first_seen_index(series)
        return pd.Series(first == np.arange(len(series)), index=series.index)

    return pa.Check(check, name="unique_value", error="unique_value")


def _date_check(spec: AttributeSpec) -> pa.Check:
    def check(series: pd.Series) -> pd.Series:
        values = _arrow(series)
        parsed = parse_dates(values, "%Y-%m-%d")
        return _mask(pc.or_(pc.is_null(values), pc.is_valid(parsed)), series.index)

    return pa.Check(check, name="iso_date", error="iso_date")


def _length_check() -> pa.Check:
    def check(series: pd.Series) -> pd.Series:
        ok = pc.fill_null(pc.less_equal(pc.utf8_length(_arrow(series)), MAX_TEXT_LENGTH), True)
        return _mask(ok, series.index)

    return pa.Check(check, name="text_length", error="text_length")


def _attribute_checks(spec: AttributeSpec) -> list[pa.Check]:
    if spec.type == "date":
        return [_date_check(spec)]
    if spec.type == "integer":
        return [_regex_check("integer", r"^-?[0-9]+$")]
    if spec.type == "number":
        return [_regex_check("number", r"^-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$")]
    if spec.type == "boolean":
        return [_regex_check("boolean", r"^(?:true|false)$")]
    return []


def _has_channel(df: pd.DataFrame) -> pd.Series:
    present = np.zeros(len(df), dtype=bool)
    for name in ("email", "mobile_phone"):
        if name in df.columns:
            present |= df[name].notna().to_numpy()
    return pd.Series(present, index=df.index)


def employee_schema(mapping: FieldMapping) -> pa.DataFrameSchema:
    """Schema for the normalised frame of one feed (see :func:`normalize.normalize`)."""
    both_channels = bool(mapping.email and mapping.mobile_phone)
    columns: dict[str, pa.Column] = {
        "source_line": pa.Column("int64", nullable=False),
        "unique_id": pa.Column("str", nullable=False, checks=[_unique_check(), _length_check()]),
    }
    if mapping.email:
        columns["email"] = pa.Column(
            "str", nullable=both_channels, checks=[_regex_check("email_format", EMAIL_PATTERN)]
        )
    if mapping.mobile_phone:
        columns["mobile_phone"] = pa.Column(
            "str", nullable=both_channels, checks=[_regex_check("e164_phone", E164_PATTERN)]
        )
    for name in ("first_name", "last_name"):
        if getattr(mapping, name):
            columns[name] = pa.Column("str", nullable=True, checks=[_length_check()])
    for name, spec in mapping.attributes.items():
        columns[name] = pa.Column("str", nullable=not spec.required, checks=_attribute_checks(spec))
    checks = [pa.Check(_has_channel, name="has_channel", error="has_channel")] if both_channels else []
    return pa.DataFrameSchema(columns, checks=checks, strict=True, coerce=False, name="employee")

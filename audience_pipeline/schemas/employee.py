"""The canonical employee record as a pandera schema, built per feed mapping.

Checks are vectorised ``pyarrow.compute`` kernels (or numpy over the Arrow buffers) on the frame's
own ``str`` dtype, whose ``large_string`` storage they read without a copy: pandera's built-in
``str_matches`` and ``unique`` cost several times more per million rows, and any dtype the frame
does not already have would make pandera coerce element by element (PERF-NOTES). Every check
passes nulls itself (nullability is pandera's own check), so they run with ``ignore_na=False``:
otherwise pandera copies each nullable column without its nulls before calling the check.
Each check has a stable name; :data:`REASONS` turns it into a sentence a person can act on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as arrow
import pyarrow.compute as pc

from audience_pipeline.feeds.model import AttributeSpec, FieldMapping
from audience_pipeline.normalize import iso_date_mask
from audience_pipeline.phones import E164_PATTERN as E164_PATTERN  # re-exported: the shape it checks
from audience_pipeline.phones import valid_e164_mask

EMAIL_PATTERN = (
    r"^[a-z0-9.!#$%&'*+/=?^_`{|}~-]+@"
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$"
)
MAX_TEXT_LENGTH = 255

REASONS: dict[str, str] = {
    "not_nullable": "is empty but required",
    "unique_value": "duplicates a value first seen on line {first_line}",
    "email_format": "is not a valid email address",
    "e164_phone": (
        "is not a valid phone number (its country's numbering plan has no such number; without + or 00 "
        "it is read as a number of the feed's default_phone_region)"
    ),
    "iso_date": "is not a valid date{format_hint}",
    "integer": "is not a whole number",
    "number": "is not a number",
    "boolean": "is not true/false (accepted: true, false, yes, no, y, n, 1, 0)",
    "text_length": f"is longer than {MAX_TEXT_LENGTH} characters",
    "has_channel": "has neither an email address nor a mobile phone number",
}


def _arrow(series: pd.Series) -> arrow.Array | arrow.ChunkedArray:
    """The series as Arrow strings; zero-copy for the ``str`` dtype (its storage is large_string)."""
    return arrow.array(series, type=arrow.large_string(), from_pandas=True)


def _mask(result: arrow.Array | arrow.ChunkedArray, index: pd.Index) -> pd.Series:
    return pd.Series(result.to_numpy(zero_copy_only=False), index=index, dtype=bool)


def _regex_check(name: str, pattern: str) -> pa.Check:
    def check(series: pd.Series) -> pd.Series:
        ok = pc.fill_null(pc.match_substring_regex(_arrow(series), pattern), True)
        return _mask(ok, series.index)

    return pa.Check(check, name=name, error=name, ignore_na=False)


def _codes(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Dictionary codes (-1 for null) and, per distinct value, the position of its first row.

    The positions are int32 while they fit: on a million rows every temporary counts (the
    uniqueness check is where validation peaks in memory).
    """
    values = _arrow(series)
    encoded = pc.dictionary_encode(values)
    chunks = encoded.chunks if isinstance(encoded, arrow.ChunkedArray) else [encoded]
    if len({(c.dictionary.buffers()[1].address, len(c.dictionary)) for c in chunks}) > 1:
        # Chunks encoded against different dictionaries: encode the column as one array instead.
        chunks = [pc.dictionary_encode(values.combine_chunks())]
    size = len(chunks[0].dictionary) if chunks else 0
    index_type = np.int32 if len(series) < 2**31 else np.int64
    codes = np.concatenate(
        [pc.fill_null(c.indices, -1).to_numpy(zero_copy_only=False).astype(index_type) for c in chunks]
        or [np.zeros(0, dtype=index_type)]
    )
    positions = np.arange(len(codes), dtype=index_type)
    first = np.full(size, len(codes), dtype=index_type)
    valid = codes >= 0
    if valid.all():
        np.minimum.at(first, codes, positions)
    else:
        np.minimum.at(first, codes[valid], positions[valid])
    return codes, first


def first_seen_index(series: pd.Series) -> np.ndarray:
    """Position of each value's first occurrence (nulls point at themselves)."""
    codes, first = _codes(series)
    out = np.arange(len(codes), dtype=np.int64)
    valid = codes >= 0
    out[valid] = first[codes[valid]]
    return out


def _unique_check() -> pa.Check:
    def check(series: pd.Series) -> pd.Series:
        codes, first = _codes(series)
        is_first = first[codes] == np.arange(len(codes), dtype=codes.dtype)
        is_first[codes < 0] = True  # nulls are the not_nullable check's business
        return pd.Series(is_first, index=series.index)

    return pa.Check(check, name="unique_value", error="unique_value", ignore_na=False)


def _mask_check(name: str, valid: Callable[[arrow.ChunkedArray | arrow.Array], np.ndarray]) -> pa.Check:
    """A check from a byte-level validity mask of :mod:`normalize` (nulls pass)."""

    def check(series: pd.Series) -> pd.Series:
        values = _arrow(series)
        null = pc.is_null(values).to_numpy(zero_copy_only=False)
        return pd.Series(null | valid(values), index=series.index)

    return pa.Check(check, name=name, error=name, ignore_na=False)


def _length_check() -> pa.Check:
    def check(series: pd.Series) -> pd.Series:
        values = _arrow(series)
        # Bytes >= characters: when no value has more bytes than the limit, skip counting characters.
        if (pc.max(pc.binary_length(values)).as_py() or 0) <= MAX_TEXT_LENGTH:
            return pd.Series(True, index=series.index)
        ok = pc.fill_null(pc.less_equal(pc.utf8_length(values), MAX_TEXT_LENGTH), True)
        return _mask(ok, series.index)

    return pa.Check(check, name="text_length", error="text_length", ignore_na=False)


def _attribute_checks(spec: AttributeSpec) -> list[pa.Check]:
    if spec.type == "date":
        return [_mask_check("iso_date", iso_date_mask)]
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
            "str", nullable=both_channels, checks=[_mask_check("e164_phone", valid_e164_mask)]
        )
    for name in ("first_name", "last_name"):
        if getattr(mapping, name):
            columns[name] = pa.Column("str", nullable=True, checks=[_length_check()])
    for name, spec in mapping.attributes.items():
        columns[name] = pa.Column("str", nullable=not spec.required, checks=_attribute_checks(spec))
    checks = [pa.Check(_has_channel, name="has_channel", error="has_channel")] if both_channels else []
    return pa.DataFrameSchema(columns, checks=checks, strict=True, coerce=False, name="employee")

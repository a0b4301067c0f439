"""Map source headers to canonical fields and normalise values, column at a time.

Everything runs as ``pyarrow.compute`` kernels (or numpy over the Arrow buffers) on whole
columns. Phone numbers that are not already E.164 are handled on a filtered subset: national
formats of the feed's region are converted with the region's ``phonenumbers`` metadata compiled
to RE2 patterns (see :func:`national_to_e164`), and only what is left goes through ``phonenumbers``
one by one (PERF-NOTES: 28 s row by row for a million rows). A value that cannot be normalised is
kept as it was (trimmed) so that the schema rejects it and the report shows what the file said.
"""

from __future__ import annotations

import difflib
import functools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import phonenumbers
import pyarrow as pa
import pyarrow.compute as pc

from audience_pipeline.csv_reader import ParsedCsv
from audience_pipeline.feeds.model import AttributeSpec, FieldMapping

E164_PATTERN = r"^\+[1-9][0-9]{6,14}$"
ISO_DATE_FORMAT = "%Y-%m-%d"
_PHONE_PUNCTUATION = r"[\s\-\(\)\./]"
# Values made only of ASCII digits and these separators reach phonenumbers as plain digits (they
# are all in its VALID_PUNCTUATION, and none can start an extension), so the national fast path
# may take them. Anything else (letters, tabs, "x", "#", Unicode digits) goes to phonenumbers.
_NATIONAL_CHARS = r"^[0-9 ()./-]+$"
_MAX_PHONE_INPUT = 250  # phonenumbers refuses longer input (_MAX_INPUT_STRING_LENGTH)
_TWO_DIGITS = r"(?s)\p{Nd}.*\p{Nd}"  # phonenumbers needs two (Unicode) digits to call it viable
# phonenumbers' _number_type_helper tries these descriptions; a number is valid when it matches the
# general description and one of them.
_NUMBER_TYPES = (
    "premium_rate",
    "toll_free",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
    "fixed_line",
    "mobile",
)
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
        f"{parsed.path}: line 1: the feed maps headers the file does not have: {'; '.join(parts)}. "
        f"Headers in the file: {', '.join(repr(h) for h in parsed.headers)}"
    )


def normalize(
    parsed: ParsedCsv, mapping: FieldMapping, *, default_region: str = "US", release: bool = False
) -> pd.DataFrame:
    """Canonical frame: ``source_line`` plus one column per mapped field, nulls for empty cells.

    With ``release=True`` each raw column is dropped from ``parsed.table`` once nothing else
    needs it, so a large file never holds its raw and normalised copies at the same time.
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
        columns[name] = _normalize_column(parsed.table.column(header), name, mapping, default_region).cast(
            pa.large_string()
        )
        uses[header] -= 1
        if release and not uses[header]:
            parsed.table = parsed.table.drop_columns([header])
    return pa.table(columns).to_pandas()


def _normalize_column(
    raw: pa.ChunkedArray, name: str, mapping: FieldMapping, default_region: str
) -> pa.ChunkedArray:
    values = _blank_to_null(_trim(_single_line(raw)))
    if name == "email":
        return pc.utf8_lower(values)
    if name == "mobile_phone":
        return normalize_phones(values, default_region)
    if name in mapping.attributes:
        return _normalize_attribute(values, mapping.attributes[name])
    return values


# --------------------------------------------------------------------------- byte-level scans


def _string_chunks(values: pa.ChunkedArray | pa.Array) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each chunk's offsets (int64, one more than rows) and data bytes, as zero-copy numpy views."""
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    for chunk in chunks:
        large = pa.types.is_large_string(chunk.type) or pa.types.is_large_binary(chunk.type)
        width = 8 if large else 4
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(
            offsets_buf,
            dtype=np.int64 if large else np.int32,
            count=len(chunk) + 1,
            offset=chunk.offset * width,
        ).astype(np.int64, copy=False)
        data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8)
        yield offsets, data


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
    """E.164 where possible; values that are not E.164 already are fixed on a filtered subset.

    Subset rules, in order: strip punctuation and turn a leading ``00`` into ``+``; then national
    formats of ``default_region`` (:func:`national_to_e164`); then ``phonenumbers`` for the rest.
    """
    todo_rows = ~e164_mask(values) & pc.is_valid(values).to_numpy(zero_copy_only=False)
    if not todo_rows.any():
        return values
    todo = pa.array(todo_rows)
    subset = pc.filter(values, todo)
    subset = subset.combine_chunks() if isinstance(subset, pa.ChunkedArray) else subset
    fixed = _normalize_non_e164(subset.cast(pa.string()), default_region)
    return pc.replace_with_mask(values, todo, fixed.cast(values.type))


def _normalize_non_e164(values: pa.Array, region: str) -> pa.Array:
    stripped = pc.replace_substring_regex(values, _PHONE_PUNCTUATION, "")
    stripped = pc.replace_substring_regex(stripped, r"^00", "+")
    # "+44 (0)20 …": a bracketed trunk prefix is dropped when dialling from abroad, except where the
    # country keeps it (Italy); only the metadata knows, so those values go to phonenumbers.
    done = pc.and_(
        pc.match_substring_regex(stripped, E164_PATTERN),
        pc.invert(pc.match_substring(values, "(0)")),
    ).to_numpy(zero_copy_only=False)
    result = pc.if_else(pa.array(done), stripped, values)
    pending = ~done
    national = pending & pc.and_(
        pc.match_substring_regex(values, _NATIONAL_CHARS),
        pc.less_equal(pc.utf8_length(values), _MAX_PHONE_INPUT),
    ).to_numpy(zero_copy_only=False)
    if national.any():
        rows = np.flatnonzero(national)
        fixed = national_to_e164(stripped.take(pa.array(rows)), region)
        hit = fixed.is_valid().to_numpy(zero_copy_only=False)
        if hit.any():
            result = _replace_rows(result, rows[hit], fixed.filter(pa.array(hit)))
            pending[rows[hit]] = False
    viable = pc.match_substring_regex(values, _TWO_DIGITS).to_numpy(zero_copy_only=False)
    rest = np.flatnonzero(pending & viable)
    if len(rest):
        originals = values.take(pa.array(rest)).to_pylist()
        parsed = pa.array([_parse_phone(v, region) for v in originals], type=pa.string())
        result = _replace_rows(result, rest, parsed)
    return result


def e164_mask(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """True where a value matches :data:`E164_PATTERN` (nulls: false), reading bytes, not running RE2.

    ``+``, a digit 1-9, then 6-14 digits: per row, the length, two leading bytes and a count of
    non-digits (a running sum over the bytes) decide it, about five times faster than the regex.
    """
    out: list[np.ndarray] = []
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    for chunk, (offsets, data) in zip(chunks, _string_chunks(values), strict=True):
        ok = np.zeros(len(chunk), dtype=bool)
        for first in range(0, len(chunk), _ROWS_PER_SLICE):
            bounds = offsets[first : first + _ROWS_PER_SLICE + 1]
            if bounds[-1] == bounds[0]:
                continue
            starts, ends = bounds[:-1] - bounds[0], bounds[1:] - bounds[0]
            part = data[bounds[0] : bounds[-1]]
            non_digits = np.concatenate(([0], np.cumsum((part < 0x30) | (part > 0x39), dtype=np.int32)))
            length = ends - starts
            rows = np.flatnonzero((length >= 8) & (length <= 16))
            head = starts[rows]
            ok[first + rows] = (
                (part[head] == 0x2B)
                & (part[head + 1] >= 0x31)
                & (part[head + 1] <= 0x39)
                & (non_digits[ends[rows]] - non_digits[head + 1] == 0)
            )
        if chunk.null_count:
            ok &= chunk.is_valid().to_numpy(zero_copy_only=False)
        out.append(ok)
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def _replace_rows(values: pa.Array, rows: np.ndarray, replacements: pa.Array) -> pa.Array:
    mask = np.zeros(len(values), dtype=bool)
    mask[rows] = True
    return pc.replace_with_mask(values, pa.array(mask), replacements)


def _parse_phone(value: str, region: str) -> str:
    """E.164, or ``value`` unchanged when it is not a valid number; a leading ``00`` counts as ``+``."""
    try:
        number = phonenumbers.parse("+" + value[2:] if value.startswith("00") else value, region)
    except phonenumbers.NumberParseException:
        return value
    if not phonenumbers.is_valid_number(number):
        return value
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


@dataclass(frozen=True)
class _NumberDesc:
    pattern: str  # national_number_pattern, anchored for a full match
    lengths: tuple[int, ...]  # possible lengths; empty means "not checked"


@dataclass(frozen=True)
class _NationalPlan:
    """What ``phonenumbers.parse`` needs to read a region's national numbers, as RE2 patterns."""

    country_code: str
    international_prefix: str | None
    national_prefix: str | None  # national_prefix_for_parsing, anchored at the start
    general: _NumberDesc
    types: tuple[_NumberDesc, ...]
    possible_lengths: tuple[int, ...]
    local_only_lengths: tuple[int, ...]


@functools.lru_cache(maxsize=64)
def _national_plan(region: str) -> _NationalPlan | None:
    """The region's numbering plan, or None where the fast path cannot mirror phonenumbers exactly.

    It cannot when the national prefix is rewritten (``national_prefix_transform_rule``, e.g. AR,
    BR), when the region shares its country code but is not the main region or is picked by
    leading digits (e.g. CA, GG), or when a pattern is not valid RE2. Those feeds still get correct
    results, from ``phonenumbers`` itself.
    """
    meta = phonenumbers.PhoneMetadata.metadata_for_region(region.upper(), None)
    if meta is None or meta.country_code is None or meta.national_prefix_transform_rule:
        return None
    if meta.leading_digits or phonenumbers.region_code_for_country_code(meta.country_code) != region.upper():
        return None
    general = meta.general_desc
    if general is None or not general.national_number_pattern or not general.possible_length:
        return None
    types = []
    for kind in _NUMBER_TYPES:
        desc = getattr(meta, kind)
        if kind == "mobile" and meta.same_mobile_and_fixed_line_pattern:
            continue  # phonenumbers never tests mobile then
        if desc is not None and desc.national_number_pattern:
            types.append(_NumberDesc(f"^(?:{desc.national_number_pattern})$", tuple(desc.possible_length)))
    plan = _NationalPlan(
        country_code=str(meta.country_code),
        international_prefix=f"^(?:{meta.international_prefix})" if meta.international_prefix else None,
        national_prefix=(
            f"^(?:{meta.national_prefix_for_parsing})" if meta.national_prefix_for_parsing else None
        ),
        general=_NumberDesc(f"^(?:{general.national_number_pattern})$", tuple(general.possible_length)),
        types=tuple(types),
        possible_lengths=tuple(sorted(general.possible_length)),
        local_only_lengths=tuple(general.possible_length_local_only),
    )
    probe = pa.array(["0"])
    patterns = [plan.general.pattern, *(t.pattern for t in plan.types)]
    patterns += [p for p in (plan.international_prefix, plan.national_prefix) if p]
    try:
        for pattern in patterns:
            pc.match_substring_regex(probe, pattern)
    except pa.ArrowInvalid:
        return None
    return plan


def national_to_e164(digits: pa.Array, region: str) -> pa.Array:
    """``+<cc><national>`` for digit strings that ``phonenumbers`` reads as valid numbers of ``region``.

    Mirrors ``phonenumbers.parse(digits, region)`` for input without ``+``: an international
    dialling prefix is left undecided; a leading country code is taken when the number is not
    viable without it (or too long); the national prefix is stripped unless that makes a viable
    number non-viable or leaves a length the region cannot have; the result counts when it matches
    the region's general description and one number type, lengths included. Null means undecided
    (not necessarily invalid): the caller asks ``phonenumbers``.
    """
    plan = _national_plan(region)
    if plan is None or len(digits) == 0:
        return pa.nulls(len(digits), pa.string())
    cc = plan.country_code

    def viable(x: pa.Array) -> np.ndarray:
        return pc.match_substring_regex(x, plan.general.pattern).to_numpy(zero_copy_only=False)

    def length(x: pa.Array) -> np.ndarray:
        return pc.binary_length(x).to_numpy(zero_copy_only=False)

    def strip_national_prefix(x: pa.Array) -> pa.Array:
        if plan.national_prefix is None:
            return x
        has = pc.match_substring_regex(x, plan.national_prefix).to_numpy(zero_copy_only=False)
        rest = pc.replace_substring_regex(x, plan.national_prefix, "", max_replacements=1)
        keep = viable(x) & ~viable(rest)
        return pc.if_else(pa.array(has & ~keep), rest, x)

    lengths, local_only = np.array(plan.possible_lengths), np.array(plan.local_only_lengths, dtype=np.int64)

    def too_long(n: np.ndarray) -> np.ndarray:
        return ~np.isin(n, local_only) & (n > lengths[-1])

    def possible_or_too_long(n: np.ndarray) -> np.ndarray:
        return ~np.isin(n, local_only) & (np.isin(n, lengths) | (n > lengths[-1]))

    # _maybe_extract_country_code: the region's country code without "+".
    potential = strip_national_prefix(pc.utf8_slice_codeunits(digits, len(cc)))
    with_cc = pc.starts_with(digits, cc).to_numpy(zero_copy_only=False) & (
        (~viable(digits) & viable(potential)) | too_long(length(digits))
    )
    national = pc.if_else(pa.array(with_cc), potential, digits)
    # parse(): strip the national prefix when what remains has a possible (or too long) length.
    stripped = strip_national_prefix(national)
    national = pc.if_else(pa.array(possible_or_too_long(length(stripped))), stripped, national)

    def matches(desc: _NumberDesc) -> np.ndarray:
        ok = pc.match_substring_regex(national, desc.pattern).to_numpy(zero_copy_only=False)
        return ok & np.isin(length(national), desc.lengths) if desc.lengths else ok

    of_some_type = np.zeros(len(national), dtype=bool)
    for desc in plan.types:
        of_some_type |= matches(desc)
    valid = matches(plan.general) & of_some_type
    if plan.international_prefix:
        valid &= ~pc.match_substring_regex(digits, plan.international_prefix).to_numpy(zero_copy_only=False)
    e164 = pc.binary_join_element_wise(pa.scalar("+" + cc, national.type), national, "")
    return pc.if_else(pa.array(valid), e164, pa.scalar(None, national.type))


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

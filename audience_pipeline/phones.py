"""Phone numbers to E.164, judged by ``phonenumbers``' own metadata run as Arrow regex kernels.

``phonenumbers`` costs 30-65 µs a number in Python (PERF-NOTES: 28 s a million to parse and
format). What it does is data: how ``parse`` finds the country code and strips a national prefix, and which
patterns ``is_valid_number`` matches, all live in ``PhoneMetadata``. This module applies the same
rules to whole columns with RE2 (``pyarrow.compute``), one country code at a time, so that a
number's validity does not depend on how it was written: ``+16872070030`` and ``(687) 207-0030``
are both invalid (687 is not an assigned area code).

Every value is first brought to a ``+<country code><national number>`` candidate (an E.164 value
already is one, at no cost), and the metadata patterns run on the candidates themselves, each
behind its country code (``^\\+44(?:...)$``), so valid input comes out as the very same strings.

Only values made of digits and the separators ``space ( ) . / -`` (after an optional leading
``+``) take the vectorised path; everything else (letters, extensions, full-width digits) and
the rare number the rules below leave undecided (an unknown country code, a dialling prefix
other than ``00``) goes through ``phonenumbers`` one by one. The answer is the same either way:
``phonenumbers.parse`` + ``is_valid_number`` + ``format_number(E164)``, with a leading ``00``
read as ``+`` and the default region upper-cased.
"""

from __future__ import annotations

import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import phonenumbers
import pyarrow as pa
import pyarrow.compute as pc
from phonenumbers import PhoneMetadata
from phonenumbers.phonenumberutil import (
    COUNTRY_CODE_TO_REGION_CODE,
    SUPPORTED_REGIONS,
    region_code_for_country_code,
)

from audience_pipeline.arrow_strings import string_chunks

E164_PATTERN = r"^\+[1-9][0-9]{2,19}$"  # a country code and 2-17 digits: every shape parse accepts
_TWO_DIGITS = r"(?s)\p{Nd}.*\p{Nd}"  # phonenumbers needs two (Unicode) digits to call text viable
_MAX_INPUT = 250  # phonenumbers.parse refuses longer text (_MAX_INPUT_STRING_LENGTH)
_MIN_NSN, _MAX_NSN = 2, 17  # national number lengths parse accepts
_LENGTHS = 32  # length tables cover 0..31; longer numbers are never possible
_ROWS_PER_SLICE = 1 << 16  # bounds the temporaries of the numpy byte scans
_SLICE_ROWS = 1 << 18  # rows judged at a time: bounds the copies, few enough kernel calls
_THREADS = min(4, os.cpu_count() or 1)
# The descriptions _number_type_helper tries after the general one; any match makes a number
# valid. Fixed line and mobile first: most numbers stop there.
_TYPES = (
    "fixed_line",
    "mobile",
    "premium_rate",
    "toll_free",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
)
_KNOWN_CC = np.zeros(1000, dtype=bool)
_KNOWN_CC[list(COUNTRY_CODE_TO_REGION_CODE)] = True


# --------------------------------------------------------------------------- metadata as RE2


def _length_table(lengths: tuple[int, ...] | list[int]) -> np.ndarray:
    table = np.zeros(_LENGTHS, dtype=bool)
    table[[n for n in lengths if 0 <= n < _LENGTHS - 1]] = True
    return table


@dataclass(frozen=True)
class _Desc:
    pattern: str  # national_number_pattern, matched in full after the country code
    lengths: np.ndarray | None  # possible lengths as a table; None: not checked


@dataclass(frozen=True)
class _Region:
    """What ``is_valid_number`` checks for one region sharing a country code."""

    leading_digits: str | None  # picks the region among those sharing the code
    general: _Desc | None  # None: nothing is valid here
    types: tuple[_Desc, ...]


@dataclass(frozen=True)
class _Parsing:
    """What ``parse`` reads from the metadata it takes a national number apart with."""

    country_code: int
    viable: str  # the general pattern without lengths: "is this a possible national number"
    lengths: np.ndarray  # general possible lengths as a table
    local_only: np.ndarray
    longest: int
    national_prefix: str | None  # national_prefix_for_parsing
    transform: str | None  # national_prefix_transform_rule, as an RE2 rewrite
    transform_used: str | None  # national_prefix with its groups named, the last one "last"
    international_prefix: str | None


@dataclass(frozen=True)
class _Country:
    parsing: _Parsing | None  # of the code's main region; None: ask phonenumbers
    regions: tuple[_Region, ...]
    shared: bool  # several regions use the code: leading digits / validity pick one


def _region(meta: PhoneMetadata) -> _Region:
    """A region's rules; number types with the same possible lengths become one alternation, so
    a number costs one regex pass per distinct set of lengths rather than one per type."""
    by_lengths: dict[tuple[int, ...], list[str]] = {}
    for kind in _TYPES:
        if kind == "mobile" and meta.same_mobile_and_fixed_line_pattern:
            continue  # _number_type_helper never tests mobile then
        desc = getattr(meta, kind)
        if desc is not None and desc.national_number_pattern:
            by_lengths.setdefault(tuple(desc.possible_length or ()), []).append(desc.national_number_pattern)
    types = tuple(
        _Desc("|".join(patterns), _length_table(lengths) if lengths else None)
        for lengths, patterns in by_lengths.items()
    )
    general = meta.general_desc
    general_desc = None
    if general is not None and general.national_number_pattern:
        lengths = general.possible_length
        general_desc = _Desc(general.national_number_pattern, _length_table(lengths) if lengths else None)
    return _Region(meta.leading_digits or None, general_desc, types)


def _name_groups(pattern: str) -> str | None:
    """``pattern`` with its groups named (``extract_regex`` wants that), the last one ``last``;
    None when that is unsafe.

    ``parse`` applies a transform rule only when the last group took part in the match; RE2's
    ``extract_regex`` tells that by a non-empty capture, so the group must not match nothing.
    """
    opens = [m.start() for m in re.finditer(r"(?<!\\)\((?!\?)", pattern)]
    if not opens or len(opens) != re.compile(pattern).groups:
        return None
    start, depth = opens[-1], 0
    for end in range(start, len(pattern)):
        if pattern[end] == "(" and pattern[end - 1] != "\\":
            depth += 1
        elif pattern[end] == ")" and pattern[end - 1] != "\\":
            depth -= 1
            if depth == 0:
                break
    if re.fullmatch(pattern[start + 1 : end], ""):
        return None
    parts, previous = [], 0
    for i, position in enumerate(opens):
        name = "last" if position == start else f"g{i}"
        parts += [pattern[previous:position], f"(?P<{name}>"]
        previous = position + 1
    return "".join(parts) + pattern[previous:]


def _parsing(meta: PhoneMetadata | None) -> _Parsing | None:
    general = meta.general_desc if meta is not None else None
    if meta is None or general is None or not general.national_number_pattern or not general.possible_length:
        return None
    npp = meta.national_prefix_for_parsing or None
    transform = (meta.national_prefix_transform_rule or None) if npp else None
    used = _name_groups(npp) if npp and transform else None
    if transform and (used is None or re.search(r"\\g|\$", transform)):
        return None
    patterns = [general.national_number_pattern, npp, used, meta.international_prefix]
    if not _re2_accepts(*(p for p in patterns if p)):
        return None
    return _Parsing(
        country_code=meta.country_code,
        viable=general.national_number_pattern,
        lengths=_length_table(general.possible_length),
        local_only=_length_table(general.possible_length_local_only or ()),
        longest=max(general.possible_length),
        national_prefix=npp,
        transform=transform,
        transform_used=used,
        international_prefix=meta.international_prefix or None,
    )


@functools.cache
def _country(cc: int) -> _Country:
    main = region_code_for_country_code(cc)
    parsing = _parsing(PhoneMetadata.metadata_for_region_or_calling_code(cc, main))
    codes = COUNTRY_CODE_TO_REGION_CODE.get(cc, ())
    regions = []
    for code in codes:
        meta = PhoneMetadata.metadata_for_region_or_calling_code(cc, code)
        if meta is not None:
            regions.append(_region(meta))
        elif len(codes) == 1:
            regions.append(_Region(None, None, ()))
    patterns = [d.pattern for r in regions for d in (r.general, *r.types) if d is not None]
    patterns += [r.leading_digits for r in regions if r.leading_digits]
    if not _re2_accepts(*patterns):
        parsing = None  # phonenumbers' Python patterns that RE2 cannot run: the library decides
    return _Country(parsing, tuple(regions), len(codes) > 1)


def _re2_accepts(*patterns: str) -> bool:
    """Whether Arrow's RE2 compiles every pattern (all of phonenumbers' do today; a test says so)."""
    probe = pa.array(["0"])
    try:
        for pattern in patterns:
            pc.match_substring_regex(probe, f"^(?:{pattern})")
    except pa.ArrowInvalid:
        return False
    return True


@functools.cache
def _home(region: str) -> _Parsing | None:
    """The default region's parsing rules (None for a region phonenumbers does not know)."""
    if region not in SUPPORTED_REGIONS:
        return None
    return _parsing(PhoneMetadata.metadata_for_region(region, None))


# --------------------------------------------------------------------------- kernels


def _matches(values: pa.Array, pattern: str, head: str = "^", full: bool = True) -> np.ndarray:
    """Where ``pattern`` matches after ``head`` (``^`` or ``^\\+44``), in full or as a prefix."""
    regex = f"{head}(?:{pattern}){'$' if full else ''}"
    return pc.match_substring_regex(values, regex).to_numpy(zero_copy_only=False)


def _lengths(values: pa.Array) -> np.ndarray:
    return pc.binary_length(values).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _in(table: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return table[np.clip(lengths, 0, _LENGTHS - 1)]


def _take(values: pa.Array, rows: np.ndarray) -> pa.Array:
    """``values[rows]``; all of them, in order, is ``values`` itself (no copy)."""
    if len(rows) == len(values) and (rows[1:] > rows[:-1]).all():
        return values
    return values.take(pa.array(rows, type=pa.int64()))


def _replace_rows(values: pa.Array, rows: np.ndarray, replacements: pa.Array) -> pa.Array:
    if len(rows) == len(values):
        return replacements.cast(values.type)
    mask = np.zeros(len(values), dtype=bool)
    mask[rows] = True
    return pc.replace_with_mask(values, pa.array(mask), replacements.cast(values.type))


def _prefixed(prefix: str, values: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(pa.scalar(prefix, values.type), values, pa.scalar("", values.type))


def _bytes(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets relative to the first value, and the bytes the values use (one chunk, no nulls)."""
    ((offsets, data),) = string_chunks(values)
    return offsets - offsets[0], data[offsets[0] : offsets[-1]]


def _digits(values: pa.Array, digit_counts: np.ndarray, drop_first: np.ndarray) -> pa.Array:
    """Each value's ASCII digits (``digit_counts`` of them), less its first ``drop_first`` bytes,
    which must be digits: numpy over the buffers, RE2's global replace is fifty times slower."""
    offsets, data = _bytes(values)
    keep = _DIGIT[data]
    for i in range(int(drop_first.max(initial=0))):
        keep[offsets[np.flatnonzero(drop_first > i)] + i] = False
    new_offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(digit_counts - drop_first, out=new_offsets[1:])
    return pa.Array.from_buffers(
        pa.large_string(), len(values), [None, pa.py_buffer(new_offsets), pa.py_buffer(data[keep])]
    )


_DIGIT = np.zeros(256, dtype=bool)
_DIGIT[ord("0") : ord("9") + 1] = True
_SEPARATOR = np.zeros(256, dtype=bool)
# All in phonenumbers' VALID_PUNCTUATION, and none can start an extension.
_SEPARATOR[[ord(c) for c in " ()./-"]] = True
_BYTE_WEIGHT = (~_DIGIT).astype(np.int64) + ((~(_DIGIT | _SEPARATOR)).astype(np.int64) << 20)


@dataclass
class _Shapes:
    """Per value: how :func:`to_e164` can read it (all false for nulls)."""

    e164: np.ndarray  # E164_PATTERN's shape: ``+`` and digits only
    simple: np.ndarray  # digits and separators after an optional ``+``, at most _MAX_INPUT bytes
    plus: np.ndarray  # starts with ``+``
    zeros: np.ndarray  # starts with ``00``
    digits: np.ndarray  # how many ASCII digits


def _shapes(values: pa.Array) -> _Shapes:
    """One pass over the bytes: a running sum of non-digits (low bits) and of bytes that are
    neither digits nor separators (high bits) gives every row's shape without a regex."""
    n = len(values)
    if not n:
        return _Shapes(*(np.zeros(0, dtype=bool),) * 4, np.zeros(0, dtype=np.int64))
    offsets, data = _bytes(values)
    lengths = offsets[1:] - offsets[:-1]
    counts = np.zeros(n, dtype=np.int64)
    for first in range(0, n, _ROWS_PER_SLICE):
        bounds = offsets[first : first + _ROWS_PER_SLICE + 1]
        running = np.concatenate(([0], np.cumsum(_BYTE_WEIGHT[data[bounds[0] : bounds[-1]]])))
        counts[first : first + len(bounds) - 1] = np.diff(running[bounds - bounds[0]])
    # A row's low count spills into the high bits only past 2**20 non-digits: far over _MAX_INPUT.
    non_digits, others = counts & ((1 << 20) - 1), counts >> 20
    first_byte = np.full(n, -1, dtype=np.int16)
    second_byte = np.full(n, -1, dtype=np.int16)
    rows = np.flatnonzero(lengths > 0)
    first_byte[rows] = data[offsets[rows]]
    rows = np.flatnonzero(lengths > 1)
    second_byte[rows] = data[offsets[rows] + 1]
    plus = first_byte == ord("+")
    present = values.is_valid().to_numpy(zero_copy_only=False) if values.null_count else np.ones(n, bool)
    e164_length = (lengths >= 4) & (lengths <= 21)
    return _Shapes(
        e164=present & plus & (second_byte >= ord("1")) & (non_digits == 1) & e164_length,
        simple=present & (lengths <= _MAX_INPUT) & ((others == 0) | (plus & (others == 1))),
        plus=present & plus,
        zeros=present & (first_byte == ord("0")) & (second_byte == ord("0")),
        digits=lengths - non_digits,
    )


# --------------------------------------------------------------------------- parse and validity


def _strip_carrier(values: pa.Array, rules: _Parsing) -> pa.Array:
    """``_maybe_strip_national_prefix_carrier_code``: the national prefix off, unless that turns a
    viable number into one that is not; a transform rule rewrites the prefix instead."""
    if rules.national_prefix is None or not len(values):
        return values
    rows = np.flatnonzero(_matches(values, rules.national_prefix, full=False))
    if not len(rows):
        return values
    sub = _take(values, rows)
    prefix = f"^(?:{rules.national_prefix})"
    rest = pc.replace_substring_regex(sub, prefix, "", max_replacements=1)
    if rules.transform_used is not None:
        last = pc.struct_field(pc.extract_regex(sub, f"^(?:{rules.transform_used})"), "last")
        used = pc.fill_null(pc.greater(pc.binary_length(last), 0), False)
        rewritten = pc.replace_substring_regex(sub, prefix, rules.transform, max_replacements=1)
        rest = pc.if_else(used, rewritten, rest)
    keep = _matches(sub, rules.viable) & ~_matches(rest, rules.viable)
    return _replace_rows(values, rows, pc.if_else(pa.array(keep), sub, rest))


def _strip_national_prefix(values: pa.Array, rules: _Parsing) -> pa.Array:
    """What ``parse`` does once it knows the country: strip the prefix if a possible (or too long)
    length is left (``_test_number_length``)."""
    stripped = _strip_carrier(values, rules)
    if stripped is values:
        return values
    n = _lengths(stripped)
    possible = ~_in(rules.local_only, n) & (_in(rules.lengths, n) | (n > rules.longest))
    return pc.if_else(pa.array(possible), stripped, values)


def _subset_matches(numbers: pa.Array, rows: np.ndarray, pattern: str, head: str) -> np.ndarray:
    """``_matches`` on ``numbers[rows]``; on all of them (no copy) when that is most of them."""
    if 2 * len(rows) >= len(numbers):
        return _matches(numbers, pattern, head)[rows]
    return _matches(numbers.take(pa.array(rows)), pattern, head)


def _valid_in(numbers: pa.Array, lengths: np.ndarray, region: _Region, head: str) -> np.ndarray:
    """``_number_type_helper(...) != UNKNOWN``: the general description and one number type match."""
    ok = np.zeros(len(numbers), dtype=bool)
    if region.general is None:
        return ok
    general = region.general
    rows = np.arange(len(ok)) if general.lengths is None else np.flatnonzero(_in(general.lengths, lengths))
    if len(rows):
        ok[rows] = _subset_matches(numbers, rows, general.pattern, head)
    typed = np.zeros(len(numbers), dtype=bool)
    for desc in region.types:
        todo = ok & ~typed
        if desc.lengths is not None:
            todo &= _in(desc.lengths, lengths)
        rows = np.flatnonzero(todo)
        if len(rows):
            typed[rows] = _subset_matches(numbers, rows, desc.pattern, head)
    return ok & typed


def _valid(numbers: pa.Array, lengths: np.ndarray, country: _Country, head: str) -> np.ndarray:
    """``is_valid_number`` for numbers of one country code (``lengths``: of the national part)."""
    if not country.shared:
        return _valid_in(numbers, lengths, country.regions[0], head)
    # region_code_for_number: the first region whose leading digits match decides; a region
    # without leading digits takes the number when it is valid there.
    valid = np.zeros(len(numbers), dtype=bool)
    open_rows = np.arange(len(numbers))
    for region in country.regions:
        if not len(open_rows):
            break
        sub, sub_lengths = _take(numbers, open_rows), lengths[open_rows]
        if region.leading_digits is not None:
            hit = _matches(sub, region.leading_digits, head, full=False)
            rows = np.flatnonzero(hit)
            valid[open_rows[rows]] = _valid_in(_take(sub, rows), sub_lengths[rows], region, head)
        else:
            hit = _valid_in(sub, sub_lengths, region, head)
            valid[open_rows[hit]] = True
        open_rows = open_rows[~hit]
    return valid


@dataclass
class _Settled:
    """Results gathered piece by piece: E.164 strings (null: invalid) for some rows, and the rows
    left to phonenumbers."""

    pieces: list[tuple[np.ndarray, pa.Array]]
    undecided: list[np.ndarray]

    def add(self, rows: np.ndarray, e164: pa.Array) -> None:
        if len(rows):
            self.pieces.append((rows, e164))

    def defer(self, rows: np.ndarray) -> None:
        if len(rows):
            self.undecided.append(rows)


def _judge(
    cc: int,
    numbers: pa.Array,
    rows: np.ndarray,
    out: _Settled,
    *,
    strip: bool,
    long_enough: np.ndarray | None,
) -> None:
    """``+<cc><national>`` candidates: parse's national prefix rule (with ``strip``), then validity.

    ``long_enough``: whether the national number was at least two digits before any stripping
    (parse refuses it otherwise); by default, judged from the candidates.
    """
    country = _country(cc)
    if country.parsing is None:
        out.defer(rows)
        return
    width = 1 + len(str(cc))
    head = f"^\\+{cc}"
    lengths = _lengths(numbers) - width
    if long_enough is None:
        long_enough = lengths >= _MIN_NSN
    rules = country.parsing
    if strip and rules.national_prefix is not None:
        hit = np.flatnonzero(_matches(numbers, rules.national_prefix, head, full=False))
        if len(hit):  # few: the prefix is what a number written in E.164 rarely has
            national = pc.utf8_slice_codeunits(_take(numbers, hit), width)
            stripped = _strip_national_prefix(national, rules)
            numbers = _replace_rows(numbers, hit, _prefixed(f"+{cc}", stripped))
            lengths[hit] = _lengths(stripped)
    valid = long_enough & (lengths >= _MIN_NSN) & (lengths <= _MAX_NSN)
    if valid.any():
        valid &= _valid(numbers, lengths, country, head)  # the few of other lengths fail anyway
    if not valid.all():
        numbers = pc.if_else(pa.array(valid), numbers, pa.scalar(None, numbers.type))
    out.add(rows, numbers)


def _country_codes(values: pa.Array, rows: np.ndarray) -> np.ndarray:
    """``_extract_country_code`` on the ``+<digits>`` values at ``rows``: the shortest known code
    among the first three digits; 0 for none (or a leading 0), -1 for fewer than three digits."""
    offsets, data = _bytes(values)
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    enough = lengths >= 4
    d = np.zeros((len(rows), 3), dtype=np.int64)
    for k in range(3):
        d[enough, k] = data[starts[enough] + 1 + k].astype(np.int64) - 0x30
    p1 = d[:, 0]
    p2 = p1 * 10 + d[:, 1]
    p3 = p2 * 10 + d[:, 2]
    codes = np.where(_KNOWN_CC[p1], p1, np.where(_KNOWN_CC[p2], p2, np.where(_KNOWN_CC[p3], p3, 0)))
    codes[p1 == 0] = 0
    codes[~enough] = -1
    return codes


def _international(values: pa.Array, rows: np.ndarray, out: _Settled) -> None:
    """The ``+<digits>`` values at ``rows``, grouped by country code: one ``take`` in code order,
    then zero-copy slices."""
    if not len(rows):
        return
    codes = _country_codes(values, rows)
    out.add(rows[codes < 0], pa.nulls(int((codes < 0).sum()), values.type))
    out.defer(rows[codes == 0])  # parse retries those as national numbers: let it
    known = np.flatnonzero(codes > 0)
    if not len(known):
        return
    order = known[np.argsort(codes[known], kind="stable")]
    codes, rows = codes[order], rows[order]
    grouped = values.take(pa.array(rows))
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    for begin, end in zip(starts.tolist(), [*starts[1:].tolist(), len(rows)], strict=True):
        group = grouped.slice(begin, end - begin)
        _judge(int(codes[begin]), group, rows[begin:end], out, strip=True, long_enough=None)


def _national(digits: pa.Array, rows: np.ndarray, region: str, out: _Settled) -> None:
    """Digits written without ``+``: ``_maybe_extract_country_code`` from the default region."""
    if region not in SUPPORTED_REGIONS:
        out.add(rows, pa.nulls(len(rows), digits.type))  # parse refuses: no region to read them in
        return
    home = _home(region)
    if home is None or _country(home.country_code).parsing is None:
        out.defer(rows)
        return
    if home.international_prefix is not None:
        idd = _matches(digits, home.international_prefix, full=False)
        out.defer(rows[idd])  # dialled abroad with the region's own prefix: rare, let parse read it
        keep = np.flatnonzero(~idd)
        digits, rows = _take(digits, keep), rows[keep]
    cc = home.country_code
    # A number that starts with the region's country code, and is only viable (or not too long)
    # without it, is read as having it; parse then strips a national prefix once more.
    with_cc = np.zeros(len(digits), dtype=bool)
    candidates = np.flatnonzero(pc.starts_with(digits, str(cc)).to_numpy(zero_copy_only=False))
    if len(candidates):
        sub = _take(digits, candidates)
        potential = _strip_carrier(pc.utf8_slice_codeunits(sub, len(str(cc))), home)
        n = _lengths(sub)
        too_long = ~_in(home.local_only, n) & (n > home.longest)
        hit = (~_matches(sub, home.viable) & _matches(potential, home.viable)) | too_long
        with_cc[candidates[hit]] = True
        if hit.any():
            kept = _take(potential, np.flatnonzero(hit))
            numbers = _prefixed(f"+{cc}", kept)
            long_enough = _lengths(kept) >= _MIN_NSN
            _judge(cc, numbers, rows[candidates[hit]], out, strip=True, long_enough=long_enough)
    plain = np.flatnonzero(~with_cc)
    if len(plain):
        national = _take(digits, plain)
        long_enough = _lengths(national) >= _MIN_NSN
        stripped = _strip_national_prefix(national, home)  # read with the default region's metadata
        _judge(cc, _prefixed(f"+{cc}", stripped), rows[plain], out, strip=False, long_enough=long_enough)


# --------------------------------------------------------------------------- public


def e164_mask(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """True where a value has the shape of :data:`E164_PATTERN` (nulls: false), reading bytes.

    ``+``, a digit 1-9, then 2-19 digits: per row, the length, two leading bytes and a count of
    non-digits (a running sum over the bytes) decide it, about five times faster than the regex.
    The shape says nothing about validity: see :func:`valid_e164_mask`.
    """
    out: list[np.ndarray] = []
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    for chunk, (offsets, data) in zip(chunks, string_chunks(values), strict=True):
        ok = np.zeros(len(chunk), dtype=bool)
        for first in range(0, len(chunk), _ROWS_PER_SLICE):
            bounds = offsets[first : first + _ROWS_PER_SLICE + 1]
            if bounds[-1] == bounds[0]:
                continue
            starts, ends = bounds[:-1] - bounds[0], bounds[1:] - bounds[0]
            part = data[bounds[0] : bounds[-1]]
            non_digits = np.concatenate(([0], np.cumsum((part < 0x30) | (part > 0x39), dtype=np.int32)))
            length = ends - starts
            rows = np.flatnonzero((length >= 4) & (length <= 21))
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


def parse_phone(value: str, region: str | None) -> str | None:
    """``phonenumbers``' own answer for one value: E.164 of a valid number, else None."""
    try:
        number = phonenumbers.parse("+" + value[2:] if value.startswith("00") else value, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def to_e164(values: pa.ChunkedArray | pa.Array, default_region: str) -> pa.ChunkedArray:
    """E.164 of every value ``phonenumbers`` reads as a valid number; null for the rest.

    Values without ``+`` or ``00`` are read as numbers of ``default_region``. Slices of
    :data:`_SLICE_ROWS` rows at a time bound the temporaries (a copy or two of a slice).
    """
    region = default_region.upper()

    def judge(start: int) -> pa.Array:
        part = values.slice(start, _SLICE_ROWS)
        return _to_e164(part.combine_chunks() if isinstance(part, pa.ChunkedArray) else part, region)

    starts = range(0, len(values), _SLICE_ROWS)
    if len(starts) < 2 or _THREADS < 2:
        return pa.chunked_array([judge(s) for s in starts], values.type)
    # Arrow's kernels and numpy release the GIL: slices on two threads take two cores.
    with ThreadPoolExecutor(max_workers=min(len(starts), _THREADS)) as pool:
        return pa.chunked_array(list(pool.map(judge, starts)), values.type)


def _to_e164(values: pa.Array, region: str) -> pa.Array:
    out = _Settled([], [])
    shapes = _shapes(values)
    _international(values, np.flatnonzero(shapes.e164), out)  # E.164 text is its own candidate
    rest = np.flatnonzero(~shapes.simple & values.is_valid().to_numpy(zero_copy_only=False))
    if len(rest):  # letters, extensions, other digits: phonenumbers reads those
        out.defer(rest[_matches(_take(values, rest), _TWO_DIGITS, head="", full=False)])
    others = shapes.simple & ~shapes.e164
    if others.any():
        digits = _digits(values, shapes.digits, np.where(shapes.zeros, 2, 0))  # unused where not simple
        abroad = np.flatnonzero(others & (shapes.plus | shapes.zeros))
        if len(abroad):
            numbers = _prefixed("+", _take(digits, abroad))
            _international(numbers, np.arange(len(abroad)), _Relabel(out, abroad))
        national = np.flatnonzero(others & ~(shapes.plus | shapes.zeros))
        if len(national):
            _national(_take(digits, national), national, region, out)
    return _resolve(values, out, region)


class _Relabel(_Settled):
    """Hands results for rows of a derived array on to ``out`` under the original row numbers."""

    def __init__(self, out: _Settled, rows: np.ndarray) -> None:
        super().__init__(out.pieces, out.undecided)
        self._rows = rows

    def add(self, rows: np.ndarray, e164: pa.Array) -> None:
        super().add(self._rows[rows], e164)

    def defer(self, rows: np.ndarray) -> None:
        super().defer(self._rows[rows])


def _resolve(values: pa.Array, out: _Settled, region: str | None) -> pa.Array:
    """The gathered results as one array, the undecided rows answered by ``phonenumbers``."""
    undecided = np.sort(np.concatenate(out.undecided)) if out.undecided else np.zeros(0, dtype=np.int64)
    if len(undecided):
        texts = _take(values, undecided).to_pylist()
        out.add(undecided, pa.array([parse_phone(t, region) for t in texts], type=values.type))
    if not out.pieces:
        return pa.nulls(len(values), values.type)
    rows = np.concatenate([r for r, _ in out.pieces])
    results = pa.concat_arrays([v.cast(values.type) for _, v in out.pieces])
    out.pieces.clear()
    where = np.full(len(values), -1, dtype=np.int64)
    where[rows] = np.arange(len(rows))
    if len(rows) == len(values) and (where == np.arange(len(values))).all():
        return results
    return results.take(pa.array(where, mask=where < 0))


@dataclass
class _Verdict:
    chunks: list[tuple[int, int, list[tuple[int, int] | None]]]  # offset, length, buffer addresses
    held: list[pa.Array]  # so that no other array can have these addresses meanwhile
    valid: np.ndarray


_last_verdict: _Verdict | None = None


def _identity(values: pa.ChunkedArray | pa.Array) -> list[tuple[int, int, list[tuple[int, int] | None]]]:
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    return [
        (c.offset, len(c), [(b.address, b.size) if b is not None else None for b in c.buffers()])
        for c in chunks
    ]


def remember_verdict(values: pa.ChunkedArray, valid: np.ndarray) -> None:
    """Keep ``valid`` (what :func:`valid_e164_mask` would say) for the column ``normalize`` just
    built, so that the schema's check, handed the very same buffers, does not judge them again.

    One column is held at a time, until the check takes it; anything else (another array, a
    copy, a slice) is judged afresh, so a stale or foreign verdict is never used.
    """
    global _last_verdict
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    _last_verdict = _Verdict(_identity(values), list(chunks), valid)


def _recall(values: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    global _last_verdict
    verdict = _last_verdict
    if verdict is None or _identity(values) != verdict.chunks:
        return None
    _last_verdict = None
    return verdict.valid


def valid_e164_mask(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """True where a value already is the E.164 form of a valid number (nulls: false).

    That is: it has :data:`E164_PATTERN`'s shape and :func:`to_e164` gives it back unchanged
    (``+4402079460958`` is valid but reads as ``+442079460958``). No default region is involved.
    """
    recalled = _recall(values)
    if recalled is not None:
        return recalled
    shaped = e164_mask(values)
    for start in range(0, len(values), _SLICE_ROWS):
        part = values.slice(start, _SLICE_ROWS)
        part = part.combine_chunks() if isinstance(part, pa.ChunkedArray) else part
        rows = np.flatnonzero(shaped[start : start + len(part)])
        if not len(rows):
            continue
        out = _Settled([], [])
        _international(part, rows, out)
        same = pc.fill_null(pc.equal(_resolve(part, out, None), part), False)
        shaped[start : start + len(part)] = same.to_numpy(zero_copy_only=False)
    return shaped

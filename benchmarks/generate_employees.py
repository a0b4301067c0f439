"""Generate realistic HR employee CSV exports, with a known set of bad rows, for benchmarks and tests.

Everything is vectorised (numpy draws, pyarrow compute string building, one buffer write per chunk)
so that a 1,000,000-row file takes seconds: the benchmark must measure the validator, not wait for
its input. All random draws happen up front from one seeded generator, so the output is
byte-for-byte deterministic for a ``(rows, bad_fraction, seed)`` triple.

Each bad row carries exactly one defect, and every other row is valid under the rules the pipeline
enforces (unique id, parseable email, ISO date, phone valid under ``phonenumbers`` with default
region ``US``), so the expected numbers are exact. Under the default ``invalid_optional_fields:
clear`` a bad value in an optional column is a warning (the row is imported without it), so only
a missing or duplicate id, and an invalid email on a row without a phone, are rejects; bad dates,
bad phones and the other invalid emails are warnings (``rejected_by_kind`` has the split).

``phones="national-mix"`` writes every phone in a non-E.164 form instead: US numbers in national
formats, six other countries with ``+`` or ``00`` and spaces, dots or dashes, and
:data:`UNASSIGNED_SHARE` of the good rows with a US area code that is not assigned (warnings too).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Bump when the output for a given (rows, bad_fraction, seed) changes, so cached files are rebuilt.
GENERATOR_VERSION = 2  # 2: the sidecar records which bad rows are rejects and which are warnings

HEADER: tuple[str, ...] = (
    "Employee ID",
    "Email",
    "Mobile Phone",
    "First Name",
    "Last Name",
    "Department",
    "Job Title",
    "Start Date",
    "Office City",
)

# Kinds of bad rows, in the order the bad-row budget is shared out (remainder goes to the first ones).
BAD_KINDS: tuple[str, ...] = ("invalid_email", "missing_id", "duplicate_id", "bad_date", "bad_phone")

# Which source column each kind of bad row is rejected on; lets the benchmark compare per column.
BAD_KIND_COLUMN: dict[str, str] = {
    "invalid_email": "Email",
    "missing_id": "Employee ID",
    "duplicate_id": "Employee ID",
    "bad_date": "Start Date",
    "bad_phone": "Mobile Phone",
}

_BAD_EMAIL_TEMPLATES: tuple[str, ...] = ("{f}.{l}@@example.com", "{f}.{l}.example.com", "{f}@@example")
_BAD_DATES: tuple[str, ...] = ("2023-13-45", "31/31/2020", "2021-02-30", "2022-00-10")
# "12" parses with phonenumbers but is never a possible number; the others raise NumberParseException.
_BAD_PHONES: tuple[str, ...] = ("12", "abc", "1", "--")

_FIRST_NAMES: tuple[str, ...] = (
    "James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "William",
    "Elizabeth", "David", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah",
    "Charles", "Karen", "Daniel", "Nancy", "Matthew", "Lisa", "Anthony", "Betty", "Mark", "Margaret",
    "Paul", "Sandra", "Steven", "Ashley", "Andrew", "Emily", "Kenneth", "Donna", "Joshua", "Michelle",
    "Kevin", "Carol", "Brian", "Amanda", "George", "Melissa", "Edward", "Deborah", "Oliver", "Amelia",
    "Harry", "Isla", "Jack", "Ava", "Noah", "Mia", "Liam", "Sofia", "Lucas", "Chloé", "José", "Zoë",
    "Björn", "Siobhán", "Ayşe", "Mateo", "Priya", "Arjun", "Wei", "Yuki", "Fatima", "Omar", "Ingrid",
    "Søren", "Élodie", "Łukasz", "Aoife", "Kwame", "Amara", "Diego", "Lars", "Ana",
)  # fmt: skip
_LAST_NAMES: tuple[str, ...] = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
    "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore",
    "Jackson", "Martin", "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark", "Ramirez",
    "Lewis", "Robinson", "Walker", "Young", "Allen", "King", "Wright", "Scott", "Torres", "Nguyễn",
    "Hill", "Flores", "Green", "Adams", "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell",
    "Carter", "Roberts", "O'Brien", "Müller", "Schmidt", "Schneider", "Fischer", "Dubois", "Lefèvre",
    "Rossi", "Bianchi", "Kowalski", "Nowak", "Novák", "Jensen", "Hansen", "Johansson", "Virtanen",
    "Patel", "Sharma", "Singh", "Kumar", "Chen", "Wang", "Li", "Zhang", "Tanaka", "Suzuki", "Kim",
    "Park", "Okafor", "Mensah", "Yılmaz", "Costa", "Silva", "Santos", "Murphy", "Kelly", "Byrne",
    "MacDonald", "Evans", "Hughes", "Ó Súilleabháin",
)  # fmt: skip
# Department -> job titles; a few titles contain commas so the writer's quoting is exercised.
_JOBS: dict[str, tuple[str, ...]] = {
    "Engineering": ("Software Engineer", "Senior Software Engineer", "Staff Engineer",
                    "Engineering Manager", "QA Analyst", "Director, Engineering"),
    "Sales": ("Account Executive", "Sales Manager", "Sales Development Rep", "VP, Sales"),
    "Marketing": ("Marketing Manager", "Content Strategist", "Brand Designer"),
    "Finance": ("Accountant", "Financial Analyst", "Controller", "Payroll Specialist"),
    "Human Resources": ("HR Business Partner", "Recruiter", "People Ops Specialist"),
    "Operations": ("Operations Manager", "Logistics Coordinator", "Facilities Lead"),
    "Customer Support": ("Support Agent", "Support Team Lead", "Customer Success Manager"),
    "Legal": ("Counsel", "Paralegal", "Head of Legal"),
    "IT": ("IT Support Technician", "Systems Administrator", "Security Analyst"),
    "Product": ("Product Manager", "Product Designer", "UX Researcher"),
}  # fmt: skip
_DEPT_WEIGHTS: tuple[float, ...] = (0.24, 0.16, 0.08, 0.07, 0.05, 0.12, 0.14, 0.03, 0.05, 0.06)
_CITIES: tuple[str, ...] = (
    "New York", "San Francisco", "Chicago", "Austin", "Seattle", "Boston", "London", "Manchester",
    "Dublin", "Berlin", "München", "Paris", "Zürich", "Amsterdam", "Madrid", "São Paulo", "Toronto",
    "Sydney", "Singapore", "Bengaluru",
)  # fmt: skip

# (E.164 prefix, digits after it, low, high) -- ranges checked valid with phonenumbers; US
# subscriber part keeps the exchange in 200-999.
_US_AREA_CODES = ("212", "213", "206", "303", "305", "312", "404", "415", "469", "503",
                  "512", "617", "646", "650", "702", "713", "718", "773", "808", "917")  # fmt: skip
_PHONE_PLANS: tuple[tuple[str, int, int, int], ...] = (
    *((f"+1{a}", 7, 2_000_000, 10_000_000) for a in _US_AREA_CODES),
    *((p, 8, 0, 100_000_000) for p in ("+4474", "+4475", "+4478")),
    *((p, 8, 0, 100_000_000) for p in ("+49151", "+49152", "+49160", "+49170", "+49176")),
    *((p, 7, 0, 10_000_000) for p in ("+3361", "+3362", "+3366", "+3367")),
    *((p, 7, 0, 10_000_000) for p in ("+6140", "+6141", "+6142", "+6143")),
)
_N_US = len(_US_AREA_CODES)
_N_GB = 3
# Share of all rows per country: US, GB, DE, FR, AU.
_COUNTRY_SHARE = (0.70, 0.18, 0.05, 0.04, 0.03)

_EMPTY_PHONE_SHARE = 0.02
PHONE_STYLES = ("default", "national-mix")

# national-mix: (country code, national digits, low, high, formats); every format writes the
# national digits d as the template's {0}, {1}, ... slices. Ranges checked valid with phonenumbers.
_MIX_COUNTRIES: tuple[tuple[str, int, int, int, tuple[str, ...]], ...] = (
    ("1", 10, 0, 0, ("({0}) {1}-{2}", "{0}.{1}.{2}", "{0}-{1}-{2}", "1 {0} {1} {2}")),  # US: area codes below
    ("44", 10, 7_400_000_000, 7_599_999_999, ("+44 {3} {4}", "0044 {3} {4}", "+44 (0){3} {4}")),
    ("49", 11, 15_100_000_000, 15_199_999_999, ("+49 {5} {6}", "0049 {5} {7} {8}")),
    ("33", 9, 610_000_000, 619_999_999, ("+33 {9} {10} {11} {12} {13}", "0033 {9}.{10}.{11}.{12}.{13}")),
    ("61", 9, 410_000_000, 439_999_999, ("+61 {14} {15} {16}", "0061 {14}-{15}-{16}")),
    ("91", 10, 9_000_000_000, 9_999_999_999, ("+91 {17} {18}",)),
    ("55", 11, 11_900_000_000, 11_999_999_999, ("+55 {19} {20}-{21}",)),
)
# Slices of the national digits the templates use, by index: US area/exchange/subscriber, GB,
# DE, FR pairs, AU triples, IN halves, BR area/prefix/line.
_MIX_SLICES: tuple[tuple[int, int], ...] = (
    (0, 3), (3, 6), (6, 10),
    (0, 4), (4, 10),
    (0, 3), (3, 11), (3, 7), (7, 11),
    (0, 1), (1, 3), (3, 5), (5, 7), (7, 9),
    (0, 3), (3, 6), (6, 9),
    (0, 5), (5, 10),
    (0, 2), (2, 7), (7, 11),
)  # fmt: skip
_MIX_SHARE = (0.50, 0.15, 0.10, 0.08, 0.07, 0.05, 0.05)
_MIX_US_AREA_CODES = _US_AREA_CODES
UNASSIGNED_AREA_CODES = ("237", "271", "290", "297", "322", "338", "355", "687")
"""US area codes that no region has: numbers under them are invalid however they are written."""
UNASSIGNED_SHARE = 0.02
_LOCAL_FORMAT_SHARE = 0.02  # of all rows; drawn from US and GB rows only
_MESSY_EMAIL_SHARE = 0.04
_START_DAY_RANGE = (np.datetime64("1995-01-01"), np.datetime64("2025-10-31"))
_CHUNK_ROWS = 500_000


@dataclass(frozen=True)
class GeneratedFile:
    """What was written, including how many rows the validator is expected to reject and why."""

    path: Path
    rows: int
    bytes: int
    bad_rows: dict[str, int] = field(default_factory=dict)
    bad_total: int = 0
    seed: int = 7
    bad_fraction: float = 0.01
    generator_version: int = GENERATOR_VERSION
    phones: str = "default"
    rejected_by_kind: dict[str, int] = field(default_factory=dict)  # the rest of bad_rows: warnings
    unassigned_phones: int = 0  # good rows whose phone is invalid (national-mix): warnings

    @property
    def expected_rejects(self) -> int:
        return sum(self.rejected_by_kind.values())

    @property
    def expected_warnings(self) -> int:
        return self.bad_total - self.expected_rejects + self.unassigned_phones

    def to_json(self) -> dict[str, object]:
        """JSON-ready form, used for the benchmark's cache sidecar and ``--json`` output."""
        data = asdict(self)
        data["path"] = str(self.path)
        return data

    @classmethod
    def from_json(cls, data: dict[str, object]) -> GeneratedFile:
        """Inverse of :meth:`to_json`."""
        return cls(**{**data, "path": Path(str(data["path"]))})  # type: ignore[arg-type]


def _csv_field(value: str) -> str:
    """CSV-escape one static value, so pools can be written without per-row quoting work."""
    if any(ch in value for ch in ',"\n\r'):
        return '"' + value.replace('"', '""') + '"'
    return value


# Letters NFKD does not decompose into an ASCII base letter.
_NON_DECOMPOSING = str.maketrans({"ł": "l", "Ł": "L", "ø": "o", "Ø": "O", "ı": "i", "ß": "ss", "æ": "ae"})


def _slug(name: str) -> str:
    """ASCII email-safe form of a display name (``Müller`` -> ``muller``, ``O'Brien`` -> ``obrien``)."""
    folded = name.translate(_NON_DECOMPOSING)
    ascii_name = unicodedata.normalize("NFKD", folded).encode("ascii", "ignore").decode()
    return "".join(ch for ch in ascii_name.lower() if ch.isalnum())


def _pool(values: tuple[str, ...]) -> pa.Array:
    return pa.array([_csv_field(v) for v in values], pa.string())


def _join(*parts: pa.Array | str) -> pa.Array:
    """Concatenate string arrays/literals element-wise."""
    return pc.binary_join_element_wise(*parts, "")


def _replace_at(arr: pa.Array, positions: np.ndarray, values: list[str]) -> pa.Array:
    """Return ``arr`` with ``values`` placed at ``positions`` (a sparse, vectorised scatter)."""
    if len(positions) == 0:
        return arr
    order = np.argsort(positions, kind="stable")
    mask = np.zeros(len(arr), dtype=bool)
    mask[positions] = True
    replacements = pa.array([values[i] for i in order], pa.string())
    return pc.replace_with_mask(arr, pa.array(mask), replacements)


def _split_bad(n_bad: int) -> dict[str, int]:
    base, extra = divmod(n_bad, len(BAD_KINDS))
    return {kind: base + (1 if i < extra else 0) for i, kind in enumerate(BAD_KINDS)}


def _unique_suffix(first_idx: np.ndarray, last_idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-row number making ``first.last<n>`` unique: 0 (no number) for one row per name pair.

    Numbering runs in random order within each name pair, so the plain address is not always
    the earliest row.
    """
    key = first_idx.astype(np.int64) * len(_LAST_NAMES) + last_idx
    # Random low bits shuffle rows within a name pair; one int64 argsort beats a lexsort.
    order = np.argsort((key << 32) | rng.integers(0, 1 << 32, len(key)))
    sorted_key = key[order]
    starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(key)]))
    seq = np.empty(len(key), dtype=np.int64)
    seq[order] = np.arange(len(key)) - group_start
    return seq


def generate(
    path: Path, rows: int, *, bad_fraction: float = 0.01, seed: int = 7, phones: str = "default"
) -> GeneratedFile:
    """Write a UTF-8, LF-terminated employee CSV with ``rows`` data rows and return what it holds.

    ``bad_fraction`` of the rows (rounded) each get exactly one defect, spread evenly over
    :data:`BAD_KINDS`; a duplicate id copies the id of an earlier *valid* row, so it yields exactly
    one reject (the later row). ``phones`` is one of :data:`PHONE_STYLES`; the default style's
    output does not depend on the other's draws.
    """
    if phones not in PHONE_STYLES:
        raise ValueError(f"phones must be one of {PHONE_STYLES}")
    if rows < 0:
        raise ValueError("rows must be >= 0")
    if not 0.0 <= bad_fraction <= 0.5:
        raise ValueError("bad_fraction must be between 0 and 0.5")
    rng = np.random.default_rng(seed)
    n_bad = round(rows * bad_fraction)
    bad_counts = _split_bad(n_bad)
    n_dup = bad_counts["duplicate_id"]
    if n_bad + n_dup > rows:
        raise ValueError(f"too few rows ({rows}) for {n_bad} bad rows")

    # ---- draws for every row (cheap numeric arrays; strings are built per chunk below) ----
    id_num = 1000 + np.cumsum(rng.integers(1, 4, rows))
    first_idx = rng.integers(0, len(_FIRST_NAMES), rows)
    last_idx = rng.integers(0, len(_LAST_NAMES), rows)
    email_seq = _unique_suffix(first_idx, last_idx, rng)
    messy_kind = np.where(rng.random(rows) < _MESSY_EMAIL_SHARE, rng.integers(1, 4, rows), 0)

    country = rng.choice(len(_COUNTRY_SHARE), rows, p=_COUNTRY_SHARE)
    plan_offsets = np.cumsum([0, _N_US, _N_GB, 5, 4])
    plan_counts = np.array([_N_US, _N_GB, 5, 4, 4])
    plan_idx = plan_offsets[country] + (rng.random(rows) * plan_counts[country]).astype(np.int64)
    lows = np.array([p[2] for p in _PHONE_PLANS])
    highs = np.array([p[3] for p in _PHONE_PLANS])
    phone_rest = lows[plan_idx] + (rng.random(rows) * (highs - lows)[plan_idx]).astype(np.int64)
    us_or_gb_share = _COUNTRY_SHARE[0] + _COUNTRY_SHARE[1]
    local_fmt = np.where(
        (country <= 1) & (rng.random(rows) < _LOCAL_FORMAT_SHARE / us_or_gb_share),
        rng.integers(1, 5, rows),
        0,
    )
    empty_phone = (rng.random(rows) < _EMPTY_PHONE_SHARE) & (local_fmt == 0)

    dept_idx = rng.choice(len(_JOBS), rows, p=_DEPT_WEIGHTS)
    job_counts = np.array([len(t) for t in _JOBS.values()])
    job_offsets = np.cumsum(np.r_[0, job_counts[:-1]])
    job_idx = job_offsets[dept_idx] + (rng.random(rows) * job_counts[dept_idx]).astype(np.int64)
    lo_day, hi_day = (d.astype("datetime64[D]").astype(np.int64) for d in _START_DAY_RANGE)
    start_day = rng.integers(lo_day, hi_day, rows).astype(np.int32)
    city_idx = rng.integers(0, len(_CITIES), rows)

    # ---- bad rows: distinct positions; duplicate ids pair a later row with an earlier good row ----
    positions = rng.choice(rows, n_bad + n_dup, replace=False) if rows else np.empty(0, np.int64)
    pairs = np.sort(positions[: 2 * n_dup].reshape(n_dup, 2), axis=1)
    id_num[pairs[:, 1]] = id_num[pairs[:, 0]]
    bad_pos: dict[str, np.ndarray] = {"duplicate_id": pairs[:, 1]}
    cursor = 2 * n_dup
    for kind in BAD_KINDS:
        if kind != "duplicate_id":
            bad_pos[kind] = positions[cursor : cursor + bad_counts[kind]]
            cursor += bad_counts[kind]
    bad_email_tpl = rng.integers(0, len(_BAD_EMAIL_TEMPLATES), len(bad_pos["invalid_email"]))
    bad_email_values = [
        _BAD_EMAIL_TEMPLATES[t].format(f=_FIRST_SLUGS[first_idx[p]], l=_LAST_SLUGS[last_idx[p]])
        for p, t in zip(bad_pos["invalid_email"], bad_email_tpl, strict=True)
    ]
    bad_values: dict[str, list[str]] = {
        "invalid_email": bad_email_values,
        "missing_id": [""] * len(bad_pos["missing_id"]),
        "bad_date": [str(v) for v in rng.choice(_BAD_DATES, len(bad_pos["bad_date"]))],
        "bad_phone": [str(v) for v in rng.choice(_BAD_PHONES, len(bad_pos["bad_phone"]))],
    }
    bad_column = {"invalid_email": 1, "missing_id": 0, "bad_date": 7, "bad_phone": 2}
    mix = _national_mix(rows, seed, positions) if phones == "national-mix" else None
    no_phone = empty_phone if mix is None else mix[2]
    rejected_by_kind = {kind: len(bad_pos[kind]) for kind in ("missing_id", "duplicate_id")}
    rejected_by_kind["invalid_email"] = int(no_phone[bad_pos["invalid_email"]].sum())

    id_width = max(7, len(str(int(id_num.max())))) if rows else 7
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("wb") as out:
        written += out.write((",".join(_csv_field(h) for h in HEADER) + "\n").encode())
        for lo in range(0, rows, _CHUNK_ROWS):
            hi = min(lo + _CHUNK_ROWS, rows)
            sl = slice(lo, hi)
            columns = [
                _join("E", pc.utf8_lpad(pc.cast(pa.array(id_num[sl]), pa.string()), id_width, "0")),
                _emails(first_idx[sl], last_idx[sl], email_seq[sl], messy_kind[sl]),
                _phones(plan_idx[sl], phone_rest[sl], local_fmt[sl], empty_phone[sl])
                if mix is None
                else mix[0][lo:hi],
                _FIRST_POOL.take(pa.array(first_idx[sl])),
                _LAST_POOL.take(pa.array(last_idx[sl])),
                _DEPT_POOL.take(pa.array(dept_idx[sl])),
                _JOB_POOL.take(pa.array(job_idx[sl])),
                pc.cast(pa.array(start_day[sl], pa.date32()), pa.string()),
                _CITY_POOL.take(pa.array(city_idx[sl])),
            ]
            for kind, col in bad_column.items():
                in_chunk = (bad_pos[kind] >= lo) & (bad_pos[kind] < hi)
                values = [v for v, keep in zip(bad_values[kind], in_chunk, strict=True) if keep]
                columns[col] = _replace_at(columns[col], bad_pos[kind][in_chunk] - lo, values)
            lines = pc.binary_join_element_wise(*columns, ",")  # city pool values end in "\n"
            written += _write_string_values(out, lines)
    return GeneratedFile(
        path=path,
        rows=rows,
        bytes=written,
        bad_rows=bad_counts,
        bad_total=n_bad,
        seed=seed,
        bad_fraction=bad_fraction,
        phones=phones,
        rejected_by_kind=rejected_by_kind,
        unassigned_phones=0 if mix is None else mix[1],
    )


def _national_mix(rows: int, seed: int, bad_positions: np.ndarray) -> tuple[pa.Array, int, np.ndarray]:
    """Every phone non-E.164 (see the module docstring), how many good rows got an unassigned one,
    and which rows have no phone.

    Drawn from a generator of its own, so that the rest of the file is the default style's.
    """
    rng = np.random.default_rng([seed, 1])
    country = rng.choice(len(_MIX_COUNTRIES), rows, p=_MIX_SHARE)
    lows = np.array([c[2] for c in _MIX_COUNTRIES], dtype=np.int64)
    highs = np.array([c[3] for c in _MIX_COUNTRIES], dtype=np.int64)
    national = lows[country] + (rng.random(rows) * (highs - lows + 1)[country]).astype(np.int64)
    empty = rng.random(rows) < _EMPTY_PHONE_SHARE
    unassigned = (country == 0) & ~empty & (rng.random(rows) < UNASSIGNED_SHARE / _MIX_SHARE[0])
    unassigned[bad_positions] = False  # a bad row keeps its one defect
    codes = np.where(
        unassigned,
        np.array(UNASSIGNED_AREA_CODES, dtype=np.int64)[rng.integers(0, len(UNASSIGNED_AREA_CODES), rows)],
        np.array(_MIX_US_AREA_CODES, dtype=np.int64)[rng.integers(0, len(_MIX_US_AREA_CODES), rows)],
    )
    us = country == 0
    national[us] = codes[us] * 10_000_000 + rng.integers(2_000_000, 10_000_000, int(us.sum()))
    style = (rng.random(rows) * np.array([len(c[4]) for c in _MIX_COUNTRIES])[country]).astype(np.int64)
    widths = np.array([c[1] for c in _MIX_COUNTRIES], dtype=np.int64)[country]
    padded = pc.cast(pa.array(national + 10**widths), pa.string())  # a leading "1" keeps the zeros
    digits = pc.utf8_slice_codeunits(padded, 1)
    parts = [pc.utf8_slice_codeunits(digits, a, b) for a, b in _MIX_SLICES]
    out = pa.repeat(pa.scalar("", pa.string()), rows)
    for c, (_, _, _, _, formats) in enumerate(_MIX_COUNTRIES):
        for f, template in enumerate(formats):
            mask = (country == c) & (style == f) & ~empty
            if not mask.any():
                continue
            taken = pa.array(np.flatnonzero(mask))
            pieces = re.split(r"\{(\d+)\}", template)  # literal, slice index, literal, ...
            args = [parts[int(p)].take(taken) if i % 2 else p for i, p in enumerate(pieces) if p]
            out = pc.replace_with_mask(out, pa.array(mask), _join(*args))
    return out, int(unassigned.sum()), empty


def _emails(first: np.ndarray, last: np.ndarray, seq: np.ndarray, messy: np.ndarray) -> pa.Array:
    """``first.last<n>@example.com``; ``messy`` rows get mixed case and/or surrounding spaces."""
    number = pc.if_else(pa.array(seq == 0), "", pc.cast(pa.array(seq + 1), pa.string()))
    f_idx, l_idx = pa.array(first), pa.array(last)
    lower = _join(_FIRST_SLUG_POOL.take(f_idx), ".", _LAST_SLUG_POOL.take(l_idx), number, "@example.com")
    rows = np.flatnonzero(messy)
    if len(rows) == 0:
        return lower
    # Only the few messy rows pay for building their variants.
    sub_rows = pa.array(rows)
    sub_num = number.take(sub_rows)
    title = _join(
        _FIRST_TITLE_POOL.take(f_idx.take(sub_rows)),
        ".",
        _LAST_TITLE_POOL.take(l_idx.take(sub_rows)),
        sub_num,
    )
    sub_lower = lower.take(sub_rows)
    variants = [
        _join(" ", title, "@Example.com", " "),
        _join(title, "@example.com"),
        _join(pc.utf8_slice_codeunits(sub_lower, 0, -len("example.com")), "EXAMPLE.COM  "),
    ]
    messy_values = pc.choose(pa.array(messy[rows].astype(np.int8) - 1), *variants)
    return pc.replace_with_mask(lower, pa.array(messy != 0), messy_values)


def _phones(plan: np.ndarray, rest: np.ndarray, local_fmt: np.ndarray, empty: np.ndarray) -> pa.Array:
    """Mostly E.164; ``local_fmt`` rows get national US or spaced GB forms; ``empty`` rows blank."""
    # rest + 10**digits has one extra leading "1"; slicing it off zero-pads to a per-row width.
    padded = pc.cast(pa.array(rest + 10 ** _PHONE_DIGITS[plan]), pa.string())
    e164 = _join(_PHONE_PREFIX_POOL.take(pa.array(plan)), pc.utf8_slice_codeunits(padded, 1))
    phones = pc.if_else(pa.array(empty), "", e164)
    rows = np.flatnonzero(local_fmt)
    if len(rows) == 0:
        return phones
    # Only the ~2% local-format rows pay for building their variants.
    sub = e164.take(pa.array(rows))
    cut = pc.utf8_slice_codeunits
    us_a, us_b, us_c = cut(sub, 2, 5), cut(sub, 5, 8), cut(sub, 8, 12)
    gb_a, gb_b = cut(sub, 3, 7), cut(sub, 7, 13)
    is_us = pa.array(plan[rows] < _N_US)
    variants = [
        pc.if_else(is_us, _join("(", us_a, ") ", us_b, "-", us_c), _join("+44 ", gb_a, " ", gb_b)),
        pc.if_else(is_us, _join(us_a, "-", us_b, "-", us_c), _join("+44-", gb_a, "-", gb_b)),
        pc.if_else(is_us, _join(us_a, " ", us_b, " ", us_c), _join("+44 ", gb_a, " ", gb_b)),
        pc.if_else(is_us, _join("+1 ", us_a, "-", us_b, "-", us_c), _join("+44 ", gb_a, gb_b)),
    ]
    local_values = pc.choose(pa.array(local_fmt[rows].astype(np.int8) - 1), *variants)
    return pc.replace_with_mask(phones, pa.array(local_fmt != 0), local_values)


def _write_string_values(out: object, arr: pa.Array) -> int:
    """Write the concatenated values of a string array straight from its data buffer."""
    if len(arr) == 0:
        return 0
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data = memoryview(arr.buffers()[2])[int(offsets[0]) : int(offsets[-1])]
    return out.write(data)  # type: ignore[attr-defined]


_FIRST_SLUGS = tuple(_slug(n) for n in _FIRST_NAMES)
_LAST_SLUGS = tuple(_slug(n) for n in _LAST_NAMES)
if len(set(_FIRST_SLUGS)) != len(_FIRST_SLUGS) or len(set(_LAST_SLUGS)) != len(_LAST_SLUGS):
    raise RuntimeError("name pools must have distinct email slugs, or emails stop being unique")
_FIRST_POOL = _pool(_FIRST_NAMES)
_LAST_POOL = _pool(_LAST_NAMES)
_FIRST_SLUG_POOL = pa.array(_FIRST_SLUGS)
_LAST_SLUG_POOL = pa.array(_LAST_SLUGS)
_FIRST_TITLE_POOL = pa.array([s.capitalize() for s in _FIRST_SLUGS])
_LAST_TITLE_POOL = pa.array([s.capitalize() for s in _LAST_SLUGS])
_DEPT_POOL = _pool(tuple(_JOBS))
_JOB_POOL = _pool(tuple(t for titles in _JOBS.values() for t in titles))
_CITY_POOL = pa.array([_csv_field(c) + "\n" for c in _CITIES])
_PHONE_PREFIX_POOL = pa.array([p[0] for p in _PHONE_PLANS])
_PHONE_DIGITS = np.array([p[1] for p in _PHONE_PLANS], dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    """CLI: write a file and print its summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/data/employees.csv"))
    parser.add_argument("--bad-fraction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--phones", choices=PHONE_STYLES, default="default")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = generate(args.out, args.rows, bad_fraction=args.bad_fraction, seed=args.seed, phones=args.phones)
    summary = {**result.to_json(), "seconds": round(time.perf_counter() - started, 3)}
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

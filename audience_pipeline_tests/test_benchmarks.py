"""Fast checks of the benchmark data generator and the benchmark CLI (no timing assertions).

The generator's expected-reject count is what the benchmark compares the validator against, so
these tests re-derive every defect with an independent reference check instead of trusting it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import phonenumbers
import pyarrow.csv as pa_csv
import pytest

from benchmarks.bench_validate import ensure_file
from benchmarks.generate_employees import (
    _MIX_COUNTRIES,
    _US_AREA_CODES,
    BAD_KINDS,
    HEADER,
    UNASSIGNED_AREA_CODES,
    GeneratedFile,
    generate,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ROWS = 2000
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> GeneratedFile:
    return generate(tmp_path_factory.mktemp("gen") / "employees.csv", ROWS)


def _records(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle))


def _phone_ok(value: str) -> bool:
    """Valid for phonenumbers with region US, a leading 00 read as + (as the pipeline reads it)."""
    try:
        text = "+" + value[2:] if value.startswith("00") else value
        return phonenumbers.is_valid_number(phonenumbers.parse(text, "US"))
    except phonenumbers.NumberParseException:
        return False


def test_header_line_endings_and_size(generated: GeneratedFile) -> None:
    raw = generated.path.read_bytes()
    assert raw.startswith(",".join(HEADER).encode() + b"\n")
    assert b"\r" not in raw and raw.endswith(b"\n")
    assert generated.bytes == len(raw)
    records = _records(generated.path)
    assert records[0] == list(HEADER)
    assert len(records) == ROWS + 1
    assert all(len(r) == len(HEADER) for r in records)
    table = pa_csv.read_csv(generated.path)
    assert table.num_rows == ROWS and table.column_names == list(HEADER)


def test_bad_rows_match_an_independent_check(generated: GeneratedFile) -> None:
    assert set(generated.bad_rows) == set(BAD_KINDS)
    assert sum(generated.bad_rows.values()) == generated.bad_total == round(ROWS * 0.01)
    assert max(generated.bad_rows.values()) - min(generated.bad_rows.values()) <= 1

    found: dict[str, set[int]] = {kind: set() for kind in BAD_KINDS}
    seen_ids: set[str] = set()
    for line, (emp_id, email, phone, *_rest, start, _city) in enumerate(_records(generated.path)[1:]):
        if not emp_id:
            found["missing_id"].add(line)
        elif emp_id in seen_ids:
            found["duplicate_id"].add(line)
        seen_ids.add(emp_id)
        if not EMAIL.match(email.strip()):
            found["invalid_email"].add(line)
        try:
            dt.date.fromisoformat(start)
        except ValueError:
            found["bad_date"].add(line)
        if phone and not _phone_ok(phone):
            found["bad_phone"].add(line)

    assert {kind: len(lines) for kind, lines in found.items()} == generated.bad_rows
    # One defect per bad row, so expected rejects == bad rows.
    assert len(set().union(*found.values())) == generated.bad_total


def test_normalisation_cases_are_present(generated: GeneratedFile) -> None:
    rows = _records(generated.path)[1:]
    emails = [r[1] for r in rows]
    phones = [r[2] for r in rows]
    assert any(e != e.strip() for e in emails)
    assert any(e.strip() != e.strip().lower() for e in emails)
    assert any(p == "" for p in phones)
    assert any(p and not p.startswith("+") for p in phones)  # US national formats
    assert sum(p.startswith("+") and not p[1:].isdigit() for p in phones) > 0  # spaced international
    good_emails = [e.strip().lower() for e in emails if EMAIL.match(e.strip())]
    assert len(good_emails) == len(set(good_emails))


def test_deterministic_for_a_seed(tmp_path: Path, generated: GeneratedFile) -> None:
    again = generate(tmp_path / "again.csv", ROWS)
    other = generate(tmp_path / "other.csv", ROWS, seed=8)
    assert again.path.read_bytes() == generated.path.read_bytes()
    assert again.bad_rows == generated.bad_rows
    assert other.path.read_bytes() != generated.path.read_bytes()


def test_ensure_file_reuses_the_cache(tmp_path: Path) -> None:
    first, first_seconds = ensure_file(500, 7, tmp_path)
    second, second_seconds = ensure_file(500, 7, tmp_path)
    assert first_seconds is not None and second_seconds is None
    assert second == first


@pytest.fixture(scope="module")
def national_mix(tmp_path_factory: pytest.TempPathFactory) -> GeneratedFile:
    return generate(tmp_path_factory.mktemp("mix") / "employees.csv", ROWS, phones="national-mix")


def test_national_mix_phones_are_all_non_e164_from_seven_countries(
    national_mix: GeneratedFile, generated: GeneratedFile
) -> None:
    rows = _records(national_mix.path)[1:]
    phones = [r[2] for r in rows]
    assert not any(re.fullmatch(r"\+[0-9]+", p) for p in phones)
    written_with = {p[:3] for p in phones if p.startswith(("+", "00"))}
    assert {"+44", "+49", "+33", "+61", "+91", "+55", "004", "003", "006"} <= written_with
    assert any(p.startswith("(") for p in phones) and any("." in p and p[0].isdigit() for p in phones)
    invalid = [p for p in phones if p and not _phone_ok(p)]
    assert len(invalid) == national_mix.unassigned_phones + national_mix.bad_rows["bad_phone"]
    assert 0.01 * ROWS < national_mix.unassigned_phones < 0.03 * ROWS
    # everything else in the file is the default style's
    assert [r[:2] + r[3:] for r in rows] == [r[:2] + r[3:] for r in _records(generated.path)[1:]]
    no_phone_bad_emails = sum(1 for r in rows if r[2] == "" and not EMAIL.match(r[1].strip()))
    assert national_mix.rejected_by_kind["invalid_email"] == no_phone_bad_emails


def test_national_mix_ranges_are_valid_and_unassigned_codes_are_not() -> None:
    rng = random.Random(1)
    for cc, width, low, high, _ in _MIX_COUNTRIES[1:]:
        assert all(_phone_ok(f"+{cc}{rng.randint(low, high):0{width}d}") for _ in range(200)), cc
    for code in _US_AREA_CODES:
        assert all(_phone_ok(f"+1{code}{rng.randint(2_000_000, 9_999_999)}") for _ in range(50)), code
    for code in UNASSIGNED_AREA_CODES:
        assert not any(_phone_ok(f"+1{code}{rng.randint(2_000_000, 9_999_999)}") for _ in range(50)), code


@pytest.mark.parametrize("phones", ["default", "national-mix"])
def test_bench_cli_emits_json(tmp_path: Path, phones: str) -> None:
    cmd = [sys.executable, "-m", "benchmarks.bench_validate", "--rows", str(ROWS), "--repeat", "1"]
    cmd += ["--json", "--data-dir", str(tmp_path), "--phones", phones]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.load(io.StringIO(proc.stdout))

    assert report["file"]["rows"] == ROWS
    assert report["file"]["phones"] == phones
    # only the id defects and an invalid email without a phone reject a row; the rest are warnings
    assert 8 <= report["file"]["expected_rejects"] <= 12
    assert report["file"]["expected_rejects"] + report["file"]["expected_warnings"] >= round(ROWS * 0.01)
    bare = report["bare"]
    assert bare["status"] == "ok"
    assert bare["rows"] == ROWS
    assert bare["seconds"] > 0
    assert bare["peak_rss_bytes"] >= bare["baseline_rss_bytes"] > 0
    assert set(report["checks"]) == {"time_ratio", "rss_ratio", "rejects", "warnings"}

    pipeline = report["pipeline"]
    # "skipped" until audience_pipeline.validation exists; an error means it crashed.
    assert pipeline["status"] in {"ok", "skipped"}, pipeline.get("reason")
    if pipeline["status"] == "ok":
        assert pipeline["source_rows"] == ROWS
        assert pipeline["valid_rows"] + pipeline["rejected_rows"] == ROWS
        assert report["checks"]["time_ratio"]["result"] in {"PASS", "FAIL"}
        assert report["checks"]["rejects"]["result"] == report["checks"]["warnings"]["result"] == "PASS"


def test_bench_diff_cli_counts_what_it_planted(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.bench_diff", "--rows", str(ROWS), "--repeat", "1"]
    cmd += ["--json", "--data-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.load(io.StringIO(proc.stdout))

    expected = report["prepared"]["expected"]
    assert report["diff"]["counts"] == expected and report["checks"]["counts_match"]
    assert expected["changed"] == int(report["prepared"]["valid_rows"] * 0.02)
    assert expected["removed"] == expected["added"] > 0
    assert report["diff"]["seconds"] > 0 and report["bare"]["seconds"] > 0
    assert set(report["checks"]) == {"time_ratio", "own_peak_ratio", "counts_match"}

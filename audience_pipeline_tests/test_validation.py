"""Valid rows and rejects: every data record of a file ends up in exactly one of them."""

from __future__ import annotations

import datetime as dt
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from audience_pipeline.csv_reader import read_csv
from audience_pipeline.feeds.model import FieldMapping
from audience_pipeline.normalize import normalize
from audience_pipeline.schemas.employee import EMAIL_PATTERN
from audience_pipeline.validation import REJECT_COLUMNS, validate_file, validate_frame

MAPPING = FieldMapping(
    unique_id="Employee ID",
    email="Email",
    mobile_phone="Mobile",
    first_name="First Name",
    attributes={
        "start": {"header": "Start", "type": "date"},
        "grade": {"header": "Grade", "type": "integer", "required": True},
    },
)
COLUMNS = ["unique_id", "email", "mobile_phone", "first_name", "start", "grade"]
POOLS: dict[str, list[str | None]] = {
    "unique_id": ["E1", "E2", "E3", None, "x" * 256, *(f"U{i}" for i in range(40))],
    "email": ["a@x.org", "b.c@y.co.uk", None, None, "bad", "A@X.ORG", "a@@x.org"],
    "mobile_phone": ["+12125550100", "+447400123456", None, None, "2125550100", "+0123"],
    "first_name": ["Ann", None, "é" * 255, "é" * 256],
    "start": ["2024-02-29", None, "2023-02-29", "2021-13-01", "01/02/2021"],
    "grade": ["1", "-7", "007", None, "1.5", "one"],
}


def typed(data: dict[str, list], lines: list[int]) -> pd.DataFrame:
    """A frame as ``normalize`` returns it."""
    out = {"source_line": pd.Series(lines, dtype="int64")}
    out.update({c: pd.Series(data[c], dtype="str") for c in COLUMNS})
    return pd.DataFrame(out)


def expected_bad(rows: list[dict[str, str | None]]) -> list[bool]:
    """An independent reading of the rules, one row at a time."""
    seen: set[str] = set()
    bad = []
    for r in rows:
        uid = r["unique_id"]
        problems = [
            uid is None or len(uid) > 255 or uid in seen,
            r["email"] is not None and not re.fullmatch(EMAIL_PATTERN, r["email"]),
            r["mobile_phone"] is not None and not re.fullmatch(r"\+[1-9][0-9]{6,14}", r["mobile_phone"]),
            r["email"] is None and r["mobile_phone"] is None,
            r["first_name"] is not None and len(r["first_name"]) > 255,
            r["start"] is not None and not _iso(r["start"]),
            r["grade"] is None or not re.fullmatch(r"-?[0-9]+", r["grade"]),
        ]
        if uid is not None:
            seen.add(uid)
        bad.append(any(problems))
    return bad


def _iso(value: str) -> bool:
    try:
        return len(value) == 10 and dt.date.fromisoformat(value) is not None
    except ValueError:
        return False


@pytest.mark.parametrize("seed", range(25))
def test_every_row_is_valid_or_rejected_exactly_once(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([0, 1, 2, 7, 50, 300])
    rows = [{c: rng.choice(POOLS[c]) for c in COLUMNS} for _ in range(size)]
    lines = sorted(rng.sample(range(2, 10 * size + 3), size))
    frame = typed({c: [r[c] for r in rows] for c in COLUMNS}, lines)
    before = frame.copy()

    valid, rejects = validate_frame(frame, MAPPING)

    pd.testing.assert_frame_equal(frame, before)  # the caller's frame is untouched
    assert list(rejects.columns) == REJECT_COLUMNS
    assert rejects["source_line"].is_unique
    assert set(valid["source_line"]).isdisjoint(rejects["source_line"])
    assert sorted([*valid["source_line"], *rejects["source_line"]]) == lines
    bad = np.array(expected_bad(rows), dtype=bool)
    assert sorted(rejects["source_line"]) == [line for line, b in zip(lines, bad, strict=True) if b]
    good = before[~bad].reset_index(drop=True)
    pd.testing.assert_frame_equal(valid, good)
    assert isinstance(valid.index, pd.RangeIndex)
    ids = dict(zip(before["source_line"], before["unique_id"].fillna(""), strict=True))
    assert rejects["unique_id"].tolist() == [ids[line] for line in rejects["source_line"]]
    assert (rejects["reason"].str.len() > 0).all()


def test_one_reject_per_row_with_every_problem_in_column_order() -> None:
    frame = typed(
        {
            "unique_id": ["E1", None, "E3", "E1", "E1", "E6"],
            "email": ["a@x.org", "bad", None, "d@x.org", None, "f@x.org"],
            "mobile_phone": [None, "123", None, None, None, None],
            "first_name": ["Ann", "x" * 256, "C", "D", "E", "F"],
            "start": [None, "2021-02-30", None, None, None, None],
            "grade": ["1", "2", "3", "4", None, "x"],
        },
        lines=[2, 4, 7, 9, 10, 12],
    )

    valid, rejects = validate_frame(frame, MAPPING)

    assert valid["source_line"].tolist() == [2]
    got = rejects.set_index("source_line")
    assert got.index.tolist() == [4, 7, 9, 10, 12]
    assert got.loc[4, "unique_id"] == ""
    assert got.loc[4, "column"] == "Employee ID; Email; Mobile; First Name; Start"
    assert got.loc[4, "value"] == f"; bad; 123; {'x' * 256}; 2021-02-30"
    assert got.loc[4, "reason"] == (
        "Employee ID is empty but required; "
        "Email is not a valid email address; "
        "Mobile is not a phone number that can be written in E.164 (+ country code and number); "
        "First Name is longer than 255 characters; "
        "Start is not a valid date (expected YYYY-MM-DD)"
    )
    assert got.loc[7, "column"] == "Email / Mobile"
    assert got.loc[7, "reason"] == (
        "Email / Mobile both empty: the row has neither an email address nor a mobile phone number"
    )
    assert got.loc[9, "unique_id"] == "E1"
    assert got.loc[9, "reason"] == "Employee ID duplicates a value first seen on line 2"
    assert got.loc[10, "column"] == "Employee ID; Email / Mobile; Grade"
    assert got.loc[10, "reason"] == (
        "Employee ID duplicates a value first seen on line 2; "
        "Email / Mobile both empty: the row has neither an email address nor a mobile phone number; "
        "Grade is empty but required"
    )
    assert (got.loc[12, "column"], got.loc[12, "value"]) == ("Grade", "x")


def test_duplicate_points_at_the_first_line_even_when_that_row_is_rejected_too() -> None:
    frame = typed(
        {
            "unique_id": ["E7", "E8", "E7", "E7"],
            "email": ["bad", "b@x.org", "c@x.org", "d@x.org"],
            "mobile_phone": [None] * 4,
            "first_name": [None] * 4,
            "start": [None] * 4,
            "grade": ["1"] * 4,
        },
        lines=[5, 6, 30, 31],
    )

    valid, rejects = validate_frame(frame, MAPPING)

    assert valid["unique_id"].tolist() == ["E8"]
    assert rejects["reason"].tolist() == [
        "Email is not a valid email address",
        "Employee ID duplicates a value first seen on line 5",
        "Employee ID duplicates a value first seen on line 5",
    ]


def test_custom_date_format_is_named_in_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text("ID,Email,Hired\nE1,a@x.org,31/02/2021\nE2,b@x.org,1/2/2021\n", "utf-8")
    mapping = FieldMapping(
        unique_id="ID",
        email="Email",
        attributes={"hired": {"header": "Hired", "type": "date", "format": "%d/%m/%Y"}},
    )

    result = validate_file(path, mapping)

    assert result.valid["hired"].tolist() == ["2021-02-01"]
    assert result.rejects["reason"].tolist() == ["Hired is not a valid date (expected %d/%m/%Y)"]
    assert result.rejects["value"].tolist() == ["31/02/2021"]


def test_malformed_rows_from_the_parser_are_rejects_in_line_order(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text(
        "Employee ID,Email,Mobile,First Name,Start,Grade\n"
        "E1,a@x.org,,Ann,,1\n"
        "E2,b@x.org,,Bob,1\n"  # a field short
        "E3,bad,,Cy,,3\n"
        "E4,d@x.org,,Di,,4,extra\n"  # a field too many
        "E5,e@x.org,,Ed,,5\n",
        "utf-8",
    )

    result = validate_file(path, MAPPING)

    assert result.source_rows == 5
    assert result.valid["source_line"].tolist() == [2, 6]
    assert result.rejects["source_line"].tolist() == [3, 4, 5]
    assert result.rejects["reason"].tolist() == [
        "row has 5 fields, the header has 6",
        "Email is not a valid email address",
        "row has 7 fields, the header has 6",
    ]
    assert result.rejects["value"].tolist()[0] == "E2,b@x.org,,Bob,1"
    assert result.rejection_rate == pytest.approx(3 / 5)
    assert result.rejects["source_line"].dtype == "int64"


def test_validate_file_and_validate_frame_agree(tmp_path: Path) -> None:
    rng = random.Random(42)
    lines = ["Employee ID,Email,Mobile,First Name,Start,Grade"]
    for i in range(400):
        name = rng.choice(['"Ann\nMarie"', "Bob", " Cy ", '"Lee, Di"', ""])
        email = rng.choice(["a@x.org", " B@X.ORG ", "", "bad"])
        phone = rng.choice(["(212) 555-0100", "+44 20 7946 0958", "", "12"])
        uid = rng.choice([f"E{i}", f"E{i}", "E1", ""])
        lines.append(",".join([uid, email, phone, name, rng.choice(["2024-02-29", "", "2023-02-29"]), "1"]))
    path = tmp_path / "e.csv"
    path.write_text("\n".join(lines) + "\n", "utf-8")

    result = validate_file(path, MAPPING)
    valid, rejects = validate_frame(normalize(read_csv(path), MAPPING), MAPPING)

    pd.testing.assert_frame_equal(result.valid, valid)
    pd.testing.assert_frame_equal(result.rejects, rejects.sort_values("source_line", ignore_index=True))
    assert len(result.valid) + len(result.rejects) == result.source_rows == 400
    assert 0 < len(result.rejects) < 400


def test_a_clean_file_has_typed_empty_rejects(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text("Employee ID,Email,Mobile,First Name,Start,Grade\nE1,a@x.org,,Ann,,1\n", "utf-8")

    result = validate_file(path, MAPPING)

    assert len(result.valid) == 1 and result.rejects.empty
    assert list(result.rejects.columns) == REJECT_COLUMNS
    assert result.rejects["source_line"].dtype == "int64"
    assert result.rejection_rate == 0.0


def test_a_frame_that_does_not_match_the_schema_is_a_bug_not_rejects() -> None:
    frame = typed({c: [POOLS[c][0]] for c in COLUMNS}, [2]).assign(stray=pd.Series(["x"], dtype="str"))

    with pytest.raises(ValueError, match="normalised frame does not match the schema"):
        validate_frame(frame, MAPPING)

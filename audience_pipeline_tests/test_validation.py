"""Valid rows and rejects: every data record of a file ends up in exactly one of them."""

from __future__ import annotations

import datetime as dt
import random
import re
from pathlib import Path

import pandas as pd
import pytest

from audience_pipeline.csv_reader import read_csv
from audience_pipeline.feeds.model import Feed, FieldMapping
from audience_pipeline.normalize import MappingError, normalize
from audience_pipeline.phones import parse_phone
from audience_pipeline.schemas.employee import EMAIL_PATTERN
from audience_pipeline.validation import REJECT_COLUMNS, validate_file, validate_for_feed, validate_frame

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


def expected_outcomes(rows: list[dict[str, str | None]], policy: str) -> list[str]:
    """An independent reading of the rules, one row at a time: "valid", "warning" or "rejected"."""
    seen: set[str] = set()
    out = []
    for r in rows:
        uid, email, phone = r["unique_id"], r["email"], r["mobile_phone"]
        email_bad = email is not None and not re.fullmatch(EMAIL_PATTERN, email)
        phone_bad = phone is not None and parse_phone(phone, None) != phone
        required = [
            uid is None or len(uid) > 255 or uid in seen,
            email is None and phone is None,
            r["grade"] is None or not re.fullmatch(r"-?[0-9]+", r["grade"]),
        ]
        optional = [
            email_bad,
            phone_bad,
            r["first_name"] is not None and len(r["first_name"]) > 255,
            r["start"] is not None and not _iso(r["start"]),
        ]
        if uid is not None:
            seen.add(uid)
        channel_left = (email is not None and not email_bad) or (phone is not None and not phone_bad)
        if any(required) or (any(optional) and (policy == "reject" or not channel_left)):
            out.append("rejected")
        else:
            out.append("warning" if any(optional) else "valid")
    return out


def cleared(row: dict[str, str | None]) -> dict[str, str | None]:
    """The row as it is imported once its invalid optional values are cleared."""
    out = dict(row)
    if out["email"] is not None and not re.fullmatch(EMAIL_PATTERN, out["email"]):
        out["email"] = None
    if out["mobile_phone"] is not None and parse_phone(out["mobile_phone"], None) != out["mobile_phone"]:
        out["mobile_phone"] = None
    if out["first_name"] is not None and len(out["first_name"]) > 255:
        out["first_name"] = None
    if out["start"] is not None and not _iso(out["start"]):
        out["start"] = None
    return out


def _iso(value: str) -> bool:
    try:
        return len(value) == 10 and dt.date.fromisoformat(value) is not None
    except ValueError:
        return False


@pytest.mark.parametrize("policy", ["clear", "reject"])
@pytest.mark.parametrize("seed", range(25))
def test_every_row_is_valid_or_rejected_exactly_once(seed: int, policy: str) -> None:
    """Warnings are rows that were kept: they are in ``valid``, never in ``rejects``."""
    rng = random.Random(seed)
    size = rng.choice([0, 1, 2, 7, 50, 300])
    rows = [{c: rng.choice(POOLS[c]) for c in COLUMNS} for _ in range(size)]
    lines = sorted(rng.sample(range(2, 10 * size + 3), size))
    frame = typed({c: [r[c] for r in rows] for c in COLUMNS}, lines)
    before = frame.copy()

    valid, rejects, warnings = validate_frame(frame, MAPPING, invalid_optional_fields=policy)

    pd.testing.assert_frame_equal(frame, before)  # the caller's frame is untouched
    assert list(rejects.columns) == list(warnings.columns) == REJECT_COLUMNS
    assert rejects["source_line"].is_unique and warnings["source_line"].is_unique
    assert set(valid["source_line"]).isdisjoint(rejects["source_line"])
    assert sorted([*valid["source_line"], *rejects["source_line"]]) == lines
    assert set(warnings["source_line"]) <= set(valid["source_line"])
    outcomes = expected_outcomes(rows, policy)
    by_outcome = {o: [n for n, x in zip(lines, outcomes, strict=True) if x == o] for o in set(outcomes)}
    assert sorted(rejects["source_line"]) == by_outcome.get("rejected", [])
    assert sorted(warnings["source_line"]) == by_outcome.get("warning", [])
    kept = [(n, cleared(r)) for n, r, o in zip(lines, rows, outcomes, strict=True) if o != "rejected"]
    good = typed({c: [r[c] for _, r in kept] for c in COLUMNS}, [n for n, _ in kept])
    pd.testing.assert_frame_equal(valid, good)
    assert isinstance(valid.index, pd.RangeIndex)
    ids = dict(zip(before["source_line"], before["unique_id"].fillna(""), strict=True))
    assert rejects["unique_id"].tolist() == [ids[line] for line in rejects["source_line"]]
    assert warnings["unique_id"].tolist() == [ids[line] for line in warnings["source_line"]]
    assert (rejects["reason"].str.len() > 0).all()
    assert warnings["reason"].str.contains("cleared, the employee is imported without it").all()


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

    valid, rejects, _ = validate_frame(frame, MAPPING)

    assert valid["source_line"].tolist() == [2]
    got = rejects.set_index("source_line")
    assert got.index.tolist() == [4, 7, 9, 10, 12]
    assert got.loc[4, "unique_id"] == ""
    assert got.loc[4, "column"] == "Employee ID; Email; Mobile; First Name; Start"
    assert got.loc[4, "value"] == f"; bad; 123; {'x' * 256}; 2021-02-30"
    assert got.loc[4, "reason"] == (
        "Employee ID is empty but required; "
        "Email is not a valid email address; "
        "Mobile is not a valid phone number (its country's numbering plan has no such number; without + "
        "or 00 it is read as a number of the feed's default_phone_region); "
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

    valid, rejects, _ = validate_frame(frame, MAPPING)

    assert valid["unique_id"].tolist() == ["E8"]
    assert rejects["reason"].tolist() == [
        "Email is not a valid email address",
        "Employee ID duplicates a value first seen on line 5",
        "Employee ID duplicates a value first seen on line 5",
    ]


@pytest.mark.parametrize("required", [True, False])
def test_custom_date_format_is_named_in_the_reason(tmp_path: Path, required: bool) -> None:
    path = tmp_path / "e.csv"
    path.write_text("ID,Email,Hired\nE1,a@x.org,31/02/2021\nE2,b@x.org,1/2/2021\n", "utf-8")
    mapping = FieldMapping(
        unique_id="ID",
        email="Email",
        attributes={"hired": {"header": "Hired", "type": "date", "format": "%d/%m/%Y", "required": required}},
    )

    result = validate_file(path, mapping)

    # An optional attribute's bad value is cleared (a warning); a required one's rejects the row.
    found = result.rejects if required else result.warnings
    assert result.valid["hired"].tolist()[-1] == "2021-02-01"
    assert result.valid["hired"].isna().tolist() == ([False] if required else [True, False])
    note = "" if required else ": cleared, the employee is imported without it"
    assert found["reason"].tolist() == [f"Hired is not a valid date (expected %d/%m/%Y){note}"]
    assert found["value"].tolist() == ["31/02/2021"]


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
    valid, rejects, warnings = validate_frame(normalize(read_csv(path), MAPPING), MAPPING)

    pd.testing.assert_frame_equal(result.valid, valid)
    pd.testing.assert_frame_equal(result.rejects, rejects.sort_values("source_line", ignore_index=True))
    pd.testing.assert_frame_equal(result.warnings, warnings)
    assert 0 < len(result.warnings) < len(result.valid)
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


# --------------------------------------------------------------------------- invalid optional values

POLICY_FILE = (
    "Employee ID,Email,Mobile,First Name,Start,Grade\n"
    "E1,a@x.org,n/a,Ann,,1\n"  # a placeholder: an empty cell, not even a warning
    "E2,b@x.org,12,Bob,,2\n"  # email fine, phone not: kept without the phone
    "E3,Bad@@x,+1 212 555 0100,Cy,,3\n"  # phone fine, email not: kept without the email
    "E4,Bad@@x,(687) 207-0030,Di,,4\n"  # neither fine: nothing left to reach them, rejected
    "E5,e@x.org,+16872070030,Ed,2023-02-29,5\n"  # two optional problems: one warning row
    "E6,f@x.org,12,Flo,,x\n"  # a required attribute is wrong: rejected, the phone named too
    "-,g@x.org,,Gus,,7\n"  # a placeholder id is a missing id
)


def test_invalid_optional_values_are_cleared_and_the_employee_imported(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text(POLICY_FILE, "utf-8")

    result = validate_file(path, MAPPING)

    valid = result.valid.set_index("unique_id")
    assert valid.index.tolist() == ["E1", "E2", "E3", "E5"]
    assert valid["email"].isna().tolist() == [False, False, True, False]
    assert valid["mobile_phone"].isna().tolist() == [True, True, False, True]
    assert valid.loc["E3", "mobile_phone"] == "+12125550100"
    assert valid["start"].isna().all()
    assert result.warnings[["source_line", "unique_id", "column", "value"]].values.tolist() == [
        [3, "E2", "Mobile", "12"],
        [4, "E3", "Email", "Bad@@x"],  # as the file wrote it, not lower-cased
        [6, "E5", "Mobile; Start", "+16872070030; 2023-02-29"],
    ]
    assert result.warnings["reason"].iloc[2] == (
        "Mobile is not a valid phone number (its country's numbering plan has no such number; without "
        "+ or 00 it is read as a number of the feed's default_phone_region): cleared, the employee is "
        "imported without it; Start is not a valid date (expected YYYY-MM-DD): cleared, the employee is "
        "imported without it"
    )
    assert result.rejects[["source_line", "unique_id", "column"]].values.tolist() == [
        [5, "E4", "Email; Mobile"],
        [7, "E6", "Mobile; Grade"],
        [8, "", "Employee ID"],
    ]
    assert result.rejects["reason"].iloc[2] == "Employee ID is empty but required"
    assert len(result.valid) + len(result.rejects) == result.source_rows == 7
    assert result.rejection_rate == pytest.approx(3 / 7)  # warnings are imported rows, not rejects


def test_the_reject_setting_keeps_the_strict_rule(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text(POLICY_FILE, "utf-8")

    result = validate_file(path, MAPPING, invalid_optional_fields="reject")

    assert result.valid["unique_id"].tolist() == ["E1"]
    assert result.rejects["source_line"].tolist() == [3, 4, 5, 6, 7, 8]
    assert result.warnings.empty and list(result.warnings.columns) == REJECT_COLUMNS


def test_the_feed_option_reaches_validation(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text(POLICY_FILE, "utf-8")
    feed = {"name": "f", "source": "s", "destination": "d", "mapping": MAPPING.model_dump()}

    assert Feed.model_validate(feed).invalid_optional_fields == "clear"
    strict = Feed.model_validate({**feed, "invalid_optional_fields": "reject"})
    assert len(validate_for_feed(path, strict).rejects) == 6
    with pytest.raises(ValueError, match="invalid_optional_fields"):
        Feed.model_validate({**feed, "invalid_optional_fields": "drop"})


def test_with_one_channel_mapped_it_is_required_and_never_cleared(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_text("ID,Phone,Dept\nE1,12,n/a\nE2,(212) 555-0100,unknown\n", "utf-8")
    mapping = FieldMapping(unique_id="ID", mobile_phone="Phone", attributes={"dept": "Dept"})

    result = validate_file(path, mapping)

    assert result.valid[["unique_id", "mobile_phone"]].values.tolist() == [["E2", "+12125550100"]]
    assert result.valid["dept"].isna().all()  # placeholders in an optional attribute: empty, no warning
    assert result.rejects["reason"].tolist() == [
        "Phone is not a valid phone number (its country's numbering plan has no such number; without + "
        "or 00 it is read as a number of the feed's default_phone_region)"
    ]
    assert result.warnings.empty


# --------------------------------------------------------------------------- headers as people write them

HEADER_LINE = "Employee ID,Email,Mobile,First Name,Start,Grade"


def _csv(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "e.csv"
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def test_a_header_in_other_case_and_spacing_is_used_and_reported(tmp_path: Path) -> None:
    path = _csv(
        tmp_path, "EMPLOYEE ID,EMAIL,Mobile, first  name ,Start,Grade\nE1,a@x.org,,Ann,,1\nE2,bad,,Bob,,2\n"
    )

    result = validate_file(path, MAPPING)

    assert result.header_matches == {
        "Employee ID": "EMPLOYEE ID",
        "Email": "EMAIL",
        "First Name": "first  name",
    }
    assert result.valid["email"].tolist() == ["a@x.org"]
    assert result.valid["first_name"].tolist() == ["Ann"]
    assert (result.rejects["column"].tolist(), result.rejects["reason"].tolist()) == (
        ["EMAIL"],
        ["EMAIL is not a valid email address"],
    )


def test_a_title_line_is_skipped_and_rejects_keep_the_files_line_numbers(tmp_path: Path) -> None:
    path = _csv(
        tmp_path, f"Employee Report 2026-11-01\n\n{HEADER_LINE}\nE1,a@x.org,,Ann,,1\nE2,bad,,Bob,,2\n"
    )

    result = validate_file(path, MAPPING)

    assert result.header_line == 3
    assert result.valid["source_line"].tolist() == [4]
    assert result.rejects["source_line"].tolist() == [5]


def test_a_missing_header_below_a_title_names_the_header_line(tmp_path: Path) -> None:
    path = _csv(tmp_path, "Employee Report\nEmployee ID,Email,Mobile,First Name,Start\nE1,a@x.org,,Ann,\n")

    with pytest.raises(MappingError) as info:
        validate_file(path, MAPPING)

    assert f"{path}: line 2: the feed maps headers the file does not have: grade -> 'Grade'." in str(
        info.value
    )


# --------------------------------------------------------------------------- rejects that explain themselves


def test_a_row_with_the_wrong_field_count_carries_its_id(tmp_path: Path) -> None:
    mapping = FieldMapping(unique_id="ID", email="Email")
    path = _csv(tmp_path, "Name,ID,Email\nAnn,E1,a@x.org\nBob, E2 ,b@x.org,x\nCy\n")

    result = validate_file(path, mapping)

    assert result.rejects[["source_line", "unique_id"]].values.tolist() == [[3, "E2"], [4, ""]]


def test_reject_values_are_shown_as_the_file_wrote_them(tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        f"{HEADER_LINE}\n"
        "E1,Bad@Example,,Ann,,1\n"
        "E2,B@X.ORG,(212) 555-01,Bob,,2\n"  # the email is fine (lower-cased); the phone is not
        '"E1 ",c@x.org,,Cy,,3\n'  # a duplicate, written with a trailing space
        "E4,  d@x.org  ,,Di,,+4x\n",
    )

    result = validate_file(path, MAPPING)

    assert result.valid["unique_id"].tolist() == ["E2"]  # kept without the phone: a warning
    assert result.rejects["value"].tolist() == ["Bad@Example", "E1 ", "+4x"]
    assert result.rejects["unique_id"].tolist() == ["E1", "E1", "E4"]
    assert result.warnings[["unique_id", "value"]].values.tolist() == [["E2", "(212) 555-01"]]


def test_a_repeated_header_row_and_a_footer_are_rejected_as_what_they_are(tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        f"{HEADER_LINE}\nE1,a@x.org,,Ann,,1\n{HEADER_LINE}\nE2,b@x.org,,Bob,,2\n"
        "\nTotal: 2\nEnd of report,,,,,\n",
    )

    result = validate_file(path, MAPPING)

    assert result.valid["source_line"].tolist() == [2, 4]
    assert result.source_rows == 5
    assert result.rejects[["source_line", "unique_id", "value"]].values.tolist() == [
        [3, "", HEADER_LINE],
        [6, "", "Total: 2"],
        [7, "", "End of report,,,,,"],
    ]
    assert result.rejects["reason"].tolist() == [
        "repeated header row: the header line again (two exports joined?), not an employee",
        "footer line below the data (a total or end-of-report line), not an employee",
        "footer line below the data (a total or end-of-report line), not an employee",
    ]


def test_a_nul_byte_rejects_only_its_row_naming_the_column(tmp_path: Path) -> None:
    path = _csv(
        tmp_path, f"{HEADER_LINE}\nE1,a@x.org,,Ann,,1\nE2,b\x00@x.org,,Bob,,2\nE3,c@x.org,,Cy,,3\n".encode()
    )

    result = validate_file(path, MAPPING)

    assert result.valid["source_line"].tolist() == [2, 4]
    [reject] = result.rejects.to_dict("records")
    assert reject == {
        "source_line": 3,
        "unique_id": "E2",
        "column": "Email",
        "value": "b\\x00@x.org",
        "reason": "Email contains a NUL byte (shown as \\x00), a control character no value may hold; "
        "fix it in the HR system and export again",
    }


def test_an_id_in_excel_scientific_notation_is_rejected_saying_the_id_is_lost(tmp_path: Path) -> None:
    ids = ["1.0E+5", "1.00001E+5", "1.23E+10", "1,23E+10", "12E3", "E1"]
    rows = "".join(f'"{i}",u{n}@x.org,,A,,1\n' for n, i in enumerate(ids))
    path = _csv(tmp_path, f"{HEADER_LINE}\n{rows}")

    result = validate_file(path, MAPPING)

    assert result.valid["unique_id"].tolist() == ["12E3", "E1"]
    assert result.rejects["unique_id"].tolist() == ids[:4]
    assert result.rejects["reason"].iloc[2] == (
        "Employee ID 1.23E+10 is in Excel's scientific notation: Excel rounded the number and the "
        "original id is lost; re-export with the column formatted as text"
    )


def test_invisible_characters_are_stripped_from_ids_and_emails_but_not_names(tmp_path: Path) -> None:
    zwsp, zwj, joiner, bom, shy = "\u200b", "\u200d", "\u2060", "\ufeff", "\u00ad"
    path = _csv(
        tmp_path,
        f"{HEADER_LINE}\n"
        f"E1{zwsp},a{shy}@x.org{bom},,An{zwj}n,,1\n"
        f"{joiner}E2,b@x{zwsp}.org,,Bob,,2\n"
        f"E{bom}1,c@x.org,,Cy,,3\n",
    )

    result = validate_file(path, MAPPING)

    assert result.valid["unique_id"].tolist() == ["E1", "E2"]
    assert result.valid["email"].tolist() == ["a@x.org", "b@x.org"]
    assert result.valid["first_name"].tolist() == [f"An{zwj}n", "Bob"]
    assert result.rejects["reason"].tolist() == ["Employee ID duplicates a value first seen on line 2"]

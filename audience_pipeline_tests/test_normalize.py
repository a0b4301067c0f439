"""Header mapping and value normalisation: what a valid row looks like before the schema sees it.

Phone numbers are compared with ``phonenumbers`` itself: the vectorised rules must give the
same E.164 text the library gives, on national, international, ``00``-prefixed, extension and
garbage input of several regions (``test_phones.py`` tests the rules themselves).
"""

from __future__ import annotations

import datetime as dt
import random
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import phonenumbers
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from audience_pipeline.csv_reader import ParsedCsv
from audience_pipeline.feeds.model import FieldMapping
from audience_pipeline.normalize import (
    E164_PATTERN,
    MappingError,
    _trim_candidates,
    e164_mask,
    iso_date_mask,
    normalize,
    normalize_phones,
    parse_dates,
)

REGIONS = ("US", "GB", "DE", "FR")


def parsed_csv(columns: dict[str, list[str]], lines: list[int] | None = None) -> ParsedCsv:
    """What ``read_csv`` returns: string columns, empty cells as "" (never null)."""
    rows = len(next(iter(columns.values())))
    table = pa.table({h: pa.array(v, type=pa.string()) for h, v in columns.items()})
    source_line = np.asarray(lines if lines is not None else range(2, rows + 2), dtype=np.int64)
    return ParsedCsv(Path("/drop/employees.csv"), list(columns), table, source_line, "utf-8", ",")


def strings(values: list[str | None]) -> pa.ChunkedArray:
    return pa.chunked_array([pa.array(values, type=pa.large_string())])


# --------------------------------------------------------------------------- frame shape


def test_frame_has_source_line_and_canonical_columns_in_mapping_order() -> None:
    parsed = parsed_csv(
        {"Dept": ["HR", ""], "Mail": ["a@x.org", "b@x.org"], "ID": ["E1", "E2"]}, lines=[2, 5]
    )
    mapping = FieldMapping(unique_id="ID", email="Mail", attributes={"department": "Dept"})

    frame = normalize(parsed, mapping)

    assert list(frame.columns) == ["source_line", "unique_id", "email", "department"]
    assert frame["source_line"].dtype == "int64"
    assert frame["source_line"].tolist() == [2, 5]
    for column in ("unique_id", "email", "department"):
        assert isinstance(frame[column].dtype, pd.StringDtype)
        assert frame[column].dtype.storage == "pyarrow"
    assert frame["department"].isna().tolist() == [False, True]


def test_trims_whitespace_and_turns_line_breaks_inside_values_into_spaces() -> None:
    parsed = parsed_csv(
        {
            "ID": ["  E1\t", "E2\u00a0", "\u3000E3", "E4"],
            "Mail": ["a@x.org", "b@x.org", "c@x.org", "d@x.org"],
            "Name": ["Ann\nMarie", "Bob \r\n  Lee", "  Line1\r\n\r\nLine2 \n", " \n "],
        }
    )
    mapping = FieldMapping(unique_id="ID", email="Mail", first_name="Name")

    frame = normalize(parsed, mapping)

    assert frame["unique_id"].tolist() == ["E1", "E2", "E3", "E4"]
    assert frame["first_name"].tolist()[:3] == ["Ann Marie", "Bob Lee", "Line1 Line2"]
    assert pd.isna(frame["first_name"].iloc[3])  # only whitespace: an empty cell


def test_blank_and_whitespace_only_cells_become_null() -> None:
    parsed = parsed_csv({"ID": ["E1", "", "   "], "Mail": ["", " ", "c@x.org"]})

    frame = normalize(parsed, FieldMapping(unique_id="ID", email="Mail"))

    assert frame["unique_id"].isna().tolist() == [False, True, True]
    assert frame["email"].isna().tolist() == [True, True, False]


def test_placeholders_are_empty_cells_in_every_column() -> None:
    """``n/a``, ``-``, ``none``, ``null``, ``#N/A``, ``unknown``: any case, after trimming; text that
    only starts like one is kept."""
    parsed = parsed_csv(
        {
            "ID": ["E1", " N/A ", "E3", "-", "E5"],
            "Mail": ["a@x.org", "b@x.org", "none", "NULL", "e@x.org"],
            "Phone": ["n/a", "-", " #N/A", "Unknown", "--"],
            "Dept": ["unknown", "Nonesuch", "n/a2", "None ", "Null Island"],
        }
    )
    mapping = FieldMapping(unique_id="ID", email="Mail", mobile_phone="Phone", attributes={"dept": "Dept"})

    frame = normalize(parsed, mapping)

    assert frame["unique_id"].isna().tolist() == [False, True, False, True, False]
    assert frame["email"].isna().tolist() == [False, False, True, True, False]
    assert frame["mobile_phone"].isna().tolist() == [True, True, True, True, False]
    assert frame["dept"].tolist()[1:3] == ["Nonesuch", "n/a2"]
    assert frame["dept"].isna().tolist() == [True, False, False, True, False]


def test_trim_candidates_flag_every_value_the_trim_kernel_changes() -> None:
    """The byte tables behind the "nothing to trim" shortcut, checked for every code point."""
    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    for values in (pa.array([f"{c}x" for c in chars]), pa.array([f"x{c}" for c in chars])):
        changed = pc.not_equal(pc.utf8_trim_whitespace(values), values).to_numpy(zero_copy_only=False)
        missed = changed & ~_trim_candidates(values)
        assert not missed.any(), [hex(ord(c)) for c in np.asarray(chars, dtype=object)[missed][:5]]


def test_emails_are_lower_cased() -> None:
    parsed = parsed_csv({"ID": ["E1", "E2"], "Mail": [" Ann.Lee@Example.COM ", "ÉLODIE@X.FR"]})

    frame = normalize(parsed, FieldMapping(unique_id="ID", email="Mail"))

    assert frame["email"].tolist() == ["ann.lee@example.com", "élodie@x.fr"]


def test_a_header_can_feed_two_fields_with_release() -> None:
    parsed = parsed_csv({"ID": ["E1", "E2"], "Mail": ["A@X.ORG", "b@x.org"]})
    mapping = FieldMapping(unique_id="ID", email="Mail", attributes={"login": "Mail", "badge": "ID"})

    frame = normalize(parsed, mapping, release=True)

    assert frame["email"].tolist() == ["a@x.org", "b@x.org"]
    assert frame["login"].tolist() == ["A@X.ORG", "b@x.org"]  # an attribute: not lower-cased
    assert frame["badge"].tolist() == ["E1", "E2"]


def test_release_drops_only_the_mapped_raw_columns_and_gives_the_same_frame() -> None:
    columns = {
        "ID": ["E1", " E2 "],
        "Mail": ["A@X.ORG", ""],
        "Phone": ["(212) 555-0100", ""],
        "Extra": ["x", "y"],
    }
    mapping = FieldMapping(unique_id="ID", email="Mail", mobile_phone="Phone")
    kept, released = parsed_csv(columns), parsed_csv(columns)

    expected = normalize(kept, mapping)
    got = normalize(released, mapping, release=True)

    pd.testing.assert_frame_equal(got, expected)
    assert kept.table.column_names == ["ID", "Mail", "Phone", "Extra"]
    assert released.table.column_names == ["Extra"]


# --------------------------------------------------------------------------- mapping errors


def test_missing_header_names_field_file_line_and_closest_header() -> None:
    parsed = parsed_csv({"Employee ID": ["E1"], "Email": ["a@x.org"], "Mobile Phone": ["+12125550100"]})
    mapping = FieldMapping(unique_id="Employee Id", email="E-mail", mobile_phone="Mobile Phone")

    with pytest.raises(MappingError) as caught:
        normalize(parsed, mapping)

    message = str(caught.value)
    assert message.startswith("/drop/employees.csv: line 1: ")
    assert "unique_id -> 'Employee Id' (did you mean 'Employee ID'?)" in message
    assert "email -> 'E-mail' (did you mean 'Email'?)" in message
    assert "mobile_phone" not in message.split("Headers in the file")[0]
    assert "Headers in the file: 'Employee ID', 'Email', 'Mobile Phone'" in message


def test_missing_header_without_a_close_match_has_no_hint() -> None:
    parsed = parsed_csv({"ID": ["E1"], "Mail": ["a@x.org"]})
    mapping = FieldMapping(unique_id="ID", email="Mail", attributes={"cost_centre": "Kostenstelle"})

    with pytest.raises(MappingError, match=r"cost_centre -> 'Kostenstelle'\. Headers") as caught:
        normalize(parsed, mapping)

    assert "did you mean" not in str(caught.value)
    assert parsed.table.num_columns == 2  # nothing was released before the check


# --------------------------------------------------------------------------- phones


def _pn_e164(value: str, region: str) -> str | None:
    """``phonenumbers``' answer: E.164 of a valid number, else None (``00`` read as ``+``)."""
    text = "+" + value[2:] if value.startswith("00") else value
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)


def _phone_sample(region: str) -> list[str]:
    """Valid numbers of several regions in every format, ``00`` variants, extensions, near misses."""
    rng = random.Random(f"phones-{region}")
    out = [
        "garbage",
        "n/a",
        "12",
        "+",
        "00",
        "0",
        "tel",
        "ext. 12",
        "+1 (212) 555-0100",
        "(212) 555-0100",
        "212.555.0100",
        "212-555-0100 x12",
        "1-212-555-0100",
        "011 44 20 7946 0958",
        "020 7946 0958",
        "(0)20 7946 0958",
        "+44 (0)20 7946 0958",
        "0044 (0)20 7946 0958",
        "0044 20 7946 0958 ext. 5",
        "+33 (0)1 23 45 67 89",
        "01 23 45 67 89",
        "+49 (0)30 123456",
        "030 123456",
        "0151 23456789",
        "+39 06 1234 5678",
        "０２１２５５５０１００",  # full-width digits
        "+1 212 555 0100 ext. 5",
        "+44 20 7946 0958#12",
    ]
    for other in (region, "US", "GB", "DE", "FR", "IT", "CH"):
        for kind in (
            PhoneNumberType.FIXED_LINE,
            PhoneNumberType.MOBILE,
            PhoneNumberType.TOLL_FREE,
            PhoneNumberType.PREMIUM_RATE,
            PhoneNumberType.VOIP,
            PhoneNumberType.PERSONAL_NUMBER,
            PhoneNumberType.UAN,
        ):
            example = phonenumbers.example_number_for_type(other, kind)
            if example is None:
                continue
            for fmt in (
                PhoneNumberFormat.NATIONAL,
                PhoneNumberFormat.INTERNATIONAL,
                PhoneNumberFormat.E164,
                PhoneNumberFormat.RFC3966,
            ):
                text = phonenumbers.format_number(example, fmt)
                digits = re.sub(r"\D", "", text)
                i = rng.randrange(1, len(digits))
                out += [
                    text,
                    text.replace("+", "00", 1),
                    f"{text} ext. 12",
                    digits,
                    digits[:i] + digits[i + 1 :],
                    digits[:i] + str(rng.randrange(10)) + digits[i:],
                ]
    return out


@pytest.mark.parametrize("region", REGIONS)
def test_phones_agree_with_phonenumbers(region: str) -> None:
    """Every number phonenumbers reads as valid comes out as its E.164; anything else is kept as
    written, E.164-shaped or not (a +1 number with an unassigned area code is not trusted)."""
    sample = _phone_sample(region)

    got = normalize_phones(strings(sample), region).to_pylist()

    assert got == [_pn_e164(value, region) or value for value in sample]


def test_national_numbers_of_the_region_skip_phonenumbers(per_row_phones: list[str]) -> None:
    """The slow per-value path only sees what the vectorised rules cannot settle."""
    values = ["(212) 555-0100", "212.555.0100", "+1 212 555 0100", "0044 20 7946 0958", "+44 20 7946 0958#1"]

    got = normalize_phones(strings(values), "US").to_pylist()

    assert got == ["+12125550100", "+12125550100", "+12125550100", "+442079460958", "+442079460958"]
    assert per_row_phones == ["+44 20 7946 0958#1"]


@pytest.mark.parametrize(
    ("value", "region", "expected"),
    [
        ("(212) 555-0100", "US", "+12125550100"),
        ("020 7946 0958", "GB", "+442079460958"),
        ("07400 123456", "GB", "+447400123456"),
        ("030 123456", "DE", "+4930123456"),
        ("0151 23456789", "DE", "+4915123456789"),
        ("01 23 45 67 89", "FR", "+33123456789"),
        ("06 12 34 56 78", "FR", "+33612345678"),
        ("0044 20 7946 0958", "US", "+442079460958"),
        ("+44 (0)20 7946 0958", "US", "+442079460958"),
        ("0044 (0)20 7946 0958", "DE", "+442079460958"),
        ("+39 06 1234 5678", "US", "+390612345678"),  # Italy keeps the leading 0
        ("+1 212 555 0100 ext. 5", "GB", "+12125550100"),
        ("not a phone", "US", "not a phone"),
        ("555-0100", "US", "555-0100"),  # no area code: kept for the schema to reject
        ("(687) 207-0030", "US", "(687) 207-0030"),  # 687 is not an assigned area code
        ("+1 687 207 0030", "US", "+1 687 207 0030"),  # nor when written internationally
        ("+16872070030", "US", "+16872070030"),  # nor in E.164
        ("+44 020 7946 0958", "US", "+442079460958"),  # the trunk 0 is dropped, as phonenumbers does
        ("+4402079460958", "US", "+442079460958"),
    ],
)
def test_phone_examples(value: str, region: str, expected: str) -> None:
    parsed = parsed_csv({"ID": ["E1"], "Phone": [f" {value} "]})

    frame = normalize(parsed, FieldMapping(unique_id="ID", mobile_phone="Phone"), default_region=region)

    assert frame["mobile_phone"].tolist() == [expected]


def test_e164_values_and_nulls_are_left_alone() -> None:
    values = strings(["+12125550100", None, "+442079460958"])

    assert normalize_phones(values, "US").to_pylist() == ["+12125550100", None, "+442079460958"]


def test_e164_mask_matches_the_pattern_across_chunks_and_slices() -> None:
    rng = random.Random(3)
    alphabet = "+0123456789 -x"
    values = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24))) for _ in range(3000)] + [
        "+12125550100",
        "+123",
        "+12",
        "+12345678901234567890",
        "+123456789012345678901",
        "+0123456789",
    ]
    values = [None if i % 97 == 0 else v for i, v in enumerate(values)]
    expected = np.array([v is not None and re.fullmatch(E164_PATTERN, v) is not None for v in values])
    whole = pa.array(values, type=pa.large_string())
    chunked = pa.chunked_array([whole.slice(0, 1000), whole.slice(1000, 7), whole.slice(1007)])

    assert (e164_mask(whole) == expected).all()
    assert (e164_mask(chunked) == expected).all()
    assert (e164_mask(pa.array(values, type=pa.string()).slice(5)) == expected[5:]).all()


# --------------------------------------------------------------------------- dates


def _is_iso_date(value: str | None) -> bool:
    if value is None or not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        return False
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        return False
    return True


def test_iso_date_mask_agrees_with_the_calendar() -> None:
    rng = random.Random(11)
    values: list[str | None] = [
        f"{rng.randrange(1, 10000):04d}-{rng.randrange(0, 14):02d}-{rng.randrange(0, 33):02d}"
        for _ in range(20000)
    ]
    values += ["2020-02-29", "2021-02-29", "1900-02-29", "2000-02-29", "2021-1-01", "2021/01/01"]
    values += ["２０２１-01-01", "2021-01-1 ", " 2021-01-01", "20210101", "", None, "abcd-ef-gh"]

    got = iso_date_mask(pa.chunked_array([pa.array(values[:7000]), pa.array(values[7000:])]))

    assert got.tolist() == [_is_iso_date(v) for v in values]


def test_iso_dates_are_kept_and_impossible_dates_left_for_the_schema() -> None:
    parsed = parsed_csv(
        {
            "ID": ["E1", "E2", "E3", "E4"],
            "Mail": ["a@x.org"] * 4,
            "Start": ["2024-02-29", "2023-02-29", " 2021-12-01 ", ""],
        }
    )
    mapping = FieldMapping(
        unique_id="ID", email="Mail", attributes={"start": {"header": "Start", "type": "date"}}
    )

    frame = normalize(parsed, mapping)

    assert frame["start"].tolist()[:3] == ["2024-02-29", "2023-02-29", "2021-12-01"]
    assert pd.isna(frame["start"].iloc[3])


def test_custom_date_format_is_written_as_iso() -> None:
    written = [
        "31/12/2021",
        "1/2/2021",
        "29/02/2024",
        "31/02/2021",
        "29/02/2023",
        "2021-12-31",
        "12/31/2021",
        "soon",
    ]
    parsed = parsed_csv(
        {"ID": [f"E{i}" for i in range(len(written))], "Mail": ["a@x.org"] * len(written), "Hired": written}
    )
    spec = {"header": "Hired", "type": "date", "format": "%d/%m/%Y"}

    frame = normalize(parsed, FieldMapping(unique_id="ID", email="Mail", attributes={"hired": spec}))

    assert frame["hired"].tolist() == [
        "2021-12-31",
        "2021-02-01",
        "2024-02-29",
        "31/02/2021",  # impossible: kept as written, so the report shows it
        "29/02/2023",
        "2021-12-31",  # already ISO
        "12/31/2021",
        "soon",
    ]


def test_parse_dates_refuses_rolled_over_dates() -> None:
    values = pa.array(["31/02/2021", "30/02/2020", "28/02/2021", "5 feb 2021", None])

    assert parse_dates(values, "%d/%m/%Y").to_pylist() == [None, None, dt.datetime(2021, 2, 28), None, None]
    assert parse_dates(pa.array(["5 feb 2021", "05 Feb 2021", "31 Feb 2021"]), "%d %b %Y").to_pylist() == [
        dt.datetime(2021, 2, 5),
        dt.datetime(2021, 2, 5),
        None,
    ]
    assert parse_dates(pa.array(["2021-02-28", "2021-02-29"]), None).to_pylist() == [
        dt.datetime(2021, 2, 28),
        None,
    ]


# --------------------------------------------------------------------------- booleans and numbers


def test_booleans_integers_and_numbers() -> None:
    parsed = parsed_csv(
        {
            "ID": [f"E{i}" for i in range(6)],
            "Mail": ["a@x.org"] * 6,
            "Active": ["Yes", " n ", "TRUE", "0", "maybe", ""],
            "Age": ["+42", "-3", "007", "1,000", "4.0", ""],
            "Score": ["+1.5", "-.5", "1e3", "1.", "abc", ""],
        }
    )
    mapping = FieldMapping(
        unique_id="ID",
        email="Mail",
        attributes={
            "active": {"header": "Active", "type": "boolean"},
            "age": {"header": "Age", "type": "integer"},
            "score": {"header": "Score", "type": "number"},
        },
    )

    frame = normalize(parsed, mapping)

    assert frame["active"].tolist()[:5] == ["true", "false", "true", "false", "maybe"]
    assert frame["age"].tolist()[:5] == ["42", "-3", "007", "1,000", "4.0"]
    assert frame["score"].tolist()[:5] == ["1.5", "-.5", "1e3", "1.", "abc"]
    assert frame[["active", "age", "score"]].iloc[5].isna().all()

"""The pandera schema of the normalised employee record: one rule at a time, lazily collected."""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa
import pytest

from audience_pipeline.feeds.model import FieldMapping
from audience_pipeline.schemas.employee import MAX_TEXT_LENGTH, REASONS, employee_schema, first_seen_index

MAPPING = FieldMapping(
    unique_id="Employee ID",
    email="Email",
    mobile_phone="Mobile",
    first_name="First",
    last_name="Last",
    attributes={
        "start": {"header": "Start", "type": "date"},
        "age": {"header": "Age", "type": "integer"},
        "fte": {"header": "FTE", "type": "number"},
        "active": {"header": "Active", "type": "boolean"},
        "cost_centre": {"header": "CC", "required": True},
        "note": "Note",
    },
)
GOOD = {
    "unique_id": "E1",
    "email": "ann@example.com",
    "mobile_phone": "+12125550100",
    "first_name": "Ann",
    "last_name": "Lee",
    "start": "2024-02-29",
    "age": "-42",
    "fte": "0.5",
    "active": "true",
    "cost_centre": "CC-1",
    "note": "x" * 1000,  # plain attributes have no length limit
}


def frame(*overrides: dict[str, str | None], columns: dict[str, str | None] | None = None) -> pd.DataFrame:
    """One good row per override (good values elsewhere, ids E0, E1, ...), with the dtypes
    ``normalize`` produces."""
    base = columns or GOOD
    rows = [{**base, "unique_id": f"E{i}", **o} for i, o in enumerate(overrides or [{}])]
    data = {"source_line": pd.Series(range(2, len(rows) + 2), dtype="int64")}
    for name in columns or GOOD:
        data[name] = pd.Series([r[name] for r in rows], dtype="str")
    return pd.DataFrame(data)


def failures(df: pd.DataFrame, mapping: FieldMapping = MAPPING) -> list[tuple[int, str | None, str]]:
    """(row, column or None for the frame-level check, check name), as ``lazy=True`` reports them."""
    try:
        employee_schema(mapping).validate(df, lazy=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
        # a set: the frame-level check reports its row once per column
        return sorted(
            {
                (int(r.index), None if r.schema_context == "DataFrameSchema" else r.column, str(r.check))
                for r in cases.itertuples()
            },
            key=str,
        )
    return []


def test_a_good_row_passes_and_nulls_pass_every_value_check() -> None:
    optional = {
        k: None for k in ("mobile_phone", "first_name", "last_name", "start", "age", "fte", "active", "note")
    }

    assert failures(frame({}, optional)) == []


@pytest.mark.parametrize(
    ("column", "value", "check"),
    [
        ("unique_id", None, "not_nullable"),
        ("unique_id", "E" * (MAX_TEXT_LENGTH + 1), "text_length"),
        ("email", "ann@example", "email_format"),
        ("email", "Ann@example.com", "email_format"),  # normalize lower-cases; upper case is a bug
        ("email", "ann@@example.com", "email_format"),
        ("email", "ann lee@example.com", "email_format"),
        ("mobile_phone", "2125550100", "e164_phone"),
        ("mobile_phone", "+0212555010", "e164_phone"),
        ("mobile_phone", "+1234567890123456", "e164_phone"),
        ("mobile_phone", "+1 212 555 0100", "e164_phone"),
        ("mobile_phone", "+16872070030", "e164_phone"),  # E.164-shaped, but 687 is not an area code
        ("mobile_phone", "+4402079460958", "e164_phone"),  # valid, but not written as E.164 writes it
        ("first_name", "A" * (MAX_TEXT_LENGTH + 1), "text_length"),
        ("last_name", "é" * (MAX_TEXT_LENGTH + 1), "text_length"),
        ("start", "2023-02-29", "iso_date"),
        ("start", "29/02/2024", "iso_date"),
        ("age", "4.0", "integer"),
        ("age", "1,000", "integer"),
        ("fte", "abc", "number"),
        ("fte", "1.2.3", "number"),
        ("active", "yes", "boolean"),
        ("cost_centre", None, "not_nullable"),
    ],
)
def test_each_rule_names_its_check(column: str, value: str | None, check: str) -> None:
    df = frame({}, {column: value})

    assert failures(df) == [(1, column, check)]
    assert check in REASONS


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("unique_id", "E" * MAX_TEXT_LENGTH),
        ("first_name", "é" * MAX_TEXT_LENGTH),  # characters count, not bytes
        ("email", "o'brien+hr@mail.example-corp.co.uk"),
        ("mobile_phone", "+442079460958"),
        ("mobile_phone", "+390612345678"),  # Italy keeps the leading 0
        ("mobile_phone", "+80012345678"),  # a non-geographic code
        ("age", "007"),
        ("fte", "-.5"),
        ("fte", "1e-3"),
        ("fte", "12."),
        ("active", "false"),
        ("start", "2000-02-29"),
    ],
)
def test_edge_values_that_pass(column: str, value: str) -> None:
    assert failures(frame({}, {column: value})) == []


def test_duplicates_flag_every_later_occurrence_but_not_the_first() -> None:
    df = frame(
        {"unique_id": "E1"},
        {"unique_id": "E2"},
        {"unique_id": "E1"},
        {"unique_id": None},
        {"unique_id": "E1"},
    )

    assert failures(df) == [
        (2, "unique_id", "unique_value"),
        (3, "unique_id", "not_nullable"),
        (4, "unique_id", "unique_value"),
    ]
    assert first_seen_index(df["unique_id"]).tolist() == [0, 1, 0, 3, 0]


def test_a_row_without_email_and_phone_fails_the_frame_check() -> None:
    df = frame({}, {"email": None, "mobile_phone": None}, {"email": None}, {"mobile_phone": None})

    assert failures(df) == [(1, None, "has_channel")]


def test_with_one_channel_mapped_it_is_required() -> None:
    mapping = FieldMapping(unique_id="ID", email="Email")
    columns = {"unique_id": "E1", "email": "a@x.org"}

    assert failures(frame({}, {"email": None}, columns=columns), mapping) == [(1, "email", "not_nullable")]
    assert failures(frame({}, {"email": "A@X.ORG"}, columns=columns), mapping) == [
        (1, "email", "email_format")
    ]


def test_several_problems_in_one_row_are_all_reported() -> None:
    df = frame({}, {"unique_id": None, "email": "bad", "start": "2021-13-01", "active": "maybe"})

    assert failures(df) == [
        (1, "active", "boolean"),
        (1, "email", "email_format"),
        (1, "start", "iso_date"),
        (1, "unique_id", "not_nullable"),
    ]


def test_every_check_the_schema_can_report_has_a_reason() -> None:
    schema = employee_schema(MAPPING)
    names = {"not_nullable"} | {c.name for c in schema.checks}
    for column in schema.columns.values():
        names |= {c.name for c in column.checks}

    assert names <= set(REASONS)
    assert names == set(REASONS)  # and no reason is left without a check


def test_schema_is_strict_about_columns_and_dtypes() -> None:
    """Columns the mapping does not know, or a wrong dtype, are schema errors (no row index):
    they mean a bug upstream, not a bad row, and pandera must not coerce element by element."""
    extra = frame({}).assign(surprise=pd.Series(["x"], dtype="str"))
    missing = frame({}).drop(columns=["note"])
    text_lines = frame({}).astype({"source_line": "str"})

    for df in (extra, missing, text_lines):
        with pytest.raises(pa.errors.SchemaErrors) as caught:
            employee_schema(MAPPING).validate(df, lazy=True)
        assert caught.value.failure_cases["index"].isna().all()

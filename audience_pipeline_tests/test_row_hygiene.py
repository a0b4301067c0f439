"""Records that are not employees (repeated headers, footers) or hold what no value may (NUL,
Excel-rounded ids) are set aside with a reason of their own, and only those."""

from __future__ import annotations

from pathlib import Path

import pytest

from audience_pipeline.csv_reader import read_csv
from audience_pipeline.feeds.model import FieldMapping
from audience_pipeline.row_hygiene import FOOTER_REASON, HEADER_REASON, screen_rows

MAPPING = FieldMapping(unique_id="ID", email="Email", first_name="Name")
HEADER = "ID,Email,Name\n"


def _screen(tmp_path: Path, body: str) -> tuple[list[tuple[int, str]], list[int], list[int]]:
    """(line, reason) of each set-aside record; lines of the rows and malformed rows left."""
    path = tmp_path / "e.csv"
    path.write_text(HEADER + body, "utf-8")
    parsed = read_csv(path)
    before = parsed.source_rows
    rejects = screen_rows(parsed, MAPPING)
    assert parsed.source_rows == before  # set aside, still counted
    pairs = sorted(zip(rejects["source_line"].tolist(), rejects["reason"].tolist(), strict=True))
    return pairs, parsed.source_line.tolist(), [m.line for m in parsed.malformed]


@pytest.mark.parametrize(
    ("footer", "is_footer"),
    [
        ("Total: 2", True),
        ("TOTAL,2,", True),
        ("Record count = 2", True),
        ("End of report", True),
        ("EOF", True),
        ("Generated 2026-11-01 06:00 by Workday", True),
        ("2 employees", True),
        (",,Total 2", True),
        ("E3", False),  # a short row: its id alone, no words
        ("End-1,e@x.org,Eve", False),  # an employee whose id starts like a footer word
        ("Totality,t@x.org,", False),
    ],
)
def test_the_footer_rule(tmp_path: Path, footer: str, is_footer: bool) -> None:
    pairs, rows, malformed = _screen(tmp_path, f"E1,a@x.org,Ann\nE2,b@x.org,Bob\n{footer}\n")

    assert pairs == ([(4, FOOTER_REASON)] if is_footer else [])
    assert rows[:2] == [2, 3]
    assert len(rows) + len(malformed) == (2 if is_footer else 3)


def test_only_the_trailing_block_is_footers(tmp_path: Path) -> None:
    body = "E1,a@x.org,Ann\nTotal: 1\nE2,b@x.org,Bob\n" + "".join(f"Total {i}\n" for i in range(7))

    pairs, rows, malformed = _screen(tmp_path, body)

    assert [line for line, _ in pairs] == [7, 8, 9, 10, 11]  # at most 5, read upwards
    assert rows == [2, 4]
    assert malformed == [3, 5, 6]  # "Total: 1" mid-file stays a field-count reject


def test_a_repeated_header_is_found_as_the_header_line_wrote_it_but_not_half_of_one(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    header = " ID , Email,Name\n"
    path.write_text(
        header + "E1,a@x.org,Ann\n" + header + "ID,Email,Ann\nID,Email,Name\nE2,b@x.org,Bob\n", "utf-8"
    )
    parsed = read_csv(path)

    rejects = screen_rows(parsed, MAPPING)

    assert rejects[["source_line", "value"]].values.tolist() == [
        [3, " ID , Email,Name"],
        [5, "ID,Email,Name"],
    ]
    assert rejects["reason"].tolist() == [HEADER_REASON] * 2
    assert parsed.source_line.tolist() == [2, 4, 6]


def test_a_row_matching_several_rules_gets_the_first(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_bytes(b"ID,Email,Name\nE1,a@x.org,Ann\n1.2E+5,b\x00@x.org,Bob\n")
    parsed = read_csv(path)

    rejects = screen_rows(parsed, MAPPING)

    assert rejects[["source_line", "unique_id", "column"]].values.tolist() == [[3, "1.2E+5", "Email"]]
    assert rejects["reason"].iloc[0].startswith("Email contains a NUL byte")
    assert parsed.table.column("ID").to_pylist() == ["E1"]

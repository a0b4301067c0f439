"""CSV dialects and refusals, on a corpus the tests write byte by byte.

The same logical rows are written in each dialect (encoding, delimiter, line ends, Excel padding,
blank lines); every dialect must give the same valid rows, the same rejects and the same source
lines (shifted only by lines before the header) through ``validation.validate_file``.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from audience_pipeline import csv_reader, encodings
from audience_pipeline.csv_reader import CsvFileError, read_csv
from audience_pipeline.feeds.loader import load_feeds
from audience_pipeline.feeds.model import FieldMapping
from audience_pipeline.validation import validate_file

HEADER = ["Employee ID", "Email", "Mobile Phone", "First Name", "Last Name", "Department", "Start Date"]
MAPPING = FieldMapping(
    unique_id="Employee ID",
    email="Email",
    mobile_phone="Mobile Phone",
    first_name="First Name",
    last_name="Last Name",
    attributes={"department": "Department", "start_date": {"header": "Start Date", "type": "date"}},
)


def rows(*, legacy: str = "Zoë", malformed: bool = True) -> list[list[str]]:
    """Logical rows. Line numbers in a plain file: header 1, rows 2, 3-4 (embedded line break), 5…"""
    out = [
        ["E1", "ann@example.com", "+14155550101", "Ann", "Müller", "Sales", "2020-01-02"],
        [
            "E2",
            "bob@example.com",
            "+14155550102",
            "Bob",
            "O’Brien",
            "Research\nand Development",
            "2021-03-04",
        ],
        [
            "E3",
            "not-an-email",
            "",  # no phone either: nothing left to reach E3, so the row is a reject, not a warning
            legacy,
            "Smith",
            "Ops; North | South, East\tWest",
            "2019-05-06",
        ],
        ["E4", "dee@example.com", "", "Dee", "Núñez", 'Say "hi"', "2018-07-08"],
        ["E1", "eve@example.com", "+14155550105", "Eve", "Lee", "Sales", "2017-09-10"],
    ]
    if malformed:
        out.append(["E6", "fay@example.com", "+14155550106"])
    out.append(["E7", "gus@example.com", "+14155550107", "Gus", "Été", "–", "2016-11-12"])
    return out


#: the plain file's lines for the rows above: E3 has a bad email, the second E1 is a duplicate,
#: E6 has 3 fields
VALID_LINES = [2, 3, 6, 9]
REJECT_LINES = [5, 7, 8]


def write(
    rows_: list[list[str]],
    *,
    delimiter: str = ",",
    newline: str = "\n",
    encoding: str = "utf-8",
    bom: bytes = b"",
    pad: int = 0,
    before: str = "",
    after: str = "",
) -> bytes:
    """CSV bytes: ``pad`` empty columns on every line (Excel), ``before``/``after`` the records."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator=newline)
    for record in [HEADER, *rows_]:
        writer.writerow(record + [""] * pad)
    return bom + (before + buffer.getvalue() + after).encode(encoding)


@dataclass(frozen=True)
class Dialect:
    name: str
    build: Callable[[list[list[str]]], bytes]
    encoding: str
    delimiter: str
    lines_before: int = 0
    padding: int = 0


DIALECTS = [
    Dialect("utf8-lf", lambda r: write(r), "utf-8", ","),
    Dialect("excel-csv-utf8", lambda r: write(r, newline="\r\n", bom=codecs.BOM_UTF8), "utf-8-sig", ","),
    Dialect(
        "excel-unicode-text",
        lambda r: write(r, delimiter="\t", newline="\r\n", encoding="utf-16-le", bom=codecs.BOM_UTF16_LE),
        "utf-16-le",
        "\t",
    ),
    Dialect(
        "utf16-be",
        lambda r: write(r, delimiter="\t", encoding="utf-16-be", bom=codecs.BOM_UTF16_BE),
        "utf-16-be",
        "\t",
    ),
    Dialect("utf16-le-no-bom", lambda r: write(r, delimiter="\t", encoding="utf-16-le"), "utf-16-le", "\t"),
    Dialect(
        "excel-csv-windows-1252",
        lambda r: write(r, delimiter=";", newline="\r\n", encoding="cp1252"),
        "windows-1252",
        ";",
    ),
    Dialect("mac-excel-lone-cr", lambda r: write(_cr_only(r), newline="\r"), "utf-8", ","),
    Dialect(
        "excel-padded-blank-lines",
        lambda r: write(r, newline="\r\n", pad=3, before="\r\n,,,,,,,,,\r\n", after=",,,,,,,,,\r\n\r\n"),
        "utf-8",
        ",",
        lines_before=2,
        padding=3,
    ),
    Dialect("sep-hint", lambda r: write(r, delimiter="|", before="sep=|\n"), "utf-8", "|", lines_before=1),
    Dialect("pipe-trailing-blank-lines", lambda r: write(r, delimiter="|", after="\n\n\n"), "utf-8", "|"),
    Dialect("utf32", lambda r: write(r, encoding="utf-32"), "utf-32-le", ","),
]


def _cr_only(rows_: list[list[str]]) -> list[list[str]]:
    """Classic Mac files end lines with CR, inside values too."""
    return [[v.replace("\n", "\r") for v in r] for r in rows_]


def _file(tmp_path: Path, content: bytes, name: str = "export.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory):
    path = _file(tmp_path_factory.mktemp("baseline"), write(rows()))
    return validate_file(path, MAPPING)


def test_baseline_lines_and_rejects(baseline) -> None:
    assert baseline.source_rows == 7
    assert baseline.valid["source_line"].tolist() == VALID_LINES
    assert baseline.rejects["source_line"].tolist() == REJECT_LINES
    assert baseline.rejects["reason"].tolist()[2] == "row has 3 fields, the header has 7"
    assert baseline.valid["last_name"].tolist() == ["Müller", "O’Brien", "Núñez", "Été"]
    assert baseline.valid["department"].tolist()[1] == "Research and Development"


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_every_dialect_gives_the_same_rows_lines_and_rejects(
    tmp_path: Path, dialect: Dialect, baseline
) -> None:
    path = _file(tmp_path, dialect.build(rows()))

    result = validate_file(path, MAPPING)

    assert (result.encoding, result.delimiter) == (dialect.encoding, dialect.delimiter)
    assert result.source_rows == baseline.source_rows
    shift = dialect.lines_before
    expected_valid = baseline.valid.assign(source_line=baseline.valid["source_line"] + shift)
    pd.testing.assert_frame_equal(result.valid, expected_valid)
    expected_rejects = baseline.rejects.assign(
        source_line=baseline.rejects["source_line"] + shift,
        reason=baseline.rejects["reason"]
        .str.replace(r"line (\d+)", lambda m: f"line {int(m[1]) + shift}", regex=True)
        .str.replace("row has 3 fields", f"row has {3 + dialect.padding} fields"),
    )
    # a malformed row's value is its text as the file has it: the file's delimiter, Excel's padding
    got_rejects = result.rejects.assign(
        value=result.rejects["value"].str.replace(dialect.delimiter, ",").str.rstrip(",")
    )
    pd.testing.assert_frame_equal(got_rejects, expected_rejects)
    assert [p.name for p in tmp_path.iterdir()] == ["export.csv"]  # no transcoded copy left behind


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_clean_files_in_every_dialect_take_the_fast_path(
    tmp_path: Path, dialect: Dialect, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_exact(*args, **kwargs):
        raise AssertionError("the slow exact parser ran")

    path = _file(tmp_path, dialect.build(rows(malformed=False)))
    monkeypatch.setattr(csv_reader, "_exact_parse", no_exact)

    parsed = read_csv(path)

    first = 2 + dialect.lines_before
    assert parsed.source_line.tolist() == [first + n for n in (0, 1, 3, 4, 5, 6)]
    assert parsed.headers == HEADER
    assert parsed.table.column("Department")[1].as_py().replace("\r", "\n") == "Research\nand Development"


def test_latin1_without_c1_bytes_is_reported_as_iso_8859_1(tmp_path: Path) -> None:
    path = _file(tmp_path, write([r for r in rows() if r[0] not in ("E2", "E7")], encoding="latin-1"))

    parsed = read_csv(path)

    assert parsed.encoding == "iso-8859-1"
    assert parsed.table.column("First Name").to_pylist()[:2] == ["Ann", "Zoë"]


def test_windows_1252_bytes_decode_as_windows_1252_not_latin1(tmp_path: Path) -> None:
    # 0x80 € 0x92 ’ 0x85 … 0x96 –: control characters in ISO-8859-1; 0x85 must not break the line
    path = _file(tmp_path, b"Employee ID,Name\r\nE1,O\x92Brien \x80 \x85 \x96\r\nE2,x\x81y\r\n")

    parsed = read_csv(path)

    assert parsed.encoding == "windows-1252"
    assert parsed.table.column("Name").to_pylist() == ["O’Brien € … –", "x\x81y"]
    assert parsed.source_line.tolist() == [2, 3]


def test_windows_1252_after_64_kb_of_ascii_is_still_detected(tmp_path: Path) -> None:
    filler = b"".join(b"E%05d,Smith\n" % i for i in range(8000))
    path = _file(tmp_path, b"Employee ID,Name\n" + filler + b"E99999,O\x92M\xfcller\n")

    parsed = read_csv(path)

    assert parsed.encoding == "windows-1252"
    assert parsed.table.column("Name")[-1].as_py() == "O’Müller"
    assert parsed.source_line[-1] == 8002


def test_large_utf16_file_keeps_lines_across_transcoding_chunks(tmp_path: Path) -> None:
    many = [
        [f"E{i}", f"p{i}@example.com", "", "Zoë", "Nguyễn", "Line\nbreak" if i % 1000 == 0 else "x", ""]
        for i in range(30_000)
    ]
    path = _file(tmp_path, write(many, delimiter="\t", newline="\r\n", encoding="utf-16"))
    assert path.stat().st_size > 2 << 20

    parsed = read_csv(path)

    assert parsed.table.num_rows == 30_000
    assert parsed.source_line[:3].tolist() == [2, 4, 5]
    assert parsed.source_line[-1] == 30_000 + 1 + 30
    assert parsed.table.column("Last Name")[-1].as_py() == "Nguyễn"


def test_excel_padding_short_and_long_rows(tmp_path: Path) -> None:
    # the header names 2 columns and pads 2; Excel stops padding after a while, hands add commas
    content = b"ID,Name,,\r\nE1,Ann,,\r\nE2,Bob\r\nE3,Cy,,,,\r\nE4,Di,note,\r\nE5\r\nE6,Ed,,,x\r\n"
    path = _file(tmp_path, content)

    parsed = read_csv(path)

    assert parsed.headers == ["ID", "Name"]
    assert parsed.table.to_pylist() == [
        {"ID": "E1", "Name": "Ann"},
        {"ID": "E2", "Name": "Bob"},
        {"ID": "E3", "Name": "Cy"},
    ]
    assert parsed.source_line.tolist() == [2, 3, 4]
    assert [(m.line, m.reason) for m in parsed.malformed] == [
        (5, "column 3 has no header name but holds a value"),
        (6, "row has 1 fields, the header has 2"),
        (7, "row has 5 fields, the header has 2"),
    ]
    assert parsed.source_rows == 6


def test_blank_records_are_not_rows(tmp_path: Path) -> None:
    content = b"ID,Name\n\nE1,Ann\n,\n , \nE2,Bob\n\n,\n"
    path = _file(tmp_path, content)

    parsed = read_csv(path)

    assert parsed.table.column("ID").to_pylist() == ["E1", "E2"]
    assert parsed.source_line.tolist() == [3, 6]
    assert parsed.source_rows == 2


def test_wrong_field_counts_are_rejects_with_their_line_in_every_dialect(tmp_path: Path) -> None:
    for dialect in DIALECTS:
        path = _file(tmp_path, dialect.build(rows()), name=f"{dialect.name}.csv")
        parsed = read_csv(path)
        assert [m.line for m in parsed.malformed] == [8 + dialect.lines_before], dialect.name


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "the file is empty"),
        (b"\r\n \n\t\n", "the file is empty"),
        (codecs.BOM_UTF8 + b"\n", "the file is empty (no header line)"),
        (codecs.BOM_UTF16_LE, "the file is empty (no header line)"),
        (b"ID,Name\r\n", "line 1: the file has a header but no data rows"),
        (b"\n\nID,Name\n,\n\n", "line 3: the file has a header but no data rows"),
        (b"ID,Name,ID\nE1,a,b\n", "line 1: duplicate header 'ID' in columns 1 and 3"),
        (b"ID, ,Name\nE1,a,b\n", "line 1, column 2: empty header name"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600), "this is an Excel 97-2003 workbook (.xls)"),
        (b"%PDF-1.7\n%\xe2\xe3", "this is a PDF document"),
        (gzip.compress(b"ID,Name\nE1,a\n"), "this is a gzip-compressed file"),
        (b"PK\x03\x04 not really a zip", "this is a ZIP archive (an .xlsx workbook is one)"),
        (b"<html><body><table><tr><td>ID</td></tr></table>", "this is an HTML page"),
        (
            b'<?xml version="1.0"?>\n<Workbook xmlns="urn:schemas-microsoft-com:office:spreadsheet">',
            "this is an Excel 2003 XML spreadsheet",
        ),
        (
            b"\x00\x01\x02\x03binary\x00\xff\x10",
            "this is a binary file (it contains NUL bytes, the first on line 1, byte 1 of the line)",
        ),
        (
            b"ID,Name\nE1,a\n" + b"\x00" * 600,
            "this is a binary file (it contains NUL bytes, the first on line 3, byte 1 of the line)",
        ),
        (
            b"ID,Name\nE1,\xc3\xa9\nE2,\xe9\n",
            "line 3, byte 4 of the line: not valid UTF-8 (byte 0xe9), after text",
        ),
        (codecs.BOM_UTF8 + b"ID,Name\nE1,a\nE2,\xe9\n", "line 3, byte 4 of the line: not valid UTF-8"),
        (
            b'ID,Name\nE1,a\nE2,"Smith\nE3,b\nE4,c\n',
            "line 3: a quoted value opened on this line is never closed",
        ),
        (b'ID,Name\nE1,"Smith\nE3,b\nE4,c', "line 2: a quoted value opened on this line is never closed"),
        (b'ID,Name\nE1,a\n"E2,Smith\nE3,b\n', "line 3: a quoted value opened on this line is never closed"),
        (
            codecs.BOM_UTF16_LE + "ID\tName\nE1\tx\n".encode("utf-16-le") + b"\x00",
            "not valid utf-16-le (truncated data)",
        ),
        (b"x" * 70_000 + b"\nE1\n", "line 1 is longer than 64 kB; this is not a CSV export"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_refusals_name_the_file_and_the_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    path = _file(tmp_path, content, name="hr-export.csv")

    with pytest.raises(CsvFileError) as info:
        read_csv(path)

    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert reason in message, message


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("members", "what"),
    [
        (
            {"[Content_Types].xml": b"<Types/>", "xl/workbook.xml": b"<workbook/>"},
            "an Excel workbook (.xlsx)",
        ),
        (
            {"mimetype": b"application/vnd.oasis.opendocument.spreadsheet", "content.xml": b"<x/>"},
            "an OpenDocument spreadsheet (.ods)",
        ),
        ({"employees.csv": b"ID,Name\n"}, "a ZIP archive holding 'employees.csv'"),
    ],
)
def test_zip_based_files_are_named(tmp_path: Path, members: dict[str, bytes], what: str) -> None:
    path = _file(tmp_path, _zip(members), name="employees.csv")

    with pytest.raises(CsvFileError, match="not a CSV file; export it as CSV") as info:
        read_csv(path)

    assert str(info.value) == f"{path}: this is {what}, not a CSV file; export it as CSV (UTF-8)"


def test_a_file_over_the_size_limit_is_refused_before_reading(tmp_path: Path) -> None:
    path = _file(tmp_path, write(rows()))

    with pytest.raises(CsvFileError) as info:
        validate_file(path, MAPPING, max_file_bytes=100)

    size = path.stat().st_size
    assert str(info.value) == (
        f"{path}: the file is {size} bytes, over the feed's limit of 100 bytes (max_file_bytes: 100)"
    )
    assert validate_file(path, MAPPING, max_file_bytes=path.stat().st_size).source_rows == 7


def test_header_only_file_is_an_empty_audience_when_the_feed_allows_it(tmp_path: Path) -> None:
    path = _file(tmp_path, write([], newline="\r\n", pad=2, after=",,,,,,,,,\r\n"))

    with pytest.raises(CsvFileError, match="allow_empty: true"):
        validate_file(path, MAPPING)
    result = validate_file(path, MAPPING, allow_empty=True)

    assert (result.source_rows, len(result.valid), len(result.rejects)) == (0, 0, 0)
    assert list(result.valid.columns) == ["source_line", *MAPPING.output_columns()]


def test_a_file_of_only_malformed_rows_is_not_empty(tmp_path: Path) -> None:
    path = _file(tmp_path, b"ID,Name\nE1\n")

    parsed = read_csv(path)

    assert parsed.source_rows == 1 and parsed.malformed[0].line == 2


def test_explicit_delimiter_wins_over_sniffing(tmp_path: Path) -> None:
    path = _file(tmp_path, b"ID;Name,Full\nE1;Ann,Lee\n")

    assert read_csv(path, delimiter=";").table.to_pylist() == [{"ID": "E1", "Name,Full": "Ann,Lee"}]


def test_a_read_only_folder_transcodes_into_the_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    path = _file(folder, write(rows(), encoding="cp1252"))
    made: list[str] = []

    def mkstemp(*, prefix: str, suffix: str, dir: str | None = None) -> tuple[int, str]:
        if dir is not None:
            raise PermissionError(13, "Permission denied")
        fd, name = real_mkstemp(prefix=prefix, suffix=suffix)
        made.append(name)
        return fd, name

    real_mkstemp = encodings.tempfile.mkstemp
    monkeypatch.setattr(encodings.tempfile, "mkstemp", mkstemp)

    parsed = read_csv(path)

    assert len(made) == 1 and not Path(made[0]).exists()
    assert parsed.encoding == "windows-1252" and parsed.path == path
    assert [p.name for p in folder.iterdir()] == ["export.csv"]


def test_feed_options_for_files_load_with_defaults(tmp_path: Path) -> None:
    feeds_file = tmp_path / "feeds.yaml"
    feeds_file.write_text(
        "sources: {drop: {type: folder, path: in}}\n"
        "destinations: {cxi: {type: communicate_xi, base_url: http://x, api_key: '${CXI_API_KEY}'}}\n"
        "feeds:\n"
        "  - {name: a, source: drop, destination: cxi, mapping: {unique_id: ID, email: E},\n"
        "     options: {import_name: A}}\n"
        "  - {name: b, source: drop, destination: cxi, mapping: {unique_id: ID, email: E},\n"
        "     options: {import_name: B}, allow_empty: true, max_file_bytes: 1000}\n",
        "utf-8",
    )

    a, b = load_feeds(feeds_file).feeds

    assert (a.allow_empty, a.max_file_bytes) == (False, csv_reader.DEFAULT_MAX_FILE_BYTES)
    assert (b.allow_empty, b.max_file_bytes) == (True, 1000)


# --------------------------------------------------------------------------- headers as people write them


def test_mapped_headers_match_ignoring_case_spacing_and_invisible_characters(tmp_path: Path) -> None:
    path = _file(
        tmp_path, "EMPLOYEE ID,E-mail,email , First  Name,\u200bDept\nE1,x,a@x.org,Ann,HR\n".encode()
    )

    parsed = read_csv(path, mapped_headers=["Employee ID", "Email", "First Name", "Dept", "E-mail"])

    assert parsed.headers == ["EMPLOYEE ID", "E-mail", "email", "First  Name", "\u200bDept"]
    assert parsed.header_matches == {
        "Employee ID": "EMPLOYEE ID",
        "Email": "email",
        "First Name": "First  Name",
        "Dept": "\u200bDept",
    }


def test_an_ambiguous_header_is_refused_naming_the_candidates(tmp_path: Path) -> None:
    path = _file(tmp_path, b"ID,EMAIL,email \nE1,a@x.org,b@x.org\n")

    with pytest.raises(CsvFileError) as info:
        read_csv(path, mapped_headers=["ID", "Email"])

    assert str(info.value) == (
        f"{path}: line 1: the feed's header 'Email' matches 2 headers of the file when case and spacing "
        "are ignored: 'EMAIL' (column 2), 'email' (column 3); rename the extra column or map the exact header"
    )
    # an exact match is never ambiguous
    assert (
        read_csv(
            _file(tmp_path, b"ID,Email,EMAIL\nE1,a,b\n", "x.csv"), mapped_headers=["Email"]
        ).header_matches
        == {}
    )


TITLED = {
    "utf8-lf": {},
    "excel-csv-utf8": {"newline": "\r\n", "bom": codecs.BOM_UTF8},
    "excel-unicode-text": {
        "delimiter": "\t",
        "newline": "\r\n",
        "encoding": "utf-16-le",
        "bom": codecs.BOM_UTF16_LE,
    },
    "excel-csv-windows-1252": {"delimiter": ";", "newline": "\r\n", "encoding": "cp1252"},
    "mac-excel-lone-cr": {"newline": "\r"},
    "excel-padded": {"newline": "\r\n", "pad": 3},
    "sep-hint": {"delimiter": "|"},
}


@pytest.mark.parametrize("name", TITLED)
def test_a_title_above_the_header_is_skipped_and_lines_stay_the_files(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Title lines as HR systems write them: a report name, a padded run date, a blank line."""
    options = TITLED[name]
    newline, d = str(options.get("newline", "\n")), str(options.get("delimiter", ","))
    title = f"Employee Report 2026-11-01{newline}Run at:{d}06:00{d * 4}{newline}{newline}"
    title = f"sep=|{newline}{title}" if name == "sep-hint" else title
    records = _cr_only(rows(malformed=False)) if newline == "\r" else rows(malformed=False)
    path = _file(tmp_path, write(records, before=title, **options))  # type: ignore[arg-type]
    monkeypatch.setattr(csv_reader, "_exact_parse", _no_exact)

    parsed = read_csv(path, mapped_headers=HEADER)

    header = 5 if name == "sep-hint" else 4
    assert (parsed.header_line, parsed.headers, parsed.delimiter) == (header, HEADER, d)
    assert parsed.source_line.tolist() == [header + n for n in (1, 2, 4, 5, 6, 7)]
    assert parsed.table.column("Employee ID").to_pylist() == ["E1", "E2", "E3", "E4", "E1", "E7"]


def _no_exact(*args, **kwargs):
    raise AssertionError("the slow exact parser ran")


def test_without_mapped_headers_a_title_is_the_header_as_before(tmp_path: Path) -> None:
    path = _file(tmp_path, b"Employee Report\nID,Email\nE1,a\n")

    assert read_csv(path).headers == ["Employee Report"]
    assert read_csv(path, mapped_headers=["ID"]).headers == ["ID", "Email"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"Employee Report\n" + b"note\n" * 10 + b"ID,Email\nE1,a@x.org\n",
            "line 12: the feed's headers are on line 12, not within the first 10 lines (a title above the "
            "header may take at most 9); delete lines 1-11 above the header",
        ),
        (
            b"E0,z@x.org,Zed\nID,Email,Name\nE1,a@x.org,Ann\n",
            "line 2: the feed's headers are on line 2, below line 1, which is not a title (3 values); "
            "delete the lines above the header",
        ),
    ],
    ids=["too-far-down", "below-a-row"],
)
def test_a_header_that_cannot_be_reached_is_refused_naming_its_line(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = _file(tmp_path, content)

    with pytest.raises(CsvFileError) as info:
        read_csv(path, mapped_headers=["ID", "Email"])

    assert str(info.value) == f"{path}: {message}"


# --------------------------------------------------------------------------- rows that explain themselves


def test_malformed_rows_keep_their_fields_for_the_id(tmp_path: Path) -> None:
    path = _file(tmp_path, b"Name,ID,Email\nAnn,E1,a@x.org\nBob,\xe2\x80\x8bE2 \nCy\nDi,E4,d@x.org,extra\n")

    parsed = read_csv(path)

    assert [m.fields for m in parsed.malformed] == [("Bob", "\u200bE2 "), ("Cy",), ("Di", "E4", "d@x.org")]
    assert parsed.malformed_ids("ID") == ["E2", "", "E4"]
    assert parsed.malformed_ids("Missing") == ["", "", ""]


@pytest.mark.parametrize(
    ("content", "lines"),
    [
        (b"ID,Email\nE1,a@x.org\nE2,b@x.org\nTotal: 2\n", [4]),
        (
            b'ID,Email,,\r\nE1,a@x.org,,\r\nE2,"b\r\nc",,\r\n,,\r\n'
            b"\r\nTotal: 2\r\n,\r\nEnd of report\r\n\r\n",
            [7, 9],
        ),
        (b"ID;Email\rE1;a@x.org\rE2;b@x.org\r42 rows\r", [4]),
        (b"ID,Email\nE1,a@x.org\nE2,b@x.org\nE3", [4]),
    ],
    ids=["lf", "crlf-padded-blank-lines", "lone-cr", "short-last-row"],
)
def test_short_or_long_rows_at_the_end_keep_the_fast_path_and_their_lines(
    tmp_path: Path, content: bytes, lines: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A footer such as ``Total: 2`` is a row with the wrong field count at the end of the file:
    the fast path places it exactly as the exact parser does, instead of handing it the file."""
    path = _file(tmp_path, content)
    monkeypatch.setattr(csv_reader, "_exact_parse", _no_exact)

    fast = read_csv(path)

    monkeypatch.undo()
    monkeypatch.setattr(csv_reader, "_fast_parse", lambda *args: None)
    exact = read_csv(path)
    assert fast.source_line.tolist() == exact.source_line.tolist() == [2, 3]
    assert fast.table.equals(exact.table)
    assert fast.malformed == exact.malformed
    assert [m.line for m in fast.malformed] == lines


def test_a_stray_nul_byte_is_read_and_flagged(tmp_path: Path) -> None:
    clean = read_csv(_file(tmp_path, b"ID,Email\nE1,a@x.org\n", "clean.csv"))
    path = _file(tmp_path, b"ID,Email\nE1,a@x.org\nE2,b\x00@x.org\n")

    parsed = read_csv(path)

    assert not clean.has_nul and parsed.has_nul
    assert parsed.table.column("Email").to_pylist() == ["a@x.org", "b\x00@x.org"]
    assert parsed.source_line.tolist() == [2, 3]


def test_a_row_of_a_narrow_file_never_passes_for_a_title(tmp_path: Path) -> None:
    path = _file(tmp_path, b"E0,z@x.org\nID,Email\nE1,a@x.org\n")

    with pytest.raises(
        CsvFileError, match="line 2: the feed's headers are on line 2, below line 1, which is not"
    ):
        read_csv(path, mapped_headers=["ID", "Email"])
    assert (
        read_csv(
            _file(tmp_path, b"Staff\nID,Email\nE1,a@x.org\n", "t.csv"), mapped_headers=["ID"]
        ).header_line
        == 2
    )

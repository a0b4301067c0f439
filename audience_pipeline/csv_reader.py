"""Parse an HR CSV export into string columns, keeping every record's source line.

The fast path is ``pyarrow.csv`` (multi-threaded). Its rows carry no line numbers, so we derive
them: line = 2 + row index + newlines embedded in earlier rows' quoted values. That is exact only
when the file has no blank lines and no malformed rows, which we verify by counting the file's
newlines (values are searched for embedded newlines only when the file has more lines than
rows, so a plain file costs one numpy pass over its bytes). When the check fails (or pyarrow
reported a row with the wrong number of fields) we re-read with Python's ``csv`` module, which
knows every record's line, and turn malformed rows into rejects instead of failing the whole
file. Clean files, the common case, never pay for it.
"""

from __future__ import annotations

import codecs
import csv
import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

DELIMITERS = (",", ";", "\t", "|")
_BINARY_MAGIC = {
    b"PK\x03\x04": "a ZIP archive (an .xlsx workbook?)",
    b"\xd0\xcf\x11\xe0": "an OLE2 document (an .xls workbook?)",
    b"%PDF": "a PDF document",
}


class CsvFileError(ValueError):
    """The file cannot be read as CSV at all; the message names the file and, if known, the line."""


@dataclass(frozen=True)
class MalformedRow:
    line: int
    expected_fields: int
    actual_fields: int
    text: str


@dataclass
class ParsedCsv:
    path: Path
    headers: list[str]
    table: pa.Table
    source_line: np.ndarray
    encoding: str
    delimiter: str
    malformed: list[MalformedRow] = field(default_factory=list)

    @property
    def source_rows(self) -> int:
        """Data records in the file: parsed rows plus malformed ones."""
        return self.table.num_rows + len(self.malformed)


def read_csv(path: Path | str, *, delimiter: str | None = None) -> ParsedCsv:
    path = Path(path)
    head = _read_head(path)
    encoding = "utf-8-sig" if head.startswith(codecs.BOM_UTF8) else "utf-8"
    body = head[3:] if encoding == "utf-8-sig" else head
    header_line = _first_line(path, body)
    delimiter = delimiter or _sniff_delimiter(header_line)
    headers = [h.strip() for h in next(csv.reader([header_line], delimiter=delimiter))]
    _check_headers(path, headers)
    parsed = _fast_parse(path, headers, delimiter, encoding)
    if parsed is None:
        parsed = _exact_parse(path, headers, delimiter, encoding)
    return parsed


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            head = fh.read(64 * 1024)
    except OSError as exc:
        raise CsvFileError(f"{path}: cannot be opened: {exc.strerror or exc}") from None
    if not head.strip():
        raise CsvFileError(f"{path}: the file is empty")
    for magic, what in _BINARY_MAGIC.items():
        if head.startswith(magic):
            raise CsvFileError(f"{path}: this is {what}, not a CSV file; export it as CSV (UTF-8)")
    if b"\x00" in head:
        raise CsvFileError(
            f"{path}: the file contains NUL bytes; it is binary or UTF-16, export it as CSV (UTF-8)"
        )
    return head


def _first_line(path: Path, body: bytes) -> str:
    raw = body.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CsvFileError(
            f"{path}: line 1, byte {exc.start + 1}: not valid UTF-8; save the file as CSV UTF-8"
        ) from None


def _sniff_delimiter(header_line: str) -> str:
    counts = {d: header_line.count(d) for d in DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _check_headers(path: Path, headers: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(headers, start=1):
        key = name.strip()
        if not key:
            raise CsvFileError(f"{path}: line 1, column {i}: empty header name")
        if key in seen:
            raise CsvFileError(f"{path}: line 1: duplicate header {key!r} in columns {seen[key]} and {i}")
        seen[key] = i


def _count_newlines(path: Path) -> tuple[int, bool]:
    """Newlines in the file and whether it ends with one: numpy over an mmap, in 8 MB slices."""
    step = 8 << 20
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        data = np.frombuffer(mm, dtype=np.uint8)
        count = sum(int(np.count_nonzero(data[i : i + step] == 0x0A)) for i in range(0, len(data), step))
        trailing = bool(data[-1] == 0x0A)
        del data  # the mmap cannot close while a view of it exists
        return count, trailing


def _fast_parse(path: Path, headers: list[str], delimiter: str, encoding: str) -> ParsedCsv | None:
    invalid: list[int] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append(row.number or -1)
        return "skip"

    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=headers, skip_rows=1, use_threads=False),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter, newlines_in_values=True, invalid_row_handler=on_invalid
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(headers, pa.string()), strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as exc:
        if "UTF8" in str(exc) or "utf8" in str(exc).lower():
            raise CsvFileError(_utf8_error(path)) from None
        return None
    if invalid:
        return None
    newlines, trailing = _count_newlines(path)
    lines_in_file = newlines + (0 if trailing else 1)
    lines = np.arange(2, table.num_rows + 2, dtype=np.int64)
    if lines_in_file != 1 + table.num_rows:
        # Only now can values hold newlines (a file without them has exactly one line per row).
        embedded = _embedded_newlines(table)
        if lines_in_file != 1 + table.num_rows + int(embedded.sum()):
            return None
        lines[1:] += np.cumsum(embedded[:-1])
    return ParsedCsv(path, headers, table, lines, encoding, delimiter)


def _embedded_newlines(table: pa.Table) -> np.ndarray:
    total = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        counts = pc.count_substring(column, "\n")
        if pc.max(counts).as_py():
            total += counts.to_numpy()
    return total


def _utf8_error(path: Path) -> str:
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                bad = exc.start
                line += chunk[:bad].count(b"\n")
                col = bad - (chunk.rfind(b"\n", 0, bad) + 1) + 1
                return (
                    f"{path}: line {line}, byte {col} of the line: not valid UTF-8 "
                    f"(byte 0x{chunk[bad]:02x}); save the file as CSV UTF-8"
                )
            line += chunk.count(b"\n")
    return f"{path}: not valid UTF-8; save the file as CSV UTF-8"


def _exact_parse(path: Path, headers: list[str], delimiter: str, encoding: str) -> ParsedCsv:
    """Slow, exact path: Python's csv module reports each record's first line."""
    width = len(headers)
    columns: list[list[str]] = [[] for _ in headers]
    lines: list[int] = []
    malformed: list[MalformedRow] = []
    with path.open("r", encoding=encoding, newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        next(reader)
        previous_end = reader.line_num
        try:
            for record in reader:
                start, previous_end = previous_end + 1, reader.line_num
                if not record or (len(record) == 1 and not record[0].strip() and width > 1):
                    continue
                if len(record) != width:
                    text = delimiter.join(record)
                    malformed.append(MalformedRow(start, width, len(record), text[:200]))
                    continue
                for col, value in zip(columns, record, strict=True):
                    col.append(value)
                lines.append(start)
        except csv.Error as exc:
            raise CsvFileError(f"{path}: line {reader.line_num}: {exc}") from None
        except UnicodeDecodeError:
            raise CsvFileError(_utf8_error(path)) from None
    table = pa.table({h: pa.array(c, type=pa.string()) for h, c in zip(headers, columns, strict=True)})
    return ParsedCsv(path, headers, table, np.asarray(lines, dtype=np.int64), encoding, delimiter, malformed)

"""Parse an HR CSV export into string columns, keeping every record's source line.

The fast path is ``pyarrow.csv`` (multi-threaded). Its rows carry no line numbers, so we derive
them: line = header line + 1 + row index + newlines embedded in earlier rows' quoted values.
That is exact only when the file has no blank lines between records and no malformed rows,
which we verify by counting the file's newlines (values are searched for embedded newlines only
when the file has more lines than rows, so a plain file costs one numpy pass over its bytes).
When the check fails (or pyarrow reported a row with the wrong number of fields) we re-read
with Python's ``csv`` module, which knows every record's line, and turn malformed rows into
rejects instead of failing the whole file. Clean files, the common case, never pay for it.

Dialects, as Excel, Workday, SuccessFactors, ADP and BambooHR write them:

- Encodings: see :mod:`audience_pipeline.encodings`. Files that are not UTF-8 are transcoded to
  a UTF-8 sibling first and parsed by the same code; line numbers count the original's lines.
- The delimiter (``,`` ``;`` tab ``|``) is the one the header line uses most, unless the first
  line is Excel's ``sep=;`` hint. Line ends may be LF, CRLF or (in a file with no LF) a lone CR.
- Blank lines before the header and at the end are skipped; line numbers still count them.
- A record whose fields are all empty (a blank spreadsheet row, exported as ``,,,,``) is a blank
  line, not a row: it is neither imported nor rejected.
- Trailing empty header names (Excel pads every row to the widest one) are dropped. A row may
  then have any number of fields from the named ones up, as long as the extra ones are empty;
  a value under an unnamed column makes the row a reject, as does a missing field.

Refused with :class:`CsvFileError` (file name, reason, and line where there is one): a file over
the size limit, an empty file, a binary file (named: "this is an Excel workbook (.xlsx)"), bytes
that are in no encoding we accept, empty or duplicate header names, a quote that is never
closed, and a header without rows unless the feed allows an empty audience.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from audience_pipeline.encodings import (
    LEGACY,
    UTF8_BOM,
    Encoding,
    UnreadableText,
    detect,
    looks_binary,
    utf8_copy,
    utf8_failure,
)

DELIMITERS = (",", ";", "\t", "|")
DEFAULT_MAX_FILE_BYTES = 2 * 1024**3
_HEAD = 64 * 1024
_PAD = "\x00unnamed"
_SEP_HINT = re.compile(r"\"?sep=(.)\"?")
_UNCLOSED = (
    "{path}: line {line}: a quoted value opened on this line is never closed, so the rest of the file "
    "would be read as one value; fix the quote"
)


class CsvFileError(ValueError):
    """The file cannot be read as CSV at all; the message names the file and, if known, the line."""


class _NotUtf8(Exception):
    """The parser met bytes that are not UTF-8 (the caller decides between legacy and refusal)."""


@dataclass(frozen=True)
class MalformedRow:
    line: int
    expected_fields: int
    actual_fields: int
    text: str
    reason: str = ""

    def __post_init__(self) -> None:
        if not self.reason:
            reason = f"row has {self.actual_fields} fields, the header has {self.expected_fields}"
            object.__setattr__(self, "reason", reason)


@dataclass
class ParsedCsv:
    path: Path
    headers: list[str]
    table: pa.Table
    source_line: np.ndarray
    encoding: str
    delimiter: str
    malformed: list[MalformedRow] = field(default_factory=list)
    header_line: int = 1

    @property
    def source_rows(self) -> int:
        """Data records in the file: parsed rows plus malformed ones."""
        return self.table.num_rows + len(self.malformed)


@dataclass(frozen=True)
class _Layout:
    """Where the header is and what it names; ``padding`` counts its trailing unnamed columns."""

    delimiter: str
    headers: list[str]
    padding: int
    header_line: int
    header_end: int

    @property
    def all_names(self) -> list[str]:
        return self.headers + [f"{_PAD}{i}" for i in range(self.padding)]


def read_csv(
    path: Path | str,
    *,
    delimiter: str | None = None,
    allow_empty: bool = False,
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
) -> ParsedCsv:
    """Parse ``path`` in whatever dialect it uses; raises :class:`CsvFileError` for files we refuse.

    ``allow_empty`` accepts a header without data rows (an intentionally empty audience).
    """
    path = Path(path)
    head, size = _read_head(path, max_file_bytes)
    what = looks_binary(path, head)
    if what:
        raise CsvFileError(f"{path}: this is {what}, not a CSV file; export it as CSV (UTF-8)")
    try:
        encoding = detect(head, whole_file=len(head) == size)
        parsed = _parse_in_place(path, encoding, delimiter) if encoding.in_place else None
        if parsed is None:
            if encoding.in_place:
                encoding = Encoding(LEGACY, "cp1252")
            with utf8_copy(path, encoding) as (copy, name):
                parsed = _parse(path, copy, name, delimiter)
    except UnreadableText as exc:
        raise CsvFileError(f"{path}: {exc}") from None
    except _NotUtf8:
        raise CsvFileError(f"{path}: not valid UTF-8; save the file as CSV UTF-8") from None
    if not parsed.source_rows and not allow_empty:
        raise CsvFileError(
            f"{path}: line {parsed.header_line}: the file has a header but no data rows; an empty file "
            "would empty the audience (set allow_empty: true on the feed if that is intended)"
        )
    return parsed


def _parse_in_place(path: Path, encoding: Encoding, delimiter: str | None) -> ParsedCsv | None:
    """Parse a UTF-8 file as it is; None when it turns out to be in the Windows code page."""
    try:
        return _parse(path, path, encoding.name, delimiter)
    except _NotUtf8:
        failure = utf8_failure(path)
        if failure is None:
            raise
        if encoding.name == UTF8_BOM or not failure.ascii_before:
            raise CsvFileError(f"{path}: {failure.mixed()}") from None
        return None


def _read_head(path: Path, max_file_bytes: int | None) -> tuple[bytes, int]:
    try:
        size = path.stat().st_size
        if max_file_bytes is not None and size > max_file_bytes:
            raise CsvFileError(
                f"{path}: the file is {_size(size)}, over the feed's limit of {_size(max_file_bytes)} "
                f"(max_file_bytes: {max_file_bytes})"
            )
        with path.open("rb") as fh:
            head = fh.read(_HEAD)
    except OSError as exc:
        raise CsvFileError(f"{path}: cannot be opened: {exc.strerror or exc}") from None
    if not head.strip():
        raise CsvFileError(f"{path}: the file is empty")
    return head, size


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _parse(original: Path, data: Path, encoding: str, delimiter: str | None) -> ParsedCsv:
    """Parse the UTF-8 file ``data``; messages name ``original``, whose lines ``data`` keeps."""
    layout = _layout(original, data, delimiter)
    return _fast_parse(original, data, layout, encoding) or _exact_parse(original, data, layout, encoding)


def _layout(original: Path, data: Path, delimiter: str | None) -> _Layout:
    with data.open("rb") as fh:
        head = fh.read(_HEAD)
        truncated = bool(fh.read(1))
    try:
        text = head.decode("utf-8-sig") if not truncated else _decode_prefix(head)
    except UnicodeDecodeError:
        raise _NotUtf8 from None
    lines = io.StringIO(text, newline="")
    number, hint = 0, None
    for raw in lines:
        number += 1
        if truncated and not raw.endswith(("\n", "\r")):
            raise CsvFileError(f"{original}: line {number} is longer than 64 kB; this is not a CSV export")
        content = raw.rstrip("\r\n")
        if number == 1 and (match := _SEP_HINT.fullmatch(content)):
            hint = match[1]
            continue
        if content.strip(" \t" + "".join(DELIMITERS)):
            break
    else:
        raise CsvFileError(f"{original}: the file is empty (no header line)")
    delimiter = delimiter or hint or _sniff_delimiter(content)
    reader = csv.reader(itertools.chain([raw], lines), delimiter=delimiter)
    names = [h.strip() for h in next(reader)]
    header_end = number + reader.line_num - 1
    padding = 0
    while names and not names[-1]:
        names.pop()
        padding += 1
    _check_headers(original, names, number)
    return _Layout(delimiter, names, padding, number, header_end)


def _decode_prefix(head: bytes) -> str:
    """UTF-8 text of a head cut at an arbitrary byte: a split character at its end is dropped."""
    return codecs.getincrementaldecoder("utf-8-sig")().decode(head, final=False)


def _sniff_delimiter(header_line: str) -> str:
    counts = {d: header_line.count(d) for d in DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _check_headers(path: Path, headers: list[str], line: int) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(headers, start=1):
        if not name:
            raise CsvFileError(f"{path}: line {line}, column {i}: empty header name")
        if name in seen:
            raise CsvFileError(
                f"{path}: line {line}: duplicate header {name!r} in columns {seen[name]} and {i}"
            )
        seen[name] = i


def _fast_parse(original: Path, data: Path, layout: _Layout, encoding: str) -> ParsedCsv | None:
    invalid: list[int] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append(row.number or -1)
        return "skip"

    names = layout.all_names
    try:
        table = pacsv.read_csv(
            data,
            read_options=pacsv.ReadOptions(
                column_names=names, skip_rows=layout.header_end, use_threads=False
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=layout.delimiter, newlines_in_values=True, invalid_row_handler=on_invalid
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as exc:
        if "utf8" in str(exc).lower():
            raise _NotUtf8 from None
        return None
    if invalid:
        return None
    if layout.padding:
        if any(pc.max(pc.utf8_length(table.column(n))).as_py() for n in names[len(layout.headers) :]):
            return None  # a value under an unnamed column: the exact path makes that row a reject
        table = table.select(layout.headers)
    lines = _source_lines(original, data, table, layout)
    if lines is None:
        return None
    table, lines = _drop_blank_records(table, lines)
    return ParsedCsv(
        original, layout.headers, table, lines, encoding, layout.delimiter, [], layout.header_line
    )


def _source_lines(original: Path, data: Path, table: pa.Table, layout: _Layout) -> np.ndarray | None:
    """Each row's first line, or None when the file's line count does not add up.

    A last row spanning lines may be a quote that is never closed: pyarrow then reads the rest of
    the file into one value without complaint, so that case is checked with a strict re-read.
    """
    header_end, delimiter = layout.header_end, layout.delimiter
    terminator, newlines, ends_with_newline, trailing_blank = _line_stats(data)
    lines_in_file = newlines + (0 if ends_with_newline else 1) - trailing_blank
    lines = np.arange(header_end + 1, header_end + 1 + table.num_rows, dtype=np.int64)
    if lines_in_file != header_end + table.num_rows:
        # Only now can values hold newlines (a file without them has exactly one line per row).
        embedded = _embedded_newlines(table, terminator)
        if lines_in_file != header_end + table.num_rows + int(embedded.sum()):
            return None
        lines[1:] += np.cumsum(embedded[:-1])
        if embedded[-1] and _quote_never_closes(data, int(lines[-1]), delimiter):
            raise CsvFileError(_UNCLOSED.format(path=original, line=int(lines[-1])))
    return lines


def _line_stats(path: Path) -> tuple[str, int, bool, int]:
    """The line terminator (LF, or CR in a file without LF), how many the file has, whether it
    ends with one, and how many blank lines end it. numpy over an mmap, in 8 MB slices."""
    step = 8 << 20
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        data = np.frombuffer(mm, dtype=np.uint8)
        terminator = "\n"
        count = sum(int(np.count_nonzero(data[i : i + step] == 0x0A)) for i in range(0, len(data), step))
        if not count:
            terminator = "\r"
            count = sum(int(np.count_nonzero(data[i : i + step] == 0x0D)) for i in range(0, len(data), step))
        tail = mm[max(0, len(mm) - 4096) :]
        del data  # the mmap cannot close while a view of it exists
    ending = tail[len(tail.rstrip(b"\r\n")) :].count(terminator.encode())
    return terminator, count, ending > 0, max(ending - 1, 0)


def _embedded_newlines(table: pa.Table, terminator: str) -> np.ndarray:
    total = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        counts = pc.count_substring(column, terminator)
        if pc.max(counts).as_py():
            total += counts.to_numpy()
    return total


def _drop_blank_records(table: pa.Table, lines: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """Remove records whose fields are all empty or spaces. Only rows whose first field is blank
    are looked at in the other columns, so a clean file pays for one pass over one column."""
    if not table.num_rows or not table.num_columns:
        return table, lines
    candidates = np.flatnonzero(_blank(table.column(0)).to_numpy())
    for column in table.columns[1:]:
        if not len(candidates):
            return table, lines
        candidates = candidates[_blank(column.take(candidates)).to_numpy(zero_copy_only=False)]
    if not len(candidates):
        return table, lines
    keep = np.ones(table.num_rows, dtype=bool)
    keep[candidates] = False
    return table.filter(pa.array(keep)), lines[keep]


def _blank(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.or_(pc.equal(pc.utf8_length(column), 0), pc.utf8_is_space(column))


def _exact_parse(original: Path, data: Path, layout: _Layout, encoding: str) -> ParsedCsv:
    """Slow, exact path: Python's csv module reports each record's first line."""
    width = len(layout.headers)
    columns: list[list[str]] = [[] for _ in layout.headers]
    lines: list[int] = []
    malformed: list[MalformedRow] = []
    start = 0
    with data.open("r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=layout.delimiter)
        try:
            while reader.line_num < layout.header_end:
                next(reader)
            previous_end = reader.line_num
            for record in reader:
                start, previous_end = previous_end + 1, reader.line_num
                if not record or (not record[0].strip() and not "".join(record).strip()):
                    continue
                if len(record) != width:
                    problem = _shape_problem(record, width, width + layout.padding)
                    if problem:
                        text = layout.delimiter.join(record)[:200]
                        malformed.append(MalformedRow(start, width, len(record), text, problem))
                        continue
                    record = record[:width]
                for col, value in zip(columns, record, strict=True):
                    col.append(value)
                lines.append(start)
        except csv.Error as exc:
            raise CsvFileError(f"{original}: line {reader.line_num}: {exc}") from None
        except UnicodeDecodeError:
            raise _NotUtf8 from None
        end = reader.line_num
    if start < end and _quote_never_closes(data, start, layout.delimiter):
        raise CsvFileError(_UNCLOSED.format(path=original, line=start))
    table = pa.table({h: pa.array(c, type=pa.string()) for h, c in zip(layout.headers, columns, strict=True)})
    return ParsedCsv(
        original,
        layout.headers,
        table,
        np.asarray(lines, dtype=np.int64),
        encoding,
        layout.delimiter,
        malformed,
        layout.header_line,
    )


def _shape_problem(record: list[str], width: int, named_or_padded: int) -> str | None:
    """Why a record with the wrong number of fields is a reject; None when only empty extras differ."""
    if len(record) < width:
        return f"row has {len(record)} fields, the header has {width}"
    extra = next((i for i, value in enumerate(record[width:]) if value.strip()), None)
    if extra is None:
        return None
    column = width + extra + 1
    if column <= named_or_padded:
        return f"column {column} has no header name but holds a value"
    return f"row has {len(record)} fields, the header has {width}"


def _quote_never_closes(data: Path, line: int, delimiter: str) -> bool:
    """Whether the record starting on ``line`` ends inside quotes at the end of the file."""
    with data.open("r", encoding="utf-8-sig", newline="") as fh:
        for _ in range(line - 1):
            next(fh)
        try:
            for _ in csv.reader(fh, delimiter=delimiter, strict=True):
                pass
        except csv.Error as exc:
            return "unexpected end of data" in str(exc)
    return False

"""Parse an HR CSV export into string columns, keeping every record's source line.

The fast path is ``pyarrow.csv`` (multi-threaded). Its rows carry no line numbers, so we derive
them: line = header line + 1 + row index + newlines embedded in earlier rows' quoted values.
That is exact only when the file has no blank lines between records and no malformed rows,
which we verify by counting the file's newlines (values are searched for embedded newlines only
when the file has more lines than rows, so a plain file costs one numpy pass over its bytes).
When the check fails (or pyarrow reported a row with the wrong number of fields) we re-read
with Python's ``csv`` module, which knows every record's line, and turn malformed rows into
rejects instead of failing the whole file. Clean files, the common case, never pay for it; nor do
files whose only malformed rows are their last lines (a footer such as ``Total: 42``): those are
found in the file's tail and placed by counting lines back from its end.

Dialects, as Excel, Workday, SuccessFactors, ADP and BambooHR write them:

- Encodings: see :mod:`audience_pipeline.encodings`. Files that are not UTF-8 are transcoded to
  a UTF-8 sibling first and parsed by the same code; line numbers count the original's lines.
- The delimiter (``,`` ``;`` tab ``|``) is the one the header line uses most, unless the first
  line is Excel's ``sep=;`` hint. Line ends may be LF, CRLF or (in a file with no LF) a lone CR.
- Blank lines before the header and at the end are skipped; line numbers still count them.
- Given the feed's mapped headers, a title above the header (``Employee Report 2026-11-01``:
  lines of at most two values, the header by line :data:`TITLE_LINES`) is skipped too, and the
  mapped headers match the file's ignoring case and spacing (:mod:`audience_pipeline.header_match`).
- A file with a NUL byte is read (``has_nul``): the caller rejects the rows that hold one.
- A record whose fields are all empty (a blank spreadsheet row, exported as ``,,,,``) is a blank
  line, not a row: it is neither imported nor rejected.
- Trailing empty header names (Excel pads every row to the widest one) are dropped. A row may
  then have any number of fields from the named ones up, as long as the extra ones are empty;
  a value under an unnamed column makes the row a reject, as does a missing field.

Refused with :class:`CsvFileError` (file name, reason, and line where there is one): a file over
the size limit, an empty file, a binary file (named: "this is an Excel workbook (.xlsx)"), bytes
that are in no encoding we accept, empty or duplicate header names, a mapped header that matches
two file headers, mapped headers below a line that is not a title or past line
:data:`TITLE_LINES`, a quote that is never closed, and a header without rows unless the feed
allows an empty audience.
"""

from __future__ import annotations

import codecs
import csv
import io
import mmap
import os
import re
from collections.abc import Iterable
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
from audience_pipeline.header_match import AmbiguousHeader, fold, mapped_count, match_headers
from audience_pipeline.invisible import strip_invisible_text

DELIMITERS = (",", ";", "\t", "|")
DEFAULT_MAX_FILE_BYTES = 2 * 1024**3
TITLE_LINES = 10  # a header on this line or above may sit below a title
_HEAD = 64 * 1024
_TAIL_ROWS = 20  # at most this many short or long rows at the end keep the fast path
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
    fields: tuple[str, ...] = ()  # the first ``expected_fields`` values, to find the row's id

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
    header_matches: dict[str, str] = field(default_factory=dict)  # mapped -> as in the file
    header_text: list[str] = field(default_factory=list)  # header names before trimming
    has_nul: bool = False  # the file holds a NUL byte somewhere (rows with one get rejected)
    set_aside: int = 0  # records taken out of ``table``/``malformed`` as rejects by the caller

    @property
    def source_rows(self) -> int:
        """Data records in the file: parsed rows, malformed ones and those set aside."""
        return self.table.num_rows + len(self.malformed) + self.set_aside

    def malformed_ids(self, header: str) -> list[str]:
        """The value under ``header`` of each malformed row that has that many fields, else ""."""
        if header not in self.headers:
            return [""] * len(self.malformed)
        at = self.headers.index(header)
        return [
            strip_invisible_text(m.fields[at]).strip() if at < len(m.fields) else "" for m in self.malformed
        ]


@dataclass(frozen=True)
class _Layout:
    """Where the header is and what it names; ``padding`` counts its trailing unnamed columns."""

    delimiter: str
    headers: list[str]
    padding: int
    header_line: int
    header_end: int
    header_matches: dict[str, str]
    header_text: list[str]

    @property
    def all_names(self) -> list[str]:
        return self.headers + [f"{_PAD}{i}" for i in range(self.padding)]


def read_csv(
    path: Path | str,
    *,
    delimiter: str | None = None,
    allow_empty: bool = False,
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
    mapped_headers: Iterable[str] = (),
) -> ParsedCsv:
    """Parse ``path`` in whatever dialect it uses; raises :class:`CsvFileError` for files we refuse.

    ``allow_empty`` accepts a header without data rows (an intentionally empty audience).
    ``mapped_headers`` are the headers the feed maps: they find the header line below a title,
    and are matched ignoring case and spacing (:mod:`audience_pipeline.header_match`).
    """
    mapped = tuple(dict.fromkeys(mapped_headers))
    path = Path(path)
    head, size = _read_head(path, max_file_bytes)
    what = looks_binary(path, head)
    if what:
        raise CsvFileError(f"{path}: this is {what}, not a CSV file; export it as CSV (UTF-8)")
    try:
        encoding = detect(head, whole_file=len(head) == size)
        parsed = _parse_in_place(path, encoding, delimiter, mapped) if encoding.in_place else None
        if parsed is None:
            if encoding.in_place:
                encoding = Encoding(LEGACY, "cp1252")
            with utf8_copy(path, encoding) as (copy, name):
                parsed = _parse(path, copy, name, delimiter, mapped)
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


def _parse_in_place(
    path: Path, encoding: Encoding, delimiter: str | None, mapped: tuple[str, ...]
) -> ParsedCsv | None:
    """Parse a UTF-8 file as it is; None when it turns out to be in the Windows code page."""
    try:
        return _parse(path, path, encoding.name, delimiter, mapped)
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


def _parse(
    original: Path, data: Path, encoding: str, delimiter: str | None, mapped: tuple[str, ...]
) -> ParsedCsv:
    """Parse the UTF-8 file ``data``; messages name ``original``, whose lines ``data`` keeps."""
    layout = _layout(original, data, delimiter, mapped)
    parsed = _fast_parse(original, data, layout, encoding) or _exact_parse(original, data, layout, encoding)
    parsed.header_matches, parsed.header_text = layout.header_matches, layout.header_text
    parsed.has_nul = _has_nul(data)
    return parsed


def _has_nul(path: Path) -> bool:
    """Whether the file holds a NUL byte: one memchr over an mmap, milliseconds per 100 MB."""
    with path.open("rb") as fh:
        if not os.fstat(fh.fileno()).st_size:
            return False
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return mm.find(b"\x00") != -1


def _layout(original: Path, data: Path, delimiter: str | None, mapped: tuple[str, ...]) -> _Layout:
    with data.open("rb") as fh:
        head = fh.read(_HEAD)
        truncated = bool(fh.read(1))
    try:
        text = head.decode("utf-8-sig") if not truncated else _decode_prefix(head)
    except UnicodeDecodeError:
        raise _NotUtf8 from None
    lines = list(io.StringIO(text, newline=""))  # lines[i] is line i + 1, with its line end
    cut = len(lines) - 1 if truncated and lines and not lines[-1].endswith(("\n", "\r")) else len(lines)
    hint = None
    if lines and (match := _SEP_HINT.fullmatch(lines[0].rstrip("\r\n"))):
        hint = match[1]
    first = next((i for i in range(1 if hint else 0, len(lines)) if _filled(lines[i])), None)
    if first is None:
        raise CsvFileError(f"{original}: the file is empty (no header line)")
    if first >= cut:
        raise CsvFileError(f"{original}: line {first + 1} is longer than 64 kB; this is not a CSV export")
    at = _below_title(original, lines[:cut], first, mapped, delimiter or hint) if mapped else first
    number = at + 1
    delimiter = delimiter or hint or _sniff_delimiter(lines[at].rstrip("\r\n"))
    reader = csv.reader(iter(lines[at:]), delimiter=delimiter)
    text = next(reader)
    names = [h.strip() for h in text]
    header_end = number + reader.line_num - 1
    padding = 0
    while names and not names[-1]:
        names.pop()
        padding += 1
    _check_headers(original, names, number)
    try:
        matches = match_headers(names, mapped)
    except AmbiguousHeader as exc:
        raise CsvFileError(f"{original}: line {number}: {exc}") from None
    return _Layout(delimiter, names, padding, number, header_end, matches, text[: len(names)])


def _filled(line: str) -> bool:
    """Whether a line holds more than spaces, tabs and delimiters (Excel's ``,,,,`` is blank)."""
    return bool(line.rstrip("\r\n").strip(" \t" + "".join(DELIMITERS)))


def _below_title(
    original: Path, lines: list[str], first: int, mapped: tuple[str, ...], delimiter: str | None
) -> int:
    """Index of the header line: ``first`` (the first filled line) unless it lacks a mapped header
    and a later line has them all below at most a title (lines of few values), ending by
    line :data:`TITLE_LINES`. The mapped headers on a line further down, or below lines that are
    not a title, are refused naming that line: guessing there could read a table that is not
    the export. When no line has them all, the line among the first :data:`TITLE_LINES` with
    the most (more than ``first``) is the header, so that check_mapping names what it lacks."""
    if _mapped_on(lines[first], mapped, delimiter) == len(mapped):
        return first
    found = next(
        (i for i in range(first + 1, len(lines)) if _mapped_on(lines[i], mapped, delimiter) == len(mapped)),
        None,
    )
    if found is None:
        counts = [_mapped_on(lines[i], mapped, delimiter) for i in range(first, min(TITLE_LINES, len(lines)))]
        best = first + max(range(len(counts)), key=lambda i: (counts[i], -i))
        return best if _not_title(lines, first, best, delimiter) is None else first
    not_title = _not_title(lines, first, found, delimiter)
    if found < TITLE_LINES and not_title is None:
        return found
    where = f"{original}: line {found + 1}: the feed's headers are on line {found + 1}"
    if not_title is not None:
        values = len(_values(lines[not_title], delimiter))
        raise CsvFileError(
            f"{where}, below line {not_title + 1}, which is not a title ({values} values); "
            "delete the lines above the header"
        )
    raise CsvFileError(
        f"{where}, not within the first {TITLE_LINES} lines (a title above the header may take at most "
        f"{TITLE_LINES - 1}); delete lines {first + 1}-{found} above the header"
    )


def _not_title(lines: list[str], first: int, header: int, delimiter: str | None) -> int | None:
    """The first line above ``header`` that is not a title. A title has at most two values, and
    fewer than the header has names: skipped lines are not records, so a row of a narrow file
    must never pass for a title."""
    limit = min(2, len(_values(lines[header], delimiter)) - 1)
    return next((i for i in range(first, header) if len(_values(lines[i], delimiter)) > limit), None)


def _mapped_on(line: str, mapped: tuple[str, ...], delimiter: str | None) -> int:
    """How many mapped headers the line has (exactly or folded)."""
    folded = fold(line)
    if not any(fold(h) in folded for h in mapped):  # cheap test before parsing the line
        return 0
    return mapped_count(_fields(line, delimiter), mapped)


def _fields(line: str, delimiter: str | None) -> list[str]:
    content = line.rstrip("\r\n")
    return next(csv.reader([content], delimiter=delimiter or _sniff_delimiter(content)), [])


def _values(line: str, delimiter: str | None) -> list[str]:
    """The non-empty fields of a line."""
    return [v for v in _fields(line, delimiter) if v.strip()]


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
    invalid: list[str] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append(row.text)
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
    if layout.padding:
        if any(pc.max(pc.utf8_length(table.column(n))).as_py() for n in names[len(layout.headers) :]):
            return None  # a value under an unnamed column: the exact path makes that row a reject
        table = table.select(layout.headers)
    placed = _source_lines(original, data, table, layout, invalid)
    if placed is None:
        return None
    lines, malformed = placed
    table, lines = _drop_blank_records(table, lines)
    return ParsedCsv(
        original, layout.headers, table, lines, encoding, layout.delimiter, malformed, layout.header_line
    )


def _source_lines(
    original: Path, data: Path, table: pa.Table, layout: _Layout, invalid: list[str]
) -> tuple[np.ndarray, list[MalformedRow]] | None:
    """Each row's first line and, as malformed rows, the rows pyarrow skipped (``invalid``, their
    text) when those are the file's last lines; None when the line count does not add up.

    A last row spanning lines may be a quote that is never closed: pyarrow then reads the rest of
    the file into one value without complaint, so that case is checked with a strict re-read.
    """
    header_end, delimiter = layout.header_end, layout.delimiter
    terminator, newlines, ends_with_newline, trailing_blank = _line_stats(data)
    lines_in_file = newlines + (0 if ends_with_newline else 1) - trailing_blank
    malformed: list[MalformedRow] = []
    if invalid:
        trailing = _trailing_rows(data, terminator, lines_in_file, invalid, layout)
        if trailing is None:
            return None
        lines_in_file, malformed = trailing
    lines = np.arange(header_end + 1, header_end + 1 + table.num_rows, dtype=np.int64)
    if lines_in_file != header_end + table.num_rows:
        # Only now can values hold newlines (a file without them has exactly one line per row).
        embedded = _embedded_newlines(table, terminator)
        if lines_in_file != header_end + table.num_rows + int(embedded.sum()):
            return None
        lines[1:] += np.cumsum(embedded[:-1])
        if embedded[-1] and _quote_never_closes(data, int(lines[-1]), delimiter):
            raise CsvFileError(_UNCLOSED.format(path=original, line=int(lines[-1])))
    return lines, malformed


def _trailing_rows(
    data: Path, terminator: str, last_line: int, invalid: list[str], layout: _Layout
) -> tuple[int, list[MalformedRow]] | None:
    """Rows with the wrong field count that are the file's last lines (a footer such as ``Total:
    42``, usually) keep the fast path: returns the line the rows before them end on, and them as
    malformed rows. None when they are anywhere else, or not rejects (the exact path decides)."""
    if len(invalid) > _TAIL_ROWS or any("\n" in t or "\r" in t for t in invalid):
        return None
    with data.open("rb") as fh:
        start = max(0, fh.seek(0, os.SEEK_END) - _HEAD)
        fh.seek(start)
        tail = fh.read().decode("utf-8", errors="replace").rstrip("\r\n").split(terminator)
    complete = len(tail) if start == 0 else len(tail) - 1  # the first piece may be cut
    width = len(layout.headers)
    at, malformed = 0, []
    for text in reversed(invalid):
        while at < complete and not tail[-1 - at].rstrip("\r"):
            at += 1  # pyarrow skips empty lines
        if at >= complete or tail[-1 - at].rstrip("\r") != text:
            return None
        record = next(csv.reader([text], delimiter=layout.delimiter), [])
        if "".join(record).strip():  # all fields empty: a blank line, as on the exact path
            problem = _shape_problem(record, width, width + layout.padding)
            if problem is None:
                return None
            joined = layout.delimiter.join(record)[:200]
            fields = tuple(record[:width])
            malformed.append(MalformedRow(last_line - at, width, len(record), joined, problem, fields))
        at += 1
    while at < complete and not tail[-1 - at].rstrip("\r"):
        at += 1
    return last_line - at, malformed[::-1]


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
                        fields = tuple(record[:width])
                        malformed.append(MalformedRow(start, width, len(record), text, problem, fields))
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

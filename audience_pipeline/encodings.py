"""Tell what kind of bytes an HR export holds, and make a UTF-8 copy when it is not UTF-8.

HR systems export CSV as UTF-8 (with or without a BOM), as UTF-16 with a BOM (Excel "Unicode
text", usually tab-separated), or in the Windows code page (Excel "CSV" on a Western Windows).
The parser only reads UTF-8, so other encodings are transcoded in 1 MB chunks into a sibling
file; newline characters survive transcoding one for one, so line numbers do not change.

Choices, because the bytes alone cannot always say:

- A BOM decides (UTF-8, UTF-16 LE/BE, UTF-32 LE/BE). Without one, NUL bytes at every other
  position in mostly-ASCII text mean UTF-16 without a BOM. A few stray NUL bytes in otherwise
  clean text are read (the parser rejects the rows that hold them); many NULs, or NULs beside
  other control bytes, mean a binary file, refused naming the line of the first NUL.
- Bytes that are not valid UTF-8 mean the Windows code page, but only when everything before
  the first invalid byte is ASCII. Valid multi-byte UTF-8 followed by an invalid byte is a file
  of mixed encodings (or a damaged one): it is refused with the line, not guessed at.
- Windows-1252 and ISO-8859-1 differ only in bytes 0x80–0x9F, where ISO-8859-1 has control
  characters that no spreadsheet writes, and Windows-1252 has € ’ “ ” – … . So 8-bit files are
  decoded as Windows-1252, as browsers do for "latin-1" (the five bytes Windows-1252 leaves
  undefined map to the same code points, as in WHATWG's decoder). The encoding reported is
  ``windows-1252`` when the file has any byte in 0x80–0x9F, and ``iso-8859-1`` when it has
  none, in which case the two decode it identically.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

UTF8 = "utf-8"
UTF8_BOM = "utf-8-sig"
LEGACY = "windows-1252"
LATIN1 = "iso-8859-1"
_CHUNK = 1 << 20
_C1_ERRORS = "audience_pipeline.c1"
_NOT_C1 = bytes(b for b in range(256) if not 0x80 <= b <= 0x9F)
_STRAY_NULS = 16  # at least this many NULs (or 1% of the head) may be stray
# every byte but the C0 controls that text never holds (tab, line ends and NUL are handled apart)
_NOT_BINARY_CONTROL = bytes(b for b in range(256) if b >= 0x20 or b in b"\t\n\r\x00")

_BOMS = (  # UTF-32 first: its little-endian BOM starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32-le", "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "utf-32"),
    (codecs.BOM_UTF8, UTF8_BOM, UTF8_BOM),
    (codecs.BOM_UTF16_LE, "utf-16-le", "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "utf-16"),
)
_MAGIC = (
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an Excel 97-2003 workbook (.xls) or another Office document"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip-compressed file"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"PAR1", "a Parquet file"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"{\\rtf", "an RTF document"),
    (b"\x7fELF", "a program (ELF binary)"),
)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")


class UnreadableText(ValueError):
    """The bytes are not text in an encoding we accept; the message says why (no file name)."""


@dataclass(frozen=True)
class Encoding:
    """``name`` is what metadata shows; ``codec`` decodes it. Only UTF-8 is parsed in place."""

    name: str
    codec: str

    @property
    def in_place(self) -> bool:
        return self.name in (UTF8, UTF8_BOM)


def _c1_passthrough(exc: UnicodeError) -> tuple[str, int]:
    """Windows-1252's five undefined bytes decode to the same code points (WHATWG behaviour)."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return exc.object[exc.start : exc.end].decode("latin-1"), exc.end


codecs.register_error(_C1_ERRORS, _c1_passthrough)


def looks_binary(path: Path, head: bytes) -> str | None:
    """What a non-text file looks like ("an Excel workbook (.xlsx)"), or None for text."""
    if head.startswith(_ZIP_MAGIC):
        return _zip_kind(path)
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    text = _markup_probe(head)
    if text.startswith("<?xml") and (
        "urn:schemas-microsoft-com:office:spreadsheet" in text or "<workbook" in text
    ):
        return "an Excel 2003 XML spreadsheet"
    if text.startswith(("<!doctype html", "<html", "<table")):
        return "an HTML page (some systems save a web table under an .xls name)"
    return None


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            mimetype = archive.read("mimetype")[:100] if "mimetype" in names else b""
    except (zipfile.BadZipFile, OSError, KeyError):
        return "a ZIP archive (an .xlsx workbook is one)"
    if any(n.startswith("xl/") for n in names):
        return "an Excel workbook (.xlsx)"
    if b"opendocument.spreadsheet" in mimetype:
        return "an OpenDocument spreadsheet (.ods)"
    if any(n.startswith("word/") for n in names):
        return "a Word document (.docx)"
    inside = [n for n in names if n.lower().endswith((".csv", ".txt"))]
    return f"a ZIP archive holding {inside[0]!r}" if inside else "a ZIP archive"


def _markup_probe(head: bytes) -> str:
    for bom, _, codec in _BOMS:
        if head.startswith(bom):
            return head[:2048].decode(codec, errors="ignore").lstrip("\ufeff \t\r\n").lower()
    return head[:2048].decode("latin-1").lstrip(" \t\r\n").lower()


def detect(head: bytes, *, whole_file: bool) -> Encoding:
    """The encoding the first bytes suggest; ``whole_file`` when ``head`` is the entire file.

    A head that is valid UTF-8 is only provisionally UTF-8: the parser finds out whether the
    rest is, and asks :func:`utf8_failure` where it is not.
    """
    for bom, name, codec in _BOMS:
        if head.startswith(bom):
            return Encoding(name, codec)
    if b"\x00" in head:
        utf16 = _bomless_utf16(head)
        if utf16 is not None:
            return utf16
        _refuse_unless_stray_nuls(head)
        head = head.replace(b"\x00", b"")
    try:
        codecs.getincrementaldecoder(UTF8)().decode(head, final=whole_file)
    except UnicodeDecodeError as exc:
        failure = Utf8Failure.at(head, exc.start, ascii_before=True)
        if not failure.ascii_before:
            raise UnreadableText(failure.mixed()) from None
        return Encoding(LEGACY, "cp1252")
    return Encoding(UTF8, UTF8)


def _bomless_utf16(head: bytes) -> Encoding | None:
    """UTF-16 without a BOM: ASCII-range text has a NUL in every high byte, and nothing else does."""
    sample = head[: len(head) & ~1]
    even, odd = sample[0::2], sample[1::2]
    even_nul, odd_nul = even.count(0) / max(len(even), 1), odd.count(0) / max(len(odd), 1)
    name = ""
    if odd_nul > 0.3 and even_nul < 0.01:
        name = "utf-16-le"
    elif even_nul > 0.3 and odd_nul < 0.01:
        name = "utf-16-be"
    # the head may end inside a surrogate pair: ignore its last character
    if name and _plain_text(sample.decode(name, errors="replace")[:-1]):
        return Encoding(name, name)
    return None


def _refuse_unless_stray_nuls(head: bytes) -> None:
    """A few NUL bytes in text that is otherwise clean are stray (a broken export step wrote
    them into a value): the file is read and the rows holding them are rejected. Many NULs, or
    other control bytes beside them, make a binary file, refused naming where the first NUL is."""
    if head.count(0) <= max(_STRAY_NULS, len(head) // 100) and not head.translate(None, _NOT_BINARY_CONTROL):
        return
    first = head.index(0)
    line, column = head.count(b"\n", 0, first) + 1, first - (head.rfind(b"\n", 0, first) + 1) + 1
    raise UnreadableText(
        f"this is a binary file (it contains NUL bytes, the first on line {line}, byte {column} of "
        "the line), not a CSV file"
    )


def _plain_text(text: str) -> bool:
    """No replacement characters and no control characters other than tab and line ends."""
    return "\ufffd" not in text and not any(ord(c) < 0x20 and c not in "\t\r\n" for c in text)


@dataclass(frozen=True)
class Utf8Failure:
    line: int
    column: int
    byte: int
    ascii_before: bool

    @classmethod
    def at(cls, data: bytes, bad: int, *, ascii_before: bool, line: int = 1) -> Utf8Failure:
        """The failure at offset ``bad`` of ``data``, which starts on ``line``."""
        column = bad - (data.rfind(b"\n", 0, bad) + 1) + 1
        before = data[:bad]
        return cls(line + before.count(b"\n"), column, data[bad], ascii_before and before.isascii())

    def describe(self) -> str:
        return f"line {self.line}, byte {self.column} of the line: not valid UTF-8 (byte 0x{self.byte:02x})"

    def mixed(self) -> str:
        return (
            f"{self.describe()}, after text that is UTF-8: the file mixes encodings or is damaged; "
            "save it as CSV UTF-8"
        )


def utf8_failure(path: Path) -> Utf8Failure | None:
    """Where ``path`` stops being UTF-8, and whether all bytes before that point are ASCII."""
    decoder = codecs.getincrementaldecoder(UTF8)()
    line, ascii_so_far = 1, True
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                # exc.object is this chunk behind the previous chunk's incomplete last character
                return Utf8Failure.at(exc.object, exc.start, ascii_before=ascii_so_far, line=line)
            line += chunk.count(b"\n")
            ascii_so_far = ascii_so_far and chunk.isascii()
    return None


def transcode(source: Path, target: Path, encoding: Encoding) -> str:
    """Write ``source`` as UTF-8 (no BOM) to ``target``; returns the encoding name to report.

    An all-ASCII chunk of a single-byte file is already UTF-8 and is copied as it is.
    """
    single_byte = encoding.codec == "cp1252"
    decoder = codecs.getincrementaldecoder(encoding.codec)(errors=_C1_ERRORS if single_byte else "strict")
    has_c1 = False
    with source.open("rb") as src, target.open("wb") as out:
        while True:
            chunk = src.read(_CHUNK)
            if single_byte and chunk.isascii():
                out.write(chunk)
            else:
                try:
                    out.write(decoder.decode(chunk, final=not chunk).encode(UTF8))
                except UnicodeDecodeError as exc:
                    out.flush()
                    line = _lines_in(target) + _newlines_before(exc, encoding)
                    raise UnreadableText(
                        f"line {line}: not valid {encoding.name} ({exc.reason}); save the file as CSV UTF-8"
                    ) from None
            if not chunk:
                break
            has_c1 = has_c1 or (single_byte and bool(chunk.translate(None, _NOT_C1)))
    if single_byte:
        return LEGACY if has_c1 else LATIN1
    return encoding.name


def _lines_in(path: Path) -> int:
    """1 + the newlines written so far: the line the next character starts on."""
    count = 1
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            count += chunk.count(b"\n")
    return count


def _newlines_before(exc: UnicodeDecodeError, encoding: Encoding) -> int:
    """Newlines in the part of the failing chunk that decoded before the error."""
    return exc.object[: exc.start].decode(encoding.name, errors="replace").count("\n")


@contextlib.contextmanager
def utf8_copy(source: Path, encoding: Encoding) -> Iterator[tuple[Path, str]]:
    """A UTF-8 copy of ``source`` beside it (hidden, so drop-folder listings skip it), removed
    afterwards; in the system temp folder when the source's folder is read-only."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{source.name}.", suffix=".utf-8.csv", dir=source.parent)
    except OSError:
        fd, name = tempfile.mkstemp(prefix=f"{source.name}.", suffix=".utf-8.csv")
    os.close(fd)
    target = Path(name)
    try:
        yield target, transcode(source, target, encoding)
    finally:
        target.unlink(missing_ok=True)

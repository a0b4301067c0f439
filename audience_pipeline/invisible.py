"""Characters that take no space on screen, and their removal from identifiers and emails.

Copying an id or an address out of a web page, a PDF or Outlook brings along characters nobody
can see: a zero-width space (U+200B), a zero-width (non-)joiner (U+200C/U+200D), direction marks
(U+200E/U+200F, U+202A-U+202E), a word joiner (U+2060-U+2064), a byte-order mark inside a value
(U+FEFF), a soft hyphen (U+00AD), a Mongolian vowel separator (U+180E). In an id they make two
people look like one and one person look like two; in an email they make a valid address
invalid. So ids and emails lose them before validation (names keep them: a joiner can be part of
how a name is written). Header names are compared without them too.

Every one of them is a multi-byte UTF-8 sequence starting with 0xC2, 0xE1, 0xE2 or 0xEF, so a
column whose bytes are all ASCII (the usual case) is skipped after one numpy pass over its buffer.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

from audience_pipeline.arrow_strings import value_bytes

INVISIBLE_CLASS = "[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]"
_INVISIBLE = re.compile(INVISIBLE_CLASS)


def strip_invisible_text(value: str) -> str:
    """``value`` without invisible characters (for the few values handled one at a time)."""
    return _INVISIBLE.sub("", value)


def strip_invisible(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """The column without invisible characters; the same object when it has none."""
    if not _may_contain_invisible(values):
        return values
    if not pc.any(pc.match_substring_regex(values, INVISIBLE_CLASS)).as_py():
        return values
    return pc.replace_substring_regex(values, INVISIBLE_CLASS, "")


def _may_contain_invisible(values: pa.ChunkedArray) -> bool:
    """False when no value has a byte >= 0xC2 (never false when one has)."""
    return any((data >= 0xC2).any() for data in value_bytes(values))

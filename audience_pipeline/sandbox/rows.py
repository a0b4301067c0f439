"""Row checks the emulated vendors share, so every vendor refuses the same bad data the same way.

Each vendor module still decides which checks apply, in what order, and how a refusal is worded
or coded in its own answers; these are the rules themselves and the CSV record walk.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator
from typing import Any

SANDBOX_FAIL_PREFIX = "SANDBOX_FAIL:"
"""Test hook: a value starting with this fails its row, with the rest of the value as the reason."""
UNDELIVERABLE_TLDS = frozenset({"invalid", "test", "localhost"})
"""RFC 2606 TLDs that never receive mail: what a real platform reports as a bounce-listed domain."""
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
E164_RE = re.compile(r"^\+[1-9]\d{6,14}$")
INVALID_EMAIL = "Invalid email address"


def sandbox_failure(values: Iterable[Any]) -> str | None:
    """The reason of the first ``SANDBOX_FAIL:<reason>`` text among ``values``, stripped."""
    for value in values:
        if isinstance(value, str) and value.startswith(SANDBOX_FAIL_PREFIX):
            return value[len(SANDBOX_FAIL_PREFIX) :].strip()
    return None


def email_problem(email: str, *, invalid: str = INVALID_EMAIL) -> str | None:
    """Why ``email`` cannot be imported (``invalid`` when it is not an address), or ``None``."""
    if not EMAIL_RE.match(email):
        return invalid
    domain = email.rsplit("@", 1)[-1]
    if domain.rsplit(".", 1)[-1].lower() in UNDELIVERABLE_TLDS:
        return f"Email domain '{domain}' does not accept mail"
    return None


def is_e164(phone: str) -> bool:
    return E164_RE.match(phone) is not None


class FirstLines:
    """The line each key was first seen on, to report a repeated key with its first line."""

    def __init__(self) -> None:
        self._lines: dict[str, int] = {}

    def first(self, key: str, line: int) -> int:
        """The line ``key`` first appeared on (``line`` itself when this is the first time)."""
        return self._lines.setdefault(key, line)


def data_records(reader: Any) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """``(line, row, problem)`` for each non-blank record after the header, already read.

    ``line`` is the 1-based line the record starts on (quoted newlines count), so reports match
    the uploaded file. A record the csv module refuses in strict mode has ``row`` ``None`` and a
    ``Malformed CSV record`` problem; reading goes on with the next record.
    """
    previous = reader.line_num
    while True:
        line = previous + 1
        try:
            row: list[str] | None = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            previous = reader.line_num
            yield line, None, f"Malformed CSV record: {exc}"
            continue
        previous = reader.line_num
        if row:
            yield line, row, None

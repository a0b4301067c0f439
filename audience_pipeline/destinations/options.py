"""What every vendor's feed options share: strict parsing and one wording for column mistakes.

Option values such as CXI's ``email_field`` name the feed's canonical output columns. The feeds
loader calls ``column_problems`` when the file loads, so a misnamed column fails there, with the
same message for every vendor, instead of at the vendor after validation ran.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class VendorOptions(BaseModel):
    """Base of each vendor's options model: unknown keys are errors, values are fixed once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def column_problems(self, columns: list[str]) -> list[tuple[str | None, str]]:
        """``(option key or None, problem)`` for options the feed's ``columns`` cannot satisfy."""
        return []

    def describe_target(self) -> str:
        """What the feed writes to, in the vendor's own terms (import name, list, section, trigger),
        for descriptions, metadata and log lines: ``Communicate XI import "All staff"``."""
        raise NotImplementedError


def not_a_column(key: str, value: object, columns: list[str], *, entry: str | None = None) -> tuple[str, str]:
    """The problem of option ``key`` (its ``entry``, for a mapping) naming ``value``, not a column."""
    where = f"{entry}: " if entry else ""
    hint = f"options name the feed's canonical columns: {columns}"
    return key, f"{where}{value!r} is not a column of this feed; {hint}"

"""Timestamps as the emulated vendors write them."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_millis(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and ``Z`` (CXI, Yesmail and APSIS all write this form)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"

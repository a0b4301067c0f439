"""Polling a sandbox job until it ends, fast enough to see each state it passes through."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(
    fetch: Callable[[], T], done: Callable[[T], bool], *, what: str, timeout: float, interval: float
) -> list[T]:
    """Every answer of ``fetch`` until ``done`` holds for one; fails after ``timeout`` seconds."""
    seen: list[T] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(fetch())
        if done(seen[-1]):
            return seen
        time.sleep(interval)
    raise AssertionError(f"{what} did not end: {seen[-1] if seen else 'no answer'}")

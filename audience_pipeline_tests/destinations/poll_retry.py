"""The status sensor's retry policy reaches every vendor's HTTP client: with it a 429 raises at
once (the sensor defers the import to the next tick); without it the client waits Retry-After."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from audience_pipeline.automation.status import POLL_RETRY
from audience_pipeline.destinations.base import JobHandle
from audience_pipeline.destinations.http import RetryPolicy, VendorHTTPError


def check_poll_retry(
    client_for: Callable[[RetryPolicy | None], Any],
    handle: JobHandle,
    sleeps: list[float],
    between: Callable[[], None] = lambda: None,
) -> None:
    """``client_for(retry)`` builds the vendor's client on an HTTP layer that answers 429 with
    ``Retry-After: 3600`` and records its sleeps in ``sleeps``; ``between`` resets shared caches."""
    client = client_for(POLL_RETRY)
    try:
        assert client.http.retry is POLL_RETRY
        with pytest.raises(VendorHTTPError) as caught:
            client.status(handle)
        assert (caught.value.status, caught.value.attempts, sleeps) == (429, 1, [])
    finally:
        client.close()
    between()
    default = client_for(None)
    try:
        with pytest.raises(VendorHTTPError) as caught:
            default.status(handle)
        assert caught.value.attempts == 5 and sleeps == [120.0] * 4  # Retry-After, capped
    finally:
        default.close()

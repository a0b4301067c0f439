"""Fixtures shared by the destination client tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Protocol, TypeVar

import pytest


class Closeable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closeable)


@pytest.fixture
def close_after() -> Iterator[Callable[[C], C]]:
    """Registers a client to be closed when the test ends, so client factories stay one-liners."""
    with ExitStack() as stack:

        def track(client: C) -> C:
            stack.callback(client.close)
            return client

        yield track

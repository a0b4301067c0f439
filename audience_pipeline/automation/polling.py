"""Status calls for thousands of imports per tick, inside each destination's limits.

Why it looks like this:
- The vendor clients are synchronous (``httpx.Client``). One client shared by many threads
  funnels every request through one connection pool, which was measured CPU-bound in httpcore
  (PERF-NOTES: 11 s for 1,000 polls at 50 concurrent, against 1.9 s for ten clients with five
  connections each). So each worker thread owns its own client, with the few connections one
  thread needs.
- Pools outlive a tick. A sensor runs in the code location's process (the gRPC code server under
  ``dagster dev`` or the daemon), which lives across ticks: building a client costs ~20 ms (the CA
  bundle) and a new TLS connection per poll would double every call. A pool idle for
  :data:`IDLE_SECONDS`, or pushed out by newer ones past :data:`MAX_POOLS`, is closed.
- Limits belong to the destination (one account at one vendor), not to a feed: every feed that
  imports into it shares one :class:`DestinationLimits` (a concurrency semaphore and a
  requests-per-second token bucket), so five feeds on one account never poll five times as hard.
- A tick has a deadline. A poll that cannot start before it (no free slot, no rate token) is left
  for the next tick and reported as :data:`NOT_POLLED`; a poll still running at the deadline plus
  :data:`GRACE_SECONDS` is abandoned (its thread finishes it in the background, the answer is
  dropped), so one slow vendor cannot hold the sensor past Dagster's time limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

IDLE_SECONDS = 600.0
MAX_POOLS = 32
GRACE_SECONDS = 1.0


class _NotPolled:
    def __repr__(self) -> str:
        return "NOT_POLLED"


NOT_POLLED: Any = _NotPolled()
"""The result of a poll that did not happen this tick (deadline, limits): poll it next tick."""


@dataclass(frozen=True)
class PollLimits:
    """How hard one destination may be polled: concurrent calls and calls per second."""

    concurrency: int
    requests_per_second: float


class RateLimiter:
    """A token bucket that hands out start times (GCRA): ``rate`` calls a second, ``burst`` at once.

    ``acquire`` reserves the next free slot and sleeps until it; a slot later than the caller's
    deadline is not taken, so a tick never waits for calls it will not make.
    """

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self, deadline: float, cost: int = 1) -> bool:
        """Wait for ``cost`` calls' worth of slots; ``False`` (nothing reserved) if past ``deadline``."""
        interval = 1.0 / self.rate
        with self._lock:
            now = self._clock()
            start = max(self._next, now - (self.burst - 1) * interval)
            if start > deadline:
                return False
            self._next = start + cost * interval
        if start > now:
            self._sleep(start - now)
        return True


class DestinationLimits:
    """One destination's shared limits: a semaphore for concurrency, a token bucket for the rate."""

    def __init__(self, limits: PollLimits) -> None:
        self.limits = limits
        self.slots = threading.BoundedSemaphore(limits.concurrency)
        self.rate = RateLimiter(limits.requests_per_second, burst=limits.concurrency)


class ClientPool:
    """Worker threads that each own one client of a destination, built on first use, kept across ticks."""

    def __init__(self, factory: Callable[[], Any], limits: DestinationLimits, owner: object) -> None:
        self._factory = factory
        self._owner = owner  # keeps an identity-fingerprinted resource alive, so its id is not reused
        self.limits = limits
        self._executor = ThreadPoolExecutor(
            max_workers=limits.limits.concurrency, thread_name_prefix="status-poll"
        )
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        self.last_used = time.monotonic()

    @property
    def clients(self) -> int:
        """How many clients the pool has built so far (at most its concurrency)."""
        return len(self._clients)

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._factory()
            with self._lock:
                self._clients.append(client)
        return client

    def run(
        self,
        calls: Sequence[tuple[Hashable, Callable[[Any], Any], int]],
        deadline: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> dict[Hashable, Any]:
        """``{key: call(client)}`` for each ``(key, call, cost)``, in the given order of priority.

        ``cost`` is how many vendor requests the call makes (one per chunk job for most clients).
        A call that cannot start before ``deadline`` (monotonic seconds) gives :data:`NOT_POLLED`.
        """
        self.last_used = time.monotonic()
        futures: dict[Hashable, Future] = {
            key: self._executor.submit(self._one, call, cost, deadline, clock) for key, call, cost in calls
        }
        done, _ = wait(futures.values(), timeout=max(0.0, deadline + GRACE_SECONDS - clock()))
        self.last_used = time.monotonic()
        return {key: future.result() if future in done else NOT_POLLED for key, future in futures.items()}

    def _one(self, call: Callable[[Any], Any], cost: int, deadline: float, clock: Callable[[], float]) -> Any:
        limits = self.limits
        if not limits.slots.acquire(timeout=max(0.0, deadline - clock())):
            return NOT_POLLED
        try:
            if not limits.rate.acquire(deadline, cost):
                return NOT_POLLED
            return call(self._client())
        finally:
            limits.slots.release()

    def close(self) -> None:
        """Stop the threads (queued calls are dropped) and close every client."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(Exception):  # a broken client must not break the tick evicting it
                client.close()


_LIMITS: dict[str, DestinationLimits] = {}
_POOLS: OrderedDict[str, ClientPool] = OrderedDict()
_REGISTRY_LOCK = threading.Lock()


def fingerprint(resource: object) -> str:
    """A digest of a resource's configuration: a changed credential or URL gets new clients.

    Pydantic resources (every ``ConfigurableResource``) are fingerprinted by their fields; any
    other object (a test's fake) by its identity, which stays unique because the pool keeps the
    object alive. The digest never holds a secret in clear.
    """
    dump = getattr(resource, "model_dump", None)
    if callable(dump):
        text = json.dumps(dump(), default=str, sort_keys=True)
    else:
        text = f"{type(resource).__qualname__}@{id(resource)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pool_for(
    destination: str, resource: object, options: dict, limits: PollLimits, factory: Callable[[], Any]
) -> ClientPool:
    """The kept pool for one feed's ``options`` on ``destination``; the limits are the destination's.

    Feeds on the same destination share its limits; a change of the limits (a new feeds file)
    replaces them, and pools built under the old ones are closed.
    """
    account = f"{destination}:{fingerprint(resource)}"
    key = f"{account}:{json.dumps(options, sort_keys=True, default=str)}"
    with _REGISTRY_LOCK:
        shared = _LIMITS.get(account)
        if shared is None or shared.limits != limits:
            shared = _LIMITS[account] = DestinationLimits(limits)
        pool = _POOLS.get(key)
        if pool is not None and pool.limits is not shared:
            _POOLS.pop(key).close()
            pool = None
        if pool is None:
            pool = _POOLS[key] = ClientPool(factory, shared, resource)
        _POOLS.move_to_end(key)
        now = time.monotonic()
        stale = [k for k, p in _POOLS.items() if k != key and now - p.last_used > IDLE_SECONDS]
        stale += list(_POOLS)[: max(0, len(_POOLS) - len(stale) - MAX_POOLS)]
        for old in dict.fromkeys(stale):
            if old != key and old in _POOLS:
                _POOLS.pop(old).close()
        return pool


def close_pools() -> None:
    """Close every kept pool (tests, and a code location that is shutting down)."""
    with _REGISTRY_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
        _LIMITS.clear()
    for pool in pools:
        pool.close()

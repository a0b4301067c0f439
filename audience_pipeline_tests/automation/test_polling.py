"""The status sensor's poll machinery: the token bucket, the kept client pools and their limits."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from audience_pipeline.automation import polling
from audience_pipeline.automation.polling import (
    NOT_POLLED,
    ClientPool,
    DestinationLimits,
    PollLimits,
    RateLimiter,
    close_pools,
    fingerprint,
    pool_for,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Client:
    built = 0

    def __init__(self) -> None:
        Client.built += 1
        self.closed = False
        self.thread = threading.get_ident()

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def fresh_pools() -> Iterator[None]:
    close_pools()
    Client.built = 0
    yield
    close_pools()


def test_the_bucket_spaces_calls_at_the_rate_after_a_burst() -> None:
    clock = FakeClock()
    bucket = RateLimiter(10, burst=3, clock=clock, sleep=clock.sleep)

    starts = []
    for _ in range(6):
        assert bucket.acquire(deadline=clock.now + 100)
        starts.append(round(clock.now - 1000.0, 3))

    assert starts == [0, 0, 0, 0.1, 0.2, 0.3]  # three at once, then one every 100 ms


def test_the_bucket_does_not_reserve_a_slot_past_the_deadline() -> None:
    clock = FakeClock()
    bucket = RateLimiter(2, clock=clock, sleep=clock.sleep)

    assert bucket.acquire(deadline=clock.now + 0.4)
    assert not bucket.acquire(deadline=clock.now + 0.4)  # the next slot is 0.5 s away
    assert clock.slept == []
    assert bucket.acquire(deadline=clock.now + 0.6)
    assert clock.slept == [0.5]


def test_a_call_of_several_requests_takes_as_many_slots() -> None:
    clock = FakeClock()
    bucket = RateLimiter(10, clock=clock, sleep=clock.sleep)

    assert bucket.acquire(deadline=clock.now + 10, cost=5)
    assert bucket.acquire(deadline=clock.now + 10)
    assert clock.now - 1000.0 == pytest.approx(0.5)


def test_a_pool_polls_in_order_and_leaves_what_misses_the_deadline() -> None:
    pool = ClientPool(Client, DestinationLimits(PollLimits(concurrency=1, requests_per_second=1000)), None)
    deadline = time.monotonic() + 0.25
    calls = [(i, lambda client, i=i: (time.sleep(0.1), i)[1], 1) for i in range(6)]

    results = pool.run(calls, deadline)

    done = [k for k, r in results.items() if r is not NOT_POLLED]
    assert done == list(range(len(done))) and 2 <= len(done) <= 4  # the first ones, then none
    assert all(results[k] is NOT_POLLED for k in range(len(done), 6))
    pool.close()


def test_each_worker_owns_one_client_kept_until_the_pool_closes() -> None:
    pool = ClientPool(Client, DestinationLimits(PollLimits(concurrency=3, requests_per_second=1000)), None)
    seen: list[Client] = []
    lock = threading.Lock()

    def call(client: Client) -> None:
        time.sleep(0.02)
        with lock:
            seen.append(client)
        assert client.thread == threading.get_ident()  # never shared between threads

    for _ in range(3):
        pool.run([(i, call, 1) for i in range(9)], time.monotonic() + 5)

    assert 1 <= pool.clients == Client.built <= 3 and len(seen) == 27
    clients = set(seen)
    pool.close()
    assert all(c.closed for c in clients)


class Resource:
    """Stands in for a ``ConfigurableResource``: fingerprinted by its fields."""

    def __init__(self, url: str) -> None:
        self.url = url

    def model_dump(self) -> dict:
        return {"url": self.url}


def test_pools_are_kept_per_resource_config_and_options_and_share_the_destinations_limits() -> None:
    limits = PollLimits(concurrency=4, requests_per_second=50)
    first = pool_for("destination_cxi", Resource("u1"), {"import_name": "A"}, limits, Client)

    assert pool_for("destination_cxi", Resource("u1"), {"import_name": "A"}, limits, Client) is first
    other_feed = pool_for("destination_cxi", Resource("u1"), {"import_name": "B"}, limits, Client)
    assert other_feed is not first and other_feed.limits is first.limits  # one account, one limit
    other_account = pool_for("destination_cxi", Resource("u2"), {"import_name": "A"}, limits, Client)
    assert other_account.limits is not first.limits
    assert fingerprint(Resource("secret-key")) == fingerprint(Resource("secret-key"))
    assert "secret-key" not in fingerprint(Resource("secret-key"))


def test_new_limits_replace_the_pools_built_under_the_old_ones() -> None:
    old = pool_for("d", Resource("u"), {}, PollLimits(4, 50), Client)
    old.run([(0, lambda c: c, 1)], time.monotonic() + 5)
    built = old.clients

    new = pool_for("d", Resource("u"), {}, PollLimits(2, 50), Client)

    assert new is not old and new.limits.limits == PollLimits(2, 50)
    assert built == 1 and old.clients == 0  # the old pool's clients were closed


def test_idle_and_surplus_pools_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    idle = pool_for("d", Resource("idle"), {}, PollLimits(1, 50), Client)
    idle.run([(0, lambda c: c, 1)], time.monotonic() + 5)
    idle.last_used -= polling.IDLE_SECONDS + 1

    pool_for("d", Resource("busy"), {}, PollLimits(1, 50), Client)

    assert idle.clients == 0 and pool_for("d", Resource("idle"), {}, PollLimits(1, 50), Client) is not idle
    monkeypatch.setattr(polling, "MAX_POOLS", 2)
    pools = [pool_for("d", Resource(f"r{i}"), {}, PollLimits(1, 50), Client) for i in range(4)]
    assert len(polling._POOLS) == 2 and list(polling._POOLS.values()) == pools[-2:]

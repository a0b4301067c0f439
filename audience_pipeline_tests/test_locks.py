"""Locks on both kinds of storage: a file lock locally, a lease object on S3 (moto's server) that
works across processes that share nothing but the bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from audience_pipeline import lease
from audience_pipeline.locks import LockTimeout, held
from audience_pipeline.object_store import ObjectPath, StorePath, storage_path
from audience_pipeline_tests.conftest import STORAGE_BUCKET, S3Server

pytestmark = pytest.mark.integration  # the s3 half starts moto's server


@pytest.fixture(params=["local", "s3"])
def locks(request: pytest.FixtureRequest, tmp_path: Path) -> StorePath:
    if request.param == "local":
        return tmp_path / "locks"
    return storage_path(request.getfixturevalue("s3_storage")) / "locks"


def test_one_holder_at_a_time_the_other_waits(locks: StorePath) -> None:
    inside: list[str] = []
    overlaps: list[bool] = []

    def work(name: str) -> None:
        with held(locks, "submit-cxi", timeout=20):
            overlaps.append(bool(inside))
            inside.append(name)
            time.sleep(0.3)
            inside.remove(name)

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert overlaps == [False, False, False]


def test_a_waiter_gives_up_after_its_timeout(locks: StorePath) -> None:
    with held(locks, "snapshot-f", timeout=5):
        started = time.monotonic()
        with (
            pytest.raises(LockTimeout, match="still held by another process"),
            held(locks, "snapshot-f", timeout=0.5),
        ):
            pass
        assert time.monotonic() - started < 5
    with held(locks, "snapshot-f", timeout=1):  # released: free again
        pass


def test_the_lease_object_exists_only_while_held(s3: S3Server, s3_storage: str) -> None:
    folder = storage_path(s3_storage) / "locks"

    with held(folder, "submit-cxi", timeout=5):
        assert s3.keys(STORAGE_BUCKET) == ["prod/locks/submit-cxi.lock"]
        body = json.loads(
            s3.client().get_object(Bucket=STORAGE_BUCKET, Key="prod/locks/submit-cxi.lock")["Body"].read()
        )
        assert body["expires_at"] > time.time() and str(os.getpid()) in body["owner"]
    assert s3.keys(STORAGE_BUCKET) == []


def _expired_lease(s3: S3Server, key: str) -> None:
    body = json.dumps({"owner": "gone-host:1:x", "expires_at": time.time() - 1})
    s3.client().put_object(Bucket=STORAGE_BUCKET, Key=key, Body=body.encode())


def test_an_expired_lease_is_taken_over(s3: S3Server, s3_storage: str) -> None:
    _expired_lease(s3, "prod/locks/submit-cxi.lock")

    with held(storage_path(s3_storage) / "locks", "submit-cxi", timeout=2):
        owner = json.loads(
            s3.client().get_object(Bucket=STORAGE_BUCKET, Key="prod/locks/submit-cxi.lock")["Body"].read()
        )["owner"]
        assert str(os.getpid()) in owner


def test_a_held_lease_is_renewed_past_its_ttl(s3_storage: str) -> None:
    path = storage_path(s3_storage) / "locks" / "long.lock"
    assert isinstance(path, ObjectPath)

    with lease.held(path, timeout=2, ttl=0.6):
        time.sleep(1.5)  # more than two ttls: only renewals keep it
        with pytest.raises(LockTimeout):
            lease.held(path, timeout=0.5, ttl=0.6).__enter__()


def test_a_lease_taken_over_is_not_deleted_by_its_stalled_holder(s3: S3Server, s3_storage: str) -> None:
    path = storage_path(s3_storage) / "locks" / "stalled.lock"
    assert isinstance(path, ObjectPath)
    first = lease.Lease(path, ttl=0.5)
    first.acquire(timeout=2, poll=0.05)
    first._stop.set()  # a holder that stalls: no more renewals
    assert first._renewer is not None
    first._renewer.join()
    time.sleep(0.6)

    second = lease.Lease(path, ttl=30)
    second.acquire(timeout=2, poll=0.05)
    first.release()

    assert s3.keys(STORAGE_BUCKET) == ["prod/locks/stalled.lock"]  # still the second one's
    second.release()
    assert s3.keys(STORAGE_BUCKET) == []


HOLD_AND_HANG = """
import sys, time
from audience_pipeline import lease
from audience_pipeline.object_store import storage_path
with lease.held(storage_path(sys.argv[1]) / "locks" / "submit-cxi.lock", timeout=5, ttl=1.5):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_holder_killed_with_sigkill_frees_the_lock_after_its_ttl(s3_storage: str) -> None:
    """What ``flock`` gives on one machine (the kernel frees it), the lease gives across containers."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_HANG, s3_storage], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        started = time.monotonic()
        with held(storage_path(s3_storage) / "locks", "submit-cxi", timeout=15):
            waited = time.monotonic() - started
    finally:
        if holder.poll() is None:
            holder.kill()
    assert 0.3 < waited < 10

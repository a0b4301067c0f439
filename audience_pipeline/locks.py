"""Locks for work that must not run twice at once, wherever the pipeline's storage is.

A submit holds one while it reads what was already sent, records its intent, sends and records
the answer, so a ``sync``, a sensor-launched run and a materialization from the UI never send
the same file side by side; a failure report holds one per feed while it replaces the snapshot.

- **Local storage**: an advisory ``flock`` on a file under the storage's ``locks/`` folder. The
  kernel releases it when a process dies (even ``kill -9``), so a crash never leaves a stale lock.
  It serialises processes on one machine or on a shared POSIX file system.
- **S3 storage**: runs in separate containers share no kernel, so the lock is a lease object
  under ``<prefix>/locks/`` taken with a conditional write (``If-None-Match: *``), renewed while
  held and taken over once expired when its holder died (``lease.py``). The same guarantee across
  containers, with the ``ttl`` (a minute) as the delay after a crash.

Either way, the Dagster pool of the vendor (``<vendor>_api``) caps how many runs call one API.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from audience_pipeline.object_store import ObjectPath
from audience_pipeline.storage import safe_name


class LockTimeout(TimeoutError):
    """Another process held the lock for longer than the caller would wait."""


@contextmanager
def held(
    folder: Path | str | ObjectPath, name: str, *, timeout: float = 600.0, poll: float = 0.05
) -> Iterator[None]:
    """Hold the lock ``name`` (one file or lease object in ``folder``) for the ``with`` block."""
    if isinstance(folder, ObjectPath):
        from audience_pipeline import lease

        with lease.held(folder / f"{safe_name(name)}.lock", timeout=timeout, poll=max(poll, 0.2)):
            yield
        return
    path = Path(folder) / f"{safe_name(name)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"{name}: still held by another process after {timeout:.0f} s"
                    ) from None
                time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

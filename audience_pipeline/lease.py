"""A lock for runs in separate containers: a lease object in the storage bucket.

``flock`` serialises processes that share a kernel or a POSIX file system; containers sharing only
a bucket need the bucket itself. S3 (since 2024), MinIO and moto apply conditional writes
atomically, and that is the whole lock:

- **take**: ``PutObject`` with ``If-None-Match: *`` succeeds for exactly one writer while no lease
  exists (412 or 409 for the others, who poll);
- **expiry**: the body says until when the lease holds. A holder that died (``kill -9``, a node
  lost) stops renewing it, and once it has expired a waiter takes it over with ``If-Match: <the
  expired lease's ETag>``, which again only one waiter wins;
- **renewal**: while held, a thread rewrites it every third of ``ttl`` with ``If-Match``, so a
  long submit keeps it; a renewal refused means another process took it (this one stalled for
  longer than ``ttl``): logged as an error, since the work in hand can no longer be stopped;
- **release**: ``DeleteObject`` with ``If-Match``, so a lease taken over is never deleted.

Expiry compares the holder's clock with the waiter's: containers' clocks (NTP) agree to far less
than the ``ttl`` of a minute. Credentials and endpoint come from the AWS environment (boto3).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from audience_pipeline.locks import LockTimeout
from audience_pipeline.object_store import ObjectPath, S3Settings

LEASE_TTL_SECONDS = 60.0
_LOST = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "412", "409")
log = logging.getLogger("audience_pipeline")


def s3_client(settings: S3Settings | None = None) -> Any:
    import boto3

    settings = settings or S3Settings.from_env()
    return boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region)


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class Lease:
    """One lease object; :meth:`held` is the ``with`` form."""

    def __init__(self, path: ObjectPath, *, ttl: float = LEASE_TTL_SECONDS, client: Any = None) -> None:
        self.path = path
        self.ttl = ttl
        self.client = client or s3_client()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires_at": time.time() + self.ttl}).encode()

    def _put(self, **condition: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.put_object(
                Bucket=self.path.bucket, Key=self.path.key, Body=self._body(), **condition
            )
        except ClientError as exc:
            if _code(exc) in _LOST:
                return False
            raise
        self.etag = answer["ETag"]
        return True

    def _expired_etag(self) -> str | None:
        """The ETag of the current lease if it has expired (``""``: gone meanwhile), else None."""
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(Bucket=self.path.bucket, Key=self.path.key)
        except ClientError as exc:
            if _code(exc) in _LOST:
                return ""
            raise
        try:
            expires_at = float(json.loads(answer["Body"].read())["expires_at"])
        except (ValueError, KeyError, TypeError):
            expires_at = 0.0  # not a lease this code wrote: treat as expired
        return answer["ETag"] if expires_at < time.time() else None

    def acquire(self, timeout: float, poll: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._put(IfNoneMatch="*"):
                break
            expired = self._expired_etag()
            if expired == "":
                continue  # released between the two calls: try again at once
            if expired is not None and self._put(IfMatch=expired):
                log.warning(f"lock {self.path.url}: took over a lease that expired (its holder stopped)")
                break
            if time.monotonic() >= deadline:
                raise LockTimeout(f"{self.path.name}: still held by another process after {timeout:.0f} s")
            time.sleep(poll)
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name=f"lease {self.path.name}", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            assert self.etag is not None
            try:
                renewed = self._put(IfMatch=self.etag)
            except Exception as exc:  # a network blip: the next round tries again
                log.warning(f"lock {self.path.url}: renewal failed ({type(exc).__name__}); retrying")
                continue
            if not renewed:
                self.lost = True
                log.error(f"lock {self.path.url}: lost to another process (this one stalled past its ttl)")
                return

    def release(self) -> None:
        from botocore.exceptions import ClientError

        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)  # a renewal in flight changes the ETag to delete
        if self.lost or self.etag is None:
            return
        try:
            self.client.delete_object(Bucket=self.path.bucket, Key=self.path.key, IfMatch=self.etag)
        except ClientError as exc:
            if _code(exc) not in _LOST:  # lost or gone: not ours to delete; else it expires by itself
                log.warning(
                    f"lock {self.path.url}: release failed ({_code(exc)}); it expires in {self.ttl:.0f} s"
                )


@contextmanager
def held(
    path: ObjectPath, *, timeout: float, poll: float = 0.2, ttl: float = LEASE_TTL_SECONDS
) -> Iterator[None]:
    """Hold the lease at ``path`` for the ``with`` block."""
    lease = Lease(path, ttl=ttl)
    lease.acquire(timeout, poll)
    try:
        yield
    finally:
        lease.release()

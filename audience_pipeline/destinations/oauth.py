"""OAuth client-credentials bearer tokens for the vendors that use them (AEP, APSIS One).

Sensor ticks and runs each build a client, so tokens live in a process-wide :class:`TokenCache`
per account until shortly before they expire; one account fetches one token at a time. A vendor
may revoke a token before its ``expires_in``, so a 401 drops it and repeats the call once with a
fresh one. How a token is requested stays with each vendor (the ``fetch`` callable).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from audience_pipeline.destinations.http import VendorAuthError, VendorError

T = TypeVar("T")

EARLY_SECONDS = 60.0
"""A token is dropped this long before it expires (or a tenth of its lifetime, if shorter)."""


@dataclass(frozen=True)
class Token:
    value: str
    expires_at: float


def account_key(*parts: str) -> str:
    """A cache key for one set of credentials that does not keep the secret itself in memory."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def read_token(body: Any, *, vendor: str, path: str, now: float, default_lifetime: float) -> Token:
    """The token in a ``{access_token, expires_in}`` answer, expiring a little early.

    ``default_lifetime`` applies when the vendor leaves ``expires_in`` out; 0 means "do not cache".
    """
    value = body.get("access_token") if isinstance(body, dict) else None
    if not value:
        raise VendorError(vendor, "POST", path, code="unexpected_response", detail="no access_token")
    lifetime = float(body.get("expires_in") or default_lifetime)
    return Token(str(value), now + max(0.0, lifetime - min(EARLY_SECONDS, lifetime / 10)))


class TokenCache:
    """Tokens by account key, shared by every client in the process; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, Token] = {}
        self._fetching: dict[str, threading.Lock] = {}

    def get(self, account: str, now: float) -> str | None:
        with self._lock:
            token = self._tokens.get(account)
        return token.value if token is not None and token.expires_at > now else None

    def put(self, account: str, value: str, expires_at: float) -> None:
        with self._lock:
            self._tokens[account] = Token(value, expires_at)

    def drop(self, account: str, value: str) -> None:
        """Forget ``value``, unless another client already replaced it with a newer token."""
        with self._lock:
            token = self._tokens.get(account)
            if token is not None and token.value == value:
                del self._tokens[account]

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()

    def fetch_lock(self, account: str) -> threading.Lock:
        """Held while one account's token is fetched, so concurrent clients fetch it once."""
        with self._lock:
            return self._fetching.setdefault(account, threading.Lock())


class BearerTokens:
    """One account's bearer token: cached, fetched on a miss, replaced once after a 401."""

    def __init__(
        self,
        account: str,
        fetch: Callable[[], Token],
        *,
        cache: TokenCache,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._account = account
        self._fetch = fetch
        self._cache = cache
        self._clock = clock

    def token(self) -> str:
        cached = self._cache.get(self._account, self._clock())
        if cached is not None:
            return cached
        with self._cache.fetch_lock(self._account):
            cached = self._cache.get(self._account, self._clock())
            if cached is not None:
                return cached
            token = self._fetch()
            self._cache.put(self._account, token.value, token.expires_at)
            return token.value

    def invalidate(self, value: str) -> None:
        self._cache.drop(self._account, value)

    def call(self, send: Callable[[str], T]) -> T:
        """``send(token)``; a 401 (token revoked or expired early) drops it and sends once more."""
        token = self.token()
        try:
            return send(token)
        except VendorAuthError as exc:
            if exc.status != 401:
                raise
            self.invalidate(token)
        return send(self.token())


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header for ``token``."""
    return {"Authorization": f"Bearer {token}"}

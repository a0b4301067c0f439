"""Credential checks shared by the emulated vendors."""

from __future__ import annotations

import hmac


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison, so response timing does not reveal how much of a secret matched."""
    return hmac.compare_digest(given.encode(), expected.encode())

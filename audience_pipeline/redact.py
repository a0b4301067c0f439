"""Scrub secrets from text before it reaches logs, exceptions or the Dagster UI.

Vendor credentials come from environment variables and travel in headers, URL userinfo and
presigned/SAS query strings. Anything that formats a message for a human runs it through a
:class:`Redactor` so a leaked value never outlives the process that used it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

__all__ = [
    "CREDENTIAL_QUERY_PARAMS",
    "GLOBAL_REDACTOR",
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "RedactingFilter",
    "Redactor",
    "install_log_redaction",
    "redact",
    "redact_url",
    "register_secret",
]

REDACTED = "***"

# Shorter values would match inside ordinary words and turn every log line into asterisks.
MIN_SECRET_LENGTH = 4

# Query parameters that carry credentials in API-key, S3 presigned, Azure SAS and GCS signed URLs.
CREDENTIAL_QUERY_PARAMS: frozenset[str] = frozenset(
    {
        "signature",
        "sig",
        "token",
        "access_token",
        "key",
        "api_key",
        "apikey",
        "password",
        "secret",
        "credential",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "se",
        "sp",
        "sv",
        "skoid",
        "sktid",
        "policy",
        "x-goog-signature",
        "client_secret",
    }
)

# `scheme://userinfo@` — greedy up to the last "@" before the path so passwords containing "@" are covered.
_USERINFO_RE = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s?#\"'<>]*@")

# `?name=value` / `&name=value` (also `&amp;name=` in HTML) wherever it appears, so relative URLs and
# query strings quoted inside error bodies are masked too; the name must match exactly.
_QUERY_PARAM_RE = re.compile(
    r"(?P<prefix>[?&;](?:"
    + "|".join(re.escape(name) for name in sorted(CREDENTIAL_QUERY_PARAMS, key=len, reverse=True))
    + r")=)[^&#\s\"'<>]*",
    re.IGNORECASE,
)


def _variants(secret: str) -> set[str]:
    """A secret plus its URL-encoded forms, since it may appear inside a query string."""
    return {secret, quote(secret, safe=""), quote_plus(secret, safe="")}


class Redactor:
    """Replaces known secret values and URL credentials in arbitrary text.

    The secrets are compiled into one alternation (longest first, so a secret that contains
    another is masked whole) and recompiled only when :meth:`add` learns something new, keeping
    :meth:`redact` cheap enough to run on every log record.
    """

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()
        self.add(*secrets)

    def add(self, *secrets: str | None) -> None:
        """Remember secret values; empty and very short ones are ignored."""
        new = set()
        for secret in secrets:
            if not isinstance(secret, str) or len(secret.strip()) < MIN_SECRET_LENGTH:
                continue
            new |= {variant for variant in _variants(secret) if len(variant) >= MIN_SECRET_LENGTH}
        with self._lock:
            if new <= self._secrets:
                return
            self._secrets |= new
            ordered = sorted(self._secrets, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(secret) for secret in ordered))

    def __contains__(self, value: object) -> bool:
        return value in self._secrets

    def __len__(self) -> int:
        return len(self._secrets)

    def redact(self, text: str) -> str:
        """Mask every known secret, URL userinfo and credential query parameter in ``text``."""
        if not isinstance(text, str):
            text = str(text)
        pattern = self._pattern
        if pattern is not None:
            text = pattern.sub(REDACTED, text)
        text = _USERINFO_RE.sub(rf"\g<scheme>{REDACTED}@", text)
        return _QUERY_PARAM_RE.sub(rf"\g<prefix>{REDACTED}", text)

    def redact_url(self, url: object) -> str:
        """Redact one URL (``str`` or ``httpx.URL``) so it can be logged or shown in an error."""
        return self.redact(str(url))


GLOBAL_REDACTOR = Redactor()


def register_secret(*values: str | None) -> None:
    """Register secrets process-wide so every error formatter and log line scrubs them."""
    GLOBAL_REDACTOR.add(*values)


def redact(text: str) -> str:
    """Redact ``text`` with the process-wide redactor."""
    return GLOBAL_REDACTOR.redact(text)


def redact_url(url: object) -> str:
    """Redact one URL with the process-wide redactor."""
    return GLOBAL_REDACTOR.redact_url(url)


class RedactingFilter(logging.Filter):
    """Logging filter that rewrites records so formatters only ever see redacted text.

    The message is formatted once (``msg % args``), redacted, and stored back with ``args``
    cleared; tracebacks and stack info are pre-rendered and redacted the same way because
    exception messages often embed URLs.
    """

    _formatter = logging.Formatter()

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self._redactor = redactor

    @property
    def redactor(self) -> Redactor:
        return self._redactor if self._redactor is not None else GLOBAL_REDACTOR

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = self.redactor
        try:
            message = record.getMessage()
        except Exception:
            # Leave malformed records alone so logging reports the formatting error itself.
            return True
        record.msg = redactor.redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redactor.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redactor.redact(record.stack_info)
        return True


DEFAULT_REDACTED_LOGGERS = ("", "dagster", "httpx", "httpcore", "audience_pipeline")


def install_log_redaction(
    logger_names: Iterable[str] = DEFAULT_REDACTED_LOGGERS, redactor: Redactor | None = None
) -> None:
    """Attach a :class:`RedactingFilter` to the named loggers, whatever handlers they get later.

    Logger filters only see records logged on that exact logger, not ones propagated from
    children, so loggers already created below the named ones (``httpcore.http11``,
    ``audience_pipeline.http``…) get the filter too. Call it after imports that create loggers.
    Installing twice is a no-op.
    """
    names = tuple(logger_names)
    existing = [
        name
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    ]
    targets = set(names)
    for name in names:
        if name:
            targets.update(child for child in existing if child.startswith(f"{name}."))
    for name in sorted(targets):
        logger = logging.getLogger(name) if name else logging.getLogger()
        if not any(isinstance(existing_filter, RedactingFilter) for existing_filter in logger.filters):
            logger.addFilter(RedactingFilter(redactor))

"""Shared HTTP layer for vendor import APIs.

Every vendor client goes through :class:`VendorHTTP` so that all of them retry the same way
(never repeating a request that may already have created an import), raise errors a person can
act on, and never put a credential into a log line or an exception message.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import itertools
import logging
import random
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import httpx
import tenacity

from audience_pipeline.redact import Redactor, install_log_redaction, register_secret
from audience_pipeline.redact import redact as global_redact

__all__ = [
    "DEFAULT_EXPECTED",
    "DEFAULT_TIMEOUT",
    "IDEMPOTENT_METHODS",
    "RetryPolicy",
    "VendorAuthError",
    "VendorConnectionError",
    "VendorError",
    "VendorHTTP",
    "VendorHTTPError",
    "parse_error_body",
    "retry_after_seconds",
]

logger = logging.getLogger("audience_pipeline.http")

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
DEFAULT_EXPECTED: tuple[int, ...] = (200, 201, 202, 204)
DEFAULT_RETRY_STATUSES: frozenset[int] = frozenset({429, 500, 502, 503, 504})
IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
MAX_DETAIL_CHARS = 500

# The server turned the request away before processing it, so repeating it is safe for any method.
_NOT_PROCESSED_STATUSES = frozenset({429, 503})
# The request never reached the server.
_NEVER_SENT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)
# The server may have received and applied the request; only idempotent calls may repeat it.
_MAYBE_APPLIED_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)
# Headers whose values are not credentials; every other configured header value is treated as one.
_NON_SECRET_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
        "accept-language",
        "cache-control",
        "connection",
        "content-length",
        "content-type",
        "user-agent",
    }
)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry; ``attempts`` counts the first try."""

    attempts: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_retry_after: float = 120.0
    retry_statuses: frozenset[int] = DEFAULT_RETRY_STATUSES

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be at least 1, got {self.attempts}")
        if min(self.backoff_base, self.backoff_max, self.max_retry_after) < 0:
            raise ValueError("RetryPolicy delays must not be negative")


class VendorError(Exception):
    """A vendor call failed; every field is already redacted and safe to log or display.

    Headers and request bodies are never included: the message names the call and the vendor's
    own explanation (``detail``, at most ~500 chars of the response body).
    """

    def __init__(
        self,
        vendor: str,
        method: str,
        url: str,
        status: int | None = None,
        code: str | None = None,
        detail: str = "",
        attempts: int = 1,
    ) -> None:
        self.vendor = vendor
        self.method = method
        self.url = url
        self.status = status
        self.code = code
        self.detail = detail
        self.attempts = attempts
        super().__init__(self._message())

    def _message(self) -> str:
        outcome = " ".join(str(part) for part in (self.status, self.code) if part is not None and part != "")
        if outcome and self.detail:
            outcome = f"{outcome}: {self.detail}"
        message = f"{self.vendor}: {self.method} {self.url} -> {outcome or self.detail or 'failed'}"
        if self.attempts > 1:
            message += f" (after {self.attempts} attempts)"
        return message

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce replays ``args`` (the message) into __init__, which needs the fields.
        return (
            type(self),
            (self.vendor, self.method, self.url, self.status, self.code, self.detail, self.attempts),
        )


class VendorHTTPError(VendorError):
    """The vendor answered with an unexpected status (after any retries)."""


class VendorAuthError(VendorHTTPError):
    """401/403: the credentials are wrong, expired or lack a permission; retrying won't help."""


class VendorConnectionError(VendorError):
    """No usable response: connection refused, timeout or dropped connection (after any retries)."""


def _text(value: Any) -> str:
    return " ".join(str(value).split()) if value is not None else ""


def _code(value: Any) -> str | None:
    if value is None or isinstance(value, bool) or value == "":
        return None
    return str(value)


def _first_text(body: Mapping[str, Any], *keys: str) -> str:
    for key in keys:
        if body.get(key) not in (None, ""):
            return _text(body[key])
    return ""


def _parse_error_mapping(body: Mapping[str, Any], status_code: int) -> tuple[str | None, str] | None:
    error = body.get("error")
    if isinstance(error, Mapping):
        message = _first_text(error, "message", "detail", "description")
        return _code(error.get("code", error.get("type"))), message or _text(error)
    if "error_text" in body:
        return _code(error), _text(body["error_text"])
    if isinstance(error, str):
        return error, _first_text(body, "error_description", "message", "detail")
    code = _code(body.get("error_code", body.get("code")))
    status = body.get("status")
    if code is None and isinstance(status, str) and status.strip() and status != str(status_code):
        code = status
    message = _first_text(body, "message", "error_message", "error_msg", "detail")
    title = _text(body.get("title"))
    if title and title != message:
        message = f"{title}: {message}" if message else title
    if code is None and not message:
        return None
    return code, message


def parse_error_body(response: httpx.Response) -> tuple[str | None, str]:
    """Extract ``(code, message)`` from the error body shapes our vendors use, else the raw text.

    Handles ``{"error": {"code", "message"}}``, ``{"error_code", "message"}``, APSIS
    ``{"status", "detail"}``, Altcraft ``{"error": 12, "error_text"}``, OAuth
    ``{"error", "error_description"}`` and problem+json ``{"title", "detail"}``.
    """
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, Mapping):
        parsed = _parse_error_mapping(body, response.status_code)
        if parsed is not None:
            return parsed
    return None, _text(response.text)


def _truncate(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Parse ``Retry-After`` as delta-seconds or an HTTP date; ``None`` when absent or garbage.

    Public for callers that wait on a 429 themselves (APSIS's pending-import limit).
    """
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _header_secrets(name: str, value: str) -> Iterable[str]:
    """A credential header value, plus the bare token / Basic password a server might echo."""
    if name.lower() in _NON_SECRET_HEADERS:
        return
    yield value
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if not token:
        return
    yield token
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(token, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return
        yield decoded
        yield decoded.partition(":")[2]


def _is_filelike(value: Any) -> bool:
    return hasattr(value, "read") and not isinstance(value, bytes | str)


def _check_seekable(value: Any, what: str) -> None:
    seekable = getattr(value, "seekable", None)
    if not callable(seekable) or not seekable():
        raise TypeError(
            f"{what} file objects must be seekable so a retry can resend them; "
            "pass bytes or a callable that returns the body instead"
        )


class _ReplayableBody:
    """Re-creates ``content=`` / ``files=`` before every attempt so a retry resends the same bytes.

    Accepted: bytes/str, a zero-argument callable returning the body (called once per attempt),
    or a seekable binary file object (rewound before each attempt). One-shot iterators and
    generators are rejected because a retry would silently send an empty body.
    """

    def __init__(self, content: Any, files: Any) -> None:
        self._content = content
        self._content_start = 0
        self._files = files
        if content is not None and not isinstance(content, bytes | str) and not callable(content):
            if not _is_filelike(content):
                raise TypeError(
                    "content must be bytes, str, a seekable file or a callable returning the body; "
                    f"got {type(content).__name__}, which cannot be resent on retry"
                )
            _check_seekable(content, "content")
            self._content_start = content.tell()
        for part in self._file_contents():
            if _is_filelike(part):
                _check_seekable(part, "files=")

    def _file_items(self) -> list[tuple[str, Any]]:
        if self._files is None:
            return []
        return list(self._files.items() if isinstance(self._files, Mapping) else self._files)

    def _file_contents(self) -> list[Any]:
        return [value[1] if isinstance(value, tuple) else value for _, value in self._file_items()]

    @staticmethod
    def _resolve(part: Any) -> Any:
        if callable(part):
            return part()
        if _is_filelike(part):
            part.seek(0)
        return part

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self._content is not None:
            content = self._content
            if callable(content):
                content = content()
            elif _is_filelike(content):
                content.seek(self._content_start)
            out["content"] = content
        if self._files is not None:
            out["files"] = [
                (name, (value[0], self._resolve(value[1]), *value[2:]))
                if isinstance(value, tuple)
                else (name, self._resolve(value))
                for name, value in self._file_items()
            ]
        return out


@dataclass
class _Attempt:
    """What one HTTP exchange produced; the retry predicate and wait strategy inspect it."""

    number: int
    request: httpx.Request
    response: httpx.Response | None = None
    error: httpx.TransportError | None = None
    retry_after: float | None = None


def _outcome_of(state: tenacity.RetryCallState) -> _Attempt:
    """The last attempt; ``attempt()`` reports transport errors as results, so this never raises."""
    if state.outcome is None:
        raise RuntimeError("retry callback invoked before the first attempt finished")
    return state.outcome.result()


class VendorHTTP:
    """One vendor's ``httpx.Client`` with retries, readable errors and credential redaction.

    ``headers`` are the vendor's credentials: their values are redacted from every log line and
    error, and they are sent only to ``base_url``'s origin, never to absolute URLs elsewhere.
    ``public_headers`` (e.g. ``x-sandbox-name: prod``) are sent with every request but are not
    secrets, so their values are not masked in logs
    (a presigned S3 upload rejects a second auth mechanism, and must not see our API key).
    Constructing one also installs log redaction on the ``httpx`` logger, whose own request
    line would otherwise print presigned/SAS signatures.
    """

    def __init__(
        self,
        vendor: str,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        public_headers: Mapping[str, str] | None = None,
        secrets: Iterable[str] = (),
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        error_parser: Callable[[httpx.Response], tuple[str | None, str]] | None = None,
    ) -> None:
        self.vendor = vendor
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._error_parser = error_parser or parse_error_body
        self._redactor = Redactor()
        headers = dict(headers or {})
        self._credential_headers = {
            name.lower() for name in headers if name.lower() not in _NON_SECRET_HEADERS
        }
        self.add_secrets(*secrets)
        for name, value in headers.items():
            self.add_secrets(*_header_secrets(name, value))
        sent = {**(public_headers or {}), **headers}
        self._client = httpx.Client(base_url=base_url, headers=sent, timeout=timeout, transport=transport)
        base = self._client.base_url
        self._origin = (base.scheme, base.host, base.port)
        install_log_redaction(("httpx",))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def add_secrets(self, *values: str | None) -> None:
        """Redact more values, e.g. an OAuth token obtained after construction.

        They are registered process-wide too, because httpx's own request log line and any
        traceback formatter only know the global redactor.
        """
        self._redactor.add(*values)
        register_secret(*values)

    def redact(self, text: str) -> str:
        """Scrub this client's secrets and the process-wide ones from ``text``."""
        return global_redact(self._redactor.redact(text))

    def request(
        self,
        method: str,
        path_or_url: str | httpx.URL,
        *,
        idempotent: bool | None = None,
        expected: Collection[int] = DEFAULT_EXPECTED,
        **httpx_kwargs: Any,
    ) -> httpx.Response:
        """Send a request with retries and return the response, or raise a :class:`VendorError`.

        Connection failures and 429/503 (the server did not process the call) are retried for
        every method. Other retryable statuses, read timeouts and dropped connections are
        retried only when the call is idempotent (GET/HEAD/PUT/DELETE/OPTIONS unless
        ``idempotent=`` says otherwise): repeating a POST the vendor may already have applied
        could start a second import. ``Retry-After`` is honoured (capped by the policy),
        otherwise the wait is exponential backoff with jitter.

        ``content=`` and ``files=`` bodies are resent on retry: pass bytes, a callable that
        returns the body, or a seekable binary file object, which is rewound before each attempt.
        Other keyword arguments go to ``httpx`` (``json=``, ``params=``, ``headers=``, ``auth=``…).
        """
        method = method.upper()
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        send_kwargs = {
            key: httpx_kwargs.pop(key) for key in ("auth", "follow_redirects") if key in httpx_kwargs
        }
        request_headers = httpx.Headers(httpx_kwargs.get("headers"))
        for name, value in request_headers.items():
            if name not in _NON_SECRET_HEADERS:
                self.add_secrets(*_header_secrets(name, value))
        auth = send_kwargs.get("auth")
        if isinstance(auth, tuple) and len(auth) == 2:
            self.add_secrets(str(auth[1]))
        body = _ReplayableBody(httpx_kwargs.pop("content", None), httpx_kwargs.pop("files", None))
        counter = itertools.count(1)

        def attempt() -> _Attempt:
            request = self._client.build_request(method, path_or_url, **body.kwargs(), **httpx_kwargs)
            self._strip_foreign_credentials(request, request_headers)
            outcome = _Attempt(number=next(counter), request=request)
            started = time.perf_counter()
            try:
                outcome.response = self._client.send(request, **send_kwargs)
            except httpx.TransportError as exc:
                outcome.error = exc
            else:
                outcome.retry_after = retry_after_seconds(outcome.response)
            if logger.isEnabledFor(logging.INFO):
                self._log_attempt(outcome, (time.perf_counter() - started) * 1000)
            return outcome

        def should_retry(outcome: _Attempt) -> bool:
            if outcome.error is not None:
                return isinstance(outcome.error, _NEVER_SENT_ERRORS) or (
                    idempotent and isinstance(outcome.error, _MAYBE_APPLIED_ERRORS)
                )
            status = outcome.response.status_code if outcome.response is not None else None
            if status in expected or status not in self.retry.retry_statuses:
                return False
            return idempotent or status in _NOT_PROCESSED_STATUSES

        # Most calls succeed at once: tenacity's machinery (a few tens of microseconds, paid under
        # the GIL by every concurrent sender) only starts once a first attempt asks for a retry,
        # and then replays that attempt as its own first so counting and waits are unchanged.
        outcome = attempt()
        if should_retry(outcome) and self.retry.attempts > 1:
            first: list[_Attempt] = [outcome]

            def first_then_attempt() -> _Attempt:
                return first.pop() if first else attempt()

            retrying = tenacity.Retrying(
                stop=tenacity.stop_after_attempt(self.retry.attempts),
                retry=tenacity.retry_if_result(should_retry),
                wait=self._wait,
                sleep=self._sleep,
                before_sleep=self._log_retry,
                retry_error_callback=_outcome_of,
            )
            outcome = retrying(first_then_attempt)
        if outcome.error is not None:
            raise self._connection_error(outcome, idempotent) from None
        response = outcome.response
        assert response is not None
        if response.status_code not in expected:
            raise self._http_error(outcome, response)
        return response

    def json(self, method: str, path: str | httpx.URL, **kw: Any) -> Any:
        """:meth:`request` and decode the JSON body; ``None`` for an empty (e.g. 204) response."""
        response = self.request(method, path, **kw)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise VendorError(
                self.vendor,
                response.request.method,
                self.redact(str(response.request.url)),
                status=response.status_code,
                code="invalid_json",
                detail=_truncate(self.redact(_text(response.text))),
            ) from None

    def _strip_foreign_credentials(self, request: httpx.Request, request_headers: httpx.Headers) -> None:
        url = request.url
        if (url.scheme, url.host, url.port) == self._origin:
            return
        for name in self._credential_headers:
            if name not in request_headers:
                request.headers.pop(name, None)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        outcome = _outcome_of(state)
        if outcome.retry_after is not None:
            return min(outcome.retry_after, self.retry.max_retry_after)
        policy = self.retry
        delay = policy.backoff_base * 2 ** (state.attempt_number - 1) + random.uniform(0, policy.backoff_base)
        return min(delay, policy.backoff_max)

    def _describe(self, outcome: _Attempt) -> str:
        if outcome.response is not None:
            return str(outcome.response.status_code)
        error = outcome.error
        return f"{type(error).__name__}: {self.redact(str(error)) or 'no details'}"

    def _log_attempt(self, outcome: _Attempt, elapsed_ms: float) -> None:
        logger.info(
            "%s: %s %s -> %s in %.0f ms (attempt %d/%d)",
            self.vendor,
            outcome.request.method,
            self.redact(str(outcome.request.url)),
            self._describe(outcome),
            elapsed_ms,
            outcome.number,
            self.retry.attempts,
        )

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        outcome = _outcome_of(state)
        logger.warning(
            "%s: %s %s -> %s; retrying in %.1f s%s (attempt %d/%d)",
            self.vendor,
            outcome.request.method,
            self.redact(str(outcome.request.url)),
            self._describe(outcome),
            state.upcoming_sleep,
            " as asked by Retry-After" if outcome.retry_after is not None else "",
            outcome.number,
            self.retry.attempts,
        )

    def _connection_error(self, outcome: _Attempt, idempotent: bool) -> VendorConnectionError:
        detail = self._describe(outcome)
        error = outcome.error
        if (
            not idempotent
            and not isinstance(error, _NEVER_SENT_ERRORS)
            and isinstance(error, _MAYBE_APPLIED_ERRORS)
        ):
            detail += f" (not retried: the {outcome.request.method} may have been applied)"
        return VendorConnectionError(
            self.vendor,
            outcome.request.method,
            self.redact(str(outcome.request.url)),
            detail=_truncate(detail),
            attempts=outcome.number,
        )

    def _http_error(self, outcome: _Attempt, response: httpx.Response) -> VendorHTTPError:
        try:
            code, detail = self._error_parser(response)
        except Exception:
            # A parser that chokes on an odd body must not hide the HTTP error itself.
            code, detail = None, _text(response.text)
        error_cls = VendorAuthError if response.status_code in (401, 403) else VendorHTTPError
        return error_cls(
            self.vendor,
            outcome.request.method,
            self.redact(str(outcome.request.url)),
            status=response.status_code,
            code=self.redact(code) if code else None,
            detail=_truncate(self.redact(_text(detail))),
            attempts=outcome.number,
        )

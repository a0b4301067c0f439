"""An HR report served at a URL: Workday report-as-a-service, BambooHR custom reports.

There are no file events, so the feed's schedule (``schedule``, a cron string, on the source)
pulls the report; each pull is hashed and becomes the partition ``<file_name>@<hash>``, so an
unchanged report maps to an existing partition and starts nothing. The pull streams into
staging, and ``hr_file`` re-reads exactly those bytes (a live report may differ a second later).

- ``method`` GET or POST (``body`` sent with ``content_type``, e.g. a BambooHR field list);
  extra ``headers`` are plain values (e.g. ``Accept: text/csv``).
- Auth: ``username``/``password`` (HTTP basic: Workday integration user, BambooHR API key with
  any password) or ``token`` (bearer). All come from ``${VAR}``; they and any credential in the
  URL's query or userinfo are redacted from errors and logs.
- Connection errors and 429/5xx are retried (3 attempts, honouring ``Retry-After``); a 200
  answer that is an HTML page (a login or error page) is refused instead of being imported.
"""

from __future__ import annotations

import base64
import time
from typing import BinaryIO

import dagster as dg
import httpx
from pydantic import Field

from audience_pipeline.destinations.http import retry_after_seconds
from audience_pipeline.redact import install_log_redaction, redact, redact_url, register_secret
from audience_pipeline.sources.base import ChunkStream, SourceFile, SourceUnavailable

ATTEMPTS = 3
BACKOFF_SECONDS = 2.0
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_MAX_RETRY_AFTER = 60.0


class HttpReportSourceResource(dg.ConfigurableResource):
    url: str
    file_name: str = "report.csv"
    method: str = "GET"
    body: str | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = Field(default_factory=dict)
    username: str | None = None
    password: str | None = None
    token: str | None = None
    timeout_seconds: float = 300.0

    def describe(self) -> str:
        return f"report {self.method} {redact_url(self.url)}"

    def list_files(self) -> list[SourceFile]:
        """The report always 'exists'; its content is only known by pulling it (size -1)."""
        return [SourceFile(self.file_name, -1, 0)]

    def _request(self, client: httpx.Client) -> httpx.Request:
        headers = dict(self.headers)
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        elif self.username is not None:
            headers["Authorization"] = _basic(self.username, self.password or "")
        content = None
        if self.body is not None:
            content = self.body.encode("utf-8")
            headers.setdefault("Content-Type", self.content_type)
        return client.build_request(self.method, self.url, headers=headers, content=content)

    def open(self, name: str) -> BinaryIO:
        """Stream the report; the caller reads and closes it (the connection closes with it)."""
        if name != self.file_name:
            raise FileNotFoundError(f"{name!r} is not this report's file name ({self.file_name!r})")
        register_secret(self.password, self.token, self.username)
        install_log_redaction(("httpx",))
        timeout = httpx.Timeout(self.timeout_seconds, connect=10.0)
        client = httpx.Client(timeout=timeout, follow_redirects=True)
        try:
            response = self._send(client)
        except BaseException:
            client.close()
            raise

        def close() -> None:
            response.close()
            client.close()

        return ChunkStream(response.iter_bytes(1 << 20), on_close=close)  # type: ignore[return-value]

    def _send(self, client: httpx.Client) -> httpx.Response:
        where = self.describe()
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = client.send(self._request(client), stream=True)
            except httpx.TransportError as exc:
                if attempt == ATTEMPTS:
                    raise SourceUnavailable(
                        f"{where}: {type(exc).__name__}: {redact(str(exc)) or 'no details'} "
                        f"(after {attempt} attempts)"
                    ) from None
                time.sleep(min(BACKOFF_SECONDS * 2 ** (attempt - 1), 10.0))
                continue
            if response.status_code == 200:
                kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if kind == "text/html":
                    response.close()
                    raise SourceUnavailable(f"{where}: answered with an HTML page, not a report")
                return response
            response.read()
            if response.status_code in _RETRY_STATUSES and attempt < ATTEMPTS:
                time.sleep(_retry_after(response, attempt))
                continue
            detail = " ".join(response.text.split())[:300]
            raise SourceUnavailable(
                f"{where}: HTTP {response.status_code}" + (f": {redact(detail)}" if detail else "")
            )
        raise AssertionError("unreachable")


def _basic(username: str, password: str) -> str:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    register_secret(token)
    return f"Basic {token}"


def _retry_after(response: httpx.Response, attempt: int) -> float:
    """The server's ``Retry-After`` (seconds or HTTP date, capped), else exponential backoff."""
    wait = retry_after_seconds(response)
    if wait is None:
        return min(BACKOFF_SECONDS * 2 ** (attempt - 1), 10.0)
    return min(wait, _MAX_RETRY_AFTER)

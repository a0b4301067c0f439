"""VendorHTTP against scripted fake vendors (httpx.MockTransport); sleeps are recorded, not slept."""

from __future__ import annotations

import email.utils
import io
import logging
import pickle
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from audience_pipeline import redact as redact_module
from audience_pipeline.destinations.http import (
    RetryPolicy,
    VendorAuthError,
    VendorConnectionError,
    VendorError,
    VendorHTTP,
    VendorHTTPError,
    parse_error_body,
)
from audience_pipeline.redact import Redactor

API_KEY = "cxi-live-9f8e7d6c5b4a39281706"
BASE_URL = "http://127.0.0.1:8000/cxi/public-api"
IMPORTS_URL = f"{BASE_URL}/audience-imports"
SIGNATURE = "5f1c0d9e8b7a6f5e4d3c2b1a09f8e7d6c5b4a3928170f6e5d4c3b2a1908f7e6d"
PRESIGNED_URL = (
    "https://uploads.s3.eu-west-1.amazonaws.com/cxi/import-42.csv"
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101%2Feu-west-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host"
    f"&X-Amz-Signature={SIGNATURE}"
)

Reply = httpx.Response | Exception


class FakeVendor:
    """Replays scripted replies in order (the last one repeats) and records every request."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    @property
    def bodies(self) -> list[bytes]:
        return [request.content for request in self.requests]


class RecordingSleep:
    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def make_client(sleep: RecordingSleep) -> Iterator[Callable[..., VendorHTTP]]:
    clients: list[VendorHTTP] = []

    def make(vendor: FakeVendor, **kwargs: Any) -> VendorHTTP:
        kwargs.setdefault("headers", {"X-API-Key": API_KEY, "Accept": "application/json"})
        client = VendorHTTP("cxi", BASE_URL, transport=httpx.MockTransport(vendor), sleep=sleep, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture(autouse=True)
def capture_everything(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)


@pytest.fixture(autouse=True)
def fresh_global_redactor(monkeypatch: pytest.MonkeyPatch) -> Redactor:
    """VendorHTTP registers its secrets process-wide; keep that from leaking between tests."""
    redactor = Redactor()
    monkeypatch.setattr(redact_module, "GLOBAL_REDACTOR", redactor)
    return redactor


def error(status: int, body: Any = None, *, text: str | None = None, **headers: str) -> httpx.Response:
    if text is not None:
        return httpx.Response(status, text=text, headers=headers)
    return httpx.Response(status, json=body, headers=headers)


def test_success_sends_credentials_and_logs_one_info_line(
    make_client: Callable[..., VendorHTTP], sleep: RecordingSleep, caplog: pytest.LogCaptureFixture
) -> None:
    vendor = FakeVendor(httpx.Response(200, json={"id": "imp-1", "state": "queued"}))
    client = make_client(vendor)

    assert client.json("GET", "/audience-imports/imp-1") == {"id": "imp-1", "state": "queued"}

    (request,) = vendor.requests
    assert str(request.url) == f"{IMPORTS_URL}/imp-1"
    assert request.headers["X-API-Key"] == API_KEY
    assert sleep.waits == []
    ours = [r for r in caplog.records if r.name == "audience_pipeline.http"]
    assert [r.levelno for r in ours] == [logging.INFO]
    message = ours[0].getMessage()
    assert message.startswith(f"cxi: GET {IMPORTS_URL}/imp-1 -> 200 in ")
    assert message.endswith(" ms (attempt 1/5)")


def test_public_headers_are_sent_but_never_masked(make_client: Callable[..., VendorHTTP]) -> None:
    vendor = FakeVendor(httpx.Response(200, json={}))
    client = make_client(vendor, public_headers={"x-sandbox-name": "prod"})

    client.json("GET", "/audience-imports")

    (request,) = vendor.requests
    assert request.headers["x-sandbox-name"] == "prod" and request.headers["X-API-Key"] == API_KEY
    assert client.redact("sandbox prod, key " + API_KEY) == "sandbox prod, key ***"


def test_json_returns_none_for_empty_body(make_client: Callable[..., VendorHTTP]) -> None:
    client = make_client(FakeVendor(httpx.Response(204)))
    assert client.json("DELETE", "audience-imports/imp-1") is None


def test_429_honours_retry_after_seconds_even_for_post(
    make_client: Callable[..., VendorHTTP], sleep: RecordingSleep, caplog: pytest.LogCaptureFixture
) -> None:
    vendor = FakeVendor(
        error(429, {"error": {"code": "rate_limited"}}, **{"Retry-After": "2"}), error(201, {})
    )
    client = make_client(vendor)

    response = client.request("POST", "audience-imports", json={"audience": "all-staff"})

    assert response.status_code == 201
    assert len(vendor.requests) == 2
    assert sleep.waits == [2.0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"cxi: POST {IMPORTS_URL} -> 429; retrying in 2.0 s as asked by Retry-After (attempt 1/5)"
    ]


@pytest.mark.parametrize(
    "retry_after",
    ["600", email.utils.format_datetime(datetime.now(UTC) + timedelta(days=1), usegmt=True)],
    ids=["seconds", "http-date"],
)
def test_retry_after_is_capped(
    make_client: Callable[..., VendorHTTP], sleep: RecordingSleep, retry_after: str
) -> None:
    vendor = FakeVendor(error(503, text="busy", **{"Retry-After": retry_after}), error(200, {}))
    make_client(vendor).request("GET", "audiences")
    assert sleep.waits == [120.0]


def test_retry_after_http_date_in_the_near_future(
    make_client: Callable[..., VendorHTTP], sleep: RecordingSleep
) -> None:
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    vendor = FakeVendor(error(429, text="slow down", **{"Retry-After": when}), error(200, {}))
    make_client(vendor).request("GET", "audiences")
    (wait,) = sleep.waits
    assert 25 <= wait <= 30


def test_503_on_post_is_retried_with_backoff(
    make_client: Callable[..., VendorHTTP], sleep: RecordingSleep
) -> None:
    vendor = FakeVendor(error(503, text="upstream unavailable"), error(202, {"id": "imp-2"}))
    client = make_client(vendor)

    assert client.json("POST", "audience-imports", json={"a": 1}) == {"id": "imp-2"}
    assert len(vendor.requests) == 2
    (wait,) = sleep.waits
    assert 0.5 <= wait <= 1.0


def test_500_on_post_is_not_retried_and_error_is_parsed(
    make_client: Callable[..., VendorHTTP], sleep: RecordingSleep
) -> None:
    vendor = FakeVendor(error(500, {"error": {"code": "internal_error", "message": "Import queue failed"}}))
    client = make_client(vendor)

    with pytest.raises(VendorHTTPError) as caught:
        client.request("POST", "audience-imports", content=b"email\nx@example.com\n")

    exc = caught.value
    assert type(exc) is VendorHTTPError
    assert len(vendor.requests) == 1
    assert sleep.waits == []
    assert (exc.vendor, exc.method, exc.url) == ("cxi", "POST", IMPORTS_URL)
    assert (exc.status, exc.code, exc.detail, exc.attempts) == (
        500,
        "internal_error",
        "Import queue failed",
        1,
    )
    assert str(exc) == f"cxi: POST {IMPORTS_URL} -> 500 internal_error: Import queue failed"


def test_error_message_a_person_can_act_on(make_client: Callable[..., VendorHTTP]) -> None:
    vendor = FakeVendor(error(400, {"error": {"code": "invalid_file", "message": "The file is empty"}}))
    with pytest.raises(VendorHTTPError) as caught:
        make_client(vendor).request("POST", "audience-imports", content=b"")
    expected = (
        "cxi: POST http://127.0.0.1:8000/cxi/public-api/audience-imports"
        " -> 400 invalid_file: The file is empty"
    )
    assert str(caught.value) == expected


def test_500_on_get_is_retried_until_attempts_are_exhausted(
    make_client: Callable[..., VendorHTTP], sleep: RecordingSleep, caplog: pytest.LogCaptureFixture
) -> None:
    vendor = FakeVendor(error(500, {"error_code": "E_DB", "message": "database unavailable"}))
    client = make_client(vendor, retry=RetryPolicy(attempts=4, backoff_base=1.0, backoff_max=3.0))

    with pytest.raises(VendorHTTPError) as caught:
        client.request("GET", "audiences")

    assert len(vendor.requests) == 4
    assert len(sleep.waits) == 3
    # base * 2**n plus up to `base` of jitter, capped at backoff_max.
    for wait, (low, high) in zip(sleep.waits, [(1.0, 2.0), (2.0, 3.0), (3.0, 3.0)], strict=True):
        assert low <= wait <= high
    assert caught.value.attempts == 4
    assert (
        str(caught.value)
        == f"cxi: GET {BASE_URL}/audiences -> 500 E_DB: database unavailable (after 4 attempts)"
    )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage().split(";")[0] for r in warnings] == [f"cxi: GET {BASE_URL}/audiences -> 500"] * 3
    infos = [
        r.getMessage()
        for r in caplog.records
        if r.name == "audience_pipeline.http" and r.levelno == logging.INFO
    ]
    assert [m.rsplit("(", 1)[1] for m in infos] == [
        "attempt 1/4)",
        "attempt 2/4)",
        "attempt 3/4)",
        "attempt 4/4)",
    ]


@pytest.mark.parametrize(
    ("method", "idempotent", "expected_requests"),
    [("POST", True, 3), ("PATCH", None, 1), ("PUT", None, 3), ("DELETE", False, 1)],
)
def test_idempotency_decides_whether_500_is_retried(
    make_client: Callable[..., VendorHTTP], method: str, idempotent: bool | None, expected_requests: int
) -> None:
    vendor = FakeVendor(error(502, text="bad gateway"))
    client = make_client(vendor, retry=RetryPolicy(attempts=3))
    with pytest.raises(VendorHTTPError):
        client.request(method, "audiences/1", idempotent=idempotent, json={})
    assert len(vendor.requests) == expected_requests


def test_non_retryable_status_is_not_retried_on_get(make_client: Callable[..., VendorHTTP]) -> None:
    vendor = FakeVendor(error(404, {"status": "not_found", "detail": "No audience 7"}))
    with pytest.raises(VendorHTTPError) as caught:
        make_client(vendor).request("GET", "audiences/7")
    assert len(vendor.requests) == 1
    assert (caught.value.code, caught.value.detail) == ("not_found", "No audience 7")


def test_expected_statuses_are_returned(make_client: Callable[..., VendorHTTP]) -> None:
    vendor = FakeVendor(error(404, text="missing"))
    response = make_client(vendor).request("GET", "audiences/7", expected=(200, 404))
    assert response.status_code == 404


def test_connect_error_is_retried_then_raises_connection_error(
    make_client: Callable[..., VendorHTTP], sleep: RecordingSleep
) -> None:
    vendor = FakeVendor(httpx.ConnectError("[Errno 111] Connection refused"))

    with pytest.raises(VendorConnectionError) as caught:
        make_client(vendor).request("POST", "audience-imports", content=b"x")

    exc = caught.value
    assert len(vendor.requests) == 5
    assert len(sleep.waits) == 4
    assert exc.status is None
    assert str(exc) == (
        f"cxi: POST {IMPORTS_URL} -> ConnectError: [Errno 111] Connection refused (after 5 attempts)"
    )
    assert exc.__cause__ is None
    assert exc.__suppress_context__


def test_connect_error_then_success(make_client: Callable[..., VendorHTTP], sleep: RecordingSleep) -> None:
    vendor = FakeVendor(httpx.ConnectTimeout("timed out"), error(201, {"id": "imp-3"}))
    assert make_client(vendor).json("POST", "audience-imports", json={}) == {"id": "imp-3"}
    assert len(sleep.waits) == 1


def test_read_timeout_on_post_is_not_retried(make_client: Callable[..., VendorHTTP]) -> None:
    vendor = FakeVendor(httpx.ReadTimeout("timed out"))
    with pytest.raises(VendorConnectionError) as caught:
        make_client(vendor).request("POST", "audience-imports", content=b"x")
    assert len(vendor.requests) == 1
    assert str(caught.value).endswith("ReadTimeout: timed out (not retried: the POST may have been applied)")


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ReadTimeout("timed out"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
)
def test_maybe_applied_failures_are_retried_when_idempotent(
    make_client: Callable[..., VendorHTTP], failure: Exception
) -> None:
    vendor = FakeVendor(failure, error(200, {"ok": True}))
    assert make_client(vendor).json("PUT", "audiences/1", json={}) == {"ok": True}
    assert len(vendor.requests) == 2


def test_auth_error_is_its_own_type(make_client: Callable[..., VendorHTTP]) -> None:
    vendor = FakeVendor(error(403, {"title": "Forbidden", "detail": "Missing scope audiences:write"}))
    with pytest.raises(VendorAuthError) as caught:
        make_client(vendor).request("GET", "audiences")
    assert caught.value.detail == "Forbidden: Missing scope audiences:write"


def test_api_key_never_leaks_even_when_the_server_echoes_it(
    make_client: Callable[..., VendorHTTP], caplog: pytest.LogCaptureFixture, fresh_global_redactor: Redactor
) -> None:
    echo = {"error": {"code": "invalid_key", "message": f"API key {API_KEY} is not valid for this account"}}
    vendor = FakeVendor(error(500, text=f"<html>key={API_KEY}</html>"), error(401, echo))
    client = make_client(vendor)

    with pytest.raises(VendorAuthError) as caught:
        client.request("GET", "audiences", params={"probe": API_KEY})

    exc = caught.value
    assert vendor.requests[0].headers["X-API-Key"] == API_KEY
    assert exc.detail == "API key *** is not valid for this account"
    assert "?probe=***" in exc.url
    for rendered in (str(exc), repr(exc), caplog.text, *[r.getMessage() for r in caplog.records]):
        assert API_KEY not in rendered
    assert API_KEY not in str(pickle.loads(pickle.dumps(exc)))
    assert API_KEY in fresh_global_redactor, "httpx's log filter and traceback formatters must know it"


def test_bearer_token_and_its_bare_value_are_redacted(make_client: Callable[..., VendorHTTP]) -> None:
    token = "eyJhbGciOiJIUzI1NiJ9.payload.sig"
    vendor = FakeVendor(error(401, {"error": "invalid_token", "error_description": f"token {token} expired"}))
    client = make_client(vendor, headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(VendorAuthError) as caught:
        client.request("GET", "audiences")
    assert caught.value.code == "invalid_token"
    assert caught.value.detail == "token *** expired"


def test_extra_secrets_are_redacted(make_client: Callable[..., VendorHTTP]) -> None:
    vendor = FakeVendor(error(400, {"error_code": 7, "message": "bad account acct-secret-77 / oauth-xyz-1"}))
    client = make_client(vendor, secrets=["acct-secret-77"])
    client.add_secrets("oauth-xyz-1")
    with pytest.raises(VendorHTTPError) as caught:
        client.request("POST", "audience-imports")
    assert caught.value.detail == "bad account *** / ***"


def test_presigned_url_is_masked_in_logs_and_errors_and_gets_no_api_key(
    make_client: Callable[..., VendorHTTP], caplog: pytest.LogCaptureFixture
) -> None:
    s3_error = (
        "<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not "
        f"match</Message><Url>{PRESIGNED_URL}</Url></Error>"
    )
    vendor = FakeVendor(error(503, text="Slow Down"), error(403, text=s3_error))
    client = make_client(vendor)

    with pytest.raises(VendorAuthError) as caught:
        client.request("PUT", PRESIGNED_URL, content=b"email\n")

    assert len(vendor.requests) == 2
    assert all(str(r.url) == PRESIGNED_URL for r in vendor.requests)
    assert all("X-API-Key" not in r.headers for r in vendor.requests)
    exc = caught.value
    for rendered in (str(exc), repr(exc), caplog.text):
        assert SIGNATURE not in rendered
        assert "AKIAIOSFODNN7EXAMPLE" not in rendered
    assert exc.url.startswith("https://uploads.s3.eu-west-1.amazonaws.com/cxi/import-42.csv?")
    assert exc.url.endswith("X-Amz-Signature=***")
    assert "X-Amz-Signature=***" in exc.detail
    assert "X-Amz-Signature=***" in caplog.text
    assert any(r.name == "httpx" for r in caplog.records), "httpx's own request line must be captured too"


def test_absolute_url_on_the_same_origin_keeps_credentials(make_client: Callable[..., VendorHTTP]) -> None:
    vendor = FakeVendor(error(200, {}))
    make_client(vendor).request("GET", f"{IMPORTS_URL}/imp-1")
    assert vendor.requests[0].headers["X-API-Key"] == API_KEY


def test_bytes_body_is_resent_identically(make_client: Callable[..., VendorHTTP]) -> None:
    payload = "email,first_name\nanna@example.com,Anna\nbo@example.com,Bø\n".encode()
    vendor = FakeVendor(error(503, text="busy"), error(429, text="busy"), error(201, {}))
    make_client(vendor).request("POST", "audience-imports", content=payload)
    assert vendor.bodies == [payload, payload, payload]


def test_seekable_file_is_rewound_before_each_attempt(make_client: Callable[..., VendorHTTP]) -> None:
    stream = io.BytesIO(b"header-to-skip|email\nanna@example.com\n")
    stream.seek(len(b"header-to-skip|"))
    vendor = FakeVendor(error(500, text="oops"), error(200, {}))
    make_client(vendor).request("PUT", "audiences/1/members", content=stream)
    assert vendor.bodies == [b"email\nanna@example.com\n"] * 2


def test_callable_body_is_called_per_attempt(make_client: Callable[..., VendorHTTP]) -> None:
    calls: list[int] = []

    def body() -> bytes:
        calls.append(1)
        return b"email\n"

    vendor = FakeVendor(error(503, text="busy"), error(200, {}))
    make_client(vendor).request("POST", "audience-imports", content=body)
    assert len(calls) == 2
    assert vendor.bodies == [b"email\n", b"email\n"]


def test_multipart_files_are_resent_on_retry(make_client: Callable[..., VendorHTTP]) -> None:
    csv_file = io.BytesIO(b"email\nanna@example.com\n")
    vendor = FakeVendor(error(503, text="busy"), error(201, {}))
    make_client(vendor).request(
        "POST",
        "audience-imports",
        files={"file": ("staff.csv", csv_file, "text/csv"), "meta": ("m.json", lambda: b'{"a":1}')},
        data={"audience": "all-staff"},
    )
    first, second = vendor.requests
    assert b"anna@example.com" in second.content
    assert b'{"a":1}' in second.content
    boundary = first.headers["Content-Type"].split("boundary=")[1].encode()
    assert first.content == second.content.replace(
        second.headers["Content-Type"].split("boundary=")[1].encode(), boundary
    )


def test_one_shot_bodies_are_rejected_up_front(make_client: Callable[..., VendorHTTP]) -> None:
    vendor = FakeVendor(error(200, {}))
    client = make_client(vendor)
    with pytest.raises(TypeError, match="cannot be resent"):
        client.request("POST", "audience-imports", content=(chunk for chunk in [b"a", b"b"]))

    class Pipe(io.RawIOBase):
        def readable(self) -> bool:
            return True

    with pytest.raises(TypeError, match="seekable"):
        client.request("POST", "audience-imports", content=Pipe())
    assert vendor.requests == []


def test_custom_error_parser_and_its_failure(make_client: Callable[..., VendorHTTP]) -> None:
    def parser(response: httpx.Response) -> tuple[str | None, str]:
        body = response.json()
        return str(body["result"]["errno"]), body["result"]["why"]

    vendor = FakeVendor(error(422, {"result": {"errno": 31, "why": "phone invalid"}}))
    with pytest.raises(VendorHTTPError) as caught:
        make_client(vendor, error_parser=parser).request("POST", "audience-imports")
    assert (caught.value.code, caught.value.detail) == ("31", "phone invalid")

    vendor = FakeVendor(error(422, text="not json at all"))
    with pytest.raises(VendorHTTPError) as caught:
        make_client(vendor, error_parser=parser).request("POST", "audience-imports")
    assert (caught.value.code, caught.value.detail) == (None, "not json at all")


def test_detail_is_truncated(make_client: Callable[..., VendorHTTP]) -> None:
    vendor = FakeVendor(error(400, text="x" * 5000))
    with pytest.raises(VendorHTTPError) as caught:
        make_client(vendor).request("POST", "audience-imports")
    assert 400 < len(caught.value.detail) <= 500
    assert len(str(caught.value)) < 600


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"error": {"code": "invalid_file", "message": "The file is empty"}},
            ("invalid_file", "The file is empty"),
        ),
        ({"error_code": "E42", "message": "Bad column"}, ("E42", "Bad column")),
        ({"status": 400, "detail": "Field 'email' is required"}, (None, "Field 'email' is required")),
        ({"error": 103, "error_text": "Database not found"}, ("103", "Database not found")),
        (
            {"type": "about:blank", "title": "Bad Request", "detail": "bad csv"},
            (None, "Bad Request: bad csv"),
        ),
        (
            {"error": "invalid_client", "error_description": "Client unknown"},
            ("invalid_client", "Client unknown"),
        ),
        ({"unexpected": "shape"}, (None, '{"unexpected":"shape"}')),
    ],
    ids=["nested", "error_code", "apsis", "altcraft", "problem", "oauth", "unknown"],
)
def test_parse_error_body_shapes(body: Any, expected: tuple[str | None, str]) -> None:
    assert parse_error_body(httpx.Response(400, json=body)) == expected


def test_parse_error_body_plain_text() -> None:
    assert parse_error_body(httpx.Response(502, text="<h1>502\n  Bad Gateway</h1>\n")) == (
        None,
        "<h1>502 Bad Gateway</h1>",
    )


def test_invalid_json_success_body_raises_vendor_error(make_client: Callable[..., VendorHTTP]) -> None:
    vendor = FakeVendor(error(200, text="<html>maintenance</html>"))
    with pytest.raises(VendorError, match="invalid_json: <html>maintenance</html>"):
        make_client(vendor).json("GET", "audiences")


def test_context_manager_closes_the_client(sleep: RecordingSleep) -> None:
    vendor = FakeVendor(error(200, {}))
    with VendorHTTP("cxi", BASE_URL, transport=httpx.MockTransport(vendor), sleep=sleep) as client:
        client.request("GET", "audiences")
    with pytest.raises(RuntimeError, match="closed"):
        client.request("GET", "audiences")
    assert len(vendor.requests) == 1


def test_retry_policy_rejects_zero_attempts() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(attempts=0)

"""ApsisClient against an in-test emulation of the documented profile-import v2 API.

The fake answers through ``httpx.MockTransport``, so everything above the HTTP boundary (token
handling, request bodies, multipart uploads, splitting, 429 waits, redaction) is the real code.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pandas as pd
import pytest

from audience_pipeline.destinations import apsis
from audience_pipeline.destinations.apsis import (
    VENDOR,
    ApsisClient,
    ApsisOptions,
    ApsisResource,
    TokenCache,
    plan_parts,
    serialise,
)
from audience_pipeline.destinations.base import ChunkJob, JobHandle, JobState, SubmitIntent
from audience_pipeline.destinations.http import (
    VendorAuthError,
    VendorError,
    VendorHTTP,
    VendorHTTPError,
)
from audience_pipeline.destinations.registry import build_resource
from audience_pipeline.feeds.loader import load_feeds
from audience_pipeline_tests.destinations.fakes import fake_http, parse_multipart
from audience_pipeline_tests.destinations.poll_retry import check_poll_retry

BASE_URL = "https://api.apsis.example.test"
SECTION = "com.apsis1.sections.hr"
CLIENT_ID = "apsis-unit-client-5e1f"
CLIENT_SECRET = "apsis-unit-secret-93ab7c"
SIGNATURE = "sig-0f3c9a7e5b1d2468ace"
POLICY = "cG9saWN5LWJsb2ItZm9yLXRlc3Rz"
ATTRIBUTES = [
    {
        "discriminator": "com.apsis1.attributes.email",
        "name": "Email",
        "type": "string",
        "version_id": "v-email",
    },
    {
        "discriminator": "com.apsis1.attributes.firstname",
        "name": "First name",
        "type": "string",
        "version_id": "v-first",
    },
    {
        "discriminator": "com.apsis1.attributes.x.dept",
        "name": "Department",
        "type": "string",
        "version_id": "v-dept",
    },
]


@dataclass
class Upload:
    url: str
    fields: list[tuple[str, str]]
    file_name: str
    content_type: str
    body: bytes
    authorization: str | None


@dataclass
class FakeApsis:
    """The documented endpoints in memory; tests set ``statuses``/``reports`` per import id."""

    tokens_issued: list[str] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=set)
    create_bodies: list[dict[str, Any]] = field(default_factory=list)
    create_answers: list[httpx.Response] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    upload_status: int = 204
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if request.url.host == "uploads.example.test":
            return self._upload(request)
        if path == "/oauth/token":
            body = json.loads(request.content)
            if (body["client_id"], body["client_secret"], body["grant_type"]) != (
                CLIENT_ID,
                CLIENT_SECRET,
                "client_credentials",
            ):
                return _error(401, f"bad client {body['client_secret']}")
            token = f"token-{len(self.tokens_issued) + 1}-a8d3f1e2"
            self.tokens_issued.append(token)
            self.valid_tokens.add(token)
            return httpx.Response(
                200, json={"access_token": token, "token_type": "Bearer", "expires_in": 3600}
            )
        if request.headers.get("Authorization", "").removeprefix("Bearer ") not in self.valid_tokens:
            return _error(401, "Unauthorized")
        if path == f"/audience/sections/{SECTION}/attributes":
            return httpx.Response(200, json={"items": ATTRIBUTES})
        if path == f"/v2/audience/sections/{SECTION}/imports" and request.method == "POST":
            if self.create_answers:
                return self.create_answers.pop(0)
            self.create_bodies.append(json.loads(request.content))
            import_id = f"imp-{len(self.create_bodies)}"
            self.statuses[import_id] = {"import_id": import_id, "status": "waiting_for_file"}
            return httpx.Response(
                201,
                json={
                    "import_id": import_id,
                    "file_upload_url": f"https://uploads.example.test/b?id={import_id}&signature={SIGNATURE}",
                    "file_upload_body": {
                        "key": f"imports/{import_id}.csv",
                        "policy": POLICY,
                        "x-signature": SIGNATURE,
                    },
                    "file_upload_url_expires_at": "2030-01-01T00:00:00.000Z",
                },
            )
        prefix = f"/audience/sections/{SECTION}/imports/"
        if path.startswith(prefix) and request.method == "GET":
            import_id, _, rest = path.removeprefix(prefix).partition("/")
            if rest == "report":
                return httpx.Response(200, json={"result": self.reports[import_id]})
            return httpx.Response(200, json={"result": self.statuses[import_id]})
        return _error(404, f"{request.method} {path}")

    def _upload(self, request: httpx.Request) -> httpx.Response:
        form = parse_multipart(request)
        self.uploads.append(
            Upload(
                str(request.url),
                form.fields,
                form.file_name,
                form.content_type,
                form.body,
                request.headers.get("Authorization"),
            )
        )
        if self.upload_status != 204:
            return httpx.Response(
                self.upload_status, json={"status": self.upload_status, "detail": "Request has expired"}
            )
        return httpx.Response(204)

    def finish(self, import_id: str, status: str, **extra: Any) -> None:
        self.statuses[import_id].update(status=status, **extra)


def _error(status: int, detail: str) -> httpx.Response:
    return httpx.Response(status, json={"status": status, "detail": detail})


@pytest.fixture
def fake() -> FakeApsis:
    return FakeApsis()


@dataclass
class Clock:
    now: float = 1_800_000_000.0  # 2027, before the fake's expiry times
    sleeps: list[float] = field(default_factory=list)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_client(fake: FakeApsis, clock: Clock, close_after: Callable) -> Callable[..., ApsisClient]:
    tokens = TokenCache()

    def make(secret: str = CLIENT_SECRET, **options: Any) -> ApsisClient:
        http = fake_http(VENDOR, BASE_URL, fake, headers={"Accept": "application/json"})
        client = ApsisClient(
            http,
            ApsisOptions(section=SECTION, **options),
            client_id=CLIENT_ID,
            client_secret=secret,
            tokens=tokens,
            clock=lambda: clock.now,
            sleep=clock.sleep,
        )
        return close_after(client)

    return make


def rows(n: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "source_line": list(range(2, n + 2)),
            "unique_id": [f"E{i}" for i in range(n)],
            "email": [f"person{i}@example.com" for i in range(n)],
            "first_name": [f"Name{i}" for i in range(n)],
            "department": ["Sales"] * n,
            "office_city": ["Oslo"] * n,
        },
        dtype="string[pyarrow]",
    ).astype({"source_line": "int64"})


def test_token_is_cached_and_refreshed_once_on_401(make_client, fake: FakeApsis) -> None:
    first = make_client()
    first.resolve_attributes(["email"])
    make_client().resolve_attributes(["email"])
    assert fake.tokens_issued == ["token-1-a8d3f1e2"]

    fake.valid_tokens.clear()  # revoked on the vendor's side
    first.resolve_attributes(["email"])
    assert len(fake.tokens_issued) == 2

    fake.valid_tokens.clear()
    fake.tokens_issued.clear()
    fake.valid_tokens.add("never-issued")
    original = fake.__call__

    def always_401(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/token":
            original(request)
            fake.valid_tokens.clear()
            return httpx.Response(200, json={"access_token": "short-lived-token-77", "expires_in": 3600})
        return original(request)

    first.http._client._transport = httpx.MockTransport(always_401)
    with pytest.raises(VendorAuthError) as info:
        first.resolve_attributes(["email"])
    assert info.value.status == 401 and "short-lived-token-77" not in str(info.value)


def test_wrong_secret_is_not_echoed(make_client) -> None:
    wrong = "wrong-secret-4d2a9f0b"
    with pytest.raises(VendorAuthError) as info:
        make_client(secret=wrong).resolve_attributes(["email"])
    assert wrong not in str(info.value) and "401" in str(info.value)


def test_import_request_resolves_attributes_and_groups_consents(make_client) -> None:
    client = make_client(
        keyspace="com.apsis1.keyspaces.email",
        key_field="email",
        update_existing_profiles=False,
        clear_existing_attributes=True,
        attributes={"department": "department", "first_name": None},
        consents=[
            {"topic": "com.apsis1.topics.news", "address_field": "email"},
            {
                "topic": "com.apsis1.topics.all",
                "channel": "com.apsis1.channels.email",
                "type": "confirmed-opt-in",
            },
        ],
    )
    body = client.import_request(["unique_id", "email", "first_name", "department"])
    assert body == {
        "keyspace_mapping": {
            "keyspace_discriminator": "com.apsis1.keyspaces.email",
            "field_selector": "email",
        },
        "options": {"update_existing_profiles": False, "clear_existing_attributes": True},
        "attribute_mappings": [
            {"field_selector": "email", "attribute_version_id": "v-email"},
            {"field_selector": "department", "attribute_version_id": "v-dept"},
        ],
        "consent_mappings": [
            {
                "address_field_selector": "email",
                "consents": [
                    {
                        "topic_discriminator": "com.apsis1.topics.news",
                        "resubscribe_if_opted_out": False,
                        "type": "opt-in",
                    },
                    {
                        "topic_discriminator": "com.apsis1.topics.all",
                        "resubscribe_if_opted_out": False,
                        "type": "confirmed-opt-in",
                        "channel_discriminator": "com.apsis1.channels.email",
                    },
                ],
            }
        ],
    }


def test_unknown_attribute_names_the_column_and_choices(make_client) -> None:
    client = make_client(attributes={"office_city": "Office city"})
    with pytest.raises(VendorError, match=r"'office_city' maps to attribute 'Office city'.*'Department'"):
        client.import_request(["unique_id", "email", "office_city"])


def test_submit_uploads_presigned_multipart_without_leaking_it(make_client, fake: FakeApsis, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    client = make_client(attributes={"department": "Department"}, file_name="staff.csv")

    handle = client.submit(rows(), feed="all_staff", partition="f.csv@1")

    assert [(j.job_id, j.first_row, j.row_count) for j in handle.jobs] == [("imp-1", 0, 3)]
    (upload,) = fake.uploads
    assert [name for name, _ in upload.fields] == ["key", "policy", "x-signature"]
    assert upload.file_name == "staff.csv" and upload.content_type == "text/csv"
    assert upload.authorization is None  # the presigned URL is the only credential
    assert list(csv.reader(io.StringIO(upload.body.decode()))) == [
        ["unique_id", "email", "first_name", "department"],
        ["E0", "person0@example.com", "Name0", "Sales"],
        ["E1", "person1@example.com", "Name1", "Sales"],
        ["E2", "person2@example.com", "Name2", "Sales"],
    ]
    stored = handle.model_dump_json()
    for secret in (SIGNATURE, POLICY, "uploads.example.test", CLIENT_SECRET, fake.tokens_issued[0]):
        assert secret not in stored
        assert secret not in caplog.text
    assert "***" in caplog.text


def test_big_upload_is_split_on_row_boundaries(make_client, fake: FakeApsis) -> None:
    frame = rows(50)
    payload, bounds = serialise(frame[["unique_id", "email", "first_name"]])
    limit = len(payload) // 4 + 7
    client = make_client(max_file_bytes=limit)

    handle = client.submit(frame, feed="f", partition="p")

    assert len(handle.jobs) == len(fake.uploads) == 5
    assert all(len(u.body) <= limit for u in fake.uploads)
    assert handle.extra["part_bytes"] == [len(u.body) for u in fake.uploads]
    header = payload[: bounds[0]]
    assert all(u.body.startswith(header) for u in fake.uploads)
    assert b"".join(u.body[len(header) :] for u in fake.uploads) == payload[len(header) :]
    expected_first = 0
    for job, upload in zip(handle.jobs, fake.uploads, strict=True):
        assert job.first_row == expected_first
        assert job.row_count == upload.body.count(b"\n") - 1
        first_id = next(csv.reader(io.StringIO(upload.body.decode().splitlines()[1])))[0]
        assert first_id == f"E{job.first_row}"
        expected_first += job.row_count
    assert expected_first == 50
    assert [u.file_name for u in fake.uploads][:2] == ["f-part1of5.csv", "f-part2of5.csv"]


def test_plan_parts_refuses_a_row_that_cannot_fit_and_serialise_refuses_line_breaks() -> None:
    _, bounds = serialise(pd.DataFrame({"a": ["x" * 100]}))
    with pytest.raises(ValueError, match="row 0 alone needs"):
        plan_parts(bounds, 50)
    with pytest.raises(ValueError, match="line break"):
        serialise(pd.DataFrame({"a": ["two\nlines"]}))


def test_429_waits_for_retry_after_then_goes_on(make_client, fake: FakeApsis, clock: Clock) -> None:
    busy = _error(429, "Pending import count limit reached")
    busy.headers["Retry-After"] = "7"
    fake.create_answers = [busy, busy, _error(429, "no header")]

    handle = make_client().submit(rows(), feed="f", partition="p")

    assert clock.sleeps == [7.0, 7.0, 5.0]
    assert [j.job_id for j in handle.jobs] == ["imp-1"]


def test_429_beyond_the_pending_wait_fails_with_a_clear_message(
    make_client, fake: FakeApsis, clock: Clock
) -> None:
    busy = _error(429, "Pending import count limit reached")
    busy.headers["Retry-After"] = "60"
    fake.create_answers = [busy] * 10

    with pytest.raises(VendorHTTPError, match="three imports pending after 120 s") as info:
        make_client(pending_wait_seconds=150).submit(rows(), feed="f", partition="p")
    assert info.value.status == 429 and clock.sleeps == [60.0, 60.0]


def test_status_combines_parts_and_treats_a_lost_upload_as_failed(
    make_client, fake: FakeApsis, clock: Clock
) -> None:
    client = make_client(max_file_bytes=80)
    handle = client.submit(rows(3), feed="f", partition="p")
    assert len(handle.jobs) == 3

    assert client.status(handle).state is JobState.PENDING
    fake.finish("imp-1", "completed")
    fake.finish("imp-2", "importing")
    status = client.status(handle)
    assert status.state is JobState.RUNNING and status.vendor_status == "completed+importing+waiting_for_file"

    fake.finish("imp-2", "completed")
    fake.statuses["imp-3"]["file_upload_url_expires_at"] = "2030-01-01T00:00:00.000Z"
    assert client.status(handle).state is JobState.RUNNING
    clock.now = 1_893_456_000.0 + 61  # 2030-01-01 plus the grace minute
    status = client.status(handle)
    assert status.state is JobState.FAILED and status.vendor_status == "completed+upload_url_expired"


def test_failed_upload_is_recorded_redacted_and_fails_its_rows(make_client, fake: FakeApsis) -> None:
    fake.upload_status = 403
    client = make_client()

    handle = client.submit(rows(), feed="f", partition="p")

    error = handle.extra["upload_errors"]["imp-1"]
    assert "403" in error and "Request has expired" in error
    assert SIGNATURE not in error and "uploads.example.test" not in error
    status = client.status(handle)
    assert status.state is JobState.FAILED and status.vendor_status == "upload_failed"
    outcome = client.outcome(handle)
    assert outcome.failed == 3 and outcome.imported == 0
    assert "never received its file" in outcome.failures[0].reason
    assert "force: true" in outcome.failures[0].reason


def test_outcome_maps_report_lines_to_submitted_rows(make_client, fake: FakeApsis) -> None:
    client = make_client(max_file_bytes=120)
    handle = client.submit(rows(6), feed="f", partition="p")
    assert [(j.first_row, j.row_count) for j in handle.jobs] == [(0, 2), (2, 2), (4, 2)]
    fake.finish("imp-1", "completed")
    fake.reports["imp-1"] = {
        "statistics": {"total_rows": 2, "created_profiles": 1, "updated_profiles": 0, "failed_rows": 1},
        "errors": [
            {"line": 3, "field_selector": "email", "code": "invalid_email", "message": "bad email"},
            {"line": 3, "field_selector": None, "code": "x", "message": "also bad"},
            {"line": 9, "field_selector": None, "code": "x", "message": "far away"},
        ],
        "skipped": [],
    }
    fake.finish("imp-2", "completed")
    fake.reports["imp-2"] = {
        "statistics": {"total_rows": 2, "created_profiles": 0, "updated_profiles": 1, "skipped_rows": 1},
        "errors": [],
        "skipped": [{"line": 2, "field_selector": "unique_id", "code": "profile_exists", "message": "kept"}],
    }
    fake.finish("imp-3", "error", error={"code": "import_failed", "detail": "Invalid file encoding"})

    outcome = client.outcome(handle)

    got = [(f.row, f.outcome, f.reason) for f in outcome.failures]
    assert got[:2] == [(1, "failed", "email: bad email; also bad"), (2, "ignored", "unique_id: kept")]
    assert [r for r, _, _ in got[2:]] == [4, 5]
    assert "ended in error (Invalid file encoding)" in got[2][2] and "none of its 2 rows" in got[2][2]
    assert outcome.imported == 2 and outcome.failed == 3 and outcome.ignored == 1
    assert outcome.vendor_counts["processed"] == 2
    assert outcome.notes == ["import imp-1: line 9 outside the upload: far away"]


def test_options_name_feed_columns() -> None:
    options = ApsisOptions(
        section="s",
        key_field="employee_no",
        attributes={"dept": "Department"},
        consents=[{"topic": "t", "address_field": "mobile_phone"}],
    )
    problems = options.column_problems(["unique_id", "email", "department"])
    assert [key for key, _ in problems] == ["key_field", "attributes", "consents"]
    assert options.upload_columns(["unique_id", "email", "department"]) == ["email"]
    with pytest.raises(ValueError):
        ApsisOptions(section="s", max_file_bytes=60_000_000)


def test_feeds_file_with_apsis_loads_and_secrets_stay_env_vars(tmp_path: Path) -> None:
    feeds = tmp_path / "feeds.yaml"
    feeds.write_text(
        "sources: {hr: {type: folder, path: in}}\n"
        "destinations:\n"
        "  apsis: {type: apsis_one, base_url: '${APSIS_URL}', client_id: '${APSIS_ID}',\n"
        "          client_secret: '${APSIS_SECRET}'}\n"
        "feeds:\n"
        "  - name: staff\n    source: hr\n    destination: apsis\n"
        "    mapping: {unique_id: Id, email: Email}\n"
        "    options: {section: s1, attributes: {department: Department}}\n",
        "utf-8",
    )
    with pytest.raises(Exception, match=r"feeds\[0\]\.options\.attributes: 'department' is not a column"):
        load_feeds(feeds)
    feeds.write_text(feeds.read_text("utf-8").replace("{department: Department}", "{email: Email}"), "utf-8")

    loaded = load_feeds(feeds)

    resource = build_resource(loaded.destinations["apsis"])
    assert isinstance(resource, ApsisResource)
    assert isinstance(resource.client_secret, dg.EnvVar) and resource.client_secret == "APSIS_SECRET"
    assert isinstance(resource.client_id, dg.EnvVar)


def test_an_unknown_import_status_makes_the_import_unknown_and_is_named(make_client, fake: FakeApsis) -> None:
    client = make_client(max_file_bytes=80)
    handle = client.submit(rows(2), feed="f", partition="p")
    fake.finish("imp-1", "validating")
    fake.finish("imp-2", "completed")

    status = client.status(handle)
    assert (status.state, status.vendor_status) == (JobState.UNKNOWN, "completed+validating")
    with pytest.raises(VendorError, match="still validating"):
        client.outcome(handle)


@pytest.mark.parametrize(
    ("update", "resend"),
    [(True, "updates the same profiles (update_existing_profiles)"), (False, "skips profiles that exist")],
)
def test_reconcile_cannot_tell_and_says_why_a_resend_is_safe(
    make_client, fake: FakeApsis, update: bool, resend: str
) -> None:
    intent = SubmitIntent(feed="f", partition="p", sha256="0" * 64, attempt=2, recorded_at=0.0, rows=3)
    found = make_client(update_existing_profiles=update).reconcile(intent, rows())
    assert (found.handle, found.certain) == (None, False)
    assert found.detail.startswith(f"{VENDOR}: the document has no way to list imports")
    assert resend in found.detail and fake.requests == []


def test_the_retry_policy_reaches_the_http_client_so_a_sensor_429_raises_at_once(
    monkeypatch: pytest.MonkeyPatch, fake: FakeApsis
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/token":
            return fake(request)
        return httpx.Response(429, headers={"Retry-After": "3600"}, json={"status": 429, "detail": "slow"})

    sleeps: list[float] = []

    def wired(*args: Any, **kwargs: Any) -> VendorHTTP:
        return VendorHTTP(*args, **kwargs, transport=httpx.MockTransport(handler), sleep=sleeps.append)

    monkeypatch.setattr(apsis, "VendorHTTP", wired)
    monkeypatch.setattr(apsis, "TOKENS", TokenCache())
    resource = ApsisResource(base_url=BASE_URL, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    job = ChunkJob(job_id="imp-1", first_row=0, row_count=1)
    handle = JobHandle(
        vendor=VENDOR, feed="f", partition="p", jobs=[job], submitted_rows=1, extra={"section": SECTION}
    )

    check_poll_retry(lambda retry: resource.destination({"section": SECTION}, retry=retry), handle, sleeps)


def _status_reads(fake: FakeApsis, since: int) -> list[str]:
    """Status polls (not report reads) among the requests since ``since``."""
    prefix = f"/audience/sections/{SECTION}/imports/"
    return [
        r.url.path
        for r in fake.requests[since:]
        if r.method == "GET" and r.url.path.startswith(prefix) and not r.url.path.endswith("/report")
    ]


def test_outcome_does_not_poll_a_status_already_known(make_client, fake: FakeApsis) -> None:
    client = make_client(max_file_bytes=120)
    handle = client.submit(rows(6), feed="f", partition="p")
    for import_id in ("imp-1", "imp-2", "imp-3"):
        fake.finish(import_id, "completed")
        fake.reports[import_id] = {"statistics": {"total_rows": 2, "created_profiles": 2}, "errors": []}
    status = client.status(handle)
    assert status.state is JobState.SUCCEEDED
    before = len(fake.requests)

    assert client.outcome(handle, status=status).imported == 6  # status() read every part
    assert make_client().outcome(handle, status=status).imported == 6  # SUCCEEDED: every part completed

    assert _status_reads(fake, before) == [] and len(fake.requests[before:]) == 6  # the reports only


def test_outcome_of_one_part_in_error_takes_the_reason_from_the_known_status(
    make_client, fake: FakeApsis
) -> None:
    handle = make_client().submit(rows(2), feed="f", partition="p")
    fake.finish("imp-1", "error", error={"code": "import_failed", "detail": "Invalid file encoding"})
    status = make_client().status(handle)
    assert (status.state, status.vendor_status, status.detail) == (
        JobState.FAILED, "error", "Invalid file encoding",
    )  # fmt: skip
    before = len(fake.requests)

    outcome = make_client().outcome(handle, status=status)

    assert fake.requests[before:] == []
    assert outcome.failed == 2 and "ended in error (Invalid file encoding)" in outcome.failures[0].reason

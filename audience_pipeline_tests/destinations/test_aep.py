"""AepClient against an in-test emulation of IMS, the external-audiences API and the landing zone.

``httpx.MockTransport`` answers, so token caching, headers, request bodies, the 409 wait, the
data-filter window and error redaction are the real code.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from audience_pipeline.destinations import aep
from audience_pipeline.destinations.aep import VENDOR, AepClient, AepOptions, AepResource, ImsAuth
from audience_pipeline.destinations.aep_storage import DlzStorageOptions, LandingZone
from audience_pipeline.destinations.base import ChunkJob, JobHandle, JobState, SubmitIntent
from audience_pipeline.destinations.http import RetryPolicy, VendorAuthError, VendorHTTP, VendorHTTPError
from audience_pipeline.feeds.loader import FeedsFileError, load_feeds
from audience_pipeline_tests.destinations.poll_retry import check_poll_retry

CLIENT_ID = "aep-unit-client-5c2e8f"
SECRET = "aep-unit-secret-9d41b7a2"
ORG = "UNIT0000@AdobeOrg"
SIG = "unitSasSignature0123456789"
BASE = "https://platform.example.test"
IMS = "https://ims.example.test"
MTIME = 1_790_000_000.0
AIS = "/data/core/ais"


@dataclass
class FakeAep:
    audiences: list[dict[str, Any]] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)
    conflicts: int = 0
    run_status: dict[str, Any] = field(default_factory=lambda: {"status": "SUCCESS", "details": []})
    blobs: dict[str, bytes] = field(default_factory=dict)
    sas_refusals: int = 0
    sas_error: str = "AuthenticationFailed"
    runs: list[dict[str, Any]] = field(default_factory=list)
    operations: dict[str, dict[str, Any] | list[dict[str, Any]]] | None = None
    """Operation id -> its answer, or answers in turn (the last one stays)."""
    refuse: dict[str, int] = field(default_factory=dict)
    """Path suffix -> status answered for GETs of it (e.g. an endpoint the vendor does not offer)."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path, method = request.url.path, request.method
        if request.url.host == "ims.example.test":
            form = dict(x.split("=", 1) for x in request.content.decode().split("&"))
            if form.get("client_secret") != SECRET:
                return httpx.Response(
                    401, json={"error": "invalid_client", "error_description": f"bad {SECRET}"}
                )
            token = f"token-{uuid.uuid4()}"
            self.tokens.append(token)
            self.valid.add(token)
            return httpx.Response(200, json={"access_token": token, "expires_in": 86399})
        if request.url.host == "dlz.example.test":
            assert "authorization" not in request.headers and "x-api-key" not in request.headers
            assert request.headers["x-ms-blob-type"] == "BlockBlob" and request.url.params["sig"] == SIG
            if self.sas_refusals:
                self.sas_refusals -= 1
                xml = (
                    f"<?xml version='1.0'?><Error><Code>{self.sas_error}</Code><Message>Server failed to "
                    "authenticate the request.</Message><AuthenticationErrorDetail>Signature not valid in "
                    "the specified time frame</AuthenticationErrorDetail></Error>"
                )
                return httpx.Response(403, text=xml, headers={"x-ms-error-code": self.sas_error})
            self.blobs[path] = request.read()
            return httpx.Response(201, headers={"Last-Modified": formatdate(MTIME, usegmt=True)})
        assert request.headers["x-sandbox-name"] == "prod" and request.headers["x-api-key"] == CLIENT_ID
        if request.headers.get("authorization", "").removeprefix("Bearer ") not in self.valid:
            return httpx.Response(401, json={"error_code": "100920-401", "message": "token expired"})
        for suffix, status in self.refuse.items():
            if method == "GET" and path.endswith(suffix):
                return httpx.Response(status, json={"error_code": f"100940-{status}", "message": path})
        if path.endswith("/landingzone/credentials"):
            token = f"sv=2020-10-02&sr=c&sp=racwdl&sig={SIG}"
            uri = f"https://dlz.example.test/dlz-user-container?{token}"
            return httpx.Response(
                200, json={"containerName": "dlz-user-container", "SASToken": token, "SASUri": uri}
            )
        if path == f"{AIS}/external-audiences":
            return httpx.Response(200, json={"audiences": self.audiences})
        if path == f"{AIS}/external-audience/" and method == "POST":
            body = json.loads(request.content)
            if any(a.get("customAudienceId") == body["customAudienceId"] for a in self.audiences):
                message = f"An external audience with customAudienceId {body['customAudienceId']!r} exists"
                return httpx.Response(409, json={"error_code": "100950-409", "message": message})
            return httpx.Response(202, json={"operationId": "op-1", "operationDetails": body})
        if path.startswith(f"{AIS}/external-audiences/operations/"):
            if self.operations is None:
                return httpx.Response(200, json={"operationId": "op-1", **self.run_status})
            op_id = path.rsplit("/", 1)[-1]
            if op_id not in self.operations:
                return httpx.Response(404, json={"error_code": "100940-404", "message": op_id})
            answer = self.operations[op_id]
            if isinstance(answer, list):
                answer = answer.pop(0) if len(answer) > 1 else answer[0]
            return httpx.Response(200, json={"operationId": op_id, **answer})
        if path.endswith("/runs") and method == "POST":
            if self.conflicts:
                self.conflicts -= 1
                return httpx.Response(409, json={"error_code": "100950-409", "message": "run in progress"})
            return httpx.Response(200, json={"runId": "run-1", **json.loads(request.content)})
        if path.endswith("/runs"):
            return httpx.Response(200, json={"runs": self.runs})
        if "/runs/" in path:
            return httpx.Response(200, json={"runId": "run-1", **self.run_status})
        if method == "PATCH":
            return httpx.Response(200, json={})
        if method == "GET" and path.startswith(f"{AIS}/external-audience/"):
            wanted = path.rsplit("/", 1)[-1]
            for audience in self.audiences:
                if audience["audienceId"] == wanted:
                    return httpx.Response(200, json={**audience, "status": "ACTIVE"})
        return httpx.Response(404, json={"error_code": "100940-404", "message": path})

    def bodies(self, method: str, suffix: str) -> list[dict[str, Any]]:
        return [
            json.loads(r.content) for r in self.requests if r.method == method and r.url.path.endswith(suffix)
        ]


@pytest.fixture(autouse=True)
def _no_cached_tokens():
    aep._TOKENS.clear()
    yield
    aep._TOKENS.clear()


def make_client(fake: FakeAep, sleeps: list[float] | None = None, **options: Any) -> AepClient:
    transport = httpx.MockTransport(fake)
    auth = ImsAuth(IMS, CLIENT_ID, client_secret=SECRET, scopes="openid", transport=transport)
    http = VendorHTTP(
        VENDOR,
        BASE,
        headers={"x-api-key": CLIENT_ID, "x-gw-ims-org-id": ORG},
        public_headers={"x-sandbox-name": "prod"},
        transport=transport,
        retry=RetryPolicy(attempts=1),
    )
    defaults: dict[str, Any] = {"poll_interval_seconds": 0.5, "run_wait_seconds": 10}
    opts = AepOptions(
        audience_name="All staff", attribute_types={"start_date": "date"}, **{**defaults, **options}
    )
    client = AepClient(http, auth, opts, sleep=(sleeps if sleeps is not None else []).append)
    client.storage = LandingZone(
        VENDOR, DlzStorageOptions(folder="hr"), client.landing_zone_credentials, transport=transport
    )
    return client


def rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "unique_id": ["E1", "E2", "E3"],
            "email": ["a@x.com", None, "c@x.com"],
            "start_date": ["2024-01-02", "2024-02-03", None],
            "source_line": [2, 3, 4],
        }
    ).astype({"unique_id": "str", "email": "str", "start_date": "str"})


def existing_audience(**changes: Any) -> dict[str, Any]:
    fields = [
        {"name": "unique_id", "type": "string"},
        {"name": "email", "type": "string", "identityNs": "email"},
        {"name": "start_date", "type": "date"},
    ]
    return {"audienceId": "aud-1", "customAudienceId": "audience_pipeline.staff", "fields": fields,
            "labels": [], "ttlInDays": 30, **changes}  # fmt: skip


def test_first_push_uploads_to_the_landing_zone_and_creates_a_typed_audience() -> None:
    fake = FakeAep()
    handle = make_client(fake).submit(rows(), feed="staff", partition="p@1")

    [create] = fake.bodies("POST", "/external-audience/")
    assert create["customAudienceId"] == "audience_pipeline.staff" and create["originName"] == "CUSTOM_UPLOAD"
    assert create["fields"] == existing_audience()["fields"]
    assert create["sourceSpec"] == {
        "params": {"path": "dlz-user-container/hr/staff.csv", "type": "file",
                   "sourceType": "Cloud Storage", "cloudType": "DLZ"}
    }  # fmt: skip
    assert fake.blobs["/dlz-user-container/hr/staff.csv"].decode().splitlines() == [
        "unique_id,email,start_date",
        "E1,a@x.com,2024-01-02",
        "E3,c@x.com,",
    ]
    assert handle.extra["kind"] == "operation" and handle.jobs[0].job_id == "op-1"
    assert handle.extra["not_sent_rows"] == [1] and handle.submitted_rows == 3


def test_token_is_cached_across_clients_and_renewed_after_a_401() -> None:
    fake = FakeAep(run_status={"status": "PROCESSING"})
    handle = make_client(fake).submit(rows(), feed="staff", partition="p@1")
    assert make_client(fake).status(handle).state is JobState.RUNNING
    assert len(fake.tokens) == 1
    fake.valid.clear()  # the token expired early
    assert make_client(fake).status(handle).state is JobState.RUNNING
    assert len(fake.tokens) == 2


def test_later_push_patches_waits_for_the_running_ingestion_and_starts_a_windowed_run() -> None:
    fake = FakeAep(audiences=[existing_audience(ttlInDays=60, labels=["C1"])], conflicts=2)
    sleeps: list[float] = []
    handle = make_client(fake, sleeps).submit(rows(), feed="staff", partition="p@2")

    assert fake.bodies("PATCH", "/aud-1") == [{"labels": [], "ttlInDays": 30}]
    assert sleeps == [0.5, 0.5]
    assert fake.bodies("POST", "/runs")[-1] == {
        "dataFilterStartTime": int(MTIME),
        "dataFilterEndTime": int(MTIME) + 1,
    }
    assert handle.extra["kind"] == "run" and handle.jobs[0].job_id == "run-1"


def test_a_busy_audience_fails_with_a_clear_message_after_the_wait() -> None:
    fake = FakeAep(audiences=[existing_audience()], conflicts=10_000)
    client = make_client(fake, run_wait_seconds=0)
    with pytest.raises(Exception, match="still in progress after 0 s"):
        client.submit(rows(), feed="staff", partition="p@2")


def test_field_changes_the_api_cannot_patch_are_refused() -> None:
    fields = [
        {"name": "unique_id", "type": "string"},
        {"name": "email", "type": "string", "identityNs": "email"},
    ]
    fake = FakeAep(audiences=[existing_audience(fields=fields)])
    with pytest.raises(ValueError, match="fields cannot be changed"):
        make_client(fake).submit(rows(), feed="staff", partition="p@2")
    assert not fake.blobs


def test_a_failed_run_fails_every_sent_row_with_its_stage_and_the_rest_for_missing_identity() -> None:
    details = [
        {"stage": "DATASET_INGEST", "status": "SUCCESS"},
        {"stage": "PROFILE_STORE_INGEST", "status": "FAILED", "message": "store down"},
    ]
    fake = FakeAep(audiences=[existing_audience()], run_status={"status": "FAILED", "details": details})
    client = make_client(fake)
    handle = client.submit(rows(), feed="staff", partition="p@2")
    assert client.status(handle).state is JobState.FAILED

    outcome = client.outcome(handle)
    assert [(f.row, f.outcome) for f in outcome.failures] == [(0, "failed"), (1, "failed"), (2, "failed")]
    assert "no email value" in outcome.failures[1].reason
    assert "stage PROFILE_STORE_INGEST FAILED: store down" in outcome.failures[0].reason
    assert outcome.imported == 0 and "processed" not in outcome.vendor_counts
    assert any("no row-level results" in n for n in outcome.notes)


def test_a_succeeded_run_imports_every_sent_row() -> None:
    fake = FakeAep(audiences=[existing_audience()])
    client = make_client(fake)
    outcome = client.outcome(client.submit(rows(), feed="staff", partition="p@2"))
    assert outcome.imported == 2 and [f.row for f in outcome.failures] == [1]


def test_credentials_never_appear_in_errors() -> None:
    fake = FakeAep()
    transport = httpx.MockTransport(fake)
    auth = ImsAuth(IMS, CLIENT_ID, client_secret=SECRET + "-wrong", transport=transport)
    with pytest.raises(VendorAuthError) as caught:
        auth.token()
    assert "401" in str(caught.value) and SECRET not in str(caught.value)


def test_options_are_checked_and_typed_from_the_mapping_when_the_feeds_file_loads(tmp_path: Path) -> None:
    text = """
sources: {drop: {type: folder, path: in}}
destinations:
  aep: {type: adobe_experience_platform, client_id: "${ID}", client_secret: "${S}", org_id: "${O}"}
feeds:
  - name: staff
    source: drop
    destination: aep
    mapping:
      unique_id: Id
      email: Email
      attributes: {start: {header: Start, type: date}, level: {header: Level, type: integer}}
    options: {audience_name: Staff, identity_field: %s}
"""
    good = tmp_path / "good.yaml"
    good.write_text(text % "email", "utf-8")
    options = AepOptions.model_validate(load_feeds(good).feeds[0].options)
    assert options.attribute_types == {"start": "date", "level": "integer"}
    assert [f["type"] for f in options.fields(["unique_id", "email", "start", "level"])] == [
        "string", "string", "date", "integer",
    ]  # fmt: skip
    bad = tmp_path / "bad.yaml"
    bad.write_text(text % "mobile_phone", "utf-8")
    with pytest.raises(FeedsFileError, match=r"feeds\[0\]\.options\.identity_field"):
        load_feeds(bad)


def _dlz_requests(fake: FakeAep) -> tuple[int, int]:
    """(credential fetches, blob PUTs) the client made."""
    creds = sum(r.url.path.endswith("/landingzone/credentials") for r in fake.requests)
    return creds, sum(r.url.host == "dlz.example.test" for r in fake.requests)


def test_a_refused_sas_is_fetched_again_and_the_upload_retried_once(caplog) -> None:
    fake = FakeAep(sas_refusals=1)
    handle = make_client(fake).submit(rows(), feed="staff", partition="p@1")

    assert _dlz_requests(fake) == (2, 2)
    assert "/dlz-user-container/hr/staff.csv" in fake.blobs and handle.extra["kind"] == "operation"
    [warning] = [r.getMessage() for r in caplog.records if "refused the SAS" in r.getMessage()]
    assert "dlz-user-container" in warning and "Signature not valid" in warning and SIG not in warning


def test_a_sas_refused_twice_fails_naming_the_container_never_the_sas() -> None:
    fake = FakeAep(sas_refusals=2)
    with pytest.raises(VendorAuthError) as caught:
        make_client(fake).submit(rows(), feed="staff", partition="p@1")

    message = str(caught.value)
    assert "Data Landing Zone container dlz-user-container, blob hr/staff.csv -> 403" in message
    assert "AuthenticationFailed" in message and "refused again with freshly fetched credentials" in message
    assert SIG not in message and "sig=" not in message
    assert _dlz_requests(fake) == (2, 2) and fake.bodies("POST", "/external-audience/") == []


def test_other_landing_zone_refusals_are_not_retried() -> None:
    fake = FakeAep(sas_refusals=1, sas_error="AuthorizationPermissionMismatch")
    with pytest.raises(VendorAuthError, match="AuthorizationPermissionMismatch"):
        make_client(fake).submit(rows(), feed="staff", partition="p@1")
    assert _dlz_requests(fake) == (2 - 1, 1)


def test_the_upload_streams_the_file_from_disk(tmp_path: Path) -> None:
    """64 KiB reads with a Content-Length (Put Blob needs one), never one bytes object of the file."""
    chunks: list[int] = []
    seen: dict[str, str] = {}

    class BlobStore(httpx.BaseTransport):  # MockTransport would read the whole body first
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            seen.update(request.headers)
            assert isinstance(request.stream, httpx.SyncByteStream)
            chunks.extend(len(chunk) for chunk in request.stream)
            return httpx.Response(201, headers={"Last-Modified": formatdate(MTIME, usegmt=True)})

    def credentials() -> dict[str, str]:
        token = f"sv=2020-10-02&sr=c&sp=racwdl&sig={SIG}"
        return {"containerName": "c", "SASToken": token, "SASUri": f"https://dlz.example.test/c?{token}"}

    local = tmp_path / "big.csv"
    local.write_bytes(b"unique_id,email\n" + b"E1,a@x.com\n" * 100_000)
    zone = LandingZone(VENDOR, DlzStorageOptions(), credentials, transport=BlobStore())
    stored = zone.upload(local, "big.csv")

    size = local.stat().st_size
    assert stored.size == size and int(seen["content-length"]) == size
    assert sum(chunks) == size and len(chunks) > 10 and max(chunks) <= 65_536


RECORDED_AT = 1_800_000_000.0


def intent(*known: str) -> SubmitIntent:
    return SubmitIntent(
        feed="staff",
        partition="p@2",
        sha256="0" * 64,
        attempt=2,
        recorded_at=RECORDED_AT,
        rows=3,
        known_job_ids=frozenset(known),
    )


def run(run_id: str, created_at: float | None, status: str = "SUCCESS") -> dict[str, Any]:
    body: dict[str, Any] = {"runId": run_id, "audienceId": "aud-1", "status": status}
    if created_at is not None:
        body["createdAt"] = int(created_at)
    return body


def dlz_audience() -> dict[str, Any]:
    spec = {"params": {"path": "dlz-user-container/hr/staff.csv", "type": "file",
                       "sourceType": "Cloud Storage", "cloudType": "DLZ"}}  # fmt: skip
    return existing_audience(sourceSpec=spec)


def test_reconcile_adopts_the_unrecorded_run_started_since_the_intent() -> None:
    fake = FakeAep(
        audiences=[dlz_audience()],
        runs=[run("run-0", RECORDED_AT - 86_400), run("run-7", RECORDED_AT - 30)],
    )
    client = make_client(fake)
    found = client.reconcile(intent("run-0"), rows())

    assert found.certain and found.handle is not None and "run-7" in found.detail
    handle = found.handle
    assert [(j.job_id, j.first_row, j.row_count) for j in handle.jobs] == [("run-7", 0, 3)]
    assert (handle.feed, handle.partition, handle.submitted_rows) == ("staff", "p@2", 3)
    assert handle.extra == {
        "custom_audience_id": "audience_pipeline.staff",
        "source_path": "dlz-user-container/hr/staff.csv",
        "cloud_type": "DLZ",
        "not_sent_rows": [1],
        "kind": "run",
        "audience_id": "aud-1",
    }
    submitted = client.submit(rows(), feed="staff", partition="p@2")
    assert submitted.extra == {**handle.extra, "kind": "run"} and set(submitted.extra) == set(handle.extra)

    fake.run_status = {"status": "PROCESSING"}
    assert client.status(handle).state is JobState.RUNNING
    assert fake.requests[-1].url.path == f"{AIS}/external-audience/aud-1/runs/run-7"


@pytest.mark.parametrize(
    ("runs", "known", "operations"),
    [
        pytest.param([run("run-0", RECORDED_AT - 3600)], (), None, id="an-older-run"),
        pytest.param([run("run-0", RECORDED_AT + 5)], ("run-0",), None, id="only-a-recorded-run"),
        pytest.param([], ("run-x", "op-1"), {"op-1": {"status": "SUCCESS", "audienceId": "aud-1"}},
                     id="created-by-a-recorded-operation"),
    ],
)  # fmt: skip
def test_reconcile_says_nothing_arrived_when_the_audience_predates_the_intent_and_has_no_new_run(
    runs: list[dict[str, Any]], known: tuple[str, ...], operations: dict[str, Any] | None
) -> None:
    fake = FakeAep(audiences=[existing_audience()], runs=runs, operations=operations)
    found = make_client(fake).reconcile(intent(*known), rows())
    assert (found.handle, found.certain) == (None, True)
    assert "no ingestion run on audience aud-1" in found.detail
    assert fake.bodies("POST", "/runs") == [] and not fake.blobs


@pytest.mark.parametrize(
    ("fake", "why"),
    [
        pytest.param(
            FakeAep(audiences=[existing_audience()], refuse={"/runs": 404}),
            "listing the ingestion runs of audience aud-1 answered 404",
            id="runs-list-404",
        ),
        pytest.param(
            FakeAep(audiences=[existing_audience()], refuse={"/external-audiences": 405}),
            "by customAudienceId (not in the vendor document) answered 405",
            id="audience-lookup-405",
        ),
        pytest.param(FakeAep(), "no audience 'audience_pipeline.staff' is listed", id="no-audience"),
        pytest.param(
            FakeAep(audiences=[existing_audience()], operations={"op-9": {"status": "SUCCESS",
                                                                          "audienceId": "aud-other"}}),
            "so that submit may have created it",
            id="audience-maybe-created-by-the-lost-submit",
        ),
        pytest.param(
            FakeAep(audiences=[existing_audience()], runs=[run("a", RECORDED_AT), run("b", RECORDED_AT + 9)]),
            "2 runs this pipeline never recorded",
            id="two-new-runs",
        ),
        pytest.param(
            FakeAep(audiences=[existing_audience()], runs=[run("a", None)]),
            "have no createdAt",
            id="undated-run",
        ),
    ],
)  # fmt: skip
def test_reconcile_cannot_tell(fake: FakeAep, why: str) -> None:
    found = make_client(fake).reconcile(intent("op-9"), rows())
    assert (found.handle, found.certain) == (None, False)
    assert found.detail.startswith(f"{VENDOR}: ") and why in found.detail


def test_reconcile_raises_other_errors() -> None:
    fake = FakeAep(audiences=[existing_audience()], refuse={"/runs": 500})
    with pytest.raises(VendorHTTPError, match="500"):
        make_client(fake).reconcile(intent(), rows())


def test_an_unknown_status_word_is_unknown_and_kept() -> None:
    fake = FakeAep(audiences=[existing_audience()], run_status={"status": "QUEUED", "details": []})
    client = make_client(fake)
    handle = client.submit(rows(), feed="staff", partition="p@2")
    status = client.status(handle)
    assert (status.state, status.vendor_status) == (JobState.UNKNOWN, "QUEUED")


def _resource_client(
    monkeypatch: pytest.MonkeyPatch, handler: Any, sleeps: list[float], retry: RetryPolicy | None
) -> AepClient:
    """``AepResource.destination`` with every VendorHTTP it builds answered by ``handler``."""
    transport = httpx.MockTransport(handler)

    def wired(*args: Any, **kwargs: Any) -> VendorHTTP:
        kwargs["transport"] = kwargs.get("transport") or transport
        return VendorHTTP(*args, **kwargs, sleep=sleeps.append)

    monkeypatch.setattr(aep, "VendorHTTP", wired)
    resource = AepResource(base_url=BASE, ims_url=IMS, client_id=CLIENT_ID, client_secret=SECRET, org_id=ORG)
    return resource.destination({"audience_name": "All staff"}, retry=retry)


@pytest.mark.parametrize("limited", ["ims.example.test", "platform.example.test"])
def test_the_retry_policy_reaches_platform_and_ims_so_a_sensor_429_raises_at_once(
    monkeypatch: pytest.MonkeyPatch, limited: str
) -> None:
    fake = FakeAep(audiences=[existing_audience()])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == limited:
            fake.requests.append(request)
            return httpx.Response(429, headers={"Retry-After": "3600"}, json={"message": "slow down"})
        return fake(request)

    job = ChunkJob(job_id="run-1", first_row=0, row_count=3)
    handle = JobHandle(
        vendor=VENDOR, feed="staff", partition="p@2", jobs=[job], submitted_rows=3,
        extra={"kind": "run", "audience_id": "aud-1"},
    )  # fmt: skip
    sleeps: list[float] = []
    check_poll_retry(
        lambda retry: _resource_client(monkeypatch, handler, sleeps, retry), handle, sleeps, aep._TOKENS.clear
    )


# --- the audience id lives in the pipeline's state, not in an undocumented lookup ------------------

NO_LOOKUP = {"/external-audiences": 404}
"""The audience list is not in the vendor document: a Platform without it answers 404."""


def _calls(fake: FakeAep, method: str, path: str, since: int = 0) -> int:
    return sum(r.method == method and r.url.path == path for r in fake.requests[since:])


def _run_handle(audience_id: str = "aud-1", custom_id: str = "audience_pipeline.staff") -> JobHandle:
    job = ChunkJob(job_id="run-0", first_row=0, row_count=3)
    extra = {"custom_audience_id": custom_id, "kind": "run", "audience_id": audience_id}
    return JobHandle(vendor=VENDOR, feed="staff", partition="p@0", jobs=[job], submitted_rows=3, extra=extra)


@pytest.mark.parametrize("status", [404, 405])
def test_first_push_creates_the_audience_when_the_lookup_endpoint_does_not_exist(status: int) -> None:
    fake = FakeAep(refuse={"/external-audiences": status})
    handle = make_client(fake).submit(rows(), feed="staff", partition="p@1")

    assert handle.extra["kind"] == "operation" and handle.jobs[0].job_id == "op-1"
    assert len(fake.bodies("POST", "/external-audience/")) == 1
    assert _calls(fake, "GET", f"{AIS}/external-audiences") == 1  # the optional fallback, tolerated


def test_later_pushes_take_the_audience_id_from_the_previous_handle_never_the_lookup() -> None:
    fake = FakeAep(refuse=dict(NO_LOOKUP))
    first = make_client(fake).submit(rows(), feed="staff", partition="p@1")
    # The creation succeeded on the vendor's side; only its operation names the audience.
    fake.audiences = [existing_audience()]
    fake.operations = {"op-1": {"status": "SUCCESS", "audienceId": "aud-1"}}
    before = len(fake.requests)

    second = make_client(fake).submit(rows(), feed="staff", partition="p@2", previous=first)

    assert second.extra["kind"] == "run" and second.extra["audience_id"] == "aud-1"
    assert _calls(fake, "GET", f"{AIS}/external-audiences/operations/op-1", before) == 1
    assert _calls(fake, "GET", f"{AIS}/external-audiences", before) == 0
    assert len(fake.bodies("POST", "/external-audience/")) == 1
    before = len(fake.requests)

    third = make_client(fake).submit(rows(), feed="staff", partition="p@3", previous=second)

    assert third.extra["audience_id"] == "aud-1" and third.extra["kind"] == "run"
    assert _calls(fake, "GET", f"{AIS}/external-audiences", before) == 0
    assert not any("/operations/" in r.url.path for r in fake.requests[before:])


def test_a_previous_creation_still_running_is_waited_for() -> None:
    fake = FakeAep(
        refuse=dict(NO_LOOKUP),
        audiences=[existing_audience()],
        operations={"op-1": [{"status": "PROCESSING"}, {"status": "SUCCESS", "audienceId": "aud-1"}]},
    )
    previous = make_client(FakeAep()).submit(rows(), feed="staff", partition="p@1")
    sleeps: list[float] = []

    handle = make_client(fake, sleeps).submit(rows(), feed="staff", partition="p@2", previous=previous)

    assert sleeps == [0.5] and handle.extra["audience_id"] == "aud-1"


def test_a_previous_creation_that_failed_means_creating_it_again_without_a_lookup() -> None:
    fake = FakeAep(refuse=dict(NO_LOOKUP), operations={"op-1": {"status": "FAILED", "errors": []}})
    previous = make_client(FakeAep()).submit(rows(), feed="staff", partition="p@1")

    handle = make_client(fake).submit(rows(), feed="staff", partition="p@2", previous=previous)

    assert handle.extra["kind"] == "operation" and _calls(fake, "GET", f"{AIS}/external-audiences") == 0


@pytest.mark.parametrize(
    "previous",
    [
        pytest.param(_run_handle("aud-gone"), id="remembered-audience-deleted"),
        pytest.param(_run_handle("aud-1", custom_id="another.audience"), id="another-custom-audience-id"),
        pytest.param(None, id="no-state"),
    ],
)
def test_without_a_usable_record_the_lookup_is_the_fallback_then_creation(previous: JobHandle | None) -> None:
    fake = FakeAep(refuse=dict(NO_LOOKUP))
    handle = make_client(fake).submit(rows(), feed="staff", partition="p@2", previous=previous)
    assert handle.extra["kind"] == "operation" and _calls(fake, "GET", f"{AIS}/external-audiences") == 1


def test_the_audience_id_option_is_used_as_is() -> None:
    other = existing_audience(audienceId="aud-9", customAudienceId="made.elsewhere")
    fake = FakeAep(refuse=dict(NO_LOOKUP), audiences=[other])

    handle = make_client(fake, audience_id="aud-9").submit(rows(), feed="staff", partition="p@2")

    assert handle.extra["kind"] == "run" and handle.extra["audience_id"] == "aud-9"
    assert fake.bodies("POST", "/external-audience/") == []
    assert _calls(fake, "GET", f"{AIS}/external-audiences") == 0
    with pytest.raises(VendorHTTPError) as caught:
        make_client(fake, audience_id="aud-x").submit(rows(), feed="staff", partition="p@3")
    assert caught.value.status == 404 and "no audience 'aud-x'" in str(caught.value)
    assert "audience_id under the feed's options: in the feeds file" in str(caught.value)


def test_a_409_with_no_way_to_find_the_audience_says_which_option_to_set() -> None:
    fake = FakeAep(refuse=dict(NO_LOOKUP), audiences=[existing_audience()])  # exists, but unfindable

    with pytest.raises(VendorHTTPError) as caught:
        make_client(fake).submit(rows(), feed="staff", partition="p@1")

    message = str(caught.value)
    assert caught.value.status == 409
    assert "customAudienceId 'audience_pipeline.staff'" in message and "'All staff'" in message
    assert "Set audience_id: <that audience's id> under options: of feed 'staff' in the feeds file" in message
    assert fake.bodies("POST", "/runs") == []


def test_a_409_whose_audience_the_lookup_finds_starts_a_run() -> None:
    fake = FakeAep(audiences=[existing_audience()])
    listed = fake.audiences
    fake.audiences = []  # the first lookup misses it (created meanwhile), the create then meets it

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == f"{AIS}/external-audience/":
            fake.audiences = listed
        return fake(request)

    client = make_client(fake)
    client.http._client._transport = httpx.MockTransport(handler)
    handle = client.submit(rows(), feed="staff", partition="p@1")
    assert handle.extra["kind"] == "run" and handle.extra["audience_id"] == "aud-1"


def test_reconcile_finds_the_remembered_audience_when_the_lookup_answers_404() -> None:
    runs = [run("run-0", RECORDED_AT - 86_400), run("run-7", RECORDED_AT - 30)]
    fake = FakeAep(audiences=[dlz_audience()], runs=runs, refuse=dict(NO_LOOKUP))

    found = make_client(fake).reconcile(intent("run-0"), rows(), previous=_run_handle())

    assert found.certain and found.handle is not None and found.handle.jobs[0].job_id == "run-7"
    assert found.handle.extra["source_path"] == "dlz-user-container/hr/staff.csv"
    assert _calls(fake, "GET", f"{AIS}/external-audiences") == 0
    lost = make_client(fake).reconcile(intent("run-0"), rows())
    assert (lost.handle, lost.certain) == (None, False) and "answered 404" in lost.detail


# --- outcome never polls a job whose end is known ------------------------------------------------


def _job_reads(fake: FakeAep, since: int) -> int:
    return sum("/runs/" in r.url.path or "/operations/" in r.url.path for r in fake.requests[since:])


def test_outcome_reuses_the_final_status_instead_of_polling_again() -> None:
    details = [{"stage": "PROFILE_STORE_INGEST", "status": "FAILED", "message": "store down"}]
    fake = FakeAep(audiences=[existing_audience()], run_status={"status": "FAILED", "details": details})
    client = make_client(fake)
    handle = client.submit(rows(), feed="staff", partition="p@2")
    status = client.status(handle)
    assert status.state is JobState.FAILED
    before = len(fake.requests)

    same_client = client.outcome(handle, status=status)
    report_process = make_client(fake).outcome(handle, status=status)  # the report's own client

    assert fake.requests[before:] == []
    for outcome in (same_client, report_process):
        assert outcome.imported == 0 and outcome.failed == 3
        assert "stage PROFILE_STORE_INGEST FAILED: store down" in outcome.failures[0].reason
    assert client.outcome(handle).failed == 3 and _job_reads(fake, before) == 0  # status() was enough


def test_outcome_without_a_known_status_reads_the_job_once() -> None:
    fake = FakeAep(run_status={"status": "SUCCESS", "audienceId": "aud-3"})
    handle = make_client(fake).submit(rows(), feed="staff", partition="p@1")
    before = len(fake.requests)
    outcome = make_client(fake).outcome(handle)
    assert (
        _job_reads(fake, before) == 1 and "audience aud-3 created (audience_pipeline.staff)" in outcome.notes
    )

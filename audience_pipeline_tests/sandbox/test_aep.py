"""The Experience Platform emulation over real HTTP: IMS, auth errors, the landing zone, the
creation and run state machines, 409s and limits."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import pytest

from audience_pipeline.sandbox import SandboxServer, SandboxSettings
from audience_pipeline_tests.sandbox.polling import poll_until

pytestmark = pytest.mark.integration

S = SandboxSettings()
AIS = "/data/core/ais"
CREDENTIALS = "/data/foundation/connectors/landingzone/credentials"
CSV = "unique_id,email,start_date\nE1,a@x.com,2024-01-02\nE2,,2024-02-03\nE3,c@x.com,\n"
FIELDS = [
    {"name": "unique_id", "type": "string"},
    {"name": "email", "type": "string", "identityNs": "email"},
    {"name": "start_date", "type": "date"},
]


@pytest.fixture
def ims(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.vendor_url("aep"), timeout=5) as client:
        yield client


@pytest.fixture
def platform(sandbox: SandboxServer, ims: httpx.Client) -> Iterator[httpx.Client]:
    token = _token(ims).json()["access_token"]
    headers = {
        "Authorization": f"Bearer {token}",
        "x-api-key": S.aep_client_id,
        "x-gw-ims-org-id": S.aep_org_id,
        "x-sandbox-name": S.aep_sandbox_name,
    }
    with httpx.Client(base_url=sandbox.vendor_url("aep"), headers=headers, timeout=5) as client:
        yield client


def _token(ims: httpx.Client, **changes: str) -> httpx.Response:
    form = {"grant_type": "client_credentials", "client_id": S.aep_client_id}
    form |= {"client_secret": S.aep_client_secret, "scope": "openid", **changes}
    return ims.post("/ims/token/v3", data=form)


def _upload(platform: httpx.Client, text: str = CSV, name: str = "hr/staff.csv") -> tuple[str, int]:
    creds = platform.get("/data/foundation/connectors/landingzone/credentials").json()
    base, _, sas = creds["SASUri"].partition("?")
    response = httpx.put(f"{base}/{name}?{sas}", content=text, headers={"x-ms-blob-type": "BlockBlob"})
    assert response.status_code == 201, response.text
    modified = math.floor(parsedate_to_datetime(response.headers["Last-Modified"]).timestamp())
    return f"{creds['containerName']}/{name}", modified


def _create(platform: httpx.Client, path: str, **changes: Any) -> httpx.Response:
    body = {
        "name": "Staff",
        "customAudienceId": "staff-1",
        "fields": FIELDS,
        "sourceSpec": {
            "params": {"path": path, "type": "file", "sourceType": "Cloud Storage", "cloudType": "DLZ"}
        },
        "originName": "CUSTOM_UPLOAD",
        **changes,
    }
    return platform.post(f"{AIS}/external-audience/", json=body)


def _audiences(sandbox: SandboxServer) -> list[dict[str, Any]]:
    """The sandbox's internal view (the document offers no list of audiences)."""
    return httpx.get(f"{sandbox.url}/_sandbox/aep/audiences").json()["audiences"]


def _until_done(platform: httpx.Client, path: str) -> list[dict[str, Any]]:
    return poll_until(
        lambda: platform.get(path).json(),
        lambda answer: answer["status"] != "PROCESSING",
        what=path,
        timeout=5,
        interval=0.01,
    )


def test_ims_issues_tokens_only_for_the_right_client(ims: httpx.Client) -> None:
    ok = _token(ims)
    assert ok.status_code == 200 and ok.json()["token_type"] == "bearer" and ok.json()["expires_in"] > 0
    assert _token(ims, grant_type="password").json()["error"] == "unsupported_grant_type"
    wrong = _token(ims, client_secret="nope")
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"


@pytest.mark.parametrize(
    ("header", "value", "status", "code"),
    [
        ("Authorization", None, 401, "100920-401"),
        ("Authorization", "Basic abc", 400, "100911-400"),
        ("Authorization", "Bearer not-a-token", 401, "100920-401"),
        ("x-gw-ims-org-id", "OTHER@AdobeOrg", 401, "100921-401"),
        ("x-api-key", "someone-else", 401, "100922-401"),
        ("x-sandbox-name", None, 400, "100910-400"),
        ("x-sandbox-name", "dev", 404, "100940-404"),
    ],
)
def test_platform_auth_errors(
    platform: httpx.Client, header: str, value: str | None, status: int, code: str
) -> None:
    headers = dict(platform.headers)
    headers.pop(header.lower(), None)
    if value is not None:
        headers[header] = value
    response = httpx.get(f"{str(platform.base_url).rstrip('/')}{CREDENTIALS}", headers=headers)
    assert response.status_code == status and response.json()["error_code"] == code


def test_expired_tokens_are_refused(sandbox: SandboxServer, platform: httpx.Client) -> None:
    assert platform.get(CREDENTIALS).status_code == 200
    httpx.post(f"{sandbox.url}/_sandbox/aep/expire-tokens").raise_for_status()
    assert platform.get(CREDENTIALS).json()["error_code"] == "100920-401"


def test_the_audience_lookup_is_not_offered_unless_turned_on(
    sandbox: SandboxServer, platform: httpx.Client
) -> None:
    """The document has no list of audiences: the sandbox answers 404 like a path the Platform lacks."""
    path, _ = _upload(platform)
    assert _create(platform, path).status_code == 202
    listing = platform.get(f"{AIS}/external-audiences", params={"customAudienceId": "staff-1"})
    assert listing.status_code == 404 and listing.json()["error_code"] == "100940-404"

    control = f"{sandbox.url}/_sandbox/aep/lookup"
    assert httpx.post(control, json={"enabled": "yes"}).status_code == 400
    assert httpx.post(control, json={"enabled": True}).json() == {"ok": True, "enabled": True}
    listing = platform.get(f"{AIS}/external-audiences", params={"customAudienceId": "staff-1"})
    assert [a["customAudienceId"] for a in listing.json()["audiences"]] == ["staff-1"]
    assert platform.get(f"{AIS}/external-audiences", params={"customAudienceId": "x"}).json() == {
        "audiences": []
    }


def test_landing_zone_needs_the_sas_signature_and_blob_type(platform: httpx.Client) -> None:
    creds = platform.get("/data/foundation/connectors/landingzone/credentials").json()
    base = creds["SASUri"].partition("?")[0]
    forged = httpx.put(f"{base}/x.csv?sv=1&sig=forged", content="a", headers={"x-ms-blob-type": "BlockBlob"})
    assert forged.status_code == 403 and "AuthenticationFailed" in forged.text
    untyped = httpx.put(f"{base}/x.csv?{creds['SASToken']}", content="a")
    assert untyped.status_code == 400 and "MissingRequiredHeader" in untyped.text


@pytest.mark.parametrize(
    "sandbox_settings", [dataclasses.replace(SandboxSettings(pace_seconds=0.05), aep_sas_ttl_seconds=1.0)]
)
def test_a_sas_expires_after_its_lifetime_and_cannot_be_stretched(platform: httpx.Client) -> None:
    creds = platform.get("/data/foundation/connectors/landingzone/credentials").json()
    base, _, sas = creds["SASUri"].partition("?")
    assert "se=" in sas and creds["SASToken"] == sas
    headers = {"x-ms-blob-type": "BlockBlob"}
    assert httpx.put(f"{base}/a.csv?{sas}", content="a", headers=headers).status_code == 201

    se = httpx.QueryParams(sas)["se"]
    stretched = sas.replace(se, se.replace(se[:4], str(int(se[:4]) + 1)))
    forged = httpx.put(f"{base}/a.csv?{stretched}", content="a", headers=headers)
    assert forged.status_code == 403 and "Signature did not match" in forged.text
    time.sleep(1.1)
    expired = httpx.put(f"{base}/a.csv?{sas}", content="a", headers=headers)
    assert expired.status_code == 403 and expired.headers["x-ms-error-code"] == "AuthenticationFailed"
    assert "Signature not valid in the specified time frame" in expired.text
    fresh = platform.get("/data/foundation/connectors/landingzone/credentials").json()["SASToken"]
    assert httpx.put(f"{base}/a.csv?{fresh}", content="a", headers=headers).status_code == 201


def test_creation_then_runs_follow_the_state_machine(sandbox: SandboxServer, platform: httpx.Client) -> None:
    path, modified = _upload(platform)
    created = _create(platform, path)
    assert created.status_code == 202
    # The document gives the audienceId only once the creation succeeded: read it from the
    # sandbox's own view, on the open connection, so the run below still meets the creation.
    [audience] = platform.get(f"{sandbox.url}/_sandbox/aep/audiences").json()["audiences"]
    runs = f"{AIS}/external-audience/{audience['audienceId']}/runs"
    assert platform.post(runs, json={"dataFilterStartTime": modified}).status_code == 409  # creation running
    operation_path = f"{AIS}/external-audiences/operations/{created.json()['operationId']}"
    assert _create(platform, path).json()["error_code"] == "100950-409"

    states = _until_done(platform, operation_path)
    assert states[0]["status"] == "PROCESSING" and states[-1]["status"] == "SUCCESS"
    assert states[-1]["audienceId"] == audience["audienceId"]
    view = httpx.get(f"{sandbox.url}/_sandbox/aep/audiences").json()["audiences"]
    assert view[0]["operation"] == {"status": "SUCCESS", "rows": 2}

    outside = platform.post(
        runs, json={"dataFilterStartTime": modified + 10, "dataFilterEndTime": modified + 11}
    )
    assert outside.status_code == 200
    assert platform.post(runs, json={"dataFilterStartTime": modified}).json()["error_code"] == "100950-409"
    failed = _until_done(platform, f"{runs}/{outside.json()['runId']}")[-1]
    assert failed["status"] == "FAILED"
    assert failed["details"][0]["stage"] == "DATASET_INGEST" and "No file" in failed["details"][0]["message"]

    good = platform.post(runs, json={"dataFilterStartTime": modified, "dataFilterEndTime": modified + 1})
    done = _until_done(platform, f"{runs}/{good.json()['runId']}")[-1]
    assert done["status"] == "SUCCESS"
    assert [d["stage"] for d in done["details"]] == ["DATASET_INGEST", "PROFILE_STORE_INGEST"]
    assert [r["status"] for r in platform.get(runs).json()["runs"]] == ["FAILED", "SUCCESS"]


def test_unreadable_files_and_injected_failures_fail_their_stage(
    sandbox: SandboxServer, platform: httpx.Client
) -> None:
    path, _ = _upload(platform, "unique_id,email\nE1,a@x.com,extra\n")
    operation = _create(platform, path).json()["operationId"]
    failed = _until_done(platform, f"{AIS}/external-audiences/operations/{operation}")[-1]
    assert failed["status"] == "FAILED" and "DATASET_INGEST" in failed["errors"][0]["code"]
    assert "audienceId" not in failed and _audiences(sandbox) == []  # a failed creation leaves none

    path, _ = _upload(platform)
    httpx.post(
        f"{sandbox.url}/_sandbox/aep/fail-next", json={"stage": "PROFILE_STORE_INGEST", "message": "down"}
    )
    operation = _create(platform, path).json()["operationId"]
    failed = _until_done(platform, f"{AIS}/external-audiences/operations/{operation}")[-1]
    assert failed["errors"] == [{"code": "PROFILE_STORE_INGEST_FAILED", "message": "down"}]


def test_requests_are_validated_and_limited(sandbox: SandboxServer, platform: httpx.Client) -> None:
    path, modified = _upload(platform)
    assert _create(platform, path, ttlInDays=91).json()["error_code"] == "100910-400"
    assert _create(platform, path, originName="API").json()["error_code"] == "100910-400"
    s3 = {"path": "b/k.csv", "type": "file", "sourceType": "Cloud Storage", "cloudType": "S3"}
    assert _create(platform, path, sourceSpec={"params": s3}).json()["error_code"] == "100910-400"
    unknown = _create(platform, path, sourceSpec={"params": {**s3, "baseConnectionId": "nope"}})
    assert unknown.status_code == 422 and unknown.json()["error_code"] == "100960-422"

    operation = _create(platform, path).json()["operationId"]
    audience_id = _until_done(platform, f"{AIS}/external-audiences/operations/{operation}")[-1]["audienceId"]
    audience = f"{AIS}/external-audience/{audience_id}"
    assert platform.patch(audience, json={"name": "Renamed"}).json()["error_code"] == "100910-400"
    patched = platform.patch(audience, json={"ttlInDays": 7, "fields": [{"name": "email", "labels": ["C1"]}]})
    assert patched.json()["ttlInDays"] == 7 and patched.json()["fields"][1]["labels"] == ["C1"]

    httpx.post(f"{sandbox.url}/_sandbox/aep/limits", json={"runs_per_day": 0}).raise_for_status()
    limited = platform.post(f"{audience}/runs", json={"dataFilterStartTime": modified})
    assert limited.status_code == 422 and "Daily limit" in limited.json()["message"]
    assert platform.delete(audience).status_code == 204
    assert platform.get(audience).json()["error_code"] == "100940-404"

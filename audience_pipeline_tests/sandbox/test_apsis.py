"""The APSIS One emulation: the row rules (unit) and the HTTP protocol the APSIS client relies on."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from audience_pipeline.sandbox import SandboxServer, SandboxSettings
from audience_pipeline.sandbox.apsis import ATTRIBUTES, SECTION, ImportSpec, check_file
from audience_pipeline_tests.sandbox.polling import poll_until

CLIENT_ID = "sbx-apsis-client-3d9f"
CLIENT_SECRET = "sbx-apsis-secret-8c41e0"
PACE = 0.05
TTL = 1.0
MAX_FILE = 10_000
IMPORTS = f"/v2/audience/sections/{SECTION}/imports"
STATUS = f"/audience/sections/{SECTION}/imports"
BY_NAME = {a.name: a for a in ATTRIBUTES}

GOOD_CSV = "unique_id,email,start_date\nE1,ann@example.com,2020-01-02\nE2,bob@example.com,\n"
BAD_CSV = (
    "unique_id,email,mobile_phone,start_date\n"  # line 1
    "E1,ann@example.com,+14155550101,2020-01-02\n"  # 2 ok
    ",bob@example.com,,\n"  # 3 missing key
    "E3,not-an-email,,\n"  # 4
    "E4,dee@acme.invalid,,\n"  # 5
    "E5,eve@example.com,0155 123,\n"  # 6
    "E6,fay@example.com,,2021-02-30\n"  # 7
    "E1,gus@example.com,,\n"  # 8 duplicate key
    "E8,SANDBOX_FAIL: Mailbox quarantined,,\n"  # 9
    "E9,ida@example.com\n"  # 10 field count
    '"E10","jo@example.com","",""\n'  # 11 ok, quoted
)


@pytest.fixture
def sandbox_settings() -> SandboxSettings:
    return SandboxSettings(
        pace_seconds=PACE,
        apsis_client_id=CLIENT_ID,
        apsis_client_secret=CLIENT_SECRET,
        apsis_upload_url_ttl_seconds=TTL,
        apsis_max_file_bytes=MAX_FILE,
    )


@pytest.fixture
def api(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    """An authenticated client rooted at the vendor prefix, on a freshly reset sandbox."""
    with httpx.Client(base_url=sandbox.vendor_url("apsis"), timeout=10) as client:
        token = client.post(
            "/oauth/token",
            json={"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
        ).json()["access_token"]
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


def request_body(**overrides: Any) -> dict[str, Any]:
    body = {
        "keyspace_mapping": {
            "keyspace_discriminator": "com.apsis1.keyspaces.crm",
            "field_selector": "unique_id",
        },
        "options": {"update_existing_profiles": True, "clear_existing_attributes": False},
        "attribute_mappings": [
            {"field_selector": "email", "attribute_version_id": BY_NAME["Email"].version_id},
            {"field_selector": "start_date", "attribute_version_id": BY_NAME["Start date"].version_id},
        ],
    }
    body.update(overrides)
    return body


def create(api: httpx.Client, **overrides: Any) -> httpx.Response:
    return api.post(IMPORTS, json=request_body(**overrides))


def upload(created: dict[str, Any], content: str | bytes, **field_changes: str) -> httpx.Response:
    """The presigned POST exactly as documented: every body field, then ``file``; no bearer token."""
    fields = {**created["file_upload_body"], **field_changes}
    return httpx.post(
        created["file_upload_url"], data=fields, files={"file": ("f.csv", content, "text/csv")}, timeout=10
    )


def wait_final(api: httpx.Client, import_id: str) -> list[str]:
    """Each status the import went through, in order, until it ends."""

    def fetch() -> str:
        response = api.get(f"{STATUS}/{import_id}")
        assert response.status_code == 200, response.text
        return response.json()["result"]["status"]

    seen = poll_until(
        fetch,
        lambda s: s in ("completed", "error"),
        what=f"import {import_id}",
        timeout=10,
        interval=PACE / 5,
    )
    return [status for i, status in enumerate(seen) if i == 0 or seen[i - 1] != status]


def run_import(api: httpx.Client, content: str, **overrides: Any) -> tuple[str, dict[str, Any]]:
    created = create(api, **overrides)
    assert created.status_code == 201, created.text
    assert upload(created.json(), content).status_code == 204
    import_id = created.json()["import_id"]
    wait_final(api, import_id)
    return import_id, api.get(f"{STATUS}/{import_id}/report").json()["result"]


def spec(**kw: Any) -> ImportSpec:
    attrs = {
        "email": BY_NAME["Email"],
        "mobile_phone": BY_NAME["Mobile"],
        "start_date": BY_NAME["Start date"],
    }
    return ImportSpec(
        **{
            "keyspace": "k",
            "key_field": "unique_id",
            "attributes": attrs,
            "other_fields": (),
            "update_existing": True,
            **kw,
        }
    )


def test_row_rules_report_each_bad_row_once_by_uploaded_line() -> None:
    profiles: set[str] = set()
    result = check_file(BAD_CSV.splitlines(keepends=True), spec(), profiles, threading.Lock())

    got = [(e["line"], e["field_selector"], e["code"]) for e in result.errors]
    assert got == [
        (3, "unique_id", "missing_key"),
        (4, "email", "invalid_email"),
        (5, "email", "invalid_email"),
        (6, "mobile_phone", "invalid_mobile"),
        (7, "start_date", "invalid_date"),
        (8, "unique_id", "duplicate_key"),
        (9, None, "rejected"),
        (10, None, "invalid_row"),
    ]
    assert result.errors[2]["message"] == "Email domain 'acme.invalid' does not accept mail"
    assert result.errors[5]["message"] == "Profile key 'E1' appears more than once (first on line 2)"
    assert result.errors[6]["message"] == "Mailbox quarantined"
    assert result.total == 10 and result.created == 2 and profiles == {"E1", "E10"}


def test_existing_profiles_update_or_are_skipped() -> None:
    profiles = {"E1"}
    lines = GOOD_CSV.splitlines(keepends=True)
    attrs = {"email": BY_NAME["Email"], "start_date": BY_NAME["Start date"]}
    updated = check_file(lines, spec(attributes=attrs), profiles, threading.Lock())
    assert (updated.created, updated.updated, updated.skipped) == (1, 1, [])
    kept = check_file(lines, spec(attributes=attrs, update_existing=False), profiles, threading.Lock())
    assert (kept.created, kept.updated) == (0, 0)
    assert [(s["line"], s["code"]) for s in kept.skipped] == [(2, "profile_exists"), (3, "profile_exists")]


def test_missing_column_is_a_file_level_error() -> None:
    result = check_file(["unique_id,mail\n", "E1,a@b.co\n"], spec(), set(), threading.Lock())
    assert result.fatal is not None and "'email'" in result.fatal


def test_token_endpoint_and_bearer_auth(sandbox: SandboxServer, api: httpx.Client) -> None:
    base = sandbox.vendor_url("apsis")
    wrong = httpx.post(
        f"{base}/oauth/token",
        json={"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": "nope-nope"},
    )
    assert wrong.status_code == 401 and wrong.json() == {
        "status": 401,
        "detail": "Invalid client credentials",
    }
    form = httpx.post(
        f"{base}/oauth/token",
        data={"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
    )
    assert form.status_code == 200 and form.json()["token_type"] == "Bearer" and form.json()["expires_in"] > 0
    assert httpx.get(f"{base}/audience/sections/{SECTION}/attributes").status_code == 401
    assert api.get(f"/audience/sections/{SECTION}/attributes").status_code == 200

    assert httpx.post(f"{sandbox.url}/_sandbox/apsis/tokens/revoke").json()["revoked"] >= 2
    revoked = api.get(f"/audience/sections/{SECTION}/attributes")
    assert revoked.status_code == 401 and revoked.json()["status"] == 401


def test_attributes_expose_version_ids_and_unknown_section_is_404(api: httpx.Client) -> None:
    items = api.get(f"/audience/sections/{SECTION}/attributes").json()["items"]
    email = next(i for i in items if i["discriminator"] == "com.apsis1.attributes.email")
    assert email == {
        "discriminator": "com.apsis1.attributes.email",
        "name": "Email",
        "type": "string",
        "version_id": BY_NAME["Email"].version_id,
    }
    missing = api.get("/audience/sections/com.apsis1.sections.nope/attributes")
    assert missing.status_code == 404 and "not found" in missing.json()["detail"]


@pytest.mark.parametrize(
    ("overrides", "status", "detail"),
    [
        (
            {
                "keyspace_mapping": {
                    "keyspace_discriminator": "com.apsis1.keyspaces.legacy",
                    "field_selector": "id",
                }
            },
            403,
            "manage_subscriptions",
        ),
        (
            {
                "keyspace_mapping": {
                    "keyspace_discriminator": "com.apsis1.keyspaces.x",
                    "field_selector": "id",
                }
            },
            400,
            "Unknown keyspace",
        ),
        (
            {
                "attribute_mappings": [
                    {
                        "field_selector": "score",
                        "attribute_version_id": BY_NAME["Engagement score"].version_id,
                    }
                ]
            },
            403,
            "'Engagement score' (com.apsis1.attributes.sandbox.score) is not allowed to WRITE",
        ),
        (
            {"attribute_mappings": [{"field_selector": "x", "attribute_version_id": "nope"}]},
            400,
            "Unknown attribute_version_id",
        ),
        (
            {
                "consent_mappings": [
                    {
                        "address_field_selector": "email",
                        "consents": [{"topic_discriminator": "com.apsis1.topics.x"}],
                    }
                ]
            },
            400,
            "Unknown topic_discriminator",
        ),
        (
            {
                "consent_mappings": [
                    {
                        "address_field_selector": "email",
                        "consents": [
                            {
                                "topic_discriminator": "com.apsis1.topics.newsletter",
                                "channel_discriminator": "com.apsis1.channels.sms",
                            }
                        ],
                    }
                ]
            },
            400,
            "does not match the topic's channel",
        ),
        (
            {
                "consent_mappings": [
                    {
                        "address_field_selector": "email",
                        "consents": [{"topic_discriminator": "com.apsis1.topics.company-news"}],
                    }
                ]
            },
            400,
            "not channel-specific",
        ),
    ],
)
def test_import_request_is_checked(api: httpx.Client, overrides: dict, status: int, detail: str) -> None:
    response = create(api, **overrides)
    assert response.status_code == status
    assert response.json()["status"] == status and detail in response.json()["detail"]


def test_import_state_machine_and_report(sandbox: SandboxServer, api: httpx.Client) -> None:
    created = create(api)
    assert created.status_code == 201
    body = created.json()
    assert set(body) == {"import_id", "file_upload_url", "file_upload_body", "file_upload_url_expires_at"}
    assert body["file_upload_url"].startswith(sandbox.url + "/apsis/uploads/")
    assert "signature=" in body["file_upload_url"] and "expires=" in body["file_upload_url"]
    assert set(body["file_upload_body"]) == {"key", "policy", "x-apsis-signature"}
    import_id = body["import_id"]
    status = api.get(f"{STATUS}/{import_id}").json()["result"]
    assert status["status"] == "waiting_for_file" and status["error"] is None
    assert status["file_upload_url_expires_at"] == body["file_upload_url_expires_at"]
    assert api.get(f"{STATUS}/{import_id}/report").status_code == 409

    assert upload(body, BAD_CSV, **{}).status_code == 204
    states = wait_final(api, import_id)

    assert states == ["importing", "completed"]
    report = api.get(f"{STATUS}/{import_id}/report").json()["result"]
    assert report["statistics"] == {
        "total_rows": 10,
        "created_profiles": 3,
        "updated_profiles": 0,
        "failed_rows": 7,
        "skipped_rows": 0,
    }
    assert [e["line"] for e in report["errors"]] == [3, 4, 5, 7, 8, 9, 10]  # mobile is not mapped
    assert api.get(f"/v2{STATUS}/{import_id}").json()["result"]["status"] == "completed"

    _, again = run_import(api, GOOD_CSV)
    assert again["statistics"]["created_profiles"] == 1 and again["statistics"]["updated_profiles"] == 1
    listed = httpx.get(f"{sandbox.url}/_sandbox/apsis/imports").json()
    assert listed["profiles"] == {f"{SECTION}/com.apsis1.keyspaces.crm": 4}
    assert listed["imports"][0]["request"] == request_body()


def test_update_existing_false_skips_known_profiles(api: httpx.Client) -> None:
    run_import(api, GOOD_CSV)
    options = {"update_existing_profiles": False, "clear_existing_attributes": True}
    _, report = run_import(api, GOOD_CSV, options=options)
    assert report["statistics"]["skipped_rows"] == 2 and report["statistics"]["updated_profiles"] == 0
    assert [s["line"] for s in report["skipped"]] == [2, 3]


def test_upload_url_is_checked(api: httpx.Client) -> None:
    body = create(api).json()
    tampered = dict(body, file_upload_url=body["file_upload_url"].replace("signature=", "signature=0"))
    assert upload(tampered, GOOD_CSV).status_code == 403
    altered = upload(body, GOOD_CSV, policy="e30=")
    assert altered.status_code == 403 and "'policy'" in altered.json()["detail"]
    too_big = upload(body, "unique_id\n" + "E1\n" * MAX_FILE)
    assert too_big.status_code == 413 and too_big.json()["status"] == 413
    assert "EntityTooLarge" in too_big.json()["detail"]
    assert upload(body, GOOD_CSV).status_code == 204
    second = upload(body, GOOD_CSV)
    assert second.status_code == 409


def test_expired_upload_url_is_refused_and_the_import_stays_waiting(
    sandbox: SandboxServer, api: httpx.Client
) -> None:
    body = create(api).json()
    time.sleep(TTL + 0.1)

    response = upload(body, GOOD_CSV)

    assert response.status_code == 403 and "expired" in response.json()["detail"]
    time.sleep(PACE * 2)
    assert api.get(f"{STATUS}/{body['import_id']}").json()["result"]["status"] == "waiting_for_file"
    assert create(api).status_code == 201  # an expired import no longer counts as pending


def test_three_pending_imports_then_429_with_retry_after(api: httpx.Client) -> None:
    first = create(api).json()
    for _ in range(2):
        assert create(api).status_code == 201

    refused = create(api)

    assert refused.status_code == 429
    assert refused.json()["status"] == 429 and "Pending import count limit" in refused.json()["detail"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert upload(first, GOOD_CSV).status_code == 204
    wait_final(api, first["import_id"])
    assert create(api).status_code == 201


def test_fail_next_ends_the_import_in_error(sandbox: SandboxServer, api: httpx.Client) -> None:
    httpx.post(f"{sandbox.url}/_sandbox/apsis/imports/fail-next", json={"detail": "Import file rejected"})
    body = create(api).json()
    assert upload(body, GOOD_CSV).status_code == 204

    assert wait_final(api, body["import_id"])[-1] == "error"
    result = api.get(f"{STATUS}/{body['import_id']}").json()["result"]
    assert result["error"] == {"code": "import_failed", "detail": "Import file rejected"}


def test_field_selector_missing_from_the_file_ends_in_error(api: httpx.Client) -> None:
    body = create(api).json()
    upload(body, "unique_id,email\nE1,a@example.com\n")
    assert wait_final(api, body["import_id"])[-1] == "error"
    detail = api.get(f"{STATUS}/{body['import_id']}").json()["result"]["error"]["detail"]
    assert "'start_date'" in detail

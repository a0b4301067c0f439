"""The CXI emulation: per-row rules (unit) and the HTTP protocol the CXI client relies on (integration)."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest

from audience_pipeline.sandbox import SandboxServer, SandboxSettings
from audience_pipeline.sandbox.cxi import FieldMapping, check_rows
from audience_pipeline_tests.sandbox.conftest import API_KEY, poll_job

BASE = "/public-api/audience-imports"
IMPORT_KEYS = {
    "id",
    "name",
    "fileName",
    "status",
    "importType",
    "fieldNames",
    "emailFieldName",
    "mobilePhoneFieldName",
    "nameFieldName",
    "uniqueIdFieldName",
    "asyncJobId",
    "createdAt",
    "membersUpdatedAt",
    "updatedAt",
}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

GOOD_CSV = (
    "Employee ID,First Name,Email,Mobile Number\n"
    "E1,Ann,ann@example.com,+14155550101\n"
    "E2,Bob,bob@example.com,\n"
    "E3,Cy,,+447700900123\n"
)

BAD_CSV = (
    "Employee ID,First Name,Email,Mobile Number\n"  # line 1
    'E1,"Ann\nMarie",ann@example.com,\n'  # lines 2-3: quoted newline
    "E2,Bob,not-an-email,\n"  # line 4
    "E3,Cy,cy@example.com,0155 123\n"  # line 5
    ",Dee,dee@example.com,\n"  # line 6
    "E1,Eve,eve@example.com,\n"  # line 7
    "E7,Fay,,\n"  # line 8
    "E8,Gus,gus@example.com\n"  # line 9
    "E9,SANDBOX_FAIL: Mailbox quarantined,hal@example.com,\n"  # line 10
    "E10,Ida,ida@example.com,+4915112345678\n"  # line 11
)
BAD_CSV_ERRORS = [
    {"line": 4, "error": "Invalid email address"},
    {"line": 5, "error": "Invalid mobile phone number, expected E.164"},
    {"line": 6, "error": "Missing unique ID value"},
    {"line": 7, "error": "Duplicate unique ID value 'E1' (first on line 2)"},
    {"line": 8, "error": "Row has no email address or mobile phone number"},
    {"line": 9, "error": "Expected 4 fields, found 3"},
    {"line": 10, "error": "Mailbox quarantined"},
]
ALL_FIELDS = FieldMapping(
    email="Email", mobile_phone="Mobile Number", name="First Name", unique_id="Employee ID"
)


def create(
    client: httpx.Client,
    content: str | bytes = GOOD_CSV,
    base: str = BASE,
    file_name: str = "EmployeesList.csv",
    **fields: str,
) -> httpx.Response:
    data = {
        "name": "Employees List",
        "emailFieldName": "Email",
        "mobilePhoneFieldName": "Mobile Number",
        **fields,
    }
    body = content.encode() if isinstance(content, str) else content
    return client.post(base, data=data, files={"file": (file_name, body, "text/csv")})


def created(client: httpx.Client, content: str = GOOD_CSV, **fields: str) -> dict[str, Any]:
    response = create(client, content, **fields)
    assert response.status_code == 201, response.text
    return response.json()["data"]


def error_of(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    return body["error"]


def test_check_rows_reports_the_first_line_of_each_failing_record() -> None:
    result = check_rows(BAD_CSV.splitlines(keepends=True), ALL_FIELDS)

    assert result.errors == BAD_CSV_ERRORS
    assert (result.total, result.processed, result.failed) == (9, 2, 7)


def test_check_rows_skips_blank_lines_and_counts_crlf_lines() -> None:
    lines = ["Email\r\n", "a@example.com\r\n", "\r\n", '"b@\r\n', 'example.com"\r\n', "c@example\r\n"]

    result = check_rows(lines, FieldMapping(email="Email"))

    assert result.errors == [
        {"line": 4, "error": "Invalid email address"},
        {"line": 6, "error": "Invalid email address"},
    ]
    assert (result.total, result.processed) == (3, 1)


def test_check_rows_accepts_phone_only_rows_and_rejects_local_numbers() -> None:
    lines = ["Phone\n", "+14155550101\n", "4155550101\n", "+0123456789\n"]

    result = check_rows(lines, FieldMapping(mobile_phone="Phone"))

    assert [error["line"] for error in result.errors] == [3, 4]


@pytest.mark.integration
@pytest.mark.parametrize("headers", [{}, {"X-GSCC-Api-Key": "wrong"}])
def test_requests_without_the_api_key_are_unauthorized(
    sandbox: SandboxServer, headers: dict[str, str]
) -> None:
    with httpx.Client(base_url=sandbox.vendor_url("cxi"), headers=headers, timeout=5) as client:
        responses = [
            client.get(BASE),
            client.get(f"{BASE}/some-id"),
            create(client),
            client.get(f"{BASE}/async-jobs/some-job/status"),
        ]

    for response in responses:
        assert response.status_code == 401
        assert response.json() == {"error": {"code": "unauthorized", "message": "Invalid API Token key"}}


@pytest.mark.integration
def test_job_goes_pending_in_progress_completed(cxi: httpx.Client) -> None:
    data = created(cxi, nameFieldName="First Name", uniqueIdFieldName="Employee ID")

    assert set(data) == IMPORT_KEYS
    assert UUID.match(data["id"]) and UUID.match(data["asyncJobId"])
    assert data["status"] == "pending"
    assert data["fileName"] == "EmployeesList.csv"
    assert data["importType"] == "csv"
    assert data["fieldNames"] is None and data["membersUpdatedAt"] is None
    assert TIMESTAMP.match(data["createdAt"]) and TIMESTAMP.match(data["updatedAt"])

    seen = poll_job(cxi, data["asyncJobId"])
    statuses = [status["status"] for status in seen]
    assert statuses[0] == "pending"
    assert "in_progress" in statuses
    assert statuses[-1] == "completed"
    assert statuses == sorted(statuses, key=["pending", "in_progress", "completed"].index)
    progress = [status["progressPercentage"] for status in seen]
    assert progress == sorted(progress) and progress[-1] == 100
    assert seen[-1]["audienceImportId"] == data["id"]
    assert seen[-1]["fileName"] == "EmployeesList.csv"

    failures = cxi.get(f"{BASE}/async-jobs/{data['asyncJobId']}/failures").json()["data"]
    assert failures == {
        "id": data["asyncJobId"],
        "audienceImportId": data["id"],
        "fileName": "EmployeesList.csv",
        "progressPercentage": 100,
        "status": "completed",
        "totalNumOfRows": 3,
        "numOfRowsProcessed": 3,
        "numOfRowsFailed": 0,
        "errorMessages": [],
    }
    after = cxi.get(f"{BASE}/{data['id']}").json()["data"]
    assert after["status"] == "completed"
    assert after["fieldNames"] == ["Employee ID", "First Name", "Email", "Mobile Number"]
    assert TIMESTAMP.match(after["membersUpdatedAt"])
    assert after["membersUpdatedAt"] > after["createdAt"]
    assert after["updatedAt"] == data["updatedAt"]


@pytest.mark.integration
def test_bad_rows_fail_the_job_with_exact_lines(cxi: httpx.Client) -> None:
    data = created(cxi, BAD_CSV, mobilePhoneFieldName="Mobile Number", uniqueIdFieldName="Employee ID")

    assert poll_job(cxi, data["asyncJobId"])[-1]["status"] == "failed"
    failures = cxi.get(f"{BASE}/async-jobs/{data['asyncJobId']}/failures").json()["data"]

    assert failures["errorMessages"] == BAD_CSV_ERRORS
    assert failures["totalNumOfRows"] == 9
    assert failures["numOfRowsProcessed"] == 2
    assert failures["numOfRowsFailed"] == 7
    assert failures["progressPercentage"] == 22
    assert cxi.get(f"{BASE}/{data['id']}").json()["data"]["status"] == "failed"


@pytest.mark.integration
def test_failures_report_nothing_before_the_job_ends(cxi: httpx.Client) -> None:
    data = created(cxi, BAD_CSV)

    failures = cxi.get(f"{BASE}/async-jobs/{data['asyncJobId']}/failures").json()["data"]

    assert failures["status"] == "pending"
    assert (failures["totalNumOfRows"], failures["numOfRowsFailed"], failures["errorMessages"]) == (0, 0, [])


@pytest.mark.integration
def test_put_with_a_new_file_starts_a_new_job(cxi: httpx.Client) -> None:
    data = created(cxi)
    poll_job(cxi, data["asyncJobId"])
    new_csv = "Email,Mobile Number,Office\nzed@example.com,,Paris\n"

    response = cxi.put(
        f"{BASE}/{data['id']}",
        data={"name": "Employees List (Updated)"},
        files={"file": ("EmployeesList2.csv", new_csv.encode(), "text/csv")},
    )

    assert response.status_code == 200, response.text
    updated = response.json()["data"]
    assert updated["asyncJobId"] != data["asyncJobId"]
    assert updated["status"] == "pending"
    assert updated["name"] == "Employees List (Updated)"
    assert updated["fileName"] == "EmployeesList2.csv"
    assert updated["fieldNames"] == ["Employee ID", "First Name", "Email", "Mobile Number"]
    assert updated["createdAt"] == data["createdAt"]
    assert updated["updatedAt"] >= data["updatedAt"]
    assert poll_job(cxi, updated["asyncJobId"])[-1]["status"] == "completed"
    after = cxi.get(f"{BASE}/{data['id']}").json()["data"]
    assert after["fieldNames"] == ["Email", "Mobile Number", "Office"]
    assert cxi.get(f"{BASE}/async-jobs/{data['asyncJobId']}/status").json()["data"]["status"] == "completed"


@pytest.mark.integration
def test_put_without_a_file_keeps_the_job_and_checks_fields_against_current_headers(
    cxi: httpx.Client,
) -> None:
    data = created(cxi)

    renamed = cxi.put(f"{BASE}/{data['id']}", files={"name": (None, "Renamed")})
    unknown = cxi.put(f"{BASE}/{data['id']}", data={"nameFieldName": "Surname"})
    empty_name = cxi.put(f"{BASE}/{data['id']}", data={"name": " "})

    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["data"]["name"] == "Renamed"
    assert renamed.json()["data"]["asyncJobId"] == data["asyncJobId"]
    assert unknown.status_code == 400
    assert error_of(unknown)["code"] == "unknown_field"
    assert "Surname" in error_of(unknown)["message"]
    assert empty_name.status_code == 400
    assert error_of(empty_name)["code"] == "invalid_name"


@pytest.mark.integration
def test_put_refuses_unique_id_field_name(cxi: httpx.Client) -> None:
    data = created(cxi)

    response = cxi.put(f"{BASE}/{data['id']}", data={"uniqueIdFieldName": "Employee ID"})

    assert response.status_code == 400
    assert error_of(response)["code"] == "unique_id_immutable"


@pytest.mark.integration
def test_put_new_file_must_still_hold_the_mapped_columns(cxi: httpx.Client) -> None:
    data = created(cxi, uniqueIdFieldName="Employee ID")

    response = cxi.put(
        f"{BASE}/{data['id']}",
        files={"file": ("x.csv", b"Email,Mobile Number\na@example.com,\n", "text/csv")},
    )

    assert response.status_code == 400
    assert error_of(response)["code"] == "unknown_field"
    assert "Employee ID" in error_of(response)["message"]


@pytest.mark.integration
def test_unknown_field_names_the_field_and_lists_headers(cxi: httpx.Client) -> None:
    response = create(cxi, mobilePhoneFieldName="Mobile Phone")

    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "unknown_field"
    assert "'Mobile Phone'" in error["message"]
    assert "Employee ID, First Name, Email, Mobile Number" in error["message"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("content", "fields", "code"),
    [
        (b"", {}, "invalid_file"),
        (b"\n\n", {}, "invalid_file"),
        ("Email\nj\xf6rg@example.com\n".encode("latin-1"), {}, "invalid_file"),
        (b"Email,Email\na@example.com,b@example.com\n", {}, "invalid_file"),
        (GOOD_CSV.encode(), {"name": ""}, "invalid_name"),
        (GOOD_CSV.encode(), {"emailFieldName": "", "mobilePhoneFieldName": ""}, "missing_channel_field"),
    ],
    ids=["empty", "blank-lines", "latin-1", "duplicate-header", "empty-name", "no-channel"],
)
def test_create_rejects_bad_requests(
    cxi: httpx.Client, content: bytes, fields: dict[str, str], code: str
) -> None:
    response = create(cxi, content, **fields)

    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == code
    assert cxi.get(BASE).json() == {"data": {"audienceImports": []}}


@pytest.mark.integration
def test_create_requires_a_file(cxi: httpx.Client) -> None:
    response = cxi.post(BASE, data={"name": "No file", "emailFieldName": "Email"})

    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_file"


@pytest.mark.integration
def test_names_are_unique(cxi: httpx.Client) -> None:
    first = created(cxi)
    other = created(cxi, name="Managers")

    duplicate = create(cxi)
    rename = cxi.put(f"{BASE}/{other['id']}", data={"name": first["name"]})

    assert duplicate.status_code == rename.status_code == 409
    assert error_of(duplicate)["code"] == error_of(rename)["code"] == "duplicate_name"


@pytest.mark.integration
def test_list_and_get(cxi: httpx.Client) -> None:
    first = created(cxi)
    second = created(cxi, name="Managers", mobilePhoneFieldName="Mobile Number")

    listed = cxi.get(BASE).json()["data"]["audienceImports"]
    fetched = cxi.get(f"{BASE}/{second['id']}").json()["data"]
    missing = cxi.get(f"{BASE}/00000000-0000-4000-8000-000000000000")

    assert [item["id"] for item in listed] == [first["id"], second["id"]]
    assert all(set(item) == IMPORT_KEYS for item in listed)
    assert fetched["name"] == "Managers"
    assert fetched["mobilePhoneFieldName"] == "Mobile Number"
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "not_found"


@pytest.mark.integration
def test_delete(cxi: httpx.Client, sandbox: SandboxServer) -> None:
    data = created(cxi)
    in_use_url = f"{sandbox.url}/_sandbox/cxi/imports/{data['id']}/in-use"

    assert httpx.post(in_use_url).json()["in_use"] is True
    refused = cxi.delete(f"{BASE}/{data['id']}")
    assert httpx.post(in_use_url, json={"in_use": False}).json()["in_use"] is False
    deleted = cxi.delete(f"{BASE}/{data['id']}")

    assert refused.status_code == 409
    assert error_of(refused)["code"] == "in_use"
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert cxi.get(f"{BASE}/{data['id']}").status_code == 404
    assert cxi.delete(f"{BASE}/{data['id']}").status_code == 404
    assert cxi.get(f"{BASE}/async-jobs/{data['asyncJobId']}/status").status_code == 404
    assert httpx.post(in_use_url).status_code == 404


@pytest.mark.integration
def test_singular_path_is_an_alias(cxi: httpx.Client) -> None:
    singular = "/public-api/audience-import"
    response = create(cxi, base=singular)
    assert response.status_code == 201, response.text
    data = response.json()["data"]

    assert cxi.get(f"{singular}/{data['id']}").json()["data"]["id"] == data["id"]
    assert poll_job(cxi, data["asyncJobId"], base=singular)[-1]["status"] == "completed"
    assert [item["id"] for item in cxi.get(singular).json()["data"]["audienceImports"]] == [data["id"]]
    assert cxi.delete(f"{singular}/{data['id']}").status_code == 204


@pytest.mark.integration
def test_unknown_job_ids_are_not_found(cxi: httpx.Client) -> None:
    for endpoint in ("status", "failures"):
        response = cxi.get(f"{BASE}/async-jobs/nope/{endpoint}")
        assert response.status_code == 404
        assert error_of(response)["code"] == "not_found"


@pytest.mark.integration
def test_upload_over_the_limit_is_413() -> None:
    settings = SandboxSettings(pace_seconds=0.01, cxi_api_key=API_KEY, max_upload_bytes=1000)
    with (
        SandboxServer(settings) as server,
        httpx.Client(base_url=server.vendor_url("cxi"), headers={"X-GSCC-Api-Key": API_KEY}) as client,
    ):
        too_big = create(client, "Email\n" + "someone@example.com\n" * 60)
        at_limit = create(client, "Email\n" + "x" * 993 + "\n", name="At limit", mobilePhoneFieldName="")

    assert too_big.status_code == 413
    assert error_of(too_big)["code"] == "file_too_large"
    assert at_limit.status_code == 201, at_limit.text


@pytest.mark.integration
def test_upload_is_checked_in_the_background(cxi: httpx.Client) -> None:
    rows = "".join(f"E{i},person{i}@example.com\n" for i in range(200_000))
    started = time.monotonic()

    data = created(
        cxi, "Employee ID,Email\n" + rows, uniqueIdFieldName="Employee ID", mobilePhoneFieldName=""
    )
    answered = time.monotonic() - started
    statuses = poll_job(cxi, data["asyncJobId"])

    assert answered < 2
    assert statuses[-1]["status"] == "completed"
    failures = cxi.get(f"{BASE}/async-jobs/{data['asyncJobId']}/failures").json()["data"]
    assert failures["totalNumOfRows"] == failures["numOfRowsProcessed"] == 200_000

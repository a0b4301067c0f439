"""CommunicateXIClient against an in-test emulation of the documented audience-import API.

The fake answers through ``httpx.MockTransport``, so everything above the HTTP boundary (form
fields, CSV body, retries, error redaction) is the real code.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pandas as pd
import pytest

from audience_pipeline.destinations.base import ChunkJob, JobHandle, JobState
from audience_pipeline.destinations.cxi import (
    VENDOR,
    CommunicateXIClient,
    CommunicateXIResource,
    CxiOptions,
    to_csv_bytes,
)
from audience_pipeline.destinations.http import (
    VendorAuthError,
    VendorError,
    VendorHTTPError,
)
from audience_pipeline_tests.destinations.fakes import Handler, fake_http, parse_multipart

API_KEY = "cxi-unit-key-4b7d1e9a0c2f"
BASE_URL = "https://cxi.example.test/cxi"
IMPORTS = "/cxi/public-api/audience-imports"


@dataclass
class Upload:
    method: str
    path: str
    fields: dict[str, str]
    file_name: str
    content_type: str
    body: bytes


@dataclass
class FakeCxi:
    """The documented endpoints, in memory; ``jobs`` holds each async job's failures payload."""

    imports: dict[str, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    hide_from_next_list: bool = False
    reject_uploads_with: int | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("X-GSCC-Api-Key") != API_KEY:
            return _error(401, "unauthorized", f"invalid API key {request.headers.get('X-GSCC-Api-Key')}")
        path = request.url.path
        if path == IMPORTS and request.method == "GET":
            listed = [] if self.hide_from_next_list else list(self.imports.values())
            self.hide_from_next_list = False
            return httpx.Response(200, json={"data": {"audienceImports": listed}})
        if path.startswith(f"{IMPORTS}/async-jobs/"):
            job_id, endpoint = path.split("/")[-2:]
            job = self.jobs.get(job_id)
            if job is None:
                return _error(404, "not_found", "no such async job")
            if endpoint == "status":
                keys = ("id", "audienceImportId", "fileName", "progressPercentage", "status")
                return httpx.Response(200, json={"data": {k: job[k] for k in keys}})
            return httpx.Response(200, json={"data": job})
        if path == IMPORTS and request.method == "POST":
            return self._upload(request, None)
        if path.startswith(f"{IMPORTS}/") and request.method == "PUT":
            return self._upload(request, path.rsplit("/", 1)[1])
        return _error(404, "not_found", f"{request.method} {path}")

    def _upload(self, request: httpx.Request, import_id: str | None) -> httpx.Response:
        upload = _parse_multipart(request)
        self.uploads.append(upload)
        if self.reject_uploads_with:
            return _error(self.reject_uploads_with, "invalid_file", f"bad upload for key {API_KEY}")
        if import_id is None:
            if any(i["name"] == upload.fields["name"] for i in self.imports.values()):
                return _error(409, "duplicate_name", "an audience import with this name exists")
            import_id = str(uuid.uuid4())
            self.imports[import_id] = {"id": import_id, "uniqueIdFieldName": None}
        elif import_id not in self.imports:
            return _error(404, "not_found", "no such audience import")
        record = self.imports[import_id]
        job_id = str(uuid.uuid4())
        rows = list(csv.reader(io.StringIO(upload.body.decode("utf-8"))))
        self.jobs[job_id] = {
            "id": job_id,
            "audienceImportId": import_id,
            "fileName": upload.file_name,
            "progressPercentage": 0,
            "status": "pending",
            "totalNumOfRows": len(rows) - 1,
            "numOfRowsProcessed": 0,
            "numOfRowsFailed": 0,
            "errorMessages": [],
        }
        record.update(
            {k: v for k, v in upload.fields.items() if k != "uniqueIdFieldName" or request.method == "POST"},
            fileName=upload.file_name,
            status="pending",
            importType="csv",
            fieldNames=rows[0],
            asyncJobId=job_id,
        )
        return httpx.Response(201 if request.method == "POST" else 200, json={"data": record})

    def finish(self, job_id: str, status: str, errors: list[dict[str, Any]], processed: int) -> None:
        job = self.jobs[job_id]
        job.update(
            status=status,
            progressPercentage=100 if status == "completed" else 98,
            numOfRowsProcessed=processed,
            numOfRowsFailed=len(errors),
            errorMessages=errors,
        )


def _error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


def _parse_multipart(request: httpx.Request) -> Upload:
    form = parse_multipart(request)
    path = request.url.path
    return Upload(request.method, path, dict(form.fields), form.file_name, form.content_type, form.body)


@pytest.fixture
def fake() -> FakeCxi:
    return FakeCxi()


@pytest.fixture
def make_client(fake: FakeCxi, close_after: Callable) -> Callable[..., CommunicateXIClient]:
    def make(
        api_key: str = API_KEY,
        handler: Handler | None = None,
        **options: Any,
    ) -> CommunicateXIClient:
        headers = {"X-GSCC-Api-Key": api_key, "Accept": "application/json"}
        http = fake_http(VENDOR, BASE_URL, handler or fake, headers=headers)
        return close_after(CommunicateXIClient(http, CxiOptions(import_name="All staff", **options)))

    return make


def rows() -> pd.DataFrame:
    """Validated rows as ``validate_file`` returns them: ``source_line`` plus canonical columns."""
    return pd.DataFrame(
        {
            "source_line": [2, 3, 5],
            "unique_id": ["E1", "E2", "E3"],
            "email": ["ann@example.com", None, "cy@example.com"],
            "mobile_phone": ["+14155550101", "+14155550102", None],
            "first_name": ["Ann", "Bob", "Cy"],
            "last_name": [None, "O'Neil", "Smith, Jr"],
            "department": ['R&D "core"', "Sales", None],
        }
    ).astype(
        {c: "str" for c in ("unique_id", "email", "mobile_phone", "first_name", "last_name", "department")}
    )


EXPECTED_CSV = (
    "unique_id,email,mobile_phone,first_name,last_name,department\n"
    'E1,ann@example.com,+14155550101,Ann,,"R&D ""core"""\n'
    "E2,,+14155550102,Bob,O'Neil,Sales\n"
    'E3,cy@example.com,,Cy,"Smith, Jr",\n'
)


def handle_for(job_id: str, row_count: int = 3) -> JobHandle:
    return JobHandle(
        vendor=VENDOR,
        feed="all_staff",
        partition="p",
        jobs=[ChunkJob(job_id=job_id, first_row=0, row_count=row_count)],
        submitted_rows=row_count,
    )


def test_first_submit_creates_the_import(
    fake: FakeCxi, make_client: Callable[..., CommunicateXIClient]
) -> None:
    handle = make_client().submit(rows(), feed="all_staff", partition="employees.csv")

    assert [(r.method, r.url.path) for r in fake.requests] == [("GET", IMPORTS), ("POST", IMPORTS)]
    post = fake.requests[1]
    assert post.headers["X-GSCC-Api-Key"] == API_KEY
    assert post.headers["Accept"] == "application/json"
    (upload,) = fake.uploads
    assert upload.fields == {
        "name": "All staff",
        "emailFieldName": "email",
        "mobilePhoneFieldName": "mobile_phone",
        "nameFieldName": "first_name",
        "uniqueIdFieldName": "unique_id",
    }
    assert (upload.file_name, upload.content_type) == ("all_staff.csv", "text/csv")
    assert upload.body.decode("utf-8") == EXPECTED_CSV
    (import_id,) = fake.imports
    job_id = fake.imports[import_id]["asyncJobId"]
    assert handle.jobs == [ChunkJob(job_id=job_id, first_row=0, row_count=3)]
    assert (handle.vendor, handle.feed, handle.partition, handle.submitted_rows) == (
        VENDOR,
        "all_staff",
        "employees.csv",
        3,
    )
    assert handle.extra == {
        "audience_import_id": import_id,
        "import_name": "All staff",
        "created": True,
        "unique_id_field": "unique_id",
    }


def test_second_submit_updates_the_same_import(
    fake: FakeCxi, make_client: Callable[..., CommunicateXIClient]
) -> None:
    client = make_client(file_name="staff.csv")
    first = client.submit(rows(), feed="all_staff", partition="a")

    second = client.submit(rows().iloc[:2], feed="all_staff", partition="b")

    (import_id,) = fake.imports
    assert [(r.method, r.url.path) for r in fake.requests[2:]] == [
        ("GET", IMPORTS),
        ("PUT", f"{IMPORTS}/{import_id}"),
    ]
    put = fake.uploads[1]
    assert "uniqueIdFieldName" not in put.fields
    assert put.fields["name"] == "All staff"
    assert put.file_name == "staff.csv"
    assert put.body.decode("utf-8") == "".join(EXPECTED_CSV.splitlines(keepends=True)[:3])
    assert second.extra["created"] is False
    assert second.extra["audience_import_id"] == first.extra["audience_import_id"] == import_id
    assert second.jobs[0].job_id != first.jobs[0].job_id
    assert second.jobs[0].row_count == second.submitted_rows == 2


def test_conflict_on_create_falls_back_to_update(
    fake: FakeCxi, make_client: Callable[..., CommunicateXIClient]
) -> None:
    make_client().submit(rows(), feed="all_staff", partition="a")
    fake.requests.clear()
    fake.hide_from_next_list = True  # another run created it between our list and our POST

    handle = make_client().submit(rows(), feed="all_staff", partition="b")

    (import_id,) = fake.imports
    assert [(r.method, r.url.path) for r in fake.requests] == [
        ("GET", IMPORTS),
        ("POST", IMPORTS),
        ("GET", IMPORTS),
        ("PUT", f"{IMPORTS}/{import_id}"),
    ]
    assert handle.extra["created"] is False
    assert handle.jobs[0].job_id == fake.imports[import_id]["asyncJobId"]


def test_conflict_without_a_same_named_import_is_raised(
    fake: FakeCxi, make_client: Callable[..., CommunicateXIClient]
) -> None:
    fake.reject_uploads_with = 409

    with pytest.raises(VendorHTTPError) as info:
        make_client().submit(rows(), feed="all_staff", partition="a")

    assert info.value.status == 409
    assert [r.method for r in fake.requests] == ["GET", "POST", "GET"]


def test_only_mapped_channels_are_named(
    fake: FakeCxi, make_client: Callable[..., CommunicateXIClient]
) -> None:
    frame = rows().drop(columns=["mobile_phone", "first_name"])

    make_client(name_field="last_name").submit(frame, feed="all_staff", partition="a")

    assert fake.uploads[0].fields == {
        "name": "All staff",
        "emailFieldName": "email",
        "nameFieldName": "last_name",
        "uniqueIdFieldName": "unique_id",
    }


def test_no_channel_column_is_refused_before_any_upload(
    fake: FakeCxi, make_client: Callable[..., CommunicateXIClient]
) -> None:
    with pytest.raises(ValueError, match="needs an email or mobile phone column"):
        make_client(email_field=None).submit(rows().drop(columns=["mobile_phone"]), feed="f", partition="p")

    assert fake.uploads == []


@pytest.mark.parametrize(
    ("vendor_status", "state"),
    [
        ("pending", JobState.PENDING),
        ("in_progress", JobState.RUNNING),
        ("completed", JobState.SUCCEEDED),
        ("failed", JobState.FAILED),
    ],
)
def test_status_maps_vendor_states(
    fake: FakeCxi, make_client: Callable[..., CommunicateXIClient], vendor_status: str, state: JobState
) -> None:
    client = make_client()
    handle = client.submit(rows(), feed="all_staff", partition="a")
    fake.jobs[handle.jobs[0].job_id].update(status=vendor_status, progressPercentage=40)

    status = client.status(handle)

    assert (status.state, status.vendor_status, status.progress) == (state, vendor_status, 40)
    assert fake.requests[-1].url.path == f"{IMPORTS}/async-jobs/{handle.jobs[0].job_id}/status"


def test_outcome_maps_lines_to_rows(fake: FakeCxi, make_client: Callable[..., CommunicateXIClient]) -> None:
    client = make_client()
    handle = client.submit(rows(), feed="all_staff", partition="a")
    job_id = handle.jobs[0].job_id
    errors = [
        {"line": 2, "error": "Invalid email"},
        {"line": 4, "error": "Missing unique ID value"},
        {"line": 4, "error": "Invalid phone"},
        {"line": 5, "error": "beyond the upload"},
        {"line": 1, "error": "header problem"},
        {"line": 0, "error": "internal error"},
    ]
    fake.finish(job_id, "failed", errors, processed=1)

    outcome = client.outcome(handle)

    assert [(f.row, f.reason, f.outcome) for f in outcome.failures] == [
        (0, "Invalid email", "failed"),
        (2, "Missing unique ID value; Invalid phone", "failed"),
    ]
    assert outcome.notes == [
        "vendor reported line 5 outside the upload: beyond the upload",
        "vendor reported line 1 outside the upload: header problem",
        "vendor reported line 0 outside the upload: internal error",
    ]
    assert (outcome.submitted, outcome.imported, outcome.failed, outcome.ignored) == (3, 1, 2, 0)
    assert outcome.vendor_counts == {"total": 3, "processed": 1, "failed": 6}
    assert fake.requests[-1].url.path == f"{IMPORTS}/async-jobs/{job_id}/failures"


def test_outcome_of_a_failed_job_without_row_details_fails_every_row(
    fake: FakeCxi, make_client: Callable[..., CommunicateXIClient]
) -> None:
    client = make_client()
    handle = client.submit(rows(), feed="all_staff", partition="a")
    fake.finish(handle.jobs[0].job_id, "failed", [{"line": 0, "error": "unexpected error"}], processed=0)

    outcome = client.outcome(handle)

    assert [f.row for f in outcome.failures] == [0, 1, 2]
    assert {f.reason for f in outcome.failures} == {"Communicate XI import job failed without row details"}
    assert (outcome.imported, outcome.failed) == (0, 3)
    assert outcome.notes == ["vendor reported line 0 outside the upload: unexpected error"]


def test_outcome_of_a_completed_job(fake: FakeCxi, make_client: Callable[..., CommunicateXIClient]) -> None:
    client = make_client()
    handle = client.submit(rows(), feed="all_staff", partition="a")
    fake.finish(handle.jobs[0].job_id, "completed", [], processed=3)

    outcome = client.outcome(handle)

    assert (outcome.failures, outcome.notes, outcome.imported) == ([], [], 3)
    assert outcome.vendor_counts == {"total": 3, "processed": 3, "failed": 0}


def test_outcome_of_a_chunk_offsets_rows(
    fake: FakeCxi, make_client: Callable[..., CommunicateXIClient]
) -> None:
    client = make_client()
    submitted = client.submit(rows(), feed="all_staff", partition="a")
    job_id = submitted.jobs[0].job_id
    fake.finish(job_id, "failed", [{"line": 3, "error": "Duplicate"}], processed=2)
    handle = JobHandle(
        vendor=VENDOR,
        feed="all_staff",
        partition="a",
        jobs=[ChunkJob(job_id=job_id, first_row=10, row_count=3)],
        submitted_rows=13,
    )

    assert [(f.row, f.reason) for f in client.outcome(handle).failures] == [(11, "Duplicate")]


def test_wrong_key_is_not_echoed_in_errors_or_logs(
    fake: FakeCxi, make_client: Callable[..., CommunicateXIClient], caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "cxi-wrong-key-8e6f2a1b9d"
    caplog.set_level(logging.DEBUG)

    with pytest.raises(VendorAuthError) as info:
        make_client(api_key=wrong).submit(rows(), feed="all_staff", partition="a")

    error = info.value
    assert error.status == 401
    assert "invalid API key ***" in str(error)
    assert wrong in fake.requests[0].headers["X-GSCC-Api-Key"]
    for text in (str(error), repr(error), json.dumps(error.__reduce__()[1])):
        assert wrong not in text
    assert "audience-imports" in caplog.text
    assert wrong not in caplog.text


def test_rejected_upload_is_not_echoed_in_errors_or_logs(
    fake: FakeCxi, make_client: Callable[..., CommunicateXIClient], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.reject_uploads_with = 400

    with pytest.raises(VendorHTTPError) as info:
        make_client().submit(rows(), feed="all_staff", partition="a")

    assert info.value.status == 400
    assert "invalid_file: bad upload for key ***" in str(info.value)
    assert API_KEY not in str(info.value)
    assert "POST" in caplog.text
    assert API_KEY not in caplog.text


def test_upload_answer_without_a_job_id_is_an_error(make_client: Callable[..., CommunicateXIClient]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"data": {"audienceImports": []}})
        return httpx.Response(201, json={"data": {"id": "x"}})

    client = make_client(handler=handler)

    with pytest.raises(VendorError, match="no import id or asyncJobId"):
        client.submit(rows(), feed="all_staff", partition="a")


def test_to_csv_bytes_quotes_only_where_needed() -> None:
    assert to_csv_bytes(rows().drop(columns="source_line")).decode("utf-8") == EXPECTED_CSV


def test_resource_builds_a_client_with_validated_options() -> None:
    resource = CommunicateXIResource(base_url=BASE_URL, api_key=API_KEY)

    client = resource.destination({"import_name": "All staff", "name_field": None})
    try:
        assert client.options == CxiOptions(import_name="All staff", name_field=None)
    finally:
        client.close()
    with pytest.raises(ValueError, match="import_name"):
        resource.destination({})


def test_outcome_given_the_final_status_never_polls_the_status_endpoint(
    fake: FakeCxi, make_client: Callable[..., CommunicateXIClient]
) -> None:
    client = make_client()
    handle = client.submit(rows(), feed="all_staff", partition="a")
    job_id = handle.jobs[0].job_id
    fake.finish(job_id, "failed", [{"line": 3, "error": "Invalid email"}], processed=2)
    status = client.status(handle)
    assert status.state is JobState.FAILED
    before = len(fake.requests)

    outcome = make_client().outcome(handle, status=status)

    assert [r.url.path for r in fake.requests[before:]] == [f"{IMPORTS}/async-jobs/{job_id}/failures"]
    assert [(f.row, f.reason) for f in outcome.failures] == [(1, "Invalid email")]

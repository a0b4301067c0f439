"""Communicate XI audience imports: one long-lived import per feed, a new file per push.

Protocol choices where the vendor document is vague (the sandbox agrees with each):
- Paths are the plural ``/public-api/audience-imports``; auth is the ``X-GSCC-Api-Key`` header.
- The first push creates the import (POST multipart, ``uniqueIdFieldName`` only then); later
  pushes PUT the new file to the same id, which refreshes every audience built on it. The import
  is found by name through the list endpoint, so a lost id never becomes a second import.
- A job that ends ``failed`` still imported its good rows (the document's example: 98 processed,
  2 failed): ``numOfRowsProcessed`` rows are imported, ``errorMessages`` lists the rest by
  ``line``, the 1-based line of the uploaded file with the header as line 1. Normalisation puts
  every row on one line, so line ``n`` is submitted row ``n - 2``.
- Uploaded headers are the feed's canonical column names, not the HR file's, so audiences built
  in CXI survive a change of HR system. Cells are quoted only when they must be, because a
  field name is matched against the header text and a naive parser would keep the quotes.
- Several ``errorMessages`` for one line become one failure with the messages joined; a line
  outside the upload (or none) is kept as a note, since it cannot be tied to a row.
- A PUT of a new file is not retried after the request may have arrived (dropped connection,
  read timeout), although PUT is idempotent in HTTP: each PUT starts an import job, and a
  repeated one would import the file twice. The next attempt reconciles instead.
- ``outcome`` reads only the job's failures (they carry its final state and counts), never its
  status, so a terminal ``status=`` needs nothing else.
- Reconciling a submit whose answer was lost uses only documented fields: the import found by
  name, its ``asyncJobId`` (the latest job) and ``updatedAt``/``createdAt``. A job this pipeline
  never recorded, on an import created or updated after the intent was written (less
  ``CLOCK_SKEW_SECONDS`` for the vendor's clock), is the lost submit's job; an import untouched
  since then means nothing arrived.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

import dagster as dg
import pandas as pd
from pydantic import Field

from audience_pipeline.destinations.base import (
    ChunkJob,
    JobHandle,
    JobOutcome,
    JobState,
    JobStatus,
    Reconciliation,
    RowFailure,
    SubmitIntent,
    line_to_row,
)
from audience_pipeline.destinations.http import RetryPolicy, VendorError, VendorHTTP, VendorHTTPError
from audience_pipeline.destinations.options import VendorOptions, not_a_column

VENDOR = "communicate_xi"
IMPORTS = "/public-api/audience-imports"
CLOCK_SKEW_SECONDS = 60.0
_STATES = {
    "pending": JobState.PENDING,
    "in_progress": JobState.RUNNING,
    "completed": JobState.SUCCEEDED,
    "failed": JobState.FAILED,
}


class CxiOptions(VendorOptions):
    """Feed options for Communicate XI; field options name canonical columns of the feed."""

    import_name: str = Field(min_length=1)
    file_name: str | None = None
    email_field: str | None = "email"
    mobile_phone_field: str | None = "mobile_phone"
    name_field: str | None = "first_name"
    unique_id_field: str | None = "unique_id"

    def field_params(self, columns: list[str], *, creating: bool) -> dict[str, str]:
        """The ``*FieldName`` form fields, for the columns the upload really has.

        Defaults that name an unmapped column are left out; ``uniqueIdFieldName`` only on create,
        because the API refuses it on update.
        """
        wanted = {
            "emailFieldName": self.email_field,
            "mobilePhoneFieldName": self.mobile_phone_field,
            "nameFieldName": self.name_field,
        }
        if creating:
            wanted["uniqueIdFieldName"] = self.unique_id_field
        return {k: v for k, v in wanted.items() if v and v in columns}

    def describe_target(self) -> str:
        return f'Communicate XI import "{self.import_name}"'

    def column_problems(self, columns: list[str]) -> list[tuple[str | None, str]]:
        """Explicit field options must name columns; one of email or mobile phone must be sent."""
        problems: list[tuple[str | None, str]] = []
        for key in ("email_field", "mobile_phone_field", "name_field", "unique_id_field"):
            value = getattr(self, key)
            if key in self.model_fields_set and value is not None and value not in columns:
                problems.append(not_a_column(key, value, columns))
        params = self.field_params(columns, creating=True)
        if not problems and "emailFieldName" not in params and "mobilePhoneFieldName" not in params:
            problems.append(
                (
                    None,
                    "Communicate XI needs an email or mobile phone column: set email_field or "
                    f"mobile_phone_field to one of {columns}",
                )
            )
        return problems


class CommunicateXIClient:
    vendor: ClassVar[str] = VENDOR

    def __init__(self, http: VendorHTTP, options: CxiOptions) -> None:
        self.http = http
        self.options = options

    def close(self) -> None:
        self.http.close()

    def _field_params(self, columns: list[str], *, creating: bool) -> dict[str, str]:
        params = self.options.field_params(columns, creating=creating)
        if "emailFieldName" not in params and "mobilePhoneFieldName" not in params:
            raise ValueError(
                f"Communicate XI needs an email or mobile phone column; the feed sends {columns}"
            )
        return params

    def find_import(self, name: str) -> dict[str, Any] | None:
        """The import called ``name``, so a lost id never turns into a second import."""
        body = self.http.json("GET", IMPORTS)
        for item in body["data"]["audienceImports"]:
            if item.get("name") == name:
                return item
        return None

    def submit(
        self, rows: pd.DataFrame, *, feed: str, partition: str, previous: JobHandle | None = None
    ) -> JobHandle:
        """Create the import on first use, else PUT the new file to it (a 409 on create = raced).

        ``previous`` is not needed: the documented list finds the import by name."""
        columns = [c for c in rows.columns if c != "source_line"]
        payload = to_csv_bytes(rows[columns])
        file_name = self.options.file_name or f"{feed}.csv"
        existing = self.find_import(self.options.import_name)
        created = existing is None
        if existing is None:
            try:
                data = self._upload("POST", IMPORTS, payload, file_name, columns, creating=True)
            except VendorHTTPError as exc:
                if exc.status != 409:
                    raise
                existing = self.find_import(self.options.import_name)
                if existing is None:
                    raise  # the conflict is not a same-named import we could update
                created = False
        if existing is not None:
            data = self._upload(
                "PUT", f"{IMPORTS}/{existing['id']}", payload, file_name, columns, creating=False
            )
        return _handle(data, feed=feed, partition=partition, rows=len(rows), created=created)

    def reconcile(
        self, intent: SubmitIntent, rows: pd.DataFrame, *, previous: JobHandle | None = None
    ) -> Reconciliation:
        """Did the submit recorded in ``intent`` reach Communicate XI? (See the module docstring.)"""
        existing = self.find_import(self.options.import_name)
        if existing is None:
            return Reconciliation(
                None, True, f"no import named {self.options.import_name!r}: nothing arrived"
            )
        job_id = str(existing.get("asyncJobId") or "")
        touched = max(_epoch(existing.get("updatedAt")), _epoch(existing.get("createdAt")))
        if not job_id or job_id in intent.known_job_ids or touched < intent.recorded_at - CLOCK_SKEW_SECONDS:
            return Reconciliation(
                None, True, f"import {self.options.import_name!r} has no job newer than the lost submit"
            )
        created = _epoch(existing.get("createdAt")) >= intent.recorded_at - CLOCK_SKEW_SECONDS
        handle = _handle(
            existing, feed=intent.feed, partition=intent.partition, rows=len(rows), created=created
        )
        return Reconciliation(handle, True, f"the lost submit created job {job_id} on {existing['name']!r}")

    def _upload(
        self, method: str, path: str, payload: bytes, file_name: str, columns: list[str], *, creating: bool
    ) -> dict[str, Any]:
        form = {"name": self.options.import_name, **self._field_params(columns, creating=creating)}
        body = self.http.json(
            method,
            path,
            data=form,
            files={"file": (file_name, payload, "text/csv")},
            idempotent=False,  # a PUT with a file starts a new job: repeating it is a second import
        )
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict) or not data.get("asyncJobId") or not data.get("id"):
            raise VendorError(
                VENDOR, method, path, code="unexpected_response", detail="no import id or asyncJobId"
            )
        return data

    def status(self, handle: JobHandle) -> JobStatus:
        job = handle.jobs[0]
        data = self.http.json("GET", f"{IMPORTS}/async-jobs/{job.job_id}/status")["data"]
        vendor_status = str(data.get("status"))
        return JobStatus(
            state=_STATES.get(vendor_status, JobState.UNKNOWN),
            vendor_status=vendor_status,
            progress=data.get("progressPercentage"),
        )

    def outcome(self, handle: JobHandle, *, status: JobStatus | None = None) -> JobOutcome:
        """The job's failures; never a status poll (``status`` is not needed: the failures
        answer carries the final state and counts)."""
        job = handle.jobs[0]
        data = self.http.json("GET", f"{IMPORTS}/async-jobs/{job.job_id}/failures")["data"]
        failures: dict[int, list[str]] = {}
        notes: list[str] = []
        for item in data.get("errorMessages") or []:
            error = str(item.get("error") or "rejected by Communicate XI")
            row = line_to_row(item.get("line"))
            if row is not None and row < job.row_count:
                failures.setdefault(job.first_row + row, []).append(error)
            else:
                notes.append(f"vendor reported line {item.get('line')} outside the upload: {error}")
        processed = int(data.get("numOfRowsProcessed") or 0)
        if data.get("status") == "failed" and not failures and processed == 0:
            reason = "Communicate XI import job failed without row details"
            failures = {job.first_row + i: [reason] for i in range(job.row_count)}
        counts = {
            "total": int(data.get("totalNumOfRows") or 0),
            "processed": processed,
            "failed": int(data.get("numOfRowsFailed") or 0),
        }
        return JobOutcome(
            submitted=handle.submitted_rows,
            failures=[RowFailure(row=r, reason="; ".join(msgs)) for r, msgs in sorted(failures.items())],
            vendor_counts=counts,
            notes=notes,
        )


def _handle(data: dict[str, Any], *, feed: str, partition: str, rows: int, created: bool) -> JobHandle:
    return JobHandle(
        vendor=VENDOR,
        feed=feed,
        partition=partition,
        jobs=[ChunkJob(job_id=data["asyncJobId"], first_row=0, row_count=rows)],
        submitted_rows=rows,
        extra={
            "audience_import_id": data["id"],
            "import_name": data["name"],
            "created": created,
            "unique_id_field": data.get("uniqueIdFieldName"),
        },
    )


def _epoch(value: object) -> float:
    """An ISO timestamp as the vendor writes it (``2020-10-16T20:20:40.631Z``); 0 when absent."""
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def to_csv_bytes(frame: pd.DataFrame) -> bytes:
    """UTF-8 CSV, quoting only cells that need it (pyarrow's "needed" quotes every string and
    header); nulls become empty cells and every row is one line."""
    return frame.to_csv(index=False, lineterminator="\n", na_rep="").encode("utf-8")


class CommunicateXIResource(dg.ConfigurableResource):
    """Credentials and endpoint of one Communicate XI account (``EnvVar`` keeps them hidden)."""

    base_url: str
    api_key: str
    timeout_seconds: float = 30.0

    def destination(self, options: dict, retry: RetryPolicy | None = None) -> CommunicateXIClient:
        http = VendorHTTP(
            VENDOR,
            self.base_url,
            headers={"X-GSCC-Api-Key": self.api_key, "Accept": "application/json"},
            timeout=self.timeout_seconds,
            retry=retry,
        )
        return CommunicateXIClient(http, CxiOptions.model_validate(options))

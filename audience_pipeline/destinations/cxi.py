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
  in CXI survive a change of HR system.
"""

from __future__ import annotations

import io
from typing import ClassVar

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from pydantic import BaseModel, ConfigDict, Field

from audience_pipeline.destinations.base import (
    ChunkJob,
    JobHandle,
    JobOutcome,
    JobState,
    JobStatus,
    RowFailure,
)
from audience_pipeline.destinations.http import VendorHTTP, VendorHTTPError

VENDOR = "communicate_xi"
IMPORTS = "/public-api/audience-imports"
_STATES = {
    "pending": JobState.PENDING,
    "in_progress": JobState.RUNNING,
    "completed": JobState.SUCCEEDED,
    "failed": JobState.FAILED,
}


class CxiOptions(BaseModel):
    """Feed options for Communicate XI; field options name canonical columns of the feed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    import_name: str = Field(min_length=1)
    file_name: str | None = None
    email_field: str | None = "email"
    mobile_phone_field: str | None = "mobile_phone"
    name_field: str | None = "first_name"
    unique_id_field: str | None = "unique_id"


class CommunicateXIClient:
    vendor: ClassVar[str] = VENDOR

    def __init__(self, http: VendorHTTP, options: CxiOptions) -> None:
        self.http = http
        self.options = options

    def close(self) -> None:
        self.http.close()

    def _field_params(self, columns: list[str], *, creating: bool) -> dict[str, str]:
        wanted = {
            "emailFieldName": self.options.email_field,
            "mobilePhoneFieldName": self.options.mobile_phone_field,
            "nameFieldName": self.options.name_field,
        }
        if creating:
            wanted["uniqueIdFieldName"] = self.options.unique_id_field
        params = {k: v for k, v in wanted.items() if v and v in columns}
        if "emailFieldName" not in params and "mobilePhoneFieldName" not in params:
            raise ValueError(
                f"Communicate XI needs an email or mobile phone column; the feed sends {columns}"
            )
        return params

    def find_import(self, name: str) -> dict | None:
        body = self.http.json("GET", IMPORTS)
        for item in body["data"]["audienceImports"]:
            if item.get("name") == name:
                return item
        return None

    def submit(self, rows: pd.DataFrame, *, feed: str, partition: str) -> JobHandle:
        columns = [c for c in rows.columns if c != "source_line"]
        payload = to_csv_bytes(rows[columns])
        file_name = self.options.file_name or f"{feed}.csv"
        existing = self.find_import(self.options.import_name)
        created = existing is None
        if created:
            try:
                data = self._upload("POST", IMPORTS, payload, file_name, columns, creating=True)
            except VendorHTTPError as exc:
                if exc.status != 409:
                    raise
                existing, created = self.find_import(self.options.import_name), False
        if not created:
            assert existing is not None
            data = self._upload(
                "PUT", f"{IMPORTS}/{existing['id']}", payload, file_name, columns, creating=False
            )
        return JobHandle(
            vendor=VENDOR,
            feed=feed,
            partition=partition,
            jobs=[ChunkJob(job_id=data["asyncJobId"], first_row=0, row_count=len(rows))],
            submitted_rows=len(rows),
            extra={
                "audience_import_id": data["id"],
                "import_name": data["name"],
                "created": created,
                "unique_id_field": data.get("uniqueIdFieldName"),
            },
        )

    def _upload(
        self, method: str, path: str, payload: bytes, file_name: str, columns: list[str], *, creating: bool
    ) -> dict:
        form = {"name": self.options.import_name, **self._field_params(columns, creating=creating)}
        response = self.http.request(
            method,
            path,
            data=form,
            files={"file": (file_name, payload, "text/csv")},
            idempotent=method == "PUT",
        )
        return response.json()["data"]

    def status(self, handle: JobHandle) -> JobStatus:
        job = handle.jobs[0]
        data = self.http.json("GET", f"{IMPORTS}/async-jobs/{job.job_id}/status")["data"]
        vendor_status = str(data.get("status"))
        return JobStatus(
            state=_STATES.get(vendor_status, JobState.RUNNING),
            vendor_status=vendor_status,
            progress=data.get("progressPercentage"),
        )

    def outcome(self, handle: JobHandle) -> JobOutcome:
        job = handle.jobs[0]
        data = self.http.json("GET", f"{IMPORTS}/async-jobs/{job.job_id}/failures")["data"]
        failures: dict[int, str] = {}
        notes: list[str] = []
        for item in data.get("errorMessages") or []:
            row = int(item["line"]) - 2
            if 0 <= row < job.row_count:
                failures[job.first_row + row] = str(item.get("error") or "rejected by Communicate XI")
            else:
                notes.append(
                    f"vendor reported line {item.get('line')} outside the upload: {item.get('error')}"
                )
        processed = int(data.get("numOfRowsProcessed") or 0)
        if data.get("status") == "failed" and not failures and processed == 0:
            reason = "Communicate XI import job failed without row details"
            failures = {job.first_row + i: reason for i in range(job.row_count)}
        counts = {
            "total": int(data.get("totalNumOfRows") or 0),
            "processed": processed,
            "failed": int(data.get("numOfRowsFailed") or 0),
        }
        return JobOutcome(
            submitted=handle.submitted_rows,
            failures=[RowFailure(row=r, reason=msg) for r, msg in sorted(failures.items())],
            vendor_counts=counts,
            notes=notes,
        )


def to_csv_bytes(frame: pd.DataFrame) -> bytes:
    """CSV with quoting only where needed; nulls become empty cells."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    sink = io.BytesIO()
    pacsv.write_csv(table, sink, write_options=pacsv.WriteOptions(quoting_style="needed"))
    return sink.getvalue()


class CommunicateXIResource(dg.ConfigurableResource):
    """Credentials and endpoint of one Communicate XI account (``EnvVar`` keeps them hidden)."""

    base_url: str
    api_key: str
    timeout_seconds: float = 30.0

    def destination(self, options: dict) -> CommunicateXIClient:
        http = VendorHTTP(
            VENDOR,
            self.base_url,
            headers={"X-GSCC-Api-Key": self.api_key, "Accept": "application/json"},
            timeout=self.timeout_seconds,
        )
        return CommunicateXIClient(http, CxiOptions.model_validate(options))

"""Communicate XI (CXI) audience-import API, emulated in memory.

Paths (under the vendor prefix ``/cxi``; the singular ``/public-api/audience-import`` is an alias
because the vendor's document mixes both):

- ``POST   /public-api/audience-imports`` (multipart) → 201 ``{"data": import}``
- ``GET    /public-api/audience-imports`` → ``{"data": {"audienceImports": [...]}}``
- ``GET|PUT|DELETE /public-api/audience-imports/{id}``
- ``GET    /public-api/audience-imports/async-jobs/{job_id}/status`` and ``.../failures``

Every request needs ``X-GSCC-Api-Key``; errors are ``{"error": {"code", "message"}}``.
Control routes (no key):

- ``POST /_sandbox/cxi/imports/{id}/in-use`` with optional JSON ``{"in_use": false}`` marks or
  clears "used by an audience", which makes DELETE answer 409.
- ``POST /_sandbox/cxi/stall`` with JSON ``{"stall": true}`` (or ``false``) → ``{"ok": true,
  "stall": true}``: while stall is on, every job created (by POST or by a PUT with a file) stays
  ``pending`` forever, progress 0, and its failures answer as for a pending job; switching stall
  off affects only jobs created afterwards. ``POST /_sandbox/reset`` switches it off.

Interpretation of the vendor's silences (the client is written against these):

- A job is ``pending`` for ``pace_seconds``, ``in_progress`` for at least another ``pace_seconds``
  and until the background row check has finished, then ``completed`` (progress 100) or
  ``failed`` when any row failed. Rows that pass are imported even when the job ends ``failed``,
  as in the vendor's example (failed, 98 processed, 2 failed): ``numOfRowsProcessed`` is rows
  imported, ``totalNumOfRows`` is data rows (header and blank lines excluded), and a failed job's
  ``progressPercentage`` is ``processed * 100 // total``. Before a job ends, ``failures`` reports
  zero counts and no messages.
- ``line`` in ``errorMessages`` is the 1-based line of the uploaded file (header = line 1) on which
  the failing record starts, so quoted newlines are counted. Each failed row has one message,
  the first that applies in this order: field count, ``SANDBOX_FAIL:<text>`` in any cell (a test
  hook; the stripped text is the message), missing unique id, duplicate unique id, no channel
  value, invalid email, an email on a reserved never-deliverable TLD (.invalid, .test, .localhost:
  what a real platform reports as a bounce-listed domain), invalid E.164 phone. Values are
  stripped before checks. A record the csv
  module rejects in strict mode (e.g. a stray quote) fails with ``Malformed CSV record: ...``.
- Names are unique across imports (409 ``duplicate_name`` on create and on a renaming PUT).
- An import's ``status`` and ``asyncJobId`` follow its latest job; ``fieldNames`` and
  ``membersUpdatedAt`` come from the latest job that has ended; ``updatedAt`` changes only on PUT.
- Upload: UTF-8 (a BOM is accepted), the first line is the header row; duplicate header names
  are rejected as ``invalid_file`` because a mapping to them would be ambiguous. A file larger
  than ``max_upload_bytes`` is 413 ``file_too_large``; an unexpected error while checking rows ends the
  job ``failed`` with a ``line`` 0 message. PUT also accepts url-encoded forms when no
  file is sent; an empty ``emailFieldName``/``mobilePhoneFieldName``/``nameFieldName`` clears it.
"""

from __future__ import annotations

import codecs
import csv
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from json import JSONDecodeError
from typing import TYPE_CHECKING, Any, BinaryIO

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from audience_pipeline.sandbox.auth import same_secret
from audience_pipeline.sandbox.faults import error_response
from audience_pipeline.sandbox.rows import FirstLines, data_records, email_problem, is_e164, sandbox_failure
from audience_pipeline.sandbox.timestamps import iso_millis
from audience_pipeline.sandbox.uploads import CappedForm, spool, unlink

if TYPE_CHECKING:
    from audience_pipeline.sandbox.app import SandboxSettings

API_KEY_HEADER = "X-GSCC-Api-Key"
BASE_PATHS = ("/public-api/audience-imports", "/public-api/audience-import")
FIELD_PARAMS = ("emailFieldName", "mobilePhoneFieldName", "nameFieldName", "uniqueIdFieldName")
TERMINAL = ("completed", "failed")


class CxiError(Exception):
    """An error answer in CXI's shape; raised anywhere in a handler, rendered by the wrapper."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response(self) -> Response:
        return error_response(self.status, self.code, self.message)


@dataclass(frozen=True)
class FieldMapping:
    """Which CSV columns carry the channels and the unique id; fixed per job."""

    email: str | None = None
    mobile_phone: str | None = None
    name: str | None = None
    unique_id: str | None = None


@dataclass
class CheckResult:
    """Outcome of checking every data row of one upload."""

    total: int = 0
    processed: int = 0
    failed: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    fatal: str | None = None
    finished_at: float = 0.0


def check_rows(lines: Iterable[str], fields: FieldMapping) -> CheckResult:
    """Check the data rows of a CSV given as lines (the header is the first record).

    Kept free of I/O and threads so the per-row rules can be tested directly.
    """
    reader = csv.reader(lines, strict=True)
    result = CheckResult()
    try:
        header = next(reader)
    except StopIteration:
        return result
    width = len(header)
    columns = {name: index for index, name in enumerate(header)}
    email_col = columns.get(fields.email) if fields.email else None
    phone_col = columns.get(fields.mobile_phone) if fields.mobile_phone else None
    uid_col = columns.get(fields.unique_id) if fields.unique_id else None
    first_seen = FirstLines()
    for line, row, error in data_records(reader):
        result.total += 1
        if row is not None:
            error = _row_error(row, width, email_col, phone_col, uid_col, line, first_seen)
        if error is None:
            result.processed += 1
        else:
            result.failed += 1
            result.errors.append({"line": line, "error": error})
    return result


def _row_error(
    row: list[str],
    width: int,
    email_col: int | None,
    phone_col: int | None,
    uid_col: int | None,
    line: int,
    first_seen: FirstLines,
) -> str | None:
    if len(row) != width:
        return f"Expected {width} fields, found {len(row)}"
    uid = row[uid_col].strip() if uid_col is not None else ""
    first_line = first_seen.first(uid, line) if uid else line
    if (reason := sandbox_failure(row)) is not None:
        return reason
    if uid_col is not None and not uid:
        return "Missing unique ID value"
    if first_line != line:
        return f"Duplicate unique ID value '{uid}' (first on line {first_line})"
    email = row[email_col].strip() if email_col is not None else ""
    phone = row[phone_col].strip() if phone_col is not None else ""
    if not email and not phone:
        return "Row has no email address or mobile phone number"
    if email and (problem := email_problem(email)) is not None:
        return problem
    if phone and not is_e164(phone):
        return "Invalid mobile phone number, expected E.164"
    return None


@dataclass
class _Upload:
    """An uploaded CSV copied to a file the sandbox owns (the request's copy dies with the request)."""

    path: str
    file_name: str
    chars: int
    headers: list[str]

    def discard(self) -> None:
        unlink(self.path)


@dataclass
class _Job:
    """One async import job; its public state is computed on read, never advanced by a timer."""

    id: str
    import_id: str
    file_name: str
    headers: list[str]
    fields: FieldMapping
    upload: _Upload
    pace: float
    started: float = field(default_factory=time.monotonic)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    chars_read: int = 0
    result: CheckResult | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    stalled: bool = False

    def state(self, now: float) -> tuple[str, int]:
        """Status and progress, derived from elapsed time and whether the row check has finished."""
        elapsed = now - self.started
        if self.stalled or elapsed < self.pace:
            return "pending", 0
        result = self.result
        if result is None or elapsed < 2 * self.pace:
            by_time = 1.0 if self.pace <= 0 else min(1.0, (elapsed - self.pace) / self.pace)
            total_chars = self.upload.chars
            by_work = 1.0 if result is not None or not total_chars else self.chars_read / total_chars
            return "in_progress", int(99 * min(by_time, by_work, 1.0))
        if result.failed or result.fatal:
            return "failed", result.processed * 100 // result.total if result.total else 0
        return "completed", 100

    def ended_at(self, now: float) -> datetime | None:
        """Wall-clock time the job ended, or None while it is still pending or in progress."""
        result = self.result
        if result is None or self.state(now)[0] not in TERMINAL:
            return None
        return self.started_at + timedelta(seconds=max(2 * self.pace, result.finished_at - self.started))

    def run(self) -> None:
        """Background row check; the owned upload file is removed whatever happens."""
        result = CheckResult(fatal="Import interrupted")
        try:
            result = check_rows(self._lines(), self.fields)
        except Exception as exc:
            result = CheckResult(fatal=f"Import failed: {exc}")
        finally:
            self.upload.discard()
            result.finished_at = time.monotonic()
            self.result = result

    def _lines(self) -> Iterator[str]:
        with open(self.upload.path, encoding="utf-8-sig", newline="") as handle:
            for line in handle:
                if self.cancel.is_set():
                    return
                self.chars_read += len(line)
                yield line

    def status_body(self, now: float) -> dict[str, Any]:
        status, progress = self.state(now)
        return {
            "id": self.id,
            "audienceImportId": self.import_id,
            "fileName": self.file_name,
            "progressPercentage": progress,
            "status": status,
        }

    def failures_body(self, now: float) -> dict[str, Any]:
        body = self.status_body(now)
        result = self.result
        if result is None or body["status"] not in TERMINAL:
            result = CheckResult()
        errors = list(result.errors)
        if result.fatal:
            errors.append({"line": 0, "error": result.fatal})
        body.update(
            totalNumOfRows=result.total,
            numOfRowsProcessed=result.processed,
            numOfRowsFailed=result.failed,
            errorMessages=errors,
        )
        return body


@dataclass
class _Import:
    """One audience import; ``headers`` are those of the latest upload, for validating PUT mappings."""

    id: str
    name: str
    file_name: str
    headers: list[str]
    fields: FieldMapping
    created_at: datetime
    updated_at: datetime
    jobs: list[_Job] = field(default_factory=list)
    in_use: bool = False

    def body(self, now: float) -> dict[str, Any]:
        latest = self.jobs[-1]
        field_names: list[str] | None = None
        members_updated_at: str | None = None
        for job in reversed(self.jobs):
            ended_at = job.ended_at(now)
            if ended_at is not None:
                field_names, members_updated_at = list(job.headers), iso_millis(ended_at)
                break
        return {
            "id": self.id,
            "name": self.name,
            "fileName": self.file_name,
            "status": latest.state(now)[0],
            "importType": "csv",
            "fieldNames": field_names,
            "emailFieldName": self.fields.email,
            "mobilePhoneFieldName": self.fields.mobile_phone,
            "nameFieldName": self.fields.name,
            "uniqueIdFieldName": self.fields.unique_id,
            "asyncJobId": latest.id,
            "createdAt": iso_millis(self.created_at),
            "membersUpdatedAt": members_updated_at,
            "updatedAt": iso_millis(self.updated_at),
        }


Handler = Callable[[Request], Awaitable[Response]]


class CxiVendor:
    """The CXI emulation; state lives in memory behind one lock, row checks run in daemon threads."""

    name = "cxi"
    prefix = "/cxi"

    def __init__(self, settings: SandboxSettings) -> None:
        self._api_key = settings.cxi_api_key
        self._pace = settings.pace_seconds
        self._max_upload_bytes = settings.max_upload_bytes
        self._lock = threading.Lock()
        self._imports: dict[str, _Import] = {}
        self._jobs: dict[str, _Job] = {}
        self._stall = False

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = []
        for base in BASE_PATHS:
            routes += [
                Route(f"{base}/async-jobs/{{job_id}}/status", self._wrap(self._job_status), methods=["GET"]),
                Route(
                    f"{base}/async-jobs/{{job_id}}/failures", self._wrap(self._job_failures), methods=["GET"]
                ),
                Route(base, self._wrap(self._list), methods=["GET"]),
                Route(base, self._wrap(self._create), methods=["POST"]),
                Route(f"{base}/{{import_id}}", self._wrap(self._get), methods=["GET"]),
                Route(f"{base}/{{import_id}}", self._wrap(self._update), methods=["PUT"]),
                Route(f"{base}/{{import_id}}", self._wrap(self._delete), methods=["DELETE"]),
            ]
        return routes

    def control_routes(self) -> list[BaseRoute]:
        return [
            Route("/imports/{import_id}/in-use", self._set_in_use, methods=["POST"]),
            Route("/stall", self._set_stall, methods=["POST"]),
        ]

    def demo_env(self, base_url: str) -> dict[str, str]:
        return {"CXI_BASE_URL": base_url, "CXI_API_KEY": self._api_key}

    def reset(self) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
            self._imports.clear()
            self._jobs.clear()
            self._stall = False
        for job in jobs:
            job.cancel.set()

    def _wrap(self, handler: Handler) -> Handler:
        """Check the API key, then turn :class:`CxiError` into its JSON answer."""

        async def endpoint(request: Request) -> Response:
            try:
                given = request.headers.get(API_KEY_HEADER, "")
                if not same_secret(given, self._api_key):
                    raise CxiError(401, "unauthorized", "Invalid API Token key")
                return await handler(request)
            except CxiError as exc:
                return exc.response()

        return endpoint

    async def _list(self, request: Request) -> Response:
        now = time.monotonic()
        with self._lock:
            bodies = [imp.body(now) for imp in self._imports.values()]
        return JSONResponse({"data": {"audienceImports": bodies}})

    async def _get(self, request: Request) -> Response:
        with self._lock:
            body = self._import(request).body(time.monotonic())
        return JSONResponse({"data": body})

    async def _create(self, request: Request) -> Response:
        async with self._read_form(request) as form:
            name = _text(form, "name")
            if name is None or not name.strip():
                raise CxiError(400, "invalid_name", "name is required and must not be empty")
            fields = FieldMapping(*(_text(form, key) or None for key in FIELD_PARAMS))
            if not fields.email and not fields.mobile_phone:
                raise CxiError(
                    400, "missing_channel_field", "emailFieldName or mobilePhoneFieldName is required"
                )
            upload = await self._spool(form)
        try:
            _check_fields(fields, upload.headers)
            now = datetime.now(UTC)
            imp = _Import(str(uuid.uuid4()), name, upload.file_name, upload.headers, fields, now, now)
            with self._lock:
                self._check_unique_name(name, None)
                self._start_job(imp, upload)
                self._imports[imp.id] = imp
                body = imp.body(time.monotonic())
        except BaseException:
            upload.discard()
            raise
        return JSONResponse({"data": body}, status_code=201)

    async def _update(self, request: Request) -> Response:
        with self._lock:
            self._import(request)
        async with self._read_form(request) as form:
            if "uniqueIdFieldName" in form:
                raise CxiError(
                    400, "unique_id_immutable", "uniqueIdFieldName can only be set when creating an import"
                )
            name = _text(form, "name")
            if name is not None and not name.strip():
                raise CxiError(400, "invalid_name", "name must not be empty")
            changes = {key: _text(form, key) or None for key in FIELD_PARAMS[:3] if key in form}
            upload = await self._spool(form) if "file" in form else None
        started = False
        try:
            with self._lock:
                imp = self._import(request)
                fields = _updated_fields(imp.fields, changes)
                _check_fields(fields, upload.headers if upload else imp.headers)
                if name is not None:
                    self._check_unique_name(name, imp.id)
                    imp.name = name
                imp.fields = fields
                if upload is not None:
                    imp.file_name = upload.file_name
                    imp.headers = upload.headers
                    self._start_job(imp, upload)
                    started = True
                imp.updated_at = datetime.now(UTC)
                body = imp.body(time.monotonic())
        except BaseException:
            if upload is not None and not started:
                upload.discard()
            raise
        return JSONResponse({"data": body})

    async def _delete(self, request: Request) -> Response:
        with self._lock:
            imp = self._import(request)
            if imp.in_use:
                raise CxiError(409, "in_use", "Audience import is used by one or more audiences")
            del self._imports[imp.id]
            for job in imp.jobs:
                self._jobs.pop(job.id, None)
                job.cancel.set()
        return Response(status_code=204)

    async def _job_status(self, request: Request) -> Response:
        with self._lock:
            body = self._job(request).status_body(time.monotonic())
        return JSONResponse({"data": body})

    async def _job_failures(self, request: Request) -> Response:
        with self._lock:
            body = self._job(request).failures_body(time.monotonic())
        return JSONResponse({"data": body})

    async def _set_in_use(self, request: Request) -> Response:
        in_use = True
        if await request.body():
            try:
                payload = await request.json()
            except (JSONDecodeError, UnicodeDecodeError):
                payload = None
            if not isinstance(payload, dict) or not isinstance(payload.get("in_use", True), bool):
                return error_response(400, "invalid_request", 'Body must be like {"in_use": true}')
            in_use = payload.get("in_use", True)
        try:
            with self._lock:
                self._import(request).in_use = in_use
        except CxiError as exc:
            return exc.response()
        return JSONResponse({"ok": True, "id": request.path_params["import_id"], "in_use": in_use})

    async def _set_stall(self, request: Request) -> Response:
        try:
            payload = await request.json()
        except (JSONDecodeError, UnicodeDecodeError):
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("stall"), bool):
            return error_response(400, "invalid_request", 'Body must be like {"stall": true}')
        with self._lock:
            self._stall = payload["stall"]
        return JSONResponse({"ok": True, "stall": payload["stall"]})

    def _import(self, request: Request) -> _Import:
        import_id = request.path_params["import_id"]
        imp = self._imports.get(import_id)
        if imp is None:
            raise CxiError(404, "not_found", f"Audience import {import_id} not found")
        return imp

    def _job(self, request: Request) -> _Job:
        job_id = request.path_params["job_id"]
        job = self._jobs.get(job_id)
        if job is None:
            raise CxiError(404, "not_found", f"Audience import async job {job_id} not found")
        return job

    def _check_unique_name(self, name: str, own_id: str | None) -> None:
        if any(imp.name == name and imp.id != own_id for imp in self._imports.values()):
            raise CxiError(409, "duplicate_name", f"An audience import named {name!r} already exists")

    def _start_job(self, imp: _Import, upload: _Upload) -> _Job:
        """Register a job (caller holds the lock) and start checking its rows in the background."""
        job = _Job(
            id=str(uuid.uuid4()),
            import_id=imp.id,
            file_name=upload.file_name,
            headers=upload.headers,
            fields=imp.fields,
            upload=upload,
            pace=self._pace,
            stalled=self._stall,
        )
        imp.jobs.append(job)
        self._jobs[job.id] = job
        threading.Thread(target=job.run, name=f"cxi-job-{job.id}", daemon=True).start()
        return job

    def _read_form(self, request: Request) -> CappedForm:
        return CappedForm(
            request,
            self._max_upload_bytes,
            too_large=partial(_too_large, self._max_upload_bytes),
            unreadable=lambda detail: CxiError(400, "invalid_request", f"Unreadable form body: {detail}"),
        )

    async def _spool(self, form: FormData) -> _Upload:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise CxiError(400, "invalid_file", "file is required and must be an uploaded CSV file")
        file_name = re.split(r"[\\/]", upload.filename or "")[-1] or "upload.csv"
        return await run_in_threadpool(_spool_upload, upload.file, file_name, self._max_upload_bytes)


def _too_large(max_upload_bytes: int) -> CxiError:
    return CxiError(413, "file_too_large", f"File exceeds the limit of {max_upload_bytes} bytes")


def _spool_upload(source: BinaryIO, file_name: str, limit: int) -> _Upload:
    """Copy the upload to an owned temp file, proving it is UTF-8 and reading its header row.

    Runs in a worker thread: a large upload costs one pass over its bytes, nothing more.
    """
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    chars = 0

    def count(chunk: bytes) -> None:
        nonlocal chars
        chars += len(decoder.decode(chunk))

    try:
        path = spool(
            source, limit, prefix="sandbox-cxi-", too_large=partial(_too_large, limit), on_chunk=count
        )
        try:
            chars += len(decoder.decode(b"", final=True))
            headers = _read_header(path)
        except BaseException:
            unlink(path)
            raise
    except UnicodeDecodeError as exc:
        raise CxiError(400, "invalid_file", f"File is not valid UTF-8 (byte {exc.start})") from exc
    return _Upload(path, file_name, chars, headers)


def _read_header(path: str) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        try:
            header = next(csv.reader(handle, strict=True))
        except StopIteration:
            raise CxiError(400, "invalid_file", "File is empty") from None
        except csv.Error as exc:
            raise CxiError(400, "invalid_file", f"Header row is not valid CSV: {exc}") from exc
    if not any(name.strip() for name in header):
        raise CxiError(400, "invalid_file", "File has no header row")
    seen: set[str] = set()
    for name in header:
        if name and name in seen:
            raise CxiError(400, "invalid_file", f"Duplicate column header {name!r}")
        seen.add(name)
    return header


def _text(form: FormData, key: str) -> str | None:
    value = form.get(key)
    if value is None or isinstance(value, str):
        return value
    raise CxiError(400, "invalid_request", f"{key} must be a text field, not a file")


def _updated_fields(current: FieldMapping, changes: dict[str, str | None]) -> FieldMapping:
    """PUT semantics: an absent parameter keeps the current column, an empty one clears it."""
    return FieldMapping(
        email=changes.get("emailFieldName", current.email),
        mobile_phone=changes.get("mobilePhoneFieldName", current.mobile_phone),
        name=changes.get("nameFieldName", current.name),
        unique_id=current.unique_id,
    )


def _check_fields(fields: FieldMapping, headers: list[str]) -> None:
    mapping = dict(
        zip(FIELD_PARAMS, (fields.email, fields.mobile_phone, fields.name, fields.unique_id), strict=True)
    )
    for param, column in mapping.items():
        if column and column not in headers:
            raise CxiError(
                400,
                "unknown_field",
                f"{param} {column!r} is not a header of the CSV file; headers: {', '.join(headers)}",
            )
    if not fields.email and not fields.mobile_phone:
        raise CxiError(400, "missing_channel_field", "emailFieldName or mobilePhoneFieldName is required")

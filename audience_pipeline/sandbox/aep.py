"""Experience Platform external audiences, IMS token endpoint and Data Landing Zone, emulated in memory.

Paths under the vendor prefix ``/aep``:

- ``POST /ims/token/v3`` (form: ``grant_type=client_credentials``, ``client_id``, ``client_secret``,
  ``scope``) → ``{access_token, token_type, expires_in}``; IMS-style ``{error, error_description}``.
- ``GET /data/foundation/connectors/landingzone/credentials?type=user_drop_zone`` →
  ``{containerName, SASToken, storageAccountName, SASUri}``; the SAS URI points at
  ``/aep/dlz/<container>`` on this server. Every call issues a SAS that expires
  ``aep_sas_ttl_seconds`` later (``se=``, ISO 8601 UTC, signed with ``sig`` so it cannot be
  stretched), as a rotated Azure SAS would.
- ``PUT|GET /dlz/<container>/<blob>?<SAS>`` (``x-ms-blob-type: BlockBlob`` on PUT) → 201 with
  ``Last-Modified``; Azure-style XML errors (403 ``AuthenticationFailed`` for a forged or expired
  SAS, with ``AuthenticationErrorDetail``; 413, 400) and the ``x-ms-error-code`` header.
- Under ``/data/core/ais``, as the document shows them: ``POST /external-audience/``,
  ``GET /external-audiences/operations/{id}`` (``audienceId`` once the creation succeeded),
  ``GET|PATCH|DELETE /external-audience/{id}``, ``POST|GET /external-audience/{id}/runs``,
  ``GET /external-audience/{id}/runs/{runId}``.
- ``GET /external-audiences?customAudienceId=`` → ``{"audiences": [...]}`` is *not* in the
  document, so it answers 404 (100940) like a path the Platform does not have, unless
  ``POST /_sandbox/aep/lookup {"enabled": true}`` turns it on (to exercise a client's optional
  fallback for a lost ``audienceId``).

Platform calls need ``Authorization: Bearer`` (a token from the IMS route), ``x-api-key`` (the
client id), ``x-gw-ims-org-id`` and ``x-sandbox-name``; errors are ``{error_code, title, message,
status}`` with the documented codes: 100910-400 invalid request, 100911-400 malformed
Authorization header, 100920-401 missing/invalid/expired token, 100921-401 wrong IMS org,
100922-401 API key not the token's client, 100940-404, 100950-409 (duplicate customAudienceId,
or a run while another run or the creation is in progress), 100960-422 (unknown base connection,
daily run limit: 100 runs a day per sandbox).

Jobs: creation and runs spend ``pace_seconds`` in DATASET_INGEST, which reads the file from the
storage named by ``sourceSpec`` (a run only if its modification time, in whole seconds, lies in
``[dataFilterStartTime, dataFilterEndTime]``), then ``pace_seconds`` in PROFILE_STORE_INGEST.
The file fails DATASET_INGEST when it is missing, not UTF-8, not CSV, lacks a field column, has a
row of the wrong width, or has no row with an identity value. S3 files are read with boto3 through
a *base connection* registered on the control route (the sandbox cannot reach an arbitrary S3;
a real Platform connection holds the same endpoint and keys); an unknown ``baseConnectionId`` is
422 at creation.

Control routes under ``/_sandbox/aep`` (no auth): ``POST /connections`` ``{id, endpoint_url,
access_key_id, secret_access_key, region}``; ``POST /fail-next`` ``{stage, message}`` fails the next
job at that stage; ``POST /limits`` ``{runs_per_day}``; ``POST /lookup`` ``{enabled}`` (the
undocumented audience listing above); ``POST /expire-tokens``; ``GET /audiences`` (internal view
with the rows each job ingested).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import email.utils
import hashlib
import hmac
import math
import os
import secrets
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json import JSONDecodeError
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from audience_pipeline.sandbox.auth import same_secret
from audience_pipeline.sandbox.uploads import unlink

if TYPE_CHECKING:
    from audience_pipeline.sandbox.app import SandboxSettings

AIS = "/data/core/ais"
FIELD_TYPES = frozenset({"string", "number", "long", "integer", "date", "datetime", "boolean"})
CLOUD_TYPES = frozenset({"S3", "DLZ", "GCS", "SFTP"})
STAGES = ("DATASET_INGEST", "PROFILE_STORE_INGEST")
CONTAINER = "dlz-user-container"
TITLES = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 404: "NOT_FOUND", 409: "DUPLICATE_RESOURCE"}
TITLES |= {422: "UNPROCESSABLE_ENTITY", 500: "INTERNAL_SERVER_ERROR"}
CREATED_BY = "sandbox-technical-account@techacct.adobe.com"
PATCHABLE = frozenset({"description", "labels", "fields", "ttlInDays"})


class AepError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> Response:
        body = {
            "error_code": f"{self.code}-{self.status}",
            "title": TITLES.get(self.status, "ERROR"),
            "message": self.message,
            "status": self.status,
        }
        return JSONResponse(body, status_code=self.status)


def _blob_error(status: int, code: str, message: str, detail: str = "") -> Response:
    extra = f"<AuthenticationErrorDetail>{detail}</AuthenticationErrorDetail>" if detail else ""
    xml = (
        '<?xml version="1.0" encoding="utf-8"?>'
        f"<Error><Code>{code}</Code><Message>{message}</Message>{extra}</Error>"
    )
    return Response(xml, status_code=status, media_type="application/xml", headers={"x-ms-error-code": code})


@dataclass
class _Blob:
    path: str
    modified: float
    size: int


@dataclass
class _Job:
    """A creation operation or an ingestion run; a background thread moves it through the stages."""

    id: str
    audience_id: str
    created: int
    window: tuple[int, int | None] | None = None
    status: str = "PROCESSING"
    details: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    rows: int = 0
    updated: int = 0


@dataclass
class _Audience:
    id: str
    spec: dict[str, Any]
    operation: _Job
    runs: list[_Job] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "PROCESSING" if self.operation.status == "PROCESSING" else "ACTIVE"

    def body(self) -> dict[str, Any]:
        return {"audienceId": self.id, **self.spec, "status": self.status}


Handler = Callable[[Request], Awaitable[Response]]


class AepVendor:
    """The Experience Platform emulation; state behind one lock, jobs in daemon threads."""

    name = "aep"
    prefix = "/aep"
    token_ttl_seconds = 86399

    def __init__(self, settings: SandboxSettings) -> None:
        self._client_id = settings.aep_client_id
        self._client_secret = settings.aep_client_secret
        self._org_id = settings.aep_org_id
        self._sandbox = settings.aep_sandbox_name
        self._pace = settings.pace_seconds
        self._max_upload = settings.max_upload_bytes
        self._sas_ttl = settings.aep_sas_ttl_seconds
        self._lock = threading.Lock()
        self._sig = secrets.token_urlsafe(24)
        self._init_state()

    def _init_state(self) -> None:
        self._tokens: dict[str, float] = {}
        self._issued_sas: list[str] = []
        self._audiences: dict[str, _Audience] = {}
        self._operations: dict[str, _Job] = {}
        self._blobs: dict[str, _Blob] = {}
        self._connections: dict[str, dict[str, str]] = {}
        self._fail_next: list[tuple[str, str]] = []
        self._runs_per_day = 100
        self._runs_today: list[float] = []
        self._lookup = False

    def reset(self) -> None:
        with self._lock:
            blobs = list(self._blobs.values())
            self._init_state()
        for blob in blobs:
            unlink(blob.path)

    def demo_env(self, base_url: str) -> dict[str, str]:
        return {
            "AEP_BASE_URL": base_url,
            "AEP_IMS_URL": base_url,
            "AEP_CLIENT_ID": self._client_id,
            "AEP_CLIENT_SECRET": self._client_secret,
            "AEP_ORG_ID": self._org_id,
        }

    def routes(self) -> list[BaseRoute]:
        ais = self._platform
        return [
            Route("/ims/token/v3", self._token, methods=["POST"]),
            Route(
                "/data/foundation/connectors/landingzone/credentials",
                ais(self._dlz_credentials),
                methods=["GET"],
            ),
            Route("/dlz/{container}/{blob:path}", self._blob_put, methods=["PUT"]),
            Route("/dlz/{container}/{blob:path}", self._blob_get, methods=["GET"]),
            Route(f"{AIS}/external-audience/", ais(self._create), methods=["POST"]),
            Route(f"{AIS}/external-audience", ais(self._create), methods=["POST"]),
            Route(f"{AIS}/external-audiences", ais(self._list), methods=["GET"]),
            Route(f"{AIS}/external-audiences/operations/{{op_id}}", ais(self._operation), methods=["GET"]),
            Route(f"{AIS}/external-audience/{{aud_id}}", ais(self._get), methods=["GET"]),
            Route(f"{AIS}/external-audience/{{aud_id}}", ais(self._patch), methods=["PATCH"]),
            Route(f"{AIS}/external-audience/{{aud_id}}", ais(self._delete), methods=["DELETE"]),
            Route(f"{AIS}/external-audience/{{aud_id}}/runs", ais(self._start_run), methods=["POST"]),
            Route(f"{AIS}/external-audience/{{aud_id}}/runs", ais(self._list_runs), methods=["GET"]),
            Route(f"{AIS}/external-audience/{{aud_id}}/runs/{{run_id}}", ais(self._run), methods=["GET"]),
        ]

    def control_routes(self) -> list[BaseRoute]:
        return [
            Route("/connections", self._add_connection, methods=["POST"]),
            Route("/fail-next", self._add_failure, methods=["POST"]),
            Route("/limits", self._set_limits, methods=["POST"]),
            Route("/lookup", self._set_lookup, methods=["POST"]),
            Route("/expire-tokens", self._expire_tokens, methods=["POST"]),
            Route("/audiences", self._internal_view, methods=["GET"]),
        ]

    # --- auth ---------------------------------------------------------------------------------

    async def _token(self, request: Request) -> Response:
        form = await request.form()
        if form.get("grant_type") != "client_credentials":
            return _ims_error(400, "unsupported_grant_type", "grant_type must be client_credentials")
        if not same_secret(str(form.get("client_id") or ""), self._client_id):
            return _ims_error(400, "invalid_client", "invalid client_id parameter")
        if not same_secret(str(form.get("client_secret") or ""), self._client_secret):
            return _ims_error(401, "invalid_client", "invalid client_secret parameter")
        token = "eyJ" + secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = time.time() + self.token_ttl_seconds
        return JSONResponse(
            {"access_token": token, "token_type": "bearer", "expires_in": self.token_ttl_seconds}
        )

    def _platform(self, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                self._authorize(request)
                return await handler(request)
            except AepError as exc:
                return exc.response()

        return endpoint

    def _authorize(self, request: Request) -> None:
        header = request.headers.get("authorization")
        if not header:
            raise AepError(401, "100920", "Authorization header is missing")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AepError(400, "100911", "Authorization header must be 'Bearer <access token>'")
        with self._lock:
            expires = self._tokens.get(token.strip())
        if expires is None or expires < time.time():
            raise AepError(401, "100920", "Access token is invalid or expired")
        if not same_secret(request.headers.get("x-api-key", ""), self._client_id):
            raise AepError(401, "100922", "x-api-key does not match the client the token was issued to")
        if not same_secret(request.headers.get("x-gw-ims-org-id", ""), self._org_id):
            raise AepError(401, "100921", "No valid imsOrgId is provided in x-gw-ims-org-id")
        sandbox = request.headers.get("x-sandbox-name")
        if not sandbox:
            raise AepError(400, "100910", "x-sandbox-name header is required")
        if sandbox != self._sandbox:
            raise AepError(404, "100940", f"Sandbox {sandbox!r} not found")

    # --- landing zone -------------------------------------------------------------------------

    def issued_sas(self) -> list[str]:
        """Every SAS token handed out since the last reset (for tests that look for leaks)."""
        with self._lock:
            return list(self._issued_sas)

    def _sas_token(self) -> str:
        expiry = datetime.fromtimestamp(time.time() + self._sas_ttl, UTC)
        se = expiry.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        token = f"sv=2020-10-02&si=dlz-ingestion&sr=c&sp=racwdl&se={se}&sig={self._signature(se)}"
        with self._lock:
            self._issued_sas.append(token)
        return token

    def _signature(self, se: str) -> str:
        return hmac.new(self._sig.encode(), se.encode(), hashlib.sha256).hexdigest()

    async def _dlz_credentials(self, request: Request) -> Response:
        if request.query_params.get("type", "user_drop_zone") != "user_drop_zone":
            raise AepError(400, "100910", "type must be user_drop_zone")
        origin = f"{request.url.scheme}://{request.url.netloc}"
        token = self._sas_token()
        return JSONResponse(
            {
                "containerName": CONTAINER,
                "SASToken": token,
                "storageAccountName": "sandboxdlz",
                "SASUri": f"{origin}{self.prefix}/dlz/{CONTAINER}?{token}",
            }
        )

    def _blob_auth(self, request: Request) -> Response | None:
        if request.path_params["container"] != CONTAINER:
            return _blob_error(404, "ContainerNotFound", "The specified container does not exist.")
        se = request.query_params.get("se", "")
        if not same_secret(request.query_params.get("sig", ""), self._signature(se)):
            return _blob_error(
                403,
                "AuthenticationFailed",
                "Server failed to authenticate the request.",
                "Signature did not match.",
            )
        try:
            expiry = datetime.fromisoformat(se)
        except ValueError:
            return _blob_error(403, "AuthenticationFailed", "Server failed to authenticate the request.")
        now = datetime.now(UTC)
        if now >= expiry:
            return _blob_error(
                403,
                "AuthenticationFailed",
                "Server failed to authenticate the request.",
                "Signature not valid in the specified time frame: "
                f"Expiry [{email.utils.format_datetime(expiry, usegmt=True)}] - "
                f"Current [{email.utils.format_datetime(now, usegmt=True)}]",
            )
        return None

    async def _blob_put(self, request: Request) -> Response:
        if (denied := self._blob_auth(request)) is not None:
            return denied
        if request.headers.get("x-ms-blob-type") != "BlockBlob":
            return _blob_error(400, "MissingRequiredHeader", "x-ms-blob-type must be BlockBlob.")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_upload:
            return _blob_error(413, "RequestBodyTooLarge", "The request body is too large.")
        fd, path = tempfile.mkstemp(prefix="sandbox-aep-", suffix=".csv")
        size = 0
        with os.fdopen(fd, "wb") as target:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self._max_upload:
                    target.close()
                    unlink(path)
                    return _blob_error(413, "RequestBodyTooLarge", "The request body is too large.")
                target.write(chunk)
        key = f"{CONTAINER}/{request.path_params['blob']}"
        modified = time.time()
        with self._lock:
            old = self._blobs.get(key)
            self._blobs[key] = _Blob(path, modified, size)
        if old is not None:
            unlink(old.path)
        headers = {
            "Last-Modified": email.utils.formatdate(modified, usegmt=True),
            "ETag": f'"{uuid.uuid4()}"',
        }
        return Response(status_code=201, headers=headers)

    async def _blob_get(self, request: Request) -> Response:
        if (denied := self._blob_auth(request)) is not None:
            return denied
        with self._lock:
            blob = self._blobs.get(f"{CONTAINER}/{request.path_params['blob']}")
        if blob is None:
            return _blob_error(404, "BlobNotFound", "The specified blob does not exist.")
        return FileResponse(blob.path, media_type="text/csv")

    # --- audiences ----------------------------------------------------------------------------

    async def _create(self, request: Request) -> Response:
        spec = _validate_create(await _json(request))
        params = spec["sourceSpec"]["params"]
        with self._lock:
            if params["cloudType"] == "S3" and params["baseConnectionId"] not in self._connections:
                raise AepError(422, "100960", f"Base connection {params['baseConnectionId']} not found")
            custom = spec.get("customAudienceId")
            if custom and any(a.spec.get("customAudienceId") == custom for a in self._audiences.values()):
                raise AepError(409, "100950", f"An external audience with customAudienceId {custom!r} exists")
            now = int(time.time())
            operation = _Job(id=str(uuid.uuid4()), audience_id=str(uuid.uuid4()), created=now, updated=now)
            audience = _Audience(operation.audience_id, spec, operation)
            self._audiences[audience.id] = audience
            self._operations[operation.id] = operation
        self._start(audience, operation)
        return JSONResponse({"operationId": operation.id, "operationDetails": spec}, status_code=202)

    async def _list(self, request: Request) -> Response:
        wanted = request.query_params.get("customAudienceId")
        with self._lock:
            if not self._lookup:
                where = request.url.path
                raise AepError(404, "100940", f"No resource at {where} (not in the external audiences API)")
            found = [
                a.body()
                for a in self._audiences.values()
                if wanted is None or a.spec.get("customAudienceId") == wanted
            ]
        return JSONResponse({"audiences": found})

    async def _operation(self, request: Request) -> Response:
        with self._lock:
            op = self._operations.get(request.path_params["op_id"])
            if op is None:
                raise AepError(404, "100940", f"Operation {request.path_params['op_id']} not found")
            audience = self._audiences.get(op.audience_id)
            body: dict[str, Any] = {
                "operationId": op.id,
                "status": op.status,
                "operationDetails": audience.spec if audience else {},
                "createdBy": CREATED_BY,
                "createdAt": op.created,
                "updatedBy": CREATED_BY,
                "updatedAt": op.updated,
            }
            if op.status == "SUCCESS":
                body["audienceId"] = op.audience_id
            if op.errors:
                body["errors"] = list(op.errors)
        return JSONResponse(body)

    def _audience(self, request: Request) -> _Audience:
        audience = self._audiences.get(request.path_params["aud_id"])
        if audience is None:
            raise AepError(404, "100940", f"External audience {request.path_params['aud_id']} not found")
        return audience

    async def _get(self, request: Request) -> Response:
        with self._lock:
            return JSONResponse(self._audience(request).body())

    async def _patch(self, request: Request) -> Response:
        payload = await _json(request)
        unknown = set(payload) - PATCHABLE
        if unknown:
            raise AepError(400, "100910", f"Cannot update {sorted(unknown)}; updatable: {sorted(PATCHABLE)}")
        with self._lock:
            audience = self._audience(request)
            spec = dict(audience.spec)
            if "description" in payload:
                spec["description"] = _string(payload["description"], "description")
            if "labels" in payload:
                spec["labels"] = _strings(payload["labels"], "labels")
            if "ttlInDays" in payload:
                spec["ttlInDays"] = _ttl(payload["ttlInDays"])
            if "fields" in payload:
                spec["fields"] = _patched_fields(spec["fields"], payload["fields"])
            audience.spec = spec
            return JSONResponse(audience.body())

    async def _delete(self, request: Request) -> Response:
        with self._lock:
            audience = self._audience(request)
            del self._audiences[audience.id]
        return Response(status_code=204)

    async def _start_run(self, request: Request) -> Response:
        payload = await _json(request)
        start, end = payload.get("dataFilterStartTime"), payload.get("dataFilterEndTime")
        if not _epoch(start) or (end is not None and (not _epoch(end) or end < start)):
            raise AepError(
                400, "100910", "dataFilterStartTime is required; both times are epoch seconds, start <= end"
            )
        with self._lock:
            audience = self._audience(request)
            if audience.status == "PROCESSING" or any(r.status == "PROCESSING" for r in audience.runs):
                raise AepError(409, "100950", "An ingestion is already in progress for this audience")
            now = time.time()
            self._runs_today = [t for t in self._runs_today if t > now - 86400]
            if len(self._runs_today) >= self._runs_per_day:
                raise AepError(
                    422,
                    "100960",
                    f"Daily limit of {self._runs_per_day} ingestion runs reached for this sandbox",
                )
            self._runs_today.append(now)
            run = _Job(str(uuid.uuid4()), audience.id, int(now), window=(start, end), updated=int(now))
            audience.runs.append(run)
            body = self._run_body(audience, run)
        self._start(audience, run)
        return JSONResponse(body)

    async def _list_runs(self, request: Request) -> Response:
        with self._lock:
            audience = self._audience(request)
            return JSONResponse({"runs": [self._run_body(audience, r) for r in audience.runs]})

    async def _run(self, request: Request) -> Response:
        with self._lock:
            audience = self._audience(request)
            run = next((r for r in audience.runs if r.id == request.path_params["run_id"]), None)
            if run is None:
                raise AepError(404, "100940", f"Run {request.path_params['run_id']} not found")
            return JSONResponse(self._run_body(audience, run))

    def _run_body(self, audience: _Audience, run: _Job) -> dict[str, Any]:
        assert run.window is not None
        return {
            "audienceName": audience.spec["name"],
            "audienceId": audience.id,
            "runId": run.id,
            "status": run.status,
            "differentialIngestion": False,
            "dataFilterStartTime": run.window[0],
            "dataFilterEndTime": run.window[1],
            "createdAt": run.created,
            "createdBy": CREATED_BY,
            "details": [dict(d) for d in run.details],
        }

    # --- jobs ---------------------------------------------------------------------------------

    def _start(self, audience: _Audience, job: _Job) -> None:
        threading.Thread(
            target=self._process, args=(audience, job), name=f"aep-{job.id}", daemon=True
        ).start()

    def _process(self, audience: _Audience, job: _Job) -> None:
        flow_runs = {stage: str(uuid.uuid4()) for stage in STAGES}
        with self._lock:
            job.details.append(
                {"stage": STAGES[0], "status": "PROCESSING", "flowRunId": flow_runs[STAGES[0]]}
            )
        time.sleep(self._pace)
        with self._lock:
            injected = self._fail_next.pop(0) if self._fail_next else None
        try:
            rows = self._ingest(audience.spec, job.window)
        except AepError as exc:
            self._finish(audience, job, STAGES[0], exc.message)
            return
        except Exception as exc:
            self._finish(audience, job, STAGES[0], f"Unexpected error reading the source file: {exc}")
            return
        if injected and injected[0] == STAGES[0]:
            self._finish(audience, job, STAGES[0], injected[1])
            return
        with self._lock:
            job.details[-1]["status"] = "SUCCESS"
            job.details.append(
                {"stage": STAGES[1], "status": "PROCESSING", "flowRunId": flow_runs[STAGES[1]]}
            )
        time.sleep(self._pace)
        self._finish(
            audience, job, None if not injected else STAGES[1], injected[1] if injected else "", rows
        )

    def _finish(
        self, audience: _Audience, job: _Job, failed_stage: str | None, message: str, rows: int = 0
    ) -> None:
        with self._lock:
            job.updated = int(time.time())
            job.details[-1]["status"] = "FAILED" if failed_stage else "SUCCESS"
            if failed_stage:
                job.details[-1]["message"] = message
                job.errors.append({"code": f"{failed_stage}_FAILED", "message": message})
                job.status = "FAILED"
                if job is audience.operation:
                    self._audiences.pop(audience.id, None)
            else:
                job.rows = rows
                job.status = "SUCCESS"

    def _ingest(self, spec: dict[str, Any], window: tuple[int, int | None] | None) -> int:
        """Read and check the source file; the number of rows with an identity value."""
        params = spec["sourceSpec"]["params"]
        with self._open(params) as (modified, lines):
            if window is not None:
                start, end = window
                second = math.floor(modified)
                if second < start or (end is not None and second > end):
                    raise AepError(
                        422,
                        "100960",
                        f"No file at {params['path']} was modified between {start} and {end} "
                        f"(last modified {second})",
                    )
            return _check_csv(lines, spec["fields"])

    @contextlib.contextmanager
    def _open(self, params: dict[str, Any]) -> Iterator[tuple[float, Iterator[str]]]:
        path = params["path"]
        if params["cloudType"] == "DLZ":
            with self._lock:
                blob = self._blobs.get(path)
            if blob is None:
                raise AepError(404, "100940", f"No file at {path} in the Data Landing Zone")
            with open(blob.path, encoding="utf-8-sig", newline="") as handle:
                yield blob.modified, iter(handle)
            return
        if params["cloudType"] != "S3":
            raise AepError(422, "100960", f"The sandbox cannot read {params['cloudType']} sources")
        with self._lock:
            connection = self._connections.get(params.get("baseConnectionId", ""))
        if connection is None:
            raise AepError(422, "100960", f"Base connection {params.get('baseConnectionId')} not found")
        bucket, _, key = path.partition("/")
        obj = _s3_client(connection).get_object(Bucket=bucket, Key=key)
        reader = codecs.getreader("utf-8-sig")(obj["Body"])
        yield obj["LastModified"].timestamp(), (line for line in reader)

    # --- control ------------------------------------------------------------------------------

    async def _add_connection(self, request: Request) -> Response:
        payload = await request.json()
        keys = ("id", "endpoint_url", "access_key_id", "secret_access_key")
        if not isinstance(payload, dict) or not all(isinstance(payload.get(k), str) for k in keys):
            return JSONResponse({"error": {"code": "invalid_request", "message": f"need {keys}"}}, 400)
        with self._lock:
            self._connections[payload["id"]] = {k: str(v) for k, v in payload.items()}
        return JSONResponse({"ok": True, "id": payload["id"]})

    async def _add_failure(self, request: Request) -> Response:
        payload = await request.json()
        stage = payload.get("stage", STAGES[1]) if isinstance(payload, dict) else None
        if stage not in STAGES:
            return JSONResponse({"error": {"code": "invalid_request", "message": f"stage in {STAGES}"}}, 400)
        with self._lock:
            self._fail_next.append((stage, str(payload.get("message") or f"{stage} failed")))
        return JSONResponse({"ok": True})

    async def _set_limits(self, request: Request) -> Response:
        payload = await request.json()
        with self._lock:
            self._runs_per_day = int(payload.get("runs_per_day", self._runs_per_day))
        return JSONResponse({"ok": True, "runs_per_day": self._runs_per_day})

    async def _set_lookup(self, request: Request) -> Response:
        payload = await request.json()
        if not isinstance(payload, dict) or not isinstance(payload.get("enabled"), bool):
            error = {"code": "invalid_request", "message": "need {enabled: true|false}"}
            return JSONResponse({"error": error}, 400)
        with self._lock:
            self._lookup = payload["enabled"]
        return JSONResponse({"ok": True, "enabled": self._lookup})

    async def _expire_tokens(self, request: Request) -> Response:
        with self._lock:
            self._tokens.clear()
        return JSONResponse({"ok": True})

    async def _internal_view(self, request: Request) -> Response:
        with self._lock:
            view = [
                {
                    **a.body(),
                    "operation": {"status": a.operation.status, "rows": a.operation.rows},
                    "runs": [{"runId": r.id, "status": r.status, "rows": r.rows} for r in a.runs],
                }
                for a in self._audiences.values()
            ]
        return JSONResponse({"audiences": view})


def _check_csv(lines: Iterator[str], fields: list[dict[str, Any]]) -> int:
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise AepError(400, "100910", "The source file is empty") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise AepError(400, "100910", f"The source file is not a readable CSV: {exc}") from None
    missing = [f["name"] for f in fields if f["name"] not in header]
    if missing:
        raise AepError(400, "100910", f"The source file has no column for fields {missing}; header: {header}")
    identities = [header.index(f["name"]) for f in fields if f.get("identityNs")]
    rows = 0
    try:
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise AepError(
                    400, "100910", f"Line {reader.line_num}: expected {len(header)} fields, found {len(row)}"
                )
            rows += any(row[i].strip() for i in identities)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise AepError(400, "100910", f"The source file is not a readable CSV: {exc}") from None
    if rows == 0:
        raise AepError(400, "100910", "The source file has no row with an identity value")
    return rows


def _validate_create(payload: dict[str, Any]) -> dict[str, Any]:
    def bad(message: str) -> AepError:
        return AepError(400, "100910", message)

    spec = dict(payload)
    if not isinstance(spec.get("name"), str) or not spec["name"].strip():
        raise bad("name is required")
    if spec.get("originName") != "CUSTOM_UPLOAD":
        raise bad("originName is required and must be CUSTOM_UPLOAD")
    if spec.setdefault("audienceType", "people") != "people":
        raise bad("audienceType must be people")
    spec.setdefault("namespace", "CustomerAudienceUpload")
    spec["ttlInDays"] = _ttl(spec.get("ttlInDays", 30))
    spec["labels"] = _strings(spec.get("labels", []), "labels")
    spec["tags"] = _strings(spec.get("tags", []), "tags")
    fields = spec.get("fields")
    if not isinstance(fields, list) or not fields:
        raise bad("fields must be a non-empty array")
    names = set()
    for f in fields:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or f.get("type") not in FIELD_TYPES:
            raise bad(f"each field needs a name and a type in {sorted(FIELD_TYPES)}; got {f!r}")
        if f["name"] in names:
            raise bad(f"duplicate field {f['name']!r}")
        names.add(f["name"])
    if not any(f.get("identityNs") for f in fields):
        raise bad("one field must carry identityNs")
    params = (
        (spec.get("sourceSpec") or {}).get("params") if isinstance(spec.get("sourceSpec"), dict) else None
    )
    if not isinstance(params, dict) or not isinstance(params.get("path"), str) or not params["path"]:
        raise bad("sourceSpec.params.path is required")
    if params.get("type") not in ("file", "folder") or params.get("sourceType") != "Cloud Storage":
        raise bad("sourceSpec.params needs type file|folder and sourceType 'Cloud Storage'")
    if params.get("cloudType") not in CLOUD_TYPES:
        raise bad(f"sourceSpec.params.cloudType must be one of {sorted(CLOUD_TYPES)}")
    if params["cloudType"] != "DLZ" and not params.get("baseConnectionId"):
        raise bad("sourceSpec.params.baseConnectionId is required except for DLZ")
    return spec


def _patched_fields(current: list[dict[str, Any]], changes: Any) -> list[dict[str, Any]]:
    if not isinstance(changes, list):
        raise AepError(400, "100910", "fields must be an array")
    by_name = {f["name"]: dict(f) for f in current}
    for change in changes:
        name = change.get("name") if isinstance(change, dict) else None
        if name not in by_name:
            raise AepError(400, "100910", f"Unknown field {name!r}; fields cannot be added")
        if set(change) - {"name", "labels"}:
            raise AepError(400, "100910", "Only the labels of a field can be updated")
        by_name[name]["labels"] = _strings(change.get("labels", []), "fields[].labels")
    return list(by_name.values())


def _ttl(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 90:
        raise AepError(400, "100910", "ttlInDays must be an integer from 1 to 90")
    return value


def _strings(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AepError(400, "100910", f"{name} must be an array of strings")
    return list(value)


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise AepError(400, "100910", f"{name} must be a string")
    return value


def _epoch(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


async def _json(request: Request) -> dict[str, Any]:
    try:
        payload = await request.json()
    except (JSONDecodeError, UnicodeDecodeError):
        raise AepError(400, "100910", "Request body must be JSON") from None
    if not isinstance(payload, dict):
        raise AepError(400, "100910", "Request body must be a JSON object")
    return payload


def _ims_error(status: int, code: str, description: str) -> Response:
    return JSONResponse({"error": code, "error_description": description}, status_code=status)


def _s3_client(connection: dict[str, str]) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=connection["endpoint_url"],
        aws_access_key_id=connection["access_key_id"],
        aws_secret_access_key=connection["secret_access_key"],
        region_name=connection.get("region") or "us-east-1",
    )

"""APSIS One profile import v2, emulated in memory (one account, one section).

Paths under the vendor prefix ``/apsis``:

- ``POST /oauth/token`` (JSON or form ``grant_type=client_credentials, client_id, client_secret``)
  → ``{access_token, token_type, expires_in}``; every other API call needs ``Authorization: Bearer``.
- ``GET  /audience/sections/{section}/attributes`` → ``{items: [{discriminator, name, type, version_id}]}``
- ``POST /v2/audience/sections/{section}/imports`` → 201 ``{import_id, file_upload_url,
  file_upload_body, file_upload_url_expires_at}``
- ``GET  /audience/sections/{section}/imports/{id}`` → ``{result: {import_id, status, error, ...}}``
- ``GET  /audience/sections/{section}/imports/{id}/report`` → ``{result: {statistics, errors, skipped}}``
- ``POST /uploads/{id}?expires=…&signature=…``: the presigned upload (multipart: every
  ``file_upload_body`` field plus ``file``); no bearer token, the signatures are the credential.

Errors are ``{status, detail}``. Control routes (``/_sandbox/apsis``): ``GET /imports`` (every
import with its request, upload URL and state, for tests), ``POST /imports/fail-next``
(``{"detail"}``: the next import that receives a file ends ``error``), ``POST /tokens/revoke``.

Interpretation of the vendor's silences (the client is written against these):

- The keyspace must have ``manage_subscriptions`` and every mapped attribute must be writable,
  else 403; an unknown keyspace, attribute version or topic, or a channel that contradicts the
  topic's, is 400; an unknown section is 404.
- An import is pending while ``waiting_for_file`` (until its URL expires) or ``importing``. With
  ``apsis_max_pending_imports`` pending, a new request gets 429 with ``Retry-After`` (whole
  seconds until the first pending import should end, at least 1).
- Upload: the URL's ``signature`` and the body's ``policy`` / ``x-apsis-signature`` must match
  (403), the URL must not have expired (403, checked when the request arrives), one file per
  import (409), at most ``apsis_max_file_bytes`` (413). An upload moves the import to
  ``importing`` for at least ``pace_seconds`` and until the rows are checked, then ``completed``
  or ``error``. After expiry without a file it stays ``waiting_for_file``.
- ``error`` (nothing imported): not UTF-8, no header, a ``field_selector`` missing from the
  header, or a ``fail-next`` control. Otherwise each row is imported or listed once in the report
  by ``line`` (1-based line of the uploaded file, header = 1), first rule that applies: field
  count, ``SANDBOX_FAIL:<text>`` in a cell, empty key, key repeated in the file, invalid email
  (format, or a reserved never-deliverable TLD: .invalid, .test, .localhost), mobile not E.164,
  a date attribute that is not ``YYYY-MM-DD``, an integer attribute that is not an integer. A
  valid row whose key exists in the keyspace updates it, or is ``skipped`` when
  ``update_existing_profiles`` is false; a new key creates a profile.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import hmac
import json
import math
import re
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from json import JSONDecodeError
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from audience_pipeline.sandbox.auth import same_secret
from audience_pipeline.sandbox.rows import FirstLines, data_records, email_problem, is_e164, sandbox_failure
from audience_pipeline.sandbox.timestamps import iso_millis
from audience_pipeline.sandbox.uploads import CappedForm, spool, unlink

if TYPE_CHECKING:
    from audience_pipeline.sandbox.app import SandboxSettings

SECTION = "com.apsis1.sections.sandbox"
KEYSPACES: dict[str, bool] = {  # discriminator -> manage_subscriptions
    "com.apsis1.keyspaces.crm": True,
    "com.apsis1.keyspaces.email": True,
    "com.apsis1.keyspaces.mobile": True,
    "com.apsis1.keyspaces.legacy": False,
}
TOPICS: dict[str, str | None] = {  # discriminator -> channel (None: not channel-specific)
    "com.apsis1.topics.newsletter": "com.apsis1.channels.email",
    "com.apsis1.topics.sms-alerts": "com.apsis1.channels.sms",
    "com.apsis1.topics.company-news": None,
}
CHANNELS = ("com.apsis1.channels.email", "com.apsis1.channels.sms")
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
INTEGER_RE = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class Attribute:
    discriminator: str
    name: str
    type: str
    writable: bool = True

    @property
    def version_id(self) -> str:
        """Stable across resets, so a client may cache it like a real one would."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"apsis-sandbox:{self.discriminator}:1"))

    def problem(self, value: str) -> tuple[str, str] | None:
        """``(code, message)`` when a non-empty value cannot be stored in this attribute."""
        if self.discriminator.endswith(".email"):
            problem = email_problem(value, invalid=f"'{value}' is not a valid email address")
            if problem is not None:
                return "invalid_email", problem
        elif self.discriminator.endswith(".mobile"):
            if not is_e164(value):
                return "invalid_mobile", f"'{value}' is not a mobile number in E.164 format"
        elif self.type == "date":
            try:
                if not DATE_RE.match(value):
                    raise ValueError(value)
                dt.date.fromisoformat(value)
            except ValueError:
                return "invalid_date", f"'{value}' is not a date (YYYY-MM-DD)"
        elif self.type == "integer" and not INTEGER_RE.match(value):
            return "invalid_integer", f"'{value}' is not an integer"
        return None


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("com.apsis1.attributes.email", "Email", "string"),
    Attribute("com.apsis1.attributes.mobile", "Mobile", "string"),
    Attribute("com.apsis1.attributes.firstname", "First name", "string"),
    Attribute("com.apsis1.attributes.lastname", "Last name", "string"),
    Attribute("com.apsis1.attributes.sandbox.employeeid", "Employee ID", "string"),
    Attribute("com.apsis1.attributes.sandbox.department", "Department", "string"),
    Attribute("com.apsis1.attributes.sandbox.jobtitle", "Job title", "string"),
    Attribute("com.apsis1.attributes.sandbox.startdate", "Start date", "date"),
    Attribute("com.apsis1.attributes.sandbox.officecity", "Office city", "string"),
    Attribute("com.apsis1.attributes.sandbox.score", "Engagement score", "integer", writable=False),
)
_BY_VERSION = {a.version_id: a for a in ATTRIBUTES}


class ApsisError(Exception):
    """An error answer in APSIS's ``{status, detail}`` shape."""

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers

    def response(self) -> Response:
        return error(self.status, self.detail, self.headers)


def error(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"status": status, "detail": detail}, status_code=status, headers=headers)


@dataclass
class ImportResult:
    """Outcome of checking one uploaded file."""

    total: int = 0
    created: int = 0
    updated: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    fatal: str | None = None

    def statistics(self) -> dict[str, int]:
        return {
            "total_rows": self.total,
            "created_profiles": self.created,
            "updated_profiles": self.updated,
            "failed_rows": len(self.errors),
            "skipped_rows": len(self.skipped),
        }


@dataclass(frozen=True)
class ImportSpec:
    """What the import request asked for, reduced to what the row check needs."""

    keyspace: str
    key_field: str
    attributes: dict[str, Attribute]
    other_fields: tuple[str, ...]
    update_existing: bool


def check_file(
    lines: Iterable[str], spec: ImportSpec, profiles: set[str], lock: threading.Lock
) -> ImportResult:
    """Check an uploaded CSV (given as lines) and apply its valid rows to ``profiles``.

    Free of HTTP so the rules can be tested directly; ``profiles`` is the keyspace's key set.
    """
    reader = csv.reader(lines, strict=True)
    result = ImportResult()
    try:
        header = next(reader)
    except StopIteration:
        return ImportResult(fatal="The file is empty: expected a header line")
    except csv.Error as exc:
        return ImportResult(fatal=f"The header line is not valid CSV: {exc}")
    columns = {name: i for i, name in enumerate(header)}
    needed = [spec.key_field, *spec.attributes, *spec.other_fields]
    missing = [name for name in needed if name not in columns]
    if missing:
        return ImportResult(
            fatal=f"field_selector {missing[0]!r} is not a column of the file header {header}"
        )
    key_col = columns[spec.key_field]
    checks = [(name, columns[name], attribute) for name, attribute in spec.attributes.items()]
    first_seen = FirstLines()
    good: list[tuple[int, str]] = []
    for line, row, malformed in data_records(reader):
        result.total += 1
        if row is None:
            problem: tuple[str | None, str, str] | None = (None, "invalid_row", str(malformed))
        else:
            problem = _row_problem(row, len(header), key_col, spec.key_field, checks, line, first_seen)
        if problem is None:
            good.append((line, row[key_col].strip()))
        else:
            selector, code, message = problem
            result.errors.append({"line": line, "field_selector": selector, "code": code, "message": message})
    with lock:
        for line, key in good:
            if key not in profiles:
                profiles.add(key)
                result.created += 1
            elif spec.update_existing:
                result.updated += 1
            else:
                result.skipped.append(
                    {
                        "line": line,
                        "field_selector": spec.key_field,
                        "code": "profile_exists",
                        "message": f"Profile '{key}' exists and update_existing_profiles is false",
                    }
                )
    return result


def _row_problem(
    row: list[str],
    width: int,
    key_col: int,
    key_field: str,
    checks: list[tuple[str, int, Attribute]],
    line: int,
    first_seen: FirstLines,
) -> tuple[str | None, str, str] | None:
    if len(row) != width:
        return None, "invalid_row", f"Expected {width} fields, found {len(row)}"
    if (reason := sandbox_failure(row)) is not None:
        return None, "rejected", reason
    key = row[key_col].strip()
    if not key:
        return key_field, "missing_key", "Profile key is empty"
    first = first_seen.first(key, line)
    if first != line:
        return (
            key_field,
            "duplicate_key",
            f"Profile key '{key}' appears more than once (first on line {first})",
        )
    for name, col, attribute in checks:
        value = row[col].strip()
        if value:
            found = attribute.problem(value)
            if found is not None:
                return name, *found
    return None


@dataclass
class _Import:
    id: str
    section: str
    request: dict[str, Any]
    spec: ImportSpec
    expires_at: float
    upload_url: str
    upload_body: dict[str, str]
    created_at: float = field(default_factory=time.time)
    uploaded_at: float | None = None
    fail_with: str | None = None
    path: str | None = None
    result: ImportResult | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def status(self, now: float, pace: float) -> str:
        if self.uploaded_at is None:
            return "waiting_for_file"
        if self.result is None or now - self.uploaded_at < pace:
            return "importing"
        return "error" if self.result.fatal else "completed"

    def pending(self, now: float, pace: float) -> bool:
        status = self.status(now, pace)
        return status == "importing" or (status == "waiting_for_file" and now <= self.expires_at)

    def ends_in(self, now: float, pace: float) -> float:
        """Rough seconds until this pending import stops counting against the limit."""
        if self.uploaded_at is None:
            return self.expires_at - now
        return max(pace - (now - self.uploaded_at), pace)

    def body(self, now: float, pace: float) -> dict[str, Any]:
        status = self.status(now, pace)
        result = self.result
        return {
            "import_id": self.id,
            "status": status,
            "created_at": _iso(self.created_at),
            "file_upload_url_expires_at": _iso(self.expires_at),
            "error": {"code": "import_failed", "detail": result.fatal}
            if status == "error" and result is not None
            else None,
        }

    def run(self, profiles: set[str], lock: threading.Lock) -> None:
        result = ImportResult(fatal="Import interrupted")
        try:
            if self.fail_with:
                result = ImportResult(fatal=self.fail_with)
            else:
                result = check_file(self._lines(), self.spec, profiles, lock)
        except UnicodeDecodeError as exc:
            result = ImportResult(fatal=f"The file is not valid UTF-8 (byte {exc.start})")
        except Exception as exc:
            result = ImportResult(fatal=f"Import failed: {exc}")
        finally:
            self.discard()
            self.result = result

    def _lines(self) -> Iterable[str]:
        assert self.path is not None
        with open(self.path, encoding="utf-8-sig", newline="") as handle:
            for line in handle:
                if self.cancel.is_set():
                    return
                yield line

    def discard(self) -> None:
        if self.path:
            unlink(self.path)


Handler = Callable[[Request], Awaitable[Response]]


class ApsisVendor:
    """The APSIS One emulation; state behind one lock, row checks in daemon threads."""

    name = "apsis"
    prefix = "/apsis"

    def __init__(self, settings: SandboxSettings) -> None:
        self._client_id = settings.apsis_client_id
        self._client_secret = settings.apsis_client_secret
        self._pace = settings.pace_seconds
        self._ttl = settings.apsis_upload_url_ttl_seconds
        self._token_ttl = settings.apsis_token_ttl_seconds
        self._max_file_bytes = settings.apsis_max_file_bytes
        self._max_pending = settings.apsis_max_pending_imports
        self._signing_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._profiles_lock = threading.Lock()
        self._tokens: dict[str, float] = {}
        self._imports: dict[str, _Import] = {}
        self._profiles: dict[tuple[str, str], set[str]] = {}
        self._fail_next: str | None = None

    def routes(self) -> list[BaseRoute]:
        section = "/audience/sections/{section}"
        routes: list[BaseRoute] = [
            Route("/oauth/token", self._token, methods=["POST"]),
            Route("/uploads/{import_id}", self._upload, methods=["POST"]),
            Route(f"{section}/attributes", self._auth(self._attributes), methods=["GET"]),
            Route(f"/v2{section}/imports", self._auth(self._create), methods=["POST"]),
        ]
        for base in (section, f"/v2{section}"):
            routes += [
                Route(f"{base}/imports/{{import_id}}", self._auth(self._status), methods=["GET"]),
                Route(f"{base}/imports/{{import_id}}/report", self._auth(self._report), methods=["GET"]),
            ]
        return routes

    def control_routes(self) -> list[BaseRoute]:
        return [
            Route("/imports", self._list_imports, methods=["GET"]),
            Route("/imports/fail-next", self._set_fail_next, methods=["POST"]),
            Route("/tokens/revoke", self._revoke_tokens, methods=["POST"]),
        ]

    def demo_env(self, base_url: str) -> dict[str, str]:
        return {
            "APSIS_BASE_URL": base_url,
            "APSIS_CLIENT_ID": self._client_id,
            "APSIS_CLIENT_SECRET": self._client_secret,
        }

    def reset(self) -> None:
        with self._lock:
            imports = list(self._imports.values())
            self._imports.clear()
            self._tokens.clear()
            self._fail_next = None
        with self._profiles_lock:
            self._profiles.clear()
        for imp in imports:
            imp.cancel.set()

    # --- auth -------------------------------------------------------------------------------

    async def _token(self, request: Request) -> Response:
        try:
            if request.headers.get("content-type", "").startswith("application/json"):
                payload = await request.json()
            else:
                payload = dict(await request.form())
        except (JSONDecodeError, UnicodeDecodeError, HTTPException):
            payload = None
        if not isinstance(payload, dict):
            return error(400, "Body must be a JSON object or a form")
        if payload.get("grant_type") != "client_credentials":
            return error(400, "grant_type must be client_credentials")
        valid_id = same_secret(str(payload.get("client_id") or ""), self._client_id)
        if not (same_secret(str(payload.get("client_secret") or ""), self._client_secret) and valid_id):
            return error(401, "Invalid client credentials")
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = time.time() + self._token_ttl
        return JSONResponse(
            {"access_token": token, "token_type": "Bearer", "expires_in": int(self._token_ttl)}
        )

    def _auth(self, handler: Handler) -> Handler:
        """Require a live bearer token, then turn :class:`ApsisError` into its JSON answer."""

        async def endpoint(request: Request) -> Response:
            try:
                scheme, _, token = request.headers.get("authorization", "").partition(" ")
                with self._lock:
                    expires = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
                if expires is None or expires < time.time():
                    raise ApsisError(401, "Unauthorized: missing, invalid or expired access token")
                if request.path_params.get("section") != SECTION:
                    raise ApsisError(404, f"Section {request.path_params.get('section')!r} not found")
                return await handler(request)
            except ApsisError as exc:
                return exc.response()

        return endpoint

    # --- API --------------------------------------------------------------------------------

    async def _attributes(self, request: Request) -> Response:
        items = [
            {"discriminator": a.discriminator, "name": a.name, "type": a.type, "version_id": a.version_id}
            for a in ATTRIBUTES
        ]
        return JSONResponse({"items": items})

    async def _create(self, request: Request) -> Response:
        try:
            body = await request.json()
        except (JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            raise ApsisError(400, "Body must be a JSON object")
        spec = _spec(body)
        now = time.time()
        import_id = str(uuid.uuid4())
        expires = now + self._ttl
        url, upload_body = self._presign(request, import_id, expires)
        imp = _Import(import_id, SECTION, body, spec, expires, url, upload_body, created_at=now)
        with self._lock:
            pending = [i for i in self._imports.values() if i.pending(now, self._pace)]
            if len(pending) >= self._max_pending:
                wait = max(1, math.ceil(min(i.ends_in(now, self._pace) for i in pending)))
                raise ApsisError(
                    429,
                    f"Pending import count limit reached ({self._max_pending} imports pending)",
                    {"Retry-After": str(wait)},
                )
            self._imports[import_id] = imp
        return JSONResponse(
            {
                "import_id": import_id,
                "file_upload_url": url,
                "file_upload_body": upload_body,
                "file_upload_url_expires_at": _iso(expires),
            },
            status_code=201,
        )

    async def _status(self, request: Request) -> Response:
        with self._lock:
            body = self._import(request).body(time.time(), self._pace)
        return JSONResponse({"result": body})

    async def _report(self, request: Request) -> Response:
        with self._lock:
            imp = self._import(request)
            status = imp.status(time.time(), self._pace)
        if status not in ("completed", "error") or imp.result is None:
            raise ApsisError(409, f"The import report is available once the import has finished ({status})")
        result = imp.result
        return JSONResponse(
            {
                "result": {
                    "import_id": imp.id,
                    "status": status,
                    "statistics": result.statistics(),
                    "errors": result.errors,
                    "skipped": result.skipped,
                }
            }
        )

    # --- presigned upload -------------------------------------------------------------------

    def _sign(self, text: str) -> str:
        return hmac.new(self._signing_key, text.encode(), hashlib.sha256).hexdigest()

    def _presign(self, request: Request, import_id: str, expires: float) -> tuple[str, dict[str, str]]:
        expires_ms = int(expires * 1000)
        url = (
            f"{request.url.scheme}://{request.url.netloc}{self.prefix}/uploads/{import_id}"
            f"?expires={expires_ms}&signature={self._sign(f'{import_id}:{expires_ms}')}"
        )
        policy = base64.b64encode(
            json.dumps(
                {
                    "expiration": _iso(expires),
                    "conditions": [
                        {"key": f"imports/{import_id}.csv"},
                        ["content-length-range", 0, self._max_file_bytes],
                    ],
                }
            ).encode()
        ).decode()
        return url, {
            "key": f"imports/{import_id}.csv",
            "policy": policy,
            "x-apsis-signature": self._sign(policy),
        }

    async def _upload(self, request: Request) -> Response:
        try:
            imp = self._check_presigned(request)
            async with CappedForm(
                request,
                self._max_file_bytes,
                too_large=partial(_too_large, self._max_file_bytes),
                unreadable=lambda detail: ApsisError(400, f"Unreadable multipart body: {detail}"),
            ) as form:
                self._check_policy(imp, form)
                upload = form.get("file")
                if not isinstance(upload, UploadFile):
                    raise ApsisError(400, "Missing file part 'file'")
                path = await run_in_threadpool(
                    spool,
                    upload.file,
                    self._max_file_bytes,
                    prefix="sandbox-apsis-",
                    too_large=partial(_too_large, self._max_file_bytes),
                )
            with self._lock:
                if imp.uploaded_at is not None or self._imports.get(imp.id) is not imp:
                    unlink(path)
                    raise ApsisError(409, f"A file was already uploaded for import {imp.id}")
                imp.path, imp.uploaded_at = path, time.time()
                imp.fail_with, self._fail_next = self._fail_next, None
                profiles = self._profiles.setdefault((imp.section, imp.spec.keyspace), set())
            threading.Thread(
                target=imp.run,
                args=(profiles, self._profiles_lock),
                name=f"apsis-import-{imp.id}",
                daemon=True,
            ).start()
        except ApsisError as exc:
            return exc.response()
        return Response(status_code=204)

    def _check_presigned(self, request: Request) -> _Import:
        import_id = request.path_params["import_id"]
        with self._lock:
            imp = self._imports.get(import_id)
        expires = request.query_params.get("expires", "")
        signature = request.query_params.get("signature", "")
        if imp is None or not hmac.compare_digest(signature, self._sign(f"{import_id}:{expires}")):
            raise ApsisError(403, "SignatureDoesNotMatch: the upload URL is not valid")
        if time.time() * 1000 > int(expires):
            raise ApsisError(403, f"Request has expired: the upload URL expired at {_iso(imp.expires_at)}")
        return imp

    def _check_policy(self, imp: _Import, form: FormData) -> None:
        for name in ("key", "policy", "x-apsis-signature"):
            if form.get(name) != imp.upload_body[name]:
                raise ApsisError(403, f"Policy check failed: form field {name!r} is missing or altered")

    # --- control ----------------------------------------------------------------------------

    async def _list_imports(self, request: Request) -> Response:
        now = time.time()
        with self._lock:
            imports = list(self._imports.values())
        with self._profiles_lock:
            profiles = {f"{s}/{k}": len(v) for (s, k), v in self._profiles.items()}
        items = []
        for imp in imports:
            body = imp.body(now, self._pace)
            body.update(
                request=imp.request,
                file_upload_url=imp.upload_url,
                file_upload_body=imp.upload_body,
                statistics=imp.result.statistics() if imp.result else None,
            )
            items.append(body)
        return JSONResponse({"imports": items, "profiles": profiles})

    async def _set_fail_next(self, request: Request) -> Response:
        detail = "The import failed in the sandbox"
        if await request.body():
            try:
                payload = await request.json()
            except (JSONDecodeError, UnicodeDecodeError):
                payload = None
            if not isinstance(payload, dict) or not isinstance(payload.get("detail", ""), str):
                return error(400, 'Body must be like {"detail": "why"}')
            detail = payload.get("detail") or detail
        with self._lock:
            self._fail_next = detail
        return JSONResponse({"ok": True, "detail": detail})

    async def _revoke_tokens(self, request: Request) -> Response:
        with self._lock:
            count = len(self._tokens)
            self._tokens.clear()
        return JSONResponse({"ok": True, "revoked": count})

    def _import(self, request: Request) -> _Import:
        import_id = request.path_params["import_id"]
        imp = self._imports.get(import_id)
        if imp is None:
            raise ApsisError(404, f"Import {import_id} not found")
        return imp


def _spec(body: dict[str, Any]) -> ImportSpec:
    """Validate an import request the way APSIS does (400 / 403) and reduce it to an ImportSpec."""
    mapping = body.get("keyspace_mapping")
    if (
        not isinstance(mapping, dict)
        or not mapping.get("keyspace_discriminator")
        or not mapping.get("field_selector")
    ):
        raise ApsisError(400, "keyspace_mapping needs keyspace_discriminator and field_selector")
    keyspace = str(mapping["keyspace_discriminator"])
    if keyspace not in KEYSPACES:
        raise ApsisError(400, f"Unknown keyspace {keyspace!r}")
    if not KEYSPACES[keyspace]:
        raise ApsisError(403, f"Keyspace {keyspace!r} does not have manage_subscriptions enabled")
    options = body.get("options") or {}
    if not isinstance(options, dict) or any(
        not isinstance(options.get(k, False), bool)
        for k in ("update_existing_profiles", "clear_existing_attributes")
    ):
        raise ApsisError(
            400, "options.update_existing_profiles and clear_existing_attributes must be booleans"
        )
    attributes: dict[str, Attribute] = {}
    for item in body.get("attribute_mappings") or []:
        if not isinstance(item, dict) or not item.get("field_selector"):
            raise ApsisError(400, "Every attribute mapping needs field_selector and attribute_version_id")
        attribute = _BY_VERSION.get(str(item.get("attribute_version_id")))
        if attribute is None:
            raise ApsisError(400, f"Unknown attribute_version_id {item.get('attribute_version_id')!r}")
        if not attribute.writable:
            raise ApsisError(
                403,
                f"Attribute {attribute.name!r} ({attribute.discriminator}) is not allowed to WRITE "
                f"through keyspace {keyspace!r}",
            )
        attributes[str(item["field_selector"])] = attribute
    other: list[str] = []
    for group in body.get("consent_mappings") or []:
        if not isinstance(group, dict) or not group.get("address_field_selector"):
            raise ApsisError(400, "Every consent mapping needs address_field_selector")
        other.append(str(group["address_field_selector"]))
        for consent in group.get("consents") or []:
            other += _consent_fields(consent)
    return ImportSpec(
        keyspace=keyspace,
        key_field=str(mapping["field_selector"]),
        attributes=attributes,
        other_fields=tuple(dict.fromkeys(other)),
        update_existing=bool(options.get("update_existing_profiles", True)),
    )


def _consent_fields(consent: Any) -> list[str]:
    if not isinstance(consent, dict) or consent.get("topic_discriminator") not in TOPICS:
        topic = consent.get("topic_discriminator") if isinstance(consent, dict) else None
        raise ApsisError(400, f"Unknown topic_discriminator {topic!r}")
    topic_channel = TOPICS[consent["topic_discriminator"]]
    channel = consent.get("channel_discriminator")
    if topic_channel is None and channel not in CHANNELS:
        raise ApsisError(
            400,
            f"Topic {consent['topic_discriminator']!r} is not channel-specific: "
            f"channel_discriminator must be one of {list(CHANNELS)}",
        )
    if topic_channel is not None and channel not in (None, topic_channel):
        raise ApsisError(
            400, f"channel_discriminator {channel!r} does not match the topic's channel {topic_channel!r}"
        )
    if consent.get("type", "opt-in") not in ("opt-in", "confirmed-opt-in", "opt-out"):
        raise ApsisError(400, f"Unknown consent type {consent.get('type')!r}")
    return [str(consent["field_selector"])] if consent.get("field_selector") else []


def _too_large(max_file_bytes: int) -> ApsisError:
    return ApsisError(413, f"EntityTooLarge: the import file exceeds {max_file_bytes} bytes; split it")


def _iso(epoch: float) -> str:
    """RFC 3339 UTC with milliseconds, as APSIS writes date-times."""
    return iso_millis(dt.datetime.fromtimestamp(epoch, dt.UTC))

"""Experience Platform external audiences: one audience per feed, refreshed by ingestion runs.

Protocol choices where the vendor document is vague (the sandbox agrees with each):
- Auth is IMS OAuth server-to-server: ``POST {ims_url}/ims/token/v3`` with the client id and
  secret (form, ``grant_type=client_credentials``) returns ``access_token`` and ``expires_in``
  (seconds). Tokens are cached per process and credential until a minute before expiry (a tenth
  of the lifetime for tokens under ten minutes; not at all without ``expires_in``), so the status
  sensor costs one GET per import; a 401 drops the token and retries once with a new one.
  A fixed ``access_token`` may be configured instead (no refresh then). Every call also sends
  ``x-api-key`` (the client id), ``x-gw-ims-org-id`` and ``x-sandbox-name``.
- Paths live under ``{base_url}/data/core/ais``; the feed's ``customAudienceId`` defaults to
  ``audience_pipeline.<feed>``. A failed creation leaves no audience behind.
- Finding the feed's audience. The seed shows no way to find an audience by name or
  ``customAudienceId``: its ``audienceId`` comes only from the creation operation
  (``GET /external-audiences/operations/{id}``). So the pipeline keeps it in its own state:
  ``submit`` and ``reconcile`` get the feed's newest earlier handle (``previous``, read from the
  ``import_job`` records in Dagster). A run's handle names its ``audience_id``; a creation's handle
  names its operation, which is read (and waited for while PROCESSING, up to
  ``run_wait_seconds``) for the ``audienceId``, or which says the creation failed and left no
  audience to find. A handle of another ``customAudienceId`` (the option changed) is not used. In
  order: the ``audience_id`` option (an existing audience, used as is: never looked up, never
  created; a 404 for it is an error naming the option); that state (a remembered audience that
  answers 404 was deleted: go on as if lost); only then, the state being lost,
  ``GET /external-audiences?customAudienceId=…`` → ``{"audiences": [...]}`` (the Audiences API's
  filter style), an optional fallback whose 404/405 means "not offered", and the push creates the
  audience. A creation refused with 409 (the name or ``customAudienceId`` exists) whose audience
  that fallback cannot find fails with a message naming the ``audience_id`` option and where it
  goes (the feed's ``options:`` in the feeds file). The audience's details, for the field check
  and PATCH below, come from ``GET /external-audience/{id}`` (the "view details" of the
  document's introduction).
- The API reads the CSV from cloud storage (``aep_storage``): each push overwrites one file per
  feed (``sourceSpec.type = file``), so the audience always mirrors the latest export. A run's
  data-filter window is ``[floor(mtime), floor(mtime) + 1]`` in epoch seconds (both inclusive)
  around the new file's storage modification time.
- First push: ``POST /external-audience/`` → 202 ``operationId``; creating also ingests the file.
  The handle's job is the operation; ``status`` polls it (PROCESSING → SUCCESS | FAILED, failures
  carry ``errors[{code, message}]``). Later pushes: PATCH what the API can change (description,
  labels, ttlInDays, field labels) when it differs, then ``POST /external-audience/{id}/runs``;
  the handle's job is the run and ``status`` polls ``GET …/runs/{runId}`` (PROCESSING while it
  runs; ``details[{stage, status, flowRunId, message}]``). Field names or types cannot be patched:
  a feed whose columns changed fails with a message instead of sending a file the audience
  cannot read.
- One run at a time per audience: before overwriting the file, ``submit`` waits while a run (or
  the creation) is in progress, and a 409 on start waits and retries, both up to
  ``run_wait_seconds``, so a busy audience delays a partition instead of failing it.
- The vendor gives no row-level results. A succeeded job imported every row it was sent; a
  failed one failed them all, with the failing stage and status as the reason. Rows without a
  value in the identity field are not sent (Platform could not identify them) and are reported
  failed with that reason.
- Errors carry ``error_code`` like ``100910-400`` and a ``message``.
- Rate limits: every Platform and IMS call goes through :class:`VendorHTTP`, which waits out a 429
  as its ``Retry-After`` asks (up to 5 attempts) for any method, creates and run starts included:
  a 429 was not processed, so repeating it cannot make a second audience or run. A status poll
  that is still refused fails only that sensor tick; the import stays in flight for the next one.
- An expired landing-zone SAS is fetched again and the upload retried once (``aep_storage``).
- A status word other than PROCESSING, SUCCESS or FAILED is ``JobState.UNKNOWN`` (not final; the
  word is kept in ``vendor_status``).
- ``outcome`` never polls a job whose end is known: it reuses the answer this client's last
  ``status`` read, or, given a terminal ``status=``, reads nothing (a failure's reason is then that
  status's ``detail``, and the created audience goes unnamed in the note).
- ``destination(options, retry=...)`` applies one :class:`RetryPolicy` to the Platform and IMS
  clients (the status sensor passes one without 429, so a rate-limited tick fails at once instead
  of sleeping for ``Retry-After``). The landing-zone upload keeps ``aep_storage``'s own policy.
- ``reconcile`` (a submit whose answer was lost): the feed's audience is the ``audience_id``
  option or the one the state names (as for ``submit``), else the lookup by ``customAudienceId``;
  then its runs are listed with the documented
  ``GET /external-audience/{id}/runs``. One run this pipeline never recorded, created at or after
  the intent's ``recorded_at`` less ``CLOCK_SKEW_SECONDS``, is the lost one and is adopted; none
  means nothing arrived, provided the audience is older than the lost submit (it has an earlier or
  recorded run, or a recorded creation operation names it). Otherwise the lost submit may have
  created the audience, and a creation can be looked up only by the ``operationId`` its lost
  answer held: the client cannot tell, and a resend is harmless (a second creation of the same
  ``customAudienceId`` is refused with 409; ``submit`` then starts a run on the audience the
  lookup finds, or, without the lookup, fails asking for the ``audience_id`` option, since nothing
  documented leads from the lost creation to its audience). The audience lookup is not in the
  seed, so a 404/405 from it (or from the runs list) means "cannot tell"; several unrecorded new
  runs, or one without ``createdAt``, cannot be told apart either.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import dagster as dg
import httpx
import numpy as np
import pandas as pd
from pydantic import Field

from audience_pipeline.destinations.aep_storage import (
    DlzStorageOptions,
    LandingZone,
    S3Storage,
    Storage,
    StorageOptions,
    StoredFile,
)
from audience_pipeline.destinations.base import (
    ChunkJob,
    JobHandle,
    JobOutcome,
    JobState,
    JobStatus,
    LastFinal,
    Reconciliation,
    RowFailure,
    SubmitIntent,
    cannot_reconcile,
    known_final,
)
from audience_pipeline.destinations.http import RetryPolicy, VendorError, VendorHTTP, VendorHTTPError
from audience_pipeline.destinations.oauth import (
    BearerTokens,
    Token,
    TokenCache,
    account_key,
    bearer,
    read_token,
)
from audience_pipeline.destinations.options import VendorOptions, not_a_column
from audience_pipeline.redact import register_secret

T = TypeVar("T")

VENDOR = "adobe_experience_platform"
AIS = "/data/core/ais"
AUDIENCE = f"{AIS}/external-audience"
AUDIENCES = f"{AIS}/external-audiences"
OPERATIONS = f"{AUDIENCES}/operations"
DLZ_CREDENTIALS = "/data/foundation/connectors/landingzone/credentials"
TOKEN_PATH = "/ims/token/v3"
FieldType = Literal["string", "number", "long", "integer", "date", "datetime", "boolean"]
_STATES = {"PROCESSING": JobState.RUNNING, "SUCCESS": JobState.SUCCEEDED, "FAILED": JobState.FAILED}
_CANONICAL = ("unique_id", "email", "mobile_phone", "first_name", "last_name")
CLOCK_SKEW_SECONDS = 60.0
"""A run created this long before the intent was recorded may still be the lost submit's."""
MAX_OPERATION_LOOKUPS = 20
"""Recorded job ids tried as creation operations when reconciling (one GET each)."""
_UNSUPPORTED = (404, 405)
AUDIENCE_ID_OPTION = "audience_id"
"""The feed option naming an existing audience; the 409 error tells a person to set it."""
NO_ROW_RESULTS = (
    "Experience Platform reports no row-level results: every row sent in a run that succeeded is "
    "counted imported, and a failed run fails every row it was sent."
)


class AepOptions(VendorOptions):
    """Feed options for Experience Platform; column names are the feed's canonical columns."""

    audience_name: str = Field(min_length=1)
    description: str | None = None
    custom_audience_id: str | None = None
    audience_id: str | None = Field(default=None, min_length=1)
    """An existing audience to refresh, used as is: never looked up, never created."""
    identity_field: str = "email"
    identity_namespace: str = "email"
    ttl_in_days: int = Field(default=30, ge=1, le=90)
    labels: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    field_labels: dict[str, list[str]] = Field(default_factory=dict)
    namespace: str = "CustomerAudienceUpload"
    file_name: str | None = None
    storage: StorageOptions = Field(default_factory=DlzStorageOptions)
    attribute_types: dict[str, FieldType] = Field(default_factory=dict)
    """Filled from the feed's mapping when the feeds file loads; set it only to override a type."""
    run_wait_seconds: float = Field(default=1800.0, ge=0)
    poll_interval_seconds: float = Field(default=10.0, gt=0)

    def describe_target(self) -> str:
        known = f" (id {self.audience_id})" if self.audience_id else ""
        return f'Experience Platform audience "{self.audience_name}"{known}'

    def complete_for_feed(self, mapping: Any) -> dict[str, Any]:
        """These options plus the attribute types the feed's mapping declares (load-time hook)."""
        types = {name: spec.type for name, spec in mapping.attributes.items()}
        types.update(self.attribute_types)
        return {**self.model_dump(mode="json", exclude_unset=True), "attribute_types": types}

    def column_problems(self, columns: list[str]) -> list[tuple[str | None, str]]:
        """The identity column and every labelled column must be columns of the feed."""
        problems: list[tuple[str | None, str]] = []
        if self.identity_field not in columns:
            problems.append(not_a_column("identity_field", self.identity_field, columns))
        for column in sorted(set(self.field_labels) - set(columns)):
            problems.append(not_a_column("field_labels", column, columns))
        return problems

    def fields(self, columns: list[str]) -> list[dict[str, Any]]:
        """The audience's ``fields``: every uploaded column, typed, with the identity namespace."""
        if self.identity_field not in columns:
            raise ValueError(f"identity_field {self.identity_field!r} is not among the columns {columns}")
        out = []
        for column in columns:
            field: dict[str, Any] = {"name": column, "type": self._type(column)}
            if column == self.identity_field:
                field["identityNs"] = self.identity_namespace
            if self.field_labels.get(column):
                field["labels"] = list(self.field_labels[column])
            out.append(field)
        return out

    def _type(self, column: str) -> str:
        if column in _CANONICAL:
            return "string"
        return self.attribute_types.get(column, "string")


_TOKENS = TokenCache()


class ImsAuth:
    """Bearer tokens from IMS (client credentials), or a fixed ``access_token`` that is never refreshed."""

    def __init__(
        self,
        ims_url: str,
        client_id: str,
        *,
        client_secret: str | None = None,
        access_token: str | None = None,
        scopes: str = "",
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if (client_secret is None) == (access_token is None):
            raise ValueError("configure exactly one of client_secret or access_token")
        self._fixed = access_token
        self._form = {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": client_secret or "",
            "scope": scopes,
        }
        self._ims_url = ims_url
        self._timeout = timeout
        self._transport = transport
        self._retry = retry
        account = account_key(ims_url, client_id, client_secret or "", scopes)
        self._tokens = BearerTokens(account, self._fetch, cache=_TOKENS)
        register_secret(client_id, client_secret, access_token)

    def call(self, send: Callable[[str], T]) -> T:
        """``send(token)``; with IMS credentials a 401 fetches a new token and sends once more."""
        if self._fixed is not None:
            return send(self._fixed)
        return self._tokens.call(send)

    def token(self) -> str:
        return self._fixed if self._fixed is not None else self._tokens.token()

    def _fetch(self) -> Token:
        with VendorHTTP(
            VENDOR,
            self._ims_url,
            secrets=[self._form["client_id"], self._form["client_secret"]],
            timeout=self._timeout,
            transport=self._transport,
            retry=self._retry,
        ) as http:
            body = http.json("POST", TOKEN_PATH, data=self._form, idempotent=True)
        token = read_token(body, vendor=VENDOR, path=TOKEN_PATH, now=time.time(), default_lifetime=0)
        register_secret(token.value)
        return token


class AepClient:
    """One feed's audience: upload, create or run, and poll."""

    vendor: ClassVar[str] = VENDOR

    def __init__(
        self,
        http: VendorHTTP,
        auth: ImsAuth,
        options: AepOptions,
        storage: Storage | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.http = http
        self.auth = auth
        self.options = options
        self.storage = storage or LandingZone(VENDOR, DlzStorageOptions(), self.landing_zone_credentials)
        self._sleep = sleep
        self._clock = clock
        self._final: LastFinal[dict[str, Any]] = LastFinal()

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """A Platform call with a bearer token; one retry with a fresh token after a 401."""
        return self.auth.call(lambda token: self.http.json(method, path, headers=bearer(token), **kw))

    def landing_zone_credentials(self) -> dict[str, Any]:
        return self.call("GET", DLZ_CREDENTIALS, params={"type": "user_drop_zone"})

    def find_audience(self, custom_audience_id: str) -> dict[str, Any] | None:
        """The audience with this ``customAudienceId`` through the lookup the seed does not show;
        raises its 404/405 (callers that can do without it use :meth:`lookup`)."""
        body = self.call("GET", AUDIENCES, params={"customAudienceId": custom_audience_id})
        for audience in (body or {}).get("audiences") or []:
            if audience.get("customAudienceId") == custom_audience_id:
                return audience
        return None

    def lookup(self, custom_audience_id: str) -> dict[str, Any] | None:
        """:meth:`find_audience`, with a 404/405 (no such endpoint) meaning "not found"."""
        try:
            return self.find_audience(custom_audience_id)
        except VendorHTTPError as exc:
            if exc.status not in _UNSUPPORTED:
                raise
            return None

    def audience(self, audience_id: str) -> dict[str, Any] | None:
        """``GET /external-audience/{id}`` (the details the document's introduction offers);
        ``None`` when the audience is gone (404)."""
        try:
            body = self.call("GET", f"{AUDIENCE}/{audience_id}")
        except VendorHTTPError as exc:
            if exc.status != 404:
                raise
            return None
        return {**(body or {}), "audienceId": (body or {}).get("audienceId") or audience_id}

    def remembered(self, custom_id: str, previous: JobHandle | None) -> tuple[bool, str | None]:
        """``(known, audience id)`` from the feed's newest earlier import: its run's audience, or
        the audience its creation operation made (waiting while that still runs). ``(True, None)``:
        that creation failed, so there is no audience; ``(False, None)``: no usable record."""
        if previous is None or previous.vendor != VENDOR or not previous.jobs:
            return False, None
        if previous.extra.get("custom_audience_id") != custom_id:
            return False, None  # the feed now names another audience
        if previous.extra.get("audience_id"):
            return True, str(previous.extra["audience_id"])
        if previous.extra.get("kind") != "operation":
            return False, None
        operation_id = previous.jobs[0].job_id
        path = f"{OPERATIONS}/{operation_id}"
        answer: dict[str, Any] = {}

        def ended() -> bool:
            answer.update(self.call("GET", path) or {})
            return answer.get("status") != "PROCESSING"

        try:
            self._wait(ended, path=path, what=f"the audience's creation (operation {operation_id})")
        except VendorHTTPError as exc:
            if exc.status not in _UNSUPPORTED:
                raise
            return False, None  # the operation is no longer kept
        if answer.get("status") == "SUCCESS" and answer.get("audienceId"):
            return True, str(answer["audienceId"])
        if answer.get("status") == "FAILED":
            return True, None
        return False, None

    def _existing(self, custom_id: str, previous: JobHandle | None) -> dict[str, Any] | None:
        """The feed's audience: named in the options, else remembered, else (state lost) looked up."""
        if self.options.audience_id:
            audience = self.audience(self.options.audience_id)
            if audience is None:
                raise VendorHTTPError(
                    VENDOR,
                    "GET",
                    f"{AUDIENCE}/{self.options.audience_id}",
                    status=404,
                    detail=(
                        f"Experience Platform has no audience {self.options.audience_id!r}; correct or "
                        f"remove {AUDIENCE_ID_OPTION} under the feed's options: in the feeds file"
                    ),
                )
            return audience
        known, audience_id = self.remembered(custom_id, previous)
        if known and audience_id is None:
            return None  # the last creation failed and left no audience: create it
        if audience_id is not None:
            audience = self.audience(audience_id)
            if audience is not None:
                return audience  # else deleted since: look for another, or create one
        return self.lookup(custom_id)

    def submit(
        self, rows: pd.DataFrame, *, feed: str, partition: str, previous: JobHandle | None = None
    ) -> JobHandle:
        """Upload the file, then create the audience (first push) or start an ingestion run.

        ``previous``: the feed's newest earlier import, whose record names the audience."""
        columns = [c for c in rows.columns if c != "source_line"]
        fields = self.options.fields(columns)
        missing = self._no_identity(rows)
        custom_id = self._custom_id(feed)
        audience = self._existing(custom_id, previous)
        if audience is not None:
            self._prepare(audience, fields)
        stored = self._upload(rows.loc[~missing, columns], self.options.file_name or f"{feed}.csv")
        extra: dict[str, Any] = {
            "custom_audience_id": custom_id,
            "source_path": stored.path,
            "cloud_type": stored.cloud_type,
        }
        if audience is None:
            try:
                body = self.call("POST", f"{AUDIENCE}/", json=self._create_body(custom_id, fields, stored))
            except VendorHTTPError as exc:
                if exc.status != 409:
                    raise
                audience = self.lookup(custom_id)
                if audience is None:
                    raise self._conflict(exc, feed, custom_id) from None
                self._prepare(audience, fields)
            else:
                job_id = _required(body, "operationId", "POST", f"{AUDIENCE}/")
                return self._handle(feed, partition, rows, job_id, extra, missing)
        run = self._start_run(audience["audienceId"], stored)
        run_id = _required(run, "runId", "POST", "runs")
        return self._handle(feed, partition, rows, run_id, extra, missing, audience_id=audience["audienceId"])

    def _custom_id(self, feed: str) -> str:
        return self.options.custom_audience_id or f"audience_pipeline.{feed}"

    def _conflict(self, exc: VendorHTTPError, feed: str, custom_id: str) -> VendorHTTPError:
        """The 409 of a creation whose existing audience this pipeline cannot find: say what to set."""
        return VendorHTTPError(
            VENDOR,
            exc.method,
            exc.url,
            status=409,
            code=exc.code,
            detail=(
                f"Experience Platform already has an audience named {self.options.audience_name!r} or "
                f"with customAudienceId {custom_id!r} ({exc.detail or 'duplicate'}), and this pipeline "
                "has no record of its audienceId (no earlier import of the feed names it, and the lookup "
                "by customAudienceId, which the vendor document does not offer, found none). Set "
                f"{AUDIENCE_ID_OPTION}: <that audience's id> under options: of feed {feed!r} in the "
                "feeds file to refresh it, or a new custom_audience_id and audience_name there to "
                "create another audience"
            ),
        )

    def _no_identity(self, rows: pd.DataFrame) -> np.ndarray:
        """Rows without an identity value: never sent, since Platform could not identify them."""
        identity = rows[self.options.identity_field]
        return (identity.isna() | (identity.astype("str").str.strip() == "")).to_numpy(dtype=bool)

    def _handle(
        self,
        feed: str,
        partition: str,
        rows: pd.DataFrame,
        job_id: str,
        source: dict[str, Any],
        missing: np.ndarray,
        *,
        audience_id: str | None = None,
    ) -> JobHandle:
        """The handle of a creation operation, or of a run on ``audience_id``."""
        extra: dict[str, Any] = {**source, "not_sent_rows": np.flatnonzero(missing).tolist()}
        if audience_id is None:
            extra["kind"] = "operation"
        else:
            extra.update(kind="run", audience_id=audience_id)
        return JobHandle(
            vendor=VENDOR,
            feed=feed,
            partition=partition,
            jobs=[ChunkJob(job_id=job_id, first_row=0, row_count=len(rows))],
            submitted_rows=len(rows),
            extra=extra,
        )

    def reconcile(
        self, intent: SubmitIntent, rows: pd.DataFrame, *, previous: JobHandle | None = None
    ) -> Reconciliation:
        """Did the submit recorded in ``intent`` start a run? (See the module docstring.)"""
        custom_id = self._custom_id(intent.feed)
        since = intent.recorded_at - CLOCK_SKEW_SECONDS
        audience_id = self.options.audience_id or self.remembered(custom_id, previous)[1]
        audience = self.audience(audience_id) if audience_id else None
        try:
            if audience is None:
                audience = self.find_audience(custom_id)
        except VendorHTTPError as exc:
            if exc.status not in _UNSUPPORTED:
                raise
            return cannot_reconcile(
                VENDOR,
                f"the lookup of audience {custom_id!r} by customAudienceId (not in the vendor document) "
                f"answered {exc.status}, so whether the lost submit created the audience or started a run "
                "cannot be told; a resend is harmless, since a second creation is refused with 409",
            )
        if audience is None:
            return cannot_reconcile(
                VENDOR,
                f"no audience {custom_id!r} is listed, but the listing is not in the vendor document and a "
                "creation can only be looked up by the operationId its lost answer held; a resend is "
                "harmless, since a second creation of the same customAudienceId is refused with 409",
            )
        audience_id = str(audience["audienceId"])
        try:
            runs = self.call("GET", f"{AUDIENCE}/{audience_id}/runs").get("runs") or []
        except VendorHTTPError as exc:
            if exc.status not in _UNSUPPORTED:
                raise
            return cannot_reconcile(
                VENDOR, f"listing the ingestion runs of audience {audience_id} answered {exc.status}"
            )
        unrecorded = [
            (r, _epoch_seconds(r.get("createdAt")))
            for r in runs
            if str(r.get("runId")) not in intent.known_job_ids
        ]
        undated = [str(r.get("runId")) for r, created in unrecorded if created is None]
        if undated:
            return cannot_reconcile(
                VENDOR,
                f"runs {undated} of audience {audience_id} have no createdAt to compare with the intent",
            )
        new = [r for r, created in unrecorded if created is not None and created >= since]
        if len(new) > 1:
            ids = [str(r.get("runId")) for r in new]
            return cannot_reconcile(
                VENDOR,
                f"audience {audience_id} has {len(new)} runs this pipeline never recorded since the lost "
                f"submit ({', '.join(ids)}); which one it started cannot be told",
            )
        if new:
            run_id = _required(new[0], "runId", "GET", f"{AUDIENCE}/{audience_id}/runs")
            params = (audience.get("sourceSpec") or {}).get("params") or {}
            source = {
                "custom_audience_id": custom_id,
                "source_path": params.get("path"),
                "cloud_type": params.get("cloudType"),
            }
            handle = self._handle(
                intent.feed,
                intent.partition,
                rows,
                run_id,
                source,
                self._no_identity(rows),
                audience_id=audience_id,
            )
            return Reconciliation(
                handle, True, f"the lost submit started run {run_id} on audience {audience_id}"
            )
        if not self._older_than(audience_id, runs, intent, since):
            return cannot_reconcile(
                VENDOR,
                f"audience {audience_id} has no run or recorded creation from before the lost submit, so "
                "that submit may have created it, and a creation can only be looked up by the operationId "
                "its lost answer held",
            )
        return Reconciliation(
            None, True, f"no ingestion run on audience {audience_id} started since the lost submit"
        )

    def _older_than(
        self, audience_id: str, runs: list[dict[str, Any]], intent: SubmitIntent, since: float
    ) -> bool:
        """Whether the audience existed before the lost submit: it has a run from before it or one
        this pipeline recorded, or a recorded job is the operation that created it."""
        run_ids = {str(r.get("runId")) for r in runs}
        if run_ids & intent.known_job_ids:
            return True
        created = (_epoch_seconds(r.get("createdAt")) for r in runs)
        if any(moment is not None and moment < since for moment in created):
            return True
        for job_id in sorted(intent.known_job_ids - run_ids)[:MAX_OPERATION_LOOKUPS]:
            try:
                operation = self.call("GET", f"{OPERATIONS}/{job_id}")
            except VendorHTTPError as exc:
                if exc.status in _UNSUPPORTED:
                    continue
                raise
            if str((operation or {}).get("audienceId")) == audience_id:
                return True
        return False

    def _upload(self, frame: pd.DataFrame, file_name: str) -> StoredFile:
        fd, name = tempfile.mkstemp(prefix="aep-", suffix=".csv")
        os.close(fd)
        path = Path(name)
        try:
            frame.to_csv(path, index=False, lineterminator="\n", na_rep="", encoding="utf-8")
            return self.storage.upload(path, file_name)
        finally:
            path.unlink(missing_ok=True)

    def _create_body(
        self, custom_id: str, fields: list[dict[str, Any]], stored: StoredFile
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": self.options.audience_name,
            "customAudienceId": custom_id,
            "fields": fields,
            "sourceSpec": stored.source_spec(),
            "ttlInDays": self.options.ttl_in_days,
            "audienceType": "people",
            "originName": "CUSTOM_UPLOAD",
            "namespace": self.options.namespace,
            "labels": list(self.options.labels),
            "tags": list(self.options.tags),
        }
        if self.options.description is not None:
            body["description"] = self.options.description
        return body

    def _prepare(self, audience: dict[str, Any], fields: list[dict[str, Any]]) -> None:
        """Refuse field changes the API cannot make, PATCH the ones it can, wait until idle."""
        current = {f.get("name"): f for f in audience.get("fields") or []}
        shape = {(f["name"], f["type"], f.get("identityNs")) for f in fields}
        existing = {(f.get("name"), f.get("type"), f.get("identityNs")) for f in current.values()}
        if shape != existing:
            raise ValueError(
                f"the feed's columns no longer match Experience Platform audience "
                f"{audience.get('audienceId')} (fields cannot be changed once created): sending "
                f"{sorted(shape, key=str)}, the audience has "
                f"{sorted(existing, key=str)}; give the feed a new custom_audience_id or delete the audience"
            )
        patch: dict[str, Any] = {}
        if self.options.description is not None and audience.get("description") != self.options.description:
            patch["description"] = self.options.description
        if list(audience.get("labels") or []) != self.options.labels:
            patch["labels"] = list(self.options.labels)
        if audience.get("ttlInDays") != self.options.ttl_in_days:
            patch["ttlInDays"] = self.options.ttl_in_days
        relabelled = [
            {"name": f["name"], "labels": f.get("labels", [])}
            for f in fields
            if list(current[f["name"]].get("labels") or []) != f.get("labels", [])
        ]
        if relabelled:
            patch["fields"] = relabelled
        if patch:
            self.call("PATCH", f"{AUDIENCE}/{audience['audienceId']}", json=patch)
        self._wait(lambda: not self._busy(audience["audienceId"]), audience["audienceId"])

    def _busy(self, audience_id: str) -> bool:
        audience = self.call("GET", f"{AUDIENCE}/{audience_id}")
        if audience.get("status") == "PROCESSING":
            return True
        runs = self.call("GET", f"{AUDIENCE}/{audience_id}/runs").get("runs") or []
        return any(run.get("status") == "PROCESSING" for run in runs)

    def _start_run(self, audience_id: str, stored: StoredFile) -> dict[str, Any]:
        start = math.floor(stored.modified_at)
        body = {"dataFilterStartTime": start, "dataFilterEndTime": start + 1}
        result: dict[str, Any] = {}

        def started() -> bool:
            try:
                result.update(self.call("POST", f"{AUDIENCE}/{audience_id}/runs", json=body))
            except VendorHTTPError as exc:
                if exc.status == 409:
                    return False
                raise
            return True

        self._wait(started, audience_id)
        return result

    def _wait(
        self,
        ready: Callable[[], bool],
        audience_id: str = "",
        *,
        path: str = "",
        what: str = "an ingestion run",
    ) -> None:
        deadline = self._clock() + self.options.run_wait_seconds
        while not ready():
            if self._clock() >= deadline:
                raise VendorError(
                    VENDOR,
                    "GET" if path else "POST",
                    path or f"{AUDIENCE}/{audience_id}/runs",
                    status=409,
                    detail=(
                        f"{what} was still in progress after "
                        f"{self.options.run_wait_seconds:.0f} s; re-run the partition once it ends"
                    ),
                )
            self._sleep(self.options.poll_interval_seconds)

    def _job(self, handle: JobHandle) -> dict[str, Any]:
        job_id = handle.jobs[0].job_id
        if handle.extra.get("kind") == "operation":
            return self.call("GET", f"{OPERATIONS}/{job_id}")
        return self.call("GET", f"{AUDIENCE}/{handle.extra['audience_id']}/runs/{job_id}")

    def status(self, handle: JobHandle) -> JobStatus:
        body = self._job(handle)
        vendor_status = str(body.get("status"))
        state = _STATES.get(vendor_status, JobState.UNKNOWN)
        if state.terminal:
            self._final.remember(handle, {handle.jobs[0].job_id: body})
        return JobStatus(state=state, vendor_status=vendor_status, detail=_failure_detail(body))

    def outcome(self, handle: JobHandle, *, status: JobStatus | None = None) -> JobOutcome:
        """Every sent row imported, or all failed with the stage's reason. The job is read only
        when neither this client's last ``status`` read it ended nor a terminal ``status`` is given
        (its ``detail`` is the failure's reason then; the created audience's id goes unnamed)."""
        body = self._final.get(handle).get(handle.jobs[0].job_id)
        final = known_final(status)
        if body is None and final is not None:
            failed, detail, created = final.state is JobState.FAILED, final.detail or final.vendor_status, ""
        else:
            body = body if body is not None else self._job(handle)
            failed = _STATES.get(str(body.get("status"))) is JobState.FAILED
            detail, created = _failure_detail(body), str(body.get("audienceId") or "")
        not_sent = set(handle.extra.get("not_sent_rows") or [])
        failures = [
            RowFailure(
                row=r,
                reason=f"no {self.options.identity_field} value: Experience Platform identifies "
                "members by it",
            )
            for r in sorted(not_sent)
        ]
        notes = [NO_ROW_RESULTS]
        kind = "audience creation" if handle.extra.get("kind") == "operation" else "ingestion run"
        if failed:
            reason = f"Experience Platform {kind} {handle.jobs[0].job_id} failed: {detail}"
            failures += [
                RowFailure(row=r, reason=reason) for r in range(handle.submitted_rows) if r not in not_sent
            ]
            failures.sort(key=lambda f: f.row)
            notes.append(reason)
        elif handle.extra.get("kind") == "operation":
            named = f" {created}" if created else ""
            notes.append(f"audience{named} created ({handle.extra.get('custom_audience_id')})")
        return JobOutcome(
            submitted=handle.submitted_rows,
            failures=failures,
            vendor_counts={"sent": handle.submitted_rows - len(not_sent)},
            notes=notes,
        )


def _failure_detail(body: dict[str, Any]) -> str:
    """``stage STATUS: message`` for the first failed stage, else the job's own errors/status."""
    for detail in body.get("details") or []:
        if detail.get("status") == "FAILED":
            message = detail.get("message")
            return f"stage {detail.get('stage')} {detail.get('status')}" + (f": {message}" if message else "")
    errors = body.get("errors") or []
    if errors:
        return "; ".join(f"{e.get('code', 'error')}: {e.get('message', '')}" for e in errors)
    return str(body.get("status", ""))


def _epoch_seconds(value: Any) -> float | None:
    """A ``createdAt`` (epoch seconds, as the document writes it); ``None`` when absent or not a number."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _required(body: Any, key: str, method: str, path: str) -> str:
    value = body.get(key) if isinstance(body, dict) else None
    if not value:
        raise VendorError(VENDOR, method, path, code="unexpected_response", detail=f"no {key}")
    return str(value)


class AepResource(dg.ConfigurableResource):
    """Credentials and endpoints of one Experience Platform sandbox (``EnvVar`` keeps them hidden)."""

    base_url: str = "https://platform.adobe.io"
    ims_url: str = "https://ims-na1.adobelogin.com"
    client_id: str
    client_secret: str | None = None
    access_token: str | None = None
    org_id: str
    sandbox_name: str = "prod"
    scopes: str = "openid,AdobeID,read_organizations,additional_info.projectedProductContext,session"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    timeout_seconds: float = 30.0

    def destination(self, options: dict, retry: RetryPolicy | None = None) -> AepClient:
        parsed = AepOptions.model_validate(options)
        auth = ImsAuth(
            self.ims_url,
            self.client_id,
            client_secret=self.client_secret,
            access_token=self.access_token,
            scopes=self.scopes,
            timeout=self.timeout_seconds,
            retry=retry,
        )
        http = VendorHTTP(
            VENDOR,
            self.base_url,
            headers={
                "x-api-key": self.client_id,
                "x-gw-ims-org-id": self.org_id,
                "Accept": "application/json",
            },
            timeout=self.timeout_seconds,
            public_headers={"x-sandbox-name": self.sandbox_name},
            retry=retry,
        )
        client = AepClient(http, auth, parsed)
        if isinstance(parsed.storage, DlzStorageOptions):
            client.storage = LandingZone(VENDOR, parsed.storage, client.landing_zone_credentials)
        else:
            client.storage = S3Storage(
                VENDOR,
                parsed.storage,
                access_key_id=self.s3_access_key_id,
                secret_access_key=self.s3_secret_access_key,
            )
        return client

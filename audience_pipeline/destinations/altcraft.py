"""Altcraft bulk profile import + trigger launch: JSON batch tasks, polled through ``tasks/status``.

Protocol choices where the vendor document is vague (the sandbox in ``sandbox/altcraft.py``
agrees with each):

- ``POST /api/v1.1/campaigns/triggers/import_and_start_batch_task`` takes the token in the JSON
  body, so the token is registered with the redactor and the request body is never logged, kept
  in a handle or put into metadata. The answer is the envelope ``{error, error_text}`` with
  ``task_id`` (read from the top level, as the vendor's example shows, or from ``data``).
- ``error != 0`` is a refusal whatever the HTTP status (the service answers 200 for a request it
  read and refused, 400 for one it could not read, e.g. "http: request body too large"). A
  refused batch is not retried and not raised: its rows fail in the report with the vendor's
  ``error_text``, and the other batches go on. A wrong token (401/403), repeated 429/5xx and
  lost connections raise, because no batch could succeed or the outcome is unknown.
- Limits: at most 10,000 profiles and 10 MB per request. "10 Mb" is read as 10,000,000 bytes,
  under both the decimal and the binary reading; bodies are measured, not estimated.
- Each profile is one item ``{"data": {...}}`` (plus ``"profile_id"`` beside ``data`` for
  ``profile_id`` matching). Standard fields: ``_fname``, ``_lname``, ``email``, ``phones`` (one
  E.164 string) from the canonical columns; attributes go under their own names; empty cells are
  left out, so a profile without an email keeps the one Altcraft has. ``custom`` matching writes
  the ``match_column`` value (default ``unique_id``) into the ``field_name`` field. Subscriptions
  are not managed: ``resource_id`` is passed through for email/phone matching only.
- Task states: ``pending`` → ``processing`` → ``completed`` | ``error`` (the seed shows only
  ``completed``; API-NOTES names the others). Any other word is ``JobState.UNKNOWN``: not final,
  and ``vendor_status`` names it (a multi-task import is UNKNOWN while any task is).
- A ``completed`` task's ``result.result`` lists one item per submitted profile in submission
  order: an item with ``error`` 0 (``status`` ``created``/``updated``, or just a ``profile_id``
  as in the seed) is imported, any other item fails with its ``error_text``; a missing item fails
  too, and ``result.error != 0`` fails every profile of the task. A task in ``error``, or one whose
  status answer is an ``error != 0`` envelope (e.g. "task not found"), fails all its profiles.
- ``destination(options, retry=...)`` applies one :class:`RetryPolicy` to every call (the status
  sensor passes one without 429, so a tick fails at once instead of sleeping for ``Retry-After``).
- ``outcome`` reuses the tasks this client's last ``status`` read ended. Otherwise it reads each
  task once: the per-profile results travel only in ``tasks/status``, so a terminal ``status=``
  (which holds none) cannot spare that read.
- A submit whose answer was lost cannot be reconciled: the document has no way to list tasks
  (``tasks/status`` needs the ``task_id`` the lost answer held). Sending again matches the same
  profiles (``matching``) and updates them, so no profile is created twice; but the trigger
  campaign is launched again for every resent profile, so they may get its message twice,
  unless the feed sets ``skip_triggers``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import dagster as dg
import httpx
import pandas as pd
from pydantic import Field, model_validator

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
    combine_states,
    every_row,
)
from audience_pipeline.destinations.http import (
    RetryPolicy,
    VendorError,
    VendorHTTP,
    VendorHTTPError,
    parse_error_body,
)
from audience_pipeline.destinations.json_batches import (
    Batch,
    encode_in_slices,
    encode_records,
    send_concurrently,
)
from audience_pipeline.destinations.options import VendorOptions, not_a_column
from audience_pipeline.feeds.model import CANONICAL_FIELDS

VENDOR = "altcraft"
IMPORT_PATH = "/api/v1.1/campaigns/triggers/import_and_start_batch_task"
STATUS_PATH = "/api/v1.1/tasks/status"
MAX_PROFILES = 10_000
MAX_REQUEST_BYTES = 10_000_000
DEFAULT_MAX_IN_FLIGHT = 4
STANDARD_FIELDS = {"_fname": "first_name", "_lname": "last_name", "email": "email", "phones": "mobile_phone"}
REFUSED = "refused"
_STATES = {
    "pending": JobState.PENDING,
    "processing": JobState.RUNNING,
    "completed": JobState.SUCCEEDED,
    "error": JobState.FAILED,
    REFUSED: JobState.FAILED,
}
# Answers whose Altcraft envelope says why a batch was refused; others raise in VendorHTTP.
_ENVELOPE_STATUSES = (200, 400, 404, 409, 413, 422)
Matching = Literal["email", "email_profile", "phone", "profile_id", "custom"]


class AltcraftOptions(VendorOptions):
    """Feed options for Altcraft; column options name canonical columns of the feed."""

    trigger_id: int = Field(gt=0)
    matching: Matching = "email"
    field_name: str | None = Field(default=None, min_length=1)
    match_column: str = "unique_id"
    resource_id: int | None = None
    skip_triggers: bool = False
    skip_invalid_subscriptions: bool = False
    detect_geo: bool = False
    content: dict[str, Any] | None = None
    profile_fields: dict[str, str] | None = None

    @model_validator(mode="after")
    def _field_name_for_custom(self) -> AltcraftOptions:
        if self.matching == "custom" and not self.field_name:
            raise ValueError("matching 'custom' needs field_name (the Altcraft profile field to match on)")
        if self.matching != "custom" and self.field_name:
            raise ValueError("field_name is only used with matching 'custom'")
        return self

    def describe_target(self) -> str:
        match = self.field_name if self.matching == "custom" else self.matching.replace("_", " ")
        sends = "no campaign sent" if self.skip_triggers else "sends the trigger's campaign"
        where = f", database {self.resource_id}" if self.resource_id is not None else ""
        return f"Altcraft trigger {self.trigger_id} (profiles matched by {match}{where}; {sends})"

    def data_fields(self, columns: list[str]) -> dict[str, str]:
        """Altcraft profile field -> canonical column, for the columns the feed really has."""
        if self.profile_fields is not None:
            fields = dict(self.profile_fields)
        else:
            fields = {name: col for name, col in STANDARD_FIELDS.items() if col in columns}
            fields.update({c: c for c in columns if c not in CANONICAL_FIELDS and c != "source_line"})
        if self.matching == "custom" and self.field_name:
            fields[self.field_name] = self.match_column
        return fields

    def record_spec(self, columns: list[str]) -> dict[str, Any]:
        """The ``encode_records`` spec of one item of ``data``."""
        spec: dict[str, Any] = {}
        if self.matching == "profile_id":
            spec["profile_id"] = self.match_column
        spec["data"] = self.data_fields(columns)
        return spec

    def envelope(self, token: str) -> dict[str, Any]:
        """Every body key except ``data``, in the order of the vendor's examples."""
        body: dict[str, Any] = {"token": token, "matching": self.matching}
        if self.field_name:
            body["field_name"] = self.field_name
        if self.resource_id is not None:
            body["resource_id"] = self.resource_id
        body.update(
            trigger_id=self.trigger_id,
            skip_triggers=self.skip_triggers,
            skip_invalid_subscriptions=self.skip_invalid_subscriptions,
            detect_geo=self.detect_geo,
        )
        if self.content:
            body["content"] = self.content
        return body

    def column_problems(self, columns: list[str]) -> list[tuple[str | None, str]]:
        """Mapped and matching columns must exist; the matching mode needs its Altcraft field."""
        problems: list[tuple[str | None, str]] = []
        for name, column in (self.profile_fields or {}).items():
            if column not in columns:
                problems.append(not_a_column("profile_fields", column, columns, entry=name))
        if self.matching in ("custom", "profile_id") and self.match_column not in columns:
            problems.append(not_a_column("match_column", self.match_column, columns))
        elsewhere = (self.profile_fields or {}).get(self.field_name or "")
        if self.matching == "custom" and elsewhere not in (None, self.match_column):
            problems.append(
                ("profile_fields", f"{self.field_name} is the matching field; it is filled from match_column")
            )
        needs = {"email": "email", "email_profile": "email", "phone": "phones"}.get(self.matching)
        if needs and needs not in self.data_fields(columns):
            problems.append(
                (
                    "matching",
                    f"matching {self.matching!r} needs the Altcraft field {needs!r}; map the feed's "
                    f"{STANDARD_FIELDS[needs]} column (or set it in profile_fields)",
                )
            )
        return problems


@dataclass(frozen=True)
class _Refusal:
    """A batch the vendor answered with ``error != 0``: its rows fail with ``reason``."""

    batch: Batch
    reason: str


@dataclass(frozen=True)
class _TaskStatus:
    vendor_status: str
    progress: float | None = None
    data: Mapping[str, Any] | None = None
    reason: str = ""

    @property
    def state(self) -> JobState:
        return _STATES.get(self.vendor_status, JobState.UNKNOWN)


class AltcraftClient:
    vendor: ClassVar[str] = VENDOR

    def __init__(
        self,
        http: VendorHTTP,
        options: AltcraftOptions,
        token: str,
        *,
        max_profiles: int = MAX_PROFILES,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self.http = http
        self.options = options
        self._token = token
        self.http.add_secrets(token)
        self.max_profiles = max_profiles
        self.max_request_bytes = max_request_bytes
        self.max_in_flight = max_in_flight
        self._final: LastFinal[_TaskStatus] = LastFinal()

    def close(self) -> None:
        self.http.close()

    def batches(self, rows: pd.DataFrame) -> Iterator[Batch]:
        """Request bodies for ``rows``, cut by measured size and profile count (lazily built)."""
        columns = [c for c in rows.columns if c != "source_line"]
        spec = self.options.record_spec(columns)
        head = json.dumps({**self.options.envelope(self._token), "data": []}, separators=(",", ":"))
        head_bytes = head.removesuffix("]}").encode("utf-8")
        return encode_in_slices(
            rows,
            lambda part: encode_records(part, spec, trailing_comma=True),
            head=head_bytes,
            tail=b"]}",
            max_rows=self.max_profiles,
            max_bytes=self.max_request_bytes,
        )

    def submit(
        self, rows: pd.DataFrame, *, feed: str, partition: str, previous: JobHandle | None = None
    ) -> JobHandle:
        """Send every batch (a few at a time); refused batches become failed chunks, not errors.
        ``previous`` is not needed: every push is new tasks."""
        results = send_concurrently(self._send, self.batches(rows), max_in_flight=self.max_in_flight)
        jobs: list[ChunkJob] = []
        refused: dict[str, str] = {}
        for result in results:
            if isinstance(result, _Refusal):
                job_id = f"{REFUSED}-{uuid.uuid4().hex[:16]}"
                refused[job_id] = result.reason
                jobs.append(
                    ChunkJob(
                        job_id=job_id, first_row=result.batch.first_row, row_count=result.batch.row_count
                    )
                )
            else:
                jobs.append(result)
        return JobHandle(
            vendor=VENDOR,
            feed=feed,
            partition=partition,
            jobs=jobs,
            submitted_rows=len(rows),
            extra={
                "trigger_id": self.options.trigger_id,
                "matching": self.options.matching,
                "requests": len(jobs),
                "refused": refused,
            },
        )

    def reconcile(
        self, intent: SubmitIntent, rows: pd.DataFrame, *, previous: JobHandle | None = None
    ) -> Reconciliation:
        """Altcraft cannot say whether a lost submit created tasks: see the module docstring."""
        if self.options.skip_triggers:
            triggers = "skip_triggers is set, so trigger events are not fired again"
        else:
            triggers = (
                f"trigger {self.options.trigger_id} fires again for every resent profile "
                "(skip_triggers is false), so they may get its message twice"
            )
        return cannot_reconcile(
            VENDOR,
            "the document has no way to list tasks (tasks/status needs the task_id of the lost answer); "
            f"a resend matches and updates the same profiles (matching {self.options.matching}), "
            f"but {triggers}",
        )

    def _send(self, batch: Batch) -> ChunkJob | _Refusal:
        response = self.http.request(
            "POST",
            IMPORT_PATH,
            content=batch.body,
            headers={"Content-Type": "application/json"},
            expected=_ENVELOPE_STATUSES,
            idempotent=False,
        )
        body = self._envelope(response)
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(body, dict) and error not in (0, None):
            return _Refusal(batch, f"Altcraft refused the request: {self._error_text(body)}")
        if response.status_code != 200 or not isinstance(body, dict):
            raise self._unexpected(response, "no Altcraft envelope in the answer")
        data = body.get("data") if isinstance(body.get("data"), dict) else {}
        task_id = body.get("task_id") or data.get("task_id")
        if not task_id:
            raise self._unexpected(response, "no task_id in the answer")
        return ChunkJob(job_id=str(task_id), first_row=batch.first_row, row_count=batch.row_count)

    def status(self, handle: JobHandle) -> JobStatus:
        """Combined state of every task; stops at the first wave of polls that finds one running.

        A finished task's status carries its whole per-profile result (the API has no lighter
        call), so while an import runs a sensor tick fetches one wave, not every task.
        """
        polled = self._statuses(handle, stop_when_running=True)
        statuses = [s for s in polled if s is not None]
        states = [s.state for s in statuses]
        combined = combine_states(states)
        if combined.terminal:  # every task was polled: outcome() on this client reuses the answers
            self._final.remember(
                handle, {job.job_id: s for job, s in zip(handle.jobs, polled, strict=True) if s is not None}
            )
        names = [s.vendor_status for s in statuses]
        unknown = sorted({n for n in names if n not in _STATES})
        if combined.terminal:
            vendor_status = next((n for n in (REFUSED, "error") if n in names), "completed")
        elif combined is JobState.UNKNOWN:
            vendor_status = "+".join(unknown)
        else:
            vendor_status = "processing" if combined is JobState.RUNNING else "pending"
        progress = [s.progress for s in statuses if s.progress is not None]
        counts = {name: names.count(name) for name in dict.fromkeys(names)}
        unpolled = len(handle.jobs) - len(statuses)
        return JobStatus(
            state=combined,
            vendor_status=vendor_status,
            progress=sum(progress) / len(progress) if progress else None,
            detail=", ".join(
                [f"{n} {name}" for name, n in counts.items()]
                + ([f"{unpolled} not polled"] if unpolled else [])
            ),
        )

    def outcome(self, handle: JobHandle, *, status: JobStatus | None = None) -> JobOutcome:
        """Per-profile results. They travel only in ``tasks/status``, so a task is read once here
        unless this client's last ``status`` already read it ended; a terminal ``status`` cannot
        spare that read (it holds no per-profile results)."""
        failures: list[RowFailure] = []
        notes: list[str] = []
        counts = {"created": 0, "updated": 0, "processed": 0, "failed": 0}
        tasks = self._statuses(handle, known=self._final.get(handle))
        for job, task in zip(handle.jobs, tasks, strict=True):
            if task is None or not task.state.terminal:
                raise VendorError(
                    VENDOR,
                    "POST",
                    STATUS_PATH,
                    code="not_final",
                    detail=f"task {job.job_id} is {task.vendor_status if task else 'not polled'}",
                )
            failed = _task_failures(job, task, counts, notes)
            counts["failed"] += len(failed)
            failures += failed
        return JobOutcome(
            submitted=handle.submitted_rows, failures=failures, vendor_counts=counts, notes=notes
        )

    def _statuses(
        self,
        handle: JobHandle,
        *,
        stop_when_running: bool = False,
        known: Mapping[str, _TaskStatus] | None = None,
    ) -> list[_TaskStatus | None]:
        """One status per chunk (``None`` where not polled), ``max_in_flight`` polls at a time,
        last chunk first since it is the one most likely still running; refused chunks and the
        ``known`` (already ended) ones need no call.
        """
        refused: dict[str, str] = handle.extra.get("refused") or {}
        found: dict[str, _TaskStatus] = {
            job_id: _TaskStatus(REFUSED, reason=why) for job_id, why in refused.items()
        }
        found.update(known or {})
        to_poll = [job.job_id for job in reversed(handle.jobs) if job.job_id not in found]
        wave = max(1, self.max_in_flight)
        if to_poll:
            with ThreadPoolExecutor(max_workers=min(wave, len(to_poll))) as pool:
                for start in range(0, len(to_poll), wave):
                    ids = to_poll[start : start + wave]
                    found.update(zip(ids, pool.map(self._poll, ids), strict=True))
                    if stop_when_running and any(not found[i].state.terminal for i in ids):
                        break
        return [found.get(job.job_id) for job in handle.jobs]

    def _poll(self, task_id: str) -> _TaskStatus:
        response = self.http.request(
            "POST",
            STATUS_PATH,
            json={"token": self._token, "task_id": task_id},
            expected=_ENVELOPE_STATUSES,
            idempotent=True,
        )
        body = self._envelope(response)
        if isinstance(body, dict) and body.get("error") not in (0, None):
            return _TaskStatus(
                "error", reason=f"Altcraft could not report task {task_id}: {self._error_text(body)}"
            )
        data = body.get("data") if isinstance(body, dict) else None
        if response.status_code != 200 or not isinstance(data, dict):
            raise self._unexpected(response, "no task status in the answer")
        progress = data.get("progress")
        return _TaskStatus(
            vendor_status=str(data.get("status")),
            progress=float(progress) if isinstance(progress, int | float) else None,
            data=data,
        )

    def _envelope(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise self._unexpected(response, "the answer is not JSON") from None

    def _error_text(self, body: Mapping[str, Any]) -> str:
        text = str(body.get("error_text") or "no error text")
        if body.get("error_debug"):
            text += f" ({body['error_debug']})"
        return self.http.redact(f"{text} (error {body.get('error')})")

    def _unexpected(self, response: httpx.Response, detail: str) -> VendorHTTPError:
        return VendorHTTPError(
            VENDOR,
            response.request.method,
            self.http.redact(str(response.request.url)),
            status=response.status_code,
            code="unexpected_response",
            detail=self.http.redact(f"{detail}: {' '.join(response.text.split())[:300]}"),
        )


def _task_failures(
    job: ChunkJob, task: _TaskStatus, counts: dict[str, int], notes: list[str]
) -> list[RowFailure]:
    """Per-row failures of one finished task; ``counts`` gains its created/updated profiles."""
    if task.vendor_status != "completed":
        if task.reason:
            return every_row(job, task.reason)
        result = (task.data or {}).get("result")
        text = result.get("error_text") if isinstance(result, dict) else None
        return every_row(
            job, f"Altcraft task {job.job_id} ended in {task.vendor_status}: {text or 'no error text'}"
        )
    result = (task.data or {}).get("result")
    if not isinstance(result, dict):
        return every_row(job, f"Altcraft task {job.job_id} completed without a result")
    if result.get("error") not in (0, None):
        return every_row(
            job,
            f"Altcraft task {job.job_id} failed: {result.get('error_text') or 'no error text'} "
            f"(error {result.get('error')})",
        )
    items = result.get("result")
    items = items if isinstance(items, list) else []
    if len(items) != job.row_count:
        notes.append(f"Altcraft task {job.job_id}: {len(items)} results for {job.row_count} profiles")
    failures = []
    for i in range(job.row_count):
        item = items[i] if i < len(items) else None
        reason = _item_failure(item)
        if reason is None:
            status = item.get("status") if isinstance(item, dict) else None
            counts["processed"] += 1
            if status in ("created", "updated"):
                counts[status] += 1
        else:
            failures.append(RowFailure(row=job.first_row + i, reason=reason))
    return failures


def _item_failure(item: Any) -> str | None:
    """Why one per-profile result is not an import, or ``None`` when it is."""
    if not isinstance(item, dict):
        return "Altcraft returned no result for this profile"
    error = item.get("error")
    if error not in (0, None, "0"):
        return str(item.get("error_text") or f"Altcraft error {error}")
    if not item.get("profile_id") and item.get("status") not in ("created", "updated"):
        return "Altcraft returned no profile for this row"
    return None


def parse_error(response: httpx.Response) -> tuple[str | None, str]:
    """``parse_error_body`` plus Altcraft's ``error_debug``, the part that says what was wrong."""
    code, message = parse_error_body(response)
    try:
        body = response.json()
    except ValueError:
        return code, message
    if isinstance(body, dict) and body.get("error_debug"):
        message = f"{message} ({body['error_debug']})"
    return code, message


class AltcraftResource(dg.ConfigurableResource):
    """Endpoint, token and request limits of one Altcraft account (``EnvVar`` keeps the token hidden)."""

    base_url: str
    token: str
    timeout_seconds: float = 30.0
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_profiles_per_request: int = MAX_PROFILES
    max_request_bytes: int = MAX_REQUEST_BYTES

    def destination(self, options: dict, retry: RetryPolicy | None = None) -> AltcraftClient:
        http = VendorHTTP(
            VENDOR,
            self.base_url,
            headers={"Accept": "application/json"},
            secrets=[self.token],
            timeout=self.timeout_seconds,
            error_parser=parse_error,
            retry=retry,
        )
        return AltcraftClient(
            http,
            AltcraftOptions.model_validate(options),
            self.token,
            max_profiles=self.max_profiles_per_request,
            max_request_bytes=self.max_request_bytes,
            max_in_flight=self.max_in_flight,
        )

"""Yesmail target lists: members posted as JSON batches, one async ticket per batch.

Protocol choices where the vendor document is vague (the sandbox agrees with each):
- ``POST {base}/v2/target-lists/{list}/members/import`` with ``Api-User``/``Api-Key`` headers and
  ``{"importType", "errorThreshold", "members": [...]}``; 202 names the ticket in
  ``Content-Location`` (``.../v2/tickets/{id}``). It is resolved against the request's URL as
  RFC 9110 says (RFC 3986 reference resolution): an absolute URL is used as is, an absolute path
  (``/v2/tickets/{id}``) replaces the request's path, a relative one resolves against it. So a
  ``base_url`` with a path prefix (a gateway) is never prefixed twice. The handle keeps the
  resolved URL with ``{id}``; without a usable ``Content-Location`` it is the documented
  ``/v2/tickets/{id}`` under ``base_url``. A ticket's ``response.location`` is resolved against
  the ticket's URL the same way.
- A ticket that answers 404 raises a :class:`VendorHTTPError` whose detail names the ticket. The
  status sensor counts a 4xx other than 408/429 as a permanent poll error, keeps the count of
  consecutive ones in its own persisted per-import state (so it survives a client built anew,
  and restarts), and ends the import ``poll_failed`` after the destination's ``max_poll_errors``
  in a row; the report then fails the import's rows with that error as the reason, instead of the
  import being polled until its time limit. The client keeps no count of its own: it may be
  rebuilt between polls and cannot update the handle, and a second count could only disagree
  with the sensor's.
- A member is ``{"id", ...attributes}``: ``id`` is the feed's ``id_field`` column (``email`` by
  default), lower-cased when it is an email (the vendor refuses upper case); attributes are the
  ``attributes`` option (Yesmail attribute name → canonical column); empty cells are left out,
  so ``update`` never blanks a value the HR file just lacks.
- Rows go in batches of at most ``max_members_per_request`` members and ``max_request_bytes``.
  A 413 halves the batch and retries both halves (down to one member), and later batches use
  the smaller size: the vendor's member limit is not published. Batches are sent
  ``max_in_flight`` at a time.
- ``errorThreshold`` travels unchanged in each request, so Yesmail applies it per batch: a count
  N stops a batch at its N-th failure, "P%" when more than P% of a batch failed.
- ``responseRef`` is ``<feed>:<partition>:<first row>`` so a ticket can be traced back; Yesmail
  echoes it as the ticket's ``request.id`` and ``status`` checks it.
- Ticket states ``accepted`` (pending) → ``processing``/``retrying`` (running) → ``completed`` |
  ``failed``. A ticket that ended has ``response.location``, the async results: ``failed`` and
  ``ignored`` entries are 0-based indexes into the batch's ``members``. Ignored members (already
  on the list with ``importType: ignore``) are ``outcome="ignored"``. Members in no list of a
  ``failed`` ticket (stopped by ``errorThreshold``) were not imported: they fail with the ticket's
  message. A ``failed`` ticket without results fails all its rows. ``vendor_counts`` sums the
  results' counts, with ``processed`` = ``completed``.
- A ticket state other than the five above is ``JobState.UNKNOWN``: the import is not final while
  any ticket is in one, and ``vendor_status`` names that word.
- ``outcome`` reuses the tickets this client's last ``status`` read ended (the report's
  ``status`` then ``outcome``); otherwise it reads each ticket once, because its
  ``response.location`` is the only way to the results. A terminal ``status=`` passed to it holds
  no locations, so it cannot spare that read.
- ``destination(options, retry=...)`` applies one :class:`RetryPolicy` to every call (the status
  sensor passes one without 429, so a tick fails at once instead of sleeping for ``Retry-After``).
- A submit whose answer was lost cannot be reconciled: the document has no way to list the
  tickets of a target list (a ticket is read only through the ``Content-Location`` of its 202).
  Sending again is safe: either ``importType`` is an upsert per member, keyed by ``id``;
  ``update`` writes the same values again, ``ignore`` keeps the members the lost request added
  and reports them ``ignored``. No member is added twice.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal
from urllib.parse import quote, urlencode

import dagster as dg
import httpx
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

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
from audience_pipeline.destinations.http import RetryPolicy, VendorError, VendorHTTP, VendorHTTPError
from audience_pipeline.destinations.json_batches import (
    Batch,
    encode_in_slices,
    encode_records,
    is_ascii,
    pack_batches,
    send_concurrently,
)
from audience_pipeline.destinations.options import VendorOptions, not_a_column

VENDOR = "yesmail"
logger = logging.getLogger("audience_pipeline.yesmail")
_STATES = {
    "accepted": JobState.PENDING,
    "processing": JobState.RUNNING,
    "retrying": JobState.RUNNING,
    "completed": JobState.SUCCEEDED,
    "failed": JobState.FAILED,
}
_PERCENT = re.compile(r"^\d+(\.\d+)?%$")
DEFAULT_ATTRIBUTES = {"FIRSTNAME": "first_name", "LASTNAME": "last_name"}
IGNORED_REASON = "already on the target list; importType ignore kept the existing member"


def _state(word: str) -> JobState:
    return _STATES.get(word, JobState.UNKNOWN)


class YesmailOptions(VendorOptions):
    """Feed options for Yesmail; ``id_field`` and ``attributes`` values name canonical columns."""

    target_list: str = Field(min_length=1)
    import_type: Literal["ignore", "update"] = "update"
    error_threshold: int | str = 0
    id_field: str = "email"
    attributes: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_ATTRIBUTES))
    response_uri: str | None = None

    def describe_target(self) -> str:
        return f'Yesmail target list "{self.target_list}"'

    @field_validator("error_threshold")
    @classmethod
    def _threshold(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 0:
                raise ValueError("error_threshold must be 0 (no check), a count, or a percentage like '5%'")
            return value
        text = value.strip()
        if not _PERCENT.match(text) or not 0 < float(text[:-1]) < 100:
            raise ValueError("error_threshold must be a count or a percentage between 0% and 100%, e.g. '5%'")
        return text

    def column_problems(self, columns: list[str]) -> list[tuple[str | None, str]]:
        """Options that name columns the feed does not produce; default attributes may be absent."""
        problems: list[tuple[str | None, str]] = []
        if self.id_field not in columns:
            problems.append(not_a_column("id_field", self.id_field, columns))
        if "attributes" in self.model_fields_set:
            for name, column in self.attributes.items():
                if column not in columns:
                    problems.append(not_a_column("attributes", column, columns, entry=name))
        return problems


class YesmailClient:
    vendor: ClassVar[str] = VENDOR

    def __init__(
        self,
        http: VendorHTTP,
        options: YesmailOptions,
        *,
        max_members_per_request: int = 1000,
        max_request_bytes: int = 10_000_000,
        max_in_flight: int = 4,
    ) -> None:
        self.http = http
        self.options = options
        self.max_in_flight = max_in_flight
        self.max_request_bytes = max_request_bytes
        self._limit = max_members_per_request
        self._limit_lock = threading.Lock()
        self._final: LastFinal[_Ticket] = LastFinal()

    def close(self) -> None:
        self.http.close()

    @property
    def members_per_request(self) -> int:
        """The current batch size: the configured one, or less after the vendor answered 413."""
        return self._limit

    def members(self, rows: pd.DataFrame, *, trailing_comma: bool = False) -> pa.Array:
        """One JSON member per row: the id (lower-cased when it is an email) plus attributes."""
        columns: dict[str, pa.Array | pd.Series] = {
            "id": _lower_emails(pa.array(rows[self.options.id_field], from_pandas=True))
        }
        spec: dict[str, str] = {"id": "id"}
        for name, column in self.options.attributes.items():
            if column in rows.columns:
                columns[f"attr:{name}"] = rows[column]
                spec[name] = f"attr:{name}"
        return encode_records(columns, spec, trailing_comma=trailing_comma)

    def _envelope(self) -> tuple[bytes, bytes]:
        head = json.dumps(
            {"importType": self.options.import_type, "errorThreshold": self.options.error_threshold}
        )
        return head[:-1].encode() + b',"members":[', b"]}"

    def submit(
        self, rows: pd.DataFrame, *, feed: str, partition: str, previous: JobHandle | None = None
    ) -> JobHandle:
        """Post the members in batches, one ticket each (``previous`` is not needed)."""
        head, tail = self._envelope()
        path = f"/v2/target-lists/{quote(self.options.target_list, safe='')}/members/import"
        template: dict[str, str] = {}
        extra_query = {"responseUri": self.options.response_uri} if self.options.response_uri else {}

        def post(batch: Batch) -> list[ChunkJob]:
            if batch.row_count > self._limit:
                return send_all(self._split(batch, head, tail, self._limit))
            # The query string is written here rather than passed as params=: httpx would parse
            # and re-encode the URL once more for each of a million-row feed's thousand requests.
            query = {"responseRef": f"{feed}:{partition}:{batch.first_row}", **extra_query}
            try:
                response = self.http.request(
                    "POST",
                    f"{path}?{urlencode(query, quote_via=quote)}",
                    content=batch.body,
                    headers={"Content-Type": "application/json"},
                    expected=(202,),
                    idempotent=False,
                )
            except VendorHTTPError as exc:
                if exc.status != 413 or batch.row_count == 1:
                    raise
                half = math.ceil(batch.row_count / 2)
                with self._limit_lock:
                    self._limit = min(self._limit, half)
                logger.warning(
                    "%s: 413 for %d members; halving batches to at most %d",
                    VENDOR,
                    batch.row_count,
                    self._limit,
                )
                return send_all(self._split(batch, head, tail, half))
            ticket_id = self._ticket_id(response, template)
            return [ChunkJob(job_id=ticket_id, first_row=batch.first_row, row_count=batch.row_count)]

        def send_all(batches: Iterable[Batch]) -> list[ChunkJob]:
            return [job for batch in batches for job in post(batch)]

        batches = encode_in_slices(
            rows,
            lambda part: self.members(part, trailing_comma=True),
            head=head,
            tail=tail,
            max_rows=self._limit,
            max_bytes=self.max_request_bytes,
        )
        nested = send_concurrently(post, batches, max_in_flight=self.max_in_flight)
        jobs = [job for group in nested for job in group]
        return JobHandle(
            vendor=VENDOR,
            feed=feed,
            partition=partition,
            jobs=jobs,
            submitted_rows=len(rows),
            extra={
                "target_list": self.options.target_list,
                "import_type": self.options.import_type,
                "ticket_url": template.get("url", "/v2/tickets/{id}"),
                "members_per_request": self._limit,
            },
        )

    def reconcile(
        self, intent: SubmitIntent, rows: pd.DataFrame, *, previous: JobHandle | None = None
    ) -> Reconciliation:
        """Yesmail cannot say whether a lost submit created tickets: see the module docstring."""
        if self.options.import_type == "update":
            resend = "importType update upserts each member by id, writing the same values again"
        else:
            resend = "importType ignore keeps members already on the list and reports them ignored"
        return cannot_reconcile(
            VENDOR,
            "the document has no way to list the tickets of a target list (a ticket is known only from "
            f"the 202 answer that was lost); resending is safe: {resend}",
        )

    def _split(self, batch: Batch, head: bytes, tail: bytes, size: int) -> Iterable[Batch]:
        assert batch.records is not None, "batches come from pack_batches, which keeps their rows"
        return pack_batches(
            batch.records,
            head=head,
            tail=tail,
            max_rows=size,
            max_bytes=self.max_request_bytes,
            first_row=batch.first_row,
            trailing_comma=True,
        )

    def _ticket_id(self, response: httpx.Response, template: dict[str, str]) -> str:
        """The ticket's id, and (once per submit) the URL template of its tickets in ``template``.

        ``Content-Location`` is resolved against the request's URL (RFC 9110 §8.7, RFC 3986 §5):
        absolute as is, ``/v2/tickets/x`` replaces the path, so a ``base_url`` with a path prefix
        (a gateway) never gets the prefix twice.
        """
        location = response.headers.get("Content-Location", "")
        resolved = response.request.url.join(location) if location else None
        path = resolved.path if resolved is not None else ""
        ticket_id = path.rstrip("/").rsplit("/", 1)[-1] if "/tickets/" in path else ""
        if not ticket_id:
            body = response.json() if response.content else {}
            ticket_id = str(body.get("id") or "") if isinstance(body, dict) else ""
        if not ticket_id:
            raise VendorError(
                VENDOR, "POST", "members/import", code="unexpected_response", detail="no ticket"
            )
        if resolved is not None and "/tickets/" in path and "url" not in template:
            url = str(resolved.copy_with(query=None, fragment=None))
            at = url.rfind(ticket_id)
            if at >= 0:  # else (an id that needs escaping) the documented path, under base_url
                template["url"] = url[:at] + "{id}" + url[at + len(ticket_id) :]
        return ticket_id

    def _ticket(self, handle: JobHandle, job: ChunkJob) -> _Ticket:
        """One ticket and the URL it was read from (its results location is relative to that).

        A 404 raises :class:`VendorHTTPError` naming the ticket: the status sensor counts it as
        a permanent poll error (see the module docstring).
        """
        url = str(handle.extra.get("ticket_url", "/v2/tickets/{id}")).replace("{id}", job.job_id)
        try:
            response = self.http.request("GET", url)
        except VendorHTTPError as exc:
            if exc.status != 404:
                raise
            raise VendorHTTPError(
                VENDOR,
                exc.method,
                exc.url,
                status=404,
                code=exc.code,
                detail=f"ticket {job.job_id} not found: {exc.detail or 'no detail given'}",
                attempts=exc.attempts,
            ) from None
        try:
            ticket = response.json()
        except ValueError:
            ticket = None
        if not isinstance(ticket, dict):
            raise VendorError(
                VENDOR, "GET", url, code="unexpected_response", detail="ticket is not an object"
            )
        ref = (ticket.get("request") or {}).get("id")
        expected = f"{handle.feed}:{handle.partition}:{job.first_row}"
        if ref is not None and ref != expected:
            raise VendorError(
                VENDOR, "GET", url, code="ticket_mismatch", detail=f"ticket {job.job_id} belongs to {ref}"
            )
        return _Ticket(ticket, response.request.url)

    def _map(self, handle: JobHandle, fn, jobs: list[ChunkJob]) -> list:
        if len(jobs) == 1:
            return [fn(handle, jobs[0])]
        with ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="yesmail-poll") as pool:
            return list(pool.map(lambda job: fn(handle, job), jobs))

    def status(self, handle: JobHandle) -> JobStatus:
        """Polls tickets a window at a time and stops at a window with one still running."""
        states: list[str] = []
        read: dict[str, _Ticket] = {}
        window = self.max_in_flight * 2
        for start in range(0, len(handle.jobs), window):
            jobs = handle.jobs[start : start + window]
            tickets = self._map(handle, self._ticket, jobs)
            read.update(zip((job.job_id for job in jobs), tickets, strict=True))
            states += [str(t.body.get("state")) for t in tickets]
            if not all(_state(s).terminal for s in states[-len(tickets) :]):
                break
        known = [_state(s) for s in states]
        known += [JobState.PENDING] * (len(handle.jobs) - len(states))
        state = combine_states(known)
        if state.terminal:  # every ticket was read: outcome() on this client reuses them
            self._final.remember(handle, read)
        unknown = sorted({s for s in states if s not in _STATES})
        if state is JobState.SUCCEEDED:
            vendor_status = "completed"
        elif state is JobState.FAILED:
            vendor_status = "failed"
        elif unknown:
            vendor_status = "+".join(unknown)
        else:
            vendor_status = next((s for s in states if not _state(s).terminal), "accepted")
        done = sum(s.terminal for s in known)
        detail = f"{done}/{len(known)} tickets ended"
        if unknown:
            detail += f"; ticket states this client does not know: {', '.join(unknown)}"
        return JobStatus(
            state=state, vendor_status=vendor_status, progress=100 * done / len(known), detail=detail
        )

    def _results(
        self, handle: JobHandle, job: ChunkJob, seen: dict[str, _Ticket]
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        ticket = seen.get(job.job_id) or self._ticket(handle, job)
        location = (ticket.body.get("response") or {}).get("location")
        results = self.http.json("GET", ticket.url.join(str(location))) if location else None
        return ticket.body, results

    def outcome(self, handle: JobHandle, *, status: JobStatus | None = None) -> JobOutcome:
        """Per-member results of every ticket. A ticket is read again only when this client's
        last ``status`` did not read it ended: its ``response.location`` is the only way to the
        results, so a terminal ``status`` (which holds no locations) cannot spare that read."""
        failures: list[RowFailure] = []
        notes: list[str] = []
        counts = {"requested": 0, "total": 0, "completed": 0, "failed": 0, "ignored": 0}
        seen = self._final.get(handle)
        results_of = self._map(handle, lambda h, job: self._results(h, job, seen), handle.jobs)
        for job, (ticket, results) in zip(handle.jobs, results_of, strict=True):
            job_failures, job_notes = _job_failures(job, ticket, results)
            failures += job_failures
            notes += job_notes
            for key in counts:
                counts[key] += int(((results or {}).get("counts") or {}).get(key) or 0)
        counts["processed"] = counts["completed"]
        failures.sort(key=lambda f: f.row)
        return JobOutcome(
            submitted=handle.submitted_rows, failures=failures, vendor_counts=counts, notes=notes
        )


@dataclass(frozen=True)
class _Ticket:
    """A ticket's JSON and the absolute URL it came from (relative locations resolve against it)."""

    body: dict[str, Any]
    url: httpx.URL


def _job_failures(
    job: ChunkJob, ticket: dict[str, Any], results: dict[str, Any] | None
) -> tuple[list[RowFailure], list[str]]:
    """One ticket's rows that were not imported, by position in the submitted frame."""
    state = str(ticket.get("state"))
    message = str(ticket.get("message") or "").strip()
    if results is None:
        if state == "completed":
            return [], [f"ticket {job.job_id} completed without async results"]
        reason = f"Yesmail ticket {state}: {message or 'no details'}"
        return every_row(job, reason), []
    notes: list[str] = []
    decided: dict[int, RowFailure] = {}
    completed: set[int] = set()

    def index_of(entry: Any, kind: str) -> int | None:
        index = entry.get("index") if isinstance(entry, dict) else None
        if isinstance(index, int) and 0 <= index < job.row_count:
            return index
        notes.append(f"ticket {job.job_id}: {kind} entry {entry!r} is outside the batch")
        return None

    for entry in results.get("completed") or []:
        if (index := index_of(entry, "completed")) is not None:
            completed.add(index)
    for entry in results.get("ignored") or []:
        if (index := index_of(entry, "ignored")) is not None:
            decided[index] = RowFailure(row=job.first_row + index, reason=IGNORED_REASON, outcome="ignored")
    for entry in results.get("failed") or []:
        if (index := index_of(entry, "failed")) is not None:
            reason = str(entry.get("message") or "failed at Yesmail")
            decided[index] = RowFailure(row=job.first_row + index, reason=reason)
    if state == "failed":
        reason = f"not imported: Yesmail stopped this batch ({message or 'ticket failed'})"
        for index in range(job.row_count):
            if index not in decided and index not in completed:
                decided[index] = RowFailure(row=job.first_row + index, reason=reason)
    else:
        unreported = job.row_count - len(completed | set(decided))
        if unreported:
            notes.append(
                f"ticket {job.job_id}: {unreported} member(s) in no result list were counted as imported"
            )
    return list(decided.values()), notes


def _lower_emails(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Ids with the emails among them lower-cased. Normalisation has usually lower-cased the
    email column already, so the per-row "@" test (the costly part) runs only when lowering
    changes something."""
    ids = ids.cast(pa.large_string())
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    lowered = pc.ascii_lower(ids) if is_ascii(ids) else pc.utf8_lower(ids)
    if lowered.equals(ids):
        return ids
    return pc.if_else(pc.fill_null(pc.match_substring(ids, "@"), False), lowered, ids)


class YesmailResource(dg.ConfigurableResource):
    """Credentials and limits of one Yesmail account (``EnvVar`` keeps the credentials hidden)."""

    base_url: str = "https://api.yesmail.com"
    api_user: str
    api_key: str
    timeout_seconds: float = 30.0
    max_in_flight: int = 4
    max_members_per_request: int = 1000
    max_request_bytes: int = 10_000_000

    def destination(self, options: dict, retry: RetryPolicy | None = None) -> YesmailClient:
        http = VendorHTTP(
            VENDOR,
            self.base_url,
            headers={"Api-User": self.api_user, "Api-Key": self.api_key, "Accept": "application/json"},
            timeout=self.timeout_seconds,
            retry=retry,
        )
        return YesmailClient(
            http,
            YesmailOptions.model_validate(options),
            max_members_per_request=self.max_members_per_request,
            max_request_bytes=self.max_request_bytes,
            max_in_flight=self.max_in_flight,
        )

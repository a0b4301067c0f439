"""Yesmail target-list member import (v2), emulated in memory.

Paths (under the vendor prefix ``/yesmail``):

- ``POST /v2/target-lists/{listname}/members/import[?responseRef=..&responseUri=..]``
  ``{"importType", "errorThreshold"?, "members": [{"id", ...attributes}]}`` → 202 with the
  ticket and ``Content-Location: <base>/v2/tickets/{id}`` (absolute, as the document shows)
- ``GET  /v2/tickets/{id}`` → the ticket; ``GET /v2/async-results/{id}`` → per-member results
- ``GET  /v2/target-lists/{listname}`` → ``{name, memberCount}`` with an ``ETag``

Every request needs the ``Api-User`` and ``Api-Key`` headers (401 otherwise); errors are
``{"error": {"code", "message"}}``. Control routes (no credentials) under ``/_sandbox/yesmail``:
``PUT /target-lists/{listname}`` ``{"members": [ids], "archived": false}`` creates a list or
replaces it (tests seed members this way); ``POST /retrying`` ``{"times": n}`` sends the next
``n`` tickets through a ``retrying`` phase; ``GET /tickets`` lists every ticket with the member
ids it carried (what Yesmail received).

Interpretation of the vendor's silences (the client is written against these):

- Lists exist beforehand (``SandboxSettings.yesmail_target_lists``); an unknown or archived list
  is 404. ``If-Match`` that differs from the list's current ``ETag`` is 409; the ETag changes
  whenever a ticket changes the list's members.
- A request with more than ``yesmail_max_members`` members is 413 (no ticket); a body larger
  than ``max_upload_bytes`` is 413 too. Malformed JSON, a missing ``members`` array or a bad
  ``importType``/``errorThreshold`` is 400. To keep ingest cheap, members are counted with a
  byte scan (every member object has a ``{``) and the envelope keys are read from the text
  before ``"members"``; the body is parsed up front only when that cannot decide, else when the
  ticket is first read after it ended (a body that only then proves malformed fails the ticket).
- Ticket timeline, one ``pace_seconds`` per step: ``accepted`` → ``processing`` ("start
  importing job") → ``processing`` ("Async Results resource created") [→ ``retrying`` →
  ``processing``] → ``completed`` | ``failed``. ``request.id`` echoes ``responseRef`` (null
  without one), ``request.user`` the Api-User header, ``request.uri`` the request URI.
- Members are checked in order; the first rule that applies decides: no ``id`` → failed;
  an email id with upper-case letters → failed ("must be in lower case"); an unknown subscriber
  → failed; ``SANDBOX_FAIL:<text>`` in any attribute → failed with ``<text>`` (test hook);
  already on the list → ``ignored`` for ``importType: ignore``, else completed (attributes
  merged); otherwise completed and added. **Unknown subscribers**: an email whose domain ends in
  a reserved TLD (``.invalid``, ``.test``, ``.localhost``, ``.example``, RFC 2606) or whose local
  part starts with ``unknown``; a non-email id starting with ``unknown``. Everyone else is taken
  to be a subscriber already, so the demo data is mostly known.
- ``errorThreshold``: an integer ``N > 0`` stops the ticket when the N-th member fails; ``"P%"``
  stops it as soon as failures exceed P% of the request's members; 0 (default) never stops.
  A stopped ticket ends ``failed`` but still has ``response.location``: members before the stop
  keep their results, the rest are in no list and counted in ``counts.requested`` (members not
  processed); ``total`` is every member of the request.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from json import JSONDecodeError
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from audience_pipeline.sandbox.auth import same_secret
from audience_pipeline.sandbox.faults import error_response
from audience_pipeline.sandbox.rows import UNDELIVERABLE_TLDS, sandbox_failure
from audience_pipeline.sandbox.timestamps import iso_millis

if TYPE_CHECKING:
    from audience_pipeline.sandbox.app import SandboxSettings

USER_HEADER = "Api-User"
KEY_HEADER = "Api-Key"
UNKNOWN_TLDS = UNDELIVERABLE_TLDS | {"example"}
"""Every RFC 2606 TLD: Yesmail knows no subscriber there (a reason of its own, not a bounce)."""
IMPORT_TYPES = ("ignore", "update")
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_MEMBERS_RE = re.compile(rb'"members"\s*:\s*\[')
_IMPORT_TYPE_RE = re.compile(rb'"importType"\s*:\s*"([a-z]+)"')
_THRESHOLD_RE = re.compile(rb'"errorThreshold"\s*:\s*(-?\d+|"[^"\\]*"|[^,}\s]+)')
Handler = Callable[[Request], Awaitable[Response]]


class YesmailError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def parse_threshold(value: Any) -> tuple[str, float]:
    """``("count", N)`` or ``("percent", P)``; raises ``ValueError`` with a message fit for a 400."""
    if value is None:
        return "count", 0
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return "count", value
    if isinstance(value, str):
        match = _PERCENT_RE.match(value)
        if match and 0 < float(match.group(1)) < 100:
            return "percent", float(match.group(1))
    raise ValueError('errorThreshold must be a non-negative integer or a quoted percentage like "5%"')


def member_error(member: Any) -> str | None:
    """Why a member cannot be imported regardless of the list, or ``None``."""
    if not isinstance(member, dict):
        return "Member must be a JSON object"
    member_id = member.get("id")
    if not isinstance(member_id, str) or not member_id.strip():
        return "Member has no id"
    if "@" in member_id:
        if member_id != member_id.lower():
            return f"Email id '{member_id}' must be in lower case"
        local, _, domain = member_id.rpartition("@")
        if domain.rsplit(".", 1)[-1] in UNKNOWN_TLDS or local.startswith("unknown"):
            return f"Subscriber '{member_id}' does not exist"
    elif member_id.lower().startswith("unknown"):
        return f"Subscriber '{member_id}' does not exist"
    return sandbox_failure(member.values())


@dataclass
class TargetList:
    name: str
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    archived: bool = False
    version: int = 1

    @property
    def etag(self) -> str:
        return f'"{self.name}-{self.version}"'


@dataclass
class Results:
    completed: list[int] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    ignored: list[int] = field(default_factory=list)
    stopped: str | None = None
    fatal: str | None = None


def _member_ids(members: Any) -> list[Any]:
    return [m.get("id") for m in members if isinstance(m, dict)] if isinstance(members, list) else []


def _received_ids(ticket: Ticket) -> list[Any]:
    """A ticket's member ids: kept once it ran, else read from its body (caller holds the lock)."""
    if ticket.results is not None:
        return ticket.member_ids
    try:
        return _member_ids(json.loads(ticket.body).get("members"))
    except (JSONDecodeError, UnicodeDecodeError, AttributeError):
        return []


@dataclass
class Ticket:
    """One import request; its state is derived from elapsed time, its members checked lazily."""

    id: str
    results_id: str
    list_name: str
    body: bytes
    import_type: str
    threshold: tuple[str, float]
    ref: str | None
    user: str
    uri: str
    base_url: str
    pace: float
    retrying: bool
    created: float = field(default_factory=time.monotonic)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    results: Results | None = None
    total: int = 0
    done_at: datetime | None = None
    member_ids: list[Any] = field(default_factory=list)
    """The ids the request carried, kept once the body is dropped (``GET /_sandbox/yesmail/tickets``)."""

    def steps(self) -> list[tuple[str, str]]:
        steps = [("accepted", "Accepted"), ("processing", " start importing job ...."),
                 ("processing", "Async Results resource created")]  # fmt: skip
        if self.retrying:
            steps += [("retrying", "Temporary failure writing members, retrying"), ("processing", "resumed")]
        return steps

    def due_steps(self, now: float) -> int:
        """How many timeline steps have happened; the terminal one is ``len(steps())``."""
        return min(
            int((now - self.created) / self.pace) + 1 if self.pace > 0 else 10**9, len(self.steps()) + 1
        )

    def final(self) -> tuple[str, str]:
        assert self.results is not None
        if self.results.fatal:
            return "failed", self.results.fatal
        if self.results.stopped:
            return "failed", self.results.stopped
        return "completed", "finished importing job"

    def view(self, now: float) -> dict[str, Any]:
        steps = self.steps()
        shown = self.due_steps(now)
        events = [
            {
                "state": state,
                "message": message,
                "time": iso_millis(self.created_at + timedelta(seconds=i * self.pace)),
            }
            for i, (state, message) in enumerate(steps[:shown])
        ]
        response = None
        if shown > len(steps):
            state, message = self.final()
            end = self.created_at + timedelta(seconds=len(steps) * self.pace)
            events.append({"state": state, "message": message, "time": iso_millis(end)})
            if self.results is not None and not self.results.fatal:
                response = {"location": f"{self.base_url}/v2/async-results/{self.results_id}"}
        return {
            "state": events[-1]["state"],
            "message": events[-1]["message"],
            "request": {
                "id": self.ref,
                "user": self.user,
                "time": iso_millis(self.created_at),
                "uri": self.uri,
            },
            "events": events,
            "lastUpdate": events[-1]["time"],
            "id": self.id,
            "response": response,
        }

    def results_view(self) -> dict[str, Any]:
        results = self.results
        assert results is not None
        when = iso_millis(self.done_at or self.created_at)
        processed = len(results.completed) + len(results.failed) + len(results.ignored)
        return {
            "id": self.results_id,
            "lastUpdated": when,
            "counts": {
                "requested": self.total - processed,
                "total": self.total,
                "completed": len(results.completed),
                "ignored": len(results.ignored),
                "failed": len(results.failed),
            },
            "completed": [{"index": i, "time": when} for i in results.completed],
            "failed": [{"index": i, "time": when, "message": m} for i, m in results.failed],
            "ignored": [{"index": i} for i in results.ignored],
        }


def run_members(
    members: list[Any], target: TargetList, import_type: str, threshold: tuple[str, float]
) -> Results:
    """Apply one request's members to ``target`` in order; I/O-free so the rules test directly."""
    results = Results()
    kind, limit = threshold
    total = len(members)
    for index, member in enumerate(members):
        error = member_error(member)
        if error is not None:
            results.failed.append((index, error))
            failed = len(results.failed)
            if limit and (failed >= limit if kind == "count" else failed * 100 > limit * total):
                shown = f"{int(limit)}" if kind == "count" else f"{limit:g}%"
                results.stopped = (
                    f"errorThreshold {shown} reached after {index + 1} of {total} members; import stopped"
                )
                return results
            continue
        attributes = {k: v for k, v in member.items() if k != "id"}
        existing = target.members.get(member["id"])
        if existing is not None and import_type == "ignore":
            results.ignored.append(index)
            continue
        if existing is None:
            target.members[member["id"]] = attributes
        else:
            existing.update(attributes)
        target.version += 1
        results.completed.append(index)
    return results


class YesmailVendor:
    """The Yesmail emulation: lists, tickets and results in memory behind one lock."""

    name = "yesmail"
    prefix = "/yesmail"

    def __init__(self, settings: SandboxSettings) -> None:
        self._user = settings.yesmail_api_user
        self._key = settings.yesmail_api_key
        self._pace = settings.pace_seconds
        self._max_bytes = settings.max_upload_bytes
        self._max_members = settings.yesmail_max_members
        self._default_lists = tuple(settings.yesmail_target_lists)
        self._lock = threading.Lock()
        self._lists: dict[str, TargetList] = {}
        self._tickets: dict[str, Ticket] = {}
        self._results: dict[str, Ticket] = {}
        self._retrying = 0
        self.reset()

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v2/target-lists/{listname}/members/import", self._wrap(self._import), methods=["POST"]),
            Route("/v2/target-lists/{listname}", self._wrap(self._get_list), methods=["GET"]),
            Route("/v2/tickets/{ticket_id}", self._wrap(self._ticket), methods=["GET"]),
            Route("/v2/async-results/{results_id}", self._wrap(self._async_results), methods=["GET"]),
        ]

    def control_routes(self) -> list[BaseRoute]:
        return [
            Route("/target-lists/{listname}", self._put_list, methods=["PUT"]),
            Route("/retrying", self._set_retrying, methods=["POST"]),
            Route("/tickets", self._list_tickets, methods=["GET"]),
        ]

    def demo_env(self, base_url: str) -> dict[str, str]:
        return {"YESMAIL_BASE_URL": base_url, "YESMAIL_API_USER": self._user, "YESMAIL_API_KEY": self._key}

    def reset(self) -> None:
        with self._lock:
            self._lists = {name: TargetList(name) for name in self._default_lists}
            self._tickets.clear()
            self._results.clear()
            self._retrying = 0

    def _wrap(self, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                user = request.headers.get(USER_HEADER, "")
                key = request.headers.get(KEY_HEADER, "")
                user_ok = same_secret(user, self._user)
                if not (same_secret(key, self._key) and user_ok):
                    raise YesmailError(401, "unauthorized", "Invalid Api-User and/or Api-Key header value")
                return await handler(request)
            except YesmailError as exc:
                return error_response(exc.status, exc.code, exc.message)

        return endpoint

    def _list(self, name: str) -> TargetList:
        target = self._lists.get(name)
        if target is None or target.archived:
            raise YesmailError(404, "not_found", f'Target list "{name}" does not exist or has been archived')
        return target

    async def _get_list(self, request: Request) -> Response:
        with self._lock:
            self._settle(request.path_params["listname"])
            target = self._list(request.path_params["listname"])
            body = {"name": target.name, "memberCount": len(target.members)}
            etag = target.etag
        return JSONResponse(body, headers={"ETag": etag})

    async def _import(self, request: Request) -> Response:
        name = request.path_params["listname"]
        with self._lock:
            self._list(name)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise YesmailError(413, "too_large", f"Request exceeds {self._max_bytes} bytes")
        body = await request.body()
        if len(body) > self._max_bytes:
            raise YesmailError(413, "too_large", f"Request exceeds {self._max_bytes} bytes")
        import_type, threshold = self._envelope(body)
        with self._lock:
            target = self._list(name)
            if_match = request.headers.get("If-Match")
            if if_match is not None and if_match.strip() not in ("*", target.etag):
                self._settle(name)
                if if_match.strip() != target.etag:
                    raise YesmailError(
                        409, "conflict", "If-Match does not match the target list's current ETag"
                    )
            retrying = self._retrying > 0
            self._retrying -= int(retrying)
            ticket = Ticket(
                id=uuid.uuid4().hex[:24],
                results_id=uuid.uuid4().hex[:24],
                list_name=name,
                body=body,
                import_type=import_type,
                threshold=threshold,
                ref=request.query_params.get("responseRef"),
                user=request.headers.get(USER_HEADER, ""),
                uri=str(request.url),
                base_url=str(request.url.replace(path=self.prefix, query="")).rstrip("/"),
                pace=self._pace,
                retrying=retrying,
            )
            self._tickets[ticket.id] = ticket
            self._results[ticket.results_id] = ticket
            view = ticket.view(time.monotonic())
        location = f"{ticket.base_url}/v2/tickets/{ticket.id}"
        return JSONResponse(view, status_code=202, headers={"Content-Location": location})

    def _envelope(self, body: bytes) -> tuple[str, tuple[str, float]]:
        """``importType`` and threshold, parsing the whole body only when a byte scan cannot tell.

        Every member object has a ``{``, so ``count("{") - 1`` bounds the member count from above;
        envelope keys written before ``"members"`` (as every client does) are read from that
        prefix. Otherwise, or over the bound, the body is parsed to decide exactly.
        """
        members_at = _MEMBERS_RE.search(body)
        head = body[: members_at.start()] if members_at else b""
        found = _IMPORT_TYPE_RE.search(head)
        if (
            members_at
            and found
            and body.count(b"{") - 1 <= self._max_members
            and body.rstrip().endswith(b"}")
        ):
            threshold = _THRESHOLD_RE.search(head)
            return self._checked(found.group(1).decode(), threshold.group(1) if threshold else None)
        try:
            payload = json.loads(body)
        except (JSONDecodeError, UnicodeDecodeError) as exc:
            raise YesmailError(400, "bad_request", f"Malformed JSON: {exc}") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("members"), list):
            raise YesmailError(400, "bad_request", "Body must be an object with a members array")
        if len(payload["members"]) > self._max_members:
            raise YesmailError(
                413,
                "too_many_members",
                f"{len(payload['members'])} members exceed the maximum of {self._max_members} per request",
            )
        return self._checked(payload.get("importType"), payload.get("errorThreshold"), parsed=True)

    @staticmethod
    def _checked(import_type: Any, threshold: Any, *, parsed: bool = False) -> tuple[str, tuple[str, float]]:
        if import_type not in IMPORT_TYPES:
            raise YesmailError(400, "bad_request", "importType is required: ignore or update")
        if not parsed and isinstance(threshold, bytes):
            try:
                threshold = json.loads(threshold)
            except (JSONDecodeError, UnicodeDecodeError):
                threshold = threshold.decode(errors="replace")
        try:
            return import_type, parse_threshold(threshold)
        except ValueError as exc:
            raise YesmailError(400, "bad_request", str(exc)) from None

    async def _ticket(self, request: Request) -> Response:
        with self._lock:
            ticket = self._tickets.get(request.path_params["ticket_id"])
            if ticket is None:
                raise YesmailError(404, "not_found", f"Ticket {request.path_params['ticket_id']} not found")
            now = time.monotonic()
            if ticket.due_steps(now) > len(ticket.steps()):
                self._settle(ticket.list_name, upto=ticket)
            view = ticket.view(now)
        return JSONResponse(view)

    async def _async_results(self, request: Request) -> Response:
        with self._lock:
            ticket = self._results.get(request.path_params["results_id"])
            if ticket is None or ticket.due_steps(time.monotonic()) <= len(ticket.steps()):
                raise YesmailError(
                    404, "not_found", f"Async results {request.path_params['results_id']} not found"
                )
            self._settle(ticket.list_name, upto=ticket)
            if ticket.results is None or ticket.results.fatal:
                raise YesmailError(
                    404, "not_found", f"Async results {request.path_params['results_id']} not found"
                )
            body = ticket.results_view()
        return JSONResponse(body)

    def _settle(self, list_name: str, upto: Ticket | None = None) -> None:
        """Run every ended, unprocessed ticket of a list in arrival order (caller holds the lock),
        so results do not depend on the order tickets are read."""
        now = time.monotonic()
        target = self._lists.get(list_name)
        for ticket in self._tickets.values():
            if ticket.list_name != list_name or ticket.results is not None:
                continue
            if ticket.due_steps(now) <= len(ticket.steps()) and ticket is not upto:
                continue
            try:
                members = json.loads(ticket.body)["members"]
            except (JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                members, fatal = [], f"Malformed request body: {exc}"
            else:
                fatal = None if isinstance(members, list) else "members must be an array"
            ticket.total = len(members) if fatal is None else 0
            ticket.member_ids = _member_ids(members) if fatal is None else []
            if fatal is not None:
                ticket.results = Results(fatal=fatal)
            elif target is None:
                ticket.results = Results(fatal=f'Target list "{list_name}" was removed')
            else:
                ticket.results = run_members(members, target, ticket.import_type, ticket.threshold)
            ticket.done_at = datetime.now(UTC)
            ticket.body = b""

    async def _put_list(self, request: Request) -> Response:
        try:
            payload = await request.json() if await request.body() else {}
        except (JSONDecodeError, UnicodeDecodeError):
            payload = None
        members = payload.get("members", []) if isinstance(payload, dict) else None
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            return error_response(400, "invalid_request", 'Body must be like {"members": ["id", ...]}')
        name = request.path_params["listname"]
        with self._lock:
            target = TargetList(name, {m: {} for m in members}, archived=bool(payload.get("archived", False)))
            self._lists[name] = target
        return JSONResponse({"ok": True, "name": name, "memberCount": len(members)})

    async def _list_tickets(self, request: Request) -> Response:
        """Every ticket in arrival order with the member ids it carried: what Yesmail received."""
        with self._lock:
            tickets = list(self._tickets.values())
            out = [{"ticket_id": t.id, "list": t.list_name, "members": _received_ids(t)} for t in tickets]
        return JSONResponse({"tickets": out})

    async def _set_retrying(self, request: Request) -> Response:
        try:
            payload = await request.json() if await request.body() else {}
        except (JSONDecodeError, UnicodeDecodeError):
            payload = None
        times = payload.get("times", 1) if isinstance(payload, dict) else None
        if not isinstance(times, int) or isinstance(times, bool) or times < 0:
            return error_response(400, "invalid_request", 'Body must be like {"times": 1}')
        with self._lock:
            self._retrying = times
        return JSONResponse({"ok": True, "times": times})

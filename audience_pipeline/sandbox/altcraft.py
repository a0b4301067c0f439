"""Altcraft bulk profile import + trigger launch, emulated in memory.

Paths (under the vendor prefix ``/altcraft``), both ``POST`` with a JSON body carrying ``token``:

- ``/api/v1.1/campaigns/triggers/import_and_start_batch_task`` → ``{"error": 0, "error_text":
  "Successful operation", "task_id": "..."}`` (``task_id`` at the top level, as the vendor's
  example shows; ``data`` carries it too, so both readings of the envelope work)
- ``/api/v1.1/tasks/status`` with ``task_id`` → ``{"data": {"status", "progress", "result"},
  "error": 0, "error_text": "Successful operation"}``

Control routes (no token) under ``/_sandbox/altcraft``: ``POST /triggers/{id}`` with
``{"active": false}`` deactivates a trigger campaign (all are active by default); ``POST
/fail-tasks`` with ``{"times": 1, "error_text": "..."}`` makes the next accepted tasks end in
``error``; ``GET /tasks`` and ``GET /profiles`` show what was received and stored.

Interpretation of the vendor's silences (the client in ``destinations/altcraft.py`` agrees):

- Every answer is the envelope ``{error, error_text}`` (+ ``data``), ``error: 0`` on success.
  A request that cannot be read is HTTP 400 with ``error: 400``, ``error_text: "Invalid request"``
  and an ``error_debug``: a body over 10 MiB (``http: request body too large``, the vendor's
  documented answer), more than 10,000 profiles, bad JSON, a missing ``trigger_id`` or ``data``,
  an unknown ``matching`` or ``custom`` without ``field_name``. A wrong or missing token is HTTP
  401 with ``error: 401``; the token is never echoed. A request that was read but refused (an
  inactive trigger campaign, an unknown task id) is HTTP 200 with ``error != 0``, which is why
  the client must read ``error`` and never trust the HTTP status alone.
- A task is ``pending`` for ``pace_seconds``, then ``processing`` (progress = profiles done) for
  at least another ``pace_seconds`` and until every profile is applied, then ``completed``
  (progress 100) or ``error`` (a fault injected through ``/fail-tasks``: nothing is applied and
  ``result`` is ``{"error": 500, "error_text": ...}``).
- ``completed`` carries ``result: {"error": 0, "error_text": "", "result": [...]}`` with one item
  per submitted profile, in submission order: ``{"error": 0, "error_text": "", "profile_id",
  "status": "created" | "updated"}`` or ``{"error": 400, "error_text": reason}``. Reasons, first
  that applies: no ``data`` object, ``SANDBOX_FAIL:<text>`` in any value (a test hook), the
  matching value is missing, ``profile_id`` matching names an unknown profile, an invalid email,
  an email on a reserved never-deliverable TLD (.invalid, .test, .localhost), a phone that is not
  E.164.
- Matching (the profile store decides created vs updated): ``email`` finds a profile by its
  ``email`` field or any subscription email; ``email_profile`` by the ``email`` field only;
  ``phone`` by ``phones``; ``custom`` by the ``field_name`` field; ``profile_id`` by the item's
  ``profile_id`` and never creates. The matching value comes from the profile ``data`` (the item's
  ``profile_id`` for ``profile_id``). An update merges the new fields into the profile.
- Unless ``skip_triggers`` is true, every imported profile launches the trigger once (counted in
  ``GET /_sandbox/altcraft/tasks``).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from audience_pipeline.sandbox.auth import same_secret
from audience_pipeline.sandbox.rows import INVALID_EMAIL, email_problem, is_e164, sandbox_failure

if TYPE_CHECKING:
    from audience_pipeline.sandbox.app import SandboxSettings

IMPORT_PATH = "/api/v1.1/campaigns/triggers/import_and_start_batch_task"
STATUS_PATH = "/api/v1.1/tasks/status"
MAX_BODY_BYTES = 10 * 1024 * 1024
MAX_PROFILES = 10_000
MATCHING_MODES = ("email", "email_profile", "phone", "profile_id", "custom")
_DRAIN_LIMIT = 64 * 1024 * 1024
"""How much of an oversized body is read (and dropped) so the client sees the answer, not a reset."""


class AltcraftError(Exception):
    """An error answer in Altcraft's envelope; raised in a handler, rendered by the wrapper."""

    def __init__(self, http_status: int, error: int, error_text: str, debug: str | None = None) -> None:
        super().__init__(error_text)
        self.http_status = http_status
        self.error = error
        self.error_text = error_text
        self.debug = debug

    def response(self) -> Response:
        body: dict[str, Any] = {"error": self.error, "error_text": self.error_text, "data": None}
        if self.debug:
            body["error_debug"] = self.debug
        return JSONResponse(body, status_code=self.http_status)


def _invalid(debug: str) -> AltcraftError:
    return AltcraftError(400, 400, "Invalid request", debug)


def _ok(data: Any = None, **extra: Any) -> Response:
    return JSONResponse({"data": data, "error": 0, "error_text": "Successful operation", **extra})


@dataclass(frozen=True)
class ImportRequest:
    """The parts of a batch task body the emulation acts on."""

    trigger_id: int
    matching: str
    field_name: str | None
    skip_triggers: bool
    items: list[Any]


class ProfileStore:
    """Profiles by id with the indexes each matching mode needs; callers hold ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.profiles: dict[str, dict[str, Any]] = {}
        self._by_email: dict[str, str] = {}
        self._by_subscription_email: dict[str, str] = {}
        self._by_phone: dict[str, str] = {}
        self._by_field: dict[tuple[str, str], str] = {}

    def clear(self) -> None:
        with self.lock:
            self.profiles.clear()
            self._by_email.clear()
            self._by_subscription_email.clear()
            self._by_phone.clear()
            self._by_field.clear()

    def find(self, matching: str, value: str, field_name: str | None) -> str | None:
        if matching == "profile_id":
            return value if value in self.profiles else None
        if matching == "email_profile":
            return self._by_email.get(value.lower())
        if matching == "email":
            key = value.lower()
            return self._by_email.get(key) or self._by_subscription_email.get(key)
        if matching == "phone":
            return self._by_phone.get(value)
        return self._by_field.get((field_name or "", value))

    def upsert(self, profile_id: str | None, data: dict[str, Any]) -> tuple[str, str]:
        """Create or merge; returns ``(profile_id, "created" | "updated")``."""
        status = "updated" if profile_id is not None else "created"
        profile_id = profile_id or uuid.uuid4().hex[:24]
        profile = self.profiles.setdefault(profile_id, {})
        profile.update(data)
        self._index(profile_id, profile)
        return profile_id, status

    def _index(self, profile_id: str, profile: dict[str, Any]) -> None:
        email = profile.get("email")
        if isinstance(email, str) and email:
            self._by_email[email.lower()] = profile_id
        for phone in _phones(profile.get("phones")):
            self._by_phone[phone] = profile_id
        for sub in profile.get("subscriptions") or []:
            if isinstance(sub, dict) and isinstance(sub.get("email"), str):
                self._by_subscription_email[sub["email"].lower()] = profile_id
        for name, value in profile.items():
            if isinstance(value, str | int) and not isinstance(value, bool):
                self._by_field[(name, str(value))] = profile_id


def _phones(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v]
    return []


def _matching_value(request: ImportRequest, item: dict[str, Any], data: dict[str, Any]) -> tuple[str, Any]:
    """The key the matching mode reads and its value in this item (``None`` when missing)."""
    mode = request.matching
    if mode == "profile_id":
        return "profile_id", item.get("profile_id")
    if mode == "phone":
        phones = _phones(data.get("phones"))
        return "phones", phones[0] if phones else None
    if mode == "custom":
        name = request.field_name or ""
        return name, data.get(name)
    return "email", data.get("email")


def _profile_error(request: ImportRequest, item: Any, store: ProfileStore) -> tuple[str | None, str | None]:
    """``(error text, existing profile id)`` for one item; the error is ``None`` when it imports."""
    data = item.get("data") if isinstance(item, dict) else None
    if not isinstance(data, dict):
        return "Profile data is missing", None
    if (reason := sandbox_failure(data.values())) is not None:
        return reason, None
    key, value = _matching_value(request, item, data)
    if value is None or (isinstance(value, str) and not value.strip()):
        return f"Matching field '{key}' is missing", None
    existing = store.find(request.matching, str(value), request.field_name)
    if request.matching == "profile_id" and existing is None:
        return f"Profile '{value}' not found", None
    email = data.get("email")
    if email is not None:
        problem = email_problem(email) if isinstance(email, str) else INVALID_EMAIL
        if problem is not None:
            return problem, None
    if data.get("phones") is not None and not all(is_e164(p) for p in _phones(data["phones"]) or [""]):
        return "Invalid phone number, expected E.164", None
    return None, existing


@dataclass
class _Task:
    """One batch task; its public state is computed on read from elapsed time and the worker."""

    id: str
    request: ImportRequest
    body_bytes: int
    pace: float
    fail_with: str | None = None
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    results: list[dict[str, Any]] | None = None
    triggered: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)

    def run(self, store: ProfileStore) -> None:
        """Wait out ``pending``, then apply every profile in order (or fail without applying)."""
        if self.cancel.wait(self.pace):
            return
        results: list[dict[str, Any]] = []
        if self.fail_with is None:
            for item in self.request.items:
                if self.cancel.is_set():
                    return
                with store.lock:
                    error, existing = _profile_error(self.request, item, store)
                    if error is None:
                        profile_id, status = store.upsert(existing, item["data"])
                if error is None:
                    results.append({"error": 0, "error_text": "", "profile_id": profile_id, "status": status})
                    self.triggered += 0 if self.request.skip_triggers else 1
                else:
                    results.append({"error": 400, "error_text": error})
                self.done += 1
        self.results = results

    def state(self, now: float) -> tuple[str, int]:
        elapsed = now - self.started
        total = len(self.request.items)
        if elapsed < self.pace:
            return "pending", 0
        if self.results is None or elapsed < 2 * self.pace:
            return "processing", min(99, self.done * 100 // total if total else 0)
        if self.fail_with is not None:
            return "error", 0
        return "completed", 100

    def status_body(self, now: float) -> dict[str, Any]:
        status, progress = self.state(now)
        body: dict[str, Any] = {"status": status, "progress": progress}
        if status == "completed":
            body["result"] = {"error": 0, "error_text": "", "result": self.results}
        elif status == "error":
            body["result"] = {"error": 500, "error_text": self.fail_with}
        return body

    def summary(self, now: float) -> dict[str, Any]:
        return {
            "task_id": self.id,
            "trigger_id": self.request.trigger_id,
            "matching": self.request.matching,
            "field_name": self.request.field_name,
            "profiles": len(self.request.items),
            "body_bytes": self.body_bytes,
            "status": self.state(now)[0],
            "triggered": self.triggered,
        }


Handler = Callable[[Request], Awaitable[Response]]


class AltcraftVendor:
    """The Altcraft emulation; tasks run in daemon threads against one shared profile store."""

    name = "altcraft"
    prefix = "/altcraft"

    def __init__(self, settings: SandboxSettings) -> None:
        self._token = settings.altcraft_token
        self._pace = settings.pace_seconds
        self._lock = threading.Lock()
        self._tasks: dict[str, _Task] = {}
        self._inactive_triggers: set[int] = set()
        self._fail_next: list[str] = []
        self.store = ProfileStore()

    def routes(self) -> list[BaseRoute]:
        return [
            Route(IMPORT_PATH, self._wrap(self._import), methods=["POST"]),
            Route(STATUS_PATH, self._wrap(self._status), methods=["POST"]),
        ]

    def control_routes(self) -> list[BaseRoute]:
        return [
            Route("/triggers/{trigger_id:int}", self._set_trigger, methods=["POST"]),
            Route("/fail-tasks", self._fail_tasks, methods=["POST"]),
            Route("/tasks", self._list_tasks, methods=["GET"]),
            Route("/profiles", self._list_profiles, methods=["GET"]),
        ]

    def demo_env(self, base_url: str) -> dict[str, str]:
        return {"ALTCRAFT_BASE_URL": base_url, "ALTCRAFT_TOKEN": self._token}

    def reset(self) -> None:
        with self._lock:
            tasks = list(self._tasks.values())
            self._tasks.clear()
            self._inactive_triggers.clear()
            self._fail_next.clear()
        for task in tasks:
            task.cancel.set()
        self.store.clear()

    def _wrap(self, handler: Callable[[Request, dict[str, Any]], Awaitable[Response]]) -> Handler:
        """Read the capped JSON body and check its token, then render :class:`AltcraftError`."""

        async def endpoint(request: Request) -> Response:
            try:
                raw = await _read_capped(request)
                try:
                    payload = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise _invalid(f"request body is not JSON: {exc}") from None
                if not isinstance(payload, dict):
                    raise _invalid("request body must be a JSON object")
                token = payload.get("token")
                if not isinstance(token, str) or not same_secret(token, self._token):
                    raise AltcraftError(401, 401, "Invalid API token")
                request.state.body_bytes = len(raw)
                return await handler(request, payload)
            except AltcraftError as exc:
                return exc.response()

        return endpoint

    async def _import(self, request: Request, payload: dict[str, Any]) -> Response:
        parsed = _parse_import(payload)
        with self._lock:
            if parsed.trigger_id in self._inactive_triggers:
                raise AltcraftError(200, 404, f"Trigger campaign {parsed.trigger_id} not found or not active")
            task = _Task(
                id=str(uuid.uuid4()),
                request=parsed,
                body_bytes=request.state.body_bytes,
                pace=self._pace,
                fail_with=self._fail_next.pop(0) if self._fail_next else None,
            )
            self._tasks[task.id] = task
        threading.Thread(
            target=task.run, args=(self.store,), name=f"altcraft-task-{task.id}", daemon=True
        ).start()
        return _ok({"task_id": task.id}, task_id=task.id)

    async def _status(self, request: Request, payload: dict[str, Any]) -> Response:
        task_id = payload.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise _invalid("task_id is required")
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None:
            raise AltcraftError(200, 404, f"Task {task_id} not found")
        return _ok(task.status_body(time.monotonic()))

    async def _set_trigger(self, request: Request) -> Response:
        trigger_id = request.path_params["trigger_id"]
        payload = await _control_json(request)
        active = payload.get("active", True)
        if not isinstance(active, bool):
            return JSONResponse({"ok": False, "error": "active must be true or false"}, status_code=400)
        with self._lock:
            (self._inactive_triggers.discard if active else self._inactive_triggers.add)(trigger_id)
        return JSONResponse({"ok": True, "trigger_id": trigger_id, "active": active})

    async def _fail_tasks(self, request: Request) -> Response:
        payload = await _control_json(request)
        times = payload.get("times", 1)
        text = payload.get("error_text", "Internal error while importing profiles")
        if not isinstance(times, int) or isinstance(times, bool) or times < 1 or not isinstance(text, str):
            return JSONResponse({"ok": False, "error": "times >= 1 and error_text text"}, status_code=400)
        with self._lock:
            self._fail_next.extend([text] * times)
        return JSONResponse({"ok": True, "times": times})

    async def _list_tasks(self, request: Request) -> Response:
        now = time.monotonic()
        with self._lock:
            tasks = [task.summary(now) for task in self._tasks.values()]
        return JSONResponse({"tasks": tasks})

    async def _list_profiles(self, request: Request) -> Response:
        with self.store.lock:
            profiles = [{"profile_id": pid, **data} for pid, data in self.store.profiles.items()]
        return JSONResponse({"profiles": profiles})


def _parse_import(payload: dict[str, Any]) -> ImportRequest:
    trigger_id = payload.get("trigger_id")
    if not isinstance(trigger_id, int) or isinstance(trigger_id, bool) or trigger_id < 1:
        raise _invalid("trigger_id is required and must be a positive integer")
    matching = payload.get("matching", "email")
    if matching not in MATCHING_MODES:
        raise _invalid(f"matching must be one of {', '.join(MATCHING_MODES)}")
    field_name = payload.get("field_name")
    if matching == "custom" and (not isinstance(field_name, str) or not field_name):
        raise _invalid("field_name is required when matching is custom")
    for flag in ("skip_triggers", "skip_invalid_subscriptions", "detect_geo"):
        if not isinstance(payload.get(flag, False), bool):
            raise _invalid(f"{flag} must be a boolean")
    resource_id = payload.get("resource_id")
    if resource_id is not None and (not isinstance(resource_id, int) or isinstance(resource_id, bool)):
        raise _invalid("resource_id must be an integer")
    items = payload.get("data")
    if not isinstance(items, list) or not items:
        raise _invalid("data is required and must be a non-empty array")
    if len(items) > MAX_PROFILES:
        raise _invalid(f"data has {len(items)} profiles; at most {MAX_PROFILES} per request")
    return ImportRequest(
        trigger_id=trigger_id,
        matching=matching,
        field_name=field_name if matching == "custom" else None,
        skip_triggers=payload.get("skip_triggers", False),
        items=items,
    )


async def _read_capped(request: Request) -> bytes:
    """The body, or the documented "request body too large" answer past :data:`MAX_BODY_BYTES`."""
    too_large = _invalid("http: request body too large")
    declared = request.headers.get("content-length", "")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES or (declared.isdigit() and int(declared) > MAX_BODY_BYTES):
            chunks.clear()
            if size > _DRAIN_LIMIT:
                raise too_large
            continue
        chunks.append(chunk)
    if size > MAX_BODY_BYTES or (declared.isdigit() and int(declared) > MAX_BODY_BYTES):
        raise too_large
    return b"".join(chunks)


async def _control_json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body:
        return {}
    try:
        payload = json.loads(body)
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}

"""Fault injection for the sandbox: make the next N matching requests fail on purpose.

Clients must survive 5xx answers, slow answers, HTML error pages and connections that die
without a response. Tests register a fault through ``POST /_sandbox/faults`` and then watch the
client retry; the registry is consumed first-in first-out so the order of injected faults is
predictable.

A fault acts *before* the vendor by default: the vendor never sees the request. With
``"after": true`` the vendor handles the request fully (an import is created, a job started),
its answer is discarded or held, and only then does the fault act, which is how a client
learns to survive "the vendor accepted it but I never heard back":

- ``drop``: close the connection without any response bytes.
- ``status``: answer the fault's 4xx/5xx status with the JSON error body instead.
- ``html``: answer ``text/html`` (status 200 unless ``status`` is given) instead.
- ``delay``: hold the vendor's answer for ``delay_seconds``, then send it unchanged.

Every request to a vendor path is also recorded in a :class:`RequestLog` (vendor, method, path,
the vendor's status, the fault applied), so tests can count what the vendor really received.
Headers, query strings and bodies are never recorded: they carry API keys.

The wrapper sits *outside* Starlette's middleware stack because dropping a connection needs
the server's own ``send`` callable (uvicorn's request cycle, which knows the transport).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

FaultKind = Literal["status", "delay", "drop", "html"]
FAULT_KINDS: tuple[FaultKind, ...] = ("status", "delay", "drop", "html")
CONTROL_PREFIX = "/_sandbox"
REQUEST_LOG_LIMIT = 50_000
"""Oldest entries are forgotten beyond this many (a long-running demo sandbox must not grow forever)."""

HTML_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>503 Service Temporarily Unavailable</title></head>"
    "<body><h1>Service temporarily unavailable</h1>"
    "<p>The server is temporarily unable to service your request. Please try again later.</p>"
    "<hr><address>sandbox-gateway</address></body></html>\n"
)
"""What a proxy or maintenance page in front of a vendor answers, instead of the vendor's JSON."""

Recorder = Callable[[int | None], None]


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The ``{"error": {"code", "message"}}`` body shared by the control plane, faults and CXI."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


@dataclass
class Fault:
    """One injected fault; ``remaining`` counts down as matching requests consume it."""

    kind: FaultKind
    vendor: str | None = None
    path_prefix: str = ""
    path_contains: str = ""
    method: str | None = None
    status: int = 503
    retry_after: int | None = None
    delay_seconds: float = 1.0
    remaining: int = 1
    after: bool = False

    def matches(self, method: str, path: str) -> bool:
        """Whether a request is affected; a vendor prefix matches whole path segments only."""
        if self.method is not None and method.upper() != self.method:
            return False
        if self.path_prefix and not _under(path, self.path_prefix):
            return False
        return self.path_contains in path

    def describe(self) -> dict[str, Any]:
        """JSON form echoed back by the control route so a test can see what was registered."""
        return asdict(self)

    def response(self) -> Response:
        """The answer a ``status`` or ``html`` fault sends in place of the vendor's."""
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        if self.kind == "html":
            return HTMLResponse(HTML_PAGE, status_code=self.status, headers=headers)
        return error_response(self.status, "sandbox_fault", "Fault injected by the sandbox", headers)


def parse_fault(payload: Any, vendor_prefixes: Mapping[str, str]) -> Fault:
    """Validate a control-route payload; raises ``ValueError`` with a message fit for a 400.

    Shape: ``{"kind": "status"|"delay"|"drop"|"html", "vendor"?, "path_contains"?, "method"?,
    "status"?, "retry_after"?, "delay_seconds"?, "times"?, "after"?}``. ``status`` is 400..599
    for ``status`` faults (default 503) and 200..599 for ``html`` faults (default 200).
    """
    if not isinstance(payload, dict):
        raise ValueError("Fault must be a JSON object")
    kind = payload.get("kind")
    if kind not in FAULT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(FAULT_KINDS)}")
    vendor = payload.get("vendor")
    if vendor is not None and vendor not in vendor_prefixes:
        raise ValueError(f"Unknown vendor {vendor!r}; known: {', '.join(sorted(vendor_prefixes))}")
    path_contains = payload.get("path_contains", "")
    method = payload.get("method")
    if not isinstance(path_contains, str) or (method is not None and not isinstance(method, str)):
        raise ValueError("path_contains and method must be strings")
    if kind == "html":
        status = _number(payload, "status", 200, int)
        if not 200 <= status <= 599:
            raise ValueError("status must be between 200 and 599 for an html fault")
    else:
        status = _number(payload, "status", 503, int)
        if not 400 <= status <= 599:
            raise ValueError("status must be between 400 and 599")
    retry_after = payload.get("retry_after")
    if retry_after is not None:
        retry_after = _number(payload, "retry_after", 0, int)
        if retry_after < 0:
            raise ValueError("retry_after must not be negative")
    delay_seconds = float(_number(payload, "delay_seconds", 1.0, float))
    if not 0 <= delay_seconds <= 300:
        raise ValueError("delay_seconds must be between 0 and 300")
    times = _number(payload, "times", 1, int)
    if times < 1:
        raise ValueError("times must be at least 1")
    after = payload.get("after", False)
    if not isinstance(after, bool):
        raise ValueError("after must be true or false")
    return Fault(
        kind=cast(FaultKind, kind),
        vendor=vendor,
        path_prefix=vendor_prefixes[vendor] if vendor is not None else "",
        path_contains=path_contains,
        method=method.upper() if method is not None else None,
        status=status,
        retry_after=retry_after,
        delay_seconds=delay_seconds,
        remaining=times,
        after=after,
    )


def _number(payload: dict[str, Any], key: str, default: float, kind: type[int] | type[float]) -> Any:
    value = payload.get(key, default)
    allowed = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise ValueError(f"{key} must be {'a number' if kind is float else 'an integer'}")
    return value


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


class FaultRegistry:
    """Pending faults, shared between the control route and the ASGI wrapper."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def take(self, method: str, path: str) -> Fault | None:
        """Consume one use of the oldest fault matching this request, if any."""
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def pending(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()


class RequestLog:
    """What each vendor path received, in the order the answers were decided.

    An entry is ``{"vendor", "method", "path", "status", "faulted", "after"}``: ``status`` is what
    the vendor answered (before an ``after`` fault replaced or withheld it), ``None`` when a fault
    kept the request from the vendor; ``faulted`` is the fault's kind or ``None``. An entry is
    recorded as soon as the vendor's status is known, before any of its bytes reach the client.
    """

    def __init__(self, vendor_prefixes: Mapping[str, str], limit: int = REQUEST_LOG_LIMIT) -> None:
        self.vendor_prefixes = dict(vendor_prefixes)
        self._lock = threading.Lock()
        self._entries: deque[dict[str, Any]] = deque(maxlen=limit)

    def vendor_of(self, path: str) -> str | None:
        """The vendor whose prefix the path is under (whole segments only), if any."""
        for name, prefix in self.vendor_prefixes.items():
            if _under(path, prefix):
                return name
        return None

    def record(self, vendor: str, method: str, path: str, status: int | None, fault: Fault | None) -> None:
        entry = {
            "vendor": vendor,
            "method": method,
            "path": path,
            "status": status,
            "faulted": fault.kind if fault is not None else None,
            "after": fault.after if fault is not None else False,
        }
        with self._lock:
            self._entries.append(entry)

    def entries(
        self, vendor: str | None = None, method: str | None = None, path_contains: str | None = None
    ) -> list[dict[str, Any]]:
        """Copies of the recorded entries, oldest first, optionally filtered (method ignores case)."""
        with self._lock:
            entries = [dict(entry) for entry in self._entries]
        return [
            entry
            for entry in entries
            if (vendor is None or entry["vendor"] == vendor)
            and (method is None or entry["method"] == method.upper())
            and (path_contains is None or path_contains in entry["path"])
        ]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class FaultMiddleware:
    """Pure ASGI wrapper applying registered faults and logging vendor requests.

    Control routes are never affected nor logged; paths outside every vendor prefix (e.g. an
    unknown ``/nowhere``) can still be faulted but are not logged.
    """

    def __init__(self, app: ASGIApp, registry: FaultRegistry, log: RequestLog | None = None) -> None:
        self.app = app
        self.registry = registry
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or _under(path, CONTROL_PREFIX):
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        fault = self.registry.take(method, path)
        vendor = self.log.vendor_of(path) if self.log is not None else None

        def record(status: int | None) -> None:
            if self.log is not None and vendor is not None:
                self.log.record(vendor, method, path, status, fault)

        if fault is None:
            await self.app(scope, receive, _observing(send, record))
        elif fault.after:
            await self._after(fault, scope, receive, send, record)
        else:
            await self._before(fault, scope, receive, send, record)

    async def _before(
        self, fault: Fault, scope: Scope, receive: Receive, send: Send, record: Recorder
    ) -> None:
        """The fault acts first; only a delayed request ever reaches the vendor."""
        if fault.kind == "delay":
            await asyncio.sleep(fault.delay_seconds)
            await self.app(scope, receive, _observing(send, record))
            return
        record(None)
        if fault.kind == "drop":
            await _drop(send)
        else:
            await _drain(receive)
            await fault.response()(scope, receive, send)

    async def _after(
        self, fault: Fault, scope: Scope, receive: Receive, send: Send, record: Recorder
    ) -> None:
        """The vendor handles the request completely; its answer is then held or replaced."""
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        await self.app(scope, receive, _observing(hold, record))
        if fault.kind == "delay":
            await asyncio.sleep(fault.delay_seconds)
            for message in held:
                await send(message)
        elif fault.kind == "drop":
            await _drop(send)
        else:
            await fault.response()(scope, receive, send)


def _observing(send: Send, record: Recorder) -> Send:
    """A ``send`` that records the vendor's status as its response starts, before passing it on."""

    async def observed(message: Message) -> None:
        if message["type"] == "http.response.start":
            record(message["status"])
        await send(message)

    return observed


async def _drain(receive: Receive) -> None:
    """Read the request body so the client gets the error response rather than a broken pipe."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _drop(send: Send) -> None:
    """Close the connection without any response bytes.

    ASGI has no "abort" message, so this reaches uvicorn's request cycle through its bound
    ``send`` method and closes the transport. Under any other server it falls back to sending
    headers and abandoning the body, which clients also see as a broken response.
    """
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None or not hasattr(transport, "close"):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        return
    transport.close()
    for _ in range(100):
        if getattr(cycle, "disconnected", True):
            return
        await asyncio.sleep(0)

"""Fault injection for the sandbox: make the next N matching requests fail on purpose.

Clients must survive 5xx answers, slow answers and connections that die without a response.
Tests register a fault through ``POST /_sandbox/faults`` and then watch the client retry; the
registry is consumed first-in first-out so the order of injected faults is predictable.

The wrapper sits *outside* Starlette's middleware stack because dropping a connection needs
the server's own ``send`` callable (uvicorn's request cycle, which knows the transport).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

FaultKind = Literal["status", "delay", "drop"]
FAULT_KINDS: tuple[FaultKind, ...] = ("status", "delay", "drop")
CONTROL_PREFIX = "/_sandbox"


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

    def matches(self, method: str, path: str) -> bool:
        """Whether a request is affected; a vendor prefix matches whole path segments only."""
        if self.method is not None and method.upper() != self.method:
            return False
        if self.path_prefix and path != self.path_prefix and not path.startswith(self.path_prefix + "/"):
            return False
        return self.path_contains in path

    def describe(self) -> dict[str, Any]:
        """JSON form echoed back by the control route so a test can see what was registered."""
        return asdict(self)


def parse_fault(payload: Any, vendor_prefixes: Mapping[str, str]) -> Fault:
    """Validate a control-route payload; raises ``ValueError`` with a message fit for a 400."""
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
    )


def _number(payload: dict[str, Any], key: str, default: float, kind: type[int] | type[float]) -> Any:
    value = payload.get(key, default)
    allowed = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise ValueError(f"{key} must be {'a number' if kind is float else 'an integer'}")
    return value


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


class FaultMiddleware:
    """Pure ASGI wrapper applying registered faults; control routes are never affected."""

    def __init__(self, app: ASGIApp, registry: FaultRegistry) -> None:
        self.app = app
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/"):
            await self.app(scope, receive, send)
            return
        fault = self.registry.take(scope["method"], path)
        if fault is None:
            await self.app(scope, receive, send)
        elif fault.kind == "delay":
            await asyncio.sleep(fault.delay_seconds)
            await self.app(scope, receive, send)
        elif fault.kind == "status":
            await _drain(receive)
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
            response = error_response(fault.status, "sandbox_fault", "Fault injected by the sandbox", headers)
            await response(scope, receive, send)
        else:
            await _drop(send)


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

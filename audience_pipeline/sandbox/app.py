"""The sandbox ASGI application: every emulated vendor under its own path prefix, plus control routes.

Control routes (no API key, never affected by faults):

- ``GET  /_sandbox/health`` → ``{"ok": true}``
- ``POST /_sandbox/reset`` → forget all vendor state, pending faults and the request log
- ``POST /_sandbox/faults`` → register a fault, see :func:`~audience_pipeline.sandbox.faults.parse_fault`;
  answers 201 ``{"ok": true, "fault": {...}}``
- ``GET  /_sandbox/requests`` (optional query ``vendor``, ``method``, ``path_contains``) →
  ``{"requests": [{"vendor", "method", "path", "status", "faulted", "after"}, ...]}``, oldest first;
  see :class:`~audience_pipeline.sandbox.faults.RequestLog`
- ``DELETE /_sandbox/requests`` → forget the request log only (a benchmark counts per tick)
- ``/_sandbox/<vendor>/...`` → a vendor's own control routes (e.g. CXI's "mark import in use")

Nothing here logs request headers, query strings or bodies: they carry vendor API keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from json import JSONDecodeError
from typing import Protocol, runtime_checkable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp

from audience_pipeline.sandbox.aep import AepVendor
from audience_pipeline.sandbox.altcraft import AltcraftVendor
from audience_pipeline.sandbox.apsis import ApsisVendor
from audience_pipeline.sandbox.cxi import CxiVendor
from audience_pipeline.sandbox.faults import (
    CONTROL_PREFIX,
    FaultMiddleware,
    FaultRegistry,
    RequestLog,
    error_response,
    parse_fault,
)
from audience_pipeline.sandbox.yesmail import YesmailVendor


@dataclass(frozen=True)
class SandboxSettings:
    """Knobs shared by all emulated vendors; tests shrink ``pace_seconds`` to stay fast."""

    pace_seconds: float = 0.5
    cxi_api_key: str = "sandbox-cxi-key"
    max_upload_bytes: int = 200 * 1024 * 1024
    aep_client_id: str = "sandbox-aep-api-key"
    aep_client_secret: str = "sandbox-aep-secret"
    aep_org_id: str = "SANDBOX0123456789@AdobeOrg"
    aep_sandbox_name: str = "prod"
    aep_sas_ttl_seconds: float = 3600.0
    apsis_client_id: str = "sandbox-apsis-client"
    apsis_client_secret: str = "sandbox-apsis-secret"
    apsis_upload_url_ttl_seconds: float = 900.0
    apsis_token_ttl_seconds: float = 3600.0
    apsis_max_file_bytes: int = 50_000_000
    apsis_max_pending_imports: int = 3
    yesmail_api_user: str = "sandbox-yesmail-user"
    yesmail_api_key: str = "sandbox-yesmail-key"
    yesmail_max_members: int = 1000
    yesmail_target_lists: tuple[str, ...] = ("all-staff",)
    altcraft_token: str = "sandbox-altcraft-token"


@runtime_checkable
class SandboxVendor(Protocol):
    """What the app needs from one emulated vendor, so vendors can be added without touching it."""

    name: str
    prefix: str

    def routes(self) -> list[BaseRoute]:
        """The vendor's public API, mounted under ``prefix``."""
        ...

    def control_routes(self) -> list[BaseRoute]:
        """Test-only controls, mounted under ``/_sandbox/<name>``; may be empty."""
        ...

    def reset(self) -> None:
        """Forget all state and stop background work."""
        ...

    def demo_env(self, base_url: str) -> dict[str, str]:
        """Environment variables the demo feeds file reads to reach this vendor at ``base_url``
        (the vendor's prefix included) with this sandbox's credentials."""
        ...


VENDORS: tuple[Callable[[SandboxSettings], SandboxVendor], ...] = (
    CxiVendor,
    AltcraftVendor,
    ApsisVendor,
    YesmailVendor,
    AepVendor,
)
"""Factories for every emulated vendor; adding a vendor means adding it here."""


def build_vendors(settings: SandboxSettings) -> list[SandboxVendor]:
    """Instantiate every vendor in :data:`VENDORS` from one settings object."""
    vendors = [factory(settings) for factory in VENDORS]
    names = [vendor.name for vendor in vendors]
    if len(set(names)) != len(names):
        raise ValueError(f"Duplicate sandbox vendor names: {names}")
    return vendors


class SandboxApp(Starlette):
    """Starlette app whose outermost layer is the fault wrapper (it needs the server's raw ``send``)."""

    def __init__(
        self,
        vendors: list[SandboxVendor],
        faults: FaultRegistry,
        routes: list[BaseRoute],
        requests: RequestLog | None = None,
    ) -> None:
        super().__init__(routes=routes, exception_handlers={HTTPException: _http_error})
        self.vendors = {vendor.name: vendor for vendor in vendors}
        self.faults = faults
        self.requests = (
            requests
            if requests is not None
            else RequestLog({vendor.name: vendor.prefix for vendor in vendors})
        )

    def build_middleware_stack(self) -> ASGIApp:
        return FaultMiddleware(super().build_middleware_stack(), self.faults, self.requests)

    def reset(self) -> None:
        """Clear every vendor's state, all pending faults and the request log."""
        self.faults.clear()
        self.requests.clear()
        for vendor in self.vendors.values():
            vendor.reset()


def build_app(settings: SandboxSettings | None = None) -> SandboxApp:
    """Assemble the sandbox: vendor mounts, control routes and the fault layer."""
    settings = settings or SandboxSettings()
    vendors = build_vendors(settings)
    faults = FaultRegistry()
    prefixes = {vendor.name: vendor.prefix for vendor in vendors}
    requests = RequestLog(prefixes)
    app: SandboxApp

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def reset(request: Request) -> Response:
        app.reset()
        return JSONResponse({"ok": True})

    async def add_fault(request: Request) -> Response:
        try:
            fault = parse_fault(await request.json(), prefixes)
        except (JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "invalid_fault", "Body must be a JSON object")
        except ValueError as exc:
            return error_response(400, "invalid_fault", str(exc))
        faults.add(fault)
        return JSONResponse({"ok": True, "fault": fault.describe()}, status_code=201)

    async def list_requests(request: Request) -> Response:
        if request.method == "DELETE":
            requests.clear()
            return JSONResponse({"ok": True})
        unknown = sorted(set(request.query_params) - {"vendor", "method", "path_contains"})
        if unknown:
            return error_response(
                400,
                "invalid_request",
                f"Unknown filter {', '.join(unknown)}; use vendor, method, path_contains",
            )
        vendor = request.query_params.get("vendor")
        if vendor is not None and vendor not in prefixes:
            return error_response(
                400, "invalid_request", f"Unknown vendor {vendor!r}; known: {', '.join(sorted(prefixes))}"
            )
        entries = requests.entries(
            vendor=vendor,
            method=request.query_params.get("method"),
            path_contains=request.query_params.get("path_contains"),
        )
        return JSONResponse({"requests": entries})

    routes: list[BaseRoute] = [
        Route(f"{CONTROL_PREFIX}/health", health, methods=["GET"]),
        Route(f"{CONTROL_PREFIX}/reset", reset, methods=["POST"]),
        Route(f"{CONTROL_PREFIX}/faults", add_fault, methods=["POST"]),
        Route(f"{CONTROL_PREFIX}/requests", list_requests, methods=["GET", "DELETE"]),
    ]
    routes += [Mount(f"{CONTROL_PREFIX}/{v.name}", routes=v.control_routes()) for v in vendors]
    routes += [Mount(v.prefix, routes=v.routes()) for v in vendors]
    app = SandboxApp(vendors, faults, routes, requests)
    return app


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and wrong methods answer in the same JSON error shape as everything else."""
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), exc.detail, exc.headers)

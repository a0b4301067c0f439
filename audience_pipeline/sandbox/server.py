"""Run the sandbox over real HTTP: in a background thread for tests, or in the foreground for the CLI.

Clients are tested against a real socket (not an in-process transport) so timeouts, retries and
dropped connections behave as they would against a vendor.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from types import TracebackType
from typing import Any, Self

import httpx
import uvicorn

from audience_pipeline.sandbox.app import SandboxApp, SandboxSettings, build_app

DEFAULT_PORT = 8765
_UVICORN_OPTIONS: dict[str, Any] = {"http": "h11", "ws": "none", "lifespan": "off"}


def _loopback(host: str) -> str:
    """Refuse anything but a loopback address: the sandbox accepts any upload and has test-only keys."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(host).is_loopback and ipaddress.ip_address(host).version == 4:
            return host
    except ValueError:
        pass
    raise ValueError(f"The sandbox only binds to 127.0.0.1, not {host!r}")


class SandboxServer:
    """Context manager running the sandbox with uvicorn in a daemon thread on a (free) local port."""

    def __init__(
        self,
        settings: SandboxSettings | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        startup_timeout: float = 10.0,
    ) -> None:
        self.settings = settings or SandboxSettings()
        self.host = _loopback(host)
        self.port = port
        self.app: SandboxApp = build_app(self.settings)
        self._log_level = log_level
        self._startup_timeout = startup_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``; the real port once started."""
        return f"http://{self.host}:{self.port}"

    def vendor_url(self, name: str) -> str:
        """Base URL a vendor client should use, e.g. ``http://127.0.0.1:54321/cxi``."""
        return self.url + self.app.vendors[name].prefix

    def start(self) -> None:
        """Bind, start serving and return once the health route answers."""
        if self._thread is not None:
            raise RuntimeError("SandboxServer is already running")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self._log_level, **_UVICORN_OPTIONS)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="sandbox-server", daemon=True
        )
        self._thread.start()
        try:
            self._wait_until_answering()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop serving, wait for the thread and drop all vendor state (and its temp files)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None
        self.app.reset()

    def reset(self) -> None:
        """Same as ``POST /_sandbox/reset``, without a round trip."""
        self.app.reset()

    def add_fault(self, **spec: Any) -> dict[str, Any]:
        """Register a fault through the control route, so invalid specs fail exactly as over HTTP."""
        response = httpx.post(f"{self.url}/_sandbox/faults", json=spec, timeout=5)
        response.raise_for_status()
        return response.json()["fault"]

    def requests(
        self, *, vendor: str | None = None, method: str | None = None, path_contains: str | None = None
    ) -> list[dict[str, Any]]:
        """What vendor paths received since the last reset, oldest first, through ``GET /_sandbox/requests``.

        Each entry is ``{"vendor", "method", "path", "status", "faulted", "after"}``; filters combine.
        """
        filters = {"vendor": vendor, "method": method, "path_contains": path_contains}
        params = {key: value for key, value in filters.items() if value is not None}
        response = httpx.get(f"{self.url}/_sandbox/requests", params=params, timeout=5)
        response.raise_for_status()
        return response.json()["requests"]

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._thread is None or not self._thread.is_alive():
                raise RuntimeError("Sandbox server thread exited during startup")
            if self._server is not None and self._server.started:
                try:
                    if httpx.get(f"{self.url}/_sandbox/health", timeout=1).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.01)
        raise TimeoutError(f"Sandbox server did not answer within {self._startup_timeout} s")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve_forever(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    settings: SandboxSettings | None = None,
    log_level: str = "warning",
) -> None:
    """Serve in the foreground until Ctrl-C (uvicorn handles the signal and shuts down cleanly)."""
    app = build_app(settings or SandboxSettings())
    try:
        uvicorn.run(app, host=_loopback(host), port=port, log_level=log_level, **_UVICORN_OPTIONS)
    finally:
        app.reset()

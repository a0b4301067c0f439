"""Running sandboxes shared by the whole test session, one per distinct settings.

Each test folder (and a module that needs other credentials or limits) asks for its settings;
starting a uvicorn server per module would cost more than the tests it serves.
"""

from __future__ import annotations

from audience_pipeline.sandbox import SandboxServer, SandboxSettings


class SandboxPool:
    """Starts a sandbox the first time its settings are asked for and stops them all at the end."""

    def __init__(self) -> None:
        self._servers: dict[SandboxSettings, SandboxServer] = {}

    def get(self, settings: SandboxSettings) -> SandboxServer:
        """The running server for ``settings``; callers reset it, the pool never does."""
        server = self._servers.get(settings)
        if server is None:
            server = SandboxServer(settings)
            server.start()
            self._servers[settings] = server
        return server

    def stop_all(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers.clear()

"""Real servers on 127.0.0.1 for source tests: an asyncssh SFTP server, a report URL and an S3
server that can be restarted.

All run in a background thread and can be stopped and started again on the same port (a source
that goes down between ticks); the report server records what it was asked.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import asyncssh
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer

SFTP_USER = "hr-drop"
SFTP_PASSWORD = "sftp-pass-6d1e8b2a90"


class _SshServer(asyncssh.SSHServer):
    def __init__(self, owner: SftpTestServer) -> None:
        self._owner = owner

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return username == SFTP_USER and password == SFTP_PASSWORD

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return username == SFTP_USER and key.export_public_key() == self._owner.client_key.export_public_key()


class SftpTestServer:
    """asyncssh SFTP server chrooted to ``root``, with a generated host key and one user
    (password ``SFTP_PASSWORD`` or the private key ``client_key``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sftp-server", daemon=True)
        self._thread.start()
        self._acceptor: asyncssh.SSHAcceptor | None = None

    @property
    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key.export_public_key('openssh').decode().strip()}"

    @property
    def private_key_text(self) -> str:
        return self.client_key.export_private_key("openssh").decode()

    def start(self) -> None:
        async def listen() -> asyncssh.SSHAcceptor:
            return await asyncssh.listen(
                "127.0.0.1",
                self.port,
                server_host_keys=[self.host_key],
                server_factory=lambda: _SshServer(self),
                sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(self.root).encode()),
                allow_scp=False,
                reuse_address=True,
            )

        self._acceptor = asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)
        self.port = self._acceptor.get_port()

    def stop(self) -> None:
        """Stop listening and drop open sessions (the port can be taken again by :meth:`start`)."""
        if self._acceptor is None:
            return
        acceptor, self._acceptor = self._acceptor, None

        async def close() -> None:
            acceptor.close()
            await acceptor.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)

    def shutdown(self) -> None:
        """Stop, end the sessions still open and the loop's thread."""
        self.stop()

        async def cancel_sessions() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_sessions(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@dataclass
class ReportState:
    """What the report endpoint serves and expects; tests change it between pulls.

    ``cut_after`` makes every pull send only that many body bytes and then drop the connection,
    having declared the full ``Content-Length`` (or, without ``cut_declares_length``, chunked).
    """

    body: bytes = b""
    username: str = "ISU_Audience"
    password: str = "report-pass-0c4d7e91ab"
    token: str = "report-token-5f2b8a17c3e9"
    content_type: str = "text/csv; charset=utf-8"
    fail_with: list[int] = field(default_factory=list)
    cut_after: int | None = None
    cut_declares_length: bool = True
    requests: list[dict] = field(default_factory=list)


REPORT_PATH = "/ccx/service/customreport2/acme/ISU_Audience/All_Workers"


def build_report_app(state: ReportState) -> Starlette:
    """Workday RaaS-style GET with basic auth; BambooHR-style POST with a JSON body and bearer."""

    async def report(request: Request) -> Response:
        body = await request.body()
        state.requests.append(
            {"method": request.method, "query": dict(request.query_params), "body": body.decode()}
        )
        if state.fail_with:
            status = state.fail_with.pop(0)
            return PlainTextResponse("try later", status_code=status, headers={"Retry-After": "0"})
        auth = request.headers.get("Authorization", "")
        basic = "Basic " + base64.b64encode(f"{state.username}:{state.password}".encode()).decode()
        if auth not in (basic, f"Bearer {state.token}"):
            return PlainTextResponse("Invalid credentials", status_code=401)
        if request.method == "POST" and request.headers.get("Content-Type") != "application/json":
            return PlainTextResponse("expected a JSON field list", status_code=400)
        data = state.body
        cut_after = state.cut_after
        headers = {}
        if cut_after is not None and state.cut_declares_length:
            headers["Content-Length"] = str(len(data))

        async def chunks() -> AsyncIterator[bytes]:
            end = len(data) if cut_after is None else cut_after
            for i in range(0, end, 64 * 1024):
                yield data[i : min(i + 64 * 1024, end)]
            if cut_after is not None:  # uvicorn drops the connection when the app fails mid-body
                raise ConnectionAbortedError("report server: connection dropped mid-stream (test)")

        return StreamingResponse(chunks(), media_type=state.content_type, headers=headers)

    return Starlette(routes=[Route(REPORT_PATH, report, methods=["GET", "POST"])])


class ReportServer:
    """The report app under uvicorn on 127.0.0.1, in a thread; stop/start keeps the port."""

    def __init__(self) -> None:
        self.state = ReportState()
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{REPORT_PATH}"

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            build_report_app(self.state), log_level="warning", http="h11", ws="none", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="report-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("report server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None


class RestartableS3Server:
    """moto's S3 server of a test's own on 127.0.0.1: :meth:`stop` takes it down, :meth:`start`
    brings up a new one on the same port (moto keeps buckets per process, not per server)."""

    def __init__(self) -> None:
        self.port = 0
        self._server: ThreadedMotoServer | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self.port = server.get_host_and_port()[1]
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        self._server = None

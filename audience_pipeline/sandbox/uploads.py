"""Multipart uploads the emulated vendors take (CXI imports, APSIS presigned uploads).

The size cap holds whether or not the client declares ``Content-Length``, and an upload is copied
to a file the sandbox owns, because Starlette's copy dies with the request while the row check
runs on in a thread. Each vendor passes in its own error answers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Message, Receive

FORM_OVERHEAD_BYTES = 1024 * 1024
"""Slack above the file limit for the rest of a multipart body (boundaries, other fields)."""
CHUNK_BYTES = 1024 * 1024


class CappedForm:
    """``async with`` a parsed form whose body is capped, closing its temporary files afterwards."""

    def __init__(
        self,
        request: Request,
        max_file_bytes: int,
        *,
        too_large: Callable[[], Exception],
        unreadable: Callable[[str], Exception],
    ) -> None:
        self._request = request
        self._max = max_file_bytes
        self._too_large = too_large
        self._unreadable = unreadable
        self._form: FormData | None = None

    async def __aenter__(self) -> FormData:
        limit = self._max + FORM_OVERHEAD_BYTES
        declared = self._request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self._too_large()
        receive = _capped(self._request.receive, limit, self._too_large)
        try:
            self._form = await Request(self._request.scope, receive=receive).form()
        except HTTPException as exc:
            raise self._unreadable(str(exc.detail)) from exc
        return self._form

    async def __aexit__(self, *exc_info: object) -> None:
        if self._form is not None:
            await self._form.close()


def _capped(receive: Receive, limit: int, too_large: Callable[[], Exception]) -> Receive:
    """Wrap ``receive`` so bodies without Content-Length are capped too."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise too_large()
        return message

    return wrapped


def spool(
    source: BinaryIO,
    limit: int,
    *,
    prefix: str,
    too_large: Callable[[], Exception],
    on_chunk: Callable[[bytes], None] | None = None,
) -> str:
    """Copy an upload to an owned temp file in one pass; ``on_chunk`` sees each chunk first.

    Past ``limit`` bytes, or when ``on_chunk`` raises, the file is removed and the error raised.
    """
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".csv")
    try:
        size = 0
        source.seek(0)
        with os.fdopen(fd, "wb") as target:
            while chunk := source.read(CHUNK_BYTES):
                size += len(chunk)
                if size > limit:
                    raise too_large()
                if on_chunk is not None:
                    on_chunk(chunk)
                target.write(chunk)
    except BaseException:
        unlink(path)
        raise
    return path


def unlink(path: str) -> None:
    """Remove a sandbox-owned file that may already be gone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

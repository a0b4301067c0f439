"""In-test fake vendors answer through ``httpx.MockTransport``: the client under test is wired to
one here, and multipart uploads are read back the way a vendor would parse them."""

from __future__ import annotations

import email.parser
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from audience_pipeline.destinations.http import RetryPolicy, VendorHTTP

Handler = Callable[[httpx.Request], httpx.Response]
QUICK_RETRY = RetryPolicy(attempts=2, backoff_base=0)


def fake_http(
    vendor: str,
    base_url: str,
    handler: Handler,
    *,
    headers: dict[str, str],
    retry: RetryPolicy = QUICK_RETRY,
    **kwargs: Any,
) -> VendorHTTP:
    """A ``VendorHTTP`` answered by ``handler``: one retry by default, and no real waiting."""
    kwargs.setdefault("sleep", lambda _: None)
    return VendorHTTP(
        vendor, base_url, headers=headers, transport=httpx.MockTransport(handler), retry=retry, **kwargs
    )


@dataclass(frozen=True)
class MultipartForm:
    """A ``multipart/form-data`` body: its plain fields in order, then its one ``file`` part."""

    fields: list[tuple[str, str]]
    file_name: str
    content_type: str
    body: bytes


def parse_multipart(request: httpx.Request) -> MultipartForm:
    head = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode()
    message = email.parser.BytesParser().parsebytes(head + request.read())
    assert message.is_multipart()
    fields: list[tuple[str, str]] = []
    file_part = None
    for part in message.get_payload():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename() is not None:
            assert name == "file"
            file_part = part
        else:
            fields.append((name, part.get_payload(decode=True).decode("utf-8")))
    assert file_part is not None, "no file part"
    return MultipartForm(
        fields, file_part.get_filename(), file_part.get_content_type(), file_part.get_payload(decode=True)
    )

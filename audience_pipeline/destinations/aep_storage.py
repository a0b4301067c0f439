"""Cloud storage for Experience Platform pushes: the API reads the CSV from storage, never from us.

Two locations, chosen per feed by ``options.storage.type``:

- ``dlz`` (default): the sandbox's Data Landing Zone, an Azure blob container. Its SAS URL comes
  from the Platform credentials endpoint on every push (it may be rotated) and is a credential:
  it is registered with the redactor before anything can log it, and the upload client carries
  no Platform headers. The blob is written with one ``Put Blob`` (``x-ms-blob-type: BlockBlob``),
  streamed from disk in 64 KiB reads with a ``Content-Length``, so files up to Azure's 5,000 MiB
  single-put limit work in bounded memory (never one bytes object of the whole file).
  A SAS can expire or be rotated between the credentials call and the upload (a slow export, a
  long retry wait): Azure then answers 403 ``AuthenticationFailed``. The upload fetches the
  credentials once more and retries once with the new SAS; a second refusal fails the push with
  a message naming the container and blob, never the SAS. Other errors are not retried here
  (:class:`VendorHTTP` already retried what is safe to retry).
- ``s3``: a bucket the organisation connected to Platform as a source connection
  (``base_connection_id``); written with boto3 (multipart above 8 MB, handled by boto3), with an
  optional ``endpoint_url`` for S3-compatible stores and tests.

Either way the result is a :class:`StoredFile`: the ``sourceSpec`` path Platform reads
(``<container>/<blob>`` or ``<bucket>/<key>``) and the modification time the storage recorded,
which bounds the data-filter window of an ingestion run.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field

from audience_pipeline.destinations.http import VendorAuthError, VendorError, VendorHTTP, parse_error_body
from audience_pipeline.redact import redact, register_secret

logger = logging.getLogger("audience_pipeline.aep")

MAX_PUT_BLOB_BYTES = 5000 * 1024 * 1024
SAS_REFUSED = "AuthenticationFailed"


class DlzStorageOptions(BaseModel):
    """The Data Landing Zone: nothing to configure beyond the folder inside the container."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["dlz"] = "dlz"
    folder: str = "audience_pipeline"


class S3StorageOptions(BaseModel):
    """An S3 bucket connected to Platform; ``base_connection_id`` is that source connection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["s3"]
    bucket: str = Field(min_length=3)
    prefix: str = ""
    base_connection_id: str = Field(min_length=1)
    endpoint_url: str | None = None
    region: str = "us-east-1"


StorageOptions = Annotated[DlzStorageOptions | S3StorageOptions, Field(discriminator="type")]


@dataclass(frozen=True)
class StoredFile:
    """An uploaded CSV as Platform will address it."""

    path: str
    cloud_type: str
    modified_at: float
    size: int
    base_connection_id: str | None = None

    def source_spec(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "path": self.path,
            "type": "file",
            "sourceType": "Cloud Storage",
            "cloudType": self.cloud_type,
        }
        if self.base_connection_id:
            params["baseConnectionId"] = self.base_connection_id
        return {"params": params}


class Storage(Protocol):
    def upload(self, local: Path, file_name: str) -> StoredFile: ...


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class LandingZone:
    """Uploads to the Data Landing Zone through the SAS URL that ``credentials()`` returns."""

    def __init__(
        self,
        vendor: str,
        options: DlzStorageOptions,
        credentials: Callable[[], Mapping[str, Any]],
        *,
        timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.vendor = vendor
        self.options = options
        self._credentials = credentials
        self._timeout = timeout
        self._transport = transport

    def upload(self, local: Path, file_name: str) -> StoredFile:
        """Put ``local`` at ``<folder>/<file_name>``; a refused SAS is fetched anew and tried once more."""
        size = local.stat().st_size
        if size > MAX_PUT_BLOB_BYTES:
            raise ValueError(
                f"{file_name} is {size} bytes; the Data Landing Zone takes at most "
                f"{MAX_PUT_BLOB_BYTES} per file"
            )
        blob = _join(self.options.folder, file_name)
        sas_uri, token, container = self._sas()
        try:
            return self._put(local, blob, size, sas_uri, token, container)
        except VendorAuthError as exc:
            if exc.code != SAS_REFUSED:
                raise
            logger.warning(
                "%s: the Data Landing Zone refused the SAS for container %s (%s); "
                "fetching fresh credentials and retrying the upload of %s once",
                self.vendor,
                container,
                exc.detail,
                blob,
            )
        sas_uri, token, container = self._sas()
        try:
            return self._put(local, blob, size, sas_uri, token, container)
        except VendorAuthError as exc:
            if exc.code != SAS_REFUSED:
                raise
            raise VendorAuthError(
                self.vendor,
                "PUT",
                f"Data Landing Zone container {container}, blob {blob}",
                status=exc.status,
                code=SAS_REFUSED,
                detail=(
                    "the container's SAS was refused again with freshly fetched credentials "
                    f"({exc.detail}); it expired or was revoked before the upload started: "
                    "check the landing zone credentials in Platform and this host's clock"
                ),
            ) from None

    def _sas(self) -> tuple[str, str, str]:
        """The current SAS URI, token and container, registered as secrets before any use."""
        creds = self._credentials()
        sas_uri = str(creds.get("SASUri") or "")
        token = str(creds.get("SASToken") or "")
        container = str(creds.get("containerName") or "")
        register_secret(sas_uri, token, *_sas_signatures(token), *_sas_signatures(sas_uri.partition("?")[2]))
        if not sas_uri or not container:
            raise VendorError(
                self.vendor, "GET", "landing zone credentials", code="unexpected_response", detail="no SASUri"
            )
        return sas_uri, token, container

    def _put(self, local: Path, blob: str, size: int, sas_uri: str, token: str, container: str) -> StoredFile:
        base, _, query = sas_uri.partition("?")
        url = f"{base.rstrip('/')}/{quote(blob)}?{query or token}"
        with (
            VendorHTTP(
                self.vendor,
                base,
                secrets=[sas_uri, token],
                timeout=self._timeout,
                public_headers={"x-ms-blob-type": "BlockBlob"},
                transport=self._transport,
                error_parser=azure_error,
            ) as http,
            open(local, "rb") as body,
        ):
            response = http.request(
                "PUT", url, content=body, headers={"Content-Type": "text/csv"}, expected=(201,)
            )
        return StoredFile(
            path=_join(container, blob),
            cloud_type="DLZ",
            modified_at=_http_date(response.headers.get("Last-Modified")),
            size=size,
        )


_AZURE_TAGS = ("Code", "Message", "AuthenticationErrorDetail")


def azure_error(response: httpx.Response) -> tuple[str | None, str]:
    """``(code, message)`` of an Azure Storage error: ``x-ms-error-code`` or the XML ``<Code>``,
    and ``<Message>`` plus ``<AuthenticationErrorDetail>`` (why a SAS was refused)."""
    text = response.text
    found = {tag: re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL) for tag in _AZURE_TAGS}
    header_code = response.headers.get("x-ms-error-code")
    if not any(found.values()):
        code, message = parse_error_body(response)
        return header_code or code, message
    code = header_code or (found["Code"].group(1) if found["Code"] else None)
    parts = [m.group(1) for tag, m in found.items() if tag != "Code" and m is not None]
    return code, " ".join(" ".join(html.unescape(p).split()) for p in parts)


def _sas_signatures(token: str) -> list[str]:
    return [part.partition("=")[2] for part in token.split("&") if part.startswith("sig=")]


def _http_date(value: str | None) -> float:
    if not value:
        raise ValueError("the storage answered without Last-Modified; cannot bound the run's data window")
    return parsedate_to_datetime(value).timestamp()


class S3Storage:
    """Writes the CSV to ``s3://bucket/prefix/file_name`` with boto3 (credentials: explicit or
    boto3's default chain)."""

    def __init__(
        self,
        vendor: str,
        options: S3StorageOptions,
        *,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        client: Any = None,
    ) -> None:
        self.vendor = vendor
        self.options = options
        register_secret(secret_access_key)
        if client is None:
            import boto3

            client = boto3.client(
                "s3",
                endpoint_url=options.endpoint_url,
                region_name=options.region,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
            )
        self._client = client

    def upload(self, local: Path, file_name: str) -> StoredFile:
        from botocore.exceptions import BotoCoreError, ClientError

        key = _join(self.options.prefix, file_name)
        where = f"s3://{self.options.bucket}/{key}"
        try:
            self._client.upload_file(
                str(local), self.options.bucket, key, ExtraArgs={"ContentType": "text/csv"}
            )
            head = self._client.head_object(Bucket=self.options.bucket, Key=key)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise VendorError(
                self.vendor,
                "PUT",
                where,
                code=str(error.get("Code") or "s3_error"),
                detail=redact(str(error.get("Message") or exc)),
            ) from None
        except (BotoCoreError, OSError) as exc:
            raise VendorError(self.vendor, "PUT", where, code="s3_error", detail=redact(str(exc))) from None
        return StoredFile(
            path=_join(self.options.bucket, key),
            cloud_type="S3",
            modified_at=head["LastModified"].timestamp(),
            size=int(head["ContentLength"]),
            base_connection_id=self.options.base_connection_id,
        )

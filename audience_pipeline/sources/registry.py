"""One place that knows every source type and the Dagster resource it becomes."""

from __future__ import annotations

from urllib.parse import urlsplit

import dagster as dg

from audience_pipeline.destinations.registry import config_value
from audience_pipeline.feeds.model import (
    FolderSource,
    HttpReportSource,
    S3Source,
    SecretRef,
    SftpSource,
    SourceConfig,
)
from audience_pipeline.redact import redact_url


def _optional(value):
    return None if value is None else config_value(value)


def _drop_options(config: FolderSource | SftpSource | S3Source) -> dict:
    return {
        "glob": config.glob,
        "ready_marker": config.ready_marker,
        "stable_after_seconds": config.stable_after_seconds,
        "move_processed_to": config.move_processed_to,
    }


def describe_source(config: SourceConfig) -> str:
    """Where a feed's files come from, for descriptions when the code location loads: the folder,
    bucket, host or report address, never a credential (nor a user name); ``${VAR}`` values are
    shown by name, as they are not resolved yet."""
    if isinstance(config, FolderSource):
        return f"folder {config.path} ({config.glob})"
    if isinstance(config, SftpSource):
        return f"sftp {config.host}:{config.port} {config.remote_dir} ({config.glob})"
    if isinstance(config, S3Source):
        prefix = config.prefix.strip("/")
        return f"s3://{config.bucket}/{prefix + '/' if prefix else ''} ({config.glob})"
    if isinstance(config, HttpReportSource):
        return f"report {config.method} {source_url(config) or config.url}"
    raise TypeError(f"unknown source type {config.type!r}")


def source_url(config: SourceConfig) -> str | None:
    """A report source's address as a link: scheme, host and path only (user info, query and
    fragment may hold a token); ``None`` for other sources and for a ``${VAR}`` address."""
    if not isinstance(config, HttpReportSource) or isinstance(config.url, SecretRef):
        return None
    parts = urlsplit(config.url)
    port = f":{parts.port}" if parts.port else ""
    return redact_url(f"{parts.scheme}://{parts.hostname}{port}{parts.path}")


def build_source_resource(config: SourceConfig) -> dg.ConfigurableResource:
    if isinstance(config, FolderSource):
        from audience_pipeline.sources.folder import FolderSourceResource

        return FolderSourceResource(path=config_value(config.path), **_drop_options(config))
    if isinstance(config, SftpSource):
        from audience_pipeline.sources.sftp import SftpSourceResource

        return SftpSourceResource(
            host=config_value(config.host),
            port=config.port,
            username=config_value(config.username),
            password=_optional(config.password),
            private_key=_optional(config.private_key),
            private_key_passphrase=_optional(config.private_key_passphrase),
            known_hosts=_optional(config.known_hosts),
            host_key_checking=config.host_key_checking,
            remote_dir=config.remote_dir,
            timeout_seconds=config.timeout_seconds,
            **_drop_options(config),
        )
    if isinstance(config, S3Source):
        from audience_pipeline.sources.s3 import S3SourceResource

        return S3SourceResource(
            bucket=config_value(config.bucket),
            prefix=config.prefix,
            endpoint_url=_optional(config.endpoint_url),
            region=config.region,
            access_key_id=_optional(config.access_key_id),
            secret_access_key=_optional(config.secret_access_key),
            session_token=_optional(config.session_token),
            tag_processed=config.tag_processed,
            timeout_seconds=config.timeout_seconds,
            **_drop_options(config),
        )
    if isinstance(config, HttpReportSource):
        from audience_pipeline.sources.http_report import HttpReportSourceResource

        return HttpReportSourceResource(
            url=config_value(config.url),
            file_name=config.file_name,
            method=config.method,
            body=config.body,
            content_type=config.content_type,
            headers=dict(config.headers),
            username=_optional(config.username),
            password=_optional(config.password),
            token=_optional(config.token),
            timeout_seconds=config.timeout_seconds,
        )
    raise TypeError(f"unknown source type {config.type!r}")

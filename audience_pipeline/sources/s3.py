"""An S3 (or S3-compatible) prefix that HR exports are written to.

- ``prefix`` is treated as a folder: only objects directly under it are listed (a
  ``processed/`` sub-prefix is never re-listed). The file name is the key below the prefix.
- An S3 object only becomes visible once its upload is complete (PUT and multipart alike),
  so ``stable_after_seconds`` defaults to 0: an object is ready when first listed. Set it, or
  ``ready_marker``, if a writer replaces objects in several steps.
- Credentials: ``access_key_id``/``secret_access_key`` (and ``session_token``) from ``${VAR}``,
  or none to use the default AWS chain (instance role, ``AWS_PROFILE``…). ``endpoint_url``
  points at MinIO/Ceph or a test server. Errors name the bucket and the S3 error code, never a key.
- After an import is submitted an object can be moved (copy + delete) to
  ``move_processed_to`` (a prefix below ``prefix``) and/or tagged with ``tag_processed``
  (``key=value``, which lifecycle rules can act on). ``open`` also looks in the processed prefix.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import dagster as dg

from audience_pipeline.redact import redact, register_secret
from audience_pipeline.sources.base import SourceFile, SourceUnavailable, check_name, select_files


class S3SourceResource(dg.ConfigurableResource):
    bucket: str
    prefix: str = ""
    glob: str = "*.csv"
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    ready_marker: str | None = None
    stable_after_seconds: float = 0.0
    move_processed_to: str | None = None
    tag_processed: str | None = None
    timeout_seconds: float = 30.0

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self._prefix()}{where} ({self.glob})"

    def _prefix(self) -> str:
        prefix = self.prefix.strip("/")
        return f"{prefix}/" if prefix else ""

    def _processed_prefix(self) -> str | None:
        if not self.move_processed_to:
            return None
        return f"{self._prefix()}{self.move_processed_to.strip('/')}/"

    def _client(self) -> Any:
        import boto3
        from botocore.config import Config

        register_secret(self.secret_access_key, self.session_token)
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url or None,
            region_name=self.region or None,
            aws_access_key_id=self.access_key_id or None,
            aws_secret_access_key=self.secret_access_key or None,
            aws_session_token=self.session_token or None,
            config=Config(
                connect_timeout=min(self.timeout_seconds, 10),
                read_timeout=self.timeout_seconds,
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )

    def _error(self, action: str, exc: Exception) -> SourceUnavailable:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
        reason = f"{code}" if code else f"{type(exc).__name__}: {exc}"
        return SourceUnavailable(f"s3://{self.bucket}/{self._prefix()}: cannot {action}: {redact(reason)}")

    def list_files(self) -> list[SourceFile]:
        from botocore.exceptions import BotoCoreError, ClientError

        prefix = self._prefix()
        entries = []
        try:
            pages = (
                self._client()
                .get_paginator("list_objects_v2")
                .paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/")
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix) :]
                    if name:
                        entries.append((name, int(obj["Size"]), int(obj["LastModified"].timestamp() * 1e9)))
        except (BotoCoreError, ClientError) as exc:
            raise self._error("list objects", exc) from None
        return select_files(entries, self.glob, self.ready_marker)

    def open(self, name: str) -> BinaryIO:
        from botocore.exceptions import BotoCoreError, ClientError

        check_name(name, self.describe())
        client = self._client()
        keys = [f"{self._prefix()}{name}"]
        if self._processed_prefix():
            keys.append(f"{self._processed_prefix()}{name}")
        for key in keys:
            try:
                return client.get_object(Bucket=self.bucket, Key=key)["Body"]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    continue
                raise self._error(f"read {name}", exc) from None
            except BotoCoreError as exc:
                raise self._error(f"read {name}", exc) from None
        raise FileNotFoundError(f"{name!r} is not an object in {self.describe()}")

    def processed_action(self) -> str | None:
        actions = []
        if self._processed_prefix():
            actions.append(f"move to s3://{self.bucket}/{self._processed_prefix()}")
        if self.tag_processed:
            actions.append(f"tag {self.tag_processed}")
        return " and ".join(actions) or None

    def mark_processed(self, name: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        check_name(name, self.describe())
        client = self._client()
        key = f"{self._prefix()}{name}"
        try:
            if self.tag_processed:
                tag_key, _, tag_value = self.tag_processed.partition("=")
                tags = client.get_object_tagging(Bucket=self.bucket, Key=key)["TagSet"]
                tags = [t for t in tags if t["Key"] != tag_key] + [{"Key": tag_key, "Value": tag_value}]
                client.put_object_tagging(Bucket=self.bucket, Key=key, Tagging={"TagSet": tags})
            target = self._processed_prefix()
            if target:
                names = [name]
                if self.ready_marker:
                    names += self._marker_names(name)
                for item in names:
                    source_key = f"{self._prefix()}{item}"
                    try:
                        client.copy_object(
                            Bucket=self.bucket,
                            Key=f"{target}{item}",
                            CopySource={"Bucket": self.bucket, "Key": source_key},
                            TaggingDirective="COPY",
                        )
                    except ClientError as exc:
                        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                            continue
                        raise
                    client.delete_object(Bucket=self.bucket, Key=source_key)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(f"mark {name} processed", exc) from None

    def _marker_names(self, name: str) -> list[str]:
        stem = name.rsplit(".", 1)[0]
        return [n for n in (f"{name}{self.ready_marker}", f"{stem}{self.ready_marker}") if n != name]

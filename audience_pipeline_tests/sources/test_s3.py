"""The S3 source against moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from audience_pipeline.sources.base import SourceUnavailable, stage
from audience_pipeline.sources.s3 import S3SourceResource
from audience_pipeline_tests.conftest import S3Server

BUCKET = "hr-exports"


def _source(s3: S3Server, **overrides) -> S3SourceResource:
    options = {
        "bucket": BUCKET,
        "prefix": "workday/outbound",
        "endpoint_url": s3.endpoint_url,
        "region": s3.region,
        "access_key_id": s3.access_key_id,
        "secret_access_key": s3.secret_access_key,
        "timeout_seconds": 5.0,
    }
    return S3SourceResource(**{**options, **overrides})


@pytest.fixture
def bucket(s3: S3Server):
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    return client


def test_lists_objects_directly_under_the_prefix(s3: S3Server, bucket) -> None:
    for key in (
        "workday/outbound/employees.csv",
        "workday/outbound/readme.txt",
        "workday/outbound/processed/old.csv",
        "workday/outbound-other/x.csv",
        "workday/outbound/.tmp.csv",
    ):
        bucket.put_object(Bucket=BUCKET, Key=key, Body=b"id\n1\n")

    files = _source(s3).list_files()

    assert [(f.name, f.size, f.marked) for f in files] == [("employees.csv", 5, None)]
    assert files[0].modified_ns > 0
    assert _source(s3, prefix="/workday/outbound/").list_files() == files


def test_streams_an_object_into_staging(s3: S3Server, bucket, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    bucket.put_object(Bucket=BUCKET, Key="workday/outbound/big.csv", Body=data)

    staged = stage(_source(s3), "big.csv", tmp_path)

    assert staged.sha256 == hashlib.sha256(data).hexdigest() and staged.size == len(data)


def test_ready_marker_move_and_tag_processed(s3: S3Server, bucket) -> None:
    def put(key: str, body: bytes = b"id\n1\n") -> None:
        bucket.put_object(Bucket=BUCKET, Key=f"workday/outbound/{key}", Body=body)

    put("a.csv")
    put("b.csv", b"id\n2\n")
    put("b.ok", b"")
    source = _source(s3, ready_marker=".ok", move_processed_to="processed", tag_processed="audience=imported")

    assert [(f.name, f.marked) for f in source.list_files()] == [("a.csv", False), ("b.csv", True)]
    assert source.processed_action() == (
        f"move to s3://{BUCKET}/workday/outbound/processed/ and tag audience=imported"
    )

    source.mark_processed("b.csv")

    keys = sorted(o["Key"] for o in bucket.list_objects_v2(Bucket=BUCKET)["Contents"])
    assert keys == [
        "workday/outbound/a.csv",
        "workday/outbound/processed/b.csv",
        "workday/outbound/processed/b.ok",
    ]
    tags = bucket.get_object_tagging(Bucket=BUCKET, Key="workday/outbound/processed/b.csv")["TagSet"]
    assert tags == [{"Key": "audience", "Value": "imported"}]
    with source.open("b.csv") as fh:  # re-processing finds the moved object
        assert fh.read() == b"id\n2\n"


def test_tag_only_keeps_the_object_in_place(s3: S3Server, bucket) -> None:
    bucket.put_object(Bucket=BUCKET, Key="workday/outbound/a.csv", Body=b"x")
    source = _source(s3, tag_processed="processed=true")

    source.mark_processed("a.csv")

    assert [f.name for f in source.list_files()] == ["a.csv"]
    tags = bucket.get_object_tagging(Bucket=BUCKET, Key="workday/outbound/a.csv")["TagSet"]
    assert tags == [{"Key": "processed", "Value": "true"}]


def test_missing_bucket_and_object_errors_name_them_without_credentials(s3: S3Server, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    source = _source(s3, bucket="no-such-bucket")
    with pytest.raises(SourceUnavailable, match=r"s3://no-such-bucket/workday/outbound/: .*NoSuchBucket"):
        source.list_files()
    s3.client().create_bucket(Bucket=BUCKET)
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        _source(s3).open("missing.csv")
    assert s3.secret_access_key not in caplog.text


def test_unreachable_endpoint_is_an_error_naming_the_bucket() -> None:
    source = S3SourceResource(
        bucket=BUCKET,
        endpoint_url="http://127.0.0.1:9",
        region="us-east-1",
        access_key_id="AKIAEXAMPLE",
        secret_access_key="unreachable-secret-1f2e3d",
        timeout_seconds=1.0,
    )
    with pytest.raises(SourceUnavailable) as info:
        source.list_files()
    assert f"s3://{BUCKET}/" in str(info.value) and "EndpointConnectionError" in str(info.value)
    assert "unreachable-secret-1f2e3d" not in str(info.value)

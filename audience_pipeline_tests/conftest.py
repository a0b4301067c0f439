"""Fixtures shared across test folders: a real S3 (moto's server mode) and the vendor sandboxes,
all on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from audience_pipeline_tests.postgres import PostgresCluster, find_bin_dir, missing_requirement
from audience_pipeline_tests.sandboxes import SandboxPool

S3_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """moto's S3 over real HTTP: clients reach it with ``endpoint_url`` and any credentials."""

    endpoint_url: str
    access_key_id: str = "testing-access-key"
    secret_access_key: str = "testing-secret-key-3b9f2c"
    region: str = S3_REGION

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )

    def storage_env(self) -> dict[str, str]:
        """The standard AWS variables a deployment sets for the pipeline's ``s3://`` storage."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": self.region,
        }

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def reset(self) -> None:
        """Drop every bucket (moto's reset route), so tests do not see each other's objects."""
        import httpx

        httpx.post(f"{self.endpoint_url}/moto-api/reset", timeout=5).raise_for_status()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto server per test session, bound to 127.0.0.1 on a free port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(endpoint_url=f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: S3Server) -> S3Server:
    """The shared S3 server, emptied before the test."""
    s3_server.reset()
    return s3_server


STORAGE_BUCKET = "audience-pipeline-store"


@pytest.fixture
def s3_storage(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """The pipeline's storage on moto: a new bucket, the AWS variables set in this process; its URL."""
    s3.client().create_bucket(Bucket=STORAGE_BUCKET)
    for name, value in s3.storage_env().items():
        monkeypatch.setenv(name, value)
    return f"s3://{STORAGE_BUCKET}/prod"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster per test session (initdb in a temp folder, a free port on
    127.0.0.1), stopped and deleted at the end. Without the server binaries or psycopg2 the tests
    that need it are skipped, except under CI (``$CI`` set), where they fail: CI installs both."""
    problem = missing_requirement()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL for these tests: {problem}", pytrace=False)
        pytest.skip(problem)
    bin_dir = find_bin_dir()
    assert bin_dir is not None
    with PostgresCluster.running(bin_dir) as cluster:
        yield cluster


@pytest.fixture
def postgres_database(postgres_server: PostgresCluster) -> str:
    """A new database on the session's cluster for one test, holding Dagster's empty tables."""
    return postgres_server.create_database(template=postgres_server.dagster_template())


@pytest.fixture(scope="session")
def sandbox_pool() -> Iterator[SandboxPool]:
    """Sandboxes by settings, kept for the session; folders pick theirs with ``sandbox_settings``."""
    pool = SandboxPool()
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture
def per_row_phones(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The values that reach ``phonenumbers`` one by one (the slow path), in order."""
    from audience_pipeline import phones

    seen: list[str] = []
    real = phones.parse_phone

    def spy(value: str, region: str | None) -> str | None:
        seen.append(value)
        return real(value, region)

    monkeypatch.setattr(phones, "parse_phone", spy)
    return seen

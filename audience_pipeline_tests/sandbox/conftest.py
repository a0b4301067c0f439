"""Shared sandbox fixtures: one real server per settings for the session, reset before each test.

A module that needs other credentials or limits overrides ``sandbox_settings``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from audience_pipeline.sandbox import SandboxServer, SandboxSettings
from audience_pipeline_tests.sandbox.polling import poll_until
from audience_pipeline_tests.sandboxes import SandboxPool

PACE = 0.05
API_KEY = "test-cxi-key"
TERMINAL = ("completed", "failed")


@pytest.fixture
def sandbox_settings() -> SandboxSettings:
    return SandboxSettings(pace_seconds=PACE, cxi_api_key=API_KEY)


@pytest.fixture
def sandbox_server(sandbox_pool: SandboxPool, sandbox_settings: SandboxSettings) -> SandboxServer:
    """The running server for this module's settings, as the previous test left it."""
    return sandbox_pool.get(sandbox_settings)


@pytest.fixture
def sandbox(sandbox_server: SandboxServer) -> SandboxServer:
    sandbox_server.reset()
    return sandbox_server


@pytest.fixture
def cxi(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    """A client authenticated like the real CXI client, rooted at the vendor prefix."""
    with httpx.Client(
        base_url=sandbox.vendor_url("cxi"), headers={"X-GSCC-Api-Key": API_KEY}, timeout=5
    ) as client:
        yield client


def poll_job(
    client: httpx.Client, job_id: str, base: str = "/public-api/audience-imports"
) -> list[dict[str, Any]]:
    """Every status answer seen until the job ends, polling fast enough to see each state."""

    def fetch() -> dict[str, Any]:
        response = client.get(f"{base}/async-jobs/{job_id}/status")
        assert response.status_code == 200, response.text
        return response.json()["data"]

    return poll_until(
        fetch, lambda data: data["status"] in TERMINAL, what=f"job {job_id}", timeout=5, interval=PACE / 10
    )

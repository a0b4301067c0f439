"""Shared sandbox fixtures: one real server per session, state reset before each test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from audience_pipeline.sandbox import SandboxServer, SandboxSettings

PACE = 0.05
API_KEY = "test-cxi-key"
TERMINAL = ("completed", "failed")


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxSettings(pace_seconds=PACE, cxi_api_key=API_KEY)) as server:
        yield server


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
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        response = client.get(f"{base}/async-jobs/{job_id}/status")
        assert response.status_code == 200, response.text
        seen.append(response.json()["data"])
        if seen[-1]["status"] in TERMINAL:
            return seen
        time.sleep(PACE / 10)
    raise AssertionError(f"job {job_id} did not end: {seen[-1]}")

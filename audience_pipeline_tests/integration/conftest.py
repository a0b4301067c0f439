"""A real sandbox on 127.0.0.1, a real Dagster instance and a feeds file in a temp folder."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import httpx
import pytest

from audience_pipeline.definitions import build_definitions
from audience_pipeline.feeds.loader import DEMO_FEEDS, load_feeds
from audience_pipeline.feeds.model import FeedsFile
from audience_pipeline.runner import SensorDriver
from audience_pipeline.sandbox import SandboxServer, SandboxSettings

API_KEY = "itest-key-7f3a9c2e51"
DEMO_CSV = DEMO_FEEDS.parent / "incoming" / "employees_2026-11-01.csv"
FEED = "all_staff_cxi"


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxSettings(pace_seconds=0.05, cxi_api_key=API_KEY)) as server:
        yield server


@dataclass
class Pipeline:
    """One feed wired to the sandbox: drop files, tick sensors, read what happened."""

    root: Path
    incoming: Path
    feeds: FeedsFile
    defs: dg.Definitions
    instance: dg.DagsterInstance
    driver: SensorDriver
    sandbox: SandboxServer

    def drop(self, name: str, content: bytes | str | Path) -> Path:
        if isinstance(content, Path):
            content = content.read_bytes()
        if isinstance(content, str):
            content = content.encode("utf-8")
        path = self.incoming / name
        path.write_bytes(content)
        return path

    def ingest(self) -> list[dg.DagsterRun]:
        return self.driver.tick(f"{FEED}__new_files")

    def wait_for_reports(self, expected: int = 1, timeout: float = 20.0) -> list[dg.DagsterRun]:
        runs: list[dg.DagsterRun] = []
        deadline = time.monotonic() + timeout
        while len(runs) < expected and time.monotonic() < deadline:
            runs += self.driver.tick(f"{FEED}__import_status")
            time.sleep(0.05)
        assert len(runs) == expected, f"expected {expected} report runs, got {len(runs)}"
        return runs

    def cxi(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.sandbox.vendor_url("cxi"), headers={"X-GSCC-Api-Key": API_KEY}, timeout=5
        )

    def imports(self) -> list[dict]:
        with self.cxi() as client:
            return client.get("/public-api/audience-imports").json()["data"]["audienceImports"]


def write_feeds(root: Path, *, max_rejection_rate: float = 0.05, extra_mapping: str = "") -> Path:
    text = DEMO_FEEDS.read_text("utf-8")
    text = text.replace("path: incoming ", f"path: {root / 'incoming'} ")
    text = text.replace("max_rejection_rate: 0.05", f"max_rejection_rate: {max_rejection_rate}")
    if extra_mapping:
        text = text.replace(
            "        office_city: Office City\n", f"        office_city: Office City\n{extra_mapping}"
        )
    path = root / "feeds.yaml"
    path.write_text(text, "utf-8")
    return path


@pytest.fixture
def pipeline_factory(tmp_path: Path, sandbox_server: SandboxServer, monkeypatch: pytest.MonkeyPatch):
    for name, vendor in sandbox_server.app.vendors.items():
        for var, value in vendor.demo_env(sandbox_server.vendor_url(name)).items():
            monkeypatch.setenv(var, value)
    sandbox_server.reset()
    stack: list = []

    def make(**feed_kwargs) -> Pipeline:
        root = tmp_path
        (root / "incoming").mkdir(exist_ok=True)
        feeds = load_feeds(write_feeds(root, **feed_kwargs))
        defs = build_definitions(feeds, root / "home")
        (root / "dagster").mkdir(exist_ok=True)
        cm = dg.instance_for_test(temp_dir=str(root / "dagster"))
        instance = cm.__enter__()
        stack.append(cm)
        return Pipeline(
            root,
            root / "incoming",
            feeds,
            defs,
            instance,
            SensorDriver(defs, instance, log_level="WARNING"),
            sandbox_server,
        )

    yield make
    for cm in stack:
        cm.__exit__(None, None, None)


@pytest.fixture
def pipeline(pipeline_factory) -> Pipeline:
    return pipeline_factory()


def copy_demo(dest: Path) -> Path:
    shutil.copy(DEMO_CSV, dest)
    return dest

"""One pipeline harness for every feed: a real sandbox on 127.0.0.1, a real Dagster instance and a
feeds file in a temp folder, driven tick by tick like the daemon would.

A module that needs other sandbox credentials or limits overrides ``sandbox_settings``; a test
that needs another feed passes its name and, unless the demo has it, its own ``feeds_text``.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
import httpx
import pytest

from audience_pipeline.assets import ACCOUNTING_CHECK, latest_metadata
from audience_pipeline.definitions import build_definitions
from audience_pipeline.feeds.loader import DEMO_FEEDS, load_feeds, register_feed_secrets
from audience_pipeline.feeds.model import FeedsFile
from audience_pipeline.runner import SensorDriver
from audience_pipeline.sandbox import SandboxServer, SandboxSettings
from audience_pipeline_tests.postgres import deploy_config
from audience_pipeline_tests.sandboxes import SandboxPool

if TYPE_CHECKING:
    from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecord

API_KEY = "itest-key-7f3a9c2e51"
DEMO_CSV = DEMO_FEEDS.parent / "incoming" / "employees_2026-11-01.csv"
FEED = "all_staff_cxi"
SETTINGS = SandboxSettings(pace_seconds=0.05, cxi_api_key=API_KEY)
INGEST_TICKS = 3  # a file first seen mid-copy needs another listing before it is read
DEMO_MAPPING = """\
    mapping:
      unique_id: Employee ID
      email: Email
      mobile_phone: Mobile Phone
      first_name: First Name
      last_name: Last Name
      attributes:
        department: Department
        start_date: {header: Start Date, type: date}
        office_city: Office City
"""
"""The demo feed's mapping of the sample export, indented for a feed in a test's feeds file."""


@pytest.fixture
def sandbox_settings() -> SandboxSettings:
    """The sandbox this test runs against; a module overrides it for other credentials or limits."""
    return SETTINGS


@pytest.fixture
def sandbox_server(sandbox_pool: SandboxPool, sandbox_settings: SandboxSettings) -> SandboxServer:
    return sandbox_pool.get(sandbox_settings)


@dataclass
class Pipeline:
    """One feed wired to the sandbox: drop files, tick sensors, read what happened."""

    feed: str
    root: Path
    feeds: FeedsFile
    defs: dg.Definitions
    instance: dg.DagsterInstance
    driver: SensorDriver
    sandbox: SandboxServer
    report_timeout: float = 20.0

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    def key(self, asset: str) -> dg.AssetKey:
        return dg.AssetKey([self.feed, asset])

    def drop(self, name: str, content: bytes | str | Path) -> Path:
        if isinstance(content, Path):
            content = content.read_bytes()
        if isinstance(content, str):
            content = content.encode("utf-8")
        path = self.incoming / name
        path.write_bytes(content)
        return path

    def ingest(self) -> list[dg.DagsterRun]:
        """Tick the new-file sensor until it launches runs, at most ``INGEST_TICKS`` times."""
        for _ in range(INGEST_TICKS):
            runs = self.driver.tick(f"{self.feed}__new_files")
            if runs:
                return runs
        return []

    def wait_for_reports(self, expected: int = 1, timeout: float | None = None) -> list[dg.DagsterRun]:
        """Tick the status sensor until ``expected`` report runs started (or the time is up)."""
        runs: list[dg.DagsterRun] = []
        deadline = time.monotonic() + (self.report_timeout if timeout is None else timeout)
        while len(runs) < expected and time.monotonic() < deadline:
            runs += self.driver.tick(f"{self.feed}__import_status")
            time.sleep(0.05)
        assert len(runs) == expected, f"expected {expected} report runs, got {len(runs)}"
        return runs

    def partitions(self) -> list[str]:
        return self.instance.get_dynamic_partitions(f"{self.feed}__files")

    def find_metadata(self, asset: str, partition: str | None = None) -> dict[str, Any] | None:
        """The asset's latest metadata for ``partition`` (default: the newest), or None."""
        partition = partition or self.partitions()[-1]
        return latest_metadata(self.instance, self.key(asset), partition)

    def metadata(self, asset: str, partition: str | None = None) -> dict[str, Any]:
        """Like :meth:`find_metadata`, for an asset that must have been materialized."""
        found = self.find_metadata(asset, partition)
        assert found is not None, f"{asset} was not materialized for {partition or 'the newest partition'}"
        return found

    def report_rows(self, partition: str | None = None) -> list[dict[str, str]]:
        """The failure report CSV of ``partition`` (default: the newest)."""
        path = self.metadata("failure_report", partition)["report_path"]
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def check(self, asset: str, name: str) -> AssetCheckExecutionRecord | None:
        key = dg.AssetCheckKey(self.key(asset), name)
        return self.instance.event_log_storage.get_latest_asset_check_execution_by_key([key]).get(key)

    def accounting_passed(self) -> bool:
        check = self.check("failure_report", ACCOUNTING_CHECK)
        assert check is not None, "the accounting check never ran"
        return check.status.value == "SUCCEEDED"

    def step_failures(self, run: dg.DagsterRun) -> list[tuple[str, str]]:
        """(step key, error message) of each step that failed in ``run``."""
        records = self.instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
        events = [record.event_log_entry.dagster_event for record in records.records]
        return [(e.step_key, e.event_specific_data.error.message) for e in events if e is not None]

    def control(self, vendor: str, path: str, json: Any = None, *, method: str | None = None) -> Any:
        """Call a vendor's sandbox control route: GET, or POST when there is a body."""
        method = method or ("GET" if json is None else "POST")
        url = f"{self.sandbox.url}/_sandbox/{vendor}/{path.lstrip('/')}"
        response = httpx.request(method, url, json=json, timeout=10)
        response.raise_for_status()
        return response.json()

    def cxi(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.sandbox.vendor_url("cxi"), headers={"X-GSCC-Api-Key": API_KEY}, timeout=5
        )

    def imports(self) -> list[dict]:
        with self.cxi() as client:
            return client.get("/public-api/audience-imports").json()["data"]["audienceImports"]


def demo_feeds(*, max_rejection_rate: float = 0.05, extra_mapping: str = "") -> str:
    """The bundled demo feeds file, its folder relative to the feeds file as in the demo."""
    text = DEMO_FEEDS.read_text("utf-8")
    text = text.replace("max_rejection_rate: 0.05", f"max_rejection_rate: {max_rejection_rate}")
    if extra_mapping:
        text = text.replace(
            "        office_city: Office City\n", f"        office_city: Office City\n{extra_mapping}"
        )
    return text


PipelineFactory = Callable[..., Pipeline]


@pytest.fixture
def dagster_storage() -> str:
    """The pipelines' instance storage: ``sqlite`` (Dagster's default) here; ``test_postgres.py``
    overrides it to run the same scenarios on ``postgres``."""
    return "sqlite"


@pytest.fixture
def instance_overrides(
    dagster_storage: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any] | None:
    """The pipelines' ``dagster.yaml``: Dagster's defaults for SQLite; for Postgres the project's
    ``deploy/dagster.yaml`` itself, its ``DAGSTER_PG_*`` variables naming a new database."""
    if dagster_storage == "sqlite":
        return None
    assert dagster_storage == "postgres", dagster_storage
    database = request.getfixturevalue("postgres_database")
    for name, value in request.getfixturevalue("postgres_server").env(database).items():
        monkeypatch.setenv(name, value)
    return deploy_config()


@pytest.fixture
def pipeline_factory(
    tmp_path: Path,
    sandbox_server: SandboxServer,
    monkeypatch: pytest.MonkeyPatch,
    instance_overrides: dict[str, Any] | None,
) -> Iterator[PipelineFactory]:
    """Builds pipelines in ``tmp_path``; every vendor's credentials are in the environment first."""
    for name, vendor in sandbox_server.app.vendors.items():
        for var, value in vendor.demo_env(sandbox_server.vendor_url(name)).items():
            monkeypatch.setenv(var, value)
    sandbox_server.reset()

    with ExitStack() as stack:

        def make(
            feed: str = FEED,
            *,
            feeds_text: str | None = None,
            register_secrets: bool = False,
            log_level: str = "WARNING",
            report_timeout: float = 20.0,
        ) -> Pipeline:
            """``feeds_text`` (default: the demo) reads files from ``incoming`` beside it;
            ``register_secrets`` teaches the redactor the feed's secrets as ``defs()`` does."""
            (tmp_path / "incoming").mkdir(exist_ok=True)
            (tmp_path / "dagster").mkdir(exist_ok=True)
            path = tmp_path / "feeds.yaml"
            path.write_text(demo_feeds() if feeds_text is None else feeds_text, "utf-8")
            feeds = load_feeds(path)
            if register_secrets:
                register_feed_secrets(feeds)
            defs = build_definitions(feeds, tmp_path / "home")
            instance = stack.enter_context(
                dg.instance_for_test(temp_dir=str(tmp_path / "dagster"), overrides=instance_overrides)
            )
            driver = SensorDriver(defs, instance, log_level=log_level)
            return Pipeline(feed, tmp_path, feeds, defs, instance, driver, sandbox_server, report_timeout)

        yield make


@pytest.fixture
def pipeline(pipeline_factory: PipelineFactory) -> Pipeline:
    return pipeline_factory()

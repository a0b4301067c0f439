"""``audience-pipeline sync`` as a person runs it — its own process, killed with ``kill -9`` at the
worst moments, twice at once, racing a materialization — against a real Communicate XI sandbox
that counts what it received. The next ``sync`` must finish the work without a duplicate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from audience_pipeline.assets import FeedKeys
from audience_pipeline.definitions import build_definitions
from audience_pipeline.feeds.loader import load_feeds
from audience_pipeline.sandbox import SandboxServer, SandboxSettings
from audience_pipeline_tests.integration.conftest import API_KEY, DEMO_CSV, FEED
from audience_pipeline_tests.integration.faults import (
    assert_nothing_lost,
    cxi_feeds,
    imports_received,
    states,
)
from audience_pipeline_tests.sandboxes import SandboxPool

pytestmark = pytest.mark.integration

SLOW = SandboxSettings(pace_seconds=1.5, cxi_api_key=API_KEY)
"""Jobs take about 3 s: long enough to kill ``sync`` while it polls."""


@dataclass
class Sync:
    root: Path
    sandbox: SandboxServer
    env: dict[str, str]

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def feeds_path(self) -> Path:
        return self.root / "feeds.yaml"

    def start(self, *, timeout: float = 30.0) -> subprocess.Popen:
        command = [
            sys.executable, "-m", "audience_pipeline.cli", "sync",
            "--feeds", str(self.feeds_path), "--home", str(self.home),
            "--timeout", str(timeout), "--poll-interval", "0.1",
        ]  # fmt: skip
        return subprocess.Popen(
            command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.root
        )

    def run(self, *, timeout: float = 30.0) -> tuple[int, str, str]:
        process = self.start(timeout=timeout)
        out, err = process.communicate(timeout=timeout + 90)
        return process.returncode, out, err

    def kill_when(self, process: subprocess.Popen, ready: Callable[[], bool], limit: float = 60.0) -> None:
        deadline = time.monotonic() + limit
        while not ready():
            assert process.poll() is None, f"sync ended before the moment came: {process.communicate()}"
            assert time.monotonic() < deadline, "the moment to kill never came"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.local_temp(tempdir=str(self.home / "dagster"))

    def keys(self) -> FeedKeys:
        feeds = load_feeds(self.feeds_path)
        return FeedKeys(feeds.feeds[0], feeds)

    def proof(self) -> dict:
        instance = self.instance()
        try:
            return assert_nothing_lost(instance, self.keys(), self.sandbox)
        finally:
            instance.dispose()


def make_sync(root: Path, sandbox: SandboxServer, feeds_text: str) -> Sync:
    sandbox.reset()
    (root / "incoming").mkdir()
    (root / "incoming" / "employees_2026-11-01.csv").write_bytes(DEMO_CSV.read_bytes())
    old = time.time() - 3600
    os.utime(root / "incoming" / "employees_2026-11-01.csv", (old, old))
    (root / "feeds.yaml").write_text(feeds_text, "utf-8")
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    env.update(
        CXI_BASE_URL=sandbox.vendor_url("cxi"),
        CXI_API_KEY=API_KEY,
        ALERT_WEBHOOK_URL="http://127.0.0.1:9/hooks/unused",
    )
    return Sync(root, sandbox, env)


@pytest.fixture
def sync(tmp_path: Path, sandbox_server: SandboxServer) -> Sync:
    return make_sync(tmp_path, sandbox_server, cxi_feeds())


@pytest.fixture
def slow_sync(tmp_path: Path, sandbox_pool: SandboxPool) -> Iterator[Sync]:
    yield make_sync(tmp_path, sandbox_pool.get(SLOW), cxi_feeds())


def posted(sandbox: SandboxServer, status: int | None = 201) -> bool:
    return any(
        r["method"] == "POST" and r["status"] == status
        for r in sandbox.requests(vendor="cxi", path_contains="/audience-imports")
    )


def test_killed_after_the_intent_before_the_vendor_got_anything(sync: Sync) -> None:
    sync.sandbox.add_fault(vendor="cxi", method="GET", path_contains="/audience-imports", kind="delay",
                           delay_seconds=30)  # fmt: skip
    lock = sync.home / "locks" / "submit-cxi.lock"
    first = sync.start()
    sync.kill_when(first, lambda: lock.exists() and time.sleep(1.0) is None)

    assert imports_received(sync.sandbox) == []
    code, out, err = sync.run()

    assert code == 0, out + err
    assert "retry 2" in out
    sync.proof()


def test_killed_between_the_vendors_answer_and_the_record(sync: Sync) -> None:
    sync.sandbox.add_fault(vendor="cxi", method="POST", kind="delay", after=True, delay_seconds=30)
    first = sync.start()
    sync.kill_when(first, lambda: posted(sync.sandbox))

    code, out, err = sync.run()

    assert code == 0, out + err
    sync.proof()
    instance = sync.instance()
    try:
        records = instance.fetch_materializations(sync.keys().import_job, limit=1).records
        handle = records[0].asset_materialization.metadata["job_handle"].value
    finally:
        instance.dispose()
    assert handle["extra"]["adopted"] is True


def test_killed_while_polling_the_next_sync_finishes_it(slow_sync: Sync) -> None:
    first = slow_sync.start()
    slow_sync.kill_when(
        first, lambda: bool(slow_sync.sandbox.requests(vendor="cxi", path_contains="/status"))
    )

    code, out, err = slow_sync.run()

    assert code == 0, out + err
    assert "failure report for employees_2026-11-01.csv" in out
    slow_sync.proof()


def test_a_timed_out_sync_hands_over_to_the_next(slow_sync: Sync) -> None:
    code, out, _ = slow_sync.run(timeout=0.2)

    assert code == 1
    assert "import still running after 0 s; the next sync" in out

    code, out, err = slow_sync.run()

    assert code == 0, out + err
    assert "completed_with_failures" in out
    slow_sync.proof()


def test_two_syncs_at_once_import_once(sync: Sync) -> None:
    sync.sandbox.add_fault(vendor="cxi", method="POST", kind="delay", after=True, delay_seconds=1)
    processes = [sync.start(), sync.start()]
    results = [(p.wait(timeout=120), *p.communicate()) for p in processes]

    for code, out, err in results:
        assert code == 0, out + err
        assert "Traceback" not in err
    sync.proof()


def test_sync_racing_a_materialization_imports_once(sync: Sync, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in sync.env.items():
        monkeypatch.setenv(name, value)
    sync.sandbox.add_fault(vendor="cxi", method="POST", kind="delay", after=True, delay_seconds=2)
    process = sync.start()
    feeds = load_feeds(sync.feeds_path)
    keys = FeedKeys(feeds.feeds[0], feeds)
    defs = build_definitions(feeds, sync.home)
    deadline = time.monotonic() + 60
    while not (sync.home / "locks" / "submit-cxi.lock").exists():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.02)
    instance = sync.instance()
    try:
        partition = instance.get_dynamic_partitions(keys.partitions.name)[0]
        manual = defs.resolve_job_def(keys.ingest_job).execute_in_process(
            instance=instance, partition_key=partition, raise_on_error=False
        )
        assert manual.success
        assert (
            manual.asset_materializations_for_node(f"{FEED}__import_job")[0]
            .metadata["reused_previous_import"]
            .value
        )
    finally:
        instance.dispose()

    assert process.wait(timeout=120) == 0
    sync.proof()


def test_exit_code_and_one_line_while_a_partition_needs_attention(
    tmp_path: Path, sandbox_server: SandboxServer
) -> None:
    sync = make_sync(tmp_path, sandbox_server, cxi_feeds(max_attempts=2))
    sync.sandbox.add_fault(vendor="cxi", method="POST", kind="status", status=401, times=100)

    first = sync.run()
    second = sync.run()
    third = sync.run()

    assert first[0] == 1 and " retrying" in first[1]
    assert second[0] == 1 and " needs_attention" in second[1] and "retry 2" in second[1]
    assert third[0] == 1 and " needs_attention" in third[1] and "retry" not in third[1]
    assert "ingest failed 2 times; last error: communicate_xi: POST" in third[1]
    assert "401" in third[1] and API_KEY not in third[1] + third[2]
    instance = sync.instance()
    try:
        found = states(instance, sync.keys())
    finally:
        instance.dispose()
    assert [s.state for s in found.values()] == ["needs_attention"]

"""`dagster dev` on the demo feeds, with data, driven by Playwright in Debian's headless Chromium.

Shared by the browser test (``test_ui_browser.py``) and the README screenshots
(``python -m audience_pipeline_tests.integration.ui_screenshots``), so the pictures show exactly the
pages the test checks. Playwright's own browser download is not used: ``/usr/bin/chromium`` is
Debian's ``chromium`` package, which ``.ci/run`` installs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from playwright.sync_api import Browser, Locator, Page, Playwright, expect

from audience_pipeline.feeds.loader import DEMO_FEEDS, FEEDS_ENV_VAR, load_feeds
from audience_pipeline.storage import HOME_ENV_VAR

if TYPE_CHECKING:
    from audience_pipeline.sandbox import SandboxServer

REPO = Path(__file__).resolve().parents[2]
WORKSPACE = REPO / "workspace.yaml"
ARTIFACTS = REPO / "test-artifacts" / "ui_browser"
"""Screenshots, page HTML and server logs of a failed browser test (git-ignored; CI keeps it)."""

CHROMIUM = Path(os.environ.get("AUDIENCE_PIPELINE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    # Headless by Playwright's own flag; the others keep Chromium off a network it cannot reach
    # and out of a sandbox a root CI job cannot give it.
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}
UI_TIMEOUT_MS = 45_000
"""For every wait on the page: the first GraphQL answers take seconds on a busy 2-core machine."""

DAGSTER_YAML = """\
# The browser test's instance: SQLite under this folder (Dagster's default), no telemetry, and no
# "Join the Dagster community" dialog over the pages.
telemetry:
  enabled: false
nux:
  enabled: false
"""

LOCATION_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } }
} } } }
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text("utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def stop_process_tree(process: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM to the process group ``process`` leads, SIGKILL to it and to every descendant still
    alive after ``grace`` seconds (``dagster dev`` takes longer than that to shut down cleanly, and
    its webserver, daemon and code servers are its children)."""
    import psutil

    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait(timeout=30)
    psutil.wait_procs(descendants, timeout=10)


@dataclass
class DemoData:
    """What the demo run left in the instance, read from it for the assertions."""

    feeds: list[str]
    sensors: list[str]
    assets: dict[str, list[str]]
    """feed -> its asset names (the group's nodes)"""
    partitions: dict[str, list[str]] = field(default_factory=dict)
    """feed -> the failure_report partitions materialized"""
    report_metadata: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    """(feed, partition) -> failure_report metadata as plain values"""


@dataclass
class DagsterUi:
    """A running ``dagster dev`` on the demo data; ``url`` is the webserver's base URL."""

    root: Path
    url: str
    location: str
    data: DemoData
    process: subprocess.Popen

    @property
    def log(self) -> Path:
        return self.root / "dagster-dev.log"

    def group_url(self, feed: str) -> str:
        return f"{self.url}/locations/{quote(self.location)}/asset-groups/{quote(feed)}"

    def partition_url(self, feed: str, asset: str, partition: str) -> str:
        return f"{self.url}/assets/{quote(feed)}/{quote(asset)}?view=partitions&partition={quote(partition)}"

    def automation_url(self) -> str:
        return f"{self.url}/automation"

    def sensor_url(self, sensor: str) -> str:
        return f"{self.url}/locations/{quote(self.location)}/sensors/{quote(sensor)}"


def demo_env(sandbox: SandboxServer, root: Path) -> dict[str, str]:
    """The environment of ``sync`` and ``dagster dev``: the sandbox's credentials, and the demo
    feeds, the working folder and the Dagster instance, all under ``root``."""
    env = dict(os.environ)
    for name, vendor in sandbox.app.vendors.items():
        env.update(vendor.demo_env(sandbox.vendor_url(name)))
    env.update(
        {
            "DAGSTER_HOME": str(root / "dagster_home"),
            HOME_ENV_VAR: str(root / "home"),
            FEEDS_ENV_VAR: str(root / "feeds.yaml"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def prepare(root: Path) -> None:
    """The bundled demo feeds file and its sample export, copied under ``root``; an instance there."""
    shutil.copyfile(DEMO_FEEDS, root / "feeds.yaml")
    shutil.copytree(DEMO_FEEDS.parent / "incoming", root / "incoming")
    (root / "dagster_home").mkdir()
    (root / "dagster_home" / "dagster.yaml").write_text(DAGSTER_YAML, "utf-8")
    (root / "home").mkdir()


def run_demo_pipeline(root: Path, env: dict[str, str], timeout: float = 240.0) -> None:
    """``audience-pipeline sync`` on the demo feeds: every feed's file staged, validated, imported
    and reported, in the instance ``dagster dev`` opens next."""
    log = root / "sync.log"
    command = [sys.executable, "-m", "audience_pipeline.cli", "sync", "--timeout", "120"]
    command += ["--poll-interval", "0.2"]
    with log.open("w", encoding="utf-8") as out:
        result = subprocess.run(
            command, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
        )
    assert result.returncode == 0, f"the demo pipeline failed (exit {result.returncode}):\n{tail(log)}"


def read_demo_data(env: dict[str, str]) -> DemoData:
    """Feeds, sensors and assets as the code location defines them, and what the run left."""
    import dagster as dg

    from audience_pipeline.assets import latest_metadata
    from audience_pipeline.definitions import build_definitions

    feeds = load_feeds(Path(env[FEEDS_ENV_VAR]))
    defs = build_definitions(feeds, Path(env[HOME_ENV_VAR]))
    names = [feed.name for feed in feeds.feeds]
    assets: dict[str, list[str]] = {name: [] for name in names}
    for spec in defs.resolve_all_asset_specs():
        if spec.group_name in assets:
            assets[spec.group_name].append(spec.key.path[-1])
    data = DemoData(feeds=names, sensors=[s.name for s in defs.sensors or []], assets=assets)
    instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
    try:
        for name in names:
            key = dg.AssetKey([name, "failure_report"])
            data.partitions[name] = sorted(instance.get_materialized_partitions(key))
            for partition in data.partitions[name]:
                data.report_metadata[(name, partition)] = latest_metadata(instance, key, partition) or {}
    finally:
        instance.dispose()
    return data


def wait_until_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 150.0) -> str:
    """Wait for the webserver to answer and the code location to load; return the location's name.
    A location that fails to load fails at once, with Dagster's error."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"dagster dev exited ({process.returncode}):\n{tail(log)}")
        try:
            answer = httpx.post(f"{url}/graphql", json={"query": LOCATION_QUERY}, timeout=10).json()
            entries = answer["data"]["workspaceOrError"]["locationEntries"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            last = repr(exc)
        else:
            last = repr(entries)
            for entry in entries:
                loaded = entry.get("locationOrLoadError") or {}
                if loaded.get("__typename") == "PythonError":
                    raise AssertionError(f"code location {entry['name']} failed to load: {loaded['message']}")
                if entry["loadStatus"] == "LOADED" and loaded.get("__typename") == "RepositoryLocation":
                    return entry["name"]
        time.sleep(0.5)
    raise AssertionError(f"dagster dev not ready after {timeout:.0f} s ({last}):\n{tail(log)}")


@contextlib.contextmanager
def dagster_ui(root: Path, sandbox: SandboxServer) -> Iterator[DagsterUi]:
    """The demo pipeline run once against ``sandbox``, then ``dagster dev`` (webserver and daemon)
    on that instance, on 127.0.0.1 and a free port; stopped, children and all, on the way out."""
    prepare(root)
    env = demo_env(sandbox, root)
    run_demo_pipeline(root, env)
    data = read_demo_data(env)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "dagster-dev.log"
    command = [sys.executable, "-m", "dagster", "dev", "-h", "127.0.0.1", "-p", str(port)]
    command += ["-w", str(WORKSPACE)]
    with log.open("w", encoding="utf-8") as out:
        process = subprocess.Popen(
            command, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        location = wait_until_ready(url, process, log)
        yield DagsterUi(root=root, url=url, location=location, data=data, process=process)
    finally:
        stop_process_tree(process)


@contextlib.contextmanager
def chromium(playwright: Playwright) -> Iterator[Browser]:
    if not CHROMIUM.exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    try:
        yield browser
    finally:
        browser.close()


def new_page(browser: Browser) -> Page:
    page = browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
    page.set_default_timeout(UI_TIMEOUT_MS)
    expect.set_options(timeout=UI_TIMEOUT_MS)
    return page


def shown(page: Page | Locator, text: str) -> Locator:
    """The first visible element reading exactly ``text`` (the UI keeps hidden copies of long
    names to measure them)."""
    return page.get_by_text(text, exact=True).filter(visible=True).first


def keep_logs(root: Path, folder: Path) -> None:
    """The logs of the demo run and of ``dagster dev`` under ``root``, copied into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("sync.log", "dagster-dev.log"):
        with contextlib.suppress(OSError):
            shutil.copyfile(root / name, folder / name)


def save_page(page: Page, folder: Path, name: str) -> list[Path]:
    """A full-page screenshot and the HTML of ``page`` in ``folder``; what could be saved."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    with contextlib.suppress(Exception):
        page.screenshot(path=str(folder / f"{name}.png"), full_page=True, timeout=15_000)
        saved.append(folder / f"{name}.png")
    with contextlib.suppress(Exception):
        (folder / f"{name}.html").write_text(page.content(), "utf-8")
        saved.append(folder / f"{name}.html")
    return saved


# The pages, opened the same way by the test and by the screenshots, each ready when it returns.


def open_group_graph(page: Page, ui: DagsterUi, feed: str) -> None:
    """The feed's asset group, lineage tab: every asset of the group is a node of the graph."""
    page.goto(ui.group_url(feed))
    expect(shown(page, feed)).to_be_visible()
    for asset in ui.data.assets[feed]:
        expect(shown(page, asset)).to_be_visible()


def open_partition(page: Page, ui: DagsterUi, feed: str, asset: str, partition: str) -> None:
    """One partition of an asset, Partitions tab, its latest materialization's metadata shown."""
    page.goto(ui.partition_url(feed, asset, partition))
    expect(shown(page, partition)).to_be_visible()
    expect(shown(page, "Metadata")).to_be_visible()
    expect(page.get_by_role("row").first).to_be_visible()


def metadata_row(page: Page, label: str) -> Locator:
    """The row of a table (the metadata's, a sensor's details) whose label cell reads ``label``."""
    return page.get_by_role("row").filter(has=page.get_by_text(label, exact=True)).first


def metadata_value(page: Page, label: str) -> Locator:
    """The value cell of the metadata row ``label``."""
    return metadata_row(page, label).get_by_role("cell").nth(1)


COUNT_WORDS = ("imported", "failed", "rejected")


def count_entries(metadata: dict[str, Any]) -> dict[str, int]:
    """The metadata entries that count rows imported, failed or rejected, by label."""
    return {
        label: value
        for label, value in metadata.items()
        if isinstance(value, int) and not isinstance(value, bool) and re.search("|".join(COUNT_WORDS), label)
    }

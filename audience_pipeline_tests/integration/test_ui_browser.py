"""The Dagster UI as a person sees it: ``dagster dev`` (webserver and daemon) on the demo feeds,
after the demo pipeline ran once against the sandbox, in headless Chromium driven by Playwright.

Checked: a feed's asset group graph shows its assets, materialized; a ``failure_report`` partition
page shows the imported / failed / rejected counts and the preview of the report; every sensor is
listed and running, and the daemon ticks them.

Needs Debian's ``chromium`` at ``/usr/bin/chromium`` (``.ci/run`` installs it; Playwright's own
browser download is not used); without it the tests are skipped, or fail under CI.

Artifacts: when a test fails, a full-page screenshot and the page's HTML, with the logs of
``dagster dev`` and of the demo run, are saved in ``test-artifacts/ui_browser/<test name>/`` in the
repository root (``setup/`` when the demo run or ``dagster dev`` failed); the folder is git-ignored,
CI keeps it. ``dagster dev`` and all its children are stopped at the end of the module, whatever
happened.

The README's screenshots come from the same pages:
``python -m audience_pipeline_tests.integration.ui_screenshots``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from audience_pipeline_tests.integration.conftest import FEED, SETTINGS
from audience_pipeline_tests.integration.dagster_ui import (
    ARTIFACTS,
    CHROMIUM,
    COUNT_WORDS,
    DagsterUi,
    chromium,
    count_entries,
    dagster_ui,
    keep_logs,
    metadata_row,
    metadata_value,
    new_page,
    open_group_graph,
    open_partition,
    save_page,
)
from audience_pipeline_tests.sandboxes import SandboxPool

pytestmark = pytest.mark.integration

PIPELINE_ASSETS = ("hr_file", "validated_rows", "import_job", "failure_report")
PREVIEW = "preview"
TICK_TIMEOUT_MS = 90_000
"""The daemon's first sensor ticks come some seconds after ``dagster dev`` is up."""


@pytest.fixture(scope="module")
def ui(sandbox_pool: SandboxPool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterUi]:
    """Without Chromium the tests are skipped, except under CI (``$CI`` set), where they fail."""
    if not CHROMIUM.exists():
        problem = f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(f"CI needs Chromium for the browser test: {problem}", pytrace=False)
        pytest.skip(problem)
    sandbox = sandbox_pool.get(SETTINGS)
    sandbox.reset()
    root = tmp_path_factory.mktemp("dagster_ui")
    try:
        with dagster_ui(root, sandbox) as running:
            yield running
    except Exception:  # the demo run or dagster dev failed (a test's own failure never gets here)
        keep_logs(root, ARTIFACTS / "setup")
        raise


@pytest.fixture(scope="module")
def browser(ui: DagsterUi) -> Iterator[Browser]:
    with sync_playwright() as playwright, chromium(playwright) as launched:
        yield launched


@pytest.fixture
def page(browser: Browser, ui: DagsterUi, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh page; if the test failed, its screenshot, HTML and the server logs are kept."""
    opened = new_page(browser)
    failed_before = request.session.testsfailed
    try:
        yield opened
    finally:
        if request.session.testsfailed > failed_before:
            folder = ARTIFACTS / re.sub(r"[^\w.-]+", "_", request.node.name)
            save_page(opened, folder, "page")
            keep_logs(ui.root, folder)
        opened.close()


def the_partition(ui: DagsterUi, feed: str) -> str:
    partitions = ui.data.partitions[feed]
    assert len(partitions) == 1, f"the demo should leave one failure_report partition: {partitions}"
    return partitions[0]


def preview_samples(markdown: str) -> list[str]:
    """Texts the rendered preview must show: the header and first row of its table, else its first line."""
    rows = [line.strip().strip("|").split("|") for line in markdown.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in row] for row in rows if not re.fullmatch(r"[\s|:-]*", "|".join(row))]
    if rows:
        return [cell for row in rows[:2] for cell in row if cell and len(cell) <= 60]
    first = next((line for line in markdown.splitlines() if line.strip()), "")
    return [re.sub(r"[*_`#>]", "", first).strip()[:60]]


def test_feed_group_graph_shows_its_assets(ui: DagsterUi, page: Page) -> None:
    assets = ui.data.assets[FEED]
    open_group_graph(page, ui, FEED)  # waits for a node per asset
    assert set(PIPELINE_ASSETS) <= set(assets), assets
    # Each node says its one partition is materialized.
    expect(page.get_by_text("100% filled", exact=True)).to_have_count(len(assets))


def test_failure_report_partition_shows_counts_and_preview(ui: DagsterUi, page: Page) -> None:
    partition = the_partition(ui, FEED)
    metadata = ui.data.report_metadata[(FEED, partition)]
    counts = count_entries(metadata)
    for word in COUNT_WORDS:
        assert any(word in label for label in counts), f"no {word} count in the metadata: {sorted(metadata)}"
    assert metadata.get(PREVIEW), f"no {PREVIEW} in the metadata: {sorted(metadata)}"

    open_partition(page, ui, FEED, "failure_report", partition)
    for label, value in counts.items():
        expect(metadata_value(page, label)).to_have_text(re.compile(rf"^\s*({value}|{value:,})\s*$"))
    # One outcome word for every vendor, next to what the file was imported into.
    outcomes = {"completed", "completed_with_failures", "failed", "timed_out"}
    assert metadata.get("outcome") in outcomes, metadata
    assert "Communicate XI" in str(metadata.get("target")), metadata
    for label in ("outcome", "target"):
        expect(metadata_value(page, label)).to_contain_text(str(metadata[label]))

    metadata_row(page, PREVIEW).get_by_text(re.compile("show", re.IGNORECASE)).click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    for text in preview_samples(metadata[PREVIEW]):
        expect(dialog).to_contain_text(text)


def test_sensors_are_listed_and_running(ui: DagsterUi, page: Page) -> None:
    assert ui.data.sensors, "the demo feeds define no sensor"
    # The list is virtualized (only rows in view exist): a page tall enough for every row.
    page.set_viewport_size({"width": 1280, "height": 400 + 70 * len(ui.data.sensors)})
    page.goto(ui.automation_url())
    for sensor in ui.data.sensors:
        link = page.get_by_role("link").filter(has_text=sensor)
        expect(link).to_have_count(1)
        # The sensor's row: the innermost element holding its link and its on/off switch (the
        # row's last checkbox; the first one selects the row).
        row = page.locator("div").filter(has=link).filter(has=page.get_by_role("checkbox")).last
        expect(row.get_by_role("checkbox").last).to_be_checked()

    status_sensor = next(s for s in ui.data.sensors if s.startswith(FEED) and "status" in s)
    page.goto(ui.sensor_url(status_sensor))
    expect(metadata_row(page, "Running").get_by_role("checkbox")).to_be_checked()
    # The daemon evaluates it: the latest tick has a time (the page refreshes itself).
    expect(metadata_row(page, "Latest tick")).to_contain_text(
        re.compile(r"\d{1,2}:\d{2}:\d{2}"), timeout=TICK_TIMEOUT_MS
    )

"""The README's pictures of the Dagster UI, taken with the browser test's own machinery:

    python -m audience_pipeline_tests.integration.ui_screenshots [--out docs] [--feed all_staff_cxi]

Runs the demo pipeline against a fresh sandbox, starts ``dagster dev`` on it, opens in headless
Chromium the pages ``test_ui_browser.py`` checks and writes ``ui-feed-graph.png`` (the feed's asset
group) and ``ui-failure-report.png`` (a ``failure_report`` partition) at 1280x800.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from audience_pipeline.cli import random_credentials
from audience_pipeline.sandbox import SandboxServer, SandboxSettings
from audience_pipeline_tests.integration.conftest import FEED
from audience_pipeline_tests.integration.dagster_ui import (
    REPO,
    chromium,
    count_entries,
    dagster_ui,
    metadata_value,
    new_page,
    open_group_graph,
    open_partition,
)

GRAPH_PNG = "ui-feed-graph.png"
REPORT_PNG = "ui-failure-report.png"
SETTLE_MS = 1_500
"""The graph zooms to fit after it renders, and fonts settle: wait this long before a picture."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="folder of the PNGs (default: docs/)")
    parser.add_argument("--feed", default=FEED, help=f"the feed to picture (default: {FEED})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = random_credentials(SandboxSettings(pace_seconds=0.05))
    with (
        tempfile.TemporaryDirectory(prefix="audience-ui-shots-") as root,
        SandboxServer(settings) as sandbox,
        dagster_ui(Path(root), sandbox) as ui,
        sync_playwright() as playwright,
        chromium(playwright) as browser,
    ):
        page = new_page(browser)
        open_group_graph(page, ui, args.feed)
        page.wait_for_timeout(SETTLE_MS)
        page.screenshot(path=str(args.out / GRAPH_PNG))

        partition = ui.data.partitions[args.feed][-1]
        open_partition(page, ui, args.feed, "failure_report", partition)
        for label in count_entries(ui.data.report_metadata[(args.feed, partition)]):
            expect(metadata_value(page, label)).to_be_visible()
        page.wait_for_timeout(SETTLE_MS)
        page.screenshot(path=str(args.out / REPORT_PNG))
    for name in (GRAPH_PNG, REPORT_PNG):
        print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``run_feeds`` (what ``demo`` and ``sync`` print) and the summary table.

One real run over a drop folder with five files, through the feed's own sensors, jobs and checks
on a Dagster instance; the destination is a fake of our ``Destination`` interface whose behaviour
depends on the file: a normal import with one refused row, a blocked file, a file whose mapping
does not fit, a submit error carrying a secret, a vendor count that disagrees, and a slow import.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from audience_pipeline.assets import IO_MANAGER_KEY, STORAGE_KEY
from audience_pipeline.definitions import build_feed_definitions
from audience_pipeline.destinations.base import (
    ChunkJob,
    JobHandle,
    JobOutcome,
    JobState,
    JobStatus,
    RowFailure,
)
from audience_pipeline.feeds.model import FeedsFile
from audience_pipeline.redact import register_secret
from audience_pipeline.runner import PartitionSummary, format_summaries, run_feeds
from audience_pipeline.sources.registry import build_source_resource
from audience_pipeline.storage import AudienceIOManager, PipelineStorage
from audience_pipeline_tests.offline_feeds import FEED, write_offline_feeds

SECRET = "runner-secret-51f0a9c3d7"
HEADER = "ID,Email\n"
FILES = {
    "good.csv": HEADER + "E1,a@x.org\nE2,b@x.org\nE3,bad\nE4,d@x.org\n",
    "blocked.csv": HEADER + "E1,bad\nE2,worse\nE3,c@x.org\n",
    "unmapped.csv": "ID,E-mail\nE1,a@x.org\n",
    "leaky.csv": HEADER + "E1,a@x.org\n",
    "miscount.csv": HEADER + "E1,a@x.org\nE2,b@x.org\n",
    "slow.csv": HEADER + "E1,a@x.org\n",
}


class FakeVendor:
    """Finishes every import at once, except ``slow``; refuses row 1 of ``good``."""

    vendor = "communicate_xi"

    def destination(self, options: dict, retry: object = None) -> FakeVendor:
        return self

    def close(self) -> None:
        pass

    def submit(
        self, rows: pd.DataFrame, *, feed: str, partition: str, previous: JobHandle | None = None
    ) -> JobHandle:
        if partition.startswith("leaky"):
            raise RuntimeError(f"401 Unauthorized for https://vendor.example/imports?api_key={SECRET}")
        jobs = [ChunkJob(job_id=f"job-{partition.split('.')[0]}", first_row=0, row_count=len(rows))]
        return JobHandle(
            vendor=self.vendor, feed=feed, partition=partition, jobs=jobs, submitted_rows=len(rows)
        )

    def status(self, handle: JobHandle) -> JobStatus:
        if handle.partition.startswith("slow"):
            return JobStatus(state=JobState.RUNNING, vendor_status="in_progress")
        if handle.partition.startswith("good"):
            return JobStatus(state=JobState.FAILED, vendor_status="failed")
        return JobStatus(state=JobState.SUCCEEDED, vendor_status="completed")

    def outcome(self, handle: JobHandle, *, status: JobStatus | None = None) -> JobOutcome:
        submitted = handle.submitted_rows
        if handle.partition.startswith("good"):
            failures = [RowFailure(row=1, reason="mailbox unavailable")]
            return JobOutcome(
                submitted=submitted, failures=failures, vendor_counts={"processed": submitted - 1}
            )
        processed = submitted + 5 if handle.partition.startswith("miscount") else submitted
        return JobOutcome(submitted=submitted, vendor_counts={"processed": processed})


@dataclass
class Ran:
    summaries: dict[str, PartitionSummary]
    echoed: list[str]
    elapsed: float
    feeds: FeedsFile
    defs: dg.Definitions
    instance: dg.DagsterInstance


def write_feeds(root: Path) -> FeedsFile:
    feeds = write_offline_feeds(root)
    old = time.time() - 3600  # long finished copies: no settling
    for name, text in FILES.items():
        (root / "incoming" / name).write_text(text, "utf-8")
        os.utime(root / "incoming" / name, (old, old))
    return feeds


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ran]:
    root = tmp_path_factory.mktemp("runner")
    feeds = write_feeds(root)
    register_secret(SECRET)
    home = root / "home"
    defs = dg.Definitions.merge(
        build_feed_definitions(feeds.feeds[0], feeds),
        dg.Definitions(
            resources={
                IO_MANAGER_KEY: AudienceIOManager(base_dir=str(home)),
                STORAGE_KEY: PipelineStorage(base_dir=str(home)),
                "source_hr_drop": build_source_resource(feeds.sources["hr_drop"]),
                "destination_cxi": FakeVendor(),
            }
        ),
    )
    echoed: list[str] = []
    with dg.instance_for_test() as instance:
        started = time.monotonic()
        summaries = run_feeds(defs, feeds, instance, poll_interval=0.05, timeout=1.0, echo=echoed.append)
        elapsed = time.monotonic() - started
        yield Ran({s.partition.split("@")[0]: s for s in summaries}, echoed, elapsed, feeds, defs, instance)


def test_one_summary_per_file(ran: Ran) -> None:
    assert sorted(ran.summaries) == sorted(FILES)
    assert all(s.feed == FEED for s in ran.summaries.values())
    assert all(s.partition == name for name, s in ran.summaries.items())  # first contents: bare names


def test_a_finished_import_reports_counts_that_add_up(ran: Ran) -> None:
    good = ran.summaries["good.csv"]

    assert good.status == "completed_with_failures"
    assert good.counts == {
        "source_rows": 4,
        "imported": 2,
        "rejected_by_validation": 1,
        "failed_at_target": 1,
        "ignored_by_target": 0,
    }
    assert good.message == "1 row(s) refused by the destination; the others were imported"
    assert Path(good.report_path).name == "failures.csv" and Path(good.report_path).is_file()
    assert Path(good.rejects_path).name == "rejects.csv" and Path(good.rejects_path).is_file()


def test_a_file_over_the_rejection_threshold_is_blocked(ran: Ran) -> None:
    blocked = ran.summaries["blocked.csv"]

    assert blocked.status == "blocked"
    assert blocked.counts == {"source_rows": 3, "rejected_rows": 2}
    assert blocked.message.startswith("rejection rate above 50.0%: nothing was sent")
    assert blocked.report_path is None and Path(blocked.rejects_path).is_file()


def test_a_failed_run_says_why_in_one_line(ran: Ran) -> None:
    unmapped = ran.summaries["unmapped.csv"]

    assert unmapped.status == "refused"
    assert "email -> 'Email' (did you mean 'E-mail'?)" in unmapped.message
    assert "\n" not in unmapped.message


def test_errors_never_show_secrets(ran: Ran) -> None:
    leaky = ran.summaries["leaky.csv"]

    assert leaky.status == "retrying"
    assert leaky.message.startswith("attempt 1 of 5 failed: ") and "401 Unauthorized" in leaky.message
    assert SECRET not in leaky.message and "***" in leaky.message
    assert SECRET not in format_summaries(list(ran.summaries.values()))
    assert not any(SECRET in line for line in ran.echoed)


def test_a_vendor_count_that_disagrees_fails_the_accounting_check(ran: Ran) -> None:
    miscount = ran.summaries["miscount.csv"]

    assert miscount.status == "completed"
    assert miscount.message == "row accounting does not add up: see the failure_report asset check"
    assert miscount.counts["imported"] == 2


def test_an_import_still_running_at_the_deadline_is_handed_over(ran: Ran) -> None:
    slow = ran.summaries["slow.csv"]

    assert slow.status == "importing"
    assert slow.message.startswith("import still running after 1 s; the next sync")
    assert slow.counts == {"source_rows": 1, "rejected_rows": 0}
    assert ran.elapsed >= 1.0


def test_progress_is_echoed_per_run(ran: Ran) -> None:
    ingest = [line for line in ran.echoed if "ingest run" in line]
    reports = [line for line in ran.echoed if "failure report" in line]

    assert len(ingest) == len(FILES)
    assert sum(line.endswith(": FAILURE") for line in ingest) == 3  # blocked, unmapped, leaky
    assert len(reports) == 2 and all(line.endswith(": SUCCESS") for line in reports)  # good, miscount


def test_unknown_feed_names_are_refused_before_anything_runs(ran: Ran) -> None:
    with pytest.raises(ValueError, match=r"unknown feed\(s\): nope; known: \['staff'\]"):
        run_feeds(ran.defs, ran.feeds, ran.instance, feed_names=["staff", "nope"], echo=lambda _: None)


def test_the_next_sync_retries_failures_and_goes_on_polling(ran: Ran) -> None:
    """Runs last: a second invocation on the same instance, as the next cron ``sync`` would."""
    echoed: list[str] = []
    again = run_feeds(ran.defs, ran.feeds, ran.instance, poll_interval=0.05, timeout=0.3, echo=echoed.append)

    by_file = {s.partition.split("@")[0]: s for s in again}
    assert sorted(by_file) == ["leaky.csv", "slow.csv"]  # what is unfinished; nothing done twice
    assert [line for line in echoed if "retry" in line] == [
        f"[{FEED}] retry 2 for {by_file['leaky.csv'].partition}: FAILURE"
    ]
    assert by_file["leaky.csv"].message.startswith("attempt 2 of 5 failed")
    assert by_file["slow.csv"].status == "importing"
    runs = ran.instance.get_runs(dg.RunsFilter(tags={"dagster/partition": by_file["leaky.csv"].partition}))
    assert sorted(r.tags["dagster/run_key"] for r in runs) == [
        by_file["leaky.csv"].partition,
        f"{by_file['leaky.csv'].partition}#attempt2",
    ]


def test_format_summaries_lines_up_counts_status_and_paths() -> None:
    summaries = [
        PartitionSummary(
            "all_staff_cxi",
            "employees.csv@49e9cfa5cc",
            status="failed",
            message="2 row(s) refused by the destination; the others were imported",
            counts={
                "source_rows": 200,
                "rejected_by_validation": 6,
                "imported": 192,
                "failed_at_target": 2,
                "ignored_by_target": 0,
            },
            report_path="/r/failures.csv",
            rejects_path="/r/rejects.csv",
        ),
        PartitionSummary(
            "all_staff_cxi",
            "bad.csv@0123456789",
            status="blocked",
            message="rejection rate above 5.0%",
            counts={"source_rows": 10, "rejected_rows": 9},
            rejects_path="/r/rejects.csv",
        ),
        PartitionSummary("all_staff_cxi", "broken.csv@0123456789", status="error"),
    ]

    lines = format_summaries(summaries).splitlines()

    assert lines[0].split() == ["feed", "file", "rows", "rejected", "imported", "failed", "ignored", "status"]
    assert set(lines[1]) == {"-"} and len(lines[1]) == len(lines[0])
    assert lines[2].split() == [
        "all_staff_cxi",
        "employees.csv@49e9cfa5cc",
        "200",
        "6",
        "192",
        "2",
        "0",
        "failed",
    ]
    assert lines[3] == "    2 row(s) refused by the destination; the others were imported"
    assert lines[4] == "    failure report: /r/failures.csv"  # the report, not the rejects, when both exist
    assert lines[5].split() == ["all_staff_cxi", "bad.csv@0123456789", "10", "9", "-", "-", "-", "blocked"]
    assert lines[6:8] == ["    rejection rate above 5.0%", "    rejected rows:  /r/rejects.csv"]
    assert lines[8].split() == ["all_staff_cxi", "broken.csv@0123456789", "-", "-", "-", "-", "-", "error"]
    assert len(lines) == 9
    status_column = lines[0].index("status")
    assert all(line.rindex(" ") + 1 == status_column for line in (lines[2], lines[5], lines[8]))


def test_format_summaries_of_nothing_is_just_the_header() -> None:
    assert len(format_summaries([]).splitlines()) == 2

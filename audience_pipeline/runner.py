"""Run feeds once, in process, the way the Dagster daemon would: sensor ticks launch the runs.

Runs carry ``PROCESS_TAG`` so that, if this process is killed mid-run, the next ``sync`` can
see the run's process is gone, mark it failed and retry the partition (``lifecycle.py``).

``audience-pipeline demo`` and ``sync`` use this so that a one-shot run exercises exactly the
sensors, partitions, jobs, checks and run keys that ``dagster dev`` schedules, on any instance
(``$DAGSTER_HOME``'s when set, so cursors and run keys persist; else SQLite under the home).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import dagster as dg

from audience_pipeline.assets import ACCOUNTING_CHECK, FeedKeys, latest_metadata
from audience_pipeline.automation.arrival import NEW_FILES_SUFFIX, files_settling, report_schedule_name
from audience_pipeline.automation.lifecycle import (
    PartitionState,
    check_failed,
    feed_states,
    process_identity,
)
from audience_pipeline.automation.retries import retries_sensor_name, retry_request, retrying
from audience_pipeline.automation.status import status_sensor_name
from audience_pipeline.feeds.model import FeedsFile
from audience_pipeline.tags import ATTEMPT_TAG, PARTITION_TAG, POLL_GAVE_UP, PROCESS_TAG, RUN_KEY_TAG

SENSOR_TAG = "dagster/sensor_name"
SCHEDULE_TAG = "dagster/schedule_name"


@dataclass
class PartitionSummary:
    feed: str
    partition: str
    status: str = "pending"
    message: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    report_path: str | None = None
    rejects_path: str | None = None


@dataclass
class SensorDriver:
    """Evaluates sensors and schedules against an instance, keeps sensor cursors and launches runs.

    A new-file sensor that leaves files settling (first sighting of a file still being written,
    or just copied) is evaluated once more after ``settle_seconds``: the daemon would do that on
    its next tick, and a one-shot ``demo``/``sync`` should not wait for another invocation.
    """

    defs: dg.Definitions
    instance: dg.DagsterInstance
    cursors: dict[str, str | None] = field(default_factory=dict)
    log_level: str = "INFO"
    settle_seconds: float = 1.0

    def tick(self, sensor_name: str) -> list[dg.DagsterRun]:
        sensor = self.defs.resolve_sensor_def(sensor_name)
        requests = self._evaluate(sensor, sensor_name)
        if (
            self.settle_seconds > 0
            and sensor_name.endswith(NEW_FILES_SUFFIX)
            and files_settling(self.cursors.get(sensor_name))
        ):
            time.sleep(self.settle_seconds)
            requests += self._evaluate(sensor, sensor_name)
        if not requests:
            return []  # a sensor without a job (alerts) has no job_name to ask for
        return self.launch(requests, sensor.job_name, SENSOR_TAG, sensor_name)

    def tick_schedule(self, schedule_name: str) -> list[dg.DagsterRun]:
        """One evaluation of a schedule now, whatever its cron says (``sync`` means "now")."""
        schedule = self.defs.resolve_schedule_def(schedule_name)
        with dg.build_schedule_context(  # closing it disposes the instance it opens from the ref
            instance=self.instance,
            scheduled_execution_time=datetime.now(UTC),
            resources=self.defs.resources,
            repository_def=self.defs.get_repository_def(),
        ) as context:
            result = schedule.evaluate_tick(context)
        return self.launch(list(result.run_requests or []), schedule.job_name, SCHEDULE_TAG, schedule_name)

    def discover(self, feed_name: str) -> list[dg.DagsterRun]:
        """Tick whatever brings a feed's new files: its report schedule, else its new-file sensor."""
        schedule_names = {s.name for s in self.defs.schedules or []}
        if report_schedule_name(feed_name) in schedule_names:
            return self.tick_schedule(report_schedule_name(feed_name))
        return self.tick(f"{feed_name}{NEW_FILES_SUFFIX}")

    def _evaluate(self, sensor: dg.SensorDefinition, sensor_name: str) -> list[dg.RunRequest]:
        context = dg.build_sensor_context(
            instance=self.instance,
            instance_ref=self.instance.get_ref() if self.instance.is_persistent else None,
            cursor=self._cursor(sensor_name),
            sensor_name=sensor_name,
            definitions=self.defs,
            resources=self.defs.resources,
        )
        result = sensor.evaluate_tick(context)
        if result.cursor is not None:
            self.cursors[sensor_name] = result.cursor
            self._save_cursor(sensor_name, result.cursor)
        for request in result.dynamic_partitions_requests or []:
            if isinstance(request, dg.AddDynamicPartitionsRequest):
                self.instance.add_dynamic_partitions(
                    request.partitions_def_name, list(request.partition_keys)
                )
        return list(result.run_requests or [])

    def launch(
        self, requests: list[dg.RunRequest], default_job: str | None, origin_tag: str, origin: str
    ) -> list[dg.DagsterRun]:
        runs = []
        for request in requests:
            if request.run_key and self._already_ran(origin_tag, origin, request.run_key):
                continue
            job = self.defs.resolve_job_def(request.job_name or default_job)
            tags = {**request.tags, origin_tag: origin, PROCESS_TAG: process_identity()}
            if request.run_key:
                tags[RUN_KEY_TAG] = request.run_key
            outcome = job.execute_in_process(
                instance=self.instance,
                partition_key=request.partition_key,
                tags=tags,
                raise_on_error=False,
                run_config={  # the request's own config (a report's final state) plus the log level
                    **(request.run_config or {}),
                    "loggers": {"console": {"config": {"log_level": self.log_level}}},
                },
            )
            runs.append(outcome.dagster_run)
        return runs

    def _already_ran(self, origin_tag: str, origin: str, run_key: str) -> bool:
        return bool(
            self.instance.get_run_ids(dg.RunsFilter(tags={origin_tag: origin, RUN_KEY_TAG: run_key}), limit=1)
        )

    def _cursor(self, sensor_name: str) -> str | None:
        if sensor_name not in self.cursors:
            self.cursors[sensor_name] = self.instance.run_storage.get_cursor_values(
                {f"sensor:{sensor_name}"}
            ).get(f"sensor:{sensor_name}")
        return self.cursors[sensor_name]

    def _save_cursor(self, sensor_name: str, cursor: str | None) -> None:
        if cursor is not None:
            self.instance.run_storage.set_cursor_values({f"sensor:{sensor_name}": cursor})


def run_feeds(
    defs: dg.Definitions,
    feeds: FeedsFile,
    instance: dg.DagsterInstance,
    *,
    feed_names: list[str] | None = None,
    poll_interval: float = 1.0,
    timeout: float = 600.0,
    echo: Callable[[str], None] = print,
) -> list[PartitionSummary]:
    """Everything unfinished in the feeds, in one invocation: new files, failed ingests (retried
    at once: an invocation is its own schedule), imports submitted earlier by anyone (polled),
    missing reports (requested again). One summary per partition this call touched, plus every
    partition that needs attention."""
    selected = [f for f in feeds.feeds if feed_names is None or f.name in feed_names]
    unknown = set(feed_names or ()) - {f.name for f in selected}
    if unknown:
        raise ValueError(
            f"unknown feed(s): {', '.join(sorted(unknown))}; known: {[f.name for f in feeds.feeds]}"
        )
    driver = SensorDriver(defs, instance)
    all_keys = {f.name: FeedKeys(f, feeds) for f in selected}
    touched: set[tuple[str, str]] = set()
    for name, keys in all_keys.items():
        for run in driver.discover(name):
            partition = run.tags.get(PARTITION_TAG, "")
            echo(f"[{name}] ingest run for {partition}: {run.status.value}")
            touched.add((name, partition))
        for state in retrying(instance, keys, time.time()):  # no back-off: an invocation is its own schedule
            if (name, state.partition) in touched:
                continue  # it failed in this very invocation: the next one (or the sensor) retries
            request = retry_request(state)
            for run in driver.launch([request], keys.ingest_job, SENSOR_TAG, retries_sensor_name(name)):
                echo(f"[{name}] retry {request.tags[ATTEMPT_TAG]} for {state.partition}: {run.status.value}")
                touched.add((name, state.partition))
    deadline = time.monotonic() + timeout
    states: dict[tuple[str, str], PartitionState] = {}
    while True:
        states = {}
        for name, keys in all_keys.items():
            for run in driver.tick(status_sensor_name(name)):
                partition = run.tags.get(PARTITION_TAG, "")
                echo(f"[{name}] failure report for {partition}: {run.status.value}")
                touched.add((name, partition))
            for partition, state in feed_states(instance, keys, keys.feed.retries).items():
                states[(name, partition)] = state
        importing = [k for k, s in states.items() if s.state == "importing"]
        touched.update(importing)
        if not importing or time.monotonic() >= deadline:
            break
        time.sleep(poll_interval)
    shown = sorted(k for k, s in states.items() if k in touched or s.state == "needs_attention")
    return [
        _summary(instance, all_keys[feed], states[(feed, partition)], timeout) for feed, partition in shown
    ]


REPORT_COUNTS = ("source_rows", "imported", "rejected_by_validation", "failed_at_target", "ignored_by_target")


def _summary(
    instance: dg.DagsterInstance, keys: FeedKeys, state: PartitionState, timeout: float
) -> PartitionSummary:
    summary = PartitionSummary(keys.feed.name, state.partition, status=state.state, message=state.detail)
    rejects = latest_metadata(instance, keys.rejected_rows, state.partition) or {}
    summary.rejects_path = rejects.get("rejects_csv")
    validation = latest_metadata(instance, keys.validated_rows, state.partition) or {}
    summary.counts = {k: int(validation[k]) for k in ("source_rows", "rejected_rows") if k in validation}
    if state.state == "importing":
        summary.message = (
            f"import still running after {timeout:.0f} s; the next sync (or the status sensor "
            "under dagster) goes on polling it"
        )
    elif state.state == "retrying":
        summary.message = f"{state.detail}; the next sync (or the retry sensor) tries again"
    if state.state != "reported":
        return summary
    report = latest_metadata(instance, keys.failure_report, state.partition) or {}
    summary.counts = {k: int(report[k]) for k in REPORT_COUNTS if k in report}
    summary.report_path = report.get("report_path")
    summary.status = str(report.get("outcome") or report.get("vendor_status") or "reported")
    failed = summary.counts.get("failed_at_target", 0)
    summary.message = ""
    if summary.status in POLL_GAVE_UP:
        summary.message = f"{failed} row(s) reported failed: {report.get('vendor_status')}"
        notes = report.get("notes")
        if notes:
            summary.message = str(notes).splitlines()[-1].lstrip("- ")
    elif failed:
        summary.message = f"{failed} row(s) refused by the destination; the others were imported"
    unchanged = int(report.get("unchanged", 0) or 0)
    if unchanged and not summary.message:  # the table's columns add up only with these
        summary.message = f"{unchanged} row(s) unchanged since the last import, not sent"
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=keys.failure_report, asset_partitions=[state.partition]), limit=1
    ).records
    if records and check_failed(instance, keys.failure_report, ACCOUNTING_CHECK, records[0].run_id):
        summary.message = "row accounting does not add up: see the failure_report asset check"
    return summary


NEEDS_A_PERSON_NOW = ("needs_attention", "blocked", "refused", "retrying", "importing")
"""Summary states that make ``sync`` exit non-zero."""


def format_summaries(summaries: list[PartitionSummary]) -> str:
    header = (
        f"{'feed':<22} {'file':<34} {'rows':>7} {'rejected':>8} {'imported':>8} {'failed':>6} "
        f"{'ignored':>7}  status"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        c = s.counts
        lines.append(
            f"{s.feed:<22} {s.partition:<34} {c.get('source_rows', '-'):>7} "
            f"{c.get('rejected_by_validation', c.get('rejected_rows', '-')):>8} {c.get('imported', '-'):>8} "
            f"{c.get('failed_at_target', '-'):>6} {c.get('ignored_by_target', '-'):>7}  {s.status}"
        )
        if s.message:
            lines.append(f"    {s.message}")
        if s.report_path:
            lines.append(f"    failure report: {s.report_path}")
        elif s.rejects_path:
            lines.append(f"    rejected rows:  {s.rejects_path}")
    return "\n".join(lines)

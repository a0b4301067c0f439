"""Run feeds once, in process, the way the Dagster daemon would: sensor ticks launch the runs.

``audience-pipeline demo`` and ``sync`` use this so that a one-shot run exercises exactly the
sensors, partitions, jobs, checks and run keys that ``dagster dev`` schedules, on any instance
(ephemeral for the demo, ``$DAGSTER_HOME`` for sync so cursors and run keys persist).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import dagster as dg

from audience_pipeline.assets import ACCOUNTING_CHECK, REJECTION_CHECK, FeedKeys, latest_metadata
from audience_pipeline.feeds.model import FeedsFile
from audience_pipeline.redact import redact
from audience_pipeline.sensors import NEW_FILES_SUFFIX, files_settling, report_schedule_name

RUN_KEY_TAG = "dagster/run_key"
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
        return self._launch(requests, sensor.job_name, SENSOR_TAG, sensor_name)

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
        return self._launch(list(result.run_requests or []), schedule.job_name, SCHEDULE_TAG, schedule_name)

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

    def _launch(
        self, requests: list[dg.RunRequest], default_job: str | None, origin_tag: str, origin: str
    ) -> list[dg.DagsterRun]:
        runs = []
        for request in requests:
            if request.run_key and self._already_ran(origin_tag, origin, request.run_key):
                continue
            job = self.defs.resolve_job_def(request.job_name or default_job)
            tags = {**request.tags, origin_tag: origin}
            if request.run_key:
                tags[RUN_KEY_TAG] = request.run_key
            outcome = job.execute_in_process(
                instance=self.instance,
                partition_key=request.partition_key,
                tags=tags,
                raise_on_error=False,
                run_config={"loggers": {"console": {"config": {"log_level": self.log_level}}}},
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
    """New files -> ingest runs -> wait for the imports -> report runs; one summary per file."""
    selected = [f for f in feeds.feeds if feed_names is None or f.name in feed_names]
    unknown = set(feed_names or ()) - {f.name for f in selected}
    if unknown:
        raise ValueError(
            f"unknown feed(s): {', '.join(sorted(unknown))}; known: {[f.name for f in feeds.feeds]}"
        )
    driver = SensorDriver(defs, instance)
    summaries: dict[tuple[str, str], PartitionSummary] = {}
    all_keys = {f.name: FeedKeys(f, feeds) for f in selected}
    for name, keys in all_keys.items():
        for run in driver.discover(name):
            partition = run.tags.get("dagster/partition", "")
            echo(f"[{name}] ingest run for {partition}: {run.status.value}")
            summaries[(name, partition)] = _ingest_summary(instance, keys, partition, run)
    waiting = {k for k, s in summaries.items() if s.status == "submitted"}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for name in {feed for feed, _ in waiting}:
            for run in driver.tick(f"{name}__import_status"):
                partition = run.tags.get("dagster/partition", "")
                summaries[(name, partition)] = _report_summary(instance, all_keys[name], partition, run)
                waiting.discard((name, partition))
                echo(f"[{name}] failure report for {partition}: {run.status.value}")
        if waiting:
            time.sleep(poll_interval)
    for key in waiting:
        summaries[key].status = "timed_out"
        summaries[
            key
        ].message = f"import still running after {timeout:.0f} s; the status sensor will pick it up"
    return list(summaries.values())


def _run_error(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str:
    records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    for record in records:
        data = record.event_log_entry.dagster_event.event_specific_data
        error = getattr(data, "error", None)
        if error is not None:
            while error.cause is not None:  # Dagster wraps what the step raised: show that
                error = error.cause
            text = error.message.strip().splitlines()[-1] if error.message else str(error)
            return redact(text.split(": ", 1)[-1] if error.cls_name == "Failure" else text)
    return f"run {run.run_id} {run.status.value}"


def _check_failed(instance: dg.DagsterInstance, asset: dg.AssetKey, name: str, run_id: str) -> bool:
    """Whether this run's evaluation of the check failed (the latest one may be another partition's)."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    for record in records:
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        if evaluation.asset_key == asset and evaluation.check_name == name and not evaluation.passed:
            return True
    return False


def _summary(instance: dg.DagsterInstance, keys: FeedKeys, partition: str) -> PartitionSummary:
    summary = PartitionSummary(keys.feed.name, partition)
    rejects = latest_metadata(instance, keys.rejected_rows, partition) or {}
    summary.rejects_path = rejects.get("rejects_csv")
    return summary


def _ingest_summary(
    instance: dg.DagsterInstance, keys: FeedKeys, partition: str, run: dg.DagsterRun
) -> PartitionSummary:
    summary = _summary(instance, keys, partition)
    validation = latest_metadata(instance, keys.validated_rows, partition) or {}
    summary.counts = {k: int(validation[k]) for k in ("source_rows", "rejected_rows") if k in validation}
    if _check_failed(instance, keys.validated_rows, REJECTION_CHECK, run.run_id):
        summary.status = "blocked"
        summary.message = (
            f"rejection rate above {keys.feed.max_rejection_rate:.1%}: nothing was sent; "
            "fix the file (see the rejects) and drop it again"
        )
    elif run.status != dg.DagsterRunStatus.SUCCESS:
        summary.status, summary.message = "error", _run_error(instance, run)
    else:
        summary.status = "submitted"
    return summary


REPORT_COUNTS = ("source_rows", "imported", "rejected_by_validation", "failed_at_target", "ignored_by_target")


def _report_summary(
    instance: dg.DagsterInstance, keys: FeedKeys, partition: str, run: dg.DagsterRun
) -> PartitionSummary:
    summary = _summary(instance, keys, partition)
    if run.status != dg.DagsterRunStatus.SUCCESS:
        summary.status, summary.message = "error", _run_error(instance, run)
        return summary
    report = latest_metadata(instance, keys.failure_report, partition) or {}
    summary.counts = {k: int(report[k]) for k in REPORT_COUNTS if k in report}
    summary.report_path = report.get("report_path")
    summary.status = str(report.get("vendor_status", "done"))
    failed = summary.counts.get("failed_at_target", 0)
    if failed:
        summary.message = f"{failed} row(s) refused by the destination; the others were imported"
    if _check_failed(instance, keys.failure_report, ACCOUNTING_CHECK, run.run_id):
        summary.message = "row accounting does not add up: see the failure_report asset check"
    return summary


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

"""The life of a partition (one HR file), read back from the Dagster instance.

Every partition is in exactly one of these states; the last four are ends a person sees:

``discovered``       the file is a partition, no ingest run yet
``running``          an ingest run is in progress
``retrying``         the last ingest failed for a reason that may pass (vendor down, bad
                     credentials fixed later…); attempt ``n`` of ``retries.max_attempts``
``importing``        the vendor accepted the import; the status sensor polls it, then the report runs
``reported``         the failure report of the partition's latest import exists (done)
``blocked``          validation rejected more rows than the feed allows, or the file lacks more of
                     the snapshot's employees than ``max_removed_rate`` (a truncated export);
                     nothing was sent
``refused``          the file is not a usable CSV (encoding, header, workbook…); nothing was sent
``needs_attention``  the ingest failed ``max_attempts`` times, or the report failed as often

Nothing here is stored on the side: the states are derived from runs (their tags say the
attempt and the import), step failures (``refused`` is a ``dg.Failure`` tagged so), asset
check evaluations (``blocked``) and materializations (``import_job``, ``failure_report`` with
the import's key). So the UI, the sensors and ``sync`` always agree, whoever started a run.

Runs that ``sync`` executes in its own process carry ``PROCESS_TAG``; when that process is gone
(``kill -9``) the run would stay STARTED forever, so :func:`reap_dead_runs` marks it failed and
the partition becomes ``retrying``. Runs launched by the daemon are covered by Dagster's own run
monitoring instead (enable it in ``dagster.yaml``).
"""

from __future__ import annotations

import os
import socket
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from audience_pipeline.assets import REJECTION_CHECK, REMOVED_CHECK, FeedKeys, handle_of, metadata_of
from audience_pipeline.feeds.model import RetrySettings
from audience_pipeline.redact import redact
from audience_pipeline.tags import (
    ATTEMPT_TAG,
    IMPORT_TAG,
    OUTCOME_METADATA,
    PARTITION_TAG,
    PROCESS_TAG,
)

DONE = ("reported",)
NEEDS_A_PERSON = ("blocked", "refused", "needs_attention")
FINISHED_STATUSES = (
    dg.DagsterRunStatus.SUCCESS,
    dg.DagsterRunStatus.FAILURE,
    dg.DagsterRunStatus.CANCELED,
)
RUN_SCAN_LIMIT = 5000
"""Newest runs of one job read per evaluation; older partitions keep the state they had."""


@dataclass
class PartitionState:
    feed: str
    partition: str
    state: str
    detail: str = ""
    attempts: int = 0
    retry_at: float | None = None
    since: float = 0.0
    """When the partition reached this state (epoch seconds): alerts fire once per new state."""
    import_key: str | None = None

    @property
    def ended(self) -> bool:
        return self.state in DONE or self.state in NEEDS_A_PERSON


def process_identity() -> str:
    """``host:pid:start`` of this process; the start time tells a reused pid from the original."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def _start_ticks(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]  # field 22 of proc(5), counted after "comm"


def process_is_gone(identity: str) -> bool:
    """Whether the process named by :func:`process_identity` has ended (only judged on this host)."""
    host, _, rest = identity.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return bool(start) and _start_ticks(pid) not in ("", start)


def reap_dead_runs(instance: dg.DagsterInstance, job_names: Iterable[str]) -> list[str]:
    """Mark runs failed whose ``sync`` process died mid-run; returns their run ids."""
    reaped = []
    for job_name in job_names:
        records = instance.get_run_records(
            dg.RunsFilter(
                job_name=job_name,
                statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING],
            ),
            limit=RUN_SCAN_LIMIT,
        )
        for record in records:
            run = record.dagster_run
            identity = run.tags.get(PROCESS_TAG)
            if identity and process_is_gone(identity):
                instance.report_run_failed(
                    run, f"the process that ran it ({identity.split(':')[1]}) ended before the run did"
                )
                reaped.append(run.run_id)
    return reaped


def run_error(instance: dg.DagsterInstance, run: dg.DagsterRun) -> tuple[str, str | None]:
    """``(message, outcome)`` of a failed run: the first step error as the step raised it, and
    ``refused`` when the step said the file itself is unusable."""
    records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    for record in records:
        data = record.event_log_entry.dagster_event.event_specific_data
        user = getattr(data, "user_failure_data", None)
        outcome_value = user.metadata.get(OUTCOME_METADATA) if user is not None else None
        outcome = getattr(outcome_value, "value", None)
        error = getattr(data, "error", None)
        if error is not None:
            while error.cause is not None:  # Dagster wraps what the step raised: show that
                error = error.cause
            text = error.message.strip().splitlines()[-1] if error.message else str(error)
            if error.cls_name == "Failure" or text.split(": ", 1)[0].endswith(f".{error.cls_name}"):
                text = text.split(": ", 1)[-1]  # "audience_pipeline….VendorHTTPError: …" says it twice
            return redact(text), outcome
        if user is not None and user.description:
            return redact(user.description), outcome
    records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    for record in records:
        if record.event_log_entry.dagster_event.message:
            return redact(record.event_log_entry.dagster_event.message), None
    return f"run {run.run_id} {run.status.value}", None


def failed_check(
    instance: dg.DagsterInstance, asset: dg.AssetKey, name: str, run_id: str
) -> dg.AssetCheckEvaluation | None:
    """This run's failed evaluation of the check, if it failed (the latest one may be another
    partition's)."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    for record in records:
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        if evaluation.asset_key == asset and evaluation.check_name == name and not evaluation.passed:
            return evaluation
    return None


def check_failed(instance: dg.DagsterInstance, asset: dg.AssetKey, name: str, run_id: str) -> bool:
    """Whether this run's evaluation of the check failed (the latest one may be another partition's)."""
    return failed_check(instance, asset, name, run_id) is not None


def is_dry_run(run: dg.DagsterRun) -> bool:
    """Whether the run was launched with ``import_job`` config ``dry_run: true``: it sends
    nothing and records no import, so it is no attempt and changes no partition's state."""
    ops = (run.run_config or {}).get("ops") or {}
    return any(
        name.endswith("__import_job") and isinstance(op, dict) and (op.get("config") or {}).get("dry_run")
        for name, op in ops.items()
    )


def _runs_by(instance: dg.DagsterInstance, job_name: str, tag: str) -> dict[str, list[dg.RunRecord]]:
    """The job's runs grouped by the value of ``tag``, oldest first; dry runs left out."""
    grouped: dict[str, list] = defaultdict(list)
    records = instance.get_run_records(dg.RunsFilter(job_name=job_name), limit=RUN_SCAN_LIMIT)
    for record in reversed(records):
        value = record.dagster_run.tags.get(tag)
        if value and not is_dry_run(record.dagster_run):
            grouped[value].append(record)
    return grouped


def latest_by_partition(
    instance: dg.DagsterInstance, key: dg.AssetKey, partitions: list[str]
) -> dict[str, dg.EventLogRecord]:
    """The newest materialization of each of ``partitions`` (one query per 100 partitions)."""
    found: dict[str, dg.EventLogRecord] = {}
    for start in range(0, len(partitions), 100):
        wanted = partitions[start : start + 100]
        cursor = None
        while len(found) < len(partitions):
            result = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, asset_partitions=wanted), limit=500, cursor=cursor
            )
            for record in result.records:
                if record.partition_key and record.partition_key not in found:
                    found[record.partition_key] = record
            if not result.has_more or all(p in found for p in wanted):
                break
            cursor = result.cursor
    return found


def report_covers(report: dg.EventLogRecord | None, import_record: dg.EventLogRecord, key: str) -> bool:
    """Whether ``report`` is the failure report of the import ``key`` materialized in ``import_record``."""
    if report is None:
        return False
    reported = metadata_of(report).get("import_key")
    return reported == key if reported else report.storage_id > import_record.storage_id


def feed_states(
    instance: dg.DagsterInstance,
    keys: FeedKeys,
    retries: RetrySettings,
    *,
    partitions: list[str] | None = None,
    now: float | None = None,
) -> dict[str, PartitionState]:
    """The state of each partition of one feed (default: all of them)."""
    now = time.time() if now is None else now
    partitions = (
        partitions if partitions is not None else instance.get_dynamic_partitions(keys.partitions.name)
    )
    ingest_runs = _runs_by(instance, keys.ingest_job, PARTITION_TAG)
    report_runs = _runs_by(instance, keys.report_job, IMPORT_TAG)
    imports = latest_by_partition(instance, keys.import_job, partitions)
    reports = latest_by_partition(instance, keys.failure_report, partitions)
    out = {}
    for partition in partitions:
        runs = ingest_runs.get(partition, [])
        state = PartitionState(keys.feed.name, partition, "discovered", attempts=len(runs))
        latest = runs[-1] if runs else None
        if latest is not None and latest.dagster_run.status not in FINISHED_STATUSES:
            state.state, state.since = "running", latest.create_timestamp.timestamp()
        elif partition in imports:
            _import_state(state, instance, imports[partition], reports.get(partition), report_runs, retries)
        elif latest is not None:
            _failed_ingest_state(state, instance, keys, runs, retries)
        out[partition] = state
    return out


def _import_state(
    state: PartitionState,
    instance: dg.DagsterInstance,
    record: dg.EventLogRecord,
    report: dg.EventLogRecord | None,
    report_runs: dict[str, list[dg.RunRecord]],
    retries: RetrySettings,
) -> None:
    handle = handle_of(record)
    key = handle.key if handle is not None else None
    state.import_key = key
    if key is not None and report_covers(report, record, key):
        meta = metadata_of(report)
        state.state, state.since = "reported", report.timestamp
        state.detail = str(meta.get("outcome") or meta.get("vendor_status") or "")
        return
    runs = report_runs.get(key or "", [])
    failed = [r for r in runs if r.dagster_run.status in FINISHED_STATUSES and not r.dagster_run.is_success]
    active = [r for r in runs if r.dagster_run.status not in FINISHED_STATUSES]
    if len(failed) >= retries.max_attempts and not active:
        message, _ = run_error(instance, failed[-1].dagster_run)
        state.state, state.since = "needs_attention", failed[-1].end_time or record.timestamp
        state.detail = f"the failure report failed {len(failed)} times; last error: {message}"
        return
    state.state, state.since = "importing", record.timestamp


def _failed_ingest_state(
    state: PartitionState,
    instance: dg.DagsterInstance,
    keys: FeedKeys,
    runs: list[dg.RunRecord],
    retries: RetrySettings,
) -> None:
    latest = runs[-1]
    run = latest.dagster_run
    ended = latest.end_time or latest.update_timestamp.timestamp()
    state.since = ended
    if check_failed(instance, keys.validated_rows, REJECTION_CHECK, run.run_id):
        state.state = "blocked"
        state.detail = (
            f"rejection rate above {keys.feed.max_rejection_rate:.1%}: nothing was sent; "
            "fix the file (see the rejects) and drop it again"
        )
        return
    removed = failed_check(instance, keys.validated_rows, REMOVED_CHECK, run.run_id)
    if removed is not None:  # the truncated-export guard; its description says how to accept
        state.state = "blocked"
        state.detail = removed.description or f"removed rate above {keys.feed.max_removed_rate:.1%}"
        return
    if run.is_success:  # nothing to import and nothing failed: an ingest that stopped short
        state.state = "discovered"
        return
    message, outcome = run_error(instance, run)
    failures = [r for r in runs if r.dagster_run.status in FINISHED_STATUSES and not r.dagster_run.is_success]
    state.attempts = max(len(failures), int(run.tags.get(ATTEMPT_TAG, "1") or 1))
    if outcome == "refused":
        state.state, state.detail = "refused", message
    elif state.attempts >= retries.max_attempts:
        state.state = "needs_attention"
        state.detail = f"ingest failed {state.attempts} times; last error: {message}"
    else:
        state.state = "retrying"
        state.retry_at = ended + retries.delay(state.attempts)
        state.detail = f"attempt {state.attempts} of {retries.max_attempts} failed: {message}"

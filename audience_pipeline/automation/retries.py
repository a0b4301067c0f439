"""Failed ingests run again: the sensor-triggered backfill of a file whose run failed.

Dagster's own run retries (``dagster/max_retries`` with ``run_retries`` in ``dagster.yaml``)
only exist under the daemon and re-run a run at once; ``sync`` runs in process and a vendor that
is down for ten minutes needs back-off. So this sensor reads each partition's state
(``lifecycle.py``) and asks for attempt ``n + 1`` of a ``retrying`` partition once the feed's
back-off after attempt ``n`` has passed, with ``run_key = <partition>#attempt<n+1>``: each
attempt is its own run, and a tick that runs twice cannot start it twice. Files refused or
blocked are not retried (the file must change, and a changed file is a new partition); after
``retries.max_attempts`` the partition needs attention.
"""

from __future__ import annotations

import time

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from audience_pipeline.assets import FeedKeys
from audience_pipeline.automation.lifecycle import PartitionState, feed_states, reap_dead_runs
from audience_pipeline.tags import ATTEMPT_TAG

RETRIES_SUFFIX = "__ingest_retries"


def retries_sensor_name(feed: str) -> str:
    return f"{feed}{RETRIES_SUFFIX}"


def retry_request(state: PartitionState) -> dg.RunRequest:
    attempt = state.attempts + 1
    return dg.RunRequest(
        partition_key=state.partition,
        run_key=f"{state.partition}#attempt{attempt}",
        tags={ATTEMPT_TAG: str(attempt)},
    )


def due_retries(
    instance: dg.DagsterInstance, keys: FeedKeys, *, now: float | None = None, ignore_backoff: bool = False
) -> list[PartitionState]:
    """Partitions whose failed ingest should run again now (``sync`` ignores the back-off)."""
    now = time.time() if now is None else now
    reap_dead_runs(instance, [keys.ingest_job, keys.report_job])
    states = feed_states(instance, keys, keys.feed.retries, now=now)
    return [
        s
        for s in states.values()
        if s.state == "retrying" and (ignore_backoff or (s.retry_at is not None and s.retry_at <= now))
    ]


def build_retries_sensor(keys: FeedKeys, ingest_job: UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    retries = keys.feed.retries

    @dg.sensor(
        name=retries_sensor_name(keys.feed.name),
        job=ingest_job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Runs a failed ingest again, up to {retries.max_attempts} attempts, waiting "
            f"{retries.backoff_seconds:g} s after the first failure and twice as long after each next one."
        ),
    )
    def ingest_retries(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        due = due_retries(context.instance, keys)
        for state in due:
            context.log.info(f"{state.partition}: attempt {state.attempts + 1} ({state.detail})")
        return dg.SensorResult(
            run_requests=[retry_request(s) for s in due],
            skip_reason=None if due else "no failed ingest is due for a retry",
        )

    return ingest_retries

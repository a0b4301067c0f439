"""Failed ingests run again: the sensor-triggered backfill of a file whose run failed.

Dagster's own run retries (``dagster/max_retries`` with ``run_retries`` in ``dagster.yaml``)
only exist under the daemon and re-run a run at once; ``sync`` runs in process and a vendor that
is down for ten minutes needs back-off. A step ``RetryPolicy`` would hold a worker inside the run
for the whole back-off and dies with the process. Retrying here needs neither: the submit
records its intent in the instance, so any later attempt, from any process, knows what was sent.

This sensor reads each partition's state (``lifecycle.py``) and asks for attempt ``n + 1`` of a
``retrying`` partition once the feed's back-off after attempt ``n`` has passed, with ``run_key =
<partition>#attempt<n+1>``: each attempt is its own run, and a tick that runs twice cannot start
it twice. Files refused or blocked are not retried (the file must change, and a changed file is
a new partition); after ``retries.max_attempts`` the partition needs attention. A tick with
nothing to retry says how many files are in each state, so the sensor's tick history in the UI
is the feed's overview.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

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


def current_states(instance: dg.DagsterInstance, keys: FeedKeys, now: float) -> list[PartitionState]:
    """Every partition's state, after marking failed the runs of processes that died."""
    reap_dead_runs(instance, [keys.ingest_job, keys.report_job])
    return list(feed_states(instance, keys, keys.feed.retries, now=now).values())


def retrying(instance: dg.DagsterInstance, keys: FeedKeys, now: float) -> list[PartitionState]:
    """Partitions whose ingest failed and will run again (``sync`` ignores the back-off)."""
    return [s for s in current_states(instance, keys, now) if s.state == "retrying"]


def overview(states: Iterable[PartitionState]) -> str:
    """The tick's one line in the UI: files per state, and the ones that need a person by name."""
    states = list(states)
    counts = Counter(s.state for s in states)
    line = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no files yet"
    stuck = [s for s in states if s.state == "needs_attention"][:5]
    return line + "".join(f"; {s.partition} needs attention: {s.detail}" for s in stuck)


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
        now = time.time()
        states = current_states(context.instance, keys, now)
        due = [s for s in states if s.state == "retrying" and (s.retry_at or 0) <= now]
        for state in due:
            context.log.info(f"{state.partition}: attempt {state.attempts + 1} ({state.detail})")
        return dg.SensorResult(
            run_requests=[retry_request(s) for s in due],
            skip_reason=None if due else overview(states),
        )

    return ingest_retries

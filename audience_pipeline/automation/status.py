"""The import-status sensor: every import ends, and every import gets its report.

It follows ``import_job`` materializations through the event log (cursor ``after`` = the last
storage id read) and tracks each import by its key (``JobHandle.key``) until a
``failure_report`` materialization names that very import. Per import the cursor keeps the
partition, when it was submitted, consecutive poll errors, when it was last polled, its final
state once known, and how many report runs were requested.

An import ends when:
- the vendor says so (a terminal state);
- it outlives the destination's ``import_timeout_minutes`` (``timed_out``): the report then
  fails its rows with "timed out after …" instead of waiting forever;
- ``max_poll_errors`` consecutive polls failed with an error that will not pass by itself
  (4xx other than 408/429, an answer that is not the vendor's JSON) (``poll_failed``).
Server errors and dropped connections only count against the time limit. A 429 defers the
import to the next tick: a tick never sleeps on ``Retry-After`` (the client is built with a
retry policy that does not retry 429), so it stays inside Dagster's sensor time limit.
A status word the client does not know is logged by name and polled again.

Report runs have ``run_key = <import key>:<final state>`` (``#report<n>`` from the second try
on) and are retried with the feed's back-off until the report exists or ``max_attempts`` report
runs failed; the partition then needs attention (see ``lifecycle.py``). A re-run that makes a
new import is a new key, so it gets a new report; a re-run that reuses an import whose report
exists says so in the tick's log.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from audience_pipeline.assets import FeedKeys, handle_of, metadata_of
from audience_pipeline.automation.lifecycle import FINISHED_STATUSES, latest_by_partition, report_covers
from audience_pipeline.destinations.base import JobHandle, JobState, JobStatus
from audience_pipeline.destinations.http import RetryPolicy, VendorConnectionError, VendorError
from audience_pipeline.feeds.model import DestinationConfig, RetrySettings, import_timeout_seconds
from audience_pipeline.redact import redact
from audience_pipeline.tags import (
    FINAL_DETAIL_TAG,
    FINAL_STATE_TAG,
    IMPORT_TAG,
    POLL_GAVE_UP,
    VENDOR_STATUS_TAG,
)

MAX_POLLS_PER_TICK = 50
POLL_THREADS = 8
POLL_RETRY = RetryPolicy(
    attempts=2, backoff_base=0.2, backoff_max=1.0, retry_statuses=frozenset({500, 502, 503, 504})
)
"""Sensor-side calls: one quick retry of a server error, never a wait on Retry-After."""
STATUS_SUFFIX = "__import_status"
LOST_REQUEST_SECONDS = 120.0
"""A report run requested this long ago that never started is requested again (same run key)."""


def status_sensor_name(feed: str) -> str:
    return f"{feed}{STATUS_SUFFIX}"


class Deferred(Exception):
    """The vendor asked us to slow down (429): poll again next tick, not an error."""


def build_status_sensor(
    keys: FeedKeys,
    report_job: UnresolvedAssetJobDefinition,
    destination: DestinationConfig,
    retries: RetrySettings,
) -> dg.SensorDefinition:
    limit = import_timeout_seconds(destination)
    max_errors = destination.max_poll_errors

    @dg.sensor(
        name=status_sensor_name(keys.feed.name),
        job=report_job,
        minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={keys.destination_resource},
        description=(
            f"Polls in-flight imports (time limit {limit / 3600:g} h) and requests the failure report "
            "when one ends; retries report runs that fail."
        ),
    )
    def import_status(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        state = _parse(context.cursor)
        tracked: dict[str, dict[str, Any]] = state["imports"]
        state["after"] = _follow_imports(context, keys, tracked, state["after"])
        if not tracked:
            return dg.SensorResult(cursor=_dump(state), skip_reason="no import in flight")
        now = time.time()
        due = sorted(
            (k for k, e in tracked.items() if e.get("final") is None), key=lambda k: tracked[k]["polled"]
        )
        due = due[:MAX_POLLS_PER_TICK]
        if due:
            _poll_all(context, keys, tracked, due, now, limit, max_errors)
        requests = _report_requests(context, keys, tracked, retries, now)
        waiting = sum(1 for e in tracked.values() if e.get("final") is None)
        return dg.SensorResult(
            run_requests=requests,
            cursor=_dump(state),
            skip_reason=None
            if requests
            else f"{waiting} import(s) in flight, {len(tracked) - waiting} awaiting a report",
        )

    return import_status


def _parse(cursor: str | None) -> dict[str, Any]:
    raw = json.loads(cursor) if cursor else {}
    if "imports" not in raw:  # the earlier cursor ({"after", "inflight"}): re-read from its start
        return {"after": None, "imports": {}}
    return raw


def _dump(state: dict[str, Any]) -> str:
    return json.dumps(state, separators=(",", ":"), sort_keys=True)


def _follow_imports(
    context: dg.SensorEvaluationContext, keys: FeedKeys, tracked: dict[str, dict], after: int | None
) -> int | None:
    """Start tracking imports materialized since ``after``; say when a re-run reused one."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=keys.import_job, after_storage_id=after), limit=1000, ascending=True
    ).records
    for record in records:
        after = record.storage_id
        handle = handle_of(record)
        if not record.partition_key or handle is None:
            continue
        partition = record.partition_key
        if handle.key in tracked:
            continue
        for key in [k for k, e in tracked.items() if e["p"] == partition]:
            context.log.info(
                f"{partition}: import {key} superseded by {handle.key}; only the newest is reported"
            )
            tracked.pop(key)
        report = latest_by_partition(context.instance, keys.failure_report, [partition]).get(partition)
        if metadata_of(record).get("reused_previous_import") and report_covers(report, record, handle.key):
            context.log.info(
                f"{partition}: a re-run reused import {handle.key}, whose report already exists; "
                "no new report (run with config force: true to import again)"
            )
            continue
        tracked[handle.key] = {
            "p": partition,
            "since": handle.submitted_at,
            "err": 0,
            "polled": 0,
            "final": None if handle.jobs else "nothing_submitted",
            "detail": "",
            "att": 0,
            "at": 0,
        }
    return after


def _poll_all(
    context: dg.SensorEvaluationContext,
    keys: FeedKeys,
    tracked: dict[str, dict],
    due: list[str],
    now: float,
    limit: float,
    max_errors: int,
) -> None:
    handles = _handles(context.instance, keys, {tracked[k]["p"] for k in due})
    resource = getattr(context.resources, keys.destination_resource)
    client = resource.destination(keys.feed.options, retry=POLL_RETRY)
    polled = [k for k in due if k in handles]
    try:
        with ThreadPoolExecutor(max_workers=POLL_THREADS) as pool:
            results = list(pool.map(lambda k: _poll(client, handles[k]), polled))
    finally:
        client.close()
    for key in set(due) - set(polled):  # its materialization is gone (wiped partition): stop tracking
        tracked.pop(key)
    for key, result in zip(polled, results, strict=True):
        entry = tracked[key]
        entry["polled"] = now
        partition = entry["p"]
        if isinstance(result, Deferred):
            context.log.info(f"{partition}: the vendor asked to slow down (429); polled again next tick")
        elif isinstance(result, JobStatus):
            entry["err"] = 0
            entry["last"] = result.vendor_status
            if result.state.terminal:
                entry["final"] = result.vendor_status
                continue
            if result.state is JobState.UNKNOWN:
                context.log.warning(
                    f"{partition}: import {key} reports status {result.vendor_status!r}, which this pipeline "
                    "does not know; it is polled until it ends or reaches its time limit"
                )
        else:
            permanent, message = result
            entry["err"] += 1 if permanent else 0  # only a good answer resets the count
            context.log.warning(
                f"{partition}: status poll failed"
                + (f" ({entry['err']} of {max_errors} in a row)" if permanent else "")
                + f": {message}"
            )
            if entry["err"] >= max_errors:
                entry["final"] = "poll_failed"
                entry["detail"] = f"status polls failed {entry['err']} times in a row: {message}"
                continue
        if entry.get("final") is None and now - entry["since"] > limit:
            entry["final"] = "timed_out"
            last = entry.get("last") or "unknown"
            entry["detail"] = f"timed out after {_duration(limit)} (last vendor status: {last})"
            context.log.warning(f"{partition}: import {key} {entry['detail']}")


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _ended(runs: list[dg.RunRecord], default: float) -> float:
    """When the newest report run ended: the back-off counts from there, as for ingests."""
    ends = [r.end_time for r in runs if r.end_time]
    return max(ends) if ends else default


def _poll(client, handle: JobHandle) -> JobStatus | Deferred | tuple[bool, str]:
    """The status, a deferral, or ``(permanent, message)`` for an error."""
    try:
        return client.status(handle)
    except VendorError as exc:
        if exc.status == 429:
            return Deferred()
        transient = isinstance(exc, VendorConnectionError) or (exc.status or 0) >= 500 or exc.status == 408
        return (not transient, redact(str(exc)))
    except Exception as exc:  # a client bug or an unparseable answer: permanent, but never fatal
        return (True, redact(f"{type(exc).__name__}: {exc}"))


def _handles(instance: dg.DagsterInstance, keys: FeedKeys, partitions: set[str]) -> dict[str, JobHandle]:
    """The latest handle of each partition, by import key."""
    records = latest_by_partition(instance, keys.import_job, sorted(partitions)).values()
    return {handle.key: handle for handle in map(handle_of, records) if handle is not None}


def _report_requests(
    context: dg.SensorEvaluationContext,
    keys: FeedKeys,
    tracked: dict[str, dict],
    retries: RetrySettings,
    now: float,
) -> list[dg.RunRequest]:
    """Report runs for ended imports: the first at once, failed ones again after the back-off."""
    requests = []
    ended = {k: e for k, e in tracked.items() if e.get("final") is not None}
    if not ended:
        return requests
    reports = latest_by_partition(
        context.instance, keys.failure_report, sorted({e["p"] for e in ended.values()})
    )
    imports = latest_by_partition(context.instance, keys.import_job, sorted({e["p"] for e in ended.values()}))
    for key, entry in ended.items():
        partition = entry["p"]
        if partition in imports and report_covers(reports.get(partition), imports[partition], key):
            tracked.pop(key)
            continue
        runs = context.instance.get_run_records(
            dg.RunsFilter(job_name=keys.report_job, tags={IMPORT_TAG: key}), limit=retries.max_attempts + 5
        )
        if any(r.dagster_run.status not in FINISHED_STATUSES for r in runs):
            continue
        failed = [r for r in runs if not r.dagster_run.is_success]
        if entry["att"] and not runs:
            if now - entry["at"] < LOST_REQUEST_SECONDS:
                continue  # requested, not started yet
            entry["at"] = now  # the request was lost (a tick whose result was dropped): ask again, same key
        elif entry["att"] and len(runs) >= retries.max_attempts:
            context.log.error(
                f"{partition}: {len(runs)} report runs of import {key} ended without its report; "
                "it needs attention (re-run its report job once the cause is fixed)"
            )
            tracked.pop(key)
            continue
        elif entry["att"] and now < _ended(runs, entry["at"]) + retries.delay(max(len(failed), 1)):
            continue
        else:
            entry["att"] += 1
            entry["at"] = now
        run_key = f"{key}:{entry['final']}" + (f"#report{entry['att']}" if entry["att"] > 1 else "")
        tags = {IMPORT_TAG: key, VENDOR_STATUS_TAG: entry["final"], FINAL_STATE_TAG: entry["final"]}
        if entry["final"] in POLL_GAVE_UP:
            tags[FINAL_DETAIL_TAG] = entry["detail"][:250]
        requests.append(dg.RunRequest(partition_key=partition, run_key=run_key, tags=tags))
    return requests

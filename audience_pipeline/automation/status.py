"""The import-status sensor: every import ends, and every import gets its report.

It follows ``import_job`` materializations through the event log and tracks each import by its
key (``JobHandle.key``) until a ``failure_report`` materialization names that very import.

Thousands of imports in flight (see ``benchmarks/bench_status.py``):
- **State in the instance, not the cursor.** Per import it keeps the partition, the storage id
  of its ``import_job`` materialization, when it was submitted, last polled and is next due,
  consecutive poll errors, its final state once known, and how many report runs were requested.
  That is ~170 bytes an import, so it lives in the instance's key-value store (the table Dagster
  keeps its own daemon cursors in, SQLite or Postgres alike) under :func:`state_key`, written once
  per tick; the sensor's cursor only summarises it. A state written by a tick whose result
  Dagster then lost is harmless: a report request it holds is asked again after
  :data:`LOST_REQUEST_SECONDS` with the same run key.
- **Read once.** A materialization is decoded once, when it is first seen; its handle is kept in
  memory by storage id, and fetched again by storage id only after a restart.
- **Due, not every tick.** An import is polled again after a tenth of its age
  (:data:`POLL_AGE_FRACTION`, in whole sensor intervals), never less often than the destination's
  ``status_polling.max_interval_seconds`` (120 s): a new import is polled every tick, a two-hour
  APSIS import every two minutes. The most overdue are polled first.
- **Bounded.** Polls run on kept client pools within the destination's concurrency and
  requests-per-second limits (``polling.py``), until :data:`TICK_BUDGET_SECONDS`; what did not
  fit stays due and comes first next tick.

An import ends when:
- the vendor says so (a terminal state); that answer ends the polling;
- it outlives the destination's ``import_timeout_minutes`` (``timed_out``): the report then
  fails its rows with "timed out after …" instead of waiting forever;
- ``max_poll_errors`` consecutive polls failed with an error that will not pass by itself
  (4xx other than 408/429, an answer that is not the vendor's JSON) (``poll_failed``).
Server errors and dropped connections only count against the time limit. A 429 defers the
import to the next tick: a tick never sleeps on ``Retry-After`` (the client is built with a
retry policy that does not retry 429), so it stays inside Dagster's sensor time limit.
A status word the client does not know is logged by name and polled again.

Report runs have ``run_key = <import key>:<how it ended>`` (``ended`` when the vendor ended it,
else ``timed_out``, ``poll_failed`` or ``nothing_submitted``; ``#report<n>`` from the second try
on) and carry the final state, so the report does not ask the vendor again: the pipeline's own
words (``timed_out``, ``poll_failed``) as tags, the vendor's word in the run config, so no run is
tagged "failed" by a vendor when the report's normalised outcome says otherwise. They
are retried with the feed's back-off until the report exists or ``max_attempts`` report runs
failed; the partition then needs attention (see ``lifecycle.py``). A re-run that makes a new
import is a new key, so it gets a new report; a re-run that reuses an import whose report
exists says so in the tick's log.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from time import monotonic
from typing import Any

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from audience_pipeline.assets import FeedKeys, ReportConfig, handle_of, metadata_of
from audience_pipeline.automation.cadence import minimum_interval
from audience_pipeline.automation.lifecycle import FINISHED_STATUSES, latest_by_partition, report_covers
from audience_pipeline.automation.polling import NOT_POLLED, PollLimits, pool_for
from audience_pipeline.destinations.base import JobHandle, JobState, JobStatus
from audience_pipeline.destinations.http import RetryPolicy, VendorConnectionError, VendorError
from audience_pipeline.feeds.model import DestinationConfig, RetrySettings, import_timeout_seconds
from audience_pipeline.redact import redact
from audience_pipeline.tags import (
    FINAL_DETAIL_TAG,
    FINAL_STATE_TAG,
    IMPORT_TAG,
    POLL_GAVE_UP,
)

MAX_POLLS_PER_TICK = 2_000
"""At most this many imports are handed to the pool per tick (the budget usually ends it first)."""
TICK_BUDGET_SECONDS = 4.5
"""Polls that cannot start within this many seconds of the tick's start wait for the next tick."""
POLL_AGE_FRACTION = 0.1
SENSOR_INTERVAL_SECONDS = 15
FOLLOW_LIMIT = 1_000
"""``import_job`` materializations read per tick; a backlog is read over several ticks."""
HANDLE_CACHE_SIZE = 50_000
POLL_RETRY = RetryPolicy(
    attempts=2, backoff_base=0.2, backoff_max=1.0, retry_statuses=frozenset({500, 502, 503, 504})
)
"""Sensor-side calls: one quick retry of a server error, never a wait on Retry-After."""
STATUS_SUFFIX = "__import_status"
STATE_PREFIX = "audience_pipeline/import_status/"
LOST_REQUEST_SECONDS = 120.0
"""A report run requested this long ago that never started is requested again (same run key)."""

_HANDLES: OrderedDict[tuple[str, int], JobHandle] = OrderedDict()


def status_sensor_name(feed: str) -> str:
    return f"{feed}{STATUS_SUFFIX}"


def state_key(feed: str) -> str:
    """Where a feed's in-flight imports are kept in the instance's key-value store."""
    return f"{STATE_PREFIX}{feed}"


def in_flight(instance: dg.DagsterInstance, feed: str) -> dict[str, dict[str, Any]]:
    """The imports the feed's status sensor tracks, by import key (empty before its first tick)."""
    stored = instance.daemon_cursor_storage.get_cursor_values({state_key(feed)}).get(state_key(feed))
    return json.loads(stored)["imports"] if stored else {}


def poll_interval(age: float, max_interval: float) -> float:
    """Seconds until the next poll of an import ``age`` seconds old (see the module docstring).

    Rounded down to whole sensor intervals, so an import younger than ten intervals is due at
    every tick however early the tick comes.
    """
    tenth = max(0.0, age) * POLL_AGE_FRACTION
    return min(max_interval, tenth // SENSOR_INTERVAL_SECONDS * SENSOR_INTERVAL_SECONDS)


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
    polling = destination.status_polling
    limits = PollLimits(polling.concurrency, polling.requests_per_second)

    @dg.sensor(
        name=status_sensor_name(keys.feed.name),
        job=report_job,
        minimum_interval_seconds=minimum_interval(SENSOR_INTERVAL_SECONDS),
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={keys.destination_resource},
        description=(
            f"Polls in-flight imports into {keys.target} (time limit {limit / 3600:g} h, at least every "
            f"{polling.max_interval_seconds:g} s, at most {limits.requests_per_second:g} calls/s) and "
            "requests the failure report when one ends; retries report runs that fail."
        ),
    )
    def import_status(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        started = monotonic()  # the tick's budget runs on the pool's clock, not the wall clock
        state = _load(context, keys)
        tracked: dict[str, dict[str, Any]] = state["imports"]
        state["after"] = _follow_imports(context, keys, tracked, state["after"])
        now = time.time()
        due = sorted(  # an import past its time limit is asked once more: it may have just ended
            (
                k
                for k, e in tracked.items()
                if e.get("final") is None and (e.get("next", 0) <= now or now - e["since"] > limit)
            ),
            key=lambda k: (tracked[k].get("next", 0), tracked[k]["polled"]),
        )[:MAX_POLLS_PER_TICK]
        if due:
            poll = _Poll(limit, max_errors, polling.max_interval_seconds)
            _poll_all(context, keys, limits, tracked, due, now, poll, started + TICK_BUDGET_SECONDS)
        requests = _report_requests(context, keys, tracked, retries, now) if tracked else []
        _save(context.instance, keys, state)
        waiting = sum(1 for e in tracked.values() if e.get("final") is None)
        summary = {"after": state["after"], "in_flight": waiting, "awaiting_report": len(tracked) - waiting}
        if not tracked:
            skip = "no import in flight"
        else:
            skip = f"{waiting} import(s) in flight, {len(tracked) - waiting} awaiting a report"
        return dg.SensorResult(
            run_requests=requests, cursor=json.dumps(summary), skip_reason=None if requests else skip
        )

    return import_status


def _load(context: dg.SensorEvaluationContext, keys: FeedKeys) -> dict[str, Any]:
    """The feed's state from the instance; the cursor of earlier releases is taken over once."""
    key = state_key(keys.feed.name)
    stored = context.instance.daemon_cursor_storage.get_cursor_values({key}).get(key)
    if stored:
        return json.loads(stored)
    raw = json.loads(context.cursor) if context.cursor else {}
    if isinstance(raw.get("imports"), dict):  # state kept in the cursor itself (before the instance)
        return {"after": raw.get("after"), "imports": raw["imports"]}
    return {"after": None, "imports": {}}  # nothing kept: read every import_job from the start


def _save(instance: dg.DagsterInstance, keys: FeedKeys, state: dict[str, Any]) -> None:
    text = json.dumps(state, separators=(",", ":"), sort_keys=True)
    instance.daemon_cursor_storage.set_cursor_values({state_key(keys.feed.name): text})


def _remember(keys: FeedKeys, storage_id: int, handle: JobHandle) -> None:
    key = (keys.import_job.to_user_string(), storage_id)
    _HANDLES[key] = handle
    _HANDLES.move_to_end(key)
    while len(_HANDLES) > HANDLE_CACHE_SIZE:
        _HANDLES.popitem(last=False)


def _follow_imports(
    context: dg.SensorEvaluationContext, keys: FeedKeys, tracked: dict[str, dict], after: int | None
) -> int | None:
    """Start tracking imports materialized since ``after``; say when a re-run reused one."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=keys.import_job, after_storage_id=after),
        limit=FOLLOW_LIMIT,
        ascending=True,
    ).records
    new: list[tuple[dg.EventLogRecord, JobHandle]] = []
    for record in records:
        after = record.storage_id
        handle = handle_of(record)
        if record.partition_key and handle is not None:
            _remember(keys, record.storage_id, handle)
            new.append((record, handle))
    if not new:
        return after
    reports = latest_by_partition(
        context.instance, keys.failure_report, sorted({r.partition_key for r, _ in new if r.partition_key})
    )
    by_partition = {e["p"]: k for k, e in tracked.items()}
    for record, handle in new:
        partition = record.partition_key
        assert partition is not None
        if handle.key in tracked:
            tracked[handle.key]["sid"] = record.storage_id
            continue
        superseded = by_partition.pop(partition, None)
        if superseded in tracked:
            context.log.info(
                f"{partition}: import {superseded} superseded by {handle.key}; only the newest is reported"
            )
            tracked.pop(superseded)
        if report_covers(reports.get(partition), record, handle.key):
            if metadata_of(record).get("reused_previous_import"):
                context.log.info(
                    f"{partition}: a re-run reused import {handle.key}, whose report already exists; "
                    "no new report (run with config force: true to import again)"
                )
            continue
        by_partition[partition] = handle.key
        tracked[handle.key] = {
            "p": partition,
            "sid": record.storage_id,
            "since": handle.submitted_at,
            "err": 0,
            "polled": 0,
            "next": 0,
            "final": None if handle.jobs else "nothing_submitted",
            "detail": "",
            "att": 0,
            "at": 0,
        }
    return after


@dataclass(frozen=True)
class _Poll:
    """The destination's settings a poll's answer is judged by."""

    limit: float
    max_errors: int
    max_interval: float


def _poll_all(
    context: dg.SensorEvaluationContext,
    keys: FeedKeys,
    limits: PollLimits,
    tracked: dict[str, dict],
    due: list[str],
    now: float,
    poll: _Poll,
    deadline: float,
) -> None:
    handles = _handles(context.instance, keys, {k: tracked[k] for k in due})
    for key in [k for k in due if k not in handles]:  # its materialization is gone (wiped partition)
        tracked.pop(key)
    polled = [k for k in due if k in handles]
    resource = getattr(context.resources, keys.destination_resource)
    options = keys.feed.options
    pool = pool_for(
        keys.destination_resource,
        resource,
        options,
        limits,
        lambda: resource.destination(options, retry=POLL_RETRY),
    )
    results = pool.run([(k, _caller(handles[k]), max(1, len(handles[k].jobs))) for k in polled], deadline)
    deferred = [tracked[k]["p"] for k, r in results.items() if isinstance(r, Deferred)]
    if deferred:
        context.log.info(
            f"the vendor asked to slow down (429) for {len(deferred)} import(s), e.g. {deferred[0]}; "
            "polled again next tick"
        )
    skipped = sum(1 for r in results.values() if r is NOT_POLLED)
    if skipped:
        context.log.info(f"{skipped} due import(s) did not fit in this tick's limits; polled first next tick")
    for key in polled:
        result = results[key]
        if result is NOT_POLLED:
            continue
        entry = tracked[key]
        entry["polled"] = now
        entry["next"] = now + poll_interval(now - entry["since"], poll.max_interval)
        _apply(context, key, entry, result, now, poll)


def _apply(
    context: dg.SensorEvaluationContext, key: str, entry: dict, result: Any, now: float, poll: _Poll
) -> None:
    """One poll's answer: the final state, an error counted, or the time limit reached."""
    partition = entry["p"]
    if isinstance(result, Deferred):
        entry["next"] = now
    elif isinstance(result, JobStatus):
        entry["err"] = 0
        entry["last"] = result.vendor_status
        if result.state.terminal:  # the vendor's last word, passed to the report so it need not ask again
            entry["final"] = result.vendor_status
            entry["state"] = result.state.value
            entry["detail"] = result.detail
            context.log.info(
                f"{partition}: import {key} has ended at the vendor (its word: {result.vendor_status!r})"
            )
            return
        if result.state is JobState.UNKNOWN:
            context.log.warning(
                f"{partition}: import {key} reports status {result.vendor_status!r}, which this pipeline "
                "does not know; it is polled until it ends or reaches its time limit"
            )
    else:
        permanent, message = result
        entry["err"] += 1 if permanent else 0  # only a good answer resets the count
        entry["next"] = now
        context.log.warning(
            f"{partition}: status poll failed"
            + (f" ({entry['err']} of {poll.max_errors} in a row)" if permanent else "")
            + f": {message}"
        )
        if entry["err"] >= poll.max_errors:
            entry["final"] = "poll_failed"
            entry["detail"] = f"status polls failed {entry['err']} times in a row: {message}"
            return
    if now - entry["since"] > poll.limit:
        entry["final"] = "timed_out"
        last = entry.get("last") or "unknown"
        entry["detail"] = f"timed out after {_duration(poll.limit)} (last vendor status: {last})"
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


def _caller(handle: JobHandle):
    return lambda client: _poll(client, handle)


def _handles(instance: dg.DagsterInstance, keys: FeedKeys, entries: dict[str, dict]) -> dict[str, JobHandle]:
    """The handle of each import, by key: from memory, else by storage id, else by partition."""
    asset = keys.import_job.to_user_string()
    found: dict[str, JobHandle] = {}
    by_sid: dict[int, str] = {}
    by_partition: list[str] = []
    for key, entry in entries.items():
        sid = entry.get("sid")
        cached = _HANDLES.get((asset, sid)) if sid is not None else None
        if cached is not None and cached.key == key and cached.partition == entry["p"]:
            found[key] = cached
        elif sid is not None:
            by_sid[sid] = key
        else:  # tracked before storage ids were kept
            by_partition.append(entry["p"])
    sids = sorted(by_sid)
    for start in range(0, len(sids), 500):
        chunk = sids[start : start + 500]
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=keys.import_job, storage_ids=chunk), limit=len(chunk)
        ).records
        for record in records:
            handle = handle_of(record)
            if handle is not None and by_sid.get(record.storage_id) == handle.key:
                _remember(keys, record.storage_id, handle)
                found[handle.key] = handle
    if by_partition:
        for record in latest_by_partition(instance, keys.import_job, sorted(set(by_partition))).values():
            handle = handle_of(record)
            if handle is not None and handle.key in entries:
                entries[handle.key]["sid"] = record.storage_id
                found[handle.key] = handle
    return found


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
        run_key = f"{key}:{run_key_state(entry['final'])}" + (
            f"#report{entry['att']}" if entry["att"] > 1 else ""
        )
        tags, run_config = report_request_details(keys, key, entry)
        context.log.info(f"{partition}: requesting the failure report of import {key}")
        requests.append(
            dg.RunRequest(partition_key=partition, run_key=run_key, tags=tags, run_config=run_config)
        )
    return requests


def run_key_state(final: str) -> str:
    """The run key's last part: the pipeline's own word, or ``ended`` for the vendor's (a run key is
    shown as a tag, and the vendor's "failed" would contradict a report that imported 192 of 194)."""
    return final if final in POLL_GAVE_UP or final == "nothing_submitted" else "ended"


def report_request_details(keys: FeedKeys, key: str, entry: dict[str, Any]) -> tuple[dict[str, str], dict]:
    """Tags and run config of a report run.

    The pipeline's own words (``timed_out``, ``poll_failed``, ``nothing_submitted``) are tags;
    the vendor's final word goes in the run config (``ReportConfig``), so the run is never tagged
    with a vendor word such as "failed" that its normalised outcome contradicts.
    """
    tags = {IMPORT_TAG: key}
    final = entry["final"]
    if final in POLL_GAVE_UP or final == "nothing_submitted":
        tags[FINAL_STATE_TAG] = final
        if entry.get("detail"):
            tags[FINAL_DETAIL_TAG] = entry["detail"][:250]
        return tags, {}
    if not entry.get("state"):  # tracked by an earlier release: the report asks the vendor
        return tags, {}
    config = ReportConfig(vendor_status=final, job_state=entry["state"], detail=entry.get("detail") or "")
    return tags, keys.report_run_config(config)

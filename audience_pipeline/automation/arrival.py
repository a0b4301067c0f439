"""How files arrive: new HR files become partitions and runs.

A partition is added once; what happens when its run fails is ``retries.py``'s business.

The new-file sensor's cursor is ``{"files": {name: [size,
mtime_ns, 16 hex chars of sha256 or null]}, "after": storage id}`` (10 chars in cursors of
earlier releases): only files still in the source are kept,
so it stays as small as the drop folder. A file is hashed once, when it is ready (marker present,
or size and mtime unchanged since the previous listing, or untouched for the source's
``stable_after_seconds``); until then its entry has no hash and it is "settling". Hashing stops
after ``HASH_BUDGET_SECONDS`` per tick so a backlog never breaks Dagster's tick timeout. A
source that is down makes the tick a ``SkipReason`` (Dagster then keeps the cursor as it was).
When the source moves or tags processed files, the same sensor does it for every ``import_job``
materialization since ``after``, if the file in the source still has the partition's content.
A file's key is its name, or its name and a short hash when the name is taken by another content
(``sources/base.py``); :func:`partition_keys` chooses it and records the content it stands for.

Sources without file events (an HTTP report URL) get a schedule instead: each tick pulls the
report into staging, hashes it and, if that content is new, adds its partition and requests a run.
"""

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from audience_pipeline.assets import STORAGE_KEY, FeedKeys
from audience_pipeline.automation.cadence import minimum_interval
from audience_pipeline.feeds.model import HttpReportSource, SourceConfig
from audience_pipeline.object_store import put_file
from audience_pipeline.partition_content import expected_contents, record_content, recorded_content
from audience_pipeline.redact import redact
from audience_pipeline.sources.base import (
    CURSOR_HASH_CHARS,
    FileDropSource,
    HRSource,
    SourceFile,
    choose_partition_key,
    fingerprint,
    same_content,
    split_partition_key,
    stage,
)

HASH_BUDGET_SECONDS = 30.0
MAX_MARKS_PER_TICK = 100
NEW_FILES_SUFFIX = "__new_files"
REPORT_PULL_SUFFIX = "__report_pull"


def new_files_sensor_name(feed: str) -> str:
    return f"{feed}{NEW_FILES_SUFFIX}"


def report_schedule_name(feed: str) -> str:
    return f"{feed}{REPORT_PULL_SUFFIX}"


@dataclass
class FileCursor:
    """The new-file sensor's memory: listed files and the last import handled for processed files."""

    files: dict[str, list] = field(default_factory=dict)
    after: int | None = None

    @classmethod
    def parse(cls, text: str | None) -> "FileCursor":
        raw = json.loads(text) if text else {}
        if "files" not in raw:  # the earlier cursor: a bare {name: [size, mtime, partition key]}
            raw = {"files": raw}
        files = {
            name: [entry[0], entry[1], entry[2].rpartition("@")[2] if entry[2] else None]
            for name, entry in raw["files"].items()
        }
        return cls(files=files, after=raw.get("after"))

    def dump(self) -> str:
        return json.dumps({"files": self.files, "after": self.after}, sort_keys=True, separators=(",", ":"))

    def settling(self) -> list[str]:
        return sorted(name for name, entry in self.files.items() if not entry[2])


def files_settling(cursor: str | None) -> list[str]:
    """Files a new-file sensor has seen but not yet taken (still being written or no marker yet)."""
    try:
        return FileCursor.parse(cursor).settling()
    except (ValueError, KeyError, TypeError, IndexError):
        return []


def build_arrival_automation(
    keys: FeedKeys, ingest_job: UnresolvedAssetJobDefinition, source: SourceConfig
) -> tuple[list[dg.SensorDefinition], list[dg.ScheduleDefinition]]:
    """How a feed's files arrive: a new-file sensor for file drops, a schedule for report URLs."""
    if isinstance(source, HttpReportSource):
        return [], [build_report_schedule(keys, ingest_job, source)]
    return [build_new_file_sensor(keys, ingest_job, source.check_interval_seconds)], []


def build_new_file_sensor(
    keys: FeedKeys, ingest_job: UnresolvedAssetJobDefinition, interval_seconds: int = 30
) -> dg.SensorDefinition:
    @dg.sensor(
        name=new_files_sensor_name(keys.feed.name),
        job=ingest_job,
        minimum_interval_seconds=minimum_interval(interval_seconds),
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={keys.source_resource},
        description=(
            f"Adds a partition for every new or changed file in {keys.source} once it is complete "
            "(stable across two listings, or its ready marker is there) and runs it. The partition "
            "is the file's name, with a short hash only when the name came before with other content."
        ),
    )
    def new_files(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        source = getattr(context.resources, keys.source_resource)
        try:
            state = FileCursor.parse(context.cursor)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            context.log.warning("unreadable cursor: starting over (known files are re-hashed, not re-run)")
            state = FileCursor()
        try:
            listed = source.list_files()
        except Exception as exc:  # a source that is down must not break the sensor or its cursor
            message = f"{source.describe()} is unavailable: {redact(str(exc))}"
            context.log.warning(message)
            return dg.SkipReason(message)
        files, problem = _scan(source, listed, state.files)
        existing = set(context.instance.get_dynamic_partitions(keys.partitions.name))
        ready = {name: entry[2] for name, entry in files.items() if entry[2]}
        found = partition_keys(context.instance, keys.feed.name, ready, existing)
        new_keys = sorted(k for k in found.values() if k not in existing)
        for name, key in sorted(found.items()):
            if key not in existing:
                context.log.info(f"new file {name} (sha256 {ready[name][:8]}…) becomes partition {key}")
        after, mark_problem = _mark_processed(context, keys, source, files, state.after)
        cursor = FileCursor(files=files, after=after)
        notes = [p for p in (problem, mark_problem) if p]
        waiting = cursor.settling()
        if waiting:
            shown = ", ".join(waiting[:5]) + (f" and {len(waiting) - 5} more" if len(waiting) > 5 else "")
            notes.append(f"{len(waiting)} file(s) not complete yet (settling or no marker): {shown}")
        for note in notes:
            context.log.info(note)
        return dg.SensorResult(
            run_requests=[dg.RunRequest(partition_key=k, run_key=k) for k in new_keys],
            dynamic_partitions_requests=[keys.partitions.build_add_request(new_keys)] if new_keys else [],
            cursor=cursor.dump(),
            skip_reason=None if new_keys else ("; ".join(notes) or "no new files"),
        )

    return new_files


def partition_keys(
    instance: dg.DagsterInstance, feed: str, ready: dict[str, str], existing: set[str]
) -> dict[str, str]:
    """``{file name: partition key}`` of ready files: the existing key of their content, or a new
    one (not in ``existing``), whose content is recorded before it is returned.

    ``ready`` maps file names to their content's sha256 (or a prefix of 10 chars or more, from
    a cursor of an earlier release).
    """
    by_name: dict[str, list[str]] = {}
    for key in existing:
        name = split_partition_key(key)[0]
        if name in ready:
            by_name.setdefault(name, []).append(key)
    recorded = recorded_content(instance, feed, [k for found in by_name.values() for k in found])
    taken = set(existing)
    keys: dict[str, str] = {}
    for name, sha in sorted(ready.items()):
        same_name = {k: recorded.get(k) for k in by_name.get(name, [])}
        keys[name] = choose_partition_key(name, sha, same_name, taken)
        taken.add(keys[name])
    record_content(instance, feed, {k: ready[name] for name, k in keys.items() if k not in existing})
    return keys


def _scan(source: HRSource, listed: list[SourceFile], previous: dict[str, list]) -> tuple[dict, str | None]:
    """Cursor entries for the listed files, hashing those that became ready (within a time budget)."""
    stable_after = float(getattr(source, "stable_after_seconds", 0) or 0)
    now_ns = time.time_ns()
    deadline = time.monotonic() + HASH_BUDGET_SECONDS
    files: dict[str, list] = {}
    problem = None
    hashed = 0
    for f in listed:
        prev = previous.get(f.name)
        unchanged = prev is not None and prev[0] == f.size and prev[1] == f.modified_ns
        if unchanged and prev[2]:
            files[f.name] = prev
            continue
        if f.marked is not None:
            ready = f.marked
        else:
            ready = unchanged or stable_after == 0 or now_ns - f.modified_ns >= stable_after * 1e9
        entry = [f.size, f.modified_ns, None]
        if ready and problem is None and (hashed == 0 or time.monotonic() < deadline):
            try:
                entry[2] = fingerprint(source, f.name)[:CURSOR_HASH_CHARS]
                hashed += 1
            except Exception as exc:  # retried next tick; the other files keep their entries
                problem = f"cannot read {f.name} from {source.describe()}: {redact(str(exc))}"
        files[f.name] = entry
    return files, problem


def _mark_processed(
    context: dg.SensorEvaluationContext, keys: FeedKeys, source, files: dict[str, list], after: int | None
) -> tuple[int | None, str | None]:
    """Move/tag files whose import was submitted, if the source is configured to."""
    action = source.processed_action() if isinstance(source, FileDropSource) else None
    if not action:
        return after, None
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=keys.import_job, after_storage_id=after),
        limit=MAX_MARKS_PER_TICK,
        ascending=True,
    ).records
    contents = expected_contents(
        context.instance, keys.feed.name, {r.partition_key for r in records if r.partition_key}
    )
    for record in records:
        if record.partition_key:
            name = split_partition_key(record.partition_key)[0]
            entry = files.get(name)
            expected = contents[record.partition_key]
            if entry and entry[2] and expected and same_content(entry[2], expected):
                try:
                    source.mark_processed(name)
                except Exception as exc:  # tried again next tick, from this record on
                    return after, f"cannot {action} for {name}: {redact(str(exc))}"
                context.log.info(f"{name}: import submitted, {action}")
        after = record.storage_id
    return after, None


def build_report_schedule(
    keys: FeedKeys, ingest_job: UnresolvedAssetJobDefinition, config: HttpReportSource
) -> dg.ScheduleDefinition:
    """Pull the report on the source's cron; new content = new partition + run, else nothing."""

    @dg.schedule(
        name=report_schedule_name(keys.feed.name),
        cron_schedule=config.schedule,
        execution_timezone=config.timezone,
        job=ingest_job,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        required_resource_keys={keys.source_resource, STORAGE_KEY},
        description="Pulls the HR report; a report whose content is new becomes a partition and a run.",
    )
    def report_pull(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        source = getattr(context.resources, keys.source_resource)
        storage = getattr(context.resources, STORAGE_KEY)
        existing = set(context.instance.get_dynamic_partitions(keys.partitions.name))
        try:
            key = pull_report(
                source, storage, keys.feed.name, config.file_name, existing, instance=context.instance
            )
        except Exception as exc:  # the next tick tries again
            message = f"{source.describe()} is unavailable: {redact(str(exc))}"
            context.log.warning(message)
            return dg.SkipReason(message)
        if key in existing:
            return dg.SkipReason(f"the report is unchanged ({key}); nothing to import")
        context.instance.add_dynamic_partitions(keys.partitions.name, [key])
        context.log.info(f"the report has new content: partition {key}")
        return dg.RunRequest(partition_key=key, run_key=key)

    return report_pull


def pull_report(
    source: HRSource,
    storage,
    feed: str,
    file_name: str,
    existing: set[str],
    *,
    instance: dg.DagsterInstance,
) -> str:
    """Stream the report into staging, where ``hr_file`` finds it; return its partition key
    (the file name for the first report, then with a hash: ``partition_keys``)."""
    with tempfile.TemporaryDirectory(prefix="audience-pull-") as pull_dir:  # run-local, then stored
        staged = stage(source, file_name, Path(pull_dir))
        key = partition_keys(instance, feed, {file_name: staged.sha256}, existing)[file_name]
        if key not in existing:
            put_file(Path(staged.path), storage.staging_dir(feed, key) / file_name)
        return key

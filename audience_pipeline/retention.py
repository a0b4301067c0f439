"""Retention: old partitions' files leave the pipeline's storage; their history stays in Dagster.

A daily feed makes a staged copy, parquet asset values, a sync plan and report CSVs every day,
forever. The ``audience_pipeline__retention`` job (on the ``retention.schedule`` of the feeds
file) removes, per feed, the files of partitions that ended (``reported``, ``blocked``,
``refused``) more than ``keep_days`` ago and are not among the feed's newest ``keep_last``:

- ``staging/<feed>/<partition>/`` (the staged HR file), ``sync/<feed>/<partition>/`` (plans),
  ``reports/<feed>/<partition>/`` (rejects.csv, failures.csv);
- ``assets/<feed>/<asset>/<partition>.parquet|json`` (the IO manager's values).

What it keeps: the partition itself, its runs, materializations, metadata (counts, previews) and
check results, so the UI still tells what happened to the file; and the feed's snapshot, which
belongs to no partition. Partitions still running, importing, retrying or needing a person are
never touched, whatever their age. Each pruned partition gets an ``AssetObservation`` on its
``hr_file`` (``pruned_files``, ``freed_bytes``), so its page says where its files went.

Deleting works alike on a local folder and on S3 (``object_store.remove_tree``); a file already
gone counts as pruned.
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass

import dagster as dg

from audience_pipeline.assets import STORAGE_KEY, FeedKeys
from audience_pipeline.automation.lifecycle import PartitionState, feed_states
from audience_pipeline.feeds.model import RetentionConfig
from audience_pipeline.object_store import StorePath, remove_tree
from audience_pipeline.storage import PipelineStorage, asset_value_path

PRUNABLE_STATES = frozenset({"reported", "blocked", "refused"})
JOB_NAME = "audience_pipeline__retention"
DAY_SECONDS = 86_400.0


@dataclass(frozen=True)
class Pruned:
    feed: str
    partition: str
    state: str
    files: int
    freed_bytes: int


def prunable(
    states: dict[str, PartitionState], order: list[str], settings: RetentionConfig, now: float
) -> list[str]:
    """Partitions of one feed whose files may go, oldest first (``order``: the feed's partitions
    as added, oldest first)."""
    if settings.keep_days is None:
        return []
    newest = set(order[-settings.keep_last :])
    cutoff = now - settings.keep_days * DAY_SECONDS
    return [
        p
        for p in order
        if p not in newest
        and (state := states.get(p)) is not None
        and state.state in PRUNABLE_STATES
        and 0 < state.since < cutoff
    ]


def partition_locations(storage: PipelineStorage, keys: FeedKeys, partition: str) -> list[StorePath]:
    """Every folder and file the pipeline keeps for one partition."""
    feed = keys.feed.name
    folders = [
        storage.staging_dir(feed, partition),
        storage.sync_dir(feed, partition),
        storage.report_dir(feed, partition),
    ]
    values = [
        asset_value_path(storage.root, asset, partition, ext)
        for asset in (
            keys.hr_file,
            keys.validated_rows,
            keys.rejected_rows,
            keys.import_job,
            keys.failure_report,
        )
        for ext in ("parquet", "json")
    ]
    return [*folders, *values]


def prune_feed(
    instance: dg.DagsterInstance,
    keys: FeedKeys,
    storage: PipelineStorage,
    settings: RetentionConfig,
    now: float | None = None,
) -> list[Pruned]:
    """Remove the files of one feed's prunable partitions; return what went."""
    now = time.time() if now is None else now
    order = instance.get_dynamic_partitions(keys.partitions.name)
    states = feed_states(instance, keys, keys.feed.retries, partitions=order, now=now)
    out = []
    for partition in prunable(states, order, settings, now):
        files = freed = 0
        for location in partition_locations(storage, keys, partition):
            n, size = remove_tree(location)
            files, freed = files + n, freed + size
        if files:
            out.append(Pruned(keys.feed.name, partition, states[partition].state, files, freed))
    return out


def _summary(pruned: list[Pruned]) -> str:
    if not pruned:
        return "nothing to prune"
    freed = sum(p.freed_bytes for p in pruned)
    return f"pruned the files of {len(pruned)} partitions ({freed / 1e6:.1f} MB); their history stays"


def build_retention_job(
    all_keys: Iterable[FeedKeys], settings: RetentionConfig
) -> tuple[dg.JobDefinition, dg.ScheduleDefinition]:
    """The job that prunes every feed, and its daily schedule (running unless turned off in the UI)."""
    all_keys = list(all_keys)
    keep = "forever" if settings.keep_days is None else f"{settings.keep_days:g} days"

    @dg.op(
        name="prune_old_partition_files",
        out=dg.Out(dg.Nothing),
        required_resource_keys={STORAGE_KEY},
        description=(
            f"Removes staged files, asset values, sync plans and reports of partitions that ended "
            f"more than {keep} ago, keeping each feed's newest {settings.keep_last} files and "
            "every partition's history in Dagster."
        ),
    )
    def prune(context: dg.OpExecutionContext) -> dg.Output:
        storage: PipelineStorage = getattr(context.resources, STORAGE_KEY)
        everything: list[Pruned] = []
        for keys in all_keys:
            pruned = prune_feed(context.instance, keys, storage, settings)
            for p in pruned:
                context.log_event(
                    dg.AssetObservation(
                        asset_key=keys.hr_file,
                        partition=p.partition,
                        metadata={
                            "pruned_files": p.files,
                            "freed_bytes": p.freed_bytes,
                            "retention": dg.MetadataValue.md(
                                f"Files removed after {keep} ({p.state}); runs, metadata and "
                                "check results are kept."
                            ),
                        },
                    )
                )
            context.log.info(f"{keys.feed.name}: {_summary(pruned)}")
            everything.extend(pruned)
        context.log.info(f"all feeds: {_summary(everything)}")
        return dg.Output(
            None,
            metadata={
                "pruned_partitions": len(everything),
                "freed_bytes": sum(p.freed_bytes for p in everything),
            },
        )

    job = dg.JobDefinition(
        name=JOB_NAME,
        graph_def=dg.GraphDefinition(name=JOB_NAME, node_defs=[prune]),
        description=f"Prune old partitions' files (kept {keep}; the newest {settings.keep_last} per feed).",
        executor_def=dg.in_process_executor,
    )
    schedule = dg.ScheduleDefinition(
        name=f"{JOB_NAME}_daily",
        job=job,
        cron_schedule=settings.schedule,
        execution_timezone="UTC",
        default_status=(
            dg.DefaultScheduleStatus.STOPPED
            if settings.keep_days is None
            else dg.DefaultScheduleStatus.RUNNING
        ),
    )
    return job, schedule

"""Sensors: new HR files become partitions and runs; finished imports request their report.

Both keep a small JSON cursor. The new-file sensor remembers each listed file's size, mtime and
partition key so a file is hashed once, not every tick. The import-status sensor follows
``import_job`` materializations through the event log (cursor = last storage id seen, plus the
in-flight partitions), polls only the cheap status endpoint with a few threads and a per-tick
cap, and requests one ``failure_report`` run per finished import with
``run_key = <job ids>:<final vendor state>`` so Dagster never runs the same report twice.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from audience_pipeline.assets import FeedKeys
from audience_pipeline.destinations.base import JobHandle, JobState, JobStatus
from audience_pipeline.redact import redact
from audience_pipeline.sources.base import fingerprint, partition_key

MAX_POLLS_PER_TICK = 50
POLL_THREADS = 8


def build_new_file_sensor(keys: FeedKeys, ingest_job: UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    @dg.sensor(
        name=f"{keys.feed.name}__new_files",
        job=ingest_job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={keys.source_resource},
        description="Adds a partition for every new or changed file in the source and runs it.",
    )
    def new_files(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        source = getattr(context.resources, keys.source_resource)
        seen: dict[str, list] = json.loads(context.cursor) if context.cursor else {}
        try:
            files = source.list_files()
            current = {}
            for f in files:
                known = seen.get(f.name)
                if known and known[0] == f.size and known[1] == f.modified_ns:
                    current[f.name] = known
                else:
                    current[f.name] = [
                        f.size,
                        f.modified_ns,
                        partition_key(f.name, fingerprint(source, f.name)),
                    ]
        except Exception as exc:  # a source that is down must not break the sensor or its cursor
            return dg.SkipReason(f"{source.describe()} is unavailable: {redact(str(exc))}")
        existing = set(context.instance.get_dynamic_partitions(keys.partitions.name))
        new_keys = sorted({entry[2] for entry in current.values()} - existing)
        return dg.SensorResult(
            run_requests=[dg.RunRequest(partition_key=k, run_key=k) for k in new_keys],
            dynamic_partitions_requests=[keys.partitions.build_add_request(new_keys)] if new_keys else [],
            cursor=json.dumps(current, sort_keys=True),
        )

    return new_files


def build_status_sensor(keys: FeedKeys, report_job: UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    @dg.sensor(
        name=f"{keys.feed.name}__import_status",
        job=report_job,
        minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={keys.destination_resource},
        description="Polls in-flight imports and requests the failure report when one ends.",
    )
    def import_status(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        state = json.loads(context.cursor) if context.cursor else {"after": None, "inflight": {}}
        inflight: dict[str, int] = state["inflight"]
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=keys.import_job, after_storage_id=state["after"]),
            limit=1000,
            ascending=True,
        ).records
        for record in records:
            if record.partition_key:
                inflight[record.partition_key] = record.storage_id
            state["after"] = record.storage_id
        if not inflight:
            return dg.SensorResult(cursor=json.dumps(state), skip_reason="no import in flight")
        due = sorted(inflight.items(), key=lambda kv: kv[1])[:MAX_POLLS_PER_TICK]
        handles = _handles(context.instance, keys, dict(due))
        client = getattr(context.resources, keys.destination_resource).destination(keys.feed.options)
        try:
            with ThreadPoolExecutor(max_workers=POLL_THREADS) as pool:
                results = list(pool.map(lambda h: _poll(client, h), handles.values()))
        finally:
            client.close()
        requests = []
        for (partition, handle), result in zip(handles.items(), results, strict=True):
            if isinstance(result, str):
                context.log.warning(f"{partition}: status poll failed: {result}")
                continue
            if result.state.terminal:
                requests.append(
                    dg.RunRequest(
                        partition_key=partition,
                        run_key=f"{handle.key}:{result.vendor_status}",
                        tags={
                            "audience_pipeline/import": handle.key,
                            "audience_pipeline/vendor_status": result.vendor_status,
                        },
                    )
                )
                inflight.pop(partition, None)
        for partition in set(dict(due)) - set(handles):
            inflight.pop(partition, None)
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(state))

    return import_status


def _handles(instance: dg.DagsterInstance, keys: FeedKeys, due: dict[str, int]) -> dict[str, JobHandle]:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=keys.import_job, storage_ids=list(due.values())), limit=len(due)
    ).records
    out = {}
    for record in records:
        materialization = record.asset_materialization
        if materialization and "job_handle" in materialization.metadata and record.partition_key:
            out[record.partition_key] = JobHandle.model_validate(materialization.metadata["job_handle"].value)
    return out


def _poll(client, handle: JobHandle) -> JobStatus | str:
    if not handle.jobs:
        return JobStatus(state=JobState.SUCCEEDED, vendor_status="nothing_submitted")
    try:
        return client.status(handle)
    except Exception as exc:  # one vendor hiccup must not stop the other polls
        return redact(str(exc))

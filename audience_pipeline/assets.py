"""The feed factory: one Dagster asset group per feed, partitioned by source file.

``hr_file -> validated_rows (+ rejected_rows) -> import_job -> failure_report``. The blocking
rejection-rate check stops a broken export before anything is pushed; the accounting check on
the report proves every source row was imported, rejected or failed.

``import_job`` sends a file at most once, whoever starts the run (sensor, retry, ``sync``, UI):
under a lock per destination it reuses a handle already recorded for the partition, else
records its intent (an ``AssetObservation``) before the non-idempotent submit and the handle
right after it. A retry that finds an intent without a handle does not know whether the vendor
got the file, so it asks the vendor (``Destination.reconcile``) and adopts the import found
there; where the vendor's API cannot tell, it sends again and the report says a duplicate could
not be excluded. Failures that only a new file can fix are ``dg.Failure`` tagged ``refused``,
so the retry sensor leaves them alone.
"""

import time
from collections.abc import Iterator, Mapping

import dagster as dg
import pandas as pd

from audience_pipeline.csv_reader import CsvFileError
from audience_pipeline.destinations.base import (
    JobHandle,
    JobOutcome,
    JobState,
    JobStatus,
    SubmitIntent,
    every_row,
)
from audience_pipeline.destinations.http import VendorHTTPError
from audience_pipeline.feeds.model import Feed, FeedsFile
from audience_pipeline.locks import held
from audience_pipeline.normalize import MappingError
from audience_pipeline.reports import (
    REPORT_COLUMNS,
    RowAccounting,
    build_report,
    count_outcomes,
    markdown_preview,
    validation_findings,
    write_report,
)
from audience_pipeline.sources.base import StagedFile, split_partition_key, stage_or_reuse
from audience_pipeline.tags import (
    ATTEMPT_TAG,
    FINAL_DETAIL_TAG,
    FINAL_JOB_STATE_TAG,
    FINAL_STATE_TAG,
    IMPORT_TAG,
    OUTCOME_METADATA,
    POLL_GAVE_UP,
)
from audience_pipeline.validation import ValidationResult, validate_for_feed

IO_MANAGER_KEY = "audience_io_manager"
STORAGE_KEY = "pipeline_storage"
REJECTION_CHECK = "rejection_rate_within_threshold"
ACCOUNTING_CHECK = "row_accounting_adds_up"
INTENT_KEY = "submit_intent"
SUBMITTED_KEY = "submitted_handle"
REFUSED_KEY = "submit_refused"
NOT_APPLIED_STATUSES = frozenset({400, 401, 403, 404, 405, 409, 413, 415, 422, 429, 503})
"""Answers that say the vendor did not take the request: the intent is closed, not reconciled."""
SUBMIT_LOCK_SECONDS = 3600.0
REFUSED = {OUTCOME_METADATA: "refused"}


class FeedKeys:
    """Names of everything one feed defines, shared by assets, jobs and sensors."""

    def __init__(self, feed: Feed, feeds: FeedsFile) -> None:
        self.feed = feed
        self.source_resource = f"source_{feed.source}"
        self.destination_resource = f"destination_{feed.destination}"
        self.vendor = feeds.destination_for(feed).type
        self.source_type = feeds.source_for(feed).type
        self.partitions = dg.DynamicPartitionsDefinition(name=f"{feed.name}__files")
        self.hr_file = dg.AssetKey([feed.name, "hr_file"])
        self.validated_rows = dg.AssetKey([feed.name, "validated_rows"])
        self.rejected_rows = dg.AssetKey([feed.name, "rejected_rows"])
        self.import_job = dg.AssetKey([feed.name, "import_job"])
        self.failure_report = dg.AssetKey([feed.name, "failure_report"])
        self.ingest_job = f"{feed.name}__ingest"
        self.report_job = f"{feed.name}__report"


class ImportJobConfig(dg.Config):
    force: bool = False
    """Send the file again even though this partition was already imported."""


def metadata_of(record: dg.EventLogRecord | None) -> dict:
    """A materialization record's metadata as plain values ({} for none)."""
    materialization = record.asset_materialization if record is not None else None
    if materialization is None:
        return {}
    return {k: v.value for k, v in materialization.metadata.items()}


def handle_of(record: dg.EventLogRecord | None) -> JobHandle | None:
    """The job handle an ``import_job`` materialization recorded, if it has one."""
    value = metadata_of(record).get("job_handle")
    return JobHandle.model_validate(value) if isinstance(value, dict) else None


def latest_metadata(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str) -> dict | None:
    """Metadata of the newest materialization of one asset partition, as plain values."""
    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    )
    return metadata_of(result.records[0]) if result.records else None


def _column_schema(frame: pd.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(str(c), str(t)) for c, t in frame.dtypes.items()])


def _validation_metadata(result: ValidationResult, staged: StagedFile) -> dict:
    return {
        "dagster/row_count": len(result.valid),
        "dagster/column_schema": _column_schema(result.valid),
        "source_rows": result.source_rows,
        "rejected_rows": len(result.rejects),
        "warnings": len(result.warnings),  # rows imported with invalid optional values cleared
        "rejection_rate": round(result.rejection_rate, 6),
        "encoding": result.encoding,
        "delimiter": repr(result.delimiter),
        "source_file": staged.name,
        "header_line": result.header_line,  # > 1: blank or title lines above the header were skipped
        # mapped header -> the file's spelling, where only case or spacing matched
        "header_matches": dg.MetadataValue.json(result.header_matches),
    }


def build_feed_assets(feed: Feed, feeds: FeedsFile) -> list[dg.AssetsDefinition]:
    keys = FeedKeys(feed, feeds)
    common = {"partitions_def": keys.partitions, "group_name": feed.name}

    @dg.asset(
        key=keys.hr_file,
        kinds={"csv", keys.source_type},
        io_manager_key=IO_MANAGER_KEY,
        required_resource_keys={keys.source_resource, STORAGE_KEY},
        description=f"The HR export for feed {feed.name}, copied into staging with its sha256.",
        **common,
    )
    def hr_file(context: dg.AssetExecutionContext) -> StagedFile:
        name, short_hash = split_partition_key(context.partition_key)
        source = getattr(context.resources, keys.source_resource)
        storage = getattr(context.resources, STORAGE_KEY)
        staged = stage_or_reuse(source, name, storage.staging_dir(feed.name, context.partition_key))
        if not staged.sha256.startswith(short_hash):
            raise dg.Failure(
                description=(
                    f"{name} changed since it was discovered (sha256 {staged.sha256[:10]}…, partition "
                    f"expects {short_hash}…); the new content arrives as a new partition."
                ),
                allow_retries=False,
                metadata=REFUSED,
            )
        context.add_output_metadata(
            {"sha256": staged.sha256, "size_bytes": staged.size, "source": source.describe()}
        )
        return staged

    @dg.multi_asset(
        outs={
            "validated_rows": dg.AssetOut(
                key=keys.validated_rows,
                io_manager_key=IO_MANAGER_KEY,
                kinds={"pandas", "parquet"},
                description="Normalised rows that passed the employee schema, with their source_line.",
            ),
            "rejected_rows": dg.AssetOut(
                key=keys.rejected_rows,
                io_manager_key=IO_MANAGER_KEY,
                kinds={"pandas", "parquet"},
                description=(
                    "Rows refused by validation (outcome rejected) and values cleared from rows that "
                    "were kept (outcome warning): line, identifier, column, value and reason."
                ),
            ),
        },
        ins={"hr_file": dg.AssetIn(key=keys.hr_file)},
        check_specs=[
            dg.AssetCheckSpec(
                REJECTION_CHECK,
                asset=keys.validated_rows,
                blocking=True,
                description=f"At most {feed.max_rejection_rate:.1%} of the file's rows may be rejected.",
            )
        ],
        name=f"{feed.name}__validate",
        required_resource_keys={STORAGE_KEY},
        **common,
    )
    def validate(context: dg.AssetExecutionContext, hr_file: StagedFile) -> Iterator:
        try:
            result = validate_for_feed(hr_file.path, feed)
        except (CsvFileError, MappingError) as exc:
            raise dg.Failure(description=str(exc), allow_retries=False, metadata=REFUSED) from None
        rate = result.rejection_rate
        findings = validation_findings(result.rejects, result.warnings)  # carried to failure_report
        as_report = findings.assign(stage="validation")[REPORT_COLUMNS]
        storage = getattr(context.resources, STORAGE_KEY)
        rejects_csv = write_report(
            as_report, storage.report_dir(feed.name, context.partition_key) / "rejects.csv"
        )
        yield dg.Output(result.valid, "validated_rows", metadata=_validation_metadata(result, hr_file))
        yield dg.Output(
            findings,
            "rejected_rows",
            metadata={
                "dagster/row_count": len(findings),
                "warnings": len(result.warnings),
                "rejects_csv": dg.MetadataValue.path(str(rejects_csv)),
                "preview": dg.MetadataValue.md(markdown_preview(as_report)),
            },
        )
        yield dg.AssetCheckResult(
            asset_key=keys.validated_rows,
            check_name=REJECTION_CHECK,
            passed=rate <= feed.max_rejection_rate,
            severity=dg.AssetCheckSeverity.ERROR,
            description=(
                f"{len(result.rejects)} of {result.source_rows} rows rejected ({rate:.2%}); "
                f"threshold {feed.max_rejection_rate:.2%}"
            ),
            metadata={
                "rejected": len(result.rejects),
                "source_rows": result.source_rows,
                "rejection_rate": round(rate, 6),
                "threshold": feed.max_rejection_rate,
            },
        )

    @dg.asset(
        key=keys.import_job,
        ins={"validated_rows": dg.AssetIn(key=keys.validated_rows)},
        kinds={keys.vendor},
        io_manager_key=IO_MANAGER_KEY,
        required_resource_keys={keys.destination_resource, STORAGE_KEY},
        pool=f"{keys.vendor}_api",
        description="The vendor import started for this file; polled by the import-status sensor.",
        **common,
    )
    def import_job(
        context: dg.AssetExecutionContext, config: ImportJobConfig, validated_rows: pd.DataFrame
    ) -> JobHandle:
        storage = getattr(context.resources, STORAGE_KEY)
        with held(storage.lock_dir(), f"submit-{feed.destination}", timeout=SUBMIT_LOCK_SECONDS):
            handle, reused = _submit_once(context, keys, feed, config, validated_rows)
        context.add_output_metadata(_handle_metadata(handle, reused=reused))
        return handle

    @dg.asset(
        key=keys.failure_report,
        ins={
            "import_job": dg.AssetIn(key=keys.import_job),
            "rejected_rows": dg.AssetIn(key=keys.rejected_rows),
            "validated_rows": dg.AssetIn(
                key=keys.validated_rows, metadata={"columns": ["source_line", "unique_id"]}
            ),
        },
        kinds={"csv", keys.vendor},
        required_resource_keys={keys.destination_resource, STORAGE_KEY},
        check_specs=[
            dg.AssetCheckSpec(
                ACCOUNTING_CHECK,
                asset=keys.failure_report,
                description="source rows = imported + rejected + failed (+ ignored), and the vendor agrees.",
            )
        ],
        pool=f"{keys.vendor}_api",
        description="Every rejected or failed row with its source line, identifier and reason.",
        **common,
    )
    def failure_report(
        context: dg.AssetExecutionContext,
        import_job: JobHandle,
        rejected_rows: pd.DataFrame,
        validated_rows: pd.DataFrame,
    ) -> dg.MaterializeResult:
        outcome, vendor_status = _report_outcome(context, keys, feed, import_job)
        report = build_report(rejected_rows, outcome, validated_rows)
        storage = getattr(context.resources, STORAGE_KEY)
        path = write_report(report, storage.report_dir(feed.name, context.partition_key) / "failures.csv")
        validation = latest_metadata(context.instance, keys.validated_rows, context.partition_key) or {}
        rejected, warnings = count_outcomes(rejected_rows)
        accounting = RowAccounting(
            source_rows=int(validation.get("source_rows", len(validated_rows) + rejected)),
            rejected=rejected,
            warnings=warnings,
            submitted=import_job.submitted_rows,
            imported=outcome.imported,
            failed=outcome.failed,
            ignored=outcome.ignored,
        )
        vendor_imported = outcome.vendor_counts.get("processed")
        vendor_agrees = vendor_imported is None or vendor_imported == outcome.imported
        return dg.MaterializeResult(
            metadata={
                **accounting.as_metadata(),
                "dagster/row_count": len(report),
                "vendor_status": vendor_status,
                "outcome": _normalised_outcome(vendor_status, accounting),
                "import_key": import_job.key,
                "vendor_counts": dg.MetadataValue.json(outcome.vendor_counts),
                "jobs": ", ".join(j.job_id for j in import_job.jobs) or "none",
                "report_path": dg.MetadataValue.path(str(path)),
                "preview": dg.MetadataValue.md(markdown_preview(report)),
                **(
                    {"notes": dg.MetadataValue.md("\n".join(f"- {n}" for n in outcome.notes))}
                    if outcome.notes
                    else {}
                ),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=ACCOUNTING_CHECK,
                    passed=accounting.balanced and vendor_agrees,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={
                        **accounting.as_metadata(),
                        "submitted": accounting.submitted,
                        "vendor_imported": -1 if vendor_imported is None else vendor_imported,
                    },
                )
            ],
        )

    return [hr_file, validate, import_job, failure_report]


def _handle_metadata(handle: JobHandle, *, reused: bool) -> dict:
    return {
        "job_handle": dg.MetadataValue.json(handle.model_dump(mode="json")),
        "jobs": ", ".join(j.job_id for j in handle.jobs) or "none",
        "submitted_rows": handle.submitted_rows,
        "reused_previous_import": reused,
    }


def _observations(instance: dg.DagsterInstance, keys: FeedKeys, partition: str) -> list[dg.EventLogRecord]:
    """The partition's submit records (intents, handles) and latest materialization, newest first."""
    flt = dg.AssetRecordsFilter(asset_key=keys.import_job, asset_partitions=[partition])
    records = list(instance.fetch_observations(flt, limit=20).records)
    records += instance.fetch_materializations(flt, limit=1).records
    return sorted(records, key=lambda r: r.storage_id, reverse=True)


def _record_value(record: dg.EventLogRecord) -> tuple[str, dict] | None:
    """``(kind, value)`` of a submit record: an intent, or a handle (observed or materialized)."""
    event = record.asset_observation or record.asset_materialization
    metadata = event.metadata if event is not None else {}
    for kind in (INTENT_KEY, SUBMITTED_KEY, REFUSED_KEY, "job_handle"):
        if kind in metadata and isinstance(metadata[kind].value, dict):
            return kind, metadata[kind].value
    return None


def _known_job_ids(instance: dg.DagsterInstance, keys: FeedKeys) -> frozenset[str]:
    """Vendor jobs this feed already recorded: never the import a lost submit created."""
    ids: set[str] = set()
    for fetch in (instance.fetch_materializations, instance.fetch_observations):
        for record in fetch(dg.AssetRecordsFilter(asset_key=keys.import_job), limit=200).records:
            value = _record_value(record)
            if value and value[0] in (SUBMITTED_KEY, "job_handle"):
                ids.update(job["job_id"] for job in value[1].get("jobs", []))
    return frozenset(ids)


def _previous_handle(instance: dg.DagsterInstance, keys: FeedKeys) -> JobHandle | None:
    """The newest import this feed recorded with a job, from any partition: the pipeline's own
    state between pushes (Experience Platform finds its audience id there; others ignore it)."""
    flt = dg.AssetRecordsFilter(asset_key=keys.import_job)
    records = [
        *instance.fetch_materializations(flt, limit=50).records,
        *instance.fetch_observations(flt, limit=50).records,
    ]
    for record in sorted(records, key=lambda r: r.storage_id, reverse=True):
        value = _record_value(record)
        if value and value[0] in (SUBMITTED_KEY, "job_handle") and value[1].get("jobs"):
            handle = JobHandle.model_validate(value[1])
            if handle.vendor == keys.vendor:
                return handle
    return None


def _submit_once(
    context: dg.AssetExecutionContext,
    keys: FeedKeys,
    feed: Feed,
    config: "ImportJobConfig",
    rows: pd.DataFrame,
) -> tuple[JobHandle, bool]:
    """The partition's import: recorded, adopted from a lost submit, or sent now (under the lock)."""
    partition = context.partition_key
    latest = next(
        (v for r in _observations(context.instance, keys, partition) if (v := _record_value(r))), None
    )
    if latest is not None and latest[0] in (SUBMITTED_KEY, "job_handle") and not config.force:
        handle = JobHandle.model_validate(latest[1])
        context.log.info(
            f"{partition} was already submitted as {handle.key}; not importing the same "
            "content twice (run with config force: true to send it again)"
        )
        return handle, True
    if rows.empty:
        context.log.warning("no valid rows: nothing was sent to the destination")
        handle = JobHandle(vendor=keys.vendor, feed=feed.name, partition=partition, jobs=[], submitted_rows=0)
        return handle, False
    client = getattr(context.resources, keys.destination_resource).destination(feed.options)
    try:
        notes: list[str] = []
        known = _known_job_ids(context.instance, keys)
        previous = _previous_handle(context.instance, keys)
        if latest is not None and latest[0] == INTENT_KEY:
            lost = SubmitIntent(
                **{**latest[1], "known_job_ids": frozenset(latest[1].get("known_job_ids", [])) | known}
            )
            found = client.reconcile(lost, rows, previous=previous)
            context.log.warning(
                f"{partition}: attempt {lost.attempt} sent the file without recording an answer; "
                f"asked the vendor: {found.detail}"
            )
            if found.handle is not None:
                _observe(context, keys, SUBMITTED_KEY, found.handle.model_dump(mode="json"))
                return found.handle.model_copy(
                    update={"extra": {**found.handle.extra, "adopted": True}}
                ), False
            if not found.certain:
                notes.append(
                    f"an earlier attempt may also have delivered this file (its answer was lost and "
                    f"{found.detail}); a duplicate import could not be excluded"
                )
        intent = SubmitIntent(
            feed=feed.name,
            partition=partition,
            sha256=split_partition_key(partition)[1],
            attempt=int(context.run.tags.get(ATTEMPT_TAG, "1") or 1),
            recorded_at=time.time(),
            rows=len(rows),
            known_job_ids=known,
        )
        _observe(context, keys, INTENT_KEY, {**intent.__dict__, "known_job_ids": sorted(known)})
        try:
            handle = client.submit(rows, feed=feed.name, partition=partition, previous=previous)
        except VendorHTTPError as exc:
            if exc.status in NOT_APPLIED_STATUSES:  # a clear no: nothing to reconcile next time
                _observe(context, keys, REFUSED_KEY, {"status": exc.status, "attempt": intent.attempt})
            raise
        if notes:
            handle = handle.model_copy(update={"extra": {**handle.extra, "notes": notes}})
        _observe(context, keys, SUBMITTED_KEY, handle.model_dump(mode="json"))
        return handle, False
    finally:
        client.close()


def _observe(context: dg.AssetExecutionContext, keys: FeedKeys, kind: str, value: dict) -> None:
    """Write a submit record to the instance now (it is stored before this returns)."""
    context.log_event(
        dg.AssetObservation(
            asset_key=keys.import_job,
            partition=context.partition_key,
            metadata={kind: dg.MetadataValue.json(value)},
        )
    )


def _report_outcome(
    context: dg.AssetExecutionContext, keys: FeedKeys, feed: Feed, handle: JobHandle
) -> tuple[JobOutcome, str]:
    """The vendor's final result, or every row failed when the pipeline stopped waiting for it."""
    tags = context.run.tags
    expected = tags.get(IMPORT_TAG)
    if expected and expected != handle.key:
        raise dg.Failure(
            description=(
                f"this report run is for import {expected}, but the partition's latest import is "
                f"{handle.key}; the newer import gets its own report"
            ),
            allow_retries=False,
        )
    final = tags.get(FINAL_STATE_TAG)
    notes = list(handle.extra.get("notes", []))
    if final in POLL_GAVE_UP:
        detail = tags.get(FINAL_DETAIL_TAG) or final
        reason = f"import {final.replace('_', ' ')}: {detail}; the vendor's result is unknown"
        failures = [f for job in handle.jobs for f in every_row(job, reason)]
        return JobOutcome(submitted=handle.submitted_rows, failures=failures, notes=[*notes, detail]), final
    outcome, vendor_status = _final_outcome(
        getattr(context.resources, keys.destination_resource), feed, handle, _status_from_tags(tags)
    )
    outcome.notes[:0] = notes
    return outcome, vendor_status


def _status_from_tags(tags: Mapping[str, str]) -> JobStatus | None:
    """The terminal status the sensor's last poll saw, when this run was requested by it."""
    state, word = tags.get(FINAL_JOB_STATE_TAG), tags.get(FINAL_STATE_TAG)
    if not state or not word:
        return None
    try:
        return JobStatus(state=JobState(state), vendor_status=word, detail=tags.get(FINAL_DETAIL_TAG, ""))
    except ValueError:  # a tag written by hand or by another release
        return None


def _normalised_outcome(vendor_status: str, accounting: RowAccounting) -> str:
    """One word for every vendor: completed, completed_with_failures, failed, timed_out, poll_failed."""
    if vendor_status in POLL_GAVE_UP:
        return vendor_status
    if accounting.failed == 0:
        return "completed"
    return "completed_with_failures" if accounting.imported > 0 else "failed"


def _final_outcome(
    resource, feed: Feed, handle: JobHandle, known: JobStatus | None = None
) -> tuple[JobOutcome, str]:
    """The vendor's per-row result; a finished job is not polled again when ``known`` says how it ended."""
    if not handle.jobs:
        return JobOutcome(submitted=0), "nothing_submitted"
    client = resource.destination(feed.options)
    try:
        status = known if known is not None and known.state.terminal else client.status(handle)
        if not status.state.terminal:
            raise dg.Failure(
                description=(
                    f"import {handle.key} is still {status.vendor_status}; the import-status sensor "
                    "requests this report when it ends"
                )
            )
        return client.outcome(handle, status=status), status.vendor_status
    finally:
        client.close()

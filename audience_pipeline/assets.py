"""The feed factory: one Dagster asset group per feed, partitioned by source file.

``hr_file -> validated_rows (+ rejected_rows) -> import_job -> failure_report``. Two blocking
checks stop a file before anything is pushed: too many rejected rows, or too many of the
snapshot's employees missing (a truncated export, ``guard.py``). ``import_job`` sends the rows
that changed since the feed's snapshot, or every row (``sync_plan.py``); the failure report maps
the vendor's results back to source lines, lists the leavers a per-member vendor keeps, replaces
the snapshot, and its accounting check proves every source row was imported, rejected, failed or
unchanged.

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
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa

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
from audience_pipeline.feeds.model import FILE_REPLACING, Feed, FeedsFile
from audience_pipeline.guard import removed_rate
from audience_pipeline.locks import held
from audience_pipeline.normalize import MappingError
from audience_pipeline.reports import (
    REJECTED,
    REPORT_COLUMNS,
    RowAccounting,
    build_report,
    count_outcomes,
    leaver_rows,
    markdown_preview,
    validation_findings,
    write_report,
)
from audience_pipeline.snapshot import ID, SnapshotInfo, next_snapshot, read_snapshot, write_snapshot
from audience_pipeline.sources.base import StagedFile, split_partition_key, stage_or_reuse
from audience_pipeline.sync_plan import LEAVER_REASONS, PreparedSync, StoredPlan, prepare_sync, read_plan
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
REMOVED_CHECK = "removed_rate_within_threshold"
ACCOUNTING_CHECK = "row_accounting_adds_up"
INTENT_KEY = "submit_intent"
SUBMITTED_KEY = "submitted_handle"
REFUSED_KEY = "submit_refused"
NOT_APPLIED_STATUSES = frozenset({400, 401, 403, 404, 405, 409, 413, 415, 422, 429, 503})
"""Answers that say the vendor did not take the request: the intent is closed, not reconciled."""
SUBMIT_LOCK_SECONDS = 3600.0
SNAPSHOT_LOCK_SECONDS = 600.0
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


class ValidateConfig(dg.Config):
    accept_removals: bool = False
    """Let the file through although more than ``max_removed_rate`` of the snapshot's employees
    are missing from it (they really left): the removed-rate check then passes."""


class ImportJobConfig(dg.Config):
    force: bool = False
    """Send the file again even though this partition was already imported, and send every row
    (not only the rows that changed since the snapshot)."""
    dry_run: bool = False
    """Diff the file against the snapshot and say what would be sent; send nothing, record no
    import (an observation of ``import_job`` holds the counts)."""


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
    destination = feeds.destination_for(feed)
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
            ),
            dg.AssetCheckSpec(
                REMOVED_CHECK,
                asset=keys.validated_rows,
                blocking=True,
                description=(
                    f"At most {feed.max_removed_rate:.1%} of the snapshot's employees may be missing "
                    "from the file (a truncated export); run config accept_removals: true lets it through."
                ),
            ),
        ],
        name=f"{feed.name}__validate",
        required_resource_keys={STORAGE_KEY},
        **common,
    )
    def validate(context: dg.AssetExecutionContext, config: ValidateConfig, hr_file: StagedFile) -> Iterator:
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
        yield removed_rate_check(
            keys, feed, storage.snapshot_path(feed.name), result, accept=config.accept_removals
        )

    @dg.asset(
        key=keys.import_job,
        ins={
            "validated_rows": dg.AssetIn(key=keys.validated_rows),
            "rejected_rows": dg.AssetIn(
                key=keys.rejected_rows, metadata={"columns": ["unique_id", "outcome"]}
            ),
        },
        kinds={keys.vendor},
        io_manager_key=IO_MANAGER_KEY,
        required_resource_keys={keys.destination_resource, STORAGE_KEY},
        pool=f"{keys.vendor}_api",
        output_required=False,  # a dry run records no import
        description=(
            "The vendor import started for this file (its changed rows, or every row under "
            "sync_mode full); polled by the import-status sensor."
        ),
        **common,
    )
    def import_job(
        context: dg.AssetExecutionContext,
        config: ImportJobConfig,
        validated_rows: pd.DataFrame,
        rejected_rows: pd.DataFrame,
    ) -> Iterator[dg.Output[JobHandle]]:
        storage = getattr(context.resources, STORAGE_KEY)

        def prepare() -> PreparedSync:
            snapshot_path = storage.snapshot_path(feed.name)
            rejected = _rejected_ids(rejected_rows)
            return prepare_sync(
                feed, destination, validated_rows, rejected, snapshot_path, force=config.force
            )

        if config.dry_run:
            _dry_run(context, keys, prepare())
            return
        sync_dir = storage.sync_dir(feed.name, context.partition_key)
        with held(storage.lock_dir(), f"submit-{feed.destination}", timeout=SUBMIT_LOCK_SECONDS):
            handle, reused = _submit_once(context, keys, feed, config, validated_rows, prepare, sync_dir)
        yield dg.Output(
            handle, metadata={**_handle_metadata(handle, reused=reused), **_sync_metadata(handle)}
        )

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
                description=(
                    "source rows = rejected + unchanged + submitted, submitted = imported + failed "
                    "(+ ignored), and the vendor agrees."
                ),
            )
        ],
        pool=f"{keys.vendor}_api",
        description=(
            "Every rejected or failed row with its source line, identifier and reason, and the "
            "leavers a per-member vendor keeps; writes the feed's changed-rows snapshot."
        ),
        **common,
    )
    def failure_report(
        context: dg.AssetExecutionContext,
        import_job: JobHandle,
        rejected_rows: pd.DataFrame,
        validated_rows: pd.DataFrame,
    ) -> dg.MaterializeResult:
        outcome, vendor_status = _report_outcome(context, keys, feed, import_job)
        storage = getattr(context.resources, STORAGE_KEY)
        plan = _stored_plan(
            storage.sync_dir(feed.name, context.partition_key), import_job, len(validated_rows)
        )
        sent = (
            validated_rows
            if plan is None
            else validated_rows.iloc[plan.sent_positions].reset_index(drop=True)
        )
        leavers = None
        if plan is not None and keys.vendor not in FILE_REPLACING and len(plan.removed_ids):
            leavers = leaver_rows(plan.removed_ids.to_pylist(), LEAVER_REASONS[keys.vendor])
        report = build_report(rejected_rows, outcome, sent, leavers)
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
            unchanged=len(validated_rows) - len(sent),
        )
        snapshot_note = "no plan recorded (an import from before changed-rows sync): snapshot not written"
        if plan is not None:
            snapshot_note = _update_snapshot(
                storage.snapshot_path(feed.name),
                storage.lock_dir(),
                feed,
                import_job,
                plan,
                outcome,
                rejected_rows,
            )
            context.log.info(snapshot_note)
        vendor_imported = outcome.vendor_counts.get("processed")
        vendor_agrees = vendor_imported is None or vendor_imported == outcome.imported
        return dg.MaterializeResult(
            metadata={
                **accounting.as_metadata(),
                **_sync_metadata(import_job),
                "snapshot": snapshot_note,
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


def removed_rate_check(
    keys: FeedKeys, feed: Feed, snapshot_path: Path, result: ValidationResult, *, accept: bool
) -> dg.AssetCheckResult:
    """The truncated-export guard (``guard.py``) as the blocking check on ``validated_rows``."""
    found = removed_rate(
        feed.name,
        feed.max_removed_rate,
        snapshot_path,
        pa.array(result.valid["unique_id"], pa.large_string()),
        pa.array(result.rejects["unique_id"], pa.large_string()),
        accept=accept,
    )
    return dg.AssetCheckResult(
        asset_key=keys.validated_rows,
        check_name=REMOVED_CHECK,
        passed=not found.blocked,
        severity=dg.AssetCheckSeverity.ERROR,
        description=found.message(),
        metadata={
            "removed": found.removed,
            "snapshot_rows": found.snapshot_rows or 0,
            "removed_rate": round(found.rate, 6),
            "threshold": feed.max_removed_rate,
            "accepted": accept,
        },
    )


def _rejected_ids(findings: pd.DataFrame) -> pa.Array:
    """Ids of rows validation rejected (warnings are imported rows, not rejects)."""
    if "outcome" in findings.columns:
        findings = findings[findings["outcome"] == REJECTED]
    return pa.array(findings["unique_id"], pa.large_string())


def _sync_metadata(handle: JobHandle) -> dict:
    """Added / changed / unchanged / removed / sent and the changed-rows preview, from the handle."""
    sync = handle.extra.get("sync")
    if not isinstance(sync, dict):
        return {}
    counts = {k: int(sync.get(k, 0)) for k in ("added", "changed", "unchanged", "removed", "sent")}
    return {
        **{k if k != "unchanged" else "unchanged_since_snapshot": v for k, v in counts.items()},
        "sync_mode": str(sync.get("mode", "")),
        "sync_reason": str(sync.get("reason", "")),
        "changed_preview": dg.MetadataValue.md(str(sync.get("changed_preview", ""))),
    }


def _dry_run(context: dg.AssetExecutionContext, keys: FeedKeys, prepared: PreparedSync) -> None:
    """Say what would be sent, as a log line and an observation; record no import."""
    plan = prepared.plan
    context.log.info(f"dry run: {plan.summary()}; nothing was sent")
    context.log_event(
        dg.AssetObservation(
            asset_key=keys.import_job,
            partition=context.partition_key,
            metadata={
                "dry_run": True,
                **plan.counts(),
                "sync_mode": plan.mode,
                "sync_reason": plan.reason,
                "changed_preview": dg.MetadataValue.md(prepared.preview()),
            },
        )
    )


def _stored_plan(sync_dir: Path, handle: JobHandle, rows: int) -> StoredPlan | None:
    """The plan ``import_job`` wrote for this import (the handle names its file in the
    partition's sync folder); ``None`` for an import without one."""
    sync = handle.extra.get("sync")
    if not isinstance(sync, dict) or not sync.get("plan"):
        return None
    path = sync_dir / Path(str(sync["plan"])).name
    if not path.is_file():
        raise dg.Failure(
            description=(
                f"the sync plan of import {handle.key} is missing ({path}); without it the failure "
                "report cannot tell which rows were sent. Re-run import_job with config force: true"
            ),
            allow_retries=False,
        )
    plan = read_plan(path)
    if plan.table.num_rows != rows:
        raise dg.Failure(description=f"the sync plan {path} has {plan.table.num_rows} rows, the file {rows}")
    return plan


def _update_snapshot(
    path: Path,
    lock_dir: Path,
    feed: Feed,
    handle: JobHandle,
    plan: StoredPlan,
    outcome: JobOutcome,
    findings: pd.DataFrame,
) -> str:
    """Replace the feed's snapshot with what the destination holds after this import, unless a
    newer import already replaced it; returns what was done, for the report's metadata."""
    sent = plan.sent_positions
    failed = sent[[f.row for f in outcome.failures if f.outcome == "failed"]]
    holds = np.ones(plan.table.num_rows, dtype=bool)
    holds[failed] = False
    ids = plan.table.column(ID).combine_chunks()
    carry = pa.concat_arrays([ids.take(pa.array(failed, pa.int64())), _rejected_ids(findings)])
    with held(lock_dir, f"snapshot-{feed.name}", timeout=SNAPSHOT_LOCK_SECONDS):
        current = read_snapshot(path)
        if current is not None and current.info.submitted_at > handle.submitted_at:
            return f"snapshot kept: it reflects a newer import ({current.info.partition})"
        table = next_snapshot(current.table if current else None, plan.snapshot_rows(), holds, carry)
        info = SnapshotInfo(
            plan.fingerprint, handle.partition, handle.key, handle.submitted_at, table.num_rows
        )
        write_snapshot(path, table, info)
    return f"snapshot replaced: {table.num_rows} employees ({len(failed)} failed row(s) will be sent again)"


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
    valid: pd.DataFrame,
    prepare: Callable[[], PreparedSync],
    sync_dir: Path,
) -> tuple[JobHandle, bool]:
    """The partition's import: recorded, adopted from a lost submit, or sent now (under the lock).

    Only a new submit plans what to send (``prepare``): the rows that changed since the snapshot,
    or every row; the plan is stored before the submit and named in the handle (``extra.sync``).
    """
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
    prepared = prepare()
    sync = prepared.record(sync_dir, valid)
    context.log.info(prepared.plan.summary())
    positions = prepared.plan.positions
    rows = valid if len(positions) == len(valid) else valid.iloc[positions].reset_index(drop=True)
    if rows.empty:
        if valid.empty:
            context.log.warning("no valid rows: nothing was sent to the destination")
        else:
            context.log.info(
                f"nothing changed since the snapshot ({prepared.plan.snapshot_partition}): all "
                f"{len(valid)} valid rows are unchanged, nothing was sent to the destination"
            )
        handle = JobHandle(
            vendor=keys.vendor,
            feed=feed.name,
            partition=partition,
            jobs=[],
            submitted_rows=0,
            extra={"sync": sync},
        )
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
                adopted = found.handle.model_copy(
                    update={"extra": {**found.handle.extra, "adopted": True, "sync": sync}}
                )
                _observe(context, keys, SUBMITTED_KEY, adopted.model_dump(mode="json"))
                return adopted, False
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
        extra = {**handle.extra, "sync": sync, **({"notes": notes} if notes else {})}
        handle = handle.model_copy(update={"extra": extra})
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
    """One word for every vendor: completed, completed_with_failures, failed, timed_out, poll_failed,
    or unchanged (nothing to send)."""
    if vendor_status in POLL_GAVE_UP:
        return vendor_status
    if accounting.submitted == 0 and accounting.unchanged > 0:
        return "unchanged"  # nothing changed since the snapshot: nothing was sent
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

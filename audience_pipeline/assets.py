"""The feed factory: one Dagster asset group per feed, partitioned by source file.

``hr_file -> validated_rows (+ rejected_rows) -> import_job -> failure_report``. The blocking
rejection-rate check stops a broken export before anything is pushed; the accounting check on
the report proves every source row was imported, rejected or failed.
"""

from collections.abc import Iterator

import dagster as dg
import pandas as pd

from audience_pipeline.csv_reader import CsvFileError
from audience_pipeline.destinations.base import JobHandle, JobOutcome
from audience_pipeline.feeds.model import Feed, FeedsFile
from audience_pipeline.normalize import MappingError
from audience_pipeline.reports import (
    REPORT_COLUMNS,
    RowAccounting,
    build_report,
    markdown_preview,
    write_report,
)
from audience_pipeline.sources.base import StagedFile, split_partition_key, stage_or_reuse
from audience_pipeline.validation import ValidationResult, validate_for_feed

IO_MANAGER_KEY = "audience_io_manager"
STORAGE_KEY = "pipeline_storage"
REJECTION_CHECK = "rejection_rate_within_threshold"
ACCOUNTING_CHECK = "row_accounting_adds_up"


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


def latest_metadata(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str) -> dict | None:
    """Metadata of the newest materialization of one asset partition, as plain values."""
    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    )
    materialization = result.records[0].asset_materialization if result.records else None
    if materialization is None:
        return None
    return {k: v.value for k, v in materialization.metadata.items()}


def _column_schema(frame: pd.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(str(c), str(t)) for c, t in frame.dtypes.items()])


def _validation_metadata(result: ValidationResult, staged: StagedFile) -> dict:
    return {
        "dagster/row_count": len(result.valid),
        "dagster/column_schema": _column_schema(result.valid),
        "source_rows": result.source_rows,
        "rejected_rows": len(result.rejects),
        "rejection_rate": round(result.rejection_rate, 6),
        "encoding": result.encoding,
        "delimiter": repr(result.delimiter),
        "source_file": staged.name,
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
                description="Rows refused by validation: line, identifier, column, value and reason.",
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
            raise dg.Failure(description=str(exc), allow_retries=False) from None
        rate = result.rejection_rate
        as_report = result.rejects.assign(stage="validation", outcome="rejected")[REPORT_COLUMNS]
        storage = getattr(context.resources, STORAGE_KEY)
        rejects_csv = write_report(
            as_report, storage.report_dir(feed.name, context.partition_key) / "rejects.csv"
        )
        yield dg.Output(result.valid, "validated_rows", metadata=_validation_metadata(result, hr_file))
        yield dg.Output(
            result.rejects,
            "rejected_rows",
            metadata={
                "dagster/row_count": len(result.rejects),
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
        required_resource_keys={keys.destination_resource},
        pool=f"{keys.vendor}_api",
        description="The vendor import started for this file; polled by the import-status sensor.",
        **common,
    )
    def import_job(
        context: dg.AssetExecutionContext, config: ImportJobConfig, validated_rows: pd.DataFrame
    ) -> JobHandle:
        previous = latest_metadata(context.instance, keys.import_job, context.partition_key)
        if previous and "job_handle" in previous and not config.force:
            handle = JobHandle.model_validate(previous["job_handle"])
            context.log.info(
                f"{context.partition_key} was already submitted as {handle.key}; not importing the same "
                "content twice (run with config force: true to send it again)"
            )
            context.add_output_metadata(_handle_metadata(handle, reused=True))
            return handle
        if validated_rows.empty:
            handle = JobHandle(
                vendor=keys.vendor, feed=feed.name, partition=context.partition_key, jobs=[], submitted_rows=0
            )
            context.log.warning("no valid rows: nothing was sent to the destination")
        else:
            client = getattr(context.resources, keys.destination_resource).destination(feed.options)
            try:
                handle = client.submit(validated_rows, feed=feed.name, partition=context.partition_key)
            finally:
                client.close()
        context.add_output_metadata(_handle_metadata(handle, reused=False))
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
        outcome, vendor_status = _final_outcome(
            getattr(context.resources, keys.destination_resource), feed, import_job
        )
        report = build_report(rejected_rows, outcome, validated_rows)
        storage = getattr(context.resources, STORAGE_KEY)
        path = write_report(report, storage.report_dir(feed.name, context.partition_key) / "failures.csv")
        validation = latest_metadata(context.instance, keys.validated_rows, context.partition_key) or {}
        accounting = RowAccounting(
            source_rows=int(validation.get("source_rows", len(validated_rows) + len(rejected_rows))),
            rejected=len(rejected_rows),
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


def _final_outcome(resource, feed: Feed, handle: JobHandle) -> tuple[JobOutcome, str]:
    if not handle.jobs:
        return JobOutcome(submitted=0), "nothing_submitted"
    client = resource.destination(feed.options)
    try:
        status = client.status(handle)
        if not status.state.terminal:
            raise dg.Failure(
                description=(
                    f"import {handle.key} is still {status.vendor_status}; the import-status sensor "
                    "requests this report when it ends"
                )
            )
        return client.outcome(handle), status.vendor_status
    finally:
        client.close()

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
import warnings
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
from audience_pipeline.destinations.registry import describe_target
from audience_pipeline.feeds.model import FILE_REPLACING, Feed, FeedsFile
from audience_pipeline.guard import removed_rate
from audience_pipeline.locks import held
from audience_pipeline.normalize import MappingError
from audience_pipeline.object_store import local_copy, metadata_value, storage_path
from audience_pipeline.partition_content import expected_content, record_content
from audience_pipeline.reports import (
    REJECTED,
    REPORT_COLUMNS,
    RowAccounting,
    build_report,
    count_outcomes,
    leaver_rows,
    markdown_cell,
    markdown_preview,
    validation_findings,
    write_report,
)
from audience_pipeline.snapshot import ID, SnapshotInfo, next_snapshot, read_snapshot, write_snapshot
from audience_pipeline.sources.base import StagedFile, same_content, split_partition_key, stage_or_reuse
from audience_pipeline.sources.registry import describe_source, source_url
from audience_pipeline.sync_plan import (
    LEAVER_REASONS,
    VENDOR_NAMES,
    PreparedSync,
    StoredPlan,
    prepare_sync,
    read_plan,
)
from audience_pipeline.tags import (
    ATTEMPT_TAG,
    FINAL_DETAIL_TAG,
    FINAL_JOB_STATE_TAG,
    FINAL_STATE_TAG,
    IMPORT_TAG,
    OUTCOME_METADATA,
    OUTCOME_TAG,
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
MAX_DETAIL_JOBS = 10


class FeedKeys:
    """Names of everything one feed defines, shared by assets, jobs and sensors, and the words
    that say what the feed is (its target, its source) in descriptions, metadata and logs."""

    def __init__(self, feed: Feed, feeds: FeedsFile) -> None:
        self.feed = feed
        self.source_resource = f"source_{feed.source}"
        self.destination_resource = f"destination_{feed.destination}"
        self.vendor = feeds.destination_for(feed).type
        self.source_type = feeds.source_for(feed).type
        self.target = describe_target(feeds.destination_for(feed), feed.options)
        """E.g. ``Communicate XI import "All staff"``: what the feed writes to at its vendor."""
        self.source = describe_source(feeds.source_for(feed))
        """Where the files come from (folder, bucket, host, report address; no credential)."""
        self.source_url = source_url(feeds.source_for(feed))
        self.partitions = dg.DynamicPartitionsDefinition(name=f"{feed.name}__files")
        self.hr_file = dg.AssetKey([feed.name, "hr_file"])
        self.validated_rows = dg.AssetKey([feed.name, "validated_rows"])
        self.rejected_rows = dg.AssetKey([feed.name, "rejected_rows"])
        self.import_job = dg.AssetKey([feed.name, "import_job"])
        self.failure_report = dg.AssetKey([feed.name, "failure_report"])
        self.ingest_job = f"{feed.name}__ingest"
        self.report_job = f"{feed.name}__report"

    def about(self) -> str:
        """Feed, destination, target and source in a few sentences, ending every asset and job
        description: Dagster 1.13 asset groups carry no description of their own (only a name),
        so this is where the feeds file's ``description`` shows in the UI."""
        said = f"{self.feed.description.rstrip('.')}. " if self.feed.description else ""
        return (
            f"Feed {self.feed.name}: {said}From {self.source} (source {self.feed.source}) to "
            f"{self.target} (destination {self.feed.destination})."
        )

    def report_run_config(self, config: "ReportConfig") -> dict:
        """Run config that hands ``config`` to ``failure_report`` (its op is named after its key)."""
        op = self.failure_report.to_python_identifier()
        return {"ops": {op: {"config": config.model_dump()}}}

    def definition_metadata(self) -> dict[str, str]:
        """The same facts as labelled values on every asset's definition."""
        return {
            "feed": self.feed.name,
            **({"feed_description": self.feed.description} if self.feed.description else {}),
            "source": self.source,
            "destination": self.feed.destination,
            "target": self.target,
        }


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


class ReportConfig(dg.Config):
    """How the import ended, as the import-status sensor's last poll saw it, so the report does not
    poll a finished job again. Run config rather than run tags: the vendor's word ("failed" for a
    Communicate XI import that took 192 of 194 rows) would contradict the run's normalised
    ``outcome`` tag. Empty when the report is launched by hand: the vendor is asked then."""

    vendor_status: str = ""
    """The vendor's final word for the import."""
    job_state: str = ""
    """``succeeded`` or ``failed`` (``JobState``)."""
    detail: str = ""


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
    about = keys.about()
    facts = keys.definition_metadata()

    @dg.asset(
        key=keys.hr_file,
        kinds={"csv", keys.source_type},
        io_manager_key=IO_MANAGER_KEY,
        required_resource_keys={keys.source_resource, STORAGE_KEY},
        description=(
            f"The HR export, copied from {keys.source} into staging with its sha256; the partition "
            f"is the file's name (with a short hash when the name came before with other content). {about}"
        ),
        metadata=facts,
        **common,
    )
    def hr_file(context: dg.AssetExecutionContext) -> StagedFile:
        name = split_partition_key(context.partition_key)[0]
        source = getattr(context.resources, keys.source_resource)
        storage = getattr(context.resources, STORAGE_KEY)
        staged = stage_or_reuse(source, name, storage.staging_dir(feed.name, context.partition_key))
        _check_content(context, feed.name, name, staged)
        context.log.info(
            f"staged {name} from {source.describe()}: {_size(staged.size)}, sha256 {staged.sha256[:12]}…"
        )
        context.add_output_metadata(
            {
                "file_name": name,
                "sha256": dg.MetadataValue.text(staged.sha256),
                "size_bytes": staged.size,
                "source": source.describe(),
                **({"source_url": dg.MetadataValue.url(keys.source_url)} if keys.source_url else {}),
                "staged_copy": metadata_value(storage_path(staged.path)),
            }
        )
        return staged

    @dg.multi_asset(
        outs={
            "validated_rows": dg.AssetOut(
                key=keys.validated_rows,
                io_manager_key=IO_MANAGER_KEY,
                kinds={"pandas", "parquet"},
                description=(
                    f"Normalised rows that passed the employee schema, with their source_line. {about}"
                ),
                metadata=facts,
            ),
            "rejected_rows": dg.AssetOut(
                key=keys.rejected_rows,
                io_manager_key=IO_MANAGER_KEY,
                kinds={"pandas", "parquet"},
                description=(
                    "Rows refused by validation (outcome rejected) and values cleared from rows that "
                    "were kept (outcome warning). The preview shows line, identifier, stage/outcome, "
                    "column and reason, not the value (it may be personal data); every column, value "
                    "included, is in rejects.csv (the rejects_csv entry) and in this asset's parquet "
                    f"file. {about}"
                ),
                metadata=facts,
            ),
        },
        ins={"hr_file": dg.AssetIn(key=keys.hr_file)},
        check_specs=[
            _check_spec(
                keys,
                REJECTION_CHECK,
                keys.validated_rows,
                f"At most {feed.max_rejection_rate:.1%} of the file's rows may be rejected.",
                blocking=True,
            ),
            _check_spec(
                keys,
                REMOVED_CHECK,
                keys.validated_rows,
                f"At most {feed.max_removed_rate:.1%} of the snapshot's employees may be missing "
                "from the file (a truncated export); run config accept_removals: true lets it through.",
                blocking=True,
            ),
        ],
        name=f"{feed.name}__validate",
        required_resource_keys={STORAGE_KEY},
        **common,
    )
    def validate(context: dg.AssetExecutionContext, config: ValidateConfig, hr_file: StagedFile) -> Iterator:
        try:
            with local_copy(storage_path(hr_file.path)) as staged_copy:  # run-local when on S3
                result = validate_for_feed(staged_copy, feed)
        except (CsvFileError, MappingError) as exc:
            raise dg.Failure(description=str(exc), allow_retries=False, metadata=REFUSED) from None
        rate = result.rejection_rate
        context.log.info(
            f"validated {hr_file.name}: {result.source_rows} rows, {len(result.valid)} valid, "
            f"{len(result.rejects)} rejected ({rate:.2%}, at most {feed.max_rejection_rate:.2%} allowed), "
            f"{len(result.warnings)} with a value cleared (warnings)"
        )
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
                "rejects_csv": metadata_value(rejects_csv),
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
            f"The import into {keys.target} started for this file (its changed rows, or every row "
            f"under sync_mode full); polled by the import-status sensor. {about}"
        ),
        metadata=facts,
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
        if handle.jobs and not reused:
            context.log.info(
                f"submitted {handle.submitted_rows} rows to {keys.target} as "
                f"{_jobs_phrase(handle)}; the import-status sensor follows it"
            )
        yield dg.Output(
            handle,
            metadata={
                **_handle_metadata(handle, reused=reused, target=keys.target),
                **_sync_metadata(handle),
            },
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
            _check_spec(
                keys,
                ACCOUNTING_CHECK,
                keys.failure_report,
                "source rows = rejected + unchanged + submitted, submitted = imported + failed "
                "(+ ignored), and the vendor's own count of imported rows agrees where it reports one "
                "(Experience Platform reports none).",
            )
        ],
        pool=f"{keys.vendor}_api",
        description=(
            f"How the import into {keys.target} ended: one outcome word for every vendor "
            "(completed, completed_with_failures, failed, timed_out, poll_failed, unchanged) next "
            "to the vendor's own word, the counts, and failures.csv with every rejected or failed "
            "row (source line, identifier, reason) and the leavers a per-member vendor keeps; "
            f"writes the feed's changed-rows snapshot. {about}"
        ),
        metadata=facts,
        **common,
    )
    def failure_report(
        context: dg.AssetExecutionContext,
        config: ReportConfig,
        import_job: JobHandle,
        rejected_rows: pd.DataFrame,
        validated_rows: pd.DataFrame,
    ) -> dg.MaterializeResult:
        outcome, vendor_status = _report_outcome(context, keys, feed, import_job, config)
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
        word = _normalised_outcome(vendor_status, accounting)
        context.log.info(
            f"import finished: {accounting.imported} imported, {accounting.failed} failed, "
            f"{accounting.ignored} ignored of {accounting.submitted} sent to {keys.target} "
            f"({word}; {VENDOR_NAMES.get(keys.vendor, keys.vendor)} said {vendor_status!r})"
        )
        context.log.info(
            f"report {metadata_value(path).value}: {len(report)} row(s), {accounting.rejected} rejected by "
            f"validation, {accounting.failed} failed at the destination, {accounting.warnings} warning(s)"
        )
        context.instance.add_run_tags(context.run.run_id, {OUTCOME_TAG: word})
        return dg.MaterializeResult(
            metadata={
                **accounting.as_metadata(),
                **_sync_metadata(import_job),
                "snapshot": snapshot_note,
                "dagster/row_count": len(report),
                "outcome": word,
                "vendor_status": vendor_status,
                "target": keys.target,
                "import_key": dg.MetadataValue.text(import_job.key),
                "vendor_counts": dg.MetadataValue.json(outcome.vendor_counts),
                "jobs": dg.MetadataValue.text(", ".join(j.job_id for j in import_job.jobs) or "none"),
                "report_path": metadata_value(path),
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
                    description=_accounting_summary(accounting, vendor_imported, keys.vendor),
                    metadata={
                        **accounting.as_metadata(),
                        "submitted": accounting.submitted,
                        **({"vendor_imported": vendor_imported} if vendor_imported is not None else {}),
                        "vendor_count": (
                            "not reported"
                            if vendor_imported is None
                            else ("agrees" if vendor_agrees else "differs")
                        ),
                    },
                )
            ],
        )

    return [hr_file, validate, import_job, failure_report]


def _jobs_phrase(handle: JobHandle) -> str:
    """``job 123`` or ``4 jobs (a, b, …)`` for log lines."""
    ids = [job.job_id for job in handle.jobs]
    if len(ids) == 1:
        return f"job {ids[0]}"
    shown = ", ".join(ids[:3]) + (", …" if len(ids) > 3 else "")
    return f"{len(ids)} jobs ({shown})"


def _accounting_summary(accounting: RowAccounting, vendor_imported: int | None, vendor: str) -> str:
    """The accounting check's one line: both sums, and what the vendor's own count says."""
    a = accounting
    sums = (
        f"{a.source_rows} source rows = {a.rejected} rejected + {a.unchanged} unchanged + "
        f"{a.submitted} submitted; {a.submitted} submitted = {a.imported} imported + {a.failed} "
        f"failed + {a.ignored} ignored"
    )
    if not a.balanced:
        sums = f"does not add up: {sums}"
    name = VENDOR_NAMES.get(vendor, vendor)
    if vendor_imported is None:
        return f"{sums}; {name} reports no count of its own"
    agrees = "agrees" if vendor_imported == a.imported else "disagrees"
    return f"{sums}; {name} counts {vendor_imported} imported ({agrees})"


def _check_spec(
    keys: FeedKeys, name: str, asset: dg.AssetKey, description: str, *, blocking: bool = False
) -> dg.AssetCheckSpec:
    """A check whose results belong to the file's partition.

    Dagster 1.13 supports partitioned asset checks (``AssetCheckSpec(partitions_def=...)``, a
    preview API since 1.12): with the asset's own dynamic partitions each ``AssetCheckResult``
    yielded in a partitioned run is stored with that partition, so the UI shows which file a
    result is about, and a failed blocking check in a multi-asset still stops ``import_job``.
    The preview warning is silenced here, where the choice is made once.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.AssetCheckSpec(
            name, asset=asset, blocking=blocking, description=description, partitions_def=keys.partitions
        )


def _check_content(context: dg.AssetExecutionContext, feed: str, name: str, staged: StagedFile) -> None:
    """Refuse a staged file whose content is not the one its partition was made for.

    A hashed key names its content; a bare one has it recorded (``partition_content.py``). A bare
    key without a record (added by hand in the UI) takes the file as it is now, and records it.
    """
    partition = context.partition_key
    expected = expected_content(context.instance, feed, partition)
    if expected is None:
        record_content(context.instance, feed, {partition: staged.sha256})
        context.log.warning(
            f"{partition}: no content was recorded for this partition (added by hand?); {name} is "
            f"taken as it is now (sha256 {staged.sha256[:12]}…) and later runs must match it"
        )
    elif not same_content(staged.sha256, expected):
        raise dg.Failure(
            description=(
                f"{name} changed since it was discovered (sha256 {staged.sha256[:10]}…, partition "
                f"{partition} expects {expected[:10]}…); the new content arrives as a new partition."
            ),
            allow_retries=False,
            metadata=REFUSED,
        )


def _size(size: int) -> str:
    """Bytes for a person: ``48.1 kB``."""
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")


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


def _handle_metadata(handle: JobHandle, *, reused: bool, target: str | None = None) -> dict:
    """The handle as readable, typed entries; ``job_handle`` keeps the whole record (JSON) that
    the status sensor and the report read back."""
    return {
        **({"target": target} if target else {}),
        "jobs": dg.MetadataValue.text(", ".join(j.job_id for j in handle.jobs) or "none"),
        "import_key": dg.MetadataValue.text(handle.key),
        "submitted_rows": handle.submitted_rows,
        "submitted_at": dg.MetadataValue.timestamp(handle.submitted_at),
        "reused_previous_import": reused,
        "vendor_details": dg.MetadataValue.md(_vendor_details(handle)),
        "job_handle": dg.MetadataValue.json(handle.model_dump(mode="json")),
    }


_HIDDEN_DETAILS = ("sync", "notes", "url", "upload", "not_sent_rows", "refused", "part_bytes")
"""Handle fields left out of ``vendor_details``: shown elsewhere, long lists, or addresses that
may carry a signature (upload URLs are never shown)."""


def _vendor_details(handle: JobHandle) -> str:
    """The vendor's fields of the handle (import id, list, section, …) as a small Markdown table."""
    rows = [("vendor", handle.vendor)]
    for key, value in sorted(handle.extra.items()):
        if any(h in key for h in _HIDDEN_DETAILS) or isinstance(value, dict | list):
            continue
        rows.append((key, markdown_cell(value)))
    rows += [
        (f"job {i + 1}", f"{j.job_id} (rows {j.first_row + 1}–{j.first_row + j.row_count})")
        for i, j in enumerate(handle.jobs[:MAX_DETAIL_JOBS])
    ]
    if len(handle.jobs) > MAX_DETAIL_JOBS:
        rows.append(("more jobs", str(len(handle.jobs) - MAX_DETAIL_JOBS)))
    return "\n".join(["| field | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


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
            sha256=expected_content(context.instance, feed.name, partition) or "",
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
    context: dg.AssetExecutionContext,
    keys: FeedKeys,
    feed: Feed,
    handle: JobHandle,
    config: ReportConfig | None = None,
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
    known = _status_from_config(config) or _status_from_tags(tags)
    outcome, vendor_status = _final_outcome(
        getattr(context.resources, keys.destination_resource), feed, handle, known
    )
    outcome.notes[:0] = notes
    return outcome, vendor_status


def _status_from_config(config: ReportConfig | None) -> JobStatus | None:
    """The terminal status the sensor's last poll saw, when this run was requested by it."""
    if config is None or not config.job_state or not config.vendor_status:
        return None
    try:
        return JobStatus(
            state=JobState(config.job_state), vendor_status=config.vendor_status, detail=config.detail
        )
    except ValueError:  # config written by hand
        return None


def _status_from_tags(tags: Mapping[str, str]) -> JobStatus | None:
    """The same from the tags of a report run an earlier release requested."""
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

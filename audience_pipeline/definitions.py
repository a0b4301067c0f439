"""The Dagster code location: every feed in the feeds file becomes its own asset group."""

from __future__ import annotations

import logging
from pathlib import Path

import dagster as dg

from audience_pipeline.assets import IO_MANAGER_KEY, STORAGE_KEY, FeedKeys, build_feed_assets
from audience_pipeline.automation.alerts import ALERTS_RESOURCE, AlertWebhook, build_alerts_sensor
from audience_pipeline.automation.arrival import build_arrival_automation
from audience_pipeline.automation.retries import build_retries_sensor
from audience_pipeline.automation.status import build_status_sensor
from audience_pipeline.destinations.registry import build_resource, config_value
from audience_pipeline.feeds.loader import check_environment, load_feeds, register_feed_secrets
from audience_pipeline.feeds.model import Feed, FeedsFile
from audience_pipeline.redact import install_log_redaction
from audience_pipeline.retention import build_retention_job
from audience_pipeline.sources.registry import build_source_resource
from audience_pipeline.storage import AudienceIOManager, PipelineStorage, default_home, storage_location

__all__ = ["build_definitions", "build_feed_definitions", "default_home", "defs"]


STEPS_IN_RUN_PROCESS = dg.in_process_executor
"""Both jobs run their steps one after another in the run's own process. The steps form a chain
(nothing runs in parallel), and Dagster's default executor would start a fresh Python for each
one, paying the imports and the code location load again: on two cores that was most of a
200-row file's time to its vendor (``benchmarks/bench_latency.py``). A run whose process dies is
still retried by the instance (``run_retries``) and ``import_job`` stays send-once (its intent and
handle are in the event log, not in the process)."""


def build_feed_definitions(feed: Feed, feeds: FeedsFile) -> dg.Definitions:
    """Assets, jobs and sensors of one feed; resources are shared and added once by the caller."""
    keys = FeedKeys(feed, feeds)
    ingest_job = dg.define_asset_job(
        keys.ingest_job,
        selection=dg.AssetSelection.assets(
            keys.hr_file, keys.validated_rows, keys.rejected_rows, keys.import_job
        ),
        description=f"Stage, validate and import one HR file into {keys.target}. {keys.about()}",
        executor_def=STEPS_IN_RUN_PROCESS,
    )
    report_job = dg.define_asset_job(
        keys.report_job,
        selection=dg.AssetSelection.assets(keys.failure_report),
        description=(
            f"Build the failure report of a finished import into {keys.target} (requested by the "
            f"import-status sensor). {keys.about()}"
        ),
        executor_def=STEPS_IN_RUN_PROCESS,
    )
    arrival_sensors, arrival_schedules = build_arrival_automation(keys, ingest_job, feeds.source_for(feed))
    return dg.Definitions(
        assets=build_feed_assets(feed, feeds),
        jobs=[ingest_job, report_job],
        sensors=[
            *arrival_sensors,
            build_status_sensor(keys, report_job, feeds.destination_for(feed), feed.retries),
            build_retries_sensor(keys, ingest_job),
        ],
        schedules=arrival_schedules,
    )


def build_definitions(feeds: FeedsFile, home: Path | None = None) -> dg.Definitions:
    """``home`` is the local folder used when neither ``$AUDIENCE_PIPELINE_STORAGE`` nor the feeds
    file's ``storage`` names the storage (``storage.storage_location``)."""
    location = storage_location(feeds, home)
    resources: dict[str, object] = {
        IO_MANAGER_KEY: AudienceIOManager(base_dir=location),
        STORAGE_KEY: PipelineStorage(base_dir=location),
    }
    for name, source in feeds.sources.items():
        resources[f"source_{name}"] = build_source_resource(source)
    for name, destination in feeds.destinations.items():
        resources[f"destination_{name}"] = build_resource(destination)
    sensors = []
    if feeds.alerts is not None:
        resources[ALERTS_RESOURCE] = AlertWebhook(
            webhook_url=config_value(feeds.alerts.webhook_url), timeout_seconds=feeds.alerts.timeout_seconds
        )
        sensors.append(build_alerts_sensor([FeedKeys(f, feeds) for f in feeds.feeds], list(feeds.alerts.on)))
    retention_job, retention_schedule = build_retention_job(
        [FeedKeys(f, feeds) for f in feeds.feeds], feeds.retention
    )
    return dg.Definitions.merge(
        *(build_feed_definitions(feed, feeds) for feed in feeds.feeds),
        dg.Definitions(
            resources=resources, sensors=sensors, jobs=[retention_job], schedules=[retention_schedule]
        ),
    )


@dg.definitions
def defs() -> dg.Definitions:
    """Under ``dagster dev`` a missing variable would only fail a run, with a traceback: say it
    when the code location loads, one line per feed and key."""
    feeds = load_feeds()
    register_feed_secrets(feeds)
    install_log_redaction()
    for line in check_environment(feeds):
        logging.getLogger("audience_pipeline").warning(line)
    return build_definitions(feeds)

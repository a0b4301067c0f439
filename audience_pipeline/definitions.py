"""The Dagster code location: every feed in the feeds file becomes its own asset group."""

from __future__ import annotations

import logging
import os
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
from audience_pipeline.sources.registry import build_source_resource
from audience_pipeline.storage import HOME_ENV_VAR, AudienceIOManager, PipelineStorage


def default_home() -> Path:
    return Path(os.environ.get(HOME_ENV_VAR) or Path.cwd() / ".audience_pipeline")


def build_feed_definitions(feed: Feed, feeds: FeedsFile) -> dg.Definitions:
    """Assets, jobs and sensors of one feed; resources are shared and added once by the caller."""
    keys = FeedKeys(feed, feeds)
    ingest_job = dg.define_asset_job(
        keys.ingest_job,
        selection=dg.AssetSelection.assets(
            keys.hr_file, keys.validated_rows, keys.rejected_rows, keys.import_job
        ),
        description=f"Stage, validate and import one HR file for feed {feed.name}.",
    )
    report_job = dg.define_asset_job(
        keys.report_job,
        selection=dg.AssetSelection.assets(keys.failure_report),
        description=f"Build the failure report of a finished import for feed {feed.name}.",
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
    home = home or default_home()
    resources: dict[str, object] = {
        IO_MANAGER_KEY: AudienceIOManager(base_dir=str(home)),
        STORAGE_KEY: PipelineStorage(base_dir=str(home)),
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
    return dg.Definitions.merge(
        *(build_feed_definitions(feed, feeds) for feed in feeds.feeds),
        dg.Definitions(resources=resources, sensors=sensors),
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

"""One place that knows every source type and the Dagster resource it becomes."""

from __future__ import annotations

import dagster as dg

from audience_pipeline.destinations.registry import config_value
from audience_pipeline.feeds.model import FolderSource, SourceConfig


def build_source_resource(config: SourceConfig) -> dg.ConfigurableResource:
    from audience_pipeline.sources.folder import FolderSourceResource

    if isinstance(config, FolderSource):
        return FolderSourceResource(path=config_value(config.path), glob=config.glob)
    raise TypeError(f"unknown source type {config.type!r}")

"""One place that knows every destination type: its options model and its Dagster resource."""

from __future__ import annotations

from typing import Protocol

import dagster as dg
from pydantic import BaseModel

from audience_pipeline.destinations import cxi
from audience_pipeline.destinations.base import Destination
from audience_pipeline.feeds.model import CommunicateXIDestination, DestinationConfig, SecretRef


class DestinationResource(Protocol):
    def destination(self, options: dict) -> Destination: ...


def options_model(config: DestinationConfig) -> type[BaseModel]:
    if isinstance(config, CommunicateXIDestination):
        return cxi.CxiOptions
    raise TypeError(f"unknown destination type {config.type!r}")


def vendor_of(config: DestinationConfig) -> str:
    return config.type


def config_value(value: str | SecretRef) -> str | dg.EnvVar:
    """``${VAR}`` references reach resources as ``EnvVar``: resolved late, hidden in the UI."""
    return dg.EnvVar(value.env_var) if isinstance(value, SecretRef) else value


def build_resource(config: DestinationConfig) -> dg.ConfigurableResource:
    if isinstance(config, CommunicateXIDestination):
        return cxi.CommunicateXIResource(
            base_url=config_value(config.base_url),
            api_key=config_value(config.api_key),
            timeout_seconds=config.timeout_seconds,
        )
    raise TypeError(f"unknown destination type {config.type!r}")

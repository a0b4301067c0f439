"""One place that knows every destination type: its options model and its Dagster resource."""

from __future__ import annotations

from typing import Protocol

import dagster as dg
from pydantic import BaseModel

from audience_pipeline.destinations import aep, altcraft, apsis, cxi, yesmail
from audience_pipeline.destinations.base import Destination
from audience_pipeline.feeds.model import (
    AdobeExperiencePlatformDestination,
    AltcraftDestination,
    ApsisOneDestination,
    CommunicateXIDestination,
    DestinationConfig,
    SecretRef,
    YesmailDestination,
)


class DestinationResource(Protocol):
    def destination(self, options: dict) -> Destination: ...


def options_model(config: DestinationConfig) -> type[BaseModel]:
    if isinstance(config, CommunicateXIDestination):
        return cxi.CxiOptions
    if isinstance(config, AdobeExperiencePlatformDestination):
        return aep.AepOptions
    if isinstance(config, AltcraftDestination):
        return altcraft.AltcraftOptions
    if isinstance(config, ApsisOneDestination):
        return apsis.ApsisOptions
    if isinstance(config, YesmailDestination):
        return yesmail.YesmailOptions
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
    if isinstance(config, AdobeExperiencePlatformDestination):
        optional = {
            key: config_value(getattr(config, key))
            for key in ("client_secret", "access_token", "s3_access_key_id", "s3_secret_access_key")
            if getattr(config, key) is not None
        }
        return aep.AepResource(
            base_url=config_value(config.base_url),
            ims_url=config_value(config.ims_url),
            client_id=config_value(config.client_id),
            org_id=config_value(config.org_id),
            sandbox_name=config_value(config.sandbox_name),
            scopes=config.scopes,
            timeout_seconds=config.timeout_seconds,
            **optional,
        )
    if isinstance(config, AltcraftDestination):
        return altcraft.AltcraftResource(
            base_url=config_value(config.base_url),
            token=config_value(config.token),
            timeout_seconds=config.timeout_seconds,
            max_in_flight=config.max_in_flight,
            max_profiles_per_request=config.max_profiles_per_request,
            max_request_bytes=config.max_request_bytes,
        )
    if isinstance(config, ApsisOneDestination):
        return apsis.ApsisResource(
            base_url=config_value(config.base_url),
            client_id=config_value(config.client_id),
            client_secret=config_value(config.client_secret),
            timeout_seconds=config.timeout_seconds,
        )
    if isinstance(config, YesmailDestination):
        return yesmail.YesmailResource(
            base_url=config_value(config.base_url),
            api_user=config_value(config.api_user),
            api_key=config_value(config.api_key),
            timeout_seconds=config.timeout_seconds,
            max_in_flight=config.max_in_flight,
            max_members_per_request=config.max_members_per_request,
            max_request_bytes=config.max_request_bytes,
        )
    raise TypeError(f"unknown destination type {config.type!r}")

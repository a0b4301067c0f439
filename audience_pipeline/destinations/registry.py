"""One place that knows every destination type: its options model and its Dagster resource."""

from __future__ import annotations

from typing import Protocol

import dagster as dg
from pydantic import BaseModel

from audience_pipeline.destinations import aep, altcraft, apsis, cxi, yesmail
from audience_pipeline.destinations.base import Destination
from audience_pipeline.destinations.http import RetryPolicy
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
    def destination(self, options: dict, retry: RetryPolicy | None = None) -> Destination:
        """A client for one feed; ``retry`` replaces the default policy on every HTTP client it builds
        (the status sensor passes one that does not wait out 429)."""
        ...


_TYPES: dict[type, tuple[type[BaseModel], type[dg.ConfigurableResource]]] = {
    CommunicateXIDestination: (cxi.CxiOptions, cxi.CommunicateXIResource),
    AdobeExperiencePlatformDestination: (aep.AepOptions, aep.AepResource),
    AltcraftDestination: (altcraft.AltcraftOptions, altcraft.AltcraftResource),
    ApsisOneDestination: (apsis.ApsisOptions, apsis.ApsisResource),
    YesmailDestination: (yesmail.YesmailOptions, yesmail.YesmailResource),
}
"""Destination config type -> (its feeds' options model, its Dagster resource)."""


def _entry(config: DestinationConfig) -> tuple[type[BaseModel], type[dg.ConfigurableResource]]:
    entry = _TYPES.get(type(config))
    if entry is None:
        raise TypeError(f"unknown destination type {config.type!r}")
    return entry


def options_model(config: DestinationConfig) -> type[BaseModel]:
    return _entry(config)[0]


def describe_target(config: DestinationConfig, options: dict) -> str:
    """What a feed writes to at its destination, e.g. ``Communicate XI import "All staff"``.

    Read from the feed's options, so it is known when the code location loads (no call to the
    vendor); options the model refuses (the loader reports those) fall back to the vendor's name.
    """
    from pydantic import ValidationError

    from audience_pipeline.sync_plan import VENDOR_NAMES

    try:
        return options_model(config).model_validate(options).describe_target()
    except (ValidationError, NotImplementedError):
        return VENDOR_NAMES.get(config.type, config.type)


def config_value(value: str | SecretRef) -> str | dg.EnvVar:
    """``${VAR}`` references reach resources as ``EnvVar``: resolved late, hidden in the UI."""
    return dg.EnvVar(value.env_var) if isinstance(value, SecretRef) else value


def build_resource(config: DestinationConfig) -> dg.ConfigurableResource:
    """The destination's resource: each resource field takes the config key of the same name.

    Keys left unset (``None``) are not passed, so the resource's own default applies.
    """
    resource = _entry(config)[1]
    values = {
        name: config_value(value)
        for name in resource.model_fields
        if (value := getattr(config, name, None)) is not None
    }
    return resource(**values)

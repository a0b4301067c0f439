"""The feeds file as typed models.

A feeds file declares three maps: ``sources`` (where HR exports land), ``destinations`` (vendor
accounts) and ``feeds`` (one source bound to one destination with a column mapping). Values may
be ``${ENV_VAR}`` references; the loader keeps them as :class:`SecretRef` so they reach Dagster
resources as ``dg.EnvVar`` and are never printed.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CANONICAL_FIELDS = ("unique_id", "email", "mobile_phone", "first_name", "last_name")
AttributeType = Literal["string", "date", "integer", "number", "boolean"]
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]*$"
_NAME_RE = re.compile(NAME_PATTERN)


class StrictModel(BaseModel):
    """Unknown keys are an error: a typo in a feeds file must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(StrictModel):
    """A ``${VAR}`` reference: resolved from the environment when a resource is built."""

    env_var: str

    def __str__(self) -> str:
        return "${" + self.env_var + "}"


ConfigValue = str | SecretRef


class AttributeSpec(StrictModel):
    """A passthrough column: copied from ``header``, normalised according to ``type``."""

    header: str
    type: AttributeType = "string"
    required: bool = False
    format: str | None = Field(
        default=None,
        description="strptime format for dates that are not ISO 8601, e.g. '%d/%m/%Y'",
    )


class FieldMapping(StrictModel):
    """Canonical field -> header in the source file. ``unique_id`` and one channel are required."""

    unique_id: str
    email: str | None = None
    mobile_phone: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    attributes: dict[str, AttributeSpec] = Field(default_factory=dict)

    @field_validator("attributes", mode="before")
    @classmethod
    def _short_attributes(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"header": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("attributes")
    @classmethod
    def _attribute_names(cls, value: dict[str, AttributeSpec]) -> dict[str, AttributeSpec]:
        for name in value:
            if not _NAME_RE.match(name) or name in CANONICAL_FIELDS or name == "source_line":
                raise ValueError(
                    f"attribute name {name!r} must match {NAME_PATTERN} and not be a canonical field"
                )
        return value

    @model_validator(mode="after")
    def _one_channel(self) -> FieldMapping:
        if not (self.email or self.mobile_phone):
            raise ValueError("map at least one of 'email' or 'mobile_phone'")
        return self

    def canonical_headers(self) -> dict[str, str]:
        """Output column -> source header, canonical fields first, then attributes."""
        out = {f: getattr(self, f) for f in CANONICAL_FIELDS if getattr(self, f)}
        out.update({name: spec.header for name, spec in self.attributes.items()})
        return out

    def output_columns(self) -> list[str]:
        return list(self.canonical_headers())


class FolderSource(StrictModel):
    type: Literal["folder"]
    path: ConfigValue
    glob: str = "*.csv"


SourceConfig = Annotated[FolderSource, Field(discriminator="type")]


class CommunicateXIDestination(StrictModel):
    type: Literal["communicate_xi"]
    base_url: ConfigValue
    api_key: ConfigValue
    timeout_seconds: float = 30.0


DestinationConfig = Annotated[CommunicateXIDestination, Field(discriminator="type")]


class Feed(StrictModel):
    """One HR source bound to one destination."""

    name: str = Field(pattern=NAME_PATTERN)
    source: str
    destination: str
    mapping: FieldMapping
    description: str | None = None
    default_phone_region: str = Field(default="US", min_length=2, max_length=2)
    max_rejection_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    options: dict[str, Any] = Field(default_factory=dict)


class FeedsFile(StrictModel):
    sources: dict[str, SourceConfig]
    destinations: dict[str, DestinationConfig]
    feeds: list[Feed]

    @model_validator(mode="after")
    def _references(self) -> FeedsFile:
        """Cross-references, all reported at once, one ``key.path: problem`` per line.

        A model validator cannot attach a location to its error, so each line carries its own.
        """
        problems: list[str] = []
        names: dict[str, int] = {}
        for i, feed in enumerate(self.feeds):
            if feed.name in names:
                problems.append(
                    f"feeds[{i}].name: duplicate feed name {feed.name!r} (also feeds[{names[feed.name]}])"
                )
            names.setdefault(feed.name, i)
            if feed.source not in self.sources:
                problems.append(
                    f"feeds[{i}].source: unknown source {feed.source!r}; "
                    f"expected one of {sorted(self.sources)}"
                )
            if feed.destination not in self.destinations:
                problems.append(
                    f"feeds[{i}].destination: unknown destination {feed.destination!r}; "
                    f"expected one of {sorted(self.destinations)}"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def source_for(self, feed: Feed) -> SourceConfig:
        return self.sources[feed.source]

    def destination_for(self, feed: Feed) -> DestinationConfig:
        return self.destinations[feed.destination]

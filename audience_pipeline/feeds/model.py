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


class FileDropOptions(StrictModel):
    """Arrival rules shared by file-drop sources (see ``sources/base.py``)."""

    glob: str = "*.csv"
    ready_marker: str | None = Field(default=None, pattern=r"^\.[A-Za-z0-9_.-]+$")
    stable_after_seconds: float = Field(default=60.0, ge=0)
    move_processed_to: str | None = None


class FolderSource(FileDropOptions):
    type: Literal["folder"]
    path: ConfigValue


class SftpSource(FileDropOptions):
    type: Literal["sftp"]
    host: ConfigValue
    port: int = Field(default=22, ge=1, le=65535)
    username: ConfigValue
    password: ConfigValue | None = None
    private_key: ConfigValue | None = None
    private_key_passphrase: ConfigValue | None = None
    known_hosts: ConfigValue | None = None
    host_key_checking: bool = True
    remote_dir: str = "."
    timeout_seconds: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _credential(self) -> SftpSource:
        if self.password is None and self.private_key is None:
            raise ValueError("set 'password' or 'private_key' (from ${VAR})")
        return self


class S3Source(FileDropOptions):
    type: Literal["s3"]
    bucket: ConfigValue
    prefix: str = ""
    endpoint_url: ConfigValue | None = None
    region: str | None = None
    access_key_id: ConfigValue | None = None
    secret_access_key: ConfigValue | None = None
    session_token: ConfigValue | None = None
    tag_processed: str | None = Field(default=None, pattern=r"^[^=]+=[^=]*$")
    stable_after_seconds: float = Field(default=0.0, ge=0)
    timeout_seconds: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _key_pair(self) -> S3Source:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("set both 'access_key_id' and 'secret_access_key', or neither (default chain)")
        return self


class HttpReportSource(StrictModel):
    """A report URL (Workday RaaS, BambooHR custom report): pulled on ``schedule``, not listed."""

    type: Literal["http_report"]
    url: ConfigValue
    schedule: str = "0 6 * * *"
    timezone: str = "UTC"
    file_name: str = Field(default="report.csv", pattern=r"^[^/\\]+$")
    method: Literal["GET", "POST"] = "GET"
    body: str | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = Field(default_factory=dict)
    username: ConfigValue | None = None
    password: ConfigValue | None = None
    token: ConfigValue | None = None
    timeout_seconds: float = Field(default=300.0, gt=0)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        from dagster._utils.schedules import is_valid_cron_string

        if not is_valid_cron_string(value):
            raise ValueError(f"{value!r} is not a cron schedule such as '0 6 * * *'")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use an IANA name like 'Europe/Berlin'") from None
        return value

    @model_validator(mode="after")
    def _auth(self) -> HttpReportSource:
        if self.token is not None and (self.username is not None or self.password is not None):
            raise ValueError("use either 'token' (bearer) or 'username'/'password' (basic), not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("basic auth needs both 'username' and 'password'")
        if self.body is not None and self.method == "GET":
            raise ValueError("'body' needs method: POST")
        return self


SourceConfig = Annotated[FolderSource | SftpSource | S3Source | HttpReportSource, Field(discriminator="type")]


class CommunicateXIDestination(StrictModel):
    type: Literal["communicate_xi"]
    base_url: ConfigValue
    api_key: ConfigValue
    timeout_seconds: float = 30.0


class AdobeExperiencePlatformDestination(StrictModel):
    """Experience Platform: IMS OAuth server-to-server credentials (or a ready bearer token)."""

    type: Literal["adobe_experience_platform"]
    base_url: ConfigValue = "https://platform.adobe.io"
    ims_url: ConfigValue = "https://ims-na1.adobelogin.com"
    client_id: ConfigValue
    client_secret: ConfigValue | None = None
    access_token: ConfigValue | None = None
    org_id: ConfigValue
    sandbox_name: ConfigValue = "prod"
    scopes: str = "openid,AdobeID,read_organizations,additional_info.projectedProductContext,session"
    s3_access_key_id: ConfigValue | None = None
    s3_secret_access_key: ConfigValue | None = None
    timeout_seconds: float = 30.0

    @model_validator(mode="after")
    def _one_credential(self) -> AdobeExperiencePlatformDestination:
        if (self.client_secret is None) == (self.access_token is None):
            raise ValueError("set exactly one of 'client_secret' (OAuth server-to-server) or 'access_token'")
        return self


class AltcraftDestination(StrictModel):
    """Altcraft: the API token travels in each JSON body; limits are per request."""

    type: Literal["altcraft"]
    base_url: ConfigValue
    token: ConfigValue
    timeout_seconds: float = 30.0
    max_in_flight: int = Field(default=4, ge=1, le=32)
    max_profiles_per_request: int = Field(default=10_000, ge=1, le=10_000)
    max_request_bytes: int = Field(default=10_000_000, ge=4096, le=10 * 1024 * 1024)


class ApsisOneDestination(StrictModel):
    """APSIS One: OAuth client credentials; the account's regional API host as ``base_url``."""

    type: Literal["apsis_one"]
    base_url: ConfigValue = "https://api.apsis.one"
    client_id: ConfigValue
    client_secret: ConfigValue
    timeout_seconds: float = 60.0


class YesmailDestination(StrictModel):
    """Yesmail: Api-User / Api-Key headers; JSON member batches sent a few at a time."""

    type: Literal["yesmail"]
    base_url: ConfigValue = "https://api.yesmail.com"
    api_user: ConfigValue
    api_key: ConfigValue
    timeout_seconds: float = 30.0
    max_in_flight: int = Field(default=4, ge=1, le=32)
    max_members_per_request: int = Field(default=1000, ge=1)
    max_request_bytes: int = Field(default=10_000_000, ge=4096)


DestinationConfig = Annotated[
    CommunicateXIDestination
    | AdobeExperiencePlatformDestination
    | AltcraftDestination
    | ApsisOneDestination
    | YesmailDestination,
    Field(discriminator="type"),
]


class Feed(StrictModel):
    """One HR source bound to one destination."""

    name: str = Field(pattern=NAME_PATTERN)
    source: str
    destination: str
    mapping: FieldMapping
    description: str | None = None
    default_phone_region: str = Field(default="US", min_length=2, max_length=2)
    max_rejection_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    allow_empty: bool = False
    """A file with a header and no rows is refused unless the audience may really become empty."""
    max_file_bytes: int = Field(default=2 * 1024**3, gt=0)
    """Larger files are refused before they are read (default 2 GiB)."""
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

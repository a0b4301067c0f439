"""The feeds file as typed models.

A feeds file declares three maps: ``sources`` (where HR exports land), ``destinations`` (vendor
accounts) and ``feeds`` (one source bound to one destination with a column mapping), plus an
optional ``alerts`` block. Values may be ``${ENV_VAR}`` references; the loader keeps them as
:class:`SecretRef` so they reach Dagster resources as ``dg.EnvVar`` and are never printed.

Credentials (:data:`Secret` fields) *must* be ``${VAR}``: a literal would be stored in Dagster's
run records and shown in the UI. Endpoints (:data:`UrlValue` fields) given literally must be
absolute ``http(s)`` URLs; given as ``${VAR}`` they are checked once the variable is resolved
(``loader.check_environment``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from audience_pipeline.redact import redact_url

CANONICAL_FIELDS = ("unique_id", "email", "mobile_phone", "first_name", "last_name")
AttributeType = Literal["string", "date", "integer", "number", "boolean"]
InvalidOptionalFields = Literal["clear", "reject"]
SyncMode = Literal["changed", "full"]
FILE_REPLACING = frozenset({"communicate_xi", "adobe_experience_platform"})
"""Destinations whose import file is the whole audience: a row left out is a member removed."""
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

SECRET_LITERAL_ERROR = "secret_literal"
"""The pydantic error type of a literal where a secret belongs; the loader names a variable for it."""
SECRET_LITERAL_MESSAGE = (
    "a secret must come from the environment, write ${VAR} and set that variable "
    "(a literal would be stored in Dagster's run records and shown in the UI)"
)
HTTP_URL_ERROR = "http_url"


class _SecretMarker:
    """Annotation marker: the field holds a credential (see :func:`is_secret_field`)."""


class _UrlMarker:
    """Annotation marker: the field holds an http(s) endpoint (see :func:`is_url_field`)."""


SECRET = _SecretMarker()
URL = _UrlMarker()


def is_http_url(value: str) -> bool:
    """Whether ``value`` is an absolute ``http://`` or ``https://`` URL with a host."""
    if not value or any(c.isspace() or ord(c) < 32 for c in value):
        return False
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def _secret_only(value: Any) -> Any:
    if isinstance(value, str | int | float | bool):
        raise PydanticCustomError(SECRET_LITERAL_ERROR, SECRET_LITERAL_MESSAGE)
    return value


def _url_or_ref(value: Any) -> Any:
    if isinstance(value, str) and not is_http_url(value):
        raise PydanticCustomError(
            HTTP_URL_ERROR,
            "{value} is not an http(s) URL; write an absolute address such as https://api.example.com, "
            "or ${VAR}",
            {"value": redact_url(repr(value))},
        )
    return value


Secret = Annotated[SecretRef, BeforeValidator(_secret_only), SECRET]
"""A credential: only ``${VAR}`` is accepted, a literal is refused at load."""
UrlValue = Annotated[ConfigValue, BeforeValidator(_url_or_ref), URL]
"""An endpoint: a literal must be an absolute http(s) URL; ``${VAR}`` is checked once resolved."""
SecretUrl = Annotated[SecretRef, BeforeValidator(_secret_only), SECRET, URL]
"""An endpoint that embeds a credential (a webhook URL): ``${VAR}`` only, checked once resolved."""


def _has_marker(annotation: Any, marker: object) -> bool:
    return any(arg is marker or _has_marker(arg, marker) for arg in get_args(annotation))


def is_secret_field(model: type[BaseModel], name: str) -> bool:
    """Whether ``model.name`` holds a credential (its value must never be printed)."""
    field = model.model_fields.get(name)
    return field is not None and (SECRET in field.metadata or _has_marker(field.annotation, SECRET))


def is_url_field(model: type[BaseModel], name: str) -> bool:
    """Whether ``model.name`` holds an http(s) endpoint."""
    field = model.model_fields.get(name)
    return field is not None and (URL in field.metadata or _has_marker(field.annotation, URL))


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
    check_interval_seconds: int = Field(default=30, ge=1, le=3600)
    """How often the new-file sensor lists the source. A file is taken once two listings in a
    row see it unchanged (or its ready marker is there), so it waits one to two intervals."""


class FolderSource(FileDropOptions):
    """A local or mounted folder: listing it is a directory read, so it is checked every 5 s and
    a dropped file starts its run 5-10 s later."""

    type: Literal["folder"]
    path: ConfigValue
    check_interval_seconds: int = Field(default=5, ge=1, le=3600)


class SftpSource(FileDropOptions):
    type: Literal["sftp"]
    host: ConfigValue
    port: int = Field(default=22, ge=1, le=65535)
    username: ConfigValue
    password: Secret | None = None
    private_key: Secret | None = None
    private_key_passphrase: Secret | None = None
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
    """A bucket prefix: one LIST request per check (every 10 s: about 8,600 a day, cents a month)."""

    type: Literal["s3"]
    check_interval_seconds: int = Field(default=10, ge=1, le=3600)
    bucket: ConfigValue
    prefix: str = ""
    endpoint_url: UrlValue | None = None
    region: str | None = None
    access_key_id: ConfigValue | None = None
    secret_access_key: Secret | None = None
    session_token: Secret | None = None
    tag_processed: str | None = Field(default=None, pattern=r"^[^=]+=[^=]*$")
    stable_after_seconds: float = Field(default=0.0, ge=0)
    timeout_seconds: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _key_pair(self) -> S3Source:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("set both 'access_key_id' and 'secret_access_key', or neither (default chain)")
        return self


def _cron(value: str) -> str:
    from dagster._utils.schedules import is_valid_cron_string

    if not is_valid_cron_string(value):
        raise ValueError(f"{value!r} is not a cron schedule such as '0 6 * * *'")
    return value


CronSchedule = Annotated[str, AfterValidator(_cron)]
"""A cron string as Dagster schedules take it (five fields)."""


class HttpReportSource(StrictModel):
    """A report URL (Workday RaaS, BambooHR custom report): pulled on ``schedule``, not listed."""

    type: Literal["http_report"]
    url: UrlValue
    schedule: CronSchedule = "0 6 * * *"
    timezone: str = "UTC"
    file_name: str = Field(default="report.csv", pattern=r"^[^/\\]+$")
    method: Literal["GET", "POST"] = "GET"
    body: str | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = Field(default_factory=dict)
    username: ConfigValue | None = None
    password: Secret | None = None
    token: Secret | None = None
    timeout_seconds: float = Field(default=300.0, gt=0)

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


class StatusPolling(StrictModel):
    """How the import-status sensor polls one destination (one account at one vendor).

    None of the five vendor documents states a rate limit for status calls (APSIS One limits
    pending imports, not requests), so the defaults are ours: enough to poll 5,000 imports in flight
    at least every two minutes within the sensor's 4.5-second budget per 15-second tick (5,000 /
    120 s is 42 calls a second on average, 140 while a tick runs; 200 leaves a margin). Every feed
    on the destination shares these limits. An import is polled again after a tenth of its age,
    and never less often than ``max_interval_seconds``: a two-hour import is not polled every
    tick, a new one is.
    """

    concurrency: int = Field(default=12, ge=1, le=64)
    """Status calls in flight at once, across every feed on this destination."""
    requests_per_second: float = Field(default=200.0, gt=0, le=1000)
    """Status calls started per second, across every feed on this destination."""
    max_interval_seconds: float = Field(default=120.0, ge=15, le=3600)
    """The longest an in-flight import goes without a poll (when the limits allow)."""


class DestinationBase(StrictModel):
    """Settings every destination has: how long an import may run, how many polls may fail and
    how hard its status may be polled."""

    import_timeout_minutes: float | None = Field(default=None, gt=0)
    """Give up on a vendor import still running after this long; ``None``: the vendor's default
    (:data:`DEFAULT_IMPORT_TIMEOUT_MINUTES`)."""
    max_poll_errors: int = Field(default=5, ge=1)
    """How many status polls in a row may fail before the import is given up on."""
    status_polling: StatusPolling = Field(default_factory=StatusPolling)


class CommunicateXIDestination(DestinationBase):
    type: Literal["communicate_xi"]
    base_url: UrlValue
    api_key: Secret
    timeout_seconds: float = 30.0


class AdobeExperiencePlatformDestination(DestinationBase):
    """Experience Platform: IMS OAuth server-to-server credentials (or a ready bearer token)."""

    type: Literal["adobe_experience_platform"]
    base_url: UrlValue = "https://platform.adobe.io"
    ims_url: UrlValue = "https://ims-na1.adobelogin.com"
    client_id: ConfigValue
    client_secret: Secret | None = None
    access_token: Secret | None = None
    org_id: ConfigValue
    sandbox_name: ConfigValue = "prod"
    scopes: str = "openid,AdobeID,read_organizations,additional_info.projectedProductContext,session"
    s3_access_key_id: ConfigValue | None = None
    s3_secret_access_key: Secret | None = None
    timeout_seconds: float = 30.0

    @model_validator(mode="after")
    def _one_credential(self) -> AdobeExperiencePlatformDestination:
        if (self.client_secret is None) == (self.access_token is None):
            raise ValueError("set exactly one of 'client_secret' (OAuth server-to-server) or 'access_token'")
        return self


class AltcraftDestination(DestinationBase):
    """Altcraft: the API token travels in each JSON body; limits are per request."""

    type: Literal["altcraft"]
    base_url: UrlValue
    token: Secret
    timeout_seconds: float = 30.0
    max_in_flight: int = Field(default=4, ge=1, le=32)
    max_profiles_per_request: int = Field(default=10_000, ge=1, le=10_000)
    max_request_bytes: int = Field(default=10_000_000, ge=4096, le=10 * 1024 * 1024)


class ApsisOneDestination(DestinationBase):
    """APSIS One: OAuth client credentials; the account's regional API host as ``base_url``."""

    type: Literal["apsis_one"]
    base_url: UrlValue = "https://api.apsis.one"
    client_id: ConfigValue
    client_secret: Secret
    timeout_seconds: float = 60.0


class YesmailDestination(DestinationBase):
    """Yesmail: Api-User / Api-Key headers; JSON member batches sent a few at a time."""

    type: Literal["yesmail"]
    base_url: UrlValue = "https://api.yesmail.com"
    api_user: ConfigValue
    api_key: Secret
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

DEFAULT_IMPORT_TIMEOUT_MINUTES: dict[str, float] = {
    "communicate_xi": 360,
    "adobe_experience_platform": 1440,
    "apsis_one": 720,
    "yesmail": 360,
    "altcraft": 360,
}
"""Per destination type: how long an import may run when ``import_timeout_minutes`` is not set."""


def import_timeout_seconds(config: DestinationConfig) -> float:
    """The destination's import time limit in seconds: its own setting, else its type's default."""
    minutes = config.import_timeout_minutes
    if minutes is None:
        minutes = DEFAULT_IMPORT_TIMEOUT_MINUTES[config.type]
    return float(minutes) * 60.0


class RetrySettings(StrictModel):
    """How a failed feed run is retried: exponential backoff, capped."""

    max_attempts: int = Field(default=5, ge=1)
    """Runs in all, counting the first; 1 means no retry."""
    backoff_seconds: float = Field(default=60.0, ge=0)
    """The wait after the first failed attempt; doubled after each further one."""
    max_backoff_seconds: float = Field(default=3600.0, ge=0)
    """No wait is longer than this."""

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1 = the first run) before the next."""
        if attempt < 1:
            raise ValueError(f"attempt counts from 1, got {attempt}")
        # 2.0 ** 1024 overflows a float; long before that the cap applies.
        return min(self.max_backoff_seconds, self.backoff_seconds * 2.0 ** min(attempt - 1, 1000))


AlertEvent = Literal["needs_attention", "blocked", "refused", "timed_out"]
ALERT_EVENTS: tuple[AlertEvent, ...] = get_args(AlertEvent)


class AlertsConfig(StrictModel):
    """Where to post when a feed needs a person: one webhook for the whole file."""

    webhook_url: SecretUrl
    """``${VAR}`` only: webhook URLs embed a token, so the value is treated as a secret."""
    on: list[AlertEvent] = Field(default_factory=lambda: list(ALERT_EVENTS))
    """The events that post an alert; all of them unless listed."""
    timeout_seconds: float = Field(default=10.0, gt=0)


class RetentionConfig(StrictModel):
    """How long a feed's files are kept: staged copies, asset values, sync plans and reports.

    A partition's files are pruned once it has ended (``reported``, ``blocked`` or ``refused``)
    more than ``keep_days`` ago and it is not one of the feed's newest ``keep_last`` files. Its
    runs, materializations, check results and metadata stay in the Dagster instance (the UI keeps
    its history; the instance's own ``retention:`` settings govern ticks). Partitions still
    importing, retrying or needing a person are never pruned.
    """

    keep_days: float | None = Field(default=180.0, gt=0)
    """``null`` keeps every file forever."""
    keep_last: int = Field(default=30, ge=1)
    """The newest files of each feed are kept whatever their age."""
    schedule: CronSchedule = "0 3 * * *"
    """When the ``audience_pipeline__retention`` job runs (cron, UTC)."""


class Feed(StrictModel):
    """One HR source bound to one destination.

    ``invalid_optional_fields`` decides what an invalid value in an optional column (an email or
    phone when both are mapped, names, attributes that are not ``required``) does to its row.
    """

    name: str = Field(pattern=NAME_PATTERN)
    source: str
    destination: str
    mapping: FieldMapping
    description: str | None = None
    default_phone_region: str = Field(default="US", min_length=2, max_length=2)
    max_rejection_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    invalid_optional_fields: InvalidOptionalFields = "clear"
    """``clear`` (default): the invalid value is emptied and the row imported without it, listed in
    the report as a ``warning``; the row is rejected only when neither a valid email nor a valid
    phone is left. ``reject``: the row is rejected, as a required field's problem would."""
    allow_empty: bool = False
    """A file with a header and no rows is refused unless the audience may really become empty."""
    max_file_bytes: int = Field(default=2 * 1024**3, gt=0)
    """Larger files are refused before they are read (default 2 GiB)."""
    options: dict[str, Any] = Field(default_factory=dict)
    retries: RetrySettings = RetrySettings()
    """How often, and how far apart, a failed run of this feed is tried again."""
    sync_mode: SyncMode | None = None
    """``changed``: send only rows added or changed since the feed's snapshot; ``full``: every row.
    Default: ``changed`` for per-member vendors, ``full`` (the only choice) for file-replacing ones."""
    max_removed_rate: float = Field(default=0.2, ge=0.0, le=1.0)
    """Threshold of the blocking check: at most this share of the snapshot's employees may be
    missing from a new file (a truncated export would otherwise shrink the audience)."""


class StorageConfig(StrictModel):
    """Where runs keep what they share: a local folder (relative to the feeds file) or
    ``s3://bucket/prefix``. ``$AUDIENCE_PIPELINE_STORAGE`` wins over it (``storage.py``);
    S3 endpoint and credentials come from the AWS environment, never from this file."""

    url: ConfigValue


class FeedsFile(StrictModel):
    sources: dict[str, SourceConfig]
    destinations: dict[str, DestinationConfig]
    feeds: list[Feed]
    alerts: AlertsConfig | None = None
    """Applies to every feed; a feed cannot override it."""
    storage: StorageConfig | None = None
    """Staged files, asset values and reports of every feed (default: the local working folder)."""
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    """Applies to every feed: old partitions' files are pruned, their history kept."""

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
            elif feed.sync_mode == "changed" and self.destinations[feed.destination].type in FILE_REPLACING:
                problems.append(
                    f"feeds[{i}].sync_mode: 'changed' is not possible with "
                    f"{self.destinations[feed.destination].type}: its import file is the whole audience, "
                    "so a file of changed rows would remove everyone else; use 'full' or leave it out"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def source_for(self, feed: Feed) -> SourceConfig:
        return self.sources[feed.source]

    def destination_for(self, feed: Feed) -> DestinationConfig:
        return self.destinations[feed.destination]


def sync_mode_for(feed: Feed, destination_type: str) -> SyncMode:
    """The feed's sync mode: its own setting, else its destination's default."""
    if feed.sync_mode is not None:
        return feed.sync_mode
    return "full" if destination_type in FILE_REPLACING else "changed"

"""Feeds files as people write them: every mistake is reported with the file, key path and fix."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from audience_pipeline.feeds.loader import (
    DEMO_FEEDS,
    FEEDS_ENV_VAR,
    FeedsFileError,
    feeds_path,
    load_feeds,
    register_feed_secrets,
    secret_refs,
)
from audience_pipeline.feeds.model import (
    DEFAULT_IMPORT_TIMEOUT_MINUTES,
    AlertsConfig,
    AttributeSpec,
    CommunicateXIDestination,
    FolderSource,
    RetrySettings,
    SecretRef,
    import_timeout_seconds,
)
from audience_pipeline.redact import GLOBAL_REDACTOR, redact

BASE: dict[str, Any] = {
    "sources": {"hr_drop": {"type": "folder", "path": "incoming"}},
    "destinations": {
        "cxi": {
            "type": "communicate_xi",
            "base_url": "${TEST_CXI_BASE_URL}",
            "api_key": "${TEST_CXI_API_KEY}",
        }
    },
    "feeds": [
        {
            "name": "all_staff",
            "source": "hr_drop",
            "destination": "cxi",
            "mapping": {
                "unique_id": "Employee ID",
                "email": "Email",
                "first_name": "First Name",
                "attributes": {"department": "Department", "start": {"header": "Start", "type": "date"}},
            },
            "options": {"import_name": "All staff"},
        }
    ],
}


def config() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def write(tmp_path: Path, data: dict[str, Any] | str, name: str = "feeds.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8"
    )
    return path


def load_error(path: Path) -> str:
    with pytest.raises(FeedsFileError) as info:
        load_feeds(path)
    message = str(info.value)
    assert str(path) in message, message
    return message


def test_bundled_demo_loads_without_any_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith(("CXI_", "AEP_", "APSIS_", "YESMAIL_", "ALTCRAFT_"))]:
        monkeypatch.delenv(var)

    feeds = load_feeds(DEMO_FEEDS)

    by_vendor = {feeds.destination_for(f).type: f for f in feeds.feeds}
    assert set(by_vendor) == {
        "communicate_xi",
        "adobe_experience_platform",
        "apsis_one",
        "yesmail",
        "altcraft",
    }
    assert all(f.source == "hr_drop" for f in feeds.feeds)
    feed = by_vendor["communicate_xi"]
    assert feed.name == "all_staff_cxi"
    destination = feeds.destination_for(feed)
    assert isinstance(destination, CommunicateXIDestination)
    assert destination.api_key == SecretRef(env_var="CXI_API_KEY")
    source = feeds.source_for(feed)
    assert isinstance(source, FolderSource)
    assert Path(str(source.path)) == (DEMO_FEEDS.parent / "incoming").resolve()
    assert list(Path(str(source.path)).glob(source.glob))
    assert feed.mapping.attributes["start_date"] == AttributeSpec(header="Start Date", type="date")
    assert feed.options["import_name"] == "All staff"


def test_whole_reference_stays_a_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_CXI_API_KEY", "key-never-in-the-model-1234")

    feeds = load_feeds(write(tmp_path, config()))

    destination = feeds.destinations["cxi"]
    assert destination.api_key == SecretRef(env_var="TEST_CXI_API_KEY")
    assert str(destination.api_key) == "${TEST_CXI_API_KEY}"
    assert "key-never-in-the-model-1234" not in feeds.model_dump_json()
    assert {ref.env_var for ref in secret_refs(feeds)} == {"TEST_CXI_BASE_URL", "TEST_CXI_API_KEY"}


def test_embedded_reference_is_interpolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    data = config()
    data["sources"]["hr_drop"]["path"] = "${HOME}/x"

    feeds = load_feeds(write(tmp_path, data))

    assert feeds.sources["hr_drop"].path == str((home / "x").resolve())


def test_missing_embedded_variable_names_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_SUCH_DIR_VAR", raising=False)
    data = config()
    data["sources"]["hr_drop"]["path"] = "${NO_SUCH_DIR_VAR}/drop"

    message = load_error(write(tmp_path, data))

    assert "sources.hr_drop.path" in message
    assert "NO_SUCH_DIR_VAR is not set" in message


def test_relative_folder_is_anchored_at_the_feeds_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = config()
    data["sources"]["abs"] = {"type": "folder", "path": str(tmp_path / "absolute")}

    feeds = load_feeds(write(tmp_path, data, "conf/feeds.yaml"))

    assert feeds.sources["hr_drop"].path == str((tmp_path / "conf" / "incoming").resolve())
    assert feeds.sources["abs"].path == str((tmp_path / "absolute").resolve())


def test_invalid_yaml_reports_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "sources:\n  hr: {type: folder\nfeeds: []\n")

    message = load_error(path)

    assert "invalid YAML at line 3, column 6: expected ',' or '}', but got ':'" in message
    assert "(while parsing a flow mapping at line 2, column 7)" in message


def test_duplicate_yaml_key_is_not_silently_dropped(tmp_path: Path) -> None:
    text = yaml.safe_dump(config(), sort_keys=False)
    text = text.replace("sources:\n", "sources:\n  hr_drop:\n    type: folder\n    path: old\n", 1)

    message = load_error(write(tmp_path, text))

    assert "duplicate key 'hr_drop' (first on line 2)" in message
    assert "line 5" in message


def test_unknown_key_names_path_and_suggests_the_spelling(tmp_path: Path) -> None:
    data = config()
    data["sources"]["hr_drop"]["glb"] = "*.txt"

    message = load_error(write(tmp_path, data))

    assert "sources.hr_drop.glb: unknown key" in message
    assert "did you mean 'glob'?" in message
    expected = (
        "check_interval_seconds, glob, move_processed_to, path, ready_marker, stable_after_seconds, type"
    )
    assert f"expected one of: {expected}" in message


def test_unknown_key_keeps_capitalised_user_keys(tmp_path: Path) -> None:
    data = config()
    data["sources"] = {"HR": {"type": "folder", "path": "in", "pth": "x"}}
    data["feeds"][0]["source"] = "HR"
    data["feeds"][0]["mapping"]["attributes"] = {"Dept": {"header": "D", "tpye": "string"}}

    message = load_error(write(tmp_path, data))

    assert "sources.HR.pth: unknown key" in message
    assert "feeds[0].mapping.attributes.Dept.tpye: unknown key" in message
    assert "HR.folder" not in message


def test_missing_required_key(tmp_path: Path) -> None:
    data = config()
    del data["feeds"][0]["mapping"]["unique_id"]
    del data["destinations"]["cxi"]["api_key"]

    message = load_error(write(tmp_path, data))

    assert "2 problem(s)" in message
    assert "feeds[0].mapping.unique_id: required key is missing" in message
    assert "destinations.cxi.api_key: required key is missing" in message


def test_unknown_destination_type(tmp_path: Path) -> None:
    data = config()
    data["destinations"]["cxi"]["type"] = "communicate_x"

    message = load_error(write(tmp_path, data))

    assert "destinations.cxi.type: unknown type 'communicate_x'; expected one of 'communicate_xi'" in message


def test_unknown_references_and_duplicate_names_are_all_reported(tmp_path: Path) -> None:
    data = config()
    twin = copy.deepcopy(data["feeds"][0])
    twin.update(source="hr", destination="cx")
    data["feeds"].append(twin)

    message = load_error(write(tmp_path, data))

    assert "feeds[1].name: duplicate feed name 'all_staff' (also feeds[0])" in message
    assert "feeds[1].source: unknown source 'hr'; expected one of ['hr_drop']" in message
    assert "feeds[1].destination: unknown destination 'cx'; expected one of ['cxi']" in message
    assert "(top level)" not in message


def test_bad_attribute_type(tmp_path: Path) -> None:
    data = config()
    data["feeds"][0]["mapping"]["attributes"]["start"]["type"] = "datetime"

    message = load_error(write(tmp_path, data))

    assert "feeds[0].mapping.attributes.start.type: Input should be 'string', 'date'" in message
    assert "(got 'datetime')" in message


def test_no_channel_mapped(tmp_path: Path) -> None:
    data = config()
    del data["feeds"][0]["mapping"]["email"]

    message = load_error(write(tmp_path, data))

    assert "feeds[0].mapping: map at least one of 'email' or 'mobile_phone'" in message


def test_cxi_options_missing_import_name_and_unknown_key(tmp_path: Path) -> None:
    data = config()
    data["feeds"][0]["options"] = {"imprt_name": "All staff"}

    message = load_error(write(tmp_path, data))

    assert "feeds[0].options.import_name: required key is missing" in message
    assert "feeds[0].options.imprt_name: unknown key" in message
    assert "did you mean 'import_name'?" in message


def test_cxi_option_field_must_name_a_mapped_column(tmp_path: Path) -> None:
    data = config()
    data["feeds"][0]["options"].update(email_field="Email", name_field="department")

    message = load_error(write(tmp_path, data))

    assert "feeds[0].options.email_field: 'Email' is not a column of this feed" in message
    assert "'unique_id', 'email', 'first_name', 'department', 'start'" in message
    assert "name_field" not in message


def test_cxi_options_must_leave_a_channel(tmp_path: Path) -> None:
    data = config()
    data["feeds"][0]["options"]["email_field"] = None

    message = load_error(write(tmp_path, data))

    assert "feeds[0].options: Communicate XI needs an email or mobile phone column" in message


def test_cxi_default_fields_for_unmapped_columns_are_fine(tmp_path: Path) -> None:
    feeds = load_feeds(write(tmp_path, config()))

    assert "mobile_phone" not in feeds.feeds[0].mapping.output_columns()


def test_env_var_selects_the_feeds_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = config()
    data["feeds"][0]["name"] = "from_env"
    path = write(tmp_path, data)

    monkeypatch.delenv(FEEDS_ENV_VAR, raising=False)
    assert feeds_path() == DEMO_FEEDS
    monkeypatch.setenv(FEEDS_ENV_VAR, str(path))

    assert feeds_path() == path
    assert [f.name for f in load_feeds().feeds] == ["from_env"]
    monkeypatch.setenv(FEEDS_ENV_VAR, str(tmp_path / "missing.yaml"))
    with pytest.raises(FeedsFileError, match=f"missing.yaml: not found \\(set {FEEDS_ENV_VAR}\\)"):
        load_feeds()


def test_register_feed_secrets_teaches_the_redactor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "cxi-test-secret-7f3a9b2c4d"
    monkeypatch.setenv("TEST_CXI_API_KEY", secret)
    monkeypatch.setenv("TEST_CXI_BASE_URL", "https://cxi.example.test/api")
    feeds = load_feeds(write(tmp_path, config()))
    assert secret not in GLOBAL_REDACTOR

    register_feed_secrets(feeds)

    assert redact(f"rejected key {secret}!") == "rejected key ***!"
    assert redact("calling https://cxi.example.test/api") == "calling https://cxi.example.test/api"


LITERAL = "literal-secret-value-5e8a1c"
SECRET_WHY = (
    "a secret must come from the environment, write ${%s} and set that variable "
    "(a literal would be stored in Dagster's run records and shown in the UI)"
)
SFTP = {"type": "sftp", "host": "sftp.example", "username": "hr", "password": "${HR_SFTP_PASSWORD}"}
S3 = {"type": "s3", "bucket": "b", "access_key_id": "AKIAEXAMPLE", "secret_access_key": "${S3_SECRET}"}
REPORT = {"type": "http_report", "url": "https://wd2.example/ccx/report", "token": "${REPORT_TOKEN}"}
AEP = {
    "type": "adobe_experience_platform",
    "client_id": "client-id",
    "client_secret": "${AEP_SECRET}",
    "org_id": "ORG@AdobeOrg",
}
DESTINATIONS: dict[str, dict[str, Any]] = {
    "cxi": BASE["destinations"]["cxi"],
    "aep": AEP,
    "ac": {"type": "altcraft", "base_url": "https://api.altcraft.example", "token": "${AC_TOKEN}"},
    "apsis": {"type": "apsis_one", "client_id": "apsis-client", "client_secret": "${APSIS_SECRET}"},
    "ym": {"type": "yesmail", "api_user": "ym-user", "api_key": "${YM_KEY}"},
}


def with_entry(section: str, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    data = config()
    data[section][name] = entry
    return data


@pytest.mark.parametrize(
    ("section", "name", "entry", "key", "variable"),
    [
        ("sources", "hr_sftp", SFTP, "password", "HR_SFTP_PASSWORD"),
        ("sources", "hr_sftp", SFTP, "private_key", "HR_SFTP_PRIVATE_KEY"),
        ("sources", "hr_sftp", SFTP, "private_key_passphrase", "HR_SFTP_PRIVATE_KEY_PASSPHRASE"),
        ("sources", "bucket", S3, "secret_access_key", "BUCKET_SECRET_ACCESS_KEY"),
        ("sources", "bucket", S3, "session_token", "BUCKET_SESSION_TOKEN"),
        ("sources", "workday", REPORT, "token", "WORKDAY_TOKEN"),
        ("sources", "workday", {**REPORT, "token": None, "username": "u"}, "password", "WORKDAY_PASSWORD"),
        ("destinations", "cxi", DESTINATIONS["cxi"], "api_key", "CXI_API_KEY"),
        ("destinations", "aep", AEP, "client_secret", "AEP_CLIENT_SECRET"),
        ("destinations", "aep", {**AEP, "client_secret": None}, "access_token", "AEP_ACCESS_TOKEN"),
        ("destinations", "aep", AEP, "s3_secret_access_key", "AEP_S3_SECRET_ACCESS_KEY"),
        ("destinations", "ac", DESTINATIONS["ac"], "token", "AC_TOKEN"),
        ("destinations", "apsis", DESTINATIONS["apsis"], "client_secret", "APSIS_CLIENT_SECRET"),
        ("destinations", "ym", DESTINATIONS["ym"], "api_key", "YM_API_KEY"),
    ],
)
def test_literal_secret_is_refused_naming_a_variable(
    tmp_path: Path, section: str, name: str, entry: dict[str, Any], key: str, variable: str
) -> None:
    entry = {k: v for k, v in {**entry, key: LITERAL}.items() if v is not None}

    message = load_error(write(tmp_path, with_entry(section, name, entry)))

    assert message.splitlines()[1:] == [f"  {section}.{name}.{key}: {SECRET_WHY % variable}"]
    assert "1 problem(s)" in message
    assert LITERAL not in message


def test_every_literal_secret_is_reported_at_once(tmp_path: Path) -> None:
    data = config()
    data["destinations"]["cxi"]["api_key"] = 12345678  # YAML reads it as a number: still a literal
    data["destinations"]["ym"] = {**DESTINATIONS["ym"], "api_key": LITERAL}

    message = load_error(write(tmp_path, data))

    assert "2 problem(s)" in message
    assert f"destinations.cxi.api_key: {SECRET_WHY % 'CXI_API_KEY'}" in message
    assert f"destinations.ym.api_key: {SECRET_WHY % 'YM_API_KEY'}" in message
    assert "12345678" not in message and LITERAL not in message


def test_interpolated_secret_is_still_a_literal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEY_PART", "abc123def456")
    data = config()
    data["destinations"]["cxi"]["api_key"] = "key-${TEST_KEY_PART}"

    message = load_error(write(tmp_path, data))

    assert SECRET_WHY % "CXI_API_KEY" in message and "abc123def456" not in message


def test_identifiers_may_be_literal(tmp_path: Path) -> None:
    data = config()
    data["sources"].update(hr_sftp=SFTP, bucket=S3)
    data["destinations"].update(DESTINATIONS)

    feeds = load_feeds(write(tmp_path, data))

    assert feeds.sources["hr_sftp"].username == "hr"
    assert feeds.sources["bucket"].access_key_id == "AKIAEXAMPLE"
    assert (feeds.destinations["aep"].client_id, feeds.destinations["aep"].org_id) == (
        "client-id",
        "ORG@AdobeOrg",
    )
    assert feeds.destinations["apsis"].client_id == "apsis-client"
    assert feeds.destinations["ym"].api_user == "ym-user"
    assert feeds.destinations["ym"].api_key == SecretRef(env_var="YM_KEY")


@pytest.mark.parametrize("value", ["not-a-url", "ftp://x", "", "https://", "https://host:port/", "http:// x"])
@pytest.mark.parametrize(
    ("section", "name", "entry", "key", "variable"),
    [
        ("destinations", "cxi", DESTINATIONS["cxi"], "base_url", "CXI_BASE_URL"),
        ("destinations", "aep", AEP, "base_url", "AEP_BASE_URL"),
        ("destinations", "aep", AEP, "ims_url", "AEP_IMS_URL"),
        ("destinations", "ym", DESTINATIONS["ym"], "base_url", "YM_BASE_URL"),
        ("sources", "workday", REPORT, "url", "WORKDAY_URL"),
        ("sources", "bucket", S3, "endpoint_url", "BUCKET_ENDPOINT_URL"),
    ],
)
def test_literal_endpoint_must_be_an_http_url(
    tmp_path: Path, value: str, section: str, name: str, entry: dict[str, Any], key: str, variable: str
) -> None:
    message = load_error(write(tmp_path, with_entry(section, name, {**entry, key: value})))

    assert message.splitlines()[1:] == [
        f"  {section}.{name}.{key}: {value!r} is not an http(s) URL; write an absolute address such as "
        f"https://api.example.com, or ${{{variable}}}"
    ]


def test_literal_endpoints_that_are_urls_load(tmp_path: Path) -> None:
    data = config()
    data["destinations"]["cxi"]["base_url"] = "http://127.0.0.1:8080/cxi"
    data["destinations"]["aep"] = {**AEP, "ims_url": "https://ims-na1.adobelogin.com"}
    data["sources"].update(workday=REPORT, bucket={**S3, "endpoint_url": "HTTPS://minio.internal:9000"})

    feeds = load_feeds(write(tmp_path, data))

    assert feeds.destinations["cxi"].base_url == "http://127.0.0.1:8080/cxi"
    assert feeds.sources["bucket"].endpoint_url == "HTTPS://minio.internal:9000"
    assert feeds.destinations["aep"].base_url == "https://platform.adobe.io"  # the default


def test_bad_endpoint_does_not_show_its_credentials(tmp_path: Path) -> None:
    data = config()
    data["destinations"]["cxi"]["base_url"] = "ftp://user:pa55word-9d1e@files.example"

    message = load_error(write(tmp_path, data))

    assert "pa55word-9d1e" not in message and "files.example" in message


ALERTS_TEXT = """
alerts:
  webhook_url: ${TEST_ALERTS_WEBHOOK}
  on: [blocked, timed_out]
  timeout_seconds: 3
"""


def test_alerts_block(tmp_path: Path) -> None:
    text = yaml.safe_dump(config(), sort_keys=False) + ALERTS_TEXT

    feeds = load_feeds(write(tmp_path, text))

    assert feeds.alerts == AlertsConfig(
        webhook_url=SecretRef(env_var="TEST_ALERTS_WEBHOOK"), on=["blocked", "timed_out"], timeout_seconds=3
    )
    assert SecretRef(env_var="TEST_ALERTS_WEBHOOK") in secret_refs(feeds)


def test_alerts_defaults_and_absence(tmp_path: Path) -> None:
    assert load_feeds(write(tmp_path, config())).alerts is None
    data = config()
    data["alerts"] = {"webhook_url": "${HOOK}"}

    alerts = load_feeds(write(tmp_path, data)).alerts

    assert alerts is not None
    assert alerts.on == ["needs_attention", "blocked", "refused", "timed_out"]
    assert alerts.timeout_seconds == 10


def test_alerts_mistakes(tmp_path: Path) -> None:
    data = config()
    data["alerts"] = {
        "webhook_url": "https://hooks.example/services/T0/B0/tok3n-e1f2",
        "on": ["blocked", "oops"],
    }
    data["feeds"][0]["alerts"] = {"webhook_url": "${OTHER_HOOK}"}

    message = load_error(write(tmp_path, data))

    assert "3 problem(s)" in message
    assert f"alerts.webhook_url: {SECRET_WHY % 'ALERTS_WEBHOOK_URL'}" in message
    assert "alerts.on[1]: Input should be 'needs_attention', 'blocked', 'refused' or 'timed_out'" in message
    assert "(got 'oops')" in message
    assert "feeds[0].alerts: unknown key" in message
    assert "tok3n-e1f2" not in message


def test_yes_and_no_keys_stay_names(tmp_path: Path) -> None:
    text = yaml.safe_dump(config(), sort_keys=False) + "alerts: {webhook_url: '${HOOK}', 'on': [refused]}\n"
    assert load_feeds(write(tmp_path, text)).alerts.on == ["refused"]
    text = yaml.safe_dump(config(), sort_keys=False) + "alerts: {webhook_url: '${HOOK}', yes: 1}\n"
    assert "alerts.yes: unknown key" in load_error(write(tmp_path, text))


def test_webhook_url_is_redacted_although_it_is_a_plain_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = "https://hooks.example.test/services/T01/B02/webhook-tok-81c4"
    monkeypatch.setenv("TEST_ALERTS_WEBHOOK", hook)
    monkeypatch.setenv("TEST_CXI_BASE_URL", "https://cxi.example.test/plain")
    feeds = load_feeds(write(tmp_path, yaml.safe_dump(config(), sort_keys=False) + ALERTS_TEXT))

    register_feed_secrets(feeds)

    assert redact(f"posting to {hook}") == "posting to ***"
    assert "https://cxi.example.test/plain" not in GLOBAL_REDACTOR


def test_retry_settings(tmp_path: Path) -> None:
    data = config()
    data["feeds"][0]["retries"] = {"max_attempts": 3, "backoff_seconds": 10}

    feed = load_feeds(write(tmp_path, data)).feeds[0]

    assert feed.retries == RetrySettings(max_attempts=3, backoff_seconds=10, max_backoff_seconds=3600)
    assert [feed.retries.delay(n) for n in (1, 2, 3)] == [10, 20, 40]
    default = RetrySettings()
    assert (default.max_attempts, default.backoff_seconds, default.max_backoff_seconds) == (5, 60, 3600)
    assert [default.delay(n) for n in (1, 2, 6, 7, 10_000)] == [60, 120, 1920, 3600, 3600]
    assert RetrySettings(backoff_seconds=0).delay(4) == 0
    with pytest.raises(ValueError, match="attempt counts from 1"):
        default.delay(0)


def test_retry_and_timeout_mistakes(tmp_path: Path) -> None:
    data = config()
    data["feeds"][0]["retries"] = {"max_attempts": 0, "backoff_seconds": -1, "max_backof_seconds": 5}
    data["destinations"]["cxi"].update(import_timeout_minutes=0, max_poll_errors=0)

    message = load_error(write(tmp_path, data))

    assert "5 problem(s)" in message
    assert "feeds[0].retries.max_attempts: Input should be greater than or equal to 1" in message
    assert "feeds[0].retries.backoff_seconds: Input should be greater than or equal to 0" in message
    assert "feeds[0].retries.max_backof_seconds: unknown key (check the spelling); did you mean" in message
    assert "destinations.cxi.import_timeout_minutes: Input should be greater than 0" in message
    assert "destinations.cxi.max_poll_errors: Input should be greater than or equal to 1" in message


def test_import_timeouts(tmp_path: Path) -> None:
    data = config()
    data["destinations"].update(DESTINATIONS)
    data["destinations"]["ym"] = {**DESTINATIONS["ym"], "import_timeout_minutes": 90, "max_poll_errors": 2}

    feeds = load_feeds(write(tmp_path, data))

    seconds = {name: import_timeout_seconds(d) for name, d in feeds.destinations.items()}
    assert seconds == {"cxi": 360 * 60, "aep": 1440 * 60, "ac": 360 * 60, "apsis": 720 * 60, "ym": 90 * 60}
    assert set(DEFAULT_IMPORT_TIMEOUT_MINUTES) == {d["type"] for d in DESTINATIONS.values()}
    assert feeds.destinations["ym"].max_poll_errors == 2
    assert feeds.destinations["cxi"].max_poll_errors == 5


def test_resources_build_without_the_new_settings(tmp_path: Path) -> None:
    import dagster as dg

    from audience_pipeline.destinations.registry import build_resource

    data = config()
    data["destinations"].update(DESTINATIONS)
    for entry in data["destinations"].values():
        entry.update(import_timeout_minutes=15, max_poll_errors=3)
    feeds = load_feeds(write(tmp_path, data))

    for destination in feeds.destinations.values():
        resource = build_resource(destination)
        assert isinstance(resource, dg.ConfigurableResource)
        assert "import_timeout_minutes" not in type(resource).model_fields
        assert "max_poll_errors" not in type(resource).model_fields

"""Before anything runs: which feeds are meant, and which of their ``${VAR}``s are missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from audience_pipeline.feeds.loader import FeedsFileError, check_environment, load_feeds, select_feeds
from audience_pipeline.feeds.model import FeedsFile

FEEDS_TEXT = """
sources:
  hr_drop: {type: folder, path: incoming}
  hr_sftp: {type: sftp, host: "${SFTP_HOST}", username: hr, password: "${SFTP_PASSWORD}"}
  unused: {type: folder, path: "${UNUSED_DIR_VAR_NEVER_SET}"}
destinations:
  cxi: {type: communicate_xi, base_url: "${CXI_BASE_URL}", api_key: "${CXI_API_KEY}"}
  ym: {type: yesmail, api_user: ym-user, api_key: "${YM_API_KEY}"}
  spare: {type: altcraft, base_url: "${SPARE_URL}", token: "${SPARE_TOKEN}"}
feeds:
  - {name: all_staff_cxi, source: hr_drop, destination: cxi, mapping: {unique_id: ID, email: Email},
     options: {import_name: All staff}}
  - {name: sftp_cxi, source: hr_sftp, destination: cxi, mapping: {unique_id: ID, email: Email},
     options: {import_name: From SFTP}}
  - {name: staff_ym, source: hr_drop, destination: ym, mapping: {unique_id: ID, email: Email},
     options: {target_list: all-staff}}
"""
FULL_ENV = {
    "SFTP_HOST": "sftp.example",
    "SFTP_PASSWORD": "sftp-pass-61b0",
    "CXI_BASE_URL": "https://cxi.example/api",
    "CXI_API_KEY": "cxi-key-2f9a",
    "YM_API_KEY": "ym-key-77d3",
}


@pytest.fixture
def feeds(tmp_path: Path) -> FeedsFile:
    path = tmp_path / "feeds.yaml"
    path.write_text(FEEDS_TEXT, "utf-8")
    return load_feeds(path)


def with_alerts(feeds: FeedsFile) -> FeedsFile:
    return FeedsFile.model_validate(
        {**feeds.model_dump(), "alerts": {"webhook_url": {"env_var": "ALERTS_HOOK"}, "on": ["blocked"]}}
    )


def test_select_feeds_keeps_only_what_the_named_feeds_use(feeds: FeedsFile) -> None:
    selected = select_feeds(feeds, ["staff_ym", "all_staff_cxi"])

    assert [f.name for f in selected.feeds] == ["all_staff_cxi", "staff_ym"]  # file order
    assert list(selected.sources) == ["hr_drop"]
    assert list(selected.destinations) == ["cxi", "ym"]
    assert selected.destinations["cxi"] == feeds.destinations["cxi"]


def test_select_feeds_without_names_takes_every_feed(feeds: FeedsFile) -> None:
    for names in (None, []):
        selected = select_feeds(feeds, names)
        assert [f.name for f in selected.feeds] == ["all_staff_cxi", "sftp_cxi", "staff_ym"]
        assert list(selected.sources) == ["hr_drop", "hr_sftp"]
        assert list(selected.destinations) == ["cxi", "ym"]


def test_select_feeds_keeps_the_alerts(feeds: FeedsFile) -> None:
    feeds = with_alerts(feeds)

    assert select_feeds(feeds, ["staff_ym"]).alerts == feeds.alerts


def test_unknown_feed_name_lists_the_known_ones(feeds: FeedsFile) -> None:
    with pytest.raises(FeedsFileError) as info:
        select_feeds(feeds, ["all_staff_cxi", "al_staff"])

    assert str(info.value) == "unknown feed 'al_staff'; known feeds: all_staff_cxi, sftp_cxi, staff_ym"
    with pytest.raises(FeedsFileError, match="unknown feeds 'a', 'b'"):
        check_environment(feeds, ["a", "b"], environ=FULL_ENV)


def test_a_complete_environment_has_no_problems(feeds: FeedsFile) -> None:
    assert check_environment(feeds, environ=FULL_ENV) == []


def test_missing_variables_one_line_per_feed(feeds: FeedsFile) -> None:
    environ = {k: v for k, v in FULL_ENV.items() if k not in ("CXI_API_KEY", "SFTP_PASSWORD")}

    lines = check_environment(feeds, environ=environ)

    not_set = "needs environment variable {}, which is not set"
    assert lines == [
        f"feed all_staff_cxi: destinations.cxi.api_key {not_set.format('CXI_API_KEY')}",
        f"feed sftp_cxi: sources.hr_sftp.password {not_set.format('SFTP_PASSWORD')}",
        f"feed sftp_cxi: destinations.cxi.api_key {not_set.format('CXI_API_KEY')}",
    ]
    assert lines[0] == (
        "feed all_staff_cxi: destinations.cxi.api_key needs environment variable CXI_API_KEY, "
        "which is not set"
    )


def test_only_the_selected_feeds_are_checked(feeds: FeedsFile) -> None:
    lines = check_environment(feeds, ["staff_ym"], environ={})

    assert lines == [
        "feed staff_ym: destinations.ym.api_key needs environment variable YM_API_KEY, which is not set"
    ]


@pytest.mark.parametrize("empty", ["", "   "])
def test_an_empty_value_is_not_set(feeds: FeedsFile, empty: str) -> None:
    lines = check_environment(feeds, ["staff_ym"], environ={**FULL_ENV, "YM_API_KEY": empty})

    assert lines == [
        "feed staff_ym: destinations.ym.api_key needs environment variable YM_API_KEY, which is not set"
    ]


@pytest.mark.parametrize("value", ["ftp://x", "not-a-url", "https://", "cxi.example/api"])
def test_an_endpoint_variable_must_hold_an_http_url(feeds: FeedsFile, value: str) -> None:
    lines = check_environment(feeds, ["all_staff_cxi"], environ={**FULL_ENV, "CXI_BASE_URL": value})

    assert lines == [
        f"feed all_staff_cxi: destinations.cxi.base_url: environment variable CXI_BASE_URL is {value!r}, "
        "not an http(s) URL"
    ]


def test_a_bad_endpoint_does_not_show_its_credentials(feeds: FeedsFile) -> None:
    environ = {**FULL_ENV, "CXI_BASE_URL": "ftp://user:pw-4c1d9e@files.example"}

    [line] = check_environment(feeds, ["all_staff_cxi"], environ=environ)

    assert "pw-4c1d9e" not in line and "CXI_BASE_URL is 'ftp://***@files.example'" in line


def test_non_url_values_are_not_checked_as_urls(feeds: FeedsFile) -> None:
    assert check_environment(feeds, ["sftp_cxi"], environ={**FULL_ENV, "SFTP_HOST": "10.0.0.5"}) == []


def test_alerts_are_checked_once_without_showing_the_webhook(feeds: FeedsFile) -> None:
    feeds = with_alerts(feeds)

    assert check_environment(feeds, environ=FULL_ENV) == [
        "alerts.webhook_url needs environment variable ALERTS_HOOK, which is not set"
    ]
    hook = "hooks.example/services/T0/B0/secret-tok-5a"
    assert check_environment(feeds, ["staff_ym"], environ={**FULL_ENV, "ALERTS_HOOK": hook}) == [
        "alerts.webhook_url: environment variable ALERTS_HOOK is not an http(s) URL (value not shown)"
    ]
    assert check_environment(feeds, environ={**FULL_ENV, "ALERTS_HOOK": "https://" + hook}) == []


def test_the_process_environment_is_the_default(feeds: FeedsFile, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YM_API_KEY", "ym-key-from-env-0e2c")
    assert check_environment(feeds, ["staff_ym"]) == []
    monkeypatch.delenv("YM_API_KEY")
    assert len(check_environment(feeds, ["staff_ym"])) == 1


def test_the_bundled_demo_names_its_variables() -> None:
    from audience_pipeline.feeds.loader import DEMO_FEEDS

    feeds = load_feeds(DEMO_FEEDS)
    lines = check_environment(feeds, ["all_staff_cxi"], environ={})

    prefix = "feed all_staff_cxi: destinations.cxi"
    assert lines == [
        f"{prefix}.base_url needs environment variable CXI_BASE_URL, which is not set",
        f"{prefix}.api_key needs environment variable CXI_API_KEY, which is not set",
    ]
    assert yaml.safe_load(DEMO_FEEDS.read_text("utf-8")).get("alerts") is None

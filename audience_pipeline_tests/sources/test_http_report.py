"""The report-URL source against a real HTTP server (Workday RaaS / BambooHR styles)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from audience_pipeline.sources import http_report
from audience_pipeline.sources.base import SourceUnavailable, stage
from audience_pipeline.sources.http_report import HttpReportSourceResource
from audience_pipeline_tests.sources.servers import ReportServer


@pytest.fixture
def report() -> Iterator[ReportServer]:
    server = ReportServer()
    server.state.body = b"Employee ID,Email\nE1,a@example.com\n"
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _basic(server: ReportServer, **overrides) -> HttpReportSourceResource:
    options = {
        "url": server.url + "?format=csv",
        "file_name": "all_workers.csv",
        "username": server.state.username,
        "password": server.state.password,
        "timeout_seconds": 5.0,
    }
    return HttpReportSourceResource(**{**options, **overrides})


def test_get_with_basic_auth_streams_into_staging(report: ReportServer, tmp_path: Path) -> None:
    report.state.body = os.urandom(2 * 1024 * 1024 + 5)
    source = _basic(report)

    staged = stage(source, "all_workers.csv", tmp_path)

    assert staged.sha256 == hashlib.sha256(report.state.body).hexdigest()
    assert Path(staged.path).read_bytes() == report.state.body
    assert report.state.requests[-1]["method"] == "GET"
    assert report.state.requests[-1]["query"] == {"format": "csv"}
    assert [f.name for f in source.list_files()] == ["all_workers.csv"]


def test_post_with_body_and_bearer_token(report: ReportServer, tmp_path: Path) -> None:
    source = HttpReportSourceResource(
        url=report.url,
        file_name="bamboo.csv",
        method="POST",
        body='{"fields": ["employeeNumber", "workEmail"]}',
        token=report.state.token,
    )

    staged = stage(source, "bamboo.csv", tmp_path)

    assert Path(staged.path).read_bytes() == report.state.body
    assert report.state.requests[-1]["body"] == '{"fields": ["employeeNumber", "workEmail"]}'


def test_rejected_credentials_are_an_error_without_them(report: ReportServer, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-report-pass-77ab10"
    with pytest.raises(SourceUnavailable, match="HTTP 401: Invalid credentials") as info:
        _basic(report, password=wrong, url=report.url + "?token=url-secret-0099").open("all_workers.csv")
    assert wrong not in str(info.value) and "url-secret-0099" not in str(info.value)
    assert wrong not in caplog.text and "url-secret-0099" not in caplog.text


def test_busy_server_is_retried_and_an_html_page_is_refused(report: ReportServer, tmp_path: Path) -> None:
    report.state.fail_with = [503, 429]
    staged = stage(_basic(report), "all_workers.csv", tmp_path)
    assert Path(staged.path).read_bytes() == report.state.body
    assert len(report.state.requests) == 3

    report.state.content_type = "text/html; charset=utf-8"
    with pytest.raises(SourceUnavailable, match="HTML page"):
        _basic(report).open("all_workers.csv")
    assert not list(tmp_path.glob("*.partial"))


def test_server_down_is_an_error_naming_the_url(report: ReportServer, monkeypatch) -> None:
    monkeypatch.setattr(http_report, "BACKOFF_SECONDS", 0.01)
    source = _basic(report)
    report.stop()
    with pytest.raises(SourceUnavailable, match=r"report GET http://127\.0\.0\.1:\d+/ccx/.*ConnectError"):
        source.open("all_workers.csv")


def test_only_the_configured_file_name_can_be_opened(report: ReportServer) -> None:
    with pytest.raises(FileNotFoundError):
        _basic(report).open("other.csv")


def _config(**source) -> dict:
    return {
        "sources": {"hr": {"type": "http_report", "url": "https://wd2.example/ccx/report", **source}},
        "destinations": {
            "cxi": {"type": "communicate_xi", "base_url": "http://x", "api_key": {"env_var": "CXI_API_KEY"}}
        },
        "feeds": [],
    }


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ({"token": {"env_var": "T"}, "username": "u", "password": {"env_var": "P"}}, "either 'token'"),
        ({"username": "u", "password": {"env_var": "P"}, "token": None, "url": "wd2.example/report"}, "http"),
        ({"token": "t"}, "a secret must come from the environment"),
        ({"username": "u"}, "both 'username' and 'password'"),
        ({"body": "{}"}, "'body' needs method: POST"),
        ({"file_name": "a/b.csv"}, "String should match pattern"),
        ({"schedule": "0 6 * *"}, "not a cron schedule"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone"),
    ],
)
def test_config_mistakes_are_refused(source: dict, problem: str) -> None:
    from pydantic import ValidationError

    from audience_pipeline.feeds.model import FeedsFile

    with pytest.raises(ValidationError, match=problem):
        FeedsFile.model_validate(_config(**source))


def test_secrets_reach_the_resource_as_env_vars() -> None:
    import dagster as dg

    from audience_pipeline.feeds.model import FeedsFile, SecretRef
    from audience_pipeline.sources.registry import build_source_resource

    config = FeedsFile.model_validate(
        _config(method="POST", body='{"fields": []}', token={"env_var": "BAMBOO_TOKEN"})
    ).sources["hr"]
    assert isinstance(config.token, SecretRef)

    resource = build_source_resource(config)

    assert isinstance(resource.token, dg.EnvVar) and resource.token == "BAMBOO_TOKEN"
    assert resource.method == "POST" and resource.file_name == "report.csv"

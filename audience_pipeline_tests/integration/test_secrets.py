"""No secret reaches a log line, a metadata value, a stored event or a report."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import dagster as dg
import pytest

from audience_pipeline.cli import SECRET_FIELD_SUFFIXES, random_credentials, run_demo
from audience_pipeline.sandbox import SandboxSettings
from audience_pipeline_tests.integration.conftest import DEMO_CSV, FEED, Pipeline

pytestmark = pytest.mark.integration


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _all_event_text(instance: dg.DagsterInstance) -> str:
    chunks = []
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id):
            chunks.append(entry.user_message or "")
            if entry.dagster_event is not None:
                chunks.append(repr(entry.dagster_event))
    return "\n".join(chunks)


def test_full_demo_run_leaks_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd, caplog
) -> None:
    settings = random_credentials(SandboxSettings(pace_seconds=0.05))
    secrets = [
        getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if f.name.endswith(SECRET_FIELD_SUFFIXES)
    ]
    assert len(secrets) >= 8 and all(len(s) >= 20 for s in secrets)
    for name in ("CXI_BASE_URL", "CXI_API_KEY"):
        monkeypatch.setenv(name, "unset")
    caplog.set_level(logging.DEBUG)

    code = run_demo(tmp_path, settings=settings)

    out, err = capfd.readouterr()
    assert code == 0, out + err
    assert "failure report:" in out and "192" in out
    assert (tmp_path / "dagster").is_dir() and list((tmp_path / "reports").rglob("failures.csv"))
    instance = dg.DagsterInstance.local_temp(tempdir=str(tmp_path / "dagster"))
    try:
        text = _all_event_text(instance)
    finally:
        instance.dispose()
    assert "failure_report" in text
    for secret in secrets:
        assert secret not in out and secret not in err
        assert secret not in caplog.text
        assert _files_containing(tmp_path, secret.encode()) == []
        assert secret not in text


def test_rejected_api_key_is_not_echoed(pipeline_factory, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    wrong = "wrong-key-5be0c3a7f9d2"
    monkeypatch.setenv("CXI_API_KEY", wrong)
    caplog.set_level(logging.DEBUG)
    pipeline: Pipeline = pipeline_factory()
    pipeline.drop("employees.csv", DEMO_CSV)

    runs = pipeline.ingest()

    assert runs[0].status == dg.DagsterRunStatus.FAILURE
    text = _all_event_text(pipeline.instance)
    assert "401" in text and "Invalid API Token key" in text
    assert wrong not in text
    assert wrong not in caplog.text
    assert _files_containing(pipeline.root, wrong.encode()) == []
    assert FEED in text

"""No secret reaches a log line, a metadata value, a stored event or a report."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import dagster as dg
import pytest

from audience_pipeline.cli import SECRET_FIELD_SUFFIXES, random_credentials, run_demo
from audience_pipeline.sandbox import SandboxSettings
from audience_pipeline_tests.integration.conftest import DEMO_CSV, FEED, PipelineFactory
from audience_pipeline_tests.integration.leaks import assert_not_leaked, event_text

pytestmark = pytest.mark.integration


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
    monkeypatch.delenv("DAGSTER_HOME", raising=False)  # the demo's own SQLite instance, read below
    caplog.set_level(logging.DEBUG)

    code = run_demo(tmp_path, settings=settings)

    out, err = capfd.readouterr()
    assert code == 0, out + err
    assert "failure report:" in out and "192" in out
    assert (tmp_path / "dagster").is_dir() and list((tmp_path / "reports").rglob("failures.csv"))
    instance = dg.DagsterInstance.local_temp(tempdir=str(tmp_path / "dagster"))
    try:
        text = event_text(instance)
    finally:
        instance.dispose()
    assert "failure_report" in text
    texts = {"stdout": out, "stderr": err, "logs": caplog.text, "events": text}
    assert_not_leaked(secrets, texts=texts, root=tmp_path)


def test_rejected_api_key_is_not_echoed(
    pipeline_factory: PipelineFactory, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    wrong = "wrong-key-5be0c3a7f9d2"
    monkeypatch.setenv("CXI_API_KEY", wrong)
    caplog.set_level(logging.DEBUG)
    pipeline = pipeline_factory()
    pipeline.drop("employees.csv", DEMO_CSV)

    runs = pipeline.ingest()

    assert runs[0].status == dg.DagsterRunStatus.FAILURE
    text = event_text(pipeline.instance)
    assert "401" in text and "Invalid API Token key" in text
    assert_not_leaked([wrong], texts={"events": text, "logs": caplog.text}, root=pipeline.root)
    assert FEED in text

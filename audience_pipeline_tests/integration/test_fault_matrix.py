"""Faults where they hurt, on the daemon's path: the feed's own sensors tick against a real Dagster
instance and a real Communicate XI sandbox that fails on purpose — before a request, and after
the vendor accepted it. Each scenario ends with the same proof (``assert_nothing_lost``): every
partition reached an end, the rows add up, the vendor started exactly one import per file
content, and every import has its report."""

from __future__ import annotations

import time

import dagster as dg
import httpx
import pytest

from audience_pipeline.assets import FeedKeys
from audience_pipeline.automation.alerts import ALERTS_SENSOR
from audience_pipeline_tests.integration.conftest import DEMO_CSV, FEED, Pipeline, PipelineFactory
from audience_pipeline_tests.integration.faults import (
    Webhook,
    assert_nothing_lost,
    cxi_feeds,
    imports_received,
    states,
    webhook,
)

pytestmark = pytest.mark.integration

FILE = "employees_2026-11-01.csv"


@pytest.fixture
def hook(monkeypatch: pytest.MonkeyPatch):
    with webhook() as hook:
        monkeypatch.setenv("ALERT_WEBHOOK_URL", hook.url)
        yield hook


def keys_of(pipeline: Pipeline) -> FeedKeys:
    return FeedKeys(pipeline.feeds.feeds[0], pipeline.feeds)


def settle(pipeline: Pipeline, *, timeout: float = 30.0, alerts: bool = True) -> None:
    """Tick every sensor as the daemon would until every partition has ended (or time is up)."""
    keys = keys_of(pipeline)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pipeline.driver.tick(f"{FEED}__new_files")
        pipeline.driver.tick(f"{FEED}__ingest_retries")
        pipeline.driver.tick(f"{FEED}__import_status")
        found = states(pipeline.instance, keys)
        if found and all(s.ended for s in found.values()):
            break
        time.sleep(0.05)
    if alerts:
        pipeline.driver.tick(ALERTS_SENSOR)


def start(pipeline_factory: PipelineFactory, **feeds_options) -> Pipeline:
    pipeline = pipeline_factory(feeds_text=cxi_feeds(**feeds_options))
    pipeline.drop(FILE, DEMO_CSV)
    return pipeline


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"kind": "status", "status": 503, "retry_after": 0, "times": 5}, id="5x503-on-create"),
        pytest.param({"kind": "status", "status": 401, "times": 1}, id="401-fixed-later"),
        pytest.param({"kind": "html", "times": 1}, id="html-200-before-create"),
    ],
)
def test_a_failed_ingest_is_retried_until_it_imports(
    pipeline_factory: PipelineFactory, hook: Webhook, fault: dict
) -> None:
    pipeline = start(pipeline_factory)
    pipeline.sandbox.add_fault(vendor="cxi", method="POST", path_contains="/audience-imports", **fault)

    first = pipeline.ingest()

    assert len(first) == 1 and not first[0].is_success
    state = states(pipeline.instance, keys_of(pipeline))[pipeline.partitions()[0]]
    assert state.state == "retrying" and state.attempts == 1
    settle(pipeline)
    found = assert_nothing_lost(pipeline.instance, keys_of(pipeline), pipeline.sandbox)
    assert [s.state for s in found.values()] == ["reported"]
    runs = pipeline.instance.get_runs()
    run_keys = sorted(r.tags.get("dagster/run_key", "") for r in runs if r.job_name == f"{FEED}__ingest")
    partition = pipeline.partitions()[0]
    assert run_keys == [partition, f"{partition}#attempt2"]
    assert hook.posts == []  # a retry that worked is not news


def test_a_bad_base_url_fixed_later_is_retried(
    pipeline_factory: PipelineFactory, hook: Webhook, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = start(pipeline_factory)
    good = pipeline.sandbox.vendor_url("cxi")
    monkeypatch.setenv("CXI_BASE_URL", "http://127.0.0.1:9/cxi")  # discard port: nothing listens

    assert not pipeline.ingest()[0].is_success
    monkeypatch.setenv("CXI_BASE_URL", good)
    settle(pipeline)

    assert_nothing_lost(pipeline.instance, keys_of(pipeline), pipeline.sandbox)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"kind": "drop", "after": True}, id="connection-dropped-after-create"),
        pytest.param({"kind": "html", "after": True}, id="html-200-after-create"),
        pytest.param({"kind": "delay", "after": True, "delay_seconds": 6}, id="read-timeout-after-create"),
    ],
)
def test_an_accepted_but_unanswered_create_is_adopted_not_sent_again(
    pipeline_factory: PipelineFactory, hook: Webhook, fault: dict
) -> None:
    pipeline = start(pipeline_factory)
    pipeline.sandbox.add_fault(vendor="cxi", method="POST", path_contains="/audience-imports", **fault)

    assert not pipeline.ingest()[0].is_success
    assert len(imports_received(pipeline.sandbox)) == 1  # the vendor has it; the pipeline does not know

    settle(pipeline)

    assert_nothing_lost(pipeline.instance, keys_of(pipeline), pipeline.sandbox)
    handle = pipeline.metadata("import_job")["job_handle"]
    assert handle["extra"]["adopted"] is True
    assert handle["jobs"][0]["job_id"] == pipeline.imports()[0]["asyncJobId"]
    assert pipeline.report_rows()  # the adopted import's report, with its failed rows


def test_a_second_file_is_not_taken_for_the_lost_one(
    pipeline_factory: PipelineFactory, hook: Webhook
) -> None:
    """After a good first file, a lost answer on the next file's PUT: the earlier job is known,
    the new one is adopted, and nothing is sent twice."""
    pipeline = start(pipeline_factory)
    settle(pipeline, alerts=False)
    changed = DEMO_CSV.read_text("utf-8").replace("Research &", "R&D &")
    pipeline.sandbox.add_fault(vendor="cxi", method="PUT", kind="drop", after=True)
    pipeline.drop("employees_2026-11-02.csv", changed)

    settle(pipeline)

    found = assert_nothing_lost(pipeline.instance, keys_of(pipeline), pipeline.sandbox)
    assert sorted(s.state for s in found.values()) == ["reported", "reported"]


def test_an_import_that_never_ends_times_out_with_every_row_reported(
    pipeline_factory: PipelineFactory, hook: Webhook
) -> None:
    pipeline = start(pipeline_factory, import_timeout_minutes=0.02)
    pipeline.control("cxi", "stall", {"stall": True})

    settle(pipeline)

    found = assert_nothing_lost(pipeline.instance, keys_of(pipeline), pipeline.sandbox)
    assert [s.detail for s in found.values()] == ["timed_out"]
    report = pipeline.metadata("failure_report")
    assert report["outcome"] == "timed_out" and report["failed_at_target"] == 194
    reasons = {r["reason"] for r in pipeline.report_rows() if r["stage"] == "target"}
    assert len(reasons) == 1 and "timed out after 1.2 s" in reasons.pop()
    assert len(hook.texts) == 1 and "import ended without the vendor's answer" in hook.texts[0]
    assert "secret-token" not in hook.texts[0]


def test_status_polls_that_keep_failing_end_the_import(
    pipeline_factory: PipelineFactory, hook: Webhook
) -> None:
    pipeline = start(pipeline_factory, max_poll_errors=3)
    pipeline.sandbox.add_fault(vendor="cxi", path_contains="/status", kind="html", times=100)

    settle(pipeline)

    assert_nothing_lost(pipeline.instance, keys_of(pipeline), pipeline.sandbox)
    report = pipeline.metadata("failure_report")
    assert report["outcome"] == "poll_failed"
    polls = pipeline.sandbox.requests(vendor="cxi", path_contains="/status")
    assert len(polls) == 3  # exactly max_poll_errors, then the pipeline stopped asking


def test_a_429_on_a_status_poll_does_not_hold_the_tick(
    pipeline_factory: PipelineFactory, hook: Webhook
) -> None:
    pipeline = start(pipeline_factory)
    pipeline.ingest()
    pipeline.sandbox.add_fault(
        vendor="cxi", path_contains="/status", kind="status", status=429, retry_after=120
    )

    started = time.monotonic()
    pipeline.driver.tick(f"{FEED}__import_status")

    assert time.monotonic() - started < 5
    settle(pipeline)
    assert_nothing_lost(pipeline.instance, keys_of(pipeline), pipeline.sandbox)


def test_a_report_run_that_fails_is_retried_once_the_fault_clears(
    pipeline_factory: PipelineFactory, hook: Webhook
) -> None:
    pipeline = start(pipeline_factory)
    pipeline.ingest()
    pipeline.sandbox.add_fault(vendor="cxi", path_contains="/failures", kind="html", times=2)

    settle(pipeline)

    assert_nothing_lost(pipeline.instance, keys_of(pipeline), pipeline.sandbox)
    report_runs = [r for r in pipeline.instance.get_runs() if r.job_name == f"{FEED}__report"]
    assert sorted(r.status.value for r in report_runs) == ["FAILURE", "FAILURE", "SUCCESS"]
    assert sorted(r.tags["dagster/run_key"].rpartition(":")[2] for r in report_runs) == [
        "ended",
        "ended#report2",
        "ended#report3",
    ]


def test_a_report_that_keeps_failing_needs_attention_and_alerts(
    pipeline_factory: PipelineFactory, hook: Webhook
) -> None:
    pipeline = start(pipeline_factory, max_attempts=2)
    pipeline.ingest()
    pipeline.sandbox.add_fault(vendor="cxi", path_contains="/failures", kind="html", times=100)

    settle(pipeline)

    found = states(pipeline.instance, keys_of(pipeline))
    assert [s.state for s in found.values()] == ["needs_attention"]
    assert "failure report failed 2 times" in next(iter(found.values())).detail
    assert len(hook.texts) == 1 and "needs attention" in hook.texts[0]
    pipeline.driver.tick(ALERTS_SENSOR)
    assert len(hook.texts) == 1  # announced once


def test_an_ingest_that_keeps_failing_needs_attention(
    pipeline_factory: PipelineFactory, hook: Webhook
) -> None:
    pipeline = start(pipeline_factory, max_attempts=2)
    pipeline.sandbox.add_fault(vendor="cxi", method="POST", kind="status", status=401, times=100)

    settle(pipeline)

    found = states(pipeline.instance, keys_of(pipeline))
    assert [s.state for s in found.values()] == ["needs_attention"]
    assert "ingest failed 2 times" in next(iter(found.values())).detail
    assert "401" in hook.texts[0]
    assert imports_received(pipeline.sandbox) == []
    sensor = pipeline.defs.resolve_sensor_def(f"{FEED}__ingest_retries")
    context = dg.build_sensor_context(instance=pipeline.instance, definitions=pipeline.defs)
    overview = sensor.evaluate_tick(context).skip_message  # what the sensor's tick shows in the UI
    partition = pipeline.partitions()[0]
    assert overview.startswith(f"1 needs_attention; {partition} needs attention: ingest failed")


def test_a_forced_reimport_gets_its_own_report_and_a_plain_rerun_says_it_reused(
    pipeline_factory: PipelineFactory, hook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = start(pipeline_factory)
    settle(pipeline, alerts=False)
    partition = pipeline.partitions()[0]
    first_key = pipeline.metadata("failure_report")["import_key"]
    job = pipeline.defs.resolve_job_def(f"{FEED}__ingest")

    assert job.execute_in_process(instance=pipeline.instance, partition_key=partition).success
    pipeline.driver.tick(f"{FEED}__import_status")
    assert pipeline.metadata("failure_report")["import_key"] == first_key  # no second report
    assert len(imports_received(pipeline.sandbox)) == 1

    forced = job.execute_in_process(
        instance=pipeline.instance,
        partition_key=partition,
        run_config={"ops": {f"{FEED}__import_job": {"config": {"force": True}}}},
    )
    assert forced.success
    settle(pipeline, alerts=False)

    second_key = pipeline.metadata("failure_report")["import_key"]
    assert second_key != first_key
    assert len(imports_received(pipeline.sandbox)) == 2


def test_the_alert_never_names_the_webhook_url(pipeline_factory: PipelineFactory, hook: Webhook) -> None:
    pipeline = start(pipeline_factory)
    pipeline.drop("broken.csv", b"PK\x03\x04 a workbook")
    hook.status = 500  # the first post fails: it is tried again next tick, not lost

    settle(pipeline)
    hook.status = 200
    pipeline.driver.tick(ALERTS_SENSOR)

    assert len(hook.posts) == 2 and hook.texts[0] == hook.texts[1]
    assert "broken.csv" in hook.texts[1] and "file refused" in hook.texts[1]
    assert all(hook.url not in text for text in hook.texts)
    with httpx.Client() as client:  # the receiver really was reachable on 127.0.0.1
        assert client.post(hook.url, json={"text": "ping"}).status_code == 200


def test_a_truncated_export_is_blocked_and_alerts_once(
    pipeline_factory: PipelineFactory, hook: Webhook
) -> None:
    """The changed-rows guard: 40 % of the employees left in one file is a truncated export until a
    person says otherwise; the alert says how many and how to accept it, and nothing is sent."""
    pipeline = start(pipeline_factory)
    settle(pipeline)
    assert hook.posts == []  # a good first file is not news
    lines = DEMO_CSV.read_text("utf-8").splitlines(keepends=True)
    writes_before = [r for r in pipeline.sandbox.requests(vendor="cxi") if r["method"] != "GET"]
    pipeline.drop("employees_2026-11-08.csv", "".join([lines[0], *lines[-80:]]))

    settle(pipeline)
    pipeline.driver.tick(ALERTS_SENSOR)

    found = states(pipeline.instance, keys_of(pipeline))
    assert sorted(s.state for s in found.values()) == ["blocked", "reported"]
    assert [r for r in pipeline.sandbox.requests(vendor="cxi") if r["method"] != "GET"] == writes_before
    assert len(hook.texts) == 1  # announced once, although the sensor ticked again
    text = hook.texts[0]
    assert "employees_2026-11-08.csv" in text and "blocked" in text
    assert "are missing from this file" in text and "accept_removals: true" in text

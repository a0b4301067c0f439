"""Changed-rows sync end to end against the sandbox: only what changed reaches Yesmail and
Altcraft (counted at the sandbox), failed rows go again, an unchanged file sends nothing and
says so, a new mapping sends everything once, and ``plan`` and ``dry_run`` call no vendor."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import dagster as dg
import pytest

from audience_pipeline.assets import REMOVED_CHECK, FeedKeys
from audience_pipeline.automation.lifecycle import feed_states
from audience_pipeline.cli import main
from audience_pipeline_tests.integration.conftest import DEMO_CSV, DEMO_MAPPING, Pipeline, PipelineFactory
from audience_pipeline_tests.integration.leaks import event_text

pytestmark = pytest.mark.integration

YESMAIL, ALTCRAFT = "staff_yesmail", "staff_altcraft"
HEADER = "Employee ID,Email,Mobile Phone,First Name,Last Name,Department,Start Date,Office City"
FEEDS_YAML = """\
sources:
  drop: {{type: folder, path: incoming, stable_after_seconds: 0}}
destinations:
  ym:
    type: yesmail
    base_url: ${{YESMAIL_BASE_URL}}
    api_user: ${{YESMAIL_API_USER}}
    api_key: ${{YESMAIL_API_KEY}}
  ac:
    type: altcraft
    base_url: ${{ALTCRAFT_BASE_URL}}
    token: ${{ALTCRAFT_TOKEN}}
feeds:
  - name: staff_yesmail
    source: drop
    destination: ym
{mapping}    options:
      target_list: all-staff
      attributes: {{FIRSTNAME: first_name, DEPARTMENT: department{extra}}}
  - name: staff_altcraft
    source: drop
    destination: ac
{mapping}    options:
      trigger_id: 13
      matching: custom
      field_name: EMPLOYEE_ID
      skip_triggers: true
"""


def export(
    n: int, *, changed: set[int] = frozenset(), unknown: set[int] = frozenset(), flip: bool = False
) -> str:
    """``n`` clean employees; ``changed`` ones moved to Support, ``unknown`` ones not Yesmail
    subscribers (they fail there), ``flip`` lists them backwards (new bytes, same rows)."""
    rows = [
        f"E{i:04d},{'unknown' if i in unknown else 'user'}{i}@acme-corp.com,+14155550100,First{i},Last{i},"
        f"{'Support' if i in changed else 'Sales'},2020-01-0{1 + i % 9},Austin"
        for i in range(n)
    ]
    return "\n".join([HEADER, *(reversed(rows) if flip else rows)]) + "\n"


def make(pipeline_factory: PipelineFactory, extra: str = "") -> Pipeline:
    text = FEEDS_YAML.format(mapping=DEMO_MAPPING, extra=extra)
    return pipeline_factory(YESMAIL, feeds_text=text, log_level="INFO", report_timeout=30.0)


def as_feed(pipeline: Pipeline, feed: str) -> Pipeline:
    return dataclasses.replace(pipeline, feed=feed)


def push(pipeline: Pipeline, name: str, content: str, feeds: tuple[str, ...] = (YESMAIL, ALTCRAFT)) -> None:
    """Drop a file, ingest it in every feed and wait for each feed's report."""
    pipeline.drop(name, content)
    for feed in feeds:
        runs = as_feed(pipeline, feed).ingest()
        assert len(runs) == 1 and runs[0].is_success, pipeline.step_failures(runs[0]) if runs else "no run"
        as_feed(pipeline, feed).wait_for_reports()


def yesmail_members(pipeline: Pipeline) -> list[list[str]]:
    """Member ids of each ticket Yesmail received, oldest first."""
    return [t["members"] for t in pipeline.control("yesmail", "/tickets")["tickets"]]


def altcraft_profiles(pipeline: Pipeline) -> list[int]:
    return [t["profiles"] for t in pipeline.control("altcraft", "/tasks")["tasks"]]


def received_since(before: list, after: list) -> list:
    return after[len(before) :]


def test_only_changed_rows_are_sent_and_an_unchanged_file_sends_nothing(pipeline_factory) -> None:
    pipeline = make(pipeline_factory)
    push(pipeline, "staff_1.csv", export(20))
    assert sum(map(len, yesmail_members(pipeline))) == 20 and sum(altcraft_profiles(pipeline)) == 20
    tickets, tasks = yesmail_members(pipeline), altcraft_profiles(pipeline)

    push(pipeline, "staff_2.csv", export(20, changed={3, 7, 11}))

    new_tickets = received_since(tickets, yesmail_members(pipeline))
    assert sorted(m for t in new_tickets for m in t) == [
        "user11@acme-corp.com",
        "user3@acme-corp.com",
        "user7@acme-corp.com",
    ]
    assert sum(received_since(tasks, altcraft_profiles(pipeline))) == 3
    for feed in (YESMAIL, ALTCRAFT):
        view = as_feed(pipeline, feed)
        job = view.metadata("import_job")
        assert (job["added"], job["changed"], job["unchanged_since_snapshot"], job["sent"]) == (0, 3, 17, 3)
        assert job["submitted_rows"] == 3
        assert "| E0003 | department |" in job["changed_preview"] and "Support" not in job["changed_preview"]
        report = view.metadata("failure_report")
        assert (report["imported"], report["unchanged"], report["source_rows"]) == (3, 17, 20)
        assert report["outcome"] == "completed" and view.accounting_passed()
    tickets, tasks = yesmail_members(pipeline), altcraft_profiles(pipeline)

    push(pipeline, "staff_3.csv", export(20, changed={3, 7, 11}, flip=True))

    assert yesmail_members(pipeline) == tickets and altcraft_profiles(pipeline) == tasks
    for feed in (YESMAIL, ALTCRAFT):
        view = as_feed(pipeline, feed)
        job = view.metadata("import_job")
        assert (job["sent"], job["unchanged_since_snapshot"], job["jobs"]) == (0, 20, "none")
        report = view.metadata("failure_report")
        assert (report["outcome"], report["unchanged"], report["imported"]) == ("unchanged", 20, 0)
        assert view.accounting_passed()
    assert "nothing changed since the snapshot" in event_text(pipeline.instance)


def test_rows_that_failed_are_sent_again(pipeline_factory) -> None:
    pipeline = make(pipeline_factory)
    push(pipeline, "staff_1.csv", export(10, unknown={4}), feeds=(YESMAIL,))
    first = pipeline.metadata("failure_report")
    assert (first["imported"], first["failed_at_target"]) == (9, 1)
    tickets = yesmail_members(pipeline)

    push(pipeline, "staff_2.csv", export(10, unknown={4}, changed={1}), feeds=(YESMAIL,))

    sent = sorted(m for t in received_since(tickets, yesmail_members(pipeline)) for m in t)
    assert sent == ["unknown4@acme-corp.com", "user1@acme-corp.com"]
    job = pipeline.metadata("import_job")
    assert (job["added"], job["changed"], job["sent"]) == (1, 1, 2)  # E0004 was never accepted: added
    report = pipeline.metadata("failure_report")
    assert (report["imported"], report["failed_at_target"], report["unchanged"]) == (1, 1, 8)
    assert pipeline.accounting_passed()


def test_a_changed_mapping_sends_everything_once(pipeline_factory) -> None:
    pipeline = make(pipeline_factory)
    push(pipeline, "staff_1.csv", export(10), feeds=(YESMAIL,))
    tickets = yesmail_members(pipeline)

    remapped = make(pipeline_factory, extra=", OFFICE_CITY: office_city")
    push(remapped, "staff_2.csv", export(10, flip=True), feeds=(YESMAIL,))

    assert sum(map(len, received_since(tickets, yesmail_members(remapped)))) == 10
    job = remapped.metadata("import_job")
    assert job["sent"] == 10 and "mapping or options changed" in job["sync_reason"]
    tickets = yesmail_members(remapped)

    push(remapped, "staff_3.csv", export(10), feeds=(YESMAIL,))

    assert yesmail_members(remapped) == tickets
    assert remapped.metadata("import_job")["sent"] == 0


def test_plan_and_dry_run_call_no_vendor(pipeline_factory, tmp_path: Path, capsys) -> None:
    pipeline = make(pipeline_factory)
    push(pipeline, "staff_1.csv", export(20))
    before = pipeline.sandbox.requests()
    changed = tmp_path / "next.csv"
    changed.write_text(export(18, changed={3, 7, 11}), "utf-8")
    args = ["plan", "--feeds", str(tmp_path / "feeds.yaml"), "--home", str(tmp_path / "home")]

    code = main([*args, "--file", str(changed)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("would send 3: 0 added, 3 changed; 15 unchanged not sent") == 2
    assert "removed since the snapshot: 2 (leavers are listed in the report" in out
    assert "changed: E0003 (department), E0007 (department), E0011 (department)" in out
    assert "check removed_rate_within_threshold: OK" in out and "dry run: nothing was sent" in out
    assert main([*args, "--feed", YESMAIL]) == 0  # the newest file in the source: already sent
    assert "would send 0" in capsys.readouterr().out

    partition = f"next.csv@{hashlib.sha256(changed.read_bytes()).hexdigest()[:10]}"
    pipeline.drop("next.csv", changed)
    pipeline.instance.add_dynamic_partitions(f"{YESMAIL}__files", [partition])
    run = pipeline.defs.resolve_job_def(f"{YESMAIL}__ingest").execute_in_process(
        instance=pipeline.instance,
        partition_key=partition,
        run_config={"ops": {f"{YESMAIL}__import_job": {"config": {"dry_run": True}}}},
    )

    assert run.success
    assert pipeline.sandbox.requests() == before
    assert pipeline.find_metadata("import_job", partition) is None
    observed = pipeline.instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=pipeline.key("import_job"), asset_partitions=[partition]), limit=1
    ).records[0]
    meta = {k: v.value for k, v in observed.asset_observation.metadata.items()}
    assert (meta["dry_run"], meta["changed"], meta["removed"], meta["sent"]) == (True, 3, 2, 3)
    keys = next(k for k in _keys(pipeline) if k.feed.name == YESMAIL)
    state = feed_states(pipeline.instance, keys, keys.feed.retries)[partition]
    assert (state.state, state.attempts) == ("discovered", 0)  # a dry run is no attempt


def test_a_truncated_export_is_blocked_for_every_vendor(pipeline_factory) -> None:
    pipeline = pipeline_factory(report_timeout=40.0)
    feeds = [f.name for f in pipeline.feeds.feeds]
    assert len(feeds) == 5
    push(pipeline, "employees_2026-11-01.csv", DEMO_CSV.read_text("utf-8"), feeds=tuple(feeds))
    lines = DEMO_CSV.read_text("utf-8").splitlines(keepends=True)
    before = pipeline.sandbox.requests()

    pipeline.drop("employees_2026-11-08.csv", "".join([lines[0], *lines[-80:]]))  # 40% of the rows
    for feed in feeds:
        assert len(as_feed(pipeline, feed).ingest()) == 1

    assert pipeline.sandbox.requests() == before
    for feed in feeds:
        view = as_feed(pipeline, feed)
        check = view.check("validated_rows", REMOVED_CHECK)
        assert check is not None and check.status.value == "FAILED"
        partition = view.partitions()[-1]
        assert view.find_metadata("import_job", partition) is None
        keys = next(k for k in _keys(pipeline) if k.feed.name == feed)
        state = feed_states(pipeline.instance, keys, keys.feed.retries)[partition]
        assert state.state == "blocked"
        assert "employees in the snapshot" in state.detail and "are missing from this file" in state.detail
        assert f"{feed}__validate: {{config: {{accept_removals: true}}}}" in state.detail

    for feed in ("all_staff_yesmail", "all_staff_cxi"):  # they really left: the re-run accepts it
        view = as_feed(pipeline, feed)
        partition = view.partitions()[-1]
        run = pipeline.defs.resolve_job_def(f"{feed}__ingest").execute_in_process(
            instance=pipeline.instance,
            partition_key=partition,
            run_config={"ops": {f"{feed}__validate": {"config": {"accept_removals": True}}}},
        )
        assert run.success
        view.wait_for_reports()
        report = view.metadata("failure_report", partition)
        leavers = [r for r in view.report_rows(partition) if r["outcome"] == "removed"]
        assert report["removed"] > 100 and view.accounting_passed()
        if feed == "all_staff_yesmail":  # per member: only the two rows that failed before; leavers listed
            assert report["sent"] == 2 and len(leavers) == report["removed"]
            assert leavers[0]["source_line"] == "" and "Yesmail" in leavers[0]["reason"]
        else:  # the file replaces the audience: sent whole, and it removes the leavers itself
            assert report["sent"] == 79 and leavers == []


def _keys(pipeline: Pipeline) -> list[FeedKeys]:
    return [FeedKeys(f, pipeline.feeds) for f in pipeline.feeds.feeds]

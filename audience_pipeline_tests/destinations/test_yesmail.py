"""YesmailClient against an in-test fake of the documented target-list import API.

The fake answers through ``httpx.MockTransport``: everything above the HTTP boundary (member
JSON, batching, 413 halving, ticket following, result mapping, redaction) is the real code.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import httpx
import pandas as pd
import pytest
from pydantic import ValidationError

from audience_pipeline.destinations import yesmail
from audience_pipeline.destinations.base import ChunkJob, JobHandle, JobState, SubmitIntent
from audience_pipeline.destinations.http import RetryPolicy, VendorAuthError, VendorHTTP, VendorHTTPError
from audience_pipeline.destinations.yesmail import (
    IGNORED_REASON,
    YesmailClient,
    YesmailOptions,
    YesmailResource,
)
from audience_pipeline_tests.destinations.fakes import fake_http
from audience_pipeline_tests.destinations.poll_retry import check_poll_retry

USER = "ym-unit-user-71c2"
KEY = "ym-unit-key-9d4e0a6b3f"
BASE = "https://api.yesmail.example/base"


@dataclass
class FakeYesmail:
    max_members: int = 1000
    tickets: dict[str, dict[str, Any]] = field(default_factory=dict)
    posts: list[dict[str, Any]] = field(default_factory=list)
    rejected_sizes: list[int] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    final_state: str = "completed"
    running_polls: int = 1
    state_of: dict[str, str] = field(default_factory=dict)
    ticket_location: str = f"{BASE}/v2/tickets/{{id}}"
    """``Content-Location`` of a 202 (``{id}`` = the ticket): absolute here, as the document shows."""
    results_location: str = f"{BASE}/v2/async-results/r{{id}}"
    ticket_paths: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("Api-User") != USER or request.headers.get("Api-Key") != KEY:
            return httpx.Response(
                401, json={"error": {"code": "unauthorized", "message": f"bad {request.headers}"}}
            )
        path = request.url.path
        if request.method == "POST" and path.endswith("/members/import"):
            payload = json.loads(request.content)
            members = payload["members"]
            with self.lock:
                if len(members) > self.max_members:
                    self.rejected_sizes.append(len(members))
                    return httpx.Response(413, json={"error": {"code": "too_large", "message": "too many"}})
                ticket_id = f"t{len(self.posts):04d}"
                self.posts.append(
                    {
                        "payload": payload,
                        "params": dict(request.url.params),
                        "path": request.url.raw_path.decode().split("?")[0],
                    }
                )
                self.tickets[ticket_id] = {
                    "members": members,
                    "polls": 0,
                    "ref": request.url.params["responseRef"],
                }
            return httpx.Response(
                202,
                json={"id": ticket_id, "state": "accepted"},
                headers={"Content-Location": self.ticket_location.format(id=ticket_id)},
            )
        if "/v2/tickets/" in path:
            self.ticket_paths.append(path)
        if path.startswith("/base/v2/tickets/"):
            ticket_id = path.rsplit("/", 1)[-1]
            ticket = self.tickets.get(ticket_id)
            if ticket is None:
                return httpx.Response(
                    404, json={"error": {"code": "not_found", "message": "no such resource"}}
                )
            ticket["polls"] += 1
            done = ticket["polls"] > self.running_polls
            state = self.state_of.get(ticket_id) or (self.final_state if done else "processing")
            body = {
                "id": ticket_id,
                "state": state,
                "message": "threshold reached" if state == "failed" else "working",
                "request": {"id": ticket["ref"], "user": USER},
                "response": {"location": self.results_location.format(id=ticket_id)} if done else None,
            }
            return httpx.Response(200, json=body)
        if path.startswith("/base/v2/async-results/r"):
            ticket_id = path.rsplit("/r", 1)[-1]
            return httpx.Response(200, json=self.results.get(ticket_id) or self._results(ticket_id))
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})

    def _results(self, ticket_id: str) -> dict[str, Any]:
        """Members whose id starts with 'bad' fail, 'old' are ignored, the rest complete."""
        members = self.tickets[ticket_id]["members"]
        failed = [
            {"index": i, "message": f"no {m['id']}"}
            for i, m in enumerate(members)
            if m["id"].startswith("bad")
        ]
        ignored = [{"index": i} for i, m in enumerate(members) if m["id"].startswith("old")]
        skip = {e["index"] for e in failed + ignored}
        completed = [{"index": i} for i in range(len(members)) if i not in skip]
        counts = {"requested": 0, "total": len(members), "completed": len(completed)}
        counts |= {"failed": len(failed), "ignored": len(ignored)}
        return {"counts": counts, "completed": completed, "failed": failed, "ignored": ignored}


def _client(
    fake: FakeYesmail, *, per_request: int = 1000, in_flight: int = 3, **options: Any
) -> YesmailClient:
    http = fake_http("yesmail", BASE, fake, headers={"Api-User": USER, "Api-Key": KEY})
    opts = YesmailOptions.model_validate({"target_list": "All Staff", **options})
    return YesmailClient(http, opts, max_members_per_request=per_request, max_in_flight=in_flight)


def _rows(ids: list[str | None]) -> pd.DataFrame:
    n = len(ids)
    return pd.DataFrame(
        {
            "unique_id": pd.Series([f"E{i}" for i in range(n)], dtype="str"),
            "email": pd.Series(ids, dtype="str"),
            "first_name": pd.Series([f'Ann "{i}"' if i % 2 else None for i in range(n)], dtype="str"),
            "last_name": pd.Series(["Lee"] * n, dtype="str"),
            "department": pd.Series(["Ops"] * n, dtype="str"),
            "source_line": range(2, n + 2),
        }
    ).set_axis(range(100, 100 + n))  # a filtered frame keeps its old index; positions matter


def _wait(client: YesmailClient, handle) -> None:
    for _ in range(10):
        if client.status(handle).state.terminal:
            return
    raise AssertionError("import did not end")


def test_members_payload_batches_and_response_ref() -> None:
    fake = FakeYesmail()
    client = _client(fake, per_request=4, import_type="ignore", error_threshold="5%")
    rows = _rows([f"p{i}@x.com" for i in range(10)])
    rows.loc[101, "email"] = "Mixed.Case@X.com"

    handle = client.submit(rows, feed="f", partition="file.csv@abc")

    assert [(j.first_row, j.row_count) for j in handle.jobs] == [(0, 4), (4, 4), (8, 2)]
    assert handle.submitted_rows == 10 and handle.vendor == "yesmail"
    first = sorted(fake.posts, key=lambda p: p["params"]["responseRef"])[0]
    assert first["path"] == "/base/v2/target-lists/All%20Staff/members/import"
    assert first["payload"]["importType"] == "ignore" and first["payload"]["errorThreshold"] == "5%"
    members = first["payload"]["members"]
    assert members[0] == {"id": "p0@x.com", "LASTNAME": "Lee"}
    assert members[1] == {"id": "mixed.case@x.com", "FIRSTNAME": 'Ann "1"', "LASTNAME": "Lee"}
    refs = sorted(p["params"]["responseRef"] for p in fake.posts)
    assert refs == ["f:file.csv@abc:0", "f:file.csv@abc:4", "f:file.csv@abc:8"]
    assert handle.extra["ticket_url"] == f"{BASE}/v2/tickets/{{id}}"


def test_response_uri_and_ref_travel_in_the_query_string_intact() -> None:
    fake = FakeYesmail()
    hook = "https://hooks.example/yesmail?feed=all staff&k=a/b"
    client = _client(fake, response_uri=hook)

    client.submit(_rows(["a@x.com", "b@x.com"]), feed="all_staff", partition="hr/2026-11 staff.csv@9f")

    (post,) = fake.posts
    assert post["params"] == {"responseRef": "all_staff:hr/2026-11 staff.csv@9f:0", "responseUri": hook}


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        (["a@x.com", "b@y.org"], ["a@x.com", "b@y.org"]),  # already lower case: sent as they are
        (["Mixed.Case@X.com", "EMP-01"], ["mixed.case@x.com", "EMP-01"]),  # only emails are lowered
        (["ÜNÏ@Ëx.com", "ÄBC"], ["ünï@ëx.com", "ÄBC"]),  # non-ASCII takes the Unicode path
    ],
)
def test_member_ids_lower_case_emails_only(ids: list[str], expected: list[str]) -> None:
    client = _client(FakeYesmail(), attributes={})
    members = [json.loads(m) for m in client.members(_rows(ids)).to_pylist()]
    assert [m["id"] for m in members] == expected


def test_status_follows_tickets_and_outcome_maps_indexes_to_rows() -> None:
    fake = FakeYesmail(running_polls=1)
    client = _client(fake, per_request=3)
    ids = ["a@x.com", "bad1@x.com", "old1@x.com", "b@x.com", "c@x.com", "bad2@x.com", "old2@x.com"]
    handle = client.submit(_rows(ids), feed="f", partition="p")

    first = client.status(handle)
    assert first.state is JobState.RUNNING and first.vendor_status == "processing"
    _wait(client, handle)
    final = client.status(handle)
    assert final.state is JobState.SUCCEEDED and final.vendor_status == "completed" and final.progress == 100

    outcome = client.outcome(handle)

    got = [(f.row, f.outcome, f.reason) for f in outcome.failures]
    assert got == [
        (1, "failed", "no bad1@x.com"),
        (2, "ignored", IGNORED_REASON),
        (5, "failed", "no bad2@x.com"),
        (6, "ignored", IGNORED_REASON),
    ]
    assert (outcome.imported, outcome.failed, outcome.ignored) == (3, 2, 2)
    assert outcome.vendor_counts["processed"] == 3 and outcome.vendor_counts["total"] == 7


def test_413_halves_the_batch_and_later_batches_stay_small() -> None:
    fake = FakeYesmail(max_members=3)
    client = _client(fake, per_request=10, in_flight=1)

    handle = client.submit(_rows([f"m{i}@x.com" for i in range(25)]), feed="f", partition="p")

    sizes = [j.row_count for j in handle.jobs]
    assert sum(sizes) == 25 and max(sizes) <= 3
    assert [j.first_row for j in handle.jobs] == sorted(j.first_row for j in handle.jobs)
    assert handle.jobs[0].first_row == 0
    assert all(
        a.first_row + a.row_count == b.first_row for a, b in zip(handle.jobs, handle.jobs[1:], strict=False)
    )
    # 10 -> 5 -> 3: two 413s for the first batch, then no more than one per later batch at most.
    assert fake.rejected_sizes[:2] == [10, 5] and len(fake.rejected_sizes) <= 4
    assert client.members_per_request == 3
    posted = [
        m["id"]
        for p in sorted(fake.posts, key=lambda p: int(p["params"]["responseRef"].split(":")[-1]))
        for m in p["payload"]["members"]
    ]
    assert posted == [f"m{i}@x.com" for i in range(25)]


def test_a_single_member_413_is_an_error() -> None:
    client = _client(FakeYesmail(max_members=0), per_request=2)
    with pytest.raises(Exception, match="413"):
        client.submit(_rows(["a@x.com", "b@x.com"]), feed="f", partition="p")


def test_failed_ticket_without_results_fails_all_its_rows_and_stopped_members_fail() -> None:
    fake = FakeYesmail(final_state="failed", running_polls=0)
    client = _client(fake, per_request=2)
    handle = client.submit(_rows(["a@x.com", "bad@x.com", "c@x.com", "d@x.com"]), feed="f", partition="p")
    # ticket 0: stopped after member 1 (member 0 completed); ticket 1: no results at all.
    first = next(t for t, v in fake.tickets.items() if v["ref"].endswith(":0"))
    second = next(t for t in fake.tickets if t != first)
    fake.results[first] = {
        "counts": {"requested": 0, "total": 2, "completed": 1, "failed": 1, "ignored": 0},
        "completed": [{"index": 0}],
        "failed": [{"index": 1, "message": "Subscriber does not exist"}],
        "ignored": [],
    }

    def no_results(request: httpx.Request, inner=fake) -> httpx.Response:
        response = inner(request)
        if request.url.path.endswith(second):
            body = json.loads(response.content)
            body["response"] = None
            return httpx.Response(200, json=body)
        return response

    client.http._client._transport = httpx.MockTransport(no_results)
    status = client.status(handle)
    assert status.state is JobState.FAILED and status.vendor_status == "failed"

    outcome = client.outcome(handle)

    got = [(f.row, f.reason) for f in outcome.failures]
    assert got == [
        (1, "Subscriber does not exist"),
        (2, "Yesmail ticket failed: threshold reached"),
        (3, "Yesmail ticket failed: threshold reached"),
    ]
    assert outcome.imported == 1 == outcome.vendor_counts["processed"]


def test_unprocessed_members_of_a_stopped_ticket_fail() -> None:
    fake = FakeYesmail(final_state="failed", running_polls=0)
    client = _client(fake)
    handle = client.submit(_rows(["a@x.com", "bad@x.com", "c@x.com"]), feed="f", partition="p")
    (ticket_id,) = fake.tickets
    fake.results[ticket_id] = {
        "counts": {"requested": 1, "total": 3, "completed": 1, "failed": 1, "ignored": 0},
        "completed": [{"index": 0}],
        "failed": [{"index": 1, "message": "no such subscriber"}],
        "ignored": [],
    }
    outcome = client.outcome(handle)
    assert [(f.row, f.reason) for f in outcome.failures] == [
        (1, "no such subscriber"),
        (2, "not imported: Yesmail stopped this batch (threshold reached)"),
    ]


def test_options_validation_and_column_problems() -> None:
    assert YesmailOptions(target_list="l", error_threshold="12.5%").error_threshold == "12.5%"
    for bad in ("0%", "100%", "five", -1):
        with pytest.raises(ValidationError):
            YesmailOptions(target_list="l", error_threshold=bad)
    with pytest.raises(ValidationError):
        YesmailOptions(target_list="l", import_type="replace")
    columns = ["unique_id", "email", "first_name"]
    assert YesmailOptions(target_list="l").column_problems(columns) == []
    problems = YesmailOptions(target_list="l", id_field="phone", attributes={"X": "nope"}).column_problems(
        columns
    )
    assert [key for key, _ in problems] == ["id_field", "attributes"]


def test_credentials_never_reach_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakeYesmail()
    headers = {"Api-User": USER, "Api-Key": "wrong-key-3e8c1d"}
    http = fake_http("yesmail", BASE, fake, headers=headers, retry=RetryPolicy(attempts=1))
    client = YesmailClient(http, YesmailOptions(target_list="l"))
    with pytest.raises(VendorAuthError) as info:
        client.submit(_rows(["a@x.com"]), feed="f", partition="p")
    text = str(info.value) + caplog.text
    assert "401" in str(info.value)
    assert "wrong-key-3e8c1d" not in text and USER not in text


def test_resource_builds_a_client_with_the_account_limits() -> None:
    resource = YesmailResource(
        base_url=BASE, api_user=USER, api_key=KEY, max_in_flight=2, max_members_per_request=7
    )
    client = resource.destination({"target_list": "l"})
    try:
        assert client.max_in_flight == 2 and client.members_per_request == 7
        assert client.options.import_type == "update"
    finally:
        client.close()


def test_an_unknown_ticket_state_makes_the_import_unknown_and_is_named() -> None:
    fake = FakeYesmail(running_polls=0, state_of={"t0001": "on_hold"})
    client = _client(fake, per_request=2)
    handle = client.submit(_rows(["a@x.com", "b@x.com", "c@x.com", "d@x.com"]), feed="f", partition="p")
    assert [job.job_id for job in handle.jobs] == ["t0000", "t0001"]

    status = client.status(handle)
    assert (status.state, status.vendor_status) == (JobState.UNKNOWN, "on_hold")
    assert "1/2 tickets ended" in status.detail and "on_hold" in status.detail

    fake.state_of.clear()
    assert client.status(handle).state is JobState.SUCCEEDED


@pytest.mark.parametrize(
    ("import_type", "resend"), [("update", "importType update upserts"), ("ignore", "importType ignore")]
)
def test_reconcile_cannot_tell_and_says_why_a_resend_is_safe(import_type: str, resend: str) -> None:
    fake = FakeYesmail()
    intent = SubmitIntent(feed="f", partition="p", sha256="0" * 64, attempt=2, recorded_at=0.0, rows=1)
    found = _client(fake, import_type=import_type).reconcile(intent, _rows(["a@x.com"]))
    assert (found.handle, found.certain) == (None, False)
    assert found.detail.startswith("yesmail: the document has no way to list the tickets")
    assert resend in found.detail and fake.posts == []


def test_the_retry_policy_reaches_the_http_client_so_a_sensor_429_raises_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def limited(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "3600"}, json={"error": {"message": "slow"}})

    sleeps: list[float] = []

    def wired(*args: Any, **kwargs: Any) -> VendorHTTP:
        return VendorHTTP(*args, **kwargs, transport=httpx.MockTransport(limited), sleep=sleeps.append)

    monkeypatch.setattr(yesmail, "VendorHTTP", wired)
    resource = YesmailResource(base_url=BASE, api_user=USER, api_key=KEY)
    job = ChunkJob(job_id="t1", first_row=0, row_count=1)
    handle = JobHandle(vendor="yesmail", feed="f", partition="p", jobs=[job], submitted_rows=1)

    check_poll_retry(lambda retry: resource.destination({"target_list": "l"}, retry=retry), handle, sleeps)


@pytest.mark.parametrize(
    ("ticket_location", "results_location"),
    [
        pytest.param("/base/v2/tickets/{id}", "/base/v2/async-results/r{id}", id="absolute-path"),
        pytest.param("../../../tickets/{id}", "../async-results/r{id}", id="relative"),
        pytest.param(f"{BASE}/v2/tickets/{{id}}", f"{BASE}/v2/async-results/r{{id}}", id="absolute-url"),
    ],
)
def test_ticket_and_results_locations_resolve_against_the_request_url_under_a_path_prefix(
    ticket_location: str, results_location: str
) -> None:
    """BASE has a path prefix (``/base``, a gateway's): it must not be put in front twice."""
    fake = FakeYesmail(running_polls=0, ticket_location=ticket_location, results_location=results_location)
    client = _client(fake)
    handle = client.submit(_rows(["a@x.com", "bad1@x.com"]), feed="f", partition="p")

    assert handle.extra["ticket_url"] == f"{BASE}/v2/tickets/{{id}}"
    assert client.status(handle).state is JobState.SUCCEEDED
    assert fake.ticket_paths == ["/base/v2/tickets/t0000"]
    assert [(f.row, f.reason) for f in client.outcome(handle).failures] == [(1, "no bad1@x.com")]


def test_a_ticket_answering_404_raises_a_permanent_error_naming_the_ticket() -> None:
    """Each poll of an unknown ticket raises a 4xx the status sensor counts as a permanent poll
    error (the count lives in its cursor); at ``max_poll_errors`` in a row the import ends
    ``poll_failed`` with this message as the reason, instead of waiting for the time limit."""
    fake = FakeYesmail(running_polls=5)
    handle = _client(fake, per_request=1).submit(_rows(["a@x.com", "b@x.com"]), feed="f", partition="p")
    del fake.tickets["t0001"]  # expired, or never Yesmail's

    for _ in range(3):  # a new client per poll, as the sensor builds one per tick
        with pytest.raises(VendorHTTPError) as caught:
            _client(fake).status(handle)
        assert type(caught.value) is VendorHTTPError and caught.value.status == 404
        assert "ticket t0001 not found: no such resource" in str(caught.value)
        assert "/base/v2/tickets/t0001 -> 404 not_found" in str(caught.value)


def test_outcome_does_not_poll_tickets_status_already_read_ended() -> None:
    fake = FakeYesmail(running_polls=0)
    client = _client(fake, per_request=2)
    handle = client.submit(_rows(["a@x.com", "bad@x.com", "c@x.com"]), feed="f", partition="p")
    status = client.status(handle)
    assert status.state is JobState.SUCCEEDED and len(fake.ticket_paths) == 2

    outcome = client.outcome(handle, status=status)

    assert len(fake.ticket_paths) == 2  # results only, from the tickets status() read
    assert [f.row for f in outcome.failures] == [1] and outcome.imported == 2
    # A new client (the report's process) reads each ticket once: only it points to the results.
    assert _client(fake).outcome(handle, status=status).imported == 2
    assert sorted(fake.ticket_paths[2:]) == ["/base/v2/tickets/t0000", "/base/v2/tickets/t0001"]

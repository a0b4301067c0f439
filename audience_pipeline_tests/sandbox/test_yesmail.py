"""The Yesmail emulation: member rules (unit) and the HTTP protocol the client relies on (real server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from audience_pipeline.sandbox import SandboxServer, SandboxSettings
from audience_pipeline.sandbox.yesmail import TargetList, member_error, parse_threshold, run_members
from audience_pipeline_tests.sandbox.polling import poll_until

PACE = 0.05
USER, KEY = "ym-sandbox-user-1", "ym-sandbox-key-2"
IMPORT = "/v2/target-lists/all-staff/members/import"


@pytest.fixture
def sandbox_settings() -> SandboxSettings:
    return SandboxSettings(
        pace_seconds=PACE, yesmail_api_user=USER, yesmail_api_key=KEY, yesmail_max_members=5
    )


@pytest.fixture
def ym(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    headers = {"Api-User": USER, "Api-Key": KEY}
    with httpx.Client(base_url=sandbox.vendor_url("yesmail"), headers=headers, timeout=5) as client:
        yield client


def _body(members: list[Any], import_type: str = "update", **extra: Any) -> bytes:
    return json.dumps({"importType": import_type, **extra, "members": members}).encode()


def _follow(client: httpx.Client, location: str) -> list[dict[str, Any]]:
    def fetch() -> dict[str, Any]:
        response = client.get(location)
        assert response.status_code == 200, response.text
        return response.json()

    return poll_until(
        fetch, lambda t: t["state"] in ("completed", "failed"), what="ticket", timeout=5, interval=PACE / 5
    )


def test_member_rules() -> None:
    assert member_error({"id": "ann@acme.com"}) is None
    assert member_error({"id": "12345"}) is None
    assert member_error({}) == "Member has no id"
    assert member_error({"id": ""}) == "Member has no id"
    assert member_error("x") == "Member must be a JSON object"
    assert "lower case" in member_error({"id": "Ann@acme.com"})
    assert "does not exist" in member_error({"id": "ann@acme.invalid"})
    assert "does not exist" in member_error({"id": "unknown.person@acme.com"})
    assert "does not exist" in member_error({"id": "unknown-42"})
    assert member_error({"id": "a@acme.com", "X": "SANDBOX_FAIL: quarantined"}) == "quarantined"


def test_thresholds_and_ignore() -> None:
    assert parse_threshold(None) == ("count", 0)
    assert parse_threshold("5%") == ("percent", 5.0)
    for bad in ("0%", "100%", -1, True, "x"):
        with pytest.raises(ValueError):
            parse_threshold(bad)
    target = TargetList("l", {"old@acme.com": {"A": "1"}})
    members = [{"id": "old@acme.com", "A": "2"}, {"id": "new@acme.com"}, {"id": "x@acme.test"}]
    ignored = run_members(members, target, "ignore", ("count", 0))
    assert (ignored.completed, ignored.ignored, [i for i, _ in ignored.failed]) == ([1], [0], [2])
    assert target.members["old@acme.com"] == {"A": "1"}
    run_members(members, target, "update", ("count", 0))
    assert target.members["old@acme.com"] == {"A": "2"}
    stopped = run_members(
        [{"id": "a@x.test"}, {"id": "b@x.com"}, {"id": "c@x.test"}], TargetList("m"), "update", ("count", 1)
    )
    assert (
        stopped.stopped
        and stopped.failed == [(0, "Subscriber 'a@x.test' does not exist")]
        and not stopped.completed
    )


def test_import_ticket_lifecycle_and_results(ym: httpx.Client) -> None:
    members = [
        {"id": "ann@acme.com", "FIRSTNAME": "Ann"},
        {"id": "Bob@acme.com"},
        {"id": "cy@acme.invalid"},
        {},
    ]
    response = ym.post(IMPORT, params={"responseRef": "feed:part:0"}, content=_body(members))

    assert response.status_code == 202, response.text
    location = response.headers["Content-Location"]
    assert location.startswith(ym.base_url.join("/yesmail/v2/tickets/").__str__().rstrip("/"))
    accepted = response.json()
    assert accepted["state"] == "accepted" and accepted["response"] is None
    assert accepted["request"]["id"] == "feed:part:0" and accepted["request"]["user"] == USER

    seen = _follow(ym, location)

    states = [s["state"] for s in seen]
    assert states[0] in ("accepted", "processing") and states[-1] == "completed"
    assert len(seen) >= 3, "a ticket takes a few polls"
    final = seen[-1]
    assert [e["state"] for e in final["events"]] == ["accepted", "processing", "processing", "completed"]
    results = ym.get(final["response"]["location"]).json()
    assert results["counts"] == {"requested": 0, "total": 4, "completed": 1, "ignored": 0, "failed": 3}
    assert [e["index"] for e in results["completed"]] == [0]
    assert [(e["index"], e["message"]) for e in results["failed"]] == [
        (1, "Email id 'Bob@acme.com' must be in lower case"),
        (2, "Subscriber 'cy@acme.invalid' does not exist"),
        (3, "Member has no id"),
    ]
    listed = ym.get("/v2/target-lists/all-staff")
    assert listed.json() == {"name": "all-staff", "memberCount": 1} and listed.headers["ETag"]


def test_ignore_marks_members_already_on_the_list(ym: httpx.Client, sandbox: SandboxServer) -> None:
    httpx.put(f"{sandbox.url}/_sandbox/yesmail/target-lists/all-staff", json={"members": ["ann@acme.com"]})
    response = ym.post(IMPORT, content=_body([{"id": "ann@acme.com"}, {"id": "bob@acme.com"}], "ignore"))
    final = _follow(ym, response.headers["Content-Location"])[-1]
    results = ym.get(final["response"]["location"]).json()
    assert results["ignored"] == [{"index": 0}] and [e["index"] for e in results["completed"]] == [1]


def test_error_threshold_fails_the_ticket_and_leaves_the_rest_unprocessed(ym: httpx.Client) -> None:
    members = [{"id": "a@acme.com"}, {"id": "b@x.test"}, {"id": "c@x.test"}, {"id": "d@acme.com"}]
    response = ym.post(IMPORT, content=_body(members, errorThreshold=2))
    final = _follow(ym, response.headers["Content-Location"])[-1]
    assert final["state"] == "failed" and "errorThreshold 2" in final["message"]
    results = ym.get(final["response"]["location"]).json()
    assert results["counts"] == {"requested": 1, "total": 4, "completed": 1, "ignored": 0, "failed": 2}


def test_retrying_phase(ym: httpx.Client, sandbox: SandboxServer) -> None:
    httpx.post(f"{sandbox.url}/_sandbox/yesmail/retrying", json={"times": 1})
    response = ym.post(IMPORT, content=_body([{"id": "a@acme.com"}]))
    seen = _follow(ym, response.headers["Content-Location"])
    events = [e["state"] for e in seen[-1]["events"]]
    assert events == ["accepted", "processing", "processing", "retrying", "processing", "completed"]


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Api-Key": "wrong"}, _body([]), 401),
        ({"Api-User": "wrong"}, _body([]), 401),
        ({}, _body([{"id": f"m{i}@acme.com"} for i in range(6)]), 413),
        ({}, b"not json", 400),
        ({}, _body([], "replace"), 400),
        ({}, _body([], errorThreshold="150%"), 400),
        ({}, json.dumps({"members": [], "importType": "update"}).encode(), 202),
        ({"If-Match": '"stale"'}, _body([]), 409),
    ],
)
def test_request_errors(ym: httpx.Client, headers: dict, body: bytes, status: int) -> None:
    response = ym.post(IMPORT, content=body, headers=headers)
    assert response.status_code == status, response.text
    if status != 202:
        assert set(response.json()["error"]) == {"code", "message"}
        assert KEY not in response.text


def test_if_match_with_the_current_etag_is_accepted_and_unknown_list_is_404(ym: httpx.Client) -> None:
    etag = ym.get("/v2/target-lists/all-staff").headers["ETag"]
    assert (
        ym.post(IMPORT, content=_body([{"id": "a@acme.com"}]), headers={"If-Match": etag}).status_code == 202
    )
    assert ym.post("/v2/target-lists/nope/members/import", content=_body([])).status_code == 404
    assert ym.get("/v2/tickets/nope").status_code == 404


def test_oversized_body_is_413(sandbox: SandboxServer) -> None:
    small = SandboxSettings(
        pace_seconds=PACE, yesmail_api_user=USER, yesmail_api_key=KEY, max_upload_bytes=100
    )
    with SandboxServer(small) as tiny:
        headers = {"Api-User": USER, "Api-Key": KEY}
        url = tiny.vendor_url("yesmail") + IMPORT
        response = httpx.post(url, content=_body([{"id": "a@acme.com", "X": "y" * 200}]), headers=headers)
        assert response.status_code == 413


def test_a_body_that_proves_malformed_later_fails_its_ticket(ym: httpx.Client) -> None:
    response = ym.post(IMPORT, content=b'{"importType":"update","members":[{"id":"a{"}')
    assert response.status_code == 202, "the cheap ingest path does not parse members"
    final = _follow(ym, response.headers["Content-Location"])[-1]
    assert final["state"] == "failed" and final["message"].startswith("Malformed request body")
    assert final["response"] is None

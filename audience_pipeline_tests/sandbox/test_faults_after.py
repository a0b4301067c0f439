"""Faults that act after the vendor accepted a request, the request log that proves what it received,
and CXI's stall switch: the sandbox side of "no duplicate, nothing lost"."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from audience_pipeline.sandbox import SandboxServer
from audience_pipeline.sandbox.faults import FaultRegistry, parse_fault

LIST = "/public-api/audience-imports"
LIST_PATH = f"/cxi{LIST}"
PREFIXES = {"cxi": "/cxi"}
CSV = b"Email\nann@example.com\nbob@example.com\n"


def create(client: httpx.Client, name: str = "Staff") -> httpx.Response:
    return client.post(
        LIST, data={"name": name, "emailFieldName": "Email"}, files={"file": ("staff.csv", CSV, "text/csv")}
    )


def names(client: httpx.Client) -> list[str]:
    listed = client.get(LIST)
    assert listed.status_code == 200, listed.text
    return [imp["name"] for imp in listed.json()["data"]["audienceImports"]]


def entry(
    path: str, status: int | None, faulted: str | None = None, after: bool = False, method: str = "GET"
) -> dict[str, Any]:
    return {
        "vendor": "cxi",
        "method": method,
        "path": path,
        "status": status,
        "faulted": faulted,
        "after": after,
    }


def posted(status: int | None, faulted: str | None = None, after: bool = False) -> dict[str, Any]:
    """The log entry of one create (POST to the list path)."""
    return entry(LIST_PATH, status, faulted, after, method="POST")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "drop", "after": "yes"}, "after must be true or false"),
        ({"kind": "status", "after": 1}, "after must be true or false"),
        ({"kind": "html", "status": 199}, "between 200 and 599"),
        ({"kind": "html", "status": 600}, "between 200 and 599"),
        ({"kind": "status", "status": 200, "after": True}, "between 400 and 599"),
        ({"kind": "teapot"}, "status, delay, drop, html"),
    ],
)
def test_invalid_after_and_html_specs_are_rejected(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_fault(spec, PREFIXES)


def test_new_fields_have_defaults_and_are_echoed() -> None:
    html = parse_fault({"kind": "html"}, PREFIXES).describe()
    dropped = parse_fault({"kind": "drop", "vendor": "cxi", "after": True}, PREFIXES).describe()

    assert (html["kind"], html["status"], html["after"]) == ("html", 200, False)
    assert (dropped["kind"], dropped["after"], dropped["path_prefix"]) == ("drop", True, "/cxi")
    registry = FaultRegistry()
    registry.add(parse_fault({"kind": "html", "status": 502, "after": True}, PREFIXES))
    taken = registry.take("GET", "/cxi/x")
    assert taken is not None and (taken.kind, taken.status, taken.after) == ("html", 502, True)


@pytest.mark.integration
def test_control_route_echoes_after_and_rejects_bad_values(sandbox: SandboxServer) -> None:
    registered = httpx.post(
        f"{sandbox.url}/_sandbox/faults", json={"kind": "drop", "vendor": "cxi", "after": True}
    )
    rejected = httpx.post(f"{sandbox.url}/_sandbox/faults", json={"kind": "html", "after": "later"})

    assert registered.status_code == 201
    assert registered.json()["fault"]["after"] is True
    assert rejected.status_code == 400
    assert rejected.json()["error"] == {"code": "invalid_fault", "message": "after must be true or false"}


@pytest.mark.integration
def test_drop_after_creates_the_import_but_the_client_hears_nothing(
    sandbox: SandboxServer, cxi: httpx.Client
) -> None:
    sandbox.add_fault(vendor="cxi", kind="drop", method="POST", after=True)

    with pytest.raises(httpx.RemoteProtocolError):
        create(cxi, "Dropped after")

    assert names(cxi) == ["Dropped after"]
    assert sandbox.requests(method="POST") == [posted(201, "drop", after=True)]


@pytest.mark.integration
def test_drop_before_never_reaches_the_vendor(sandbox: SandboxServer, cxi: httpx.Client) -> None:
    sandbox.add_fault(vendor="cxi", kind="drop", method="POST")

    with pytest.raises(httpx.RemoteProtocolError):
        create(cxi, "Dropped before")

    assert names(cxi) == []
    assert sandbox.requests(method="POST") == [posted(None, "drop")]


@pytest.mark.integration
@pytest.mark.parametrize("status", [502, 503, 504])
def test_status_after_replaces_the_vendors_answer(
    sandbox: SandboxServer, cxi: httpx.Client, status: int
) -> None:
    sandbox.add_fault(vendor="cxi", kind="status", status=status, method="POST", after=True, retry_after=2)

    answer = create(cxi, f"Accepted {status}")
    retried = create(cxi, f"Accepted {status}")

    assert answer.status_code == status
    assert answer.headers["Retry-After"] == "2"
    assert answer.json()["error"]["code"] == "sandbox_fault"
    assert retried.status_code == 409, "the first attempt did create the import"
    assert names(cxi) == [f"Accepted {status}"]
    assert sandbox.requests(method="POST") == [
        posted(201, "status", after=True),
        posted(409),
    ]


@pytest.mark.integration
def test_html_before_answers_a_page_and_the_vendor_never_sees_it(
    sandbox: SandboxServer, cxi: httpx.Client
) -> None:
    sandbox.add_fault(vendor="cxi", kind="html", method="POST")

    answer = create(cxi, "Behind a proxy")

    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    assert "<h1>Service temporarily unavailable</h1>" in answer.text
    assert names(cxi) == []
    assert sandbox.requests(method="POST") == [posted(None, "html")]


@pytest.mark.integration
def test_html_after_hides_a_created_import_behind_a_page(sandbox: SandboxServer, cxi: httpx.Client) -> None:
    sandbox.add_fault(vendor="cxi", kind="html", status=503, method="POST", after=True)

    answer = create(cxi, "Created behind a proxy")

    assert answer.status_code == 503
    assert answer.headers["content-type"].startswith("text/html")
    assert answer.text.lstrip().lower().startswith("<!doctype html>")
    assert names(cxi) == ["Created behind a proxy"]
    assert sandbox.requests(method="POST") == [posted(201, "html", after=True)]


@pytest.mark.integration
def test_delay_after_logs_the_acceptance_before_the_answer_arrives(
    sandbox: SandboxServer, cxi: httpx.Client
) -> None:
    sandbox.add_fault(vendor="cxi", kind="delay", delay_seconds=0.5, method="POST", after=True)
    answers: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: answers.append(create(cxi, "Slow answer")))

    started = time.monotonic()
    worker.start()
    deadline = started + 2
    while not sandbox.requests(method="POST") and time.monotonic() < deadline:
        time.sleep(0.01)
    logged_after = time.monotonic() - started
    in_window = names(cxi)
    worker.join(timeout=5)
    answered_after = time.monotonic() - started

    assert logged_after < 0.4, "the vendor accepted the request before the delay"
    assert in_window == ["Slow answer"]
    assert not worker.is_alive() and answers[0].status_code == 201
    assert answers[0].json()["data"]["name"] == "Slow answer"
    assert answered_after >= 0.5
    assert sandbox.requests(method="POST") == [posted(201, "delay", after=True)]


@pytest.mark.integration
def test_delay_after_survives_a_client_that_gave_up(sandbox: SandboxServer, cxi: httpx.Client) -> None:
    sandbox.add_fault(vendor="cxi", kind="delay", delay_seconds=0.3, method="POST", after=True)

    with pytest.raises(httpx.ReadTimeout):
        cxi.post(
            LIST,
            data={"name": "Gave up", "emailFieldName": "Email"},
            files={"file": ("staff.csv", CSV, "text/csv")},
            timeout=httpx.Timeout(5, read=0.1),
        )
    time.sleep(0.4)

    assert names(cxi) == ["Gave up"]
    assert httpx.get(f"{sandbox.url}/_sandbox/health").status_code == 200
    assert sandbox.requests(method="POST") == [posted(201, "delay", after=True)]


@pytest.mark.integration
def test_request_log_records_vendor_paths_only_and_filters(sandbox: SandboxServer, cxi: httpx.Client) -> None:
    created = create(cxi, "Logged")
    job_id = created.json()["data"]["asyncJobId"]
    cxi.get(f"{LIST}/async-jobs/{job_id}/status")
    httpx.get(f"{sandbox.url}/_sandbox/health")
    httpx.get(f"{sandbox.url}/nowhere")
    httpx.get(f"{sandbox.vendor_url('cxi')}{LIST}")  # no API key
    sandbox.add_fault(vendor="cxi", kind="delay", delay_seconds=0, path_contains="/status")
    cxi.get(f"{LIST}/async-jobs/{job_id}/status")

    status_path = f"/cxi{LIST}/async-jobs/{job_id}/status"
    everything = httpx.get(f"{sandbox.url}/_sandbox/requests").json()
    assert everything == {
        "requests": [
            posted(201),
            entry(status_path, 200),
            entry(LIST_PATH, 401),
            entry(status_path, 200, "delay"),
        ]
    }
    assert sandbox.requests(vendor="cxi", method="get", path_contains="/async-jobs/") == [
        entry(status_path, 200),
        entry(status_path, 200, "delay"),
    ]
    assert sandbox.requests(method="DELETE") == []
    assert sandbox.requests(vendor="apsis") == []
    assert "X-GSCC-Api-Key" not in str(everything) and "Logged" not in str(everything)


@pytest.mark.integration
def test_request_log_rejects_unknown_filters(sandbox: SandboxServer) -> None:
    unknown_vendor = httpx.get(f"{sandbox.url}/_sandbox/requests", params={"vendor": "nobody"})
    unknown_filter = httpx.get(f"{sandbox.url}/_sandbox/requests", params={"status": "201"})

    assert unknown_vendor.status_code == 400
    assert "Unknown vendor 'nobody'" in unknown_vendor.json()["error"]["message"]
    assert unknown_filter.status_code == 400
    assert "Unknown filter status" in unknown_filter.json()["error"]["message"]


@pytest.mark.integration
def test_reset_clears_the_request_log(sandbox: SandboxServer, cxi: httpx.Client) -> None:
    names(cxi)
    assert len(sandbox.requests()) == 1

    httpx.post(f"{sandbox.url}/_sandbox/reset").raise_for_status()

    assert sandbox.requests() == []


@pytest.mark.integration
def test_stall_keeps_new_jobs_pending_until_reset(sandbox: SandboxServer, cxi: httpx.Client) -> None:
    stall_url = f"{sandbox.url}/_sandbox/cxi/stall"
    before = create(cxi, "Before stall").json()["data"]
    assert httpx.post(stall_url, json={"stall": True}).json() == {"ok": True, "stall": True}
    stalled = create(cxi, "Stalled").json()["data"]
    assert httpx.post(stall_url, json={"stall": False}).json() == {"ok": True, "stall": False}
    after = create(cxi, "After stall").json()["data"]

    time.sleep(0.3)  # six times the test pace: every unstalled job has ended
    jobs = {
        imp["name"]: cxi.get(f"{LIST}/async-jobs/{imp['asyncJobId']}/status").json()["data"]
        for imp in (before, stalled, after)
    }
    failures = cxi.get(f"{LIST}/async-jobs/{stalled['asyncJobId']}/failures").json()["data"]
    stalled_import = cxi.get(f"{LIST}/{stalled['id']}").json()["data"]

    assert {name: job["status"] for name, job in jobs.items()} == {
        "Before stall": "completed",
        "Stalled": "pending",
        "After stall": "completed",
    }
    assert jobs["Stalled"]["progressPercentage"] == 0
    assert (failures["status"], failures["totalNumOfRows"], failures["errorMessages"]) == ("pending", 0, [])
    assert (stalled_import["status"], stalled_import["membersUpdatedAt"]) == ("pending", None)


@pytest.mark.integration
def test_reset_switches_stall_off(sandbox: SandboxServer, cxi: httpx.Client) -> None:
    httpx.post(f"{sandbox.url}/_sandbox/cxi/stall", json={"stall": True}).raise_for_status()
    sandbox.reset()

    job_id = create(cxi, "After reset").json()["data"]["asyncJobId"]
    time.sleep(0.3)

    assert cxi.get(f"{LIST}/async-jobs/{job_id}/status").json()["data"]["status"] == "completed"


@pytest.mark.integration
@pytest.mark.parametrize("body", [{}, {"stall": "yes"}, [True], None])
def test_stall_rejects_bad_bodies(sandbox: SandboxServer, body: object) -> None:
    url = f"{sandbox.url}/_sandbox/cxi/stall"
    answer = httpx.post(url, json=body) if body is not None else httpx.post(url, content=b"not json")

    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_request"


@pytest.mark.integration
def test_deleting_the_request_log_keeps_the_vendors_state(sandbox: SandboxServer, cxi: httpx.Client) -> None:
    job_id = create(cxi, "Kept").json()["data"]["asyncJobId"]

    cleared = httpx.delete(f"{sandbox.url}/_sandbox/requests")

    assert cleared.status_code == 200 and sandbox.requests() == []
    assert cxi.get(f"{LIST}/async-jobs/{job_id}/status").status_code == 200  # the job is still there
    assert len(sandbox.requests(vendor="cxi")) == 1

"""AltcraftClient against an in-test emulation of the batch-task API (``httpx.MockTransport``).

Everything above the HTTP boundary (body building, measured splitting, concurrency, envelope
handling, result mapping, redaction) is the real code.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pandas as pd
import pytest

from audience_pipeline.destinations import altcraft
from audience_pipeline.destinations.altcraft import (
    IMPORT_PATH,
    MAX_REQUEST_BYTES,
    STATUS_PATH,
    VENDOR,
    AltcraftClient,
    AltcraftOptions,
    AltcraftResource,
)
from audience_pipeline.destinations.base import ChunkJob, JobHandle, JobState, SubmitIntent
from audience_pipeline.destinations.http import VendorAuthError, VendorHTTP, VendorHTTPError
from audience_pipeline.feeds.loader import FeedsFileError, load_feeds
from audience_pipeline.redact import redact
from audience_pipeline_tests.destinations.fakes import fake_http
from audience_pipeline_tests.destinations.poll_retry import check_poll_retry

TOKEN = "altcraft-unit-token-6d0b2f8e4a"
BASE_URL = "https://altcraft.example.test/ac"


@dataclass
class FakeAltcraft:
    """The two documented endpoints in memory; tasks complete at once unless told otherwise."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    answers: list[httpx.Response] = field(default_factory=list)
    status_answers: dict[str, httpx.Response] = field(default_factory=dict)
    polled: list[str] = field(default_factory=list)
    state: str = "completed"
    delay: float = 0.0
    in_flight: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body.get("token") != TOKEN:
            return httpx.Response(
                401, json={"error": 401, "error_text": f"Invalid token {body.get('token')}"}
            )
        path = request.url.path.removeprefix("/ac")
        if path == STATUS_PATH:
            return self._status(body["task_id"])
        assert path == IMPORT_PATH and request.headers["Content-Type"] == "application/json"
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.raw.append(request.content)
            self.bodies.append(body)
        time.sleep(self.delay)
        with self.lock:
            self.in_flight -= 1
            if self.answers:
                return self.answers.pop(0)
        task_id = str(uuid.uuid4())
        self.tasks[task_id] = {"items": body["data"], "raw": request.content, "body": body}
        return httpx.Response(
            200, json={"error": 0, "error_text": "Successful operation", "task_id": task_id}
        )

    def sent(self, handle: JobHandle) -> tuple[list[bytes], list[dict[str, Any]]]:
        """Raw and decoded bodies in the handle's row order (batches race each other)."""
        tasks = [self.tasks[job.job_id] for job in handle.jobs]
        return [t["raw"] for t in tasks], [t["body"] for t in tasks]

    def _status(self, task_id: str) -> httpx.Response:
        with self.lock:
            self.polled.append(task_id)
        if task_id in self.status_answers:
            return self.status_answers[task_id]
        items = self.tasks[task_id]["items"]
        data: dict[str, Any] = {"status": self.state, "progress": 100 if self.state == "completed" else 40}
        if self.state == "completed":
            data["result"] = {"error": 0, "error_text": "", "result": [_result(i) for i in items]}
        ok = {"error": 0, "error_text": "Successful operation"}
        return httpx.Response(200, json={"data": data, **ok})


def _result(item: dict[str, Any]) -> dict[str, Any]:
    email = item["data"].get("email", "")
    if "@" not in email:
        return {"error": 400, "error_text": "Invalid email address"}
    status = "updated" if email.startswith("known") else "created"
    return {"error": 0, "error_text": "", "profile_id": uuid.uuid4().hex[:24], "status": status}


@pytest.fixture
def fake() -> FakeAltcraft:
    return FakeAltcraft()


@pytest.fixture
def make_client(fake: FakeAltcraft, close_after: Callable) -> Callable[..., AltcraftClient]:
    def make(token: str = TOKEN, limits: dict[str, int] | None = None, **options: Any) -> AltcraftClient:
        http = fake_http(VENDOR, BASE_URL, fake, headers={"Accept": "application/json"}, secrets=[token])
        options = {"trigger_id": 96, **options}
        return close_after(AltcraftClient(http, AltcraftOptions(**options), token, **(limits or {})))

    return make


def rows(n: int = 3, **columns: list[str]) -> pd.DataFrame:
    """Validated rows as ``validate_file`` returns them: ``source_line`` plus canonical columns."""
    frame = pd.DataFrame(
        {
            "source_line": range(2, n + 2),
            "unique_id": [f"E{i}" for i in range(n)],
            "email": [f"user{i}@example.com" for i in range(n)],
            "mobile_phone": [f"+1415555{i:04d}" for i in range(n)],
            "first_name": [f"First{i}" for i in range(n)],
            "last_name": [f"Last{i}" for i in range(n)],
            "department": ["Sales"] * n,
            **columns,
        }
    )
    return frame.astype({c: "string[pyarrow]" for c in frame.columns if c != "source_line"})


def test_body_is_the_documented_task_with_one_item_per_row(make_client, fake: FakeAltcraft) -> None:
    frame = rows(2)
    frame.loc[1, "mobile_phone"] = None
    frame.loc[0, "last_name"] = 'O"Brien \\ Ünal'
    client = make_client(skip_triggers=True, detect_geo=True, resource_id=21, content={"page": "hr"})

    handle = client.submit(frame, feed="f", partition="p")

    assert len(fake.bodies) == 1 and handle.submitted_rows == 2
    assert fake.bodies[0] == {
        "token": TOKEN,
        "matching": "email",
        "resource_id": 21,
        "trigger_id": 96,
        "skip_triggers": True,
        "skip_invalid_subscriptions": False,
        "detect_geo": True,
        "content": {"page": "hr"},
        "data": [
            {
                "data": {
                    "_fname": "First0",
                    "_lname": 'O"Brien \\ Ünal',
                    "email": "user0@example.com",
                    "phones": "+14155550000",
                    "department": "Sales",
                }
            },
            {
                "data": {
                    "_fname": "First1",
                    "_lname": "Last1",
                    "email": "user1@example.com",
                    "department": "Sales",
                }
            },
        ],
    }
    assert [(j.first_row, j.row_count) for j in handle.jobs] == [(0, 2)]
    assert handle.extra["refused"] == {} and handle.extra["trigger_id"] == 96


def test_custom_matching_fills_field_name_from_match_column(make_client, fake: FakeAltcraft) -> None:
    make_client(matching="custom", field_name="CRM_ID").submit(rows(1), feed="f", partition="p")
    body = fake.bodies[0]
    assert body["matching"] == "custom" and body["field_name"] == "CRM_ID"
    assert body["data"][0]["data"]["CRM_ID"] == "E0"


def test_profile_id_matching_puts_the_id_beside_data(make_client, fake: FakeAltcraft) -> None:
    client = make_client(
        matching="profile_id", match_column="altcraft_id", profile_fields={"_fname": "first_name"}
    )
    client.submit(rows(1, altcraft_id=["61e947333f62fc26d384452c"]), feed="f", partition="p")
    assert fake.bodies[0]["data"] == [
        {"profile_id": "61e947333f62fc26d384452c", "data": {"_fname": "First0"}}
    ]


def test_more_than_10000_rows_are_split_by_profile_count(make_client, fake: FakeAltcraft) -> None:
    handle = make_client().submit(rows(25_001), feed="f", partition="p")

    raw, bodies = fake.sent(handle)
    assert [len(b["data"]) for b in bodies] == [10_000, 10_000, 5_001]
    assert [(j.first_row, j.row_count) for j in handle.jobs] == [
        (0, 10_000),
        (10_000, 10_000),
        (20_000, 5_001),
    ]
    assert bodies[2]["data"][0]["data"]["email"] == "user20000@example.com"
    assert all(len(body) <= MAX_REQUEST_BYTES for body in raw)


def test_large_rows_are_split_by_measured_bytes(make_client, fake: FakeAltcraft) -> None:
    n = 8_000
    big = [("é" * 600) + str(i) for i in range(n)]  # 2 bytes per é: ~1.2 KB of UTF-8 per row
    frame = rows(n, notes=big)

    handle = make_client().submit(frame, feed="f", partition="p")

    raw, bodies = fake.sent(handle)
    sizes = [len(body) for body in raw]
    assert len(sizes) == 2 and max(sizes) <= MAX_REQUEST_BYTES
    assert sum(len(b["data"]) for b in bodies) == n
    first = bodies[0]["data"]
    next_item = json.dumps(bodies[1]["data"][0], ensure_ascii=False, separators=(",", ":"))
    assert sizes[0] + 1 + len(next_item.encode()) > MAX_REQUEST_BYTES  # the cut is tight, not guessed
    assert [d["data"]["notes"] for d in first] == big[: len(first)]
    assert handle.jobs[1].first_row == len(first)


def test_batches_go_out_concurrently_up_to_the_limit(make_client, fake: FakeAltcraft) -> None:
    fake.delay = 0.05
    client = make_client(limits={"max_profiles": 10, "max_in_flight": 3})

    started = time.perf_counter()
    handle = client.submit(rows(80), feed="f", partition="p")
    elapsed = time.perf_counter() - started

    assert len(handle.jobs) == 8 and fake.peak == 3
    assert elapsed < 8 * 0.05  # not one after another
    assert [j.first_row for j in handle.jobs] == list(range(0, 80, 10))


def test_success_status_and_outcome_map_results_to_rows(make_client, fake: FakeAltcraft) -> None:
    frame = rows(4)
    frame.loc[1, "email"] = "broken"
    frame.loc[2, "email"] = "known@example.com"
    client = make_client(limits={"max_profiles": 2})
    handle = client.submit(frame, feed="f", partition="p")

    status = client.status(handle)
    outcome = client.outcome(handle)

    assert (status.state, status.vendor_status, status.progress) == (JobState.SUCCEEDED, "completed", 100)
    assert [(f.row, f.reason, f.outcome) for f in outcome.failures] == [
        (1, "Invalid email address", "failed")
    ]
    assert outcome.imported == 3 and outcome.failed == 1
    assert outcome.vendor_counts == {"created": 2, "updated": 1, "processed": 3, "failed": 1}


def test_running_tasks_combine_into_one_state(make_client, fake: FakeAltcraft) -> None:
    client = make_client(limits={"max_profiles": 1})
    handle = client.submit(rows(2), feed="f", partition="p")
    for state, expected in [
        ("pending", (JobState.PENDING, "pending")),
        ("processing", (JobState.RUNNING, "processing")),
        ("queued", (JobState.UNKNOWN, "queued")),
        ("error", (JobState.FAILED, "error")),
    ]:
        fake.state = state
        status = client.status(handle)
        assert (status.state, status.vendor_status) == expected
        assert status.detail == f"2 {state}"
    fake.state = "completed"
    first = handle.jobs[0].job_id
    fake.status_answers[first] = httpx.Response(
        200, json={"data": {"status": "processing", "progress": 50}, "error": 0}
    )
    status = client.status(handle)
    assert (status.state, status.progress) == (JobState.RUNNING, 75)


def test_status_stops_after_a_wave_that_finds_a_running_task(make_client, fake: FakeAltcraft) -> None:
    client = make_client(limits={"max_profiles": 1, "max_in_flight": 2})
    handle = client.submit(rows(10), feed="f", partition="p")
    fake.state = "processing"

    status = client.status(handle)

    assert sorted(fake.polled) == sorted(j.job_id for j in handle.jobs[-2:])  # last wave only
    assert (status.state, status.detail) == (JobState.RUNNING, "2 processing, 8 not polled")
    fake.polled.clear()
    fake.state = "completed"
    assert client.status(handle).state is JobState.SUCCEEDED
    assert sorted(fake.polled) == sorted(j.job_id for j in handle.jobs)


def test_task_in_error_fails_all_its_rows_with_the_vendor_text(make_client, fake: FakeAltcraft) -> None:
    client = make_client(limits={"max_profiles": 2})
    handle = client.submit(rows(3), feed="f", partition="p")
    first = handle.jobs[0].job_id
    fake.status_answers[first] = httpx.Response(
        200,
        json={
            "data": {
                "status": "error",
                "progress": 10,
                "result": {"error": 500, "error_text": "Database down"},
            },
            "error": 0,
            "error_text": "Successful operation",
        },
    )

    assert client.status(handle).state is JobState.FAILED
    outcome = client.outcome(handle)

    assert [f.row for f in outcome.failures] == [0, 1]
    assert outcome.failures[0].reason == f"Altcraft task {first} ended in error: Database down"
    assert outcome.vendor_counts["processed"] == 1 and outcome.imported == 1


def test_completed_result_with_error_fails_the_task(make_client, fake: FakeAltcraft) -> None:
    client = make_client()
    handle = client.submit(rows(2), feed="f", partition="p")
    task = handle.jobs[0].job_id
    fake.status_answers[task] = httpx.Response(
        200,
        json={
            "data": {
                "status": "completed",
                "progress": 100,
                "result": {"error": 12, "error_text": "Quota exceeded"},
            },
            "error": 0,
            "error_text": "Successful operation",
        },
    )
    outcome = client.outcome(handle)
    assert [f.reason for f in outcome.failures] == [
        f"Altcraft task {task} failed: Quota exceeded (error 12)"
    ] * 2


def test_status_envelope_error_ends_the_task_instead_of_polling_forever(
    make_client, fake: FakeAltcraft
) -> None:
    client = make_client()
    handle = client.submit(rows(1), feed="f", partition="p")
    task = handle.jobs[0].job_id
    fake.status_answers[task] = httpx.Response(
        200, json={"error": 404, "error_text": "Task not found", "data": None}
    )

    assert client.status(handle).state is JobState.FAILED
    [failure] = client.outcome(handle).failures
    assert failure.reason == f"Altcraft could not report task {task}: Task not found (error 404)"


def test_seed_shaped_results_and_short_result_lists(make_client, fake: FakeAltcraft) -> None:
    client = make_client()
    handle = client.submit(rows(3), feed="f", partition="p")
    task = handle.jobs[0].job_id
    items = [{"profile_id": "61e947333f62fc26d384452c"}, {"error": 0, "error_text": ""}]
    fake.status_answers[task] = httpx.Response(
        200,
        json={
            "data": {"status": "completed", "progress": 100, "result": {"error": 0, "result": items}},
            "error": 0,
        },
    )

    outcome = client.outcome(handle)

    assert [(f.row, f.reason) for f in outcome.failures] == [
        (1, "Altcraft returned no profile for this row"),
        (2, "Altcraft returned no result for this profile"),
    ]
    assert outcome.vendor_counts["processed"] == 1
    assert outcome.notes == [f"Altcraft task {task}: 2 results for 3 profiles"]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (
            httpx.Response(
                200, json={"error": 404, "error_text": "Trigger campaign not found", "data": None}
            ),
            "Altcraft refused the request: Trigger campaign not found (error 404)",
        ),
        (
            httpx.Response(
                400,
                json={
                    "error": 400,
                    "error_text": "Invalid request",
                    "error_debug": "http: request body too large",
                },
            ),
            "Altcraft refused the request: Invalid request (http: request body too large) (error 400)",
        ),
    ],
)
def test_error_envelope_refuses_its_batch_and_the_others_go_on(
    make_client, fake: FakeAltcraft, answer: httpx.Response, reason: str
) -> None:
    fake.answers.append(answer)
    client = make_client(limits={"max_profiles": 2, "max_in_flight": 1})

    handle = client.submit(rows(3), feed="f", partition="p")

    assert len(fake.bodies) == 2
    refused = handle.jobs[0].job_id
    assert handle.extra["refused"] == {refused: reason}
    status = client.status(handle)
    assert (status.state, status.vendor_status) == (JobState.FAILED, "refused")
    assert status.detail == "1 refused, 1 completed"
    outcome = client.outcome(handle)
    assert [(f.row, f.reason) for f in outcome.failures] == [(0, reason), (1, reason)]
    assert outcome.imported == 1 and outcome.vendor_counts["processed"] == 1


def test_task_id_inside_data_is_accepted(make_client, fake: FakeAltcraft) -> None:
    fake.answers.append(
        httpx.Response(200, json={"data": {"task_id": "t-1"}, "error": 0, "error_text": "ok"})
    )
    handle = make_client().submit(rows(1), feed="f", partition="p")
    assert handle.jobs[0].job_id == "t-1"


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="<html>gateway</html>"),
        httpx.Response(200, json={"error": 0, "error_text": "Successful operation"}),
        httpx.Response(404, text="no route"),
    ],
)
def test_answers_without_a_task_raise(make_client, fake: FakeAltcraft, answer: httpx.Response) -> None:
    fake.answers.append(answer)
    with pytest.raises(VendorHTTPError) as caught:
        make_client().submit(rows(1), feed="f", partition="p")
    assert TOKEN not in str(caught.value)


def test_wrong_token_raises_an_auth_error_that_hides_both_tokens(make_client) -> None:
    wrong = "wrong-altcraft-token-11aa22bb"
    with pytest.raises(VendorAuthError) as caught:
        make_client(token=wrong).submit(rows(1), feed="f", partition="p")
    assert caught.value.status == 401
    assert wrong not in str(caught.value) and "***" in str(caught.value)


def test_token_never_reaches_logs_handles_or_errors(make_client, fake: FakeAltcraft, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    client = make_client(limits={"max_profiles": 2})
    fake.answers.append(httpx.Response(400, json={"error": 400, "error_text": f"bad token {TOKEN}"}))

    handle = client.submit(rows(3), feed="f", partition="p")
    client.status(handle)
    outcome = client.outcome(handle)

    assert TOKEN in fake.raw[0].decode()  # it really travels in the body
    assert redact(TOKEN) == "***"
    assert TOKEN not in caplog.text and "altcraft.example.test" in caplog.text
    assert TOKEN not in handle.model_dump_json()
    assert all(TOKEN not in f.reason for f in outcome.failures)
    assert "bad token ***" in outcome.failures[0].reason


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="needs field_name"):
        AltcraftOptions(trigger_id=1, matching="custom")
    with pytest.raises(ValueError, match="only used with matching 'custom'"):
        AltcraftOptions(trigger_id=1, field_name="CRM_ID")
    with pytest.raises(ValueError):
        AltcraftOptions(trigger_id=0)
    with pytest.raises(ValueError):
        AltcraftOptions(trigger_id=1, unknown=True)


def test_column_problems_name_the_option() -> None:
    columns = ["unique_id", "mobile_phone", "first_name"]
    assert AltcraftOptions(trigger_id=1, matching="phone").column_problems(columns) == []
    [(key, problem)] = AltcraftOptions(trigger_id=1).column_problems(columns)
    assert key == "matching" and "'email'" in problem
    problems = AltcraftOptions(
        trigger_id=1,
        matching="custom",
        field_name="CRM",
        match_column="crm",
        profile_fields={"_fname": "nope"},
    ).column_problems(columns)
    assert [k for k, _ in problems] == ["profile_fields", "match_column"]


def test_feeds_file_with_bad_altcraft_options_names_the_key(tmp_path) -> None:
    feeds = tmp_path / "feeds.yaml"
    feeds.write_text(
        """
sources: {drop: {type: folder, path: .}}
destinations: {ac: {type: altcraft, base_url: "https://a.example", token: "${ALTCRAFT_TOKEN}"}}
feeds:
  - name: staff
    source: drop
    destination: ac
    mapping: {unique_id: Id, mobile_phone: Phone}
    options: {trigger_id: 7, matching: custom, field_name: CRM_ID, match_column: crm}
""",
        "utf-8",
    )
    with pytest.raises(FeedsFileError) as caught:
        load_feeds(feeds)
    assert "feeds[0].options.match_column: 'crm' is not a column of this feed" in str(caught.value)


def test_resource_builds_a_client_with_its_limits() -> None:
    resource = AltcraftResource(
        base_url=BASE_URL,
        token=TOKEN,
        max_in_flight=2,
        max_profiles_per_request=500,
        max_request_bytes=1_000_000,
    )
    client = resource.destination({"trigger_id": 5, "matching": "phone"})
    try:
        assert (client.max_in_flight, client.max_profiles, client.max_request_bytes) == (2, 500, 1_000_000)
        assert client.options.matching == "phone"
        assert redact(f"x {TOKEN} y") == "x *** y"
    finally:
        client.close()


def test_one_task_in_an_unknown_state_makes_the_import_unknown(make_client, fake: FakeAltcraft) -> None:
    client = make_client(limits={"max_profiles": 1})
    handle = client.submit(rows(2), feed="f", partition="p")
    fake.status_answers[handle.jobs[0].job_id] = httpx.Response(
        200, json={"data": {"status": "paused", "progress": 10}, "error": 0}
    )

    status = client.status(handle)
    assert (status.state, status.vendor_status) == (JobState.UNKNOWN, "paused")
    assert status.detail == "1 paused, 1 completed"
    with pytest.raises(Exception, match="is paused"):
        client.outcome(handle)


@pytest.mark.parametrize(
    ("skip_triggers", "triggers"),
    [(False, "trigger 96 fires again for every resent profile"), (True, "skip_triggers is set")],
)
def test_reconcile_cannot_tell_and_says_what_a_resend_does(
    make_client, fake: FakeAltcraft, skip_triggers: bool, triggers: str
) -> None:
    intent = SubmitIntent(feed="f", partition="p", sha256="0" * 64, attempt=2, recorded_at=0.0, rows=3)
    found = make_client(skip_triggers=skip_triggers).reconcile(intent, rows())
    assert (found.handle, found.certain) == (None, False)
    assert found.detail.startswith(f"{VENDOR}: the document has no way to list tasks")
    assert "matches and updates the same profiles (matching email)" in found.detail
    assert triggers in found.detail and fake.bodies == [] and fake.polled == []


def test_the_retry_policy_reaches_the_http_client_so_a_sensor_429_raises_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def limited(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "3600"}, json={"error": 429, "error_text": "slow"})

    sleeps: list[float] = []

    def wired(*args: Any, **kwargs: Any) -> VendorHTTP:
        return VendorHTTP(*args, **kwargs, transport=httpx.MockTransport(limited), sleep=sleeps.append)

    monkeypatch.setattr(altcraft, "VendorHTTP", wired)
    resource = AltcraftResource(base_url=BASE_URL, token=TOKEN)
    job = ChunkJob(job_id="task-1", first_row=0, row_count=1)
    handle = JobHandle(vendor=VENDOR, feed="f", partition="p", jobs=[job], submitted_rows=1)

    check_poll_retry(lambda retry: resource.destination({"trigger_id": 5}, retry=retry), handle, sleeps)


def test_outcome_does_not_poll_tasks_status_already_read_ended(make_client, fake: FakeAltcraft) -> None:
    client = make_client(limits={"max_profiles": 2})
    handle = client.submit(rows(5), feed="f", partition="p")
    status = client.status(handle)
    assert status.state is JobState.SUCCEEDED and len(fake.polled) == 3
    fake.polled.clear()

    assert client.outcome(handle, status=status).imported == 5
    assert fake.polled == []
    # A new client (the report's process) reads each task once: the results travel only in its status.
    assert make_client().outcome(handle, status=status).imported == 5
    assert sorted(fake.polled) == sorted(job.job_id for job in handle.jobs)

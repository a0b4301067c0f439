"""The Altcraft emulation over real HTTP: token, envelope, limits, task states, matching, failures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from audience_pipeline.sandbox import SandboxServer, SandboxSettings
from audience_pipeline.sandbox.altcraft import IMPORT_PATH, MAX_BODY_BYTES, MAX_PROFILES, STATUS_PATH
from audience_pipeline_tests.sandbox.polling import poll_until

PACE = 0.05
TOKEN = "altcraft-sandbox-test-token-91c2"


@pytest.fixture
def sandbox_settings() -> SandboxSettings:
    return SandboxSettings(pace_seconds=PACE, altcraft_token=TOKEN)


@pytest.fixture
def api(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.vendor_url("altcraft"), timeout=10) as client:
        yield client


@pytest.fixture
def control(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{sandbox.url}/_sandbox/altcraft", timeout=5) as client:
        yield client


def profile(email: str | None = None, **fields: Any) -> dict[str, Any]:
    data = {"email": email, **fields} if email is not None else dict(fields)
    return {"data": data}


def start(api: httpx.Client, items: list[dict], **options: Any) -> str:
    body = {"token": TOKEN, "trigger_id": 13, "matching": "email", "data": items, **options}
    response = api.post(IMPORT_PATH, json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["error"] == 0 and answer["error_text"] == "Successful operation"
    assert answer["task_id"] == answer["data"]["task_id"]
    return answer["task_id"]


def wait(api: httpx.Client, task_id: str) -> list[dict[str, Any]]:
    """Every status answer until the task ends, polled fast enough to see each state."""

    def fetch() -> dict[str, Any]:
        response = api.post(STATUS_PATH, json={"token": TOKEN, "task_id": task_id})
        assert response.status_code == 200 and response.json()["error"] == 0, response.text
        return response.json()["data"]

    return poll_until(
        fetch,
        lambda d: d["status"] in ("completed", "error"),
        what=f"task {task_id}",
        timeout=10,
        interval=PACE / 5,
    )


def results(api: httpx.Client, items: list[dict], **options: Any) -> list[dict[str, Any]]:
    final = wait(api, start(api, items, **options))[-1]
    assert final["status"] == "completed"
    assert final["result"]["error"] == 0
    return final["result"]["result"]


def test_task_goes_pending_processing_completed_over_several_polls(api: httpx.Client) -> None:
    seen = wait(api, start(api, [profile("a@example.com", _fname="Ann"), profile("b@example.com")]))

    states = [s["status"] for s in seen]
    assert states[0] == "pending" and states[-1] == "completed"
    assert "processing" in states
    assert states.index("processing") > states.index("pending")
    assert len(seen) >= 3
    assert seen[-1]["progress"] == 100
    assert [r["status"] for r in seen[-1]["result"]["result"]] == ["created", "created"]
    assert all(len(r["profile_id"]) == 24 and r["error"] == 0 for r in seen[-1]["result"]["result"])
    assert "result" not in seen[0]


def test_wrong_or_missing_token_is_401_without_echo(api: httpx.Client) -> None:
    wrong = "not-the-token-5f1e"
    for body in ({"token": wrong, "trigger_id": 1, "data": [profile("a@example.com")]}, {"trigger_id": 1}):
        response = api.post(IMPORT_PATH, json=body)
        assert response.status_code == 401
        assert response.json()["error"] == 401 and response.json()["error_text"] == "Invalid API token"
        assert wrong not in response.text
    response = api.post(STATUS_PATH, json={"token": wrong, "task_id": "x"})
    assert response.status_code == 401


def test_body_over_10_mib_is_the_documented_invalid_request(api: httpx.Client) -> None:
    filler = "x" * 200
    count = MAX_BODY_BYTES // 230 + 10
    body = json.dumps(
        {
            "token": TOKEN,
            "trigger_id": 1,
            "data": [profile(f"u{i}@example.com", note=filler) for i in range(count)],
        }
    ).encode()
    assert len(body) > MAX_BODY_BYTES

    response = api.post(IMPORT_PATH, content=body, headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    assert response.json() == {
        "error": 400,
        "error_text": "Invalid request",
        "error_debug": "http: request body too large",
        "data": None,
    }


def test_body_just_under_the_limit_is_accepted(api: httpx.Client) -> None:
    head = json.dumps(
        {"token": TOKEN, "trigger_id": 1, "data": [{"data": {"email": "a@example.com", "note": ""}}]}
    )
    pad = MAX_BODY_BYTES - len(head.encode())
    body = head.replace('"note": ""', '"note": "' + "y" * pad + '"')
    assert len(body.encode()) == MAX_BODY_BYTES

    response = api.post(IMPORT_PATH, content=body.encode())

    assert response.status_code == 200 and response.json()["error"] == 0


def test_more_than_10000_profiles_is_refused(api: httpx.Client) -> None:
    items = [profile(f"u{i}@example.com") for i in range(MAX_PROFILES + 1)]
    response = api.post(IMPORT_PATH, json={"token": TOKEN, "trigger_id": 1, "data": items})
    assert response.status_code == 400
    assert response.json()["error"] == 400
    assert "10001 profiles" in response.json()["error_debug"]
    assert len(results(api, items[:MAX_PROFILES])) == MAX_PROFILES


@pytest.mark.parametrize(
    ("body", "debug"),
    [
        ({"data": [{"data": {}}]}, "trigger_id"),
        ({"trigger_id": 1, "data": []}, "data is required"),
        ({"trigger_id": 1, "matching": "fax", "data": [{"data": {}}]}, "matching must be one of"),
        ({"trigger_id": 1, "matching": "custom", "data": [{"data": {}}]}, "field_name is required"),
        ({"trigger_id": 1, "skip_triggers": "yes", "data": [{"data": {}}]}, "skip_triggers must be"),
    ],
)
def test_unreadable_requests_are_400_invalid_request(api: httpx.Client, body: dict, debug: str) -> None:
    response = api.post(IMPORT_PATH, json={"token": TOKEN, **body})
    assert response.status_code == 400
    assert response.json()["error"] == 400 and debug in response.json()["error_debug"]


def test_not_json_is_400(api: httpx.Client) -> None:
    response = api.post(IMPORT_PATH, content=b"<xml>no</xml>")
    assert response.status_code == 400 and "not JSON" in response.json()["error_debug"]


def test_inactive_trigger_is_http_200_with_error_envelope(api: httpx.Client, control: httpx.Client) -> None:
    assert control.post("/triggers/13", json={"active": False}).json()["active"] is False

    response = api.post(
        IMPORT_PATH, json={"token": TOKEN, "trigger_id": 13, "data": [profile("a@example.com")]}
    )

    assert response.status_code == 200
    assert response.json()["error"] == 404
    assert "Trigger campaign 13" in response.json()["error_text"]
    control.post("/triggers/13", json={"active": True})
    start(api, [profile("a@example.com")])


def test_unknown_task_is_an_error_envelope(api: httpx.Client) -> None:
    response = api.post(STATUS_PATH, json={"token": TOKEN, "task_id": "nope"})
    assert response.status_code == 200 and response.json()["error"] == 404
    assert api.post(STATUS_PATH, json={"token": TOKEN}).status_code == 400


def test_per_profile_failures_are_reported_in_order(api: httpx.Client) -> None:
    items = [
        profile("ok@example.com"),
        profile("not-an-email"),
        profile(None, _fname="No email"),
        profile("x@acme.invalid"),
        profile("p@example.com", phones="555-1234"),
        profile("h@example.com", note="SANDBOX_FAIL: Profile is locked"),
        {"nodata": True},
        profile("ok2@example.com", phones="+14155550100"),
    ]

    got = results(api, items)

    assert [r["error"] for r in got] == [0, 400, 400, 400, 400, 400, 400, 0]
    assert [r.get("error_text") for r in got[1:7]] == [
        "Invalid email address",
        "Matching field 'email' is missing",
        "Email domain 'acme.invalid' does not accept mail",
        "Invalid phone number, expected E.164",
        "Profile is locked",
        "Profile data is missing",
    ]


def test_email_matching_creates_then_updates(api: httpx.Client, control: httpx.Client) -> None:
    first = results(api, [profile("a@example.com", _fname="Ann")])
    again = results(api, [profile("A@example.com", _lname="Lee"), profile("b@example.com")])

    assert [r["status"] for r in again] == ["updated", "created"]
    assert again[0]["profile_id"] == first[0]["profile_id"]
    profiles = {p["profile_id"]: p for p in control.get("/profiles").json()["profiles"]}
    assert profiles[first[0]["profile_id"]]["_fname"] == "Ann"
    assert profiles[first[0]["profile_id"]]["_lname"] == "Lee"


def test_email_matching_also_finds_subscription_emails(api: httpx.Client) -> None:
    subscribed = {"channel": "email", "email": "sub@example.com", "resource_id": 21}
    [owner] = results(api, [profile("main@example.com", subscriptions=[subscribed])])

    [by_email] = results(api, [profile("sub@example.com")], matching="email")

    assert by_email["status"] == "updated" and by_email["profile_id"] == owner["profile_id"]


def test_email_profile_creates_when_only_a_subscription_matches(api: httpx.Client) -> None:
    subscribed = {"channel": "email", "email": "sub@example.com", "resource_id": 21}
    results(api, [profile("main@example.com", subscriptions=[subscribed])])
    [got] = results(api, [profile("sub@example.com")], matching="email_profile")
    assert got["status"] == "created"


def test_phone_matching(api: httpx.Client) -> None:
    [first] = results(api, [profile("a@example.com", phones="+14155550100")], matching="phone")
    [second] = results(api, [profile("other@example.com", phones="+14155550100")], matching="phone")
    [missing] = results(api, [profile("c@example.com")], matching="phone")
    assert (first["status"], second["status"]) == ("created", "updated")
    assert second["profile_id"] == first["profile_id"]
    assert missing["error_text"] == "Matching field 'phones' is missing"


def test_custom_matching_uses_field_name(api: httpx.Client) -> None:
    options = {"matching": "custom", "field_name": "CRM_ID"}
    first = results(
        api, [profile("a@example.com", CRM_ID="E1"), profile("b@example.com", CRM_ID="E2")], **options
    )
    second = results(
        api,
        [
            profile("new-a@example.com", CRM_ID="E1"),
            profile("b@example.com"),
            profile("c@x.com", CRM_ID="E3"),
        ],
        **options,
    )
    assert [r["status"] for r in first] == ["created", "created"]
    assert second[0]["status"] == "updated" and second[0]["profile_id"] == first[0]["profile_id"]
    assert second[1]["error_text"] == "Matching field 'CRM_ID' is missing"
    assert second[2]["status"] == "created"


def test_profile_id_matching_updates_known_profiles_only(api: httpx.Client) -> None:
    [created] = results(api, [profile("a@example.com")])
    got = results(
        api,
        [
            {"profile_id": created["profile_id"], "data": {"_fname": "Ann"}},
            {"profile_id": "ffffffffffffffffffffffff", "data": {"_fname": "Ghost"}},
            {"data": {"_fname": "No id"}},
        ],
        matching="profile_id",
    )
    assert got[0]["status"] == "updated" and got[0]["profile_id"] == created["profile_id"]
    assert got[1]["error_text"] == "Profile 'ffffffffffffffffffffffff' not found"
    assert got[2]["error_text"] == "Matching field 'profile_id' is missing"


def test_injected_task_failure_ends_in_error_and_applies_nothing(
    api: httpx.Client, control: httpx.Client
) -> None:
    assert (
        control.post("/fail-tasks", json={"times": 1, "error_text": "Database is read-only"}).status_code
        == 200
    )

    seen = wait(api, start(api, [profile("a@example.com")]))

    assert seen[-1]["status"] == "error"
    assert seen[-1]["result"] == {"error": 500, "error_text": "Database is read-only"}
    assert control.get("/profiles").json()["profiles"] == []
    assert results(api, [profile("a@example.com")])[0]["status"] == "created"


def test_skip_triggers_and_task_listing(api: httpx.Client, control: httpx.Client) -> None:
    results(api, [profile("a@example.com"), profile("bad")])
    results(api, [profile("b@example.com")], skip_triggers=True)

    tasks = control.get("/tasks").json()["tasks"]

    assert [(t["profiles"], t["triggered"], t["status"]) for t in tasks] == [
        (2, 1, "completed"),
        (1, 0, "completed"),
    ]
    assert all(t["trigger_id"] == 13 and t["body_bytes"] > 0 for t in tasks)


def test_reset_forgets_tasks_and_profiles(
    sandbox: SandboxServer, api: httpx.Client, control: httpx.Client
) -> None:
    task_id = start(api, [profile("a@example.com")])
    sandbox.reset()
    assert control.get("/tasks").json()["tasks"] == []
    assert api.post(STATUS_PATH, json={"token": TOKEN, "task_id": task_id}).json()["error"] == 404


def test_demo_env_points_at_the_vendor_prefix(sandbox: SandboxServer) -> None:
    env = sandbox.app.vendors["altcraft"].demo_env(sandbox.vendor_url("altcraft"))
    assert env == {"ALTCRAFT_BASE_URL": sandbox.vendor_url("altcraft"), "ALTCRAFT_TOKEN": TOKEN}
    assert env["ALTCRAFT_BASE_URL"].endswith("/altcraft")

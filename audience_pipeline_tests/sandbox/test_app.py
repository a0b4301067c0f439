"""The sandbox shell: server lifecycle, control routes and fault injection."""

from __future__ import annotations

import time

import httpx
import pytest

from audience_pipeline.sandbox import SandboxServer, SandboxSettings, SandboxVendor, serve_forever
from audience_pipeline.sandbox.app import build_vendors
from audience_pipeline.sandbox.faults import FaultRegistry, parse_fault

LIST = "/public-api/audience-imports"
PREFIXES = {"cxi": "/cxi"}


def test_every_vendor_satisfies_the_protocol_and_has_a_unique_prefix() -> None:
    vendors = build_vendors(SandboxSettings())

    assert all(isinstance(vendor, SandboxVendor) for vendor in vendors)
    assert "cxi" in {vendor.name for vendor in vendors}
    assert len({vendor.prefix for vendor in vendors}) == len(vendors)


def test_fault_registry_consumes_matching_faults_in_order() -> None:
    registry = FaultRegistry()
    registry.add(parse_fault({"vendor": "cxi", "kind": "status", "path_contains": "/status"}, PREFIXES))
    registry.add(parse_fault({"vendor": "cxi", "kind": "drop", "times": 2}, PREFIXES))

    assert registry.take("GET", "/cxiother/status") is None
    taken = [registry.take("GET", "/cxi/x/status"), registry.take("GET", "/cxi/x/status")]
    assert [fault.kind if fault else None for fault in taken] == ["status", "drop"]
    assert registry.take("POST", "/cxi/y") is not None
    assert registry.take("GET", "/cxi/y") is None


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "explode"},
        {"kind": "status", "vendor": "nobody"},
        {"kind": "status", "status": 200},
        {"kind": "status", "times": 0},
        {"kind": "delay", "delay_seconds": "soon"},
        [],
    ],
)
def test_invalid_fault_specs_are_rejected(spec: object) -> None:
    with pytest.raises(ValueError):
        parse_fault(spec, PREFIXES)


def test_sandbox_refuses_non_loopback_hosts() -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        SandboxServer(host="0.0.0.0")
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        serve_forever(host="192.168.1.10", port=1)


@pytest.mark.integration
def test_server_binds_a_free_local_port_and_stops() -> None:
    with SandboxServer(SandboxSettings(pace_seconds=0.01)) as server:
        assert server.port != 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert server.vendor_url("cxi") == f"{server.url}/cxi"
        assert httpx.get(f"{server.url}/_sandbox/health").json() == {"ok": True}

    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/_sandbox/health", timeout=1)


@pytest.mark.integration
def test_unknown_paths_answer_json_errors(sandbox: SandboxServer) -> None:
    missing = httpx.get(f"{sandbox.url}/nowhere")
    wrong_method = httpx.delete(f"{sandbox.url}/_sandbox/health")

    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.integration
def test_reset_forgets_imports_and_faults(sandbox: SandboxServer, cxi: httpx.Client) -> None:
    created = cxi.post(
        LIST,
        data={"name": "Before reset", "emailFieldName": "Email"},
        files={"file": ("a.csv", b"Email\na@example.com\n", "text/csv")},
    )
    assert created.status_code == 201
    sandbox.add_fault(vendor="cxi", kind="status", status=500)

    reset = httpx.post(f"{sandbox.url}/_sandbox/reset")

    assert reset.json() == {"ok": True}
    assert cxi.get(LIST).json() == {"data": {"audienceImports": []}}


@pytest.mark.integration
def test_status_fault_with_retry_after_then_success(sandbox: SandboxServer, cxi: httpx.Client) -> None:
    registered = httpx.post(
        f"{sandbox.url}/_sandbox/faults",
        json={
            "vendor": "cxi",
            "path_contains": "/status",
            "kind": "status",
            "status": 503,
            "retry_after": 1,
            "times": 2,
        },
    )
    assert registered.status_code == 201, registered.text

    unaffected = cxi.get(LIST)
    answers = [cxi.get(f"{LIST}/async-jobs/unknown/status") for _ in range(3)]

    assert unaffected.status_code == 200
    assert [answer.status_code for answer in answers] == [503, 503, 404]
    assert [answer.headers.get("Retry-After") for answer in answers] == ["1", "1", None]
    assert answers[0].json()["error"]["code"] == "sandbox_fault"


@pytest.mark.integration
def test_status_fault_on_an_upload_still_answers(sandbox: SandboxServer, cxi: httpx.Client) -> None:
    sandbox.add_fault(vendor="cxi", kind="status", status=502, method="POST")
    upload = {"file": ("a.csv", b"Email\n" + b"a@example.com\n" * 20_000, "text/csv")}
    form = {"name": "Upload", "emailFieldName": "Email"}

    first = cxi.post(LIST, data=form, files=upload)
    second = cxi.post(LIST, data=form, files=upload)

    assert (first.status_code, second.status_code) == (502, 201)


@pytest.mark.integration
def test_drop_fault_closes_the_connection_without_a_response(
    sandbox: SandboxServer, cxi: httpx.Client
) -> None:
    sandbox.add_fault(vendor="cxi", kind="drop")

    with pytest.raises(httpx.RemoteProtocolError):
        cxi.get(LIST)
    assert cxi.get(LIST).status_code == 200


@pytest.mark.integration
def test_delay_fault_slows_one_request(sandbox: SandboxServer, cxi: httpx.Client) -> None:
    sandbox.add_fault(vendor="cxi", kind="delay", delay_seconds=0.3)

    started = time.monotonic()
    delayed = cxi.get(LIST)
    delayed_for = time.monotonic() - started
    started = time.monotonic()
    cxi.get(LIST)
    normal_for = time.monotonic() - started

    assert delayed.status_code == 200
    assert delayed_for >= 0.3
    assert normal_for < 0.3


@pytest.mark.integration
def test_faults_never_hit_control_routes(sandbox: SandboxServer) -> None:
    sandbox.add_fault(kind="status", status=500, times=5)

    assert httpx.get(f"{sandbox.url}/_sandbox/health").status_code == 200
    assert httpx.post(f"{sandbox.url}/_sandbox/faults", json={"kind": "nope"}).status_code == 400

"""What the fault-matrix suites share: a CXI-only feeds file with fast retries, a webhook that
records alerts, and the end-of-scenario proof that nothing was lost or sent twice."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg

from audience_pipeline.assets import handle_of, metadata_of
from audience_pipeline.automation.lifecycle import PartitionState, feed_states, latest_by_partition
from audience_pipeline.sandbox import SandboxServer
from audience_pipeline_tests.integration.conftest import DEMO_MAPPING, FEED


def cxi_feeds(
    *, max_attempts: int = 3, import_timeout_minutes: float | None = None, max_poll_errors: int = 3
) -> str:
    """The demo's CXI feed alone, retrying at once (no back-off), with alerts to ``ALERT_WEBHOOK_URL``."""
    timeout = f"\n    import_timeout_minutes: {import_timeout_minutes}" if import_timeout_minutes else ""
    return f"""\
sources:
  hr_drop:
    type: folder
    path: incoming
    stable_after_seconds: 0
destinations:
  cxi:
    type: communicate_xi
    base_url: ${{CXI_BASE_URL}}
    api_key: ${{CXI_API_KEY}}
    timeout_seconds: 5
    max_poll_errors: {max_poll_errors}{timeout}
alerts:
  webhook_url: ${{ALERT_WEBHOOK_URL}}
feeds:
  - name: {FEED}
    source: hr_drop
    destination: cxi
    retries:
      max_attempts: {max_attempts}
      backoff_seconds: 0
{DEMO_MAPPING}    options:
      import_name: All staff
"""


class Webhook:
    """An incoming-webhook endpoint on 127.0.0.1 that keeps every JSON body posted to it."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.posts.append(json.loads(body))
                self.send_response(outer.status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/T000/B000/secret-token-5c1d"

    @property
    def texts(self) -> list[str]:
        return [post["text"] for post in self.posts]


@contextmanager
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    thread = threading.Thread(target=hook.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        hook.server.shutdown()
        hook.server.server_close()


def imports_received(sandbox: SandboxServer) -> list[dict]:
    """Every request that made Communicate XI start an import job: a create (201) or a new file (PUT 200)."""
    requests = sandbox.requests(vendor="cxi", path_contains="/public-api/audience-imports")
    return [
        r
        for r in requests
        if (r["method"] == "POST" and r["status"] == 201)
        or (r["method"] == "PUT" and r["status"] == 200 and r["path"].count("/") == 4)
    ]


def states(instance: dg.DagsterInstance, keys) -> dict[str, PartitionState]:
    return feed_states(instance, keys, keys.feed.retries)


def assert_nothing_lost(
    instance: dg.DagsterInstance, keys, sandbox: SandboxServer
) -> dict[str, PartitionState]:
    """Every partition ended; each reported one adds up; one vendor import per file content; every
    import the pipeline recorded has its own report."""
    found = states(instance, keys)
    assert found, "no partition"
    for partition, state in found.items():
        assert state.ended, f"{partition} did not end: {state.state} ({state.detail})"
    partitions = sorted(found)
    reports = latest_by_partition(instance, keys.failure_report, partitions)
    imports = latest_by_partition(instance, keys.import_job, partitions)
    for partition, state in found.items():
        if state.state != "reported":
            continue
        report = metadata_of(reports[partition])
        assert report["source_rows"] == (
            report["imported"]
            + report["rejected_by_validation"]
            + report["failed_at_target"]
            + report["ignored_by_target"]
        ), f"{partition}: counts do not add up: {report}"
        assert report["import_key"] == handle_of(imports[partition]).key
    submitted = [p for p in partitions if p in imports and metadata_of(imports[p])["submitted_rows"]]
    received = imports_received(sandbox)
    assert len(received) == len(submitted), f"vendor imports {received} for partitions {submitted}"
    return found

"""Benchmark pushing validated rows through the Yesmail client against bare httpx loops.

All runs post to the same sandbox (Yesmail import endpoint) with the same concurrency, so the
sandbox's own per-request cost weighs on each. The sandbox runs in its own process, as a vendor
would: in-process it would share the interpreter lock with the code under test and charge its
request handling to whichever side happens to be encoding at the time. The bare loops send
bodies serialised beforehand (by ``encode_records`` + ``pack_batches``, timed on their own), in
two forms: an ``httpx.AsyncClient`` with a semaphore (the setup PERF-NOTES measured) and an
``httpx.Client`` shared by as many threads as requests in flight, which is faster on this kind of
machine (httpcore's async pool costs more CPU per request). The target is judged against the
faster of the two, so the figure cannot be flattered by a slow baseline. The client run is the
whole ``YesmailClient.submit``: member encoding, batching, ``VendorHTTP`` (retries, redaction,
logging) and ticket parsing.

Usage: ``python -m benchmarks.bench_push --rows 1000000 [--in-flight 8] [--batch 1000]
[--repeat 3] [--json] [--strict]``. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

from audience_pipeline.destinations.json_batches import encode_in_slices, pack_batches, send_concurrently
from audience_pipeline.destinations.yesmail import YesmailClient, YesmailResource
from audience_pipeline.sandbox import SandboxServer, SandboxSettings
from audience_pipeline.sandbox.server import serve_forever
from audience_pipeline.validation import validate_file
from benchmarks.bench_validate import DEFAULT_DATA_DIR, benchmark_mapping, ensure_file

RATIO_TARGET = 0.8  # client rows/s divided by bare-loop rows/s
USER, KEY = "bench-yesmail-user", "bench-yesmail-key"
LIST = "all-staff"
OPTIONS = {
    "target_list": LIST,
    "attributes": {
        "FIRSTNAME": "first_name",
        "LASTNAME": "last_name",
        "MOBILE": "mobile_phone",
        "DEPARTMENT": "department",
        "JOB_TITLE": "job_title",
        "START_DATE": "start_date",
        "OFFICE_CITY": "office_city",
    },
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_rows(rows: int, seed: int, data_dir: Path) -> pd.DataFrame:
    """Validated rows of a generated export (generated once and cached, like bench_validate)."""
    generated, _ = ensure_file(rows, seed, data_dir)
    return validate_file(generated.path, benchmark_mapping(), default_region="US").valid


@dataclass(frozen=True)
class SandboxProcess:
    """The sandbox served by a child process; only its URL and the reset route are needed here."""

    url: str

    def vendor_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def reset(self) -> None:
        httpx.post(f"{self.url}/_sandbox/reset", timeout=10).raise_for_status()


@contextmanager
def sandbox_process(settings: SandboxSettings, startup_timeout: float = 30.0) -> Iterator[SandboxProcess]:
    """Start ``audience-pipeline sandbox`` in a spawned process on a free port and wait for it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    child = multiprocessing.get_context("spawn").Process(
        target=serve_forever, args=("127.0.0.1", port, settings), daemon=True
    )
    child.start()
    sandbox = SandboxProcess(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            try:
                if httpx.get(f"{sandbox.url}/_sandbox/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if not child.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"sandbox process did not answer on port {port}") from None
                time.sleep(0.05)
        yield sandbox
    finally:
        child.terminate()
        child.join(timeout=10)


def _client(server: SandboxProcess | SandboxServer, batch: int, in_flight: int) -> YesmailClient:
    resource = YesmailResource(
        base_url=server.vendor_url("yesmail"),
        api_user=USER,
        api_key=KEY,
        max_in_flight=in_flight,
        max_members_per_request=batch,
        max_request_bytes=10_000_000,
    )
    return resource.destination(OPTIONS)


def serialise(client: YesmailClient, frame: pd.DataFrame, batch: int) -> tuple[list[bytes], float]:
    """The request bodies the client would send, and the seconds encode + pack took."""
    started = time.perf_counter()
    records = client.members(frame, trailing_comma=True)
    head, tail = client._envelope()
    bodies = [
        b.body
        for b in pack_batches(
            records,
            head=head,
            tail=tail,
            max_rows=batch,
            max_bytes=client.max_request_bytes,
            trailing_comma=True,
        )
    ]
    return bodies, time.perf_counter() - started


def _bare_client_options(in_flight: int) -> dict[str, Any]:
    """What every bare loop's httpx client is built with: the account headers and one pooled
    connection per request in flight."""
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    headers = {"Api-User": USER, "Api-Key": KEY, "Content-Type": "application/json"}
    return {"headers": headers, "limits": limits, "timeout": 60}


async def _bare(url: str, bodies: list[bytes], in_flight: int) -> int:
    gate = asyncio.Semaphore(in_flight)
    async with httpx.AsyncClient(**_bare_client_options(in_flight)) as client:

        async def post(body: bytes) -> int:
            async with gate:
                response = await client.post(url, content=body)
                if response.status_code != 202:
                    raise RuntimeError(f"bare loop got {response.status_code}: {response.text[:200]}")
                return 1

        return sum(await asyncio.gather(*(post(b) for b in bodies)))


def _bare_threads(url: str, bodies: list[bytes], in_flight: int) -> int:
    with httpx.Client(**_bare_client_options(in_flight)) as client:

        def post(body: bytes) -> int:
            response = client.post(url, content=body)
            if response.status_code != 202:
                raise RuntimeError(f"bare loop got {response.status_code}: {response.text[:200]}")
            return 1

        with ThreadPoolExecutor(max_workers=in_flight) as pool:
            return sum(pool.map(post, bodies))


def measure_bare(
    server: SandboxProcess | SandboxServer, bodies: list[bytes], in_flight: int, *, threads: bool
) -> float:
    url = f"{server.vendor_url('yesmail')}/v2/target-lists/{LIST}/members/import"
    started = time.perf_counter()
    sent = _bare_threads(url, bodies, in_flight) if threads else asyncio.run(_bare(url, bodies, in_flight))
    seconds = time.perf_counter() - started
    assert sent == len(bodies)
    return seconds


def measure_encode_then_bare(
    server: SandboxProcess | SandboxServer, frame: pd.DataFrame, batch: int, in_flight: int
) -> float:
    """The client's encoding and slicing feeding the threaded bare loop, without ``VendorHTTP``
    or ticket parsing: roughly the best any client that has to encode can do on this machine."""
    encoder = _client(server, batch, in_flight)
    head, tail = encoder._envelope()
    url = f"{server.vendor_url('yesmail')}/v2/target-lists/{LIST}/members/import"
    with httpx.Client(**_bare_client_options(in_flight)) as http:
        started = time.perf_counter()
        batches = encode_in_slices(
            frame,
            lambda part: encoder.members(part, trailing_comma=True),
            head=head,
            tail=tail,
            max_rows=batch,
            max_bytes=encoder.max_request_bytes,
        )
        statuses = send_concurrently(
            lambda b: http.post(url, content=b.body).status_code, batches, max_in_flight=in_flight
        )
        seconds = time.perf_counter() - started
    encoder.close()
    assert set(statuses) == {202}, set(statuses)
    return seconds


def measure_client(
    server: SandboxProcess | SandboxServer, frame: pd.DataFrame, batch: int, in_flight: int
) -> float:
    client = _client(server, batch, in_flight)
    try:
        started = time.perf_counter()
        handle = client.submit(frame, feed="bench", partition="bench.csv@0000000000")
        seconds = time.perf_counter() - started
    finally:
        client.close()
    assert sum(j.row_count for j in handle.jobs) == len(frame) == handle.submitted_rows
    return seconds


def run_benchmark(
    rows: int,
    *,
    batch: int,
    in_flight: int,
    repeat: int,
    pace: float,
    seed: int,
    data_dir: Path,
    sandbox: str = "process",
) -> dict[str, Any]:
    _log(f"loading {rows:,} validated rows")
    frame = load_rows(rows, seed, data_dir)
    settings = SandboxSettings(
        pace_seconds=pace,
        yesmail_api_user=USER,
        yesmail_api_key=KEY,
        yesmail_max_members=batch,
        yesmail_target_lists=(LIST,),
    )
    encode: list[float] = []
    bare_async: list[float] = []
    bare_threads: list[float] = []
    encode_then_bare: list[float] = []
    client: list[float] = []
    serving = sandbox_process(settings) if sandbox == "process" else SandboxServer(settings)
    with serving as server:
        setup = _client(server, batch, in_flight)
        try:
            for _ in range(repeat):
                bodies, seconds = serialise(setup, frame, batch)
                encode.append(seconds)
            body_bytes = sum(len(b) for b in bodies)
        finally:
            setup.close()
        for i in range(repeat):
            server.reset()
            _log(f"bare loops {i + 1}/{repeat}")
            bare_async.append(measure_bare(server, bodies, in_flight, threads=False))
            server.reset()
            bare_threads.append(measure_bare(server, bodies, in_flight, threads=True))
            server.reset()
            encode_then_bare.append(measure_encode_then_bare(server, frame, batch, in_flight))
            server.reset()
            _log(f"client {i + 1}/{repeat}")
            client.append(measure_client(server, frame, batch, in_flight))
        server.reset()
    valid = len(frame)
    async_s, threads_s = statistics.median(bare_async), statistics.median(bare_threads)
    bare_s, client_s = min(async_s, threads_s), statistics.median(client)
    floor_s = statistics.median(encode_then_bare)
    ratio = bare_s / client_s  # client rows/s over the faster bare loop's rows/s
    return {
        "rows": valid,
        "source_rows": rows,
        "batches": len(bodies),
        "body_mb": round(body_bytes / 1e6, 1),
        "batch": batch,
        "in_flight": in_flight,
        "sandbox": sandbox,
        "repeat": repeat,
        "encode_pack_seconds": round(statistics.median(encode), 3),
        "bare_async_seconds": round(async_s, 3),
        "bare_async_rows_per_s": round(valid / async_s),
        "bare_threads_seconds": round(threads_s, 3),
        "bare_threads_rows_per_s": round(valid / threads_s),
        "client_seconds": round(client_s, 3),
        "client_rows_per_s": round(valid / client_s),
        "ratio_to_async": round(async_s / client_s, 3),
        "ratio_to_threads": round(threads_s / client_s, 3),
        "encode_then_bare_seconds": round(floor_s, 3),
        "encode_then_bare_rows_per_s": round(valid / floor_s),
        "encode_then_bare_ratio": round(bare_s / floor_s, 3),
        "ratio": round(ratio, 3),
        "target": RATIO_TARGET,
        "result": "PASS" if ratio >= RATIO_TARGET else "FAIL",
    }


def format_report(report: dict[str, Any]) -> str:
    r = report
    return "\n".join(
        [
            f"rows pushed           {r['rows']:>11,}  ({r['batches']} batches of <= {r['batch']}, "
            f"{r['body_mb']} MB, {r['in_flight']} in flight, median of {r['repeat']}, "
            f"sandbox in a {r['sandbox']})",
            f"encode + pack         {r['encode_pack_seconds']:>11.3f} s",
            f"bare loop, async      {r['bare_async_seconds']:>11.3f} s  "
            f"{r['bare_async_rows_per_s']:>9,} rows/s"
            f"  (client / this {r['ratio_to_async']:.3f})",
            f"bare loop, threads    {r['bare_threads_seconds']:>11.3f} s  "
            f"{r['bare_threads_rows_per_s']:>9,} rows/s"
            f"  (client / this {r['ratio_to_threads']:.3f})",
            f"encode + bare threads {r['encode_then_bare_seconds']:>11.3f} s  "
            f"{r['encode_then_bare_rows_per_s']:>9,} rows/s  "
            f"(this / faster bare {r['encode_then_bare_ratio']:.3f})",
            f"YesmailClient.submit  {r['client_seconds']:>11.3f} s  {r['client_rows_per_s']:>9,} rows/s",
            f"ratio client / faster {r['ratio']:>11.3f}    target >= {r['target']}  {r['result']}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_push", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="source rows to generate and validate")
    parser.add_argument("--batch", type=int, default=1000, help="members per request")
    parser.add_argument("--in-flight", type=int, default=8, help="concurrent requests (both runs)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pace", type=float, default=0.05, help="sandbox seconds per ticket state")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--sandbox",
        choices=("process", "thread"),
        default="process",
        help="sandbox in its own process (like a remote vendor) or a thread of this one",
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless the ratio meets the target")
    args = parser.parse_args(argv)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    report = run_benchmark(
        args.rows,
        batch=args.batch,
        in_flight=args.in_flight,
        repeat=args.repeat,
        pace=args.pace,
        seed=args.seed,
        data_dir=args.data_dir,
        sandbox=args.sandbox,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if args.strict and report["result"] != "PASS" else 0


if __name__ == "__main__":
    sys.exit(main())

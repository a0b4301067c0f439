"""Benchmark the import-status sensor with thousands of imports in flight.

For each N and latency: N real Communicate XI import jobs are created in the sandbox (stalled, so
they stay in flight), N ``import_job`` materializations are recorded in a persistent SQLite
instance as the asset writes them, and the feed's own ``__import_status`` sensor is ticked the
way the daemon ticks it (``SensorDriver``: cursor kept in the instance). The sandbox runs in its
own process, as a vendor would; ``--latency-ms`` holds every status answer that long.

Time between ticks is simulated, not slept: the sensor's clock moves on by its 15 s minimum
interval (or by the tick's own duration, if longer) after each tick; tick durations are real.
Every import is submitted at the start, so all are young (the worst case: nothing has backed off).
Which import a tick polled comes from the sandbox's request log, so the figures hold for any
version of the sensor.

With ``--feeds K`` the imports are spread over K feeds on one destination (sharing its limits),
whose sensors tick one after the other in each round: tick seconds are each sensor's, calls per
tick and the clock's steps are the round's (15 s, or the round's duration if longer).

Figures per run: tick seconds (median and max), status calls per tick, minutes until every
import was polled once, the longest gap between two polls of one import, the cursor's size, the
size of the state the sensor keeps in the instance, and the peak RSS of this process.

Usage: ``python -m benchmarks.bench_status [--sizes 100,1000,5000] [--latency-ms 0,50]
[--minutes 6] [--feeds 1] [--json] [--strict]``. ``--strict`` exits 1 unless, at the largest N with the
largest latency, every import is polled within 2 minutes, every tick takes at most 10 s and the
cursor is at most 16 KB. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import yaml

from audience_pipeline.assets import FeedKeys, _handle_metadata
from audience_pipeline.automation import status as status_module
from audience_pipeline.automation.status import status_sensor_name
from audience_pipeline.definitions import build_definitions
from audience_pipeline.destinations.base import ChunkJob, JobHandle
from audience_pipeline.feeds.loader import load_feeds
from audience_pipeline.runner import SensorDriver
from audience_pipeline.sandbox import SandboxSettings
from benchmarks.bench_push import sandbox_process

FEED = "bench"
API_KEY = "bench-cxi-key"
INTERVAL = 15.0
TARGET_GAP_SECONDS = 120.0
TARGET_TICK_SECONDS = 10.0
TARGET_CURSOR_BYTES = 16 * 1024
MAX_TICKS = 400
_JOB_IN_PATH = re.compile(r"/async-jobs/([^/]+)/status")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class VirtualTime:
    """The ``time`` module as the sensor sees it: wall-clock reads return simulated time."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@dataclass
class Run:
    imports: int
    latency_ms: int
    ticks: int
    tick_seconds_median: float
    tick_seconds_max: float
    calls_per_tick_median: float
    calls_per_tick_max: int
    minutes_to_poll_all: float | None
    polled_at_least_once: int
    max_gap_minutes: float | None
    cursor_bytes: int
    state_bytes: int
    peak_rss_mb: float


def create_jobs(base: str, count: int) -> list[str]:
    """``count`` stalled CXI jobs: one import, then a PUT of a small file per further job."""
    headers = {"X-GSCC-Api-Key": API_KEY, "Accept": "application/json"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        client.post("/_sandbox/cxi/stall", json={"stall": True}).raise_for_status()

    def upload(client: httpx.Client, method: str, path: str, n: int) -> dict:
        form = {"name": "Bench staff", "emailFieldName": "email"}
        if method == "POST":
            form["uniqueIdFieldName"] = "unique_id"
        body = f"unique_id,email\nE{n},e{n}@example.org\n".encode()
        response = client.request(method, path, data=form, files={"file": ("bench.csv", body, "text/csv")})
        response.raise_for_status()
        return response.json()["data"]

    with httpx.Client(base_url=f"{base}/cxi", headers=headers, timeout=30) as client:
        first = upload(client, "POST", "/public-api/audience-imports", 0)
        path = f"/public-api/audience-imports/{first['id']}"
        with ThreadPoolExecutor(max_workers=8) as pool:  # httpx.Client is safe to share between threads
            later = pool.map(lambda n: str(upload(client, "PUT", path, n)["asyncJobId"]), range(1, count))
            return [str(first["asyncJobId"]), *later]


def feed_names(count: int) -> list[str]:
    return [FEED] if count == 1 else [f"{FEED}{n}" for n in range(1, count + 1)]


def write_feeds(root: Path, base: str, count: int = 1) -> Path:
    """``count`` feeds on one Communicate XI destination (so they share its polling limits)."""
    (root / "incoming").mkdir(parents=True, exist_ok=True)
    config = {
        "sources": {"drop": {"type": "folder", "path": str(root / "incoming")}},
        "destinations": {
            "cxi": {"type": "communicate_xi", "base_url": f"{base}/cxi", "api_key": "${BENCH_CXI_KEY}"}
        },
        "feeds": [
            {
                "name": name,
                "source": "drop",
                "destination": "cxi",
                "mapping": {"unique_id": "ID", "email": "Email"},
                "options": {"import_name": f"Bench staff {name}"},
            }
            for name in feed_names(count)
        ],
    }
    path = root / "feeds.yaml"
    path.write_text(yaml.safe_dump(config), "utf-8")
    return path


def record_imports(
    instance: dg.DagsterInstance, keys: FeedKeys, jobs: list[str], submitted_at: float
) -> None:
    """The ``import_job`` materializations the asset would have written, one file per job."""
    partitions = [f"employees_{i:05d}.csv@{i:010x}" for i in range(len(jobs))]
    instance.add_dynamic_partitions(keys.partitions.name, partitions)
    for partition, job in zip(partitions, jobs, strict=True):
        handle = JobHandle(
            vendor="communicate_xi",
            feed=keys.feed.name,
            partition=partition,
            jobs=[ChunkJob(job_id=job, first_row=0, row_count=1)],
            submitted_rows=1,
            submitted_at=submitted_at,
        )
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=keys.import_job,
                partition=partition,
                metadata=_handle_metadata(handle, reused=False),
            )
        )


def polled_jobs(base: str) -> list[str]:
    """Job ids whose status the sandbox answered since the last call (the log is then cleared)."""
    entries = httpx.get(
        f"{base}/_sandbox/requests", params={"vendor": "cxi", "method": "GET"}, timeout=60
    ).json()["requests"]
    httpx.delete(f"{base}/_sandbox/requests", timeout=60).raise_for_status()
    return [m.group(1) for e in entries if (m := _JOB_IN_PATH.search(e["path"]))]


def state_bytes(instance: dg.DagsterInstance, feeds: list[str]) -> int:
    """What the sensors keep in the instance's key-value table (nothing, for the sensor of before)."""
    wanted = {f"audience_pipeline/import_status/{feed}" for feed in feeds}
    return sum(len(v) for v in instance.daemon_cursor_storage.get_cursor_values(wanted).values())


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(count: int, latency_ms: int, minutes: float, feeds_count: int = 1) -> Run:
    """One run; with ``feeds_count > 1`` the imports are spread over that many feeds on one
    destination, whose sensors tick one after the other (as the daemon does without threads);
    tick seconds are per sensor, calls per tick per round."""
    settings = SandboxSettings(pace_seconds=1.0, cxi_api_key=API_KEY)
    with sandbox_process(settings) as sandbox, tempfile.TemporaryDirectory() as tmp:
        base = sandbox.url
        started = time.monotonic()
        jobs = create_jobs(base, count)
        _log(f"  {count} stalled jobs in {time.monotonic() - started:.1f} s")
        if latency_ms:
            fault = {
                "kind": "delay",
                "vendor": "cxi",
                "path_contains": "/status",
                "delay_seconds": latency_ms / 1000,
                "times": 10**9,
            }
            httpx.post(f"{base}/_sandbox/faults", json=fault, timeout=10).raise_for_status()
        os.environ["BENCH_CXI_KEY"] = API_KEY
        feeds = load_feeds(write_feeds(Path(tmp), base, feeds_count))
        names = [feed.name for feed in feeds.feeds]
        defs = build_definitions(feeds, Path(tmp) / "home")
        clock = VirtualTime()
        real_time, status_module.time = status_module.time, clock  # type: ignore[assignment]
        (Path(tmp) / "dagster").mkdir()
        instance = dg.DagsterInstance.local_temp(tempdir=str(Path(tmp) / "dagster"))
        try:
            started = time.monotonic()
            for i, feed in enumerate(feeds.feeds):
                record_imports(instance, FeedKeys(feed, feeds), jobs[i::feeds_count], submitted_at=clock.now)
            _log(f"  {count} import_job materializations in {time.monotonic() - started:.1f} s")
            polled_jobs(base)  # forget the setup's requests
            driver = SensorDriver(defs, instance, log_level="WARNING")
            start, durations, calls, rounds = clock.now, [], [], 0
            last: dict[str, float] = {}
            first_all: float | None = None
            gaps: list[float] = []
            while rounds < MAX_TICKS:
                began = time.monotonic()
                for name in names:
                    begun = time.monotonic()
                    driver.tick(status_sensor_name(name))
                    durations.append(time.monotonic() - begun)
                took = time.monotonic() - began
                rounds += 1
                polled = polled_jobs(base)
                calls.append(len(polled))
                for job in polled:
                    if job in last:
                        gaps.append(clock.now - last[job])
                    last[job] = clock.now
                if first_all is None and len(last) == count:
                    first_all = clock.now - start
                if clock.now - start >= minutes * 60 and first_all is not None:
                    break
                clock.now += max(INTERVAL, took)
            # An import never polled again by the end has a gap up to the end at least.
            end = clock.now
            gaps += [end - t for t in last.values()]
            cursor = max((driver.cursors.get(status_sensor_name(n)) or "" for n in names), key=len)
            return Run(
                imports=count,
                latency_ms=latency_ms,
                ticks=rounds,
                tick_seconds_median=round(statistics.median(durations), 3),
                tick_seconds_max=round(max(durations), 3),
                calls_per_tick_median=statistics.median(calls),
                calls_per_tick_max=max(calls),
                minutes_to_poll_all=None if first_all is None else round(first_all / 60, 2),
                polled_at_least_once=len(last),
                max_gap_minutes=round(max(gaps) / 60, 2) if gaps and first_all is not None else None,
                cursor_bytes=len(cursor.encode()),
                state_bytes=state_bytes(instance, names),
                peak_rss_mb=round(peak_rss_mb(), 1),
            )
        finally:
            status_module.time = real_time  # type: ignore[assignment]
            instance.dispose()


def missed_targets(run: Run) -> list[str]:
    missed = []
    if run.max_gap_minutes is None or run.max_gap_minutes * 60 > TARGET_GAP_SECONDS:
        missed.append(f"an import went {run.max_gap_minutes} min without a poll (target 2 min)")
    if run.tick_seconds_max > TARGET_TICK_SECONDS:
        missed.append(f"a tick took {run.tick_seconds_max} s (target {TARGET_TICK_SECONDS:g} s)")
    if run.cursor_bytes > TARGET_CURSOR_BYTES:
        missed.append(f"the cursor is {run.cursor_bytes} bytes (target {TARGET_CURSOR_BYTES})")
    return missed


def format_table(runs: list[Run]) -> str:
    header = (
        "| in flight | latency | ticks | tick s (median / max) | calls/tick (median / max) | "
        "min to poll all | max gap min | cursor B | state KB | peak RSS MB |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in runs:
        poll_all = "never" if r.minutes_to_poll_all is None else f"{r.minutes_to_poll_all:g}"
        gap = "n/a" if r.max_gap_minutes is None else f"{r.max_gap_minutes:g}"
        lines.append(
            f"| {r.imports:,} | {r.latency_ms} ms | {r.ticks} "
            f"| {r.tick_seconds_median:g} / {r.tick_seconds_max:g} "
            f"| {r.calls_per_tick_median:g} / {r.calls_per_tick_max} | {poll_all} "
            f"({r.polled_at_least_once:,} polled) | {gap} | {r.cursor_bytes:,} | {r.state_bytes / 1024:,.0f} "
            f"| {r.peak_rss_mb:g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,5000", help="imports in flight, comma-separated")
    parser.add_argument("--latency-ms", default="0,50", help="status answer latencies, comma-separated")
    parser.add_argument("--minutes", type=float, default=6.0, help="simulated minutes of ticks per run")
    parser.add_argument("--feeds", type=int, default=1, help="spread the imports over this many feeds")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the largest run misses a target")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    latencies = [int(s) for s in args.latency_ms.split(",")]
    runs = []
    for count in sizes:
        for latency in latencies:
            _log(f"{count} in flight, {latency} ms per status call")
            runs.append(measure(count, latency, args.minutes, args.feeds))
            _log(f"  {runs[-1]}")
    print(json.dumps([asdict(r) for r in runs], indent=2) if args.json else format_table(runs))
    judged = max(runs, key=lambda r: (r.imports, r.latency_ms))
    missed = missed_targets(judged)
    for line in missed:
        print(f"MISSED at {judged.imports} in flight, {judged.latency_ms} ms: {line}", file=sys.stderr)
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark how long a dropped HR file takes to reach its vendor and its report, under the daemon.

Issue 11 asks that, under a real ``dagster-daemon`` on a 2-core machine, a dropped 200-row file
reaches ``import_job`` materialized in at most 15 s and its ``failure_report`` in at most 30 s
(median of 5), with the sensors at their normal intervals. This runs exactly that:

- the sandbox in this process (its own thread; it answers like the vendor, at ``--pace``);
- a temporary ``DAGSTER_HOME`` whose ``dagster.yaml`` is ``deploy/dagster.yaml`` with SQLite
  storage in place of Postgres (same queue, pools, threaded sensors), a drop folder and a feeds
  file holding one of the demo's feeds (``--feed``, default Communicate XI);
- ``dagster-daemon run`` on the project's ``workspace.yaml`` (its code location in a gRPC
  subprocess, as in ``dagster dev``), started once and warmed up with one file that is not
  counted;
- then ``--files`` times, after a random pause of 0-15 s (seeded; real files do not arrive in
  step with the sensors' ticks): the demo's 200-row export, made unique, written beside the drop
  folder and renamed into it (an atomic arrival), and the instance read every 0.2 s until the file's
  ``import_job`` and ``failure_report`` materializations appear.

Times are taken from the event log (each materialization's own timestamp) minus the moment of the
rename, and split into the steps a person waits for: sensor noticed the file (run created), run
started, import submitted, report run created, report written.

Usage: ``python -m benchmarks.bench_latency [--files 5] [--feed all_staff_cxi] [--json] [--strict]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from benchmarks.bench_validate import REPO_ROOT, _log

IMPORT_TARGET_SECONDS = 15.0
REPORT_TARGET_SECONDS = 30.0
DEMO_DIR = REPO_ROOT / "audience_pipeline" / "feeds" / "demo"
DEMO_CSV = DEMO_DIR / "incoming" / "employees_2026-11-01.csv"
ARRIVAL_SPREAD_SECONDS = 15.0
"""Each file is dropped after a random pause of up to one status-sensor interval: dropped right
after the previous report, files would arrive in step with the sensors' ticks and every one would
see the same (lucky or unlucky) phase."""
SQLITE_INSTANCE_KEYS = ("run_coordinator", "concurrency", "run_retries", "sensors", "schedules", "telemetry")


@dataclass
class Trial:
    file: str
    partition: str
    noticed_seconds: float
    ingest_started_seconds: float
    import_seconds: float
    report_run_seconds: float
    report_seconds: float


def write_instance(home: Path) -> None:
    """``deploy/dagster.yaml`` without its Postgres storage (SQLite under ``home`` instead)."""
    production = yaml.safe_load((REPO_ROOT / "deploy" / "dagster.yaml").read_text(encoding="utf-8"))
    config = {k: production[k] for k in SQLITE_INSTANCE_KEYS if k in production}
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def write_feeds(root: Path, feed_name: str) -> Path:
    """The demo feeds file with one feed, reading ``root/incoming``."""
    raw = yaml.safe_load((DEMO_DIR / "feeds.yaml").read_text(encoding="utf-8"))
    feeds = [f for f in raw["feeds"] if f["name"] == feed_name]
    if not feeds:
        raise SystemExit(f"no demo feed named {feed_name!r}")
    raw["feeds"] = feeds
    raw["destinations"] = {feeds[0]["destination"]: raw["destinations"][feeds[0]["destination"]]}
    raw["sources"] = {
        feeds[0]["source"]: {**raw["sources"][feeds[0]["source"]], "path": str(root / "incoming")}
    }
    (root / "incoming").mkdir(parents=True, exist_ok=True)
    path = root / "feeds.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def drop(root: Path, name: str, marker: str) -> float:
    """The demo export with one value made unique (new content, new partition), renamed into the
    drop folder; returns the wall-clock time of the rename."""
    lines = DEMO_CSV.read_text(encoding="utf-8").splitlines(keepends=True)
    header = lines[0].rstrip("\r\n").split(",")
    city = header.index("Office City")
    first = lines[1].rstrip("\r\n").split(",")
    first[city] = f"Bench {marker}"
    lines[1] = ",".join(first) + "\n"
    staging = root / f".{name}.part"
    staging.write_text("".join(lines), encoding="utf-8")
    at = time.time()
    staging.rename(root / "incoming" / name)
    return at


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def measure(instance, feed: str, name: str, dropped_at: float, timeout: float) -> Trial:
    import dagster as dg

    def materialized(asset: str):
        result = instance.fetch_materializations(dg.AssetKey([feed, asset]), limit=20)
        stem = name.rsplit(".", 1)[0]
        return next((r for r in result.records if r.partition_key and stem in r.partition_key), None)

    imported = _wait(lambda: materialized("import_job"), timeout, f"import_job of {name}")
    partition = imported.partition_key
    ingest = instance.get_run_record_by_id(imported.run_id)
    reported = _wait(lambda: materialized("failure_report"), timeout, f"failure_report of {name}")
    report_run = instance.get_run_record_by_id(reported.run_id)
    return Trial(
        file=name,
        partition=partition,
        noticed_seconds=round(ingest.create_timestamp.timestamp() - dropped_at, 2),
        ingest_started_seconds=round((ingest.start_time or 0) - dropped_at, 2),
        import_seconds=round(imported.timestamp - dropped_at, 2),
        report_run_seconds=round(report_run.create_timestamp.timestamp() - dropped_at, 2),
        report_seconds=round(reported.timestamp - dropped_at, 2),
    )


def run(
    files: int, feed: str, pace: float, timeout: float, keep_log: Path | None = None, seed: int = 7
) -> dict:
    import dagster as dg

    from audience_pipeline.cli import random_credentials
    from audience_pipeline.sandbox.app import SandboxSettings
    from audience_pipeline.sandbox.server import SandboxServer

    settings = random_credentials(SandboxSettings(pace_seconds=pace))
    with (
        tempfile.TemporaryDirectory(prefix="bench_latency_", ignore_cleanup_errors=True) as tmp,
        SandboxServer(settings) as server,
    ):
        root = Path(tmp)
        home = root / "dagster_home"
        write_instance(home)
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "AUDIENCE_PIPELINE_FEEDS": str(write_feeds(root, feed)),
            "AUDIENCE_PIPELINE_HOME": str(root / "data"),
            "PYTHONPATH": str(REPO_ROOT),  # this checkout's code, whatever the venv installed
        }
        for name, vendor in server.app.vendors.items():
            env.update(vendor.demo_env(server.vendor_url(name)))
        log = (root / "daemon.log").open("wb")
        daemon = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("dagster-daemon")),
                "run",
                "-w",
                str(REPO_ROOT / "workspace.yaml"),
            ],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            with dg.DagsterInstance.from_config(str(home)) as instance:
                _log("daemon started; warming up with one file (not counted)")
                measure(instance, feed, "warmup.csv", drop(root, "warmup.csv", "warmup"), timeout)
                trials = []
                arrivals = random.Random(seed)
                for n in range(1, files + 1):
                    name = f"employees_bench_{n}.csv"
                    time.sleep(arrivals.uniform(0, ARRIVAL_SPREAD_SECONDS))
                    trials.append(measure(instance, feed, name, drop(root, name, str(n)), timeout))
                    _log(f"{name}: {asdict(trials[-1])}")
        except TimeoutError:
            log.flush()
            sys.stderr.write((root / "daemon.log").read_text(errors="replace")[-4000:])
            with dg.DagsterInstance.from_config(str(home)) as instance:
                for record in instance.get_run_records(limit=20):
                    sys.stderr.write(f"run {record.dagster_run.job_name} {record.dagster_run.status}\n")
            raise
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):  # its code server can outlive a SIGTERM
                os.killpg(daemon.pid, signal.SIGKILL)
            log.close()
            if keep_log is not None:
                keep_log.write_bytes((root / "daemon.log").read_bytes())
    import_median = statistics.median(t.import_seconds for t in trials)
    report_median = statistics.median(t.report_seconds for t in trials)
    return {
        "feed": feed,
        "files": files,
        "pace_seconds": pace,
        "import_seconds_median": import_median,
        "report_seconds_median": report_median,
        "import_target_seconds": IMPORT_TARGET_SECONDS,
        "report_target_seconds": REPORT_TARGET_SECONDS,
        "passed": import_median <= IMPORT_TARGET_SECONDS and report_median <= REPORT_TARGET_SECONDS,
        "trials": [asdict(t) for t in trials],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5)
    parser.add_argument("--feed", default="all_staff_cxi", help="one of the demo feeds")
    parser.add_argument("--pace", type=float, default=0.5, help="sandbox seconds per job state")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait per step")
    parser.add_argument("--seed", type=int, default=7, help="seeds the pauses between files")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--daemon-log", type=Path, help="keep the daemon's log (sensor ticks, runs) here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a median misses its target")
    args = parser.parse_args(argv)
    result = run(args.files, args.feed, args.pace, args.timeout, args.daemon_log, args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['feed']}, {result['files']} files of 200 rows, seconds after the drop:")
        print("  file                      noticed  started  import  report run  report")
        for t in result["trials"]:
            print(
                f"  {t['file']:<25} {t['noticed_seconds']:>7.1f}  {t['ingest_started_seconds']:>7.1f}"
                f"  {t['import_seconds']:>6.1f}  {t['report_run_seconds']:>10.1f}"
                f"  {t['report_seconds']:>6.1f}"
            )
        print(
            f"  median: import {result['import_seconds_median']:.1f} s "
            f"(target <= {IMPORT_TARGET_SECONDS:.0f}), "
            f"report {result['report_seconds_median']:.1f} s (target <= {REPORT_TARGET_SECONDS:.0f}): "
            f"{'ok' if result['passed'] else 'MISSED'}"
        )
    return 0 if result["passed"] or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark loading the code location for a feeds file with many feeds.

Issue 11 asks that a feeds file with 50 feeds load in at most 3 s: that is what ``dagster dev``,
the daemon and every run process pay before doing anything, so it is measured the way they pay
it, in a fresh interpreter each time:

1. **import**: ``import audience_pipeline.definitions`` (dagster, pandas, pyarrow and the package).
2. **load**: ``load_feeds`` (read, validate and resolve ``${VAR}`` references in the YAML).
3. **build**: ``build_definitions`` (assets, checks, jobs, sensors and resources of every feed).
4. **resolve**: ``Definitions.get_repository_def()`` followed by listing every job and sensor.
5. **snapshot**: the repository snapshot a gRPC code-location server sends to the webserver and
   daemon (``RepositorySnap.from_def``, a Dagster internal: the same call ``dagster api grpc``
   makes when it loads the code location).

The generated feeds file repeats the demo's five feeds (one per vendor) with numbered names, so
every destination type is built as often as the others. Reported figures are medians of
``--repeat`` fresh processes; ``load_seconds`` is parse + build + resolve + snapshot (import
excluded, as it is paid once per process whatever the feeds file holds).

Usage: ``python -m benchmarks.bench_load [--feeds 50] [--repeat 5] [--json] [--strict]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.bench_validate import REPO_ROOT, RESULT_MARKER, _log

LOAD_SECONDS_TARGET = 3.0
DEMO_FEEDS = REPO_ROOT / "audience_pipeline" / "feeds" / "demo" / "feeds.yaml"
PLACEHOLDER_ENV = {
    "CXI_BASE_URL": "https://cxi.example.invalid",
    "CXI_API_KEY": "bench-key",
    "APSIS_BASE_URL": "https://apsis.example.invalid",
    "APSIS_CLIENT_ID": "bench-id",
    "APSIS_CLIENT_SECRET": "bench-secret",
    "ALTCRAFT_BASE_URL": "https://altcraft.example.invalid",
    "ALTCRAFT_TOKEN": "bench-token",
    "AEP_BASE_URL": "https://aep.example.invalid",
    "AEP_IMS_URL": "https://ims.example.invalid",
    "AEP_CLIENT_ID": "bench-id",
    "AEP_CLIENT_SECRET": "bench-secret",
    "AEP_ORG_ID": "bench-org",
    "YESMAIL_BASE_URL": "https://yesmail.example.invalid",
    "YESMAIL_API_USER": "bench-user",
    "YESMAIL_API_KEY": "bench-key",
}


def write_feeds_file(root: Path, feeds: int) -> Path:
    """The demo's feeds repeated (renamed ``<name>_<n>``) until there are ``feeds`` of them."""
    raw = yaml.safe_load(DEMO_FEEDS.read_text(encoding="utf-8"))
    demo = raw["feeds"]
    raw["feeds"] = [
        {**demo[i % len(demo)], "name": f"{demo[i % len(demo)]['name']}_{i // len(demo) + 1}"}
        for i in range(feeds)
    ]
    for source in raw["sources"].values():
        if source.get("type") == "folder":
            source["path"] = str(root / "incoming")
    (root / "incoming").mkdir(parents=True, exist_ok=True)
    path = root / "feeds.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _child(feeds_path: Path) -> dict:
    import time

    started = time.perf_counter()
    from audience_pipeline.definitions import build_definitions
    from audience_pipeline.feeds.loader import load_feeds

    imported = time.perf_counter()
    feeds = load_feeds(feeds_path)
    loaded = time.perf_counter()
    defs = build_definitions(feeds, home=feeds_path.parent / "home")
    built = time.perf_counter()
    repository = defs.get_repository_def()
    jobs = repository.get_all_jobs()
    sensors = repository.sensor_defs
    resolved = time.perf_counter()
    from dagster._core.remote_representation.external_data import RepositorySnap

    RepositorySnap.from_def(repository)
    snapshotted = time.perf_counter()
    return {
        "feeds": len(feeds.feeds),
        "jobs": len(jobs),
        "sensors": len(sensors),
        "assets": len(repository.asset_graph.get_all_asset_keys()),
        "import_seconds": imported - started,
        "parse_seconds": loaded - imported,
        "build_seconds": built - loaded,
        "resolve_seconds": resolved - built,
        "snapshot_seconds": snapshotted - resolved,
        "load_seconds": snapshotted - imported,
    }


def _run_child(feeds_path: Path) -> dict:
    env = {**os.environ, **PLACEHOLDER_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_load", "--child", str(feeds_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith(RESULT_MARKER))
    return json.loads(line[len(RESULT_MARKER) :])


def run(feeds: int, repeat: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        path = write_feeds_file(Path(tmp), feeds)
        runs = []
        for n in range(repeat):
            runs.append(_run_child(path))
            _log(f"run {n + 1}/{repeat}: load {runs[-1]['load_seconds']:.2f} s")
    medians = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0] if k.endswith("_seconds")}
    counts = {k: runs[0][k] for k in ("feeds", "jobs", "sensors", "assets")}
    return {
        **counts,
        **medians,
        "max_load_seconds": round(max(r["load_seconds"] for r in runs), 3),
        "repeat": repeat,
        "target_seconds": LOAD_SECONDS_TARGET,
        "passed": medians["load_seconds"] <= LOAD_SECONDS_TARGET,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feeds", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(RESULT_MARKER + json.dumps(_child(args.child)))
        return 0
    result = run(args.feeds, args.repeat)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['feeds']} feeds ({result['assets']} assets, {result['jobs']} jobs, "
            f"{result['sensors']} sensors), median of {result['repeat']} fresh processes:\n"
            f"  import {result['import_seconds']:.2f} s (once per process)\n"
            f"  parse {result['parse_seconds']:.2f} s, build {result['build_seconds']:.2f} s, "
            f"resolve {result['resolve_seconds']:.2f} s, snapshot {result['snapshot_seconds']:.2f} s\n"
            f"  load {result['load_seconds']:.2f} s (max {result['max_load_seconds']:.2f} s; "
            f"target <= {LOAD_SECONDS_TARGET:.0f} s): {'ok' if result['passed'] else 'MISSED'}"
        )
    return 0 if result["passed"] or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())

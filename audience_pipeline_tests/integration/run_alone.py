"""One daemon tick and the run it launches, in a process of its own, as a container would run it:
the instance from ``$DAGSTER_HOME``, the storage from ``$AUDIENCE_PIPELINE_STORAGE``, nothing else.

    python run_alone.py FEEDS tick SENSOR [SECONDS]
    python run_alone.py FEEDS backfill JOB PARTITION

``tick`` evaluates the sensor until it launches a run (or the seconds are up); ``backfill`` runs
the job for one partition, as a re-run from the UI does. Prints one JSON line per run.
"""

from __future__ import annotations

import json
import sys
import time

import dagster as dg

from audience_pipeline.automation.lifecycle import process_identity
from audience_pipeline.definitions import build_definitions
from audience_pipeline.feeds.loader import load_feeds, register_feed_secrets
from audience_pipeline.runner import SensorDriver
from audience_pipeline.tags import PROCESS_TAG


def main(argv: list[str]) -> int:
    feeds_path, mode, name, *rest = argv
    feeds = load_feeds(feeds_path)
    register_feed_secrets(feeds)
    defs = build_definitions(feeds)
    with dg.DagsterInstance.get() as instance:
        driver = SensorDriver(defs, instance, log_level="WARNING")
        if mode == "tick":
            deadline = time.monotonic() + float(rest[0] if rest else 30)
            runs = driver.tick(name)
            while not runs and time.monotonic() < deadline:
                time.sleep(0.2)
                runs = driver.tick(name)
        elif mode == "backfill":
            job = defs.resolve_job_def(name)
            result = job.execute_in_process(
                instance=instance,
                partition_key=rest[0],
                tags={PROCESS_TAG: process_identity()},
                raise_on_error=False,
            )
            runs = [result.dagster_run]
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        for run in runs:
            print(json.dumps({"run_id": run.run_id, "job": run.job_name, "status": run.status.value}))
    return 0 if runs and all(run.is_success for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
